"""ProbeActorRolloutRefWorker on verl's real ActorRolloutRefWorker and FSDP2 engine, CPU (gloo).

verl 0.9.1's own worker class, engine, checkpoint manager, config (composed from its ppo_trainer
yaml) and Ray worker group run on a tiny Qwen3; tests/_verl_cpu.py registers a CPU platform with
verl (verl has none) and lists the config overrides a CPU actor needs, with the reasons.

* one process (torchrun, world size 1): the trl 1.x start-up failure and its fix, bad input,
  probe_init / probe_step at step 0, one optimizer step of the actor's own engine, step 1,
  idempotence, resume, verl's default bf16 mixed precision and a JSONL probe set;
* two Ray workers through verl's RayWorkerGroup (ONE_TO_ALL dispatch, sharded forward and
  gathered snapshot over 2 ranks);
* the TRL path (SFTTrainer + add_probe_callbacks) on the same model, probe set (probe_dataset = the
  parquet file the verl worker samples as its training data) and layers.

Checked: the verl store equals the TRL store (same token fingerprint, bitwise equal float32
activations), 2 ranks hold the same tokens and values as 1, snapshots reload with
AutoModelForCausalLM / AutoTokenizer and reproduce the stored activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed import torchrun
from _probe_helpers import fresh_forward, read_store, trl_probe_run
from safetensors.torch import load_file

from posttrain_probe.activations.store import ActivationStore
from posttrain_probe.callbacks.verl.config import VerlProbeConfig
from posttrain_probe.data import load_dataset_spec, token_batches
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parent
LAYERS = [1, 2]
# What the probe trainer hands to probe_init: the probe.* config (dataset None: the training-data
# sample) plus the keys the worker cannot see in its own config.
PROBE = {
    **VerlProbeConfig(layers=LAYERS, column="prompt", n_docs=8, seq_len=48, batch_size=3, dtype="float32").to_dict(),
    "schedule": [1], "resume_step": 0, "paradigm": "grpo", "trainer": "test",
}  # fmt: skip

COMMON = r"""
import json, os, sys
tests_dir, model_path, train_file, out = sys.argv[1:5]
sys.path.insert(0, tests_dir)
import torch
torch.set_num_threads(1)
import _verl_cpu
_verl_cpu.use_cpu_platform()
PROBE = json.loads(sys.argv[5])
PROBE.update(train_files=train_file)
FP32 = "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"  # verl's default computes in bf16
"""

ONE_PROCESS = (
    COMMON
    + r"""
import torch.distributed as dist
from transformers import AutoModelForCausalLM

dist.init_process_group("gloo")
result = {}

# verl's actor start-up step that fails with trl 1.x installed, before our worker module is imported.
from verl.models.transformers.monkey_patch import apply_monkey_patch
try:
    apply_monkey_patch(AutoModelForCausalLM.from_pretrained(model_path), use_remove_padding=False)
    result["without_compat"] = None
except ImportError as err:
    result["without_compat"] = str(err)

from posttrain_probe.callbacks.verl.worker import ProbeActorRolloutRefWorker  # applies the compat fix
from posttrain_probe.errors import ProbeError


def attempt(call):
    try:
        return {"ok": call()}
    except ProbeError as err:
        return {"error": str(err)}


worker = ProbeActorRolloutRefWorker(_verl_cpu.actor_config(model_path, FP32, "actor_rollout_ref.actor.optim.lr=1e-2"), role="actor")
worker.init_model()
probe = {**PROBE, "run_dir": os.path.join(out, "run")}
result["bad_layer"] = attempt(lambda: worker.probe_init({**probe, "layers": [1, 4]}))
result["too_long"] = attempt(lambda: worker.probe_init({**probe, "max_prompt_length": 8}))
result["no_train_files"] = attempt(lambda: worker.probe_init({**probe, "train_files": []}))
result["step_before_init"] = attempt(lambda: worker.probe_step(0))
result["written_after_errors"] = os.path.exists(probe["run_dir"])
result["info"] = worker.probe_init(probe)
result["step0"] = worker.probe_step(0)

