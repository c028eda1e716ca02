"""The feature monitor under verl ``+probe=on`` (``probe.monitor.*``, docs/monitor.md), on CPU without Ray.

* composition: ``+probe=on probe.monitor.crosscoder=DIR`` with verl 0.9.1's own ppo_trainer config (Hydra
  compose API), the keys mirroring ``MonitorArguments``, and verl's own entry point ``main_ppo``;
* the driver: ``ProbeConfigCheck`` (the Hydra callback main_ppo runs before verl starts) turns each bad
  monitor input into one line on stderr and exit status 2, checking the crosscoder against the actor's
  architecture and embedding read from disk;
* a run (torchrun, one process, gloo): verl's ``ProbePPOTrainer`` built from the composed config, its hooks
  called in the order ``fit`` calls them, our worker (verl's ActorRolloutRefWorker and FSDP2 engine,
  tests/_verl_cpu.py) in the same process behind a one-rank stand-in for the RayWorkerGroup, and one
  optimizer step of the actor's own engine per training step (verl's rollout needs vLLM/SGLang). Interrupted
  after step 4 and resumed from verl's step-3 checkpoint; then a run stopped by an alert;
* two ranks (torchrun, 2 processes): the base sums, reduced over the ranks, equal one rank's.

Checked: monitor.jsonl has the TRL callback's line format and, at each step, the figures ``monitor_figures``
computes offline from that step's activation store (the same run's capture); the figures reach verl's
step metrics; resume keeps every line once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")

from _distributed import torchrun  # noqa: E402
from _probe_helpers import read_store  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors import safe_open  # noqa: E402

from posttrain_probe.analysis.monitor import MonitorFigures, monitor_figures, read_monitor_log  # noqa: E402
from posttrain_probe.callbacks.feature_monitor import MonitorArguments  # noqa: E402
from posttrain_probe.callbacks.verl.config import (  # noqa: E402
    ProbeConfigCheck,
    VerlMonitorConfig,
    VerlProbeConfig,
    check_job_config,
)
from posttrain_probe.crosscoder.config import CrosscoderConfig  # noqa: E402
from posttrain_probe.crosscoder.model import Crosscoder  # noqa: E402
from posttrain_probe.errors import ProbeError  # noqa: E402
from posttrain_probe.model_identity import model_fingerprint  # noqa: E402
from posttrain_probe.synthetic import arithmetic_dataset  # noqa: E402
from posttrain_probe.testing import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parent
VERL_CONFIG = str(Path(__import__("verl").__file__).parent / "trainer" / "config")
LAYER = 1
TOP_K = 5
PROBE = [
    f"probe.layers=[{LAYER}]",
    "probe.n_docs=8",  # 3 batches of 3: two ranks split them 2 + 1 (and a padding round)
    "probe.seq_len=48",
    "probe.batch_size=3",
    "probe.dtype=float32",
    "probe.save_snapshots=false",
    "probe.snapshot_steps=2",
    "probe.monitor.every=2",
    f"probe.monitor.top_k={TOP_K}",
]
LINE_KEYS = {"step", *(f.name for f in dataclasses.fields(MonitorFigures)), "seconds"}
"""The keys of a monitor.jsonl line of the TRL callback: step, the figures, seconds."""


# ---------------------------------------------------------------------------------------------
# model, data and crosscoders on disk
# ---------------------------------------------------------------------------------------------


def site_crosscoder(acts: torch.Tensor, names=("base", "sft"), *, layer: int | None = LAYER, fingerprint=None):
    """A crosscoder at LAYER of the tiny model: base branch = ReLU pairs on the top 16 principal directions of
    ``acts`` [T, 64] (features fire on about half the tokens, FVU well below 1); a second model's decoder norms
    spread over [0, 2] x the base's, so that every NormRatio category is populated. ``fingerprint``: the
    base slot's model fingerprint."""
    mean = acts.mean(0)
    pcs = torch.linalg.svd(acts - mean, full_matrices=False)[2][:16]
    directions = torch.cat([pcs, -pcs])  # [32, 64]
    scale = 64**0.5 / float(acts.norm(dim=-1).mean())
    cc = Crosscoder(CrosscoderConfig(model_names=list(names), d_model=64, n_features=32, layer=layer))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0] = directions.T
        cc.b_enc.copy_(-(directions @ mean) * scale)
        cc.W_dec[:, 0] = directions
        if len(names) > 1:
            spread = torch.linspace(0, 2, 32)[torch.randperm(32, generator=torch.Generator().manual_seed(7))]
            cc.W_dec[:, 1] = directions * spread[:, None]
        cc.b_dec.copy_(mean * scale)
        cc.scales.fill_(scale)
    cc.config.model_fingerprints = [fingerprint, *[None] * (len(names) - 1)]
    return cc.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 + tokenizer, a verl-style GRPO parquet (12 rows: 6 steps of 2) and crosscoders: ``cc`` (base
    and sft, at LAYER, fingerprint of the model), and the bad ones of the driver tests."""
    root = tmp_path_factory.mktemp("verl_monitor")
    model, tokenizer = tiny_model("qwen3", seed=0), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = arithmetic_dataset(12, seed=0).map(
        lambda row: {
            "data_source": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": row["final_answer"]},
        }
    )
    data.to_parquet(str(root / "train.parquet"))
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in arithmetic_dataset(32, seed=99)["messages"]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        acts = model(**batch, output_hidden_states=True).hidden_states[LAYER][batch.attention_mask.bool()]
    base = model_fingerprint(model)
    crosscoders = {
        "cc": site_crosscoder(acts, fingerprint=base),
        "sae": site_crosscoder(acts, ("base",), fingerprint=base),
        "no_layer": site_crosscoder(acts, ("base",), layer=None),
        "other_model": site_crosscoder(acts, fingerprint=model_fingerprint(tiny_model("qwen3", seed=1))),
        "wide": Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=32, n_features=16, layer=LAYER)),
    }
    paths = {"root": root, "model": root / "model", "train": root / "train.parquet"}
    for name, cc in crosscoders.items():
        cc.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def compose_verl(*overrides: str):
    with initialize_config_dir(config_dir=VERL_CONFIG, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def monitored(setup, *overrides: str, crosscoder: str = "cc", mode: str = "on"):
    """verl's config with ``+probe=<mode>``, the tiny model as actor and ``probe.monitor.crosscoder``."""
    return compose_verl(
        f"+probe={mode}",
        f"actor_rollout_ref.model.path={setup['model']}",
        f"probe.monitor.crosscoder={setup.get(crosscoder, crosscoder)}",
        *overrides,
    )


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------


