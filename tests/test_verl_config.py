"""``+probe=on`` / ``+probe=on_ckpt`` composed with verl 0.9.1's real ppo_trainer config.

Through Hydra's compose API (with our search-path plugin found the way Hydra finds plugins: the
``hydra_plugins`` namespace package of the installed posttrain-probe) and through verl's own entry
point ``python -m verl.trainer.main_ppo`` (``--cfg job``, and a real start that our Hydra callback
stops before verl starts Ray).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from posttrain_probe.callbacks.arguments import ProbeArguments  # noqa: E402
from posttrain_probe.callbacks.verl.config import (  # noqa: E402
    CHECKPOINT_CALLBACK,
    PROBE_TRAINER_MODE,
    SETUP_HOOK,
    VerlProbeConfig,
    check_job_config,
    probe_keys,
    resolve_run_dir,
)
from posttrain_probe.errors import ProbeError  # noqa: E402

VERL_CONFIG = str(Path(__import__("verl").__file__).parent / "trainer" / "config")


def compose_verl(*overrides: str, hydra: bool = False):
    """verl's ppo_trainer config with ``overrides`` (the compose API main_ppo's @hydra.main uses)."""
    with initialize_config_dir(config_dir=VERL_CONFIG, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides), return_hydra_config=hydra)


REPO = Path(__file__).resolve().parents[1]
MAIN_PPO = [sys.executable, "-m", "verl.trainer.main_ppo"]
MAIN_PPO_RUNS = {
    "good": (*MAIN_PPO, "+probe=on", "probe.layers=[18]", "--cfg", "job"),
    "bad_key": (*MAIN_PPO, "+probe=on", "probe.bogus=1", "--cfg", "job"),
    "bad_mode": (*MAIN_PPO, "+probe=on", "trainer.v1.trainer_mode=colocate_async"),
    # the verl recipe composes (its data step is skipped: TRAIN_FILES is given)
    "recipe": ("bash", str(REPO / "recipes" / "verl" / "grpo_qwen3_4b.sh"), "--cfg", "job"),
}


@pytest.fixture(scope="module")
def main_ppo(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``python -m verl.trainer.main_ppo`` with each of MAIN_PPO_RUNS, started together (each spends
    most of its time importing verl), in a temporary directory (Hydra writes outputs/ there)."""
    cwd = tmp_path_factory.mktemp("main_ppo")
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "0",
        "TRAIN_FILES": "/data/train.parquet",
        "VAL_FILES": "/data/val.parquet",
    }
    procs = {
        name: subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        for name, args in MAIN_PPO_RUNS.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


@pytest.fixture(scope="module")
def on():
    return compose_verl("+probe=on", hydra=True)


# -- composition -----------------------------------------------------------------------------
def test_probe_on_adds_probe_keys_and_selects_the_probe_trainer(on):
    assert OmegaConf.to_container(on.probe) == VerlProbeConfig().to_dict()
    assert list(on.probe) == probe_keys()
    assert on.trainer.v1.trainer_mode == PROBE_TRAINER_MODE
    assert on.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == SETUP_HOOK
    assert on.ray_kwargs.ray_init.runtime_env.py_executable is None  # verl's own key is kept
    assert on.hydra.callbacks.posttrain_probe._target_ == "posttrain_probe.callbacks.verl.config.ProbeConfigCheck"
    plain = compose_verl()
    assert "probe" not in plain and plain.trainer.v1.trainer_mode == "sync"
    # everything else is verl's config unchanged
    for key in ("actor_rollout_ref", "data", "algorithm", "critic", "reward"):
        assert OmegaConf.to_container(on[key]) == OmegaConf.to_container(plain[key]), key
    assert check_job_config(on) == VerlProbeConfig()


def test_probe_on_ckpt_uses_documented_verl_keys():
    cfg = compose_verl("+probe=on_ckpt", "trainer.save_freq=10")
    assert cfg.probe.mode == "on_ckpt"
    assert cfg.trainer.checkpoint_callback_class == CHECKPOINT_CALLBACK
    assert list(cfg.actor_rollout_ref.actor.checkpoint.save_contents) == ["model", "optimizer", "extra", "hf_model"]
    assert cfg.trainer.v1.trainer_mode == "sync"  # verl's own trainer, any mode
    assert check_job_config(cfg).mode == "on_ckpt"


def test_user_overrides_win_over_the_probe_config():
    cfg = compose_verl(
        "+probe=on", "probe.layers=[3,5]", "probe.n_docs=16", "probe.dataset=/data/probe.parquet", "probe.snapshot_at=[10,20]",
        "ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=my.hook", "trainer.v1.trainer_mode=colocate_async",
    )  # fmt: skip
    assert list(cfg.probe.layers) == [3, 5] and cfg.probe.n_docs == 16 and cfg.probe.dataset == "/data/probe.parquet"
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "my.hook"
    assert cfg.trainer.v1.trainer_mode == "colocate_async"
    ckpt = compose_verl(
        "+probe=on_ckpt", "trainer.save_freq=5", "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]"
    )
    assert list(ckpt.actor_rollout_ref.actor.checkpoint.save_contents) == ["model", "hf_model"]


def test_run_dir_defaults_to_the_checkpoint_dir(on, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(VerlProbeConfig(), on) == str(tmp_path / "checkpoints" / "verl_examples" / "gsm8k" / "probe")
    assert resolve_run_dir(VerlProbeConfig(run_dir="runs/p"), on) == str(tmp_path / "runs" / "p")


# -- bad input -------------------------------------------------------------------------------
def test_unknown_probe_key_is_rejected_naming_the_valid_keys():
    with pytest.raises(ConfigCompositionException) as info:
        compose_verl("+probe=on", "probe.bogus=1")
    message = str(info.value.__cause__)
    assert "Key 'bogus' not in" in message and all(key in message for key in probe_keys())
    # '+probe.bogus=1' is let through by Hydra (it opens the node to add keys): the check names them too
    cfg = compose_verl("+probe=on", "+probe.bogus=1")
    with pytest.raises(
        ProbeError, match="unknown probe key\\(s\\) probe.bogus: valid keys are mode, run_dir, snapshot_fraction"
    ):
        check_job_config(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("probe.n_docs=abc", "could not be converted to Integer"),
        ("probe.layers=[a]", "could not be converted to Integer"),
        ("probe.save_snapshots=maybe", "is not a valid bool"),
    ],
)
def test_garbage_types_fail_while_composing(override, expected):
    with pytest.raises(ConfigCompositionException) as info:
        compose_verl("+probe=on", override)
    assert expected in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("probe.layers=[3,-1]", "probe.layers [-1] are not sites: expected integers >= 0"),
        ("probe.snapshot_fraction=0", "probe.snapshot_fraction must be in (0, 1], got 0"),
        ("probe.snapshot_steps=0", "probe.snapshot_steps must be >= 1, got 0"),
        ("probe.snapshot_at=[0,5]", "probe.snapshot_at must hold optimizer steps >= 1"),
        ("probe.n_docs=0", "probe.n_docs must be >= 1, got 0"),
        ("probe.seq_len=-4", "probe.seq_len must be >= 1, got -4"),
        ("probe.dtype=int8", "unsupported activation dtype 'int8'"),
        ("probe.mode=sometimes", "probe.mode must be one of on, on_ckpt, got 'sometimes'"),
    ],
)
def test_bad_values_are_rejected_before_the_run(override, expected):
    cfg = compose_verl("+probe=on", override)
    with pytest.raises(ProbeError) as info:
        check_job_config(cfg)
    assert expected in str(info.value)