# One optimizer step of the actor's own engine (FSDP2 module, AdamW, grad clipping) on the probe prompts.
engine = worker.actor.engine
with engine.train_mode():
    for batch in worker._probe.probe_batches():
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, use_cache=False).loss.backward()
    result["grad_norm"] = engine.optimizer_step()

result["step1"] = worker.probe_step(1)
result["step1_again"] = worker.probe_step(1)
result["fresh_again"] = attempt(lambda: worker.probe_init({**probe, "resume_step": 0}))
result["resumed"] = attempt(lambda: worker.probe_init({**probe, "resume_step": 1}))
result["resumed_step1"] = worker.probe_step(1)

# verl's default mixed precision (bf16 compute, fp32 master weights), another run dir, and the probe set
# given as a JSONL file (the rows of the parquet training file: the same tokens).
bf16 = ProbeActorRolloutRefWorker(_verl_cpu.actor_config(model_path), role="actor")
bf16.init_model()
result["bf16_autocast"] = str(bf16.actor.engine._autocast_dtype)
jsonl = train_file.replace(".parquet", ".jsonl")
bf16.probe_init({**probe, "run_dir": os.path.join(out, "bf16"), "save_snapshots": False, "dataset": jsonl, "train_files": []})
result["bf16_step0"] = bf16.probe_step(0)

with open(os.path.join(out, "result.json"), "w") as handle:
    json.dump(result, handle)
dist.destroy_process_group()
"""
)

RAY_TWO_WORKERS = (
    COMMON
    + r"""
import ray
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from posttrain_probe.callbacks.verl.worker import ProbeActorRolloutRefWorker
from posttrain_probe.errors import ProbeError

env = {"PYTHONPATH": tests_dir, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": env, "worker_process_setup_hook": "_verl_cpu.use_cpu_platform"})
result = {}
try:
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    actor = RayClassWithInitArgs(cls=ray.remote(ProbeActorRolloutRefWorker), config=_verl_cpu.actor_config(model_path, FP32), role="actor")
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=actor, device_name="cpu")
    result["world_size"] = group.world_size
    group.init_model()
    probe = {**PROBE, "run_dir": os.path.join(out, "run")}
    try:
        group.probe_init({**probe, "layers": [7]})
        result["bad_layer"] = None
    except ProbeError as err:  # Ray re-raises the worker's exception as a subclass of its type
        result["bad_layer"] = str(err)
    result["info"] = group.probe_init(probe)
    result["step0"] = group.probe_step(0)
    result["step1"] = group.probe_step(1)
finally:
    ray.shutdown()
with open(os.path.join(out, "result.json"), "w") as handle:
    json.dump(result, handle)
"""
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 + tokenizer on disk and a verl-style parquet training file (chat 'prompt' column)."""
    root = tmp_path_factory.mktemp("verl_worker")
    model_path = root / "model"
    tiny_model("qwen3", seed=0).save_pretrained(model_path)
    tiny_tokenizer().save_pretrained(model_path)
    train_file = root / "train.parquet"
    arithmetic_dataset(20, seed=0).to_parquet(str(train_file))
    arithmetic_dataset(20, seed=0).to_json(str(root / "train.jsonl"))  # JSON lines: the bf16 run's probe.dataset
    return {"root": root, "model": model_path, "train": train_file}


def _launch(script: str, setup: dict, name: str, *, nproc: int | None) -> tuple[Path, dict]:
    out = setup["root"] / name
    out.mkdir()
    path = out / "script.py"
    path.write_text(script)
    args = (str(TESTS), str(setup["model"]), str(setup["train"]), str(out), json.dumps(PROBE))
    if nproc is not None:
        proc = torchrun(path, *args, nproc=nproc, timeout=300)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=400, cwd=out
        )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def one(setup):
    """The one-process (torchrun, gloo, world size 1) run: (out dir, result.json)."""
    return _launch(ONE_PROCESS, setup, "one", nproc=1)