def test_probe_on_composes_with_a_monitor(setup):
    cfg = monitored(setup, "probe.monitor.every=20", "probe.monitor.categories=[shared]", "probe.monitor.max_fvu=0.8")
    monitor = cfg.probe.monitor
    assert monitor.crosscoder == str(setup["cc"]) and monitor.every == 20 and list(monitor.categories) == ["shared"]
    assert monitor.max_fvu == 0.8 and monitor.top_k == 10  # the rest: MonitorArguments' defaults
    probe = check_job_config(cfg)
    assert probe.monitor == VerlMonitorConfig(crosscoder=str(setup["cc"]), every=20, categories=["shared"], max_fvu=0.8)
    args = probe.monitor.to_monitor_arguments()
    assert (
        isinstance(args, MonitorArguments) and args.monitor_every == 20 and args.monitor_crosscoder == str(setup["cc"])
    )
    ProbeConfigCheck().on_job_start(config=cfg)  # the driver's checks pass: crosscoder and actor agree
    # the monitor node travels to the worker as part of the probe dict
    plain = VerlProbeConfig.from_dict(OmegaConf.to_container(cfg.probe))
    assert plain == probe and plain.to_dict()["monitor"]["every"] == 20
    assert compose_verl("+probe=on").probe.monitor.crosscoder is None  # off by default
    assert check_job_config(compose_verl("+probe=on")).monitor == VerlMonitorConfig()


def test_monitor_keys_mirror_monitor_arguments():
    """Every probe.monitor.* key is a MonitorArguments field (``monitor_`` + key) with the same type and default, and back."""
    ours = {f.name: f for f in dataclasses.fields(VerlMonitorConfig)}
    theirs = {f.name: f for f in dataclasses.fields(MonitorArguments)}
    assert [f"monitor_{name}" for name in ours] == list(theirs)
    our_types, their_types = typing.get_type_hints(VerlMonitorConfig), typing.get_type_hints(MonitorArguments)
    default = lambda f: f.default_factory() if f.default is dataclasses.MISSING else f.default  # noqa: E731
    for name, f in ours.items():
        assert our_types[name] == their_types[f"monitor_{name}"], name
        assert default(f) == default(theirs[f"monitor_{name}"]), name


