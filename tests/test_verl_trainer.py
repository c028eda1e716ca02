"""ProbePPOTrainer and ProbeCheckpointCallback inside verl 0.9.1's real trainer, on CPU.

One subprocess runs everything that needs Ray (2 CPUs, torch single-threaded):

* registration: Ray's ``worker_process_setup_hook`` (our ``setup_hook.setup``) and verl's
  ``verl.plugins`` entry point each register the probe trainer and the trl compatibility fix in a
  Ray worker; the driver-side check names the fix when neither can work;
* ``+probe=on``: the trainer class verl's registry returns for the composed config, built with verl's
  own constructor, tokenizer, dataloader (a verl-style parquet), role mapping and checkpoint
  save/load, on a real 2-rank RayWorkerGroup of our worker (verl's FSDP2 engine, tests/_verl_cpu.py).
  verl's ``fit`` loop cannot run on CPU (rollout needs vLLM/SGLang), so the script calls the hooks in
  the order ``fit`` does; the rollout side (``CheckpointEngineManager`` + vLLM replicas) is a recorder
  that notes, at each sleep / weight update, what the probe directory holds. A run is interrupted
  after step 4 and resumed from verl's step-3 checkpoint;
* ``+probe=on_ckpt``: verl's own ``_save_checkpoint`` (FSDP checkpoint manager with hf_model,
  rotation ``max_actor_ckpt_to_keep=1``) calls our callback exactly as in training.

The TRL path (SFTTrainer + add_probe_callbacks) runs in the test process for the store comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")

from _probe_helpers import fresh_forward, read_store, trl_probe_run  # noqa: E402

from posttrain_probe.data import load_dataset_spec, token_batches  # noqa: E402
from posttrain_probe.synthetic import arithmetic_dataset  # noqa: E402
from posttrain_probe.testing import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TESTS = Path(__file__).resolve().parent
LAYERS = [1, 2]
N_DOCS = 6
PROBE_OVERRIDES = [
    "probe.layers=[1,2]",
    f"probe.n_docs={N_DOCS}",
    "probe.seq_len=48",
    "probe.batch_size=3",
    "probe.dtype=float32",
]

SCRIPT = r'''
import json, os, sys
tests_dir, data_dir, out = sys.argv[1:4]
probe_overrides = json.loads(sys.argv[4])
sys.path.insert(0, tests_dir)
import torch
torch.set_num_threads(1)
from pathlib import Path
import ray
from posttrain_probe.callbacks.verl.config import SETUP_HOOK

result = {}
# -- registration through Ray's worker_process_setup_hook alone (entry point off), before the CPU platform is set up
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "VERL_USE_EXTERNAL_PLUGINS": "none"}, "worker_process_setup_hook": SETUP_HOOK})


@ray.remote
def state_in_worker():
    import verl  # noqa: F401  (loads verl.plugins entry points unless VERL_USE_EXTERNAL_PLUGINS=none)
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    from verl.utils import import_utils
    from posttrain_probe.callbacks.verl import compat
    return {"trainer": TRAINER_REGISTRY["probe"].__name__ if "probe" in TRAINER_REGISTRY else None,
            "compat": import_utils.is_trl_available is compat.trl_value_head_available}


try:
    result["via_hook"] = ray.get(state_in_worker.remote())
    from posttrain_probe.callbacks.verl.setup_hook import check_ray_registration
    os.environ["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    check_ray_registration()  # Ray initialised by the caller, but with our hook: fine
    result["ray_check_with_hook"] = "ok"
    del os.environ["VERL_USE_EXTERNAL_PLUGINS"]
finally:
    ray.shutdown()

# -- registration through verl's verl.plugins entry point alone (Ray started without our hook) -----
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
try:
    result["via_entry_point"] = ray.get(state_in_worker.remote())
    result["entry_point_off"] = ray.get(state_in_worker.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "VERL_USE_EXTERNAL_PLUGINS": "none"}}).remote())
    from posttrain_probe.errors import ProbeError
    check_ray_registration()  # Ray initialised, entry point installed and enabled: fine
    os.environ["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    try:
        check_ray_registration()
        result["ray_check"] = None
    except ProbeError as err:
        result["ray_check"] = str(err)
    del os.environ["VERL_USE_EXTERNAL_PLUGINS"]
finally:
    ray.shutdown()

import _verl_cpu
_verl_cpu.use_cpu_platform()
from hydra import compose, initialize_config_dir
import verl
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
from posttrain_probe.callbacks.verl.setup_hook import setup
registered = lambda: "probe" in TRAINER_REGISTRY

result["registered_before"] = registered()
setup()  # what the hook / entry point do in verl's TaskRunner; here the test process is the driver
result["registered_after"] = registered()


def config(mode, *extra):
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            f"+probe={mode}", f"actor_rollout_ref.model.path={data_dir}/model", *_verl_cpu.CPU_OVERRIDES,
            f"data.train_files={data_dir}/train.parquet", f"data.val_files={data_dir}/train.parquet",
            "data.train_batch_size=2", "data.max_prompt_length=64", "data.max_response_length=16",
            "data.dataloader_num_workers=0", "trainer.total_epochs=1", "trainer.n_gpus_per_node=2",
            "algorithm.adv_estimator=grpo", "trainer.logger=[console]", *probe_overrides, *extra,
        ])


class RolloutRecorder:
    """Stands in for CheckpointEngineManager + rollout replicas (vLLM/SGLang need a GPU): records each
    sleep and weight update with the probe steps recorded in probe.json at that moment."""

    def __init__(self, run_dir):
        self.manifest, self.events = Path(run_dir) / "probe.json", []

    def _done(self):
        if not self.manifest.exists():
            return {}
        manifest = json.loads(self.manifest.read_text())
        return {kind: [entry["step"] for entry in manifest[kind]] for kind in ("snapshots", "activations")}

    def sleep_replicas(self):
        self.events.append(["sleep", None, self._done()])

    def update_weights(self, global_steps=None):
        self.events.append(["update_weights", global_steps, self._done()])


def build(cfg):
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    trainer._init_resource_pool_mgr()
    return trainer


def fit_hooks(trainer, group, last_step, run_dir):
    """verl's set-up tail and fit loop, hook by hook (PPOTrainer._setup / fit, PPOTrainerSync)."""
    trainer.actor_rollout_wg = group
    trainer.checkpoint_manager = RolloutRecorder(run_dir)
    trainer._load_checkpoint()
    start = trainer.global_steps
    trainer.on_init_end()
    trainer.curr_step_profile = False
    metrics = {}
    for step in range(start + 1, last_step + 1):
        trainer.global_steps, trainer.timing_raw = step, {}
        trainer.on_step_begin()
        trainer.on_sample_end()
        if step % trainer.config.trainer.save_freq == 0 or step == trainer.total_training_steps:
            trainer._save_checkpoint()
        trainer.on_step_end()
        metrics[step] = trainer._consume_sync_metrics()
    return {"start": start, "schedule": getattr(trainer, "probe_schedule", None), "events": trainer.checkpoint_manager.events,
            "metrics": metrics, "info": getattr(trainer, "probe_info", None)}


