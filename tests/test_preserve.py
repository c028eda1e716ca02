"""Feature-preserving fine-tuning (docs/methods.md sec. 12, docs/preserve.md): the term, its gradient, the Trainer mixin,
recipes/sft_preserve.py and its configs.

References are computed independently of ``posttrain_probe.interventions.preserve``: a_theta and a_base from full
forwards with ``output_hidden_states=True`` (``hidden_states[L]``), f_S from the whole crosscoder's ``encode_source``
with the columns of S picked afterwards, the gradient from central finite differences in float64.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain_probe.callbacks.preserve import FeaturePreservingMixin, PreserveArguments, build_preserver
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.preserve import FeaturePreserver, preservation_loss, preserved_tokens
from posttrain_probe.layers import decoder_blocks
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
TINY = RECIPES / "configs" / "tiny" / "sft_preserve.yaml"
LAYER = 2
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _recipe():
    """Import recipes/sft_preserve.py as a module (its sibling `common` importable, as when run as a script)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location("recipe_sft_preserve", RECIPES / "sft_preserve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def batch_of(texts=("What is 3 + 4 * 2? First multiply.", "Compute 12 * 3 - 5.", "The quick brown fox")) -> dict:
    enc = tiny_tokenizer()(list(texts), return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def site_crosscoder(model, batch, *, n_features=48, seed=0, layer=LAYER, names=("base", "sft"), fingerprint=True):
    """A random two-model crosscoder for ``model``'s residual stream at ``layer``, float32-exact weights (so the
    preserver's float32 copy is exact), scales from the model's activations, b_enc centred so that about half of the
    codes are active; slot ``base`` records ``model``'s fingerprint."""
    d = model.config.hidden_size
    config = CrosscoderConfig(
        model_names=list(names),
        d_model=d,
        n_features=n_features,
        layer=layer,
        model_fingerprints=[model_fingerprint(model), None] if fingerprint else None,
    )
    cc = Crosscoder(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(len(names), d, n_features, generator=gen) / d**0.5)
        cc.W_dec.copy_(torch.randn(n_features, len(names), d, generator=gen) * 0.3)
        h = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True).hidden_states
        h = h[layer][batch["attention_mask"].bool()].float()
        cc.set_scales_from([h[:, None, :].expand(-1, len(names), -1)])
        pre = (h * cc.scales[0]) @ cc.W_enc[0]
        cc.b_enc.copy_(-pre.median(dim=0).values)
    return cc


def reference_term(cc, features, model, base, batch, layer=LAYER) -> torch.Tensor:
    """mean over real tokens but the first of each row of ||f_S(a_theta) - f_S(a_base)||^2, from full forwards."""
    keep = batch["attention_mask"].bool().clone()
    keep[:, 0] = False
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    a = model(**inputs, output_hidden_states=True).hidden_states[layer][keep]
    with torch.no_grad():
        a0 = base(**inputs, output_hidden_states=True).hidden_states[layer][keep]
    cc = cc.to(a.dtype)
    f, f0 = cc.encode_source(a, "base")[:, features], cc.encode_source(a0, "base")[:, features]
    return (f - f0).pow(2).sum(-1).mean()


def plain_trainer_class():
    from transformers import Trainer

    class PreservingTrainer(FeaturePreservingMixin, Trainer):
        pass

    return PreservingTrainer


def make_trainer(model, base, preserver, tmp_path, cls=None):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    cls = cls or plain_trainer_class()
    return cls(model=model, args=args, preserver=preserver, base_model=base, processing_class=tiny_tokenizer())


def term_of(trainer, model, batch) -> torch.Tensor:
    """The preservation part of the mixin's loss (its loss minus the plain Trainer loss of the same model)."""
    from transformers import Trainer

    return trainer.compute_loss(model, dict(batch)) - Trainer.compute_loss(trainer, model, dict(batch))


# ---------------------------------------------------------------------------------------------
# the term and its gradient
# ---------------------------------------------------------------------------------------------


def test_preservation_loss_formula_and_token_mask():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    base = torch.tensor([[0.0, 0.0, 2.0], [0.5, 1.5, 1.0]])
    assert preservation_loss(codes, base).item() == pytest.approx((1.0 + (1.0 + 1.0)) / 2)
    assert preservation_loss(codes[:0], base[:0]).item() == 0.0
    ids = torch.tensor([[5, 6, 7, 0], [1, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    want = torch.tensor([[False, True, True, False], [False, True, True, True]])
    assert torch.equal(preserved_tokens(ids, mask), want)
    assert torch.equal(preserved_tokens(ids, mask, bos_token_id=8), want & (ids != 8))
    positions = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])  # padding-free: two sequences packed in row 0
    assert torch.equal(preserved_tokens(ids, None, positions), positions > 0)


def test_gradient_matches_finite_differences(tmp_path):
    """float64 tiny model moved away from its base: the mixin's term equals the reference, its gradient (from the
    training forward's hook + the base's truncated forward) matches central differences along random directions and
    per coordinate, and no block at or after the site gets any gradient from it.

    GPT-2: its LayerNorm and attention compute in the input dtype (Qwen3's RMSNorm and rotary embedding work in
    float32 even in a float64 model, which leaves finite differences float32-noisy)."""
    batch = batch_of()
    base = tiny_model("gpt2", seed=0, dtype=torch.float64)
    model = tiny_model("gpt2", seed=0, dtype=torch.float64).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # (the embedding stays: the fingerprint check would call a moved one another model)
        for name, param in model.named_parameters():
            if "wte" not in name:
                param.add_(0.03 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    cc = site_crosscoder(base, batch).double()
    features = list(range(0, 48, 3))
    preserver = FeaturePreserver(cc, features, coefficient=1.0)
    trainer = make_trainer(model, base, preserver, tmp_path)

    term = term_of(trainer, model, batch)
    reference = reference_term(cc, features, model, base, batch)
    assert reference.item() > 1e-2
    torch.testing.assert_close(term, reference, rtol=1e-12, atol=1e-12)
    total, n_tokens = trainer._preserve_sums["train"].tolist()  # for the log: term x tokens, tokens
    assert n_tokens > 0 and total / n_tokens == pytest.approx(reference.item(), rel=1e-6)  # in float32

    model.zero_grad(set_to_none=True)
    term.backward()
    params = dict(model.named_parameters())
    grads = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    downstream = [p for block in decoder_blocks(model)[LAYER:] for p in block.parameters()]
    downstream += list(model.transformer.ln_f.parameters())  # blocks >= L and the final norm do not shape a(x)
    assert all(p.grad is None or not p.grad.any() for p in downstream)
    upstream = [name for name in grads if grads[name].any()]
    assert any(".h.0." in name for name in upstream) and any(".h.1." in name for name in upstream)

    def reference_at(shift: dict[str, torch.Tensor], eps: float) -> float:
        with torch.no_grad():
            for name, step in shift.items():
                params[name].add_(eps * step)
            value = reference_term(cc, features, model, base, batch).item()
            for name, step in shift.items():
                params[name].sub_(eps * step)
        return value

    eps = 1e-6
    for seed in range(3):  # directional derivatives along random unit directions of every upstream parameter
        g = torch.Generator().manual_seed(10 + seed)
        direction = {name: torch.randn(grads[name].shape, generator=g, dtype=torch.float64) for name in upstream}
        norm = sum(step.pow(2).sum() for step in direction.values()).sqrt()
        direction = {name: step / norm for name, step in direction.items()}
        numeric = (reference_at(direction, eps) - reference_at(direction, -eps)) / (2 * eps)
        analytic = sum((grads[name] * direction[name]).sum() for name in upstream).item()
        assert analytic == pytest.approx(numeric, rel=1e-6), (seed, analytic, numeric)
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        flat = grads[name].flatten()
        for index in flat.abs().argsort(descending=True)[:2].tolist():
            unit = {name: torch.zeros_like(grads[name])}
            unit[name].view(-1)[index] = 1.0
            numeric = (reference_at(unit, eps) - reference_at(unit, -eps)) / (2 * eps)
            assert flat[index].item() == pytest.approx(numeric, rel=1e-6), (name, index, numeric)


def test_term_is_zero_at_step_zero_and_reads_the_training_forward(tmp_path):
    """theta == base: the loss is the SFT loss and the gradient the SFT gradient. The trained model runs one forward
    (a_theta comes from the SFT forward), the base model only its blocks before the site."""
    from trl import SFTConfig, SFTTrainer

    from posttrain_probe.recipes import common

    dataset = common.sft_dataset(common.MathScriptArguments(dataset_name="synthetic:arithmetic", max_samples=8))

    class SFTPreserveTrainer(FeaturePreservingMixin, SFTTrainer):  # as recipes/sft_preserve.py builds it
        pass

    model, base = tiny_model("qwen3"), tiny_model("qwen3")
    batch = batch_of()
    preserver = FeaturePreserver(site_crosscoder(base, batch), range(0, 48, 2), coefficient=3.0)
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        max_length=96, gradient_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTPreserveTrainer(
        model=model, base_model=base, preserver=preserver, args=args, train_dataset=dataset,
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    assert not any(p.requires_grad for p in trainer.base_model.parameters())
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()

    calls = {"model": [0] * 4, "base": [0] * 4}
    handles = [
        block.register_forward_pre_hook(lambda *_, who=who, i=i: calls[who].__setitem__(i, calls[who][i] + 1))
        for who, m in (("model", model), ("base", base))
        for i, block in enumerate(decoder_blocks(m))
    ]
    try:
        loss = trainer.compute_loss(model, dict(inputs))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"model": [1, 1, 1, 1], "base": [1, 1, 0, 0]}
    at_zero = trainer._preserve_sums["train"].tolist()  # for the log: term x tokens (0 at step 0), tokens
    assert at_zero[0] == 0.0 and at_zero[1] > 0
    model.zero_grad(set_to_none=True)
    loss.backward()
    with_term = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    plain = SFTTrainer.compute_loss(trainer, model, dict(inputs))
    plain.backward()
    assert torch.equal(loss, plain)
    for name, param in model.named_parameters():
        torch.testing.assert_close(with_term[name], param.grad, rtol=0, atol=1e-12, msg=name)

    # once the model moved, the term is positive and weighted by lambda (one micro-batch: share 1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    term = trainer.compute_loss(model, dict(inputs)) - SFTTrainer.compute_loss(trainer, model, dict(inputs))
    total, n_tokens = (trainer._preserve_sums["train"] - torch.tensor(at_zero, dtype=torch.float64)).tolist()
    moved = total / n_tokens  # this micro-batch's term
    assert moved > 1e-3 and term.item() == pytest.approx(3.0 * moved, rel=1e-5)
    trainer.log({"loss": 1.0})  # the per-token mean over the micro-batches since the last log, then cleared
    assert trainer.state.log_history[-1]["preserve"] == pytest.approx(moved / 2)  # the same tokens at 0, then moved
    assert trainer._preserve_sums["train"] is None
    trainer._preserve_sums["train"] = torch.zeros(2, dtype=torch.float64)  # micro-batches without a kept token
    trainer.log({"loss": 1.0})
    assert "preserve" not in trainer.state.log_history[-1]  # no value rather than a 0 that reads as preserved


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path):
    """The site hook sits inside a checkpointed block call: reentrant and non-reentrant checkpointing give the
    term the same gradient as a plain forward."""
    batch = batch_of()
    base = tiny_model("qwen3", seed=0)
    model = tiny_model("qwen3", seed=0).train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for param in model.parameters():
            param.add_(0.03 * torch.randn(param.shape, generator=gen))
    preserver = FeaturePreserver(site_crosscoder(base, batch), range(0, 48, 2))
    trainer = make_trainer(model, base, preserver, tmp_path)

    def grads():
        model.zero_grad(set_to_none=True)
        term_of(trainer, model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    assert want["model.layers.0.mlp.up_proj.weight"].abs().max() > 0
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = grads()
        model.gradient_checkpointing_disable()
        assert got.keys() == want.keys()
        for name in want:
            scale = want[name].abs().max()  # float32 rounding of another summation order only
            torch.testing.assert_close(
                got[name], want[name], rtol=1e-5, atol=1e-6 * scale, msg=f"reentrant={reentrant} {name}"
            )


def test_peft_base_is_the_model_without_its_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    batch = batch_of()
    base = tiny_model("qwen3")
    preserver = FeaturePreserver(site_crosscoder(base, batch), range(0, 48, 2))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model("qwen3"), lora).train()
    trainer = make_trainer(model, None, preserver, tmp_path)
    assert trainer.base_model is None
    assert term_of(trainer, model, batch).item() == 0.0  # LoRA starts as the identity
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".layers.0." in name:
                param.fill_(0.05)
    term = term_of(trainer, model, batch)
    assert term.item() > 1e-5
    term.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert grads and all("lora" in name for name in grads)


def test_gradient_accumulation_weights_micro_batches_like_the_sft_loss(tmp_path):
    """With ``num_items_in_batch`` the Trainer does not divide by the accumulation steps: each micro-batch's term is
    weighted by its share of the optimizer batch's loss tokens, so the shares of one step sum to 1."""
    base = tiny_model("qwen3")
    preserver = FeaturePreserver(site_crosscoder(base, batch_of()), [1, 2, 3])
    trainer = make_trainer(tiny_model("qwen3"), base, preserver, tmp_path)
    micro = [batch_of(["Compute 12 * 3 - 5.", "What is 2 + 2?"]), batch_of(["The quick brown fox jumps"])]
    total = sum((b["labels"][:, 1:] != -100).sum() for b in micro)
    shares = [trainer._batch_share(b, total) for b in micro]
    assert sum(shares).item() == pytest.approx(1.0) and shares[0] != shares[1]
    assert trainer._batch_share(micro[0], None) == 1.0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_crosscoder(tmp_path_factory):
    """The tiny base-vs-SFT crosscoder of recipes/configs/tiny/sft_preserve.yaml's comment (collect at layer 2, train;
    about 8 s): slot ``base`` is the tiny:qwen3 model (seed 0)."""
    from posttrain_probe.activations import CollectConfig, PairedActivations
    from posttrain_probe.activations.collect import collect
    from posttrain_probe.crosscoder import CrosscoderTrainingConfig, train_crosscoder
    from posttrain_probe.testing import save_tiny_pair

    root = tmp_path_factory.mktemp("preserve-cc")
    models = save_tiny_pair(root / "models", "qwen3", steps=20)
    collect(
        CollectConfig(
            model=[f"base={models['base']}", f"sft={models['tuned']}"],
            dataset="synthetic:arithmetic",
            out=root / "acts",
            layer=[LAYER],
            seq_len=64,
            max_tokens=20000,
        ),
        progress=False,
    )
    with pytest.warns(Warning):  # "far from converged": it is a tiny test dictionary
        train_crosscoder(
            PairedActivations.from_directory(root / "acts"), CrosscoderConfig(n_features=256),
            CrosscoderTrainingConfig(batch_size=256, lr=1e-3, n_tokens=100_000), root / "crosscoder", progress=False,
        )  # fmt: skip
    return {"base": models["base"], "crosscoder": root / "crosscoder"}


def test_bad_input_is_a_one_line_error_before_training(tiny_crosscoder, tmp_path, monkeypatch, capsys):
    """A crosscoder of another site, width or base model, a feature set of another crosscoder and lambda < 0: each a
    one-line ProbeError from the recipe before ``train()`` starts."""
    import trl

    from posttrain_probe.analysis.feature_sets import write_feature_set

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trl.SFTTrainer, "train", no_training)
    recipe = _recipe()
    good = str(tiny_crosscoder["crosscoder"])
    base = tiny_model("qwen3")

    def saved(name, **config):
        settings = dict(model_names=["base", "sft"], d_model=64, n_features=16, layer=LAYER)
        cc = Crosscoder(CrosscoderConfig(**{**settings, **config}))
        cc.save_pretrained(tmp_path / name)
        return cc, str(tmp_path / name)

    _, narrow = saved("narrow", d_model=32, model_fingerprints=[model_fingerprint(base), None])
    _, deep = saved("deep", layer=7)
    _, other_model = saved("other-model", model_fingerprints=[model_fingerprint(tiny_model("qwen3", seed=1)), None])
    other_cc, _ = saved("other-cc")
    foreign_set = write_feature_set(tmp_path / "foreign.json", [1, 2], crosscoder=other_cc)

    cases = {
        "another site": (["--preserve_crosscoder", good, "--preserve_layer", "1"], "trained at layer 2"),
        "a site the model lacks": (["--preserve_crosscoder", deep, "--preserve_features", "1,2"], "out of range"),
        "another width": (["--preserve_crosscoder", narrow, "--preserve_features", "1,2"], "d_model 32"),
        "another base model": (
            ["--preserve_crosscoder", other_model, "--preserve_features", "1,2"],
            r"weights differ.*; pass --preserve_allow_model_mismatch to override$",  # the recipe's own flag
        ),
        "a feature set of another crosscoder": (
            ["--preserve_crosscoder", good, "--preserve_features", str(foreign_set)],
            "was made for",
        ),
    }
    for what, (flags, message) in cases.items():
        with pytest.raises(ProbeError, match=message) as err:
            recipe.cli(["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--probe", "false", *flags])
        assert "\n" not in str(err.value), what
    assert not (tmp_path / "out" / "model.safetensors").exists()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # parse time: the recipe prints the one line and exits 2
        recipe.cli(["--config", str(TINY), "--preserve_crosscoder", good, "--preserve_coefficient", "-0.5"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: preserve_coefficient") and "\n" not in stderr, stderr
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ProbeError, match="lambda"):
            FeaturePreserver(other_cc, [1], coefficient=bad)
    with pytest.raises(ProbeError, match="empty"):
        FeaturePreserver(other_cc, [])
    with pytest.raises(ProbeError, match="out of range"):
        FeaturePreserver(other_cc, [16])


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def _history(run: Path) -> list[dict]:
    """The training-step entries of the log history the run's checkpoint-8 saved."""
    state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_recipe_preserved_features_move_less_than_in_plain_sft(tiny_crosscoder, tmp_path):
    """Through the recipe (in-process), the tiny config with and without preservation: on held-out probe text the
    preserved (base-only) features moved far less than in plain SFT (the leakage figures), while the SFT part of the
    loss still falls; the term is 0 at the first step."""
    from posttrain_probe.analysis.leakage import leakage
    from posttrain_probe.analysis.leakage_config import LeakageConfig
    from posttrain_probe.synthetic import arithmetic_dataset

    recipe = _recipe()
    held_out = tmp_path / "held_out.jsonl"  # the training rows are arithmetic_dataset(seed 0)
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in arithmetic_dataset(32, seed=99)["text"]))
    control = tmp_path / "control.yaml"
    control.write_text("".join(line for line in TINY.read_text().splitlines(True) if not line.startswith("preserve_")))
    flags = ["--probe", "false", "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", "steps"]
    flags += ["--save_steps", "8"]
    recipe.cli(["--config", str(TINY), "--output_dir", str(tmp_path / "preserve"), *flags,
                "--preserve_crosscoder", str(tiny_crosscoder["crosscoder"])])  # fmt: skip
    recipe.cli(["--config", str(control), "--output_dir", str(tmp_path / "control"), *flags])

    moved = {}
    for run in ("preserve", "control"):
        report = leakage(
            LeakageConfig(
                crosscoder=tiny_crosscoder["crosscoder"], base=str(tiny_crosscoder["base"]), blocked=str(tmp_path / run),
                features="base-only", dataset=str(held_out), max_tokens=3000, seq_len=64, out=tmp_path / f"leakage-{run}",
            )
        )  # fmt: skip
        moved[run] = report.summary()["relative_change"]["protected"]
    assert moved["preserve"]["n_features"] > 10
    # Seen: pooled 0.72 vs 2.19, median 0.65 vs 1.46 (training seed 0)
    assert moved["preserve"]["pooled"] < 0.5 * moved["control"]["pooled"], moved
    assert moved["preserve"]["median"] < 0.7 * moved["control"]["median"], moved

    preserve, plain = _history(tmp_path / "preserve"), _history(tmp_path / "control")
    assert len(preserve) == len(plain) == 8
    assert preserve[0]["preserve"] == 0.0 and preserve[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    sft_loss = [entry["loss"] - 1.0 * entry["preserve"] for entry in preserve]  # lambda = 1, one micro-batch per step
    assert sft_loss[-1] < sft_loss[0] - 0.3, sft_loss  # seen: 6.30 -> 5.65 (plain SFT: 6.30 -> 5.00)
    assert max(entry["preserve"] for entry in preserve) > 0.1


@pytest.mark.slow
def test_tiny_config_runs_end_to_end(tiny_crosscoder, tmp_path):
    """`accelerate launch` of the tiny config (one CPU process) with the test's crosscoder: trains, logs the preserver
    and the term, saves the model and writes the probe outputs of paradigm sft_preserve."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        str(RECIPES / "sft_preserve.py"), "--config", str(TINY), "--output_dir", str(out),
        "--preserve_crosscoder", str(tiny_crosscoder["crosscoder"]),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert time.perf_counter() - started < 120, "the tiny config should run in well under a minute"
    assert "Feature preservation: FeaturePreserver(model='base', layer=2, n_features=" in log, log[-3000:]
    assert f"features 'base-only' of {tiny_crosscoder['crosscoder']}" in log
    assert "'preserve':" in log
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    manifest = json.loads((out / "probe" / "probe.json").read_text())
    assert manifest["paradigm"] == "sft_preserve" and manifest["layers"] == [2] and manifest["snapshots"]


def test_configs_parse_and_help_lists_the_options():
    """The tiny config and the Qwen3-4B-Base arm: SFT hyperparameters of qwen3-4b-base/sft.yaml, the base-only features
    of the base-vs-SFT crosscoder's base branch, lambda 1; --help lists --preserve_*."""
    module = _recipe()
    parser = module.make_parser()
    assert all(
        f"--preserve_{name}" in parser.format_help()
        for name in ("crosscoder", "features", "coefficient", "model", "layer", "base_model")
    )
    assert PreserveArguments().preserve_features == "base-only" and PreserveArguments().preserve_coefficient == 1.0
    assert build_preserver(PreserveArguments()) is None

    spec = importlib.util.spec_from_file_location("recipe_sft_ref", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sft
    spec.loader.exec_module(sft)
    _, sft_training, sft_model, sft_probe, *_ = parse_with(
        sft.make_parser(), RECIPES / "configs" / "qwen3-4b-base" / "sft.yaml"
    )
    script, training, model, probe, preserve, *_ = parse_with(
        parser, RECIPES / "configs" / "qwen3-4b-base" / "sft_preserve_base_only.yaml"
    )
    assert (preserve.preserve_features, preserve.preserve_model) == ("base-only", "base")
    assert preserve.preserve_coefficient == 1.0
    assert preserve.preserve_crosscoder == "runs/qwen3-4b-base/crosscoder-base-sft" and preserve.preserve_layer is None
    assert training.output_dir == "runs/qwen3-4b-base/sft-preserve-base-only"
    assert model.model_name_or_path == sft_model.model_name_or_path == "Qwen/Qwen3-4B-Base"
    assert probe.probe_layers == sft_probe.probe_layers == [18]
    for name in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_length", "lr_scheduler_type", "seed", "gradient_checkpointing"):  # fmt: skip
        assert getattr(training, name) == getattr(sft_training, name), name

    script, training, model, probe, preserve, *_ = parse_with(parser, TINY)
    assert model.model_name_or_path == "tiny:qwen3" and probe.probe_layers == [2]
    assert (preserve.preserve_crosscoder, preserve.preserve_features) == ("runs/tiny/crosscoder-base-sft", "base-only")


def parse_with(parser, path: Path):
    return parser.parse_args_and_config(["--config", str(path), "--bf16", "false", "--use_cpu", "true"])