@pytest.fixture(scope="module")
def ray_two(setup):
    """Two Ray workers in verl's RayWorkerGroup: (out dir, result.json)."""
    return _launch(RAY_TWO_WORKERS, setup, "ray", nproc=None)


@pytest.fixture(scope="module")
def trl_run(setup):
    """The TRL path: SFTTrainer + add_probe_callbacks with the same model, probe set and layers."""
    return trl_probe_run(setup["model"], setup["train"], setup["root"] / "trl", layers=LAYERS, n_docs=PROBE["n_docs"])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def by_token(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The store's rows ordered by (document, position): stores written by different numbers of
    ranks hold the same tokens in another order (each rank's slice of the probe set in turn)."""
    order = torch.argsort(data["doc_ids"].long() * 100_000 + data["positions"].long())
    return {key: value[order] for key, value in data.items()}


def reload_and_check(run: Path, step: int, train_file: Path) -> None:
    """The snapshot of ``step`` loads with AutoModelForCausalLM + AutoTokenizer, and its fresh
    forwards on the probe set reproduce the stored activations of ``step`` at every layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = run / "snapshots" / f"step-{step:06d}"
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    manifest = json.loads((run / "probe.json").read_text())
    data = load_dataset_spec(str(train_file)).select(manifest["probe"]["rows"])
    batches = list(token_batches(data, tokenizer, column="prompt", seq_len=48, batch_size=3))
    want = fresh_forward(model, batches, LAYERS)
    for layer in LAYERS:
        store, got = read_store(run / "activations" / f"step-{step:06d}" / f"layer{layer}")
        assert store.model_name == f"step-{step:06d}"
        got = by_token(got)
        order = torch.argsort(want["doc_ids"] * 100_000 + want["positions"])
        assert torch.equal(got["token_ids"].long(), want["token_ids"][order])
        torch.testing.assert_close(got["acts"].float(), want["acts"][layer][order], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------


def test_trl_1x_breaks_verl_actor_start_and_compat_fixes_it(one):
    _, result = one
    # Without the fix, verl's apply_monkey_patch (FSDP engine _build_module) imports trl's removed value head.
    assert "AutoModelForCausalLMWithValueHead" in result["without_compat"]
    assert result["info"]["hidden_size"] == 64  # with it, the real actor started and answered


def test_bad_input_fails_before_anything_is_written(one):
    _, result = one
    bad_layer = result["bad_layer"]["error"]
    assert bad_layer.startswith("probe.layers: layer 4 is out of range") and "0 <= layer <= 3" in bad_layer
    too_long = result["too_long"]["error"]
    assert "longer than the max prompt length 8" in too_long and "probe.seq_len <= 8" in too_long
    assert "data.train_files is empty" in result["no_train_files"]["error"]
    assert "before probe_init" in result["step_before_init"]["error"]
    assert result["written_after_errors"] is False


def test_probe_init_reports_the_probe_set(one):
    out, result = one
    info = result["info"]
    assert info["layers"] == LAYERS and info["n_docs"] == 8 and info["run_dir"] == str(out / "run")
    store = ActivationStore(out / "run" / "activations" / "step-000000" / "layer1")
    assert info["n_tokens"] == store.n_tokens > 0


def test_run_directory_and_metrics(one):
    out, result = one
    manifest = json.loads((out / "run" / "probe.json").read_text())
    assert manifest["paradigm"] == "grpo" and manifest["layers"] == LAYERS and manifest["schedule"] == [1]
    assert manifest["world_size"] == 1 and manifest["probe_fingerprint"] == result["info"]["probe_fingerprint"]
    assert [e["step"] for e in manifest["snapshots"]] == [1] and [e["step"] for e in manifest["activations"]] == [0, 1]
    assert not list((out / "run" / "snapshots").glob(".*"))  # no staging folder left behind
    assert set(result["step0"]) == {"probe/activation_seconds"}
    assert result["grad_norm"] > 0
    assert result["step1"]["probe/snapshot_seconds"] > 0 and result["step1"]["probe/drift/layer2"] > 0
    assert result["step1_again"] == {}  # already recorded: skipped


def test_resume_continues_the_run_directory(one):
    _, result = one
    assert "already holds this run's snapshots" in result["fresh_again"]["error"]
    assert result["resumed"]["ok"]["probe_fingerprint"] == result["info"]["probe_fingerprint"]
    assert result["resumed_step1"] == {}


def test_verl_store_equals_trl_store(one, trl_run):
    out, _ = one
    for layer in LAYERS:
        verl_store, verl = read_store(out / "run" / "activations" / "step-000000" / f"layer{layer}")
        trl_store, trl = read_store(trl_run / "activations" / "step-000000" / f"layer{layer}")
        assert verl_store.token_fingerprint == trl_store.token_fingerprint
        assert verl_store.d_model == trl_store.d_model and verl_store.dtype == trl_store.dtype == torch.float32
        for key in ("token_ids", "doc_ids", "positions", "acts"):
            assert torch.equal(verl[key], trl[key]), key  # same math in float32: bitwise


def test_snapshot_reloads_and_reproduces_stored_activations(one, setup):
    out, _ = one
    reload_and_check(out / "run", 1, setup["train"])
    trained = load_file(out / "run" / "snapshots" / "step-000001" / "model.safetensors")
    base = load_file(setup["model"] / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in base)  # the optimizer step is in it


def test_bf16_mixed_precision_and_jsonl_probe_set(one):
    out, result = one
    assert result["bf16_autocast"] == "torch.bfloat16" and "probe/activation_seconds" in result["bf16_step0"]
    for layer in LAYERS:
        _, fp32 = read_store(out / "run" / "activations" / "step-000000" / f"layer{layer}")
        store, bf16 = read_store(out / "bf16" / "activations" / "step-000000" / f"layer{layer}")
        assert (
            store.token_fingerprint
            == ActivationStore(out / "run" / "activations" / "step-000000" / f"layer{layer}").token_fingerprint
        )
        assert store.dtype == torch.float32  # probe.dtype, whatever the compute dtype
        error = (bf16["acts"] - fp32["acts"]).norm(dim=-1) / fp32["acts"].norm(dim=-1)
        assert 0 < error.mean() < 0.05


# ---------------------------------------------------------------------------------------------
# two Ray workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_worker_group_two_ranks(ray_two, one, setup):
    out, result = ray_two
    assert result["world_size"] == 2
    assert "layer 7 is out of range" in result["bad_layer"]
    ranks = result["info"]
    assert len(ranks) == 2 and ranks[0] == ranks[1] and ranks[0]["n_tokens"] == one[1]["info"]["n_tokens"]
    assert (
        "probe/drift/layer1" in result["step1"][0] and "probe/drift/layer1" not in result["step1"][1]
    )  # rank 0 reports
    assert json.loads((out / "run" / "probe.json").read_text())["world_size"] == 2
    for layer in LAYERS:  # 2 ranks: the same tokens and values as 1 rank
        store, two = read_store(out / "run" / "activations" / "step-000000" / f"layer{layer}")
        assert store.n_shards == 2
        _, single = read_store(one[0] / "run" / "activations" / "step-000000" / f"layer{layer}")
        two, single = by_token(two), by_token(single)
        for key in ("token_ids", "doc_ids", "positions", "acts"):
            assert torch.equal(two[key], single[key]), key
    # the snapshot gathered from 2 shards is the base model, bitwise, and reproduces the step-1 store
    snapshot = load_file(out / "run" / "snapshots" / "step-000001" / "model.safetensors")
    base = load_file(setup["model"] / "model.safetensors")
    assert snapshot.keys() == base.keys() and all(torch.equal(snapshot[k], base[k]) for k in base)
    reload_and_check(out / "run", 1, setup["train"])