def test_unknown_or_mistyped_monitor_keys_fail_while_composing(setup):
    with pytest.raises(ConfigCompositionException) as info:
        compose_verl("+probe=on", "probe.monitor.bogus=1")
    message = str(info.value.__cause__)
    assert "Key 'bogus' not in 'VerlMonitorConfig(valid keys: crosscoder model finetuned layer every" in message
    with pytest.raises(ConfigCompositionException) as info:
        compose_verl("+probe=on", "probe.monitor.every=often")
    assert "could not be converted to Integer" in str(info.value.__cause__)
    cfg = compose_verl("+probe=on", "+probe.monitor.bogus=1")  # '+' opens the node: the check names the keys
    with pytest.raises(
        ProbeError, match=r"unknown probe key\(s\) probe.monitor.bogus: valid keys are probe.monitor.crosscoder"
    ):
        check_job_config(cfg)


# ---------------------------------------------------------------------------------------------
# the driver: one line on stderr, exit status 2, before verl starts
# ---------------------------------------------------------------------------------------------

BAD = [
    ("every < 1", "cc", ["probe.monitor.every=0"], "probe.monitor.every must be >= 1 optimizer step, got 0"),
    ("category of an SAE", "sae", ["probe.monitor.categories=[shared]"], "NormRatio categories ['shared'] need a crosscoder of two models"),
    ("other site", "cc", ["probe.monitor.layer=2"], "the crosscoder was trained at layer 1, the feature monitor asked for layer 2"),
    ("other width", "wide", [], "the crosscoder has d_model 32, the model's hidden size is 64"),
    ("other base model", "other_model", [], "crosscoder slot 'base' was trained on qwen3"),
    ("no crosscoder", "/nonexistent/cc", [], "/nonexistent/cc holds no crosscoder"),
    ("other branch", "cc", ["probe.monitor.model=rl"], "model 'rl' is not in this crosscoder"),
    ("no layer recorded", "no_layer", [], "does not record its layer: give the monitored layer (probe.monitor.layer)"),
    ("layer out of range", "no_layer", ["probe.monitor.layer=7"], "layer 7 is out of range"),
    ("suppress fraction", "cc", ["probe.monitor.suppress_fraction=1.5"], "probe.monitor.suppress_fraction must be in (0, 1], got 1.5"),
    ("stop without threshold", "cc", ["probe.monitor.stop_on_alert=true"], "probe.monitor.stop_on_alert needs a threshold: set probe.monitor.max_suppressed or probe.monitor.max_fvu"),
]  # fmt: skip


@pytest.mark.parametrize("name, crosscoder, overrides, message", BAD, ids=[b[0] for b in BAD])
def test_bad_monitor_input_is_a_one_line_error_in_the_driver(setup, capsys, name, crosscoder, overrides, message):
    cfg = monitored(setup, *overrides, crosscoder=crosscoder)
    with pytest.raises(SystemExit) as exit_info:
        ProbeConfigCheck().on_job_start(config=cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_model_mismatch_names_the_verl_override_and_can_be_allowed(setup, capsys):
    with pytest.raises(SystemExit):
        ProbeConfigCheck().on_job_start(config=monitored(setup, crosscoder="other_model"))
    err = capsys.readouterr().err
    assert "(weights differ: embedding correlation" in err  # the embedding was read from the actor's safetensors
    assert err.rstrip().endswith("set probe.monitor.allow_model_mismatch=true to override")
    ProbeConfigCheck().on_job_start(
        config=monitored(setup, "probe.monitor.allow_model_mismatch=true", crosscoder="other_model")
    )
    assert capsys.readouterr().err == ""


def test_monitor_needs_probe_on(setup, capsys):
    cfg = monitored(setup, "trainer.save_freq=5", mode="on_ckpt")
    with pytest.raises(SystemExit):
        ProbeConfigCheck().on_job_start(config=cfg)
    assert "error: probe.monitor.crosscoder needs +probe=on" in capsys.readouterr().err


MAIN_PPO = [sys.executable, "-m", "verl.trainer.main_ppo", "+probe=on"]


@pytest.fixture(scope="module")
def main_ppo(setup) -> dict[str, subprocess.CompletedProcess]:
    """verl's own ``python -m verl.trainer.main_ppo``: ``--cfg job`` with a monitor, and a real start with a
    crosscoder of another site (stopped by our Hydra callback), started together."""
    model, cc = f"actor_rollout_ref.model.path={setup['model']}", f"probe.monitor.crosscoder={setup['cc']}"
    runs = {
        "good": [*MAIN_PPO, model, cc, "probe.monitor.every=20", "--cfg", "job"],
        "bad": [*MAIN_PPO, model, cc, "probe.monitor.layer=2"],
    }
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=setup["root"]
        )
        for name, args in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=400)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


