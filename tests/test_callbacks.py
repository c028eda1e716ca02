"""The probe callbacks (SnapshotCallback, ActivationStreamCallback) inside real training loops.

Real TRL SFTTrainer / GRPOTrainer, a plain transformers Trainer and PEFT LoRA on tiny models,
CPU only: the run directory (probe.json, snapshots/, activations/) is checked against what the
training actually did (weights recorded at the same steps, fresh forwards of the reloaded
snapshots), and training itself must be bit-identical with and without the callbacks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _probe_helpers import fresh_forward, read_store
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from posttrain_probe.callbacks import ProbeArguments, add_probe_callbacks, snapshot_schedule
from posttrain_probe.callbacks.probe_run import relative_drift
from posttrain_probe.callbacks.run_dir import step_name
from posttrain_probe.errors import ProbeError
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

BOS, EOS = 1, 2
LAYERS = [1, 2]
N_DOCS, SEQ_LEN = 8, 48
SCHEDULE = [2, 4, 6, 8, 10]  # default fraction 0.2 of max_steps 10


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_CHAT = arithmetic_dataset(48, seed=0).select_columns(["messages"])


def probe_args(**overrides) -> ProbeArguments:
    values = dict(
        probe_n_docs=N_DOCS, probe_seq_len=SEQ_LEN, probe_batch_size=3, probe_layers=LAYERS, probe_dtype="float32"
    )
    values.update(overrides)
    return ProbeArguments(**values)


def sft_trainer(out, *, model=None, probe=None, before=(), after=(), peft_config=None, tokenizer=None, **overrides):
    """An SFTTrainer on chat data; ``before`` callbacks run before the probe callbacks, ``after`` ones after."""
    config = dict(
        output_dir=str(out),
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=64,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    config.update(overrides)
    trainer = SFTTrainer(
        model=model if model is not None else tiny_model("qwen3"),
        args=SFTConfig(**config),
        train_dataset=_CHAT,
        processing_class=tokenizer or tiny_tokenizer(),
        peft_config=peft_config,
    )
    return _with_callbacks(trainer, probe, before, after)


def _with_callbacks(trainer, probe, before=(), after=()):
    for callback in before:
        trainer.add_callback(callback)
    callbacks = add_probe_callbacks(trainer, probe) if probe is not None else []
    for callback in after:
        trainer.add_callback(callback)
    return trainer, callbacks


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"parameters differ: {different[:5]}"


def manifest(run: Path) -> dict:
    return json.loads((run / "probe.json").read_text())


def load_snapshot(run: Path, step: int):
    return AutoModelForCausalLM.from_pretrained(run / "snapshots" / step_name(step), dtype=torch.float32).eval()


def _rng_state():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))


class RecordWeights(TrainerCallback):
    """Copies the model's state_dict at the end of the given optimizer steps."""

    def __init__(self, steps):
        self.steps, self.states = set(steps), {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


class RecordLogits(TrainerCallback):
    """Logits of the model being trained on fixed inputs at the given steps (eval mode, no RNG use)."""

    def __init__(self, steps, input_ids):
        self.steps, self.input_ids, self.logits = set(steps), input_ids, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                self.logits[state.global_step] = model(input_ids=self.input_ids).logits.clone()
            model.train(was_training)


class StateBefore(TrainerCallback):
    """Notes RNG states and train mode right before the probe callbacks run."""

    def __init__(self):
        self.seen = None

    def _note(self, model):
        self.seen = (_rng_state(), model.training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._note(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._note(model)


class StateAfter(TrainerCallback):
    """Compares RNG states and train mode right after the probe callbacks ran."""

    def __init__(self, before: StateBefore):
        self.before, self.checks = before, []

    def _check(self, state, model):
        rng, training = self.before.seen
        self.checks.append((state.global_step, training, _same_rng(rng, _rng_state()), model.training == training))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check(state, model)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------------
# SFT: the run directory against the training it observed
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    recorder = RecordWeights(SCHEDULE)
    before = StateBefore()
    after = StateAfter(before)
    trainer, callbacks = sft_trainer(out, probe=probe_args(), before=[before, recorder], after=[after])
    trainer.train()
    return SimpleNamespace(trainer=trainer, callbacks=callbacks, recorder=recorder, after=after, run=out / "probe")


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    trainer, _ = sft_trainer(tmp_path_factory.mktemp("sft_ref"))
    trainer.train()
    return trainer


def test_sft_manifest_lists_schedule_snapshots_and_activations(sft_run):
    run = sft_run.run
    data = manifest(run)
    assert data["format"] == "posttrain-probe/run" and data["format_version"] == 1
    assert data["paradigm"] == "sft" and data["trainer"] == "SFTTrainer"
    assert data["schedule"] == SCHEDULE
    assert data["layers"] == LAYERS
    assert data["world_size"] == 1
    rows = data["probe"].pop("rows")  # the sampled training rows; a store's doc_ids index this list
    assert len(rows) == N_DOCS and rows == sorted(set(rows))
    assert data["probe"] == {"dataset": "training data sample", "seq_len": SEQ_LEN, "seed": 0}
    assert [e["step"] for e in data["snapshots"]] == SCHEDULE
    assert [e["path"] for e in data["snapshots"]] == [f"snapshots/{step_name(s)}" for s in SCHEDULE]
    assert all(e["peft"] is None for e in data["snapshots"])
    assert [e["step"] for e in data["activations"]] == [0, *SCHEDULE]
    assert all(e["layers"] == LAYERS for e in data["activations"])
    # what is listed is what is on disk, nothing more (no temporary directories left behind)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [step_name(s) for s in SCHEDULE]
    assert sorted(p.name for p in (run / "activations").iterdir()) == [step_name(s) for s in [0, *SCHEDULE]]
    for step in [0, *SCHEDULE]:
        assert sorted(p.name for p in (run / "activations" / step_name(step)).iterdir()) == [
            f"layer{layer}" for layer in LAYERS
        ]
    # the fingerprint is the sha256 of the probe batches
    import hashlib

    digest = hashlib.sha256()
    for batch in sft_run.callbacks[0].probe.probe_batches():
        digest.update(batch.input_ids.numpy().tobytes())
        digest.update(batch.attention_mask.numpy().tobytes())
    assert data["probe_fingerprint"] == digest.hexdigest()


def test_sft_snapshots_reload_with_the_trained_weights(sft_run):
    assert sorted(sft_run.recorder.states) == SCHEDULE
    for step in SCHEDULE:
        snapshot = load_snapshot(sft_run.run, step)
        saved, trained = snapshot.state_dict(), sft_run.recorder.states[step]
        assert saved.keys() == trained.keys()
        assert all(torch.equal(saved[k], trained[k]) for k in trained), (
            f"snapshot {step} differs from the trained weights"
        )
        tokenizer = AutoTokenizer.from_pretrained(sft_run.run / "snapshots" / step_name(step))
        assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    # consecutive snapshots differ: they are not all the final weights
    first, last = sft_run.recorder.states[SCHEDULE[0]], sft_run.recorder.states[SCHEDULE[-1]]
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], last["model.layers.0.mlp.up_proj.weight"])


def test_sft_activations_equal_fresh_forwards_of_the_snapshots(sft_run):
    batches = sft_run.callbacks[0].probe.probe_batches()
    data = manifest(sft_run.run)
    assert sum(b.input_ids.shape[0] for b in batches) == N_DOCS
    for step in [0, *SCHEDULE]:
        model = tiny_model("qwen3") if step == 0 else load_snapshot(sft_run.run, step)  # step 0: the base model
        want = fresh_forward(model, batches, LAYERS)
        for layer in LAYERS:
            store, got = read_store(sft_run.run / "activations" / step_name(step) / f"layer{layer}")
            assert store.complete and store.layer == layer and store.d_model == 64 and store.dtype == torch.float32
            assert store.manifest.model["step"] == step
            assert store.manifest.source["probe_fingerprint"] == data["probe_fingerprint"]
            assert store.n_tokens == want["token_ids"].numel() > 0
            assert torch.equal(got["token_ids"].long(), want["token_ids"])
            assert torch.equal(got["doc_ids"].long(), want["doc_ids"])
            assert torch.equal(got["positions"].long(), want["positions"])
            torch.testing.assert_close(got["acts"], want["acts"][layer], rtol=1e-6, atol=1e-6)


def test_sft_probe_tokens_are_training_rows(sft_run):
    """Rebuild each probe document from the training data and the store's tokens alone: every
    stored token is the training row's token at that position, and a forward of the unpadded
    document through the reloaded snapshot reproduces the stored activations."""
    train = sft_run.trainer.train_dataset
    rows = sorted(random.Random(0).sample(range(len(train)), N_DOCS))
    documents = [train[row]["input_ids"][:SEQ_LEN] for row in rows]
    model = load_snapshot(sft_run.run, SCHEDULE[-1])
    _, got = read_store(sft_run.run / "activations" / step_name(SCHEDULE[-1]) / "layer2")
    assert sorted(set(got["doc_ids"].tolist())) == list(range(N_DOCS))
    for doc, ids in enumerate(documents):
        mine = got["doc_ids"] == doc
        positions = got["positions"][mine].long()
        expected = [t for t in range(1, len(ids)) if ids[t] != BOS]
        assert positions.tolist() == expected
        assert got["token_ids"][mine].tolist() == [ids[t] for t in expected]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(got["acts"][mine], hidden[positions], rtol=1e-4, atol=1e-5)


def test_sft_training_is_identical_with_and_without_callbacks(sft_run, sft_reference):
    assert len(losses(sft_run.trainer)) == 10
    assert losses(sft_run.trainer) == losses(sft_reference)
    assert_same_params(params(sft_run.trainer.model), params(sft_reference.model))
    # the probe metrics do not disturb the Trainer's own log entries
    probe_free = [
        {k: v for k, v in e.items() if k != "train_runtime" and "per_second" not in k}
        for e in sft_run.trainer.state.log_history
        if not any(k.startswith("probe/") for k in e)
    ]
    reference = [
        {k: v for k, v in e.items() if k != "train_runtime" and "per_second" not in k}
        for e in sft_reference.state.log_history
    ]
    assert probe_free == reference


def test_sft_training_is_identical_with_gradient_checkpointing(tmp_path):
    runs = {}
    for probe in (False, True):
        trainer, _ = sft_trainer(
            tmp_path / str(probe), probe=probe_args() if probe else None, max_steps=6, gradient_checkpointing=True
        )
        trainer.train()
        assert trainer.model.is_gradient_checkpointing
        runs[probe] = trainer
    assert len(losses(runs[True])) == 6 and losses(runs[True]) == losses(runs[False])
    assert_same_params(params(runs[True].model), params(runs[False].model))
    assert [e["step"] for e in manifest(tmp_path / "True" / "probe")["snapshots"]] == [
        1,
        2,
        4,
        5,
        6,
    ]  # round(6 * i / 5)


def test_capture_keeps_train_mode_and_rng_states(sft_run):
    checks = sft_run.after.checks
    assert [c[0] for c in checks] == list(range(0, 11))  # on_train_begin (step 0 capture) and every step end
    assert all(c[2] for c in checks), (
        f"RNG state changed around the probe callbacks at steps {[c[0] for c in checks if not c[2]]}"
    )
    assert all(c[3] for c in checks), (
        f"train mode changed around the probe callbacks at steps {[c[0] for c in checks if not c[3]]}"
    )
    assert any(c[1] for c in checks if c[0] in SCHEDULE)  # the model was training when captured


def test_drift_is_logged_and_grows(sft_run):
    history = sft_run.trainer.state.log_history
    for layer in LAYERS:
        key = f"probe/drift/layer{layer}"
        entries = [e for e in history if key in e]
        assert [e["step"] for e in entries] == SCHEDULE
        values = [e[key] for e in entries]
        assert all(v > 0 for v in values)
        assert values[-1] > values[0], values
        # the logged value is the mean relative change of the stored activations
        base = read_store(sft_run.run / "activations" / step_name(0) / f"layer{layer}")[1]["acts"]
        last = read_store(sft_run.run / "activations" / step_name(SCHEDULE[-1]) / f"layer{layer}")[1]["acts"]
        expected = ((last - base).norm(dim=-1) / base.norm(dim=-1)).mean().item()
        assert values[-1] == pytest.approx(expected, rel=1e-5)
        assert relative_drift(
            sft_run.run / "activations" / step_name(0) / f"layer{layer}",
            sft_run.run / "activations" / step_name(SCHEDULE[-1]) / f"layer{layer}",
        ) == pytest.approx(expected, rel=1e-5)
    assert all(e["step"] in SCHEDULE for e in history if "probe/snapshot_seconds" in e)


# ---------------------------------------------------------------------------------------------
# GRPO, plain Trainer, PEFT, tied embeddings
# ---------------------------------------------------------------------------------------------


def _length_reward(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def test_grpo_trainer(tmp_path):
    prompts = arithmetic_dataset(16, seed=1).select_columns(["prompt"])
    runs = {}
    for probe in (False, True):
        config = GRPOConfig(
            output_dir=str(tmp_path / str(probe)),
            max_steps=4,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=8,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=tiny_model("qwen3"),
            args=config,
            reward_funcs=_length_reward,
            train_dataset=prompts,
            processing_class=tiny_tokenizer(),
        )
        _, callbacks = _with_callbacks(
            trainer,
            ProbeArguments(probe_n_docs=4, probe_seq_len=32, probe_layers=[1], probe_snapshot_steps=2)
            if probe
            else None,
        )
        trainer.train()
        runs[probe] = (trainer, callbacks)
    (plain, _), (probed, callbacks) = runs[False], runs[True]
    rewards = lambda t: [e["reward"] for e in t.state.log_history if "reward" in e]  # noqa: E731
    assert len(rewards(probed)) == 4 and rewards(probed) == rewards(plain)
    assert losses(probed) == losses(plain)
    assert_same_params(params(probed.model), params(plain.model))
    assert not torch.equal(
        params(probed.model)["model.embed_tokens.weight"], tiny_model("qwen3").model.embed_tokens.weight
    )

    run = tmp_path / "True" / "probe"
    data = manifest(run)
    assert data["paradigm"] == "grpo" and data["trainer"] == "GRPOTrainer"
    assert [e["step"] for e in data["snapshots"]] == [2, 4] and [e["step"] for e in data["activations"]] == [0, 2, 4]
    batches = callbacks[0].probe.probe_batches()
    for step in (0, 2, 4):
        model = tiny_model("qwen3") if step == 0 else load_snapshot(run, step)
        store, got = read_store(run / "activations" / step_name(step) / "layer1")
        assert store.dtype == torch.bfloat16 and store.n_tokens > 0
        # GRPOConfig defaults to bf16=True: captures run under the Trainer's bf16 autocast
        want = fresh_forward(model, batches, [1], autocast=True)
        assert torch.equal(got["token_ids"].long(), want["token_ids"])
        torch.testing.assert_close(
            got["acts"].float(), want["acts"][1].to(torch.bfloat16).float(), rtol=0.02, atol=0.02
        )


def _tokenized(tokenizer, n=16):
    data = arithmetic_dataset(n, seed=2)
    return data.map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=48), remove_columns=data.column_names
    )