def test_from_dict_checks_types_of_plain_values():
    with pytest.raises(ProbeError, match=r"probe.n_docs='12' has the wrong type: expected int"):
        VerlProbeConfig.from_dict({"n_docs": "12"})
    with pytest.raises(ProbeError, match=r"probe.layers=\[1.5\] has the wrong type: expected a list of int"):
        VerlProbeConfig.from_dict({"layers": [1.5]})
    assert VerlProbeConfig.from_dict({"layers": [2], "snapshot_fraction": 1}).to_probe_arguments().probe_layers == [2]


def test_trainer_mode_other_than_probe_is_an_error_not_a_silent_off():
    with pytest.raises(
        ProbeError, match="\\+probe=on runs with verl's synchronous trainer only.*colocate_async.*\\+probe=on_ckpt"
    ):
        check_job_config(compose_verl("+probe=on", "trainer.v1.trainer_mode=colocate_async"))
    with pytest.raises(
        ProbeError,
        match="trainer.v1.trainer_mode=sync selects verl's plain sync trainer and would switch the probe off",
    ):
        check_job_config(compose_verl("+probe=on", "trainer.v1.trainer_mode=sync"))
    with pytest.raises(ProbeError, match="trainer.use_v1=true"):
        check_job_config(compose_verl("+probe=on", "trainer.use_v1=false"))