@pytest.mark.slow
def test_main_ppo_composes_the_monitor_and_stops_on_a_bad_one(main_ppo, setup):
    good = main_ppo["good"]
    assert good.returncode == 0, good.stderr[-3000:]
    printed = OmegaConf.create(good.stdout)
    assert printed.probe.monitor.crosscoder == str(setup["cc"]) and printed.probe.monitor.every == 20
    bad = main_ppo["bad"]
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "error: the crosscoder was trained at layer 1, the feature monitor asked for layer 2" in bad.stderr
    assert "ray init kwargs" not in bad.stdout  # verl's run_ppo never started


# ---------------------------------------------------------------------------------------------
# runs: verl's trainer hooks and our worker, one process per rank, no Ray
# ---------------------------------------------------------------------------------------------

RUN = r'''
import json, os, sys
tests_dir, data_dir, out, spec = sys.argv[1:5]
spec = json.loads(spec)
sys.path.insert(0, tests_dir)
import torch
torch.set_num_threads(1)
import torch.distributed as dist
import _verl_cpu
_verl_cpu.use_cpu_platform()
dist.init_process_group("gloo")
from pathlib import Path
import verl
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.v1 import get_trainer_cls
from posttrain_probe.callbacks.verl.setup_hook import setup
from posttrain_probe.callbacks.verl.worker import ProbeActorRolloutRefWorker

setup()  # registers the probe trainer, as the Ray hook does in verl's TaskRunner


def config(*extra):
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            "+probe=on", f"actor_rollout_ref.model.path={data_dir}/model", *_verl_cpu.CPU_OVERRIDES,
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32", "actor_rollout_ref.actor.optim.lr=1e-2",
            f"data.train_files={data_dir}/train.parquet", f"data.val_files={data_dir}/train.parquet",
            "data.train_batch_size=2", "data.max_prompt_length=64", "data.max_response_length=16",
            "data.dataloader_num_workers=0", "trainer.total_epochs=1", f"trainer.n_gpus_per_node={dist.get_world_size()}",
            "algorithm.adv_estimator=grpo", "trainer.logger=[console]", *spec["probe"], *extra,
        ])


class ThisRank:
    """verl's RayWorkerGroup as the trainer uses it, over this process's worker: a call runs on it and returns
    [result] (every process runs the same calls, as ONE_TO_ALL does on every rank)."""

    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, name):
        method = getattr(self.worker, name)
        return lambda *args, **kwargs: [method(*args, **kwargs)]


class NoRollout:
    """Stands in for CheckpointEngineManager + rollout replicas (vLLM/SGLang need a GPU)."""

    def sleep_replicas(self):
        pass

    def update_weights(self, global_steps=None):
        pass


worker = ProbeActorRolloutRefWorker(config().actor_rollout_ref, role="actor")
worker.init_model()


def train_step():
    """One optimizer step of the actor's own engine (FSDP2 module, AdamW) on the probe prompts."""
    engine = worker.actor.engine
    with engine.train_mode():
        for batch in worker._probe.probe_batches():
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, use_cache=False).loss.backward()
        engine.optimizer_step()


def fit(name, last_step, *extra):
    """verl's set-up tail and fit loop, hook by hook (PPOTrainer._setup / fit, PPOTrainerSync), to last_step."""
    cfg = config(f"trainer.default_local_dir={out}/{name}", *extra)
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    trainer.actor_rollout_wg = ThisRank(worker)
    trainer.checkpoint_manager = NoRollout()
    trainer._load_checkpoint()
    start = trainer.global_steps
    trainer.on_init_end()
    trainer.curr_step_profile = False
    metrics = {}
    trainer.global_steps += 1
    while trainer.global_steps <= min(trainer.total_training_steps, last_step):  # fit's loop condition
        step, trainer.timing_raw = trainer.global_steps, {}
        is_last_step = step >= trainer.total_training_steps
        trainer.on_step_begin()
        trainer.on_sample_end()
        train_step()
        if trainer.config.trainer.save_freq > 0 and (is_last_step or step % trainer.config.trainer.save_freq == 0):
            trainer._save_checkpoint()
        trainer.on_step_end()
        metrics[step] = trainer._consume_sync_metrics()
        trainer.global_steps += 1
    log = Path(out, name, "probe", "monitor.jsonl")
    return {"start": start, "info": trainer.probe_info, "metrics": metrics, "total_steps": trainer.total_training_steps,
            "lines": log.read_text().splitlines() if log.exists() else None}


result = {}
for name, label, last_step, extra in spec["runs"]:
    result[label] = fit(name, last_step, *extra)
if dist.get_rank() == 0:
    Path(out, "result.json").write_text(json.dumps(result, indent=1, default=str))
dist.destroy_process_group()
'''