def _plain_trainer(out, *, processing_class, collator_tokenizer=None, probe=None, max_steps=4):
    tokenizer = collator_tokenizer or processing_class
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=tiny_model("qwen3"),
        args=args,
        train_dataset=_tokenized(tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=processing_class,
    )
    return _with_callbacks(trainer, probe)


def test_plain_transformers_trainer(tmp_path):
    trainer, callbacks = _plain_trainer(
        tmp_path / "on",
        processing_class=tiny_tokenizer(),
        probe=ProbeArguments(probe_n_docs=6, probe_seq_len=32, probe_layers=[2], probe_snapshot_at=[2, 4]),
    )
    trainer.train()
    reference, _ = _plain_trainer(tmp_path / "off", processing_class=tiny_tokenizer())
    reference.train()
    assert losses(trainer) == losses(reference) and len(losses(trainer)) == 4
    assert_same_params(params(trainer.model), params(reference.model))

    run = tmp_path / "on" / "probe"
    data = manifest(run)
    assert data["trainer"] == "Trainer" and data["schedule"] == [2, 4]
    assert [e["step"] for e in data["activations"]] == [0, 2, 4]
    batches = callbacks[0].probe.probe_batches()
    for step in (0, 2, 4):
        model = tiny_model("qwen3") if step == 0 else load_snapshot(run, step)
        store, got = read_store(run / "activations" / step_name(step) / "layer2")
        assert store.dtype == torch.bfloat16  # default storage dtype
        want = fresh_forward(model, batches, [2])
        assert torch.equal(got["positions"].long(), want["positions"])
        # float32 forward, rounded once to bf16 for storage: the same bits
        assert torch.equal(got["acts"], want["acts"][2].to(torch.bfloat16))
    assert_same_params(params(load_snapshot(run, 4)), params(trainer.model))