def store_mtimes(run_dir):
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(Path(run_dir).glob("activations/*/layer*/manifest.json"))}


env = {"PYTHONPATH": tests_dir, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

# -- the trainers: verl's workers on the CPU platform (tests/_verl_cpu.py) ----------------------
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": env, "worker_process_setup_hook": "_verl_cpu.use_cpu_platform"})
try:
    # -- +probe=on ------------------------------------------------------------------------------
    run_dir = os.path.join(out, "ckpt", "probe")
    on = ["trainer.save_freq=3", f"trainer.default_local_dir={out}/ckpt", "probe.snapshot_steps=2"]
    try:
        get_trainer_cls("probe")(config("on", *on, "trainer.v1.trainer_mode=sync"))
        result["sync_mode_error"] = None
    except ProbeError as err:
        result["sync_mode_error"] = str(err)
    trainer = build(config("on", *on))
    result["trainer"] = type(trainer).__name__
    result["mode_after_init"] = trainer.config.trainer.v1.trainer_mode
    result["replay_buffer"] = type(trainer.replay_buffer).__name__
    result["total_steps"] = trainer.total_training_steps
    result["roles"] = {str(role): cls.__ray_actor_class__.__name__ for role, cls in trainer.role_worker_mapping.items()}
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    worker = RayClassWithInitArgs(cls=trainer.role_worker_mapping[Role.ActorRollout], config=trainer.config.actor_rollout_ref, role="actor")
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker, device_name="cpu")  # role "actor": no rollout engine on CPU
    group.init_model()
    result["first"] = fit_hooks(trainer, group, 4, run_dir)  # interrupted after step 4; verl saved step 3
    result["manifest_first"] = json.loads(Path(run_dir, "probe.json").read_text())
    result["mtimes_first"] = store_mtimes(run_dir)
    resumed = build(config("on", *on))
    result["second"] = fit_hooks(resumed, group, resumed.total_training_steps, run_dir)
    result["manifest_second"] = json.loads(Path(run_dir, "probe.json").read_text())
    result["mtimes_second"] = store_mtimes(run_dir)

    # -- +probe=on_ckpt: verl's own trainer mode and checkpoint saves ------------------------------
    for placement_group in pool.pgs:  # frees the 2 CPUs (and ends the probe workers)
        ray.util.remove_placement_group(placement_group)
    ckpt = build(config("on_ckpt", "trainer.save_freq=4", f"trainer.default_local_dir={out}/on_ckpt", "trainer.max_actor_ckpt_to_keep=1"))
    result["ckpt_trainer"] = type(ckpt).__name__
    result["ckpt_callback"] = type(ckpt.checkpoint_callback).__name__
    result["ckpt_roles"] = {str(role): cls.__ray_actor_class__.__name__ for role, cls in ckpt.role_worker_mapping.items()}
    # verl's own worker class (the trl fix reaches it through our verl.plugins entry point), one rank
    worker = RayClassWithInitArgs(cls=ckpt.role_worker_mapping[Role.ActorRollout], config=ckpt.config.actor_rollout_ref, role="actor")
    verl_group = RayWorkerGroup(resource_pool=RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1), ray_cls_with_init=worker, device_name="cpu")
    verl_group.init_model()
    result["ckpt_run"] = fit_hooks(ckpt, verl_group, ckpt.total_training_steps, os.path.join(out, "on_ckpt", "probe"))
    result["ckpt_manifest"] = json.loads(Path(out, "on_ckpt", "probe", "probe.json").read_text())
    result["ckpt_dirs"] = sorted(os.listdir(Path(out, "on_ckpt")))