RUNS = [  # (run directory, label, last step, extra overrides)
    ["run", "first", 4, ["trainer.save_freq=3"]],  # interrupted after step 4; verl saved step 3
    ["run", "resumed", 6, ["trainer.save_freq=3"]],  # resumes from verl's step-3 checkpoint
    ["stop", "stop", 6, ["probe.monitor.every=1", "probe.monitor.max_fvu=0.0", "probe.monitor.stop_on_alert=true"]],
]


def _launch(setup, name: str, runs: list, *, nproc: int) -> tuple[Path, dict]:
    out = setup["root"] / name
    out.mkdir()
    script = out / "script.py"
    script.write_text(RUN)
    spec = {"probe": [*PROBE, f"probe.monitor.crosscoder={setup['cc']}"], "runs": runs}
    proc = torchrun(script, str(TESTS), str(setup["root"]), str(out), json.dumps(spec), nproc=nproc, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def ran(setup) -> tuple[Path, dict]:
    """The one-process runs of RUNS: (out dir, result.json)."""
    return _launch(setup, "one", RUNS, nproc=1)


def lines(result: dict) -> list[dict]:
    return [json.loads(line) for line in result["lines"]]


def assert_close(got: MonitorFigures, want: MonitorFigures, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal figures to float tolerance (NaN equals NaN); the top features may swap only at a near tie."""
    approx = lambda value: pytest.approx(value, rel=rtol, abs=atol, nan_ok=True)  # noqa: E731
    assert (got.n_tokens, got.n_active, got.n_suppressed) == (want.n_tokens, want.n_active, want.n_suppressed)
    assert got.mean_change == approx(want.mean_change) and got.fvu == approx(want.fvu)
    assert got.suppressed_fraction == approx(want.suppressed_fraction)
    assert got.category_change.keys() == want.category_change.keys()
    assert list(got.category_change.values()) == approx(list(want.category_change.values()))
    assert got.top_changes == approx(want.top_changes)
    assert got.top_features == want.top_features


def test_monitor_lines_equal_offline_figures_of_the_runs_activation_stores(ran):
    out, result = ran
    run = out / "run" / "probe"
    logged = read_monitor_log(run / "monitor.jsonl")
    assert sorted(logged) == [0, 2, 4, 6]
    assert all(set(line) == LINE_KEYS for line in lines(result["resumed"]))  # the TRL callback's line format
    crosscoder = Crosscoder.from_pretrained(str(out.parent / "cc"))
    _, base = read_store(run / "activations" / "step-000000" / f"layer{LAYER}")
    assert base["acts"].dtype == torch.float32 and logged[0].n_tokens == base["acts"].shape[0] > 100
    for step in (0, 2, 4, 6):
        _, live = read_store(run / "activations" / f"step-{step:06d}" / f"layer{LAYER}")
        assert_close(logged[step], monitor_figures(crosscoder, base["acts"], live["acts"], top_k=TOP_K))
    assert logged[0].mean_change == 0 and logged[0].n_suppressed == 0 and 0 < logged[0].fvu < 0.5
    assert logged[6].fvu > logged[0].fvu and logged[6].mean_change != 0  # training moved the actor's features
    assert set(logged[6].category_change) == {"base-only", "shared", "finetune-only"}
    assert result["first"]["info"]["monitor"] == {"layer": LAYER, "model": "base", "model_mismatch": None}


def test_monitor_figures_reach_verls_step_metrics(ran):
    _, result = ran
    first, logged = result["first"]["metrics"], {line["step"]: line for line in lines(result["resumed"])}
    # step 0 (the base) is logged with step 1 under base_ names, as the probe's own step-0 metrics
    assert first["1"]["monitor/base_fvu"] == pytest.approx(logged[0]["fvu"])
    assert "probe/base_activation_seconds" in first["1"] and "monitor/fvu" not in first["1"]
    for step in ("2", "4"):
        assert first[step]["monitor/fvu"] == pytest.approx(lines(result["first"])[int(step) // 2]["fvu"])
        assert first[step]["monitor/top1/feature"] == lines(result["first"])[int(step) // 2]["top_features"][0]
        assert {
            "monitor/mean_change",
            "monitor/change/shared",
            "monitor/suppressed_fraction",
            "monitor/seconds",
        } <= set(first[step])
    assert first["3"] == {}  # neither a snapshot nor a monitor step
    resumed = result["resumed"]["metrics"]
    assert resumed["6"]["monitor/fvu"] == pytest.approx(logged[6]["fvu"]) and "monitor/fvu" not in resumed["5"]
    assert "monitor/stop" not in resumed["6"]


def test_resume_continues_the_monitor_log_without_gaps_or_duplicates(ran):
    """Interrupted after step 4 (lines 0, 2, 4), resumed from verl's step-3 checkpoint: 0 and 2 kept as written,
    4 computed again (the same actor: verl restored weights and optimizer), 6 added."""
    _, result = ran
    first, resumed = lines(result["first"]), lines(result["resumed"])
    assert result["resumed"]["start"] == 3
    assert [line["step"] for line in first] == [0, 2, 4]
    assert [line["step"] for line in resumed] == [0, 2, 4, 6]
    assert resumed[:2] == first[:2]
    again = MonitorFigures.from_json(resumed[2])
    assert_close(again, MonitorFigures.from_json(first[2]), rtol=1e-4, atol=1e-5)


def test_alert_saves_a_checkpoint_and_stops_verls_loop(ran):
    out, result = ran
    stop = result["stop"]
    assert stop["total_steps"] == 1 and list(stop["metrics"]) == ["1"]  # fit's loop ended after step 1
    assert stop["metrics"]["1"]["monitor/stop"] == 1.0 and stop["metrics"]["1"]["monitor/fvu"] > 0
    assert [line["step"] for line in lines(stop)] == [0, 1]
    assert (out / "stop" / "global_step_1" / "actor").is_dir()  # saved although trainer.save_freq is off


@pytest.mark.slow
def test_two_ranks_reduce_to_the_one_rank_base_sums(setup, ran):
    """The base model on 2 ranks (FSDP2, probe set split 2 + 1 batches and a padding round): the all-reduced
    sums in monitor_base.safetensors and the step-0 line equal the one-process run's."""
    one, _ = ran
    two, result = _launch(setup, "two", [["run", "base", 0, []]], nproc=2)
    assert result["base"]["metrics"] == {} and len(lines(result["base"])) == 1

    def sums(out: Path) -> torch.Tensor:
        with safe_open(str(out / "run" / "probe" / "monitor_base.safetensors"), "pt") as handle:
            return handle.get_tensor("sums")

    torch.testing.assert_close(sums(two), sums(one), rtol=1e-6, atol=1e-6)
    base_one = read_monitor_log(one / "run" / "probe" / "monitor.jsonl")[0]
    base_two = read_monitor_log(two / "run" / "probe" / "monitor.jsonl")[0]
    assert_close(base_two, base_one, rtol=1e-6, atol=1e-7)
    assert json.loads((two / "run" / "probe" / "probe.json").read_text())["world_size"] == 2