def test_plain_trainer_without_processing_class(tmp_path):
    """A pre-tokenized dataset needs no tokenizer: pad/BOS ids can come from the model config and
    the snapshot is the model alone. (Today: AttributeError 'NoneType' object has no attribute
    'pad_token_id' from ProbeRun.probe_batches.)"""
    trainer, _ = _plain_trainer(
        tmp_path,
        processing_class=None,
        collator_tokenizer=tiny_tokenizer(),
        probe=ProbeArguments(probe_n_docs=4, probe_seq_len=32, probe_layers=[1], probe_snapshot_at=[2]),
        max_steps=2,
    )
    trainer.train()
    run = tmp_path / "probe"
    assert [e["step"] for e in manifest(run)["activations"]] == [0, 2]
    assert_same_params(params(load_snapshot(run, 2)), params(trainer.model))
    assert read_store(run / "activations" / step_name(2) / "layer1")[0].n_tokens > 0


def test_peft_lora_adapter_and_merged_snapshots(tmp_path):
    from peft import LoraConfig, PeftModel

    probe_ids = torch.tensor([tiny_tokenizer()("What is 3 + 4 * 2? First multiply: 4 * 2 = 8.")["input_ids"]])
    runs = {}
    for mode in (None, "adapter", "merged"):
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1, task_type="CAUSAL_LM"
        )
        recorder = RecordLogits([2, 4], probe_ids)
        probe = (
            ProbeArguments(
                probe_n_docs=4, probe_seq_len=32, probe_layers=[1], probe_snapshot_steps=2, probe_peft_snapshot=mode
            )
            if mode
            else None
        )
        trainer, _ = sft_trainer(
            tmp_path / str(mode), probe=probe, before=[recorder], peft_config=lora, max_steps=4, learning_rate=1e-2
        )
        trainer.train()
        runs[mode] = (trainer, recorder)
    reference = runs[None][0]
    for mode in ("adapter", "merged"):
        trainer, recorder = runs[mode]
        assert losses(trainer) == losses(reference)  # training unaffected
        assert_same_params(params(trainer.model), params(reference.model))
        assert [e["peft"] for e in manifest(tmp_path / mode / "probe")["snapshots"]] == [mode, mode]
        # the LoRA update is not zero, so snapshots of the adapter and of the base differ
        assert not torch.allclose(recorder.logits[4], tiny_model("qwen3")(input_ids=probe_ids).logits, atol=1e-3)

    adapter_run = tmp_path / "adapter" / "probe"
    for step in (2, 4):
        snapshot = adapter_run / "snapshots" / step_name(step)
        assert (snapshot / "adapter_config.json").exists() and (snapshot / "adapter_model.safetensors").exists()
        assert not (snapshot / "model.safetensors").exists()
        peft_model = PeftModel.from_pretrained(tiny_model("qwen3"), snapshot).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=probe_ids).logits, runs["adapter"][1].logits[step])

    merged_run = tmp_path / "merged" / "probe"
    for step in (2, 4):
        merged = load_snapshot(merged_run, step)
        assert not any("lora" in name for name in merged.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(
                merged(input_ids=probe_ids).logits, runs["merged"][1].logits[step], rtol=1e-5, atol=1e-5
            )


def test_tied_embeddings_snapshot_reloads_with_equal_logits(tmp_path):
    model = tiny_model("qwen3", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer, _ = sft_trainer(
        tmp_path, model=model, probe=probe_args(probe_snapshot_at=[2]), max_steps=2, learning_rate=1e-2
    )
    trainer.train()
    snapshot = load_snapshot(tmp_path / "probe", 2)
    assert snapshot.config.tie_word_embeddings
    assert snapshot.lm_head.weight.data_ptr() == snapshot.model.embed_tokens.weight.data_ptr()
    trained = trainer.model.eval()
    assert not torch.equal(
        trained.model.embed_tokens.weight, tiny_model("qwen3", tie_word_embeddings=True).model.embed_tokens.weight
    )
    ids = torch.tensor([tiny_tokenizer()("Compute 12 * 3 + 4. The answer is 40.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(snapshot(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# schedule and arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "max_steps", "expected"),
    [
        ({}, 10, [2, 4, 6, 8, 10]),
        ({}, 100, [20, 40, 60, 80, 100]),
        ({}, 3, [1, 2, 3]),
        ({"probe_snapshot_fraction": 0.5}, 9, [4, 9]),
        ({"probe_snapshot_fraction": 1.0}, 7, [7]),
        ({"probe_snapshot_steps": 3}, 10, [3, 6, 9]),
        ({"probe_snapshot_steps": 20}, 10, None),
        ({"probe_snapshot_at": [7, 3, 3, 100]}, 10, [3, 7]),
        ({"probe_snapshot_at": [5], "probe_snapshot_steps": 2}, 10, [5]),  # explicit steps win
        ({"probe_snapshot_at": [100]}, 5, None),
    ],
)
def test_snapshot_schedule(kwargs, max_steps, expected):
    args = ProbeArguments(**kwargs)
    if expected is None:
        with pytest.raises(ProbeError, match=f"yields no snapshot in a run of {max_steps} steps"):
            snapshot_schedule(args, max_steps)
    else:
        assert snapshot_schedule(args, max_steps) == expected


def test_snapshot_schedule_needs_steps():
    with pytest.raises(ProbeError, match="nothing to snapshot"):
        snapshot_schedule(ProbeArguments(), 0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"probe_snapshot_steps": 3}, [3, 6]),
        ({"probe_snapshot_at": [1, 5, 99]}, [1, 5]),
    ],
)
def test_every_n_and_explicit_steps_in_training(tmp_path, kwargs, expected):
    trainer, _ = sft_trainer(tmp_path, probe=probe_args(probe_layers=[1], **kwargs), max_steps=7)
    trainer.train()
    data = manifest(tmp_path / "probe")
    assert data["schedule"] == expected
    assert [e["step"] for e in data["snapshots"]] == expected
    assert [e["step"] for e in data["activations"]] == [0, *expected]
    assert sorted(p.name for p in (tmp_path / "probe" / "snapshots").iterdir()) == [step_name(s) for s in expected]
    assert [e["step"] for e in trainer.state.log_history if "probe/drift/layer1" in e] == expected


def test_schedule_of_an_epoch_based_run(tmp_path):
    """max_steps=-1: the schedule comes from the Trainer's own step count (48 rows / 4 = 12 steps)."""
    trainer, _ = sft_trainer(tmp_path, probe=probe_args(probe_layers=[1]), max_steps=-1, num_train_epochs=1)
    trainer.train()
    assert trainer.state.global_step == 12
    data = manifest(tmp_path / "probe")
    assert data["schedule"] == [2, 5, 7, 10, 12]
    assert [e["step"] for e in data["snapshots"]] == [2, 5, 7, 10, 12]


def test_probe_switched_off(tmp_path):
    trainer, callbacks = sft_trainer(tmp_path / "off", probe=probe_args(probe=False), max_steps=2)
    trainer.train()
    assert callbacks == [] and not (tmp_path / "off" / "probe").exists()


def test_activations_without_snapshots(tmp_path):
    """No snapshot is written, and no store claims to come from a model file it does not: the
    step-2 store must not name the base model as its path."""
    trainer, _ = sft_trainer(
        tmp_path / "acts",
        probe=probe_args(probe_layers=[1], probe_save_snapshots=False, probe_snapshot_at=[2]),
        max_steps=2,
    )
    trainer.train()
    run = tmp_path / "acts" / "probe"
    assert manifest(run)["snapshots"] == [] and not (run / "snapshots").exists()
    assert [e["step"] for e in manifest(run)["activations"]] == [0, 2]
    store = read_store(run / "activations" / step_name(2) / "layer1")[0]
    assert store.manifest.model["step"] == 2
    assert store.manifest.model.get("path") != manifest(run)["base_model"], (
        "the step-2 store names the base model as its model"
    )


def test_snapshots_without_activations(tmp_path):
    trainer, _ = sft_trainer(
        tmp_path / "snaps", probe=probe_args(probe_stream_activations=False, probe_snapshot_at=[2]), max_steps=2
    )
    trainer.train()
    run = tmp_path / "snaps" / "probe"
    assert [e["step"] for e in manifest(run)["snapshots"]] == [2] and manifest(run)["activations"] == []
    assert not (run / "activations").exists()
    assert not any(k.startswith("probe/drift") for e in trainer.state.log_history for k in e)


def test_schedule_without_snapshot_raises_before_training(tmp_path):
    trainer, _ = sft_trainer(tmp_path, probe=probe_args(probe_snapshot_at=[100]), max_steps=5)
    with pytest.raises(ProbeError, match=r"at \[100\]\) yields no snapshot in a run of 5 steps"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / "probe").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe_snapshot_fraction": 0.0}, "probe_snapshot_fraction"),
        ({"probe_snapshot_fraction": 1.5}, "probe_snapshot_fraction"),
        ({"probe_snapshot_fraction": -0.2}, "probe_snapshot_fraction"),
        ({"probe_snapshot_steps": 0}, "probe_snapshot_steps"),
        ({"probe_snapshot_at": [0, 5]}, "probe_snapshot_at"),
        ({"probe_peft_snapshot": "full"}, "probe_peft_snapshot"),
        ({"probe_n_docs": 0}, "probe_n_docs"),
        ({"probe_seq_len": 0}, "probe_seq_len"),
        ({"probe_batch_size": -1}, "probe_batch_size"),
        # checked today only at the first capture, after probe.json was written: the corrected
        # rerun into the same directory is then refused as "already holds this run"
        ({"probe_dtype": "int8"}, "int8"),
    ],
)
def test_bad_probe_arguments(kwargs, message):
    with pytest.raises(ProbeError, match=message):
        ProbeArguments(**kwargs)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_empty_probe_set(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    trainer, _ = sft_trainer(tmp_path / "out", probe=probe_args(probe_dataset=str(empty)), max_steps=2)
    with pytest.raises(ProbeError, match="empty"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_probe_seq_len_longer_than_the_model_context(tmp_path):
    trainer, _ = sft_trainer(tmp_path, probe=probe_args(probe_seq_len=4096), max_steps=2)
    with pytest.raises(ProbeError, match=r"probe_seq_len 4096 is longer than the model context \(2048 positions\)"):
        trainer.train()


@pytest.mark.parametrize("layer", [4, -1])
def test_layer_out_of_range(tmp_path, layer):
    trainer, _ = sft_trainer(tmp_path, probe=probe_args(probe_layers=[1, layer]), max_steps=2)
    with pytest.raises(ProbeError, match=f"layer {layer} is out of range"):
        trainer.train()
    assert not (tmp_path / "probe").exists()


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    probe_file = tmp_path / "probe.txt"
    probe_file.write_text(
        "What is 2 + 3?\nCompute 12 * 3 + 4. First multiply: 12 * 3 = 36. Then add: 36 + 4 = 40.\nHello\n"
    )
    probe = ProbeArguments(
        probe_dataset=str(probe_file), probe_seq_len=64, probe_layers=[1], probe_batch_size=3, probe_snapshot_at=[2]
    )
    trainer, callbacks = _plain_trainer(
        tmp_path, processing_class=tokenizer, collator_tokenizer=tiny_tokenizer(), probe=probe, max_steps=2
    )
    trainer.train()
    (batch,) = callbacks[0].probe.probe_batches()
    padding = batch.attention_mask == 0
    assert padding.sum() > 10  # documents of different lengths
    assert (batch.input_ids[padding] == EOS).all()
    run = tmp_path / "probe"
    _, got = read_store(run / "activations" / step_name(2) / "layer1")
    lengths = batch.attention_mask.sum(1)
    assert (got["positions"] < lengths[got["doc_ids"]]).all()  # no padding token was stored
    assert got["token_ids"].numel() == int(lengths.sum()) - 3  # all but the BOS of each document
    assert AutoTokenizer.from_pretrained(run / "snapshots" / step_name(2)).pad_token is None
    want = fresh_forward(load_snapshot(run, 2), [batch], [1])
    assert torch.equal(got["acts"], want["acts"][1].to(torch.bfloat16))


def test_run_dir_of_another_run_is_refused(tmp_path):
    run_dir = tmp_path / "shared-run"
    first, _ = sft_trainer(tmp_path / "a", probe=probe_args(probe_run_dir=str(run_dir), probe_layers=[1]), max_steps=2)
    first.train()
    before = (run_dir / "probe.json").read_text()
    other, _ = sft_trainer(tmp_path / "b", probe=probe_args(probe_run_dir=str(run_dir), probe_layers=[2]), max_steps=2)
    with pytest.raises(ProbeError, match="holds another run") as error:
        other.train()
    assert str(run_dir) in str(error.value) and "layers" in str(error.value)
    assert other.state.global_step == 0
    assert (run_dir / "probe.json").read_text() == before  # untouched
    # the same run again, not resuming a checkpoint
    again, _ = sft_trainer(tmp_path / "c", probe=probe_args(probe_run_dir=str(run_dir), probe_layers=[1]), max_steps=2)
    with pytest.raises(ProbeError, match="already holds this run") as error:
        again.train()
    assert str(run_dir) in str(error.value)
    assert (run_dir / "probe.json").read_text() == before


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    trainer, _ = sft_trainer(tmp_path / "out", probe=probe_args(probe_run_dir=str(blocker / "probe")), max_steps=2)
    with pytest.raises(ProbeError, match="not writable"):
        trainer.train()


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_completes_the_run(tmp_path, sft_run):
    out = tmp_path / "out"
    run = out / "probe"
    interrupted, _ = sft_trainer(out, probe=probe_args(), after=[StopAt(6)], save_strategy="steps", save_steps=4)
    interrupted.train()
    assert interrupted.state.global_step == 6
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists()
    assert [e["step"] for e in manifest(run)["snapshots"]] == [2, 4, 6]
    assert [e["step"] for e in manifest(run)["activations"]] == [0, 2, 4, 6]
    base_shard = run / "activations" / step_name(0) / "layer1" / "shard-00000.safetensors"
    base_stat = base_shard.stat()
    base_entry = manifest(run)["activations"][0]

    resumed, _ = sft_trainer(out, probe=probe_args(), save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10
    data = manifest(run)
    assert [e["step"] for e in data["snapshots"]] == SCHEDULE
    assert [e["step"] for e in data["activations"]] == [0, *SCHEDULE]
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [step_name(s) for s in SCHEDULE]
    assert sorted(p.name for p in (run / "activations").iterdir()) == [step_name(s) for s in [0, *SCHEDULE]]
    # the base model was not captured again
    assert data["activations"][0] == base_entry
    assert (base_shard.stat().st_ino, base_shard.stat().st_mtime_ns) == (base_stat.st_ino, base_stat.st_mtime_ns)
    # drift: what the checkpoint's log history holds (2, 4) and what the resumed run logged (8, 10)
    drift_steps = [e["step"] for e in resumed.state.log_history if "probe/drift/layer1" in e]
    assert drift_steps == sorted(set(drift_steps)) and {2, 4, 8, 10} <= set(drift_steps) <= set(SCHEDULE)
    # the interrupted + resumed run is the uninterrupted one (same config as sft_run)
    for step in SCHEDULE:
        snapshot = load_snapshot(run, step).state_dict()
        assert all(torch.equal(snapshot[k], v) for k, v in sft_run.recorder.states[step].items()), step
    for step in (0, 10):
        for layer in LAYERS:
            got = read_store(run / "activations" / step_name(step) / f"layer{layer}")[1]
            want = read_store(sft_run.run / "activations" / step_name(step) / f"layer{layer}")[1]
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_redoes_the_steps_after_the_checkpoint(tmp_path):
    """Steps after the checkpoint are trained again by the resumed run; when that replay is not
    bit-identical (GPU non-determinism, changed arguments: here max_grad_norm), the snapshot and
    activations at step 6 must be those of the trajectory that goes on to steps 8 and 10, not the
    leftovers of the interrupted run."""
    out = tmp_path / "out"
    run = out / "probe"
    interrupted, _ = sft_trainer(out, probe=probe_args(), after=[StopAt(6)], save_strategy="steps", save_steps=4)
    interrupted.train()
    recorder = RecordWeights([6, 8])
    resumed, callbacks = sft_trainer(
        out, probe=probe_args(), before=[recorder], save_strategy="steps", save_steps=4, max_grad_norm=0.3
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert [e["step"] for e in manifest(run)["snapshots"]] == SCHEDULE
    for step in (6, 8):
        snapshot = load_snapshot(run, step).state_dict()
        assert all(torch.equal(snapshot[k], v) for k, v in recorder.states[step].items()), (
            f"snapshot {step} is not the resumed run's step {step}"
        )
    want = fresh_forward(load_snapshot(run, 6), callbacks[0].probe.probe_batches(), [1])
    _, got = read_store(run / "activations" / step_name(6) / "layer1")
    torch.testing.assert_close(got["acts"], want["acts"][1], rtol=1e-6, atol=1e-6)