finally:
    ray.shutdown()
Path(out, "result.json").write_text(json.dumps(result, indent=1, default=str))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 + tokenizer and a verl-style GRPO parquet (chat 'prompt', data_source, reward_model), 12 rows."""
    root = tmp_path_factory.mktemp("verl_trainer")
    tiny_model("qwen3", seed=0).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    data = arithmetic_dataset(12, seed=0)
    data = data.map(
        lambda row: {
            "data_source": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": row["final_answer"]},
        }
    )
    data.to_parquet(str(root / "train.parquet"))
    return {"root": root, "data": root, "train": root / "train.parquet", "model": root / "model"}


@pytest.fixture(scope="module")
def ran(setup) -> tuple[Path, dict]:
    out = setup["root"] / "out"
    out.mkdir()
    script = out / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(TESTS), str(setup["data"]), str(out), json.dumps(PROBE_OVERRIDES)],
        env=env, capture_output=True, text=True, timeout=600, cwd=out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-8000:]
    return out, json.loads((out / "result.json").read_text())


def steps(manifest: dict, kind: str) -> list[int]:
    return [entry["step"] for entry in manifest[kind]]


# -- registration --------------------------------------------------------------------------------
def test_setup_hook_and_entry_point_register_the_trainer_in_ray_workers(ran):
    _, result = ran
    assert result["registered_before"] is False and result["registered_after"] is True
    assert result["via_hook"] == {"trainer": "ProbePPOTrainer", "compat": True}  # hook alone (plugins off)
    assert result["via_entry_point"] == {"trainer": "ProbePPOTrainer", "compat": True}  # entry point alone
    assert result["entry_point_off"] == {"trainer": None, "compat": False}  # neither: verl would not find 'probe'


def test_ray_initialised_without_the_fallback_is_a_clear_error(ran):
    _, result = ran
    assert result["ray_check_with_hook"] == "ok"
    message = result["ray_check"]
    assert "Ray is already initialised" in message and "VERL_USE_EXTERNAL_PLUGINS=none" in message
    assert "worker_process_setup_hook" in message and "posttrain_probe.callbacks.verl.setup_hook.setup" in message


# -- +probe=on -------------------------------------------------------------------------------------
def test_probe_trainer_is_verls_sync_trainer_with_our_worker(ran):
    _, result = ran
    assert result["trainer"] == "ProbePPOTrainer"
    assert (
        result["mode_after_init"] == "sync" and result["replay_buffer"] == "ReplayBuffer"
    )  # trainer_base's "sync" branches
    assert result["roles"] == {"actor_rollout": "ProbeActorRolloutRefWorker"}
    assert "ProbePPOTrainer runs as trainer.v1.trainer_mode=probe, got sync" in result["sync_mode_error"]


def test_probe_steps_run_while_the_rollout_sleeps(ran):
    """probe_init + step 0 before verl's first weight update; each scheduled step's snapshot and
    activations are in probe.json before verl wakes the rollout for the next step."""
    _, result = ran
    first = result["first"]
    assert result["total_steps"] == 6 and first["schedule"] == [2, 4, 6] and first["start"] == 0
    updates = {event[1]: event[2] for event in first["events"] if event[0] == "update_weights"}
    assert updates[0] == {"snapshots": [], "activations": [0]}
    assert updates[1] == {"snapshots": [], "activations": [0]}
    assert updates[2] == {"snapshots": [2], "activations": [0, 2]}
    assert updates[3] == {"snapshots": [2], "activations": [0, 2]}
    assert updates[4] == {"snapshots": [2, 4], "activations": [0, 2, 4]}
    kinds = [event[0] for event in first["events"]]
    assert kinds == ["update_weights"] + ["sleep", "update_weights"] * 4  # verl's sync order around our hooks
    assert first["info"]["layers"] == LAYERS and first["info"]["n_docs"] == 6 and first["info"]["n_tokens"] > 0


def test_probe_metrics_reach_verls_step_metrics(ran):
    _, result = ran
    metrics = result["first"]["metrics"]
    assert set(metrics["1"]) == {"probe/base_activation_seconds"}
    assert set(metrics["2"]) == {
        "probe/snapshot_seconds",
        "probe/activation_seconds",
        "probe/drift/layer1",
        "probe/drift/layer2",
    }
    assert metrics["3"] == {}


def test_resume_continues_the_same_probe_directory(ran):
    out, result = ran
    run = out / "ckpt" / "probe"
    first, second = result["manifest_first"], result["manifest_second"]
    assert steps(first, "snapshots") == [2, 4] and steps(first, "activations") == [0, 2, 4]
    assert result["second"]["start"] == 3  # verl resumed from its step-3 checkpoint
    # on resume the worker drops what the interrupted run wrote after step 3, then redoes step 4
    updates = {event[1]: event[2] for event in result["second"]["events"] if event[0] == "update_weights"}
    assert updates[3] == {"snapshots": [2], "activations": [0, 2]}
    assert updates[6] == {"snapshots": [2, 4, 6], "activations": [0, 2, 4, 6]}
    assert steps(second, "snapshots") == [2, 4, 6] and steps(second, "activations") == [0, 2, 4, 6]
    for key in ("base_model", "paradigm", "layers", "probe_fingerprint", "schedule", "trainer"):
        assert first[key] == second[key], key
    assert second["paradigm"] == "grpo" and second["trainer"] == "ProbePPOTrainer" and second["world_size"] == 2
    before, after = result["mtimes_first"], result["mtimes_second"]
    for layer in LAYERS:
        base, redone = (
            f"activations/step-000000/layer{layer}/manifest.json",
            f"activations/step-000004/layer{layer}/manifest.json",
        )
        assert after[base] == before[base]  # the base capture is kept
        assert after[redone] != before[redone]  # step 4 was taken again
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-000002", "step-000004", "step-000006"]


# -- +probe=on_ckpt --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_store(setup) -> Path:
    """The TRL path (SFTTrainer + add_probe_callbacks) on the same model, probe set and layers."""
    return trl_probe_run(setup["model"], setup["train"], setup["root"] / "trl", layers=LAYERS, n_docs=N_DOCS)


def test_on_ckpt_snapshots_every_verl_save_out_of_rotation(ran):
    out, result = ran
    assert result["ckpt_trainer"] == "PPOTrainerSync" and result["ckpt_callback"] == "ProbeCheckpointCallback"
    assert result["ckpt_roles"] == {"actor_rollout": "ActorRolloutRefWorker"}  # verl's own worker
    manifest = result["ckpt_manifest"]
    assert (
        manifest["schedule"] == [4, 6]
        and steps(manifest, "snapshots") == [4, 6]
        and steps(manifest, "activations") == [0, 4, 6]
    )
    assert manifest["trainer"] == "PPOTrainerSync" and manifest["paradigm"] == "grpo" and manifest["layers"] == LAYERS
    # verl's rotation (max_actor_ckpt_to_keep=1) deleted global_step_4/actor; our copy of its HF export stays
    assert not (out / "on_ckpt" / "global_step_4" / "actor").exists()
    snapshot = out / "on_ckpt" / "probe" / "snapshots" / "step-000004"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in snapshot.iterdir()
    }
    verl_export = out / "on_ckpt" / "global_step_6" / "actor" / "huggingface"
    copied = out / "on_ckpt" / "probe" / "snapshots" / "step-000006"
    assert sorted(p.name for p in verl_export.iterdir()) == sorted(p.name for p in copied.iterdir())
    assert (verl_export / "model.safetensors").read_bytes() == (copied / "model.safetensors").read_bytes()
    assert set(result["ckpt_run"]["metrics"]) == {"1", "2", "3", "4", "5", "6"}


def test_on_ckpt_store_equals_the_trl_store(ran, trl_store):
    out, _ = ran
    run = out / "on_ckpt" / "probe"
    for layer in LAYERS:
        ours_store, ours = read_store(run / "activations" / "step-000000" / f"layer{layer}")
        trl, theirs = read_store(trl_store / "activations" / "step-000000" / f"layer{layer}")
        assert ours_store.token_fingerprint == trl.token_fingerprint and ours_store.dtype == trl.dtype == torch.float32
        for key in ("token_ids", "doc_ids", "positions", "acts"):
            assert torch.equal(ours[key], theirs[key]), key


def test_on_ckpt_snapshot_reloads_and_reproduces_its_store(ran, setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = ran
    run = out / "on_ckpt" / "probe"
    snapshot = run / "snapshots" / "step-000006"
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    rows = json.loads((run / "probe.json").read_text())["probe"]["rows"]
    data = load_dataset_spec(str(setup["train"])).select(rows)
    want = fresh_forward(model, token_batches(data, tokenizer, column="prompt", seq_len=48, batch_size=3), LAYERS)
    for layer in LAYERS:
        _, stored = read_store(run / "activations" / "step-000006" / f"layer{layer}")
        torch.testing.assert_close(stored["acts"].float(), want["acts"][layer], rtol=1e-5, atol=1e-5)