def test_on_ckpt_needs_saves_with_the_hf_model():
    with pytest.raises(ProbeError, match="trainer.save_freq=-1 saves none: set trainer.save_freq=N"):
        check_job_config(compose_verl("+probe=on_ckpt"))
    with pytest.raises(ProbeError, match="needs hf_model in actor_rollout_ref.actor.checkpoint.save_contents"):
        check_job_config(
            compose_verl(
                "+probe=on_ckpt", "trainer.save_freq=5", "actor_rollout_ref.actor.checkpoint.save_contents=[model]"
            )
        )
    with pytest.raises(ProbeError, match="set trainer.save_freq instead of probe.snapshot_steps"):
        check_job_config(compose_verl("+probe=on_ckpt", "trainer.save_freq=5", "probe.snapshot_steps=3"))
    with pytest.raises(ProbeError, match="needs trainer.checkpoint_callback_class="):
        check_job_config(
            compose_verl("+probe=on_ckpt", "trainer.save_freq=5", "trainer.checkpoint_callback_class=null")
        )


def test_probe_keys_mirror_probe_arguments():
    """Every probe.* key except mode and the monitor node is a ProbeArguments field (``probe_`` + key) with the same default."""
    ours = {f.name: f for f in dataclasses.fields(VerlProbeConfig) if f.name not in ("mode", "monitor")}
    theirs = {f.name: f for f in dataclasses.fields(ProbeArguments)}
    for name, f in ours.items():
        other = theirs[f"probe_{name}"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        other_default = other.default_factory() if other.default is dataclasses.MISSING else other.default
        assert default == other_default, name
    assert set(theirs) - {f"probe_{name}" for name in ours} == {"probe", "probe_peft_snapshot"}


# -- verl's own command line -----------------------------------------------------------------
@pytest.mark.slow
def test_main_ppo_cfg_job_and_bad_key(main_ppo):
    good = main_ppo["good"]
    assert good.returncode == 0, good.stderr[-3000:]
    printed = OmegaConf.create(good.stdout)
    assert list(printed.probe.layers) == [18] and printed.trainer.v1.trainer_mode == PROBE_TRAINER_MODE
    bad = main_ppo["bad_key"]
    assert bad.returncode != 0
    assert "Key 'bogus' not in" in bad.stderr and all(key in bad.stderr for key in probe_keys())


@pytest.mark.slow
def test_main_ppo_stops_before_ray_on_a_bad_config(main_ppo):
    proc = main_ppo["bad_mode"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: +probe=on runs with verl's synchronous trainer only" in proc.stderr
    assert "ray init kwargs" not in proc.stdout  # verl's run_ppo never started


@pytest.mark.slow
def test_verl_recipe_has_the_paper_grpo_hyperparameters(main_ppo):
    """recipes/verl/grpo_qwen3_4b.sh: docs/methods.md sec. 10 in verl's own keys, plus +probe=on."""
    proc = main_ppo["recipe"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(proc.stdout)
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.use_kl_in_reward is False
    assert actor.optim.lr == 1e-6 and cfg.data.train_batch_size == 128 and actor.ppo_mini_batch_size == 64
    assert rollout.n == 8 and rollout.name == "vllm" and cfg.data.max_response_length == 16384
    assert actor.use_kl_loss is False and actor.entropy_coeff == 0
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert cfg.trainer.total_epochs == 1 and actor.ppo_epochs == 1
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen3-4B-Base" and cfg.data.train_files == "/data/train.parquet"
    assert (
        cfg.trainer.v1.trainer_mode == PROBE_TRAINER_MODE
        and list(cfg.probe.layers) == [18]
        and cfg.probe.snapshot_fraction == 0.2
    )
    assert cfg.reward.custom_reward_function.path == str(REPO / "recipes" / "verl" / "math_reward.py")
    check_job_config(cfg)


def test_recipe_reward_is_math_verify_on_the_final_answer():
    pytest.importorskip("math_verify")
    import importlib.util

    spec = importlib.util.spec_from_file_location("math_reward", REPO / "recipes" / "verl" / "math_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score("math", "so 3 + 4 = 7, the answer is \\boxed{7}.", "7") == 1.0
    assert module.compute_score("math", "the answer is \\boxed{\\frac{14}{2}}", "7") == 1.0
    assert module.compute_score("math", "the answer is \\boxed{8}.", "7") == 0.0
