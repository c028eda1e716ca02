"""The end of a distributed command: the CLI and the recipe scripts destroy the default process group after
their work succeeded (gloo's threads alive at interpreter exit abort the process now and then: SIGABRT,
"terminate called without an active exception", seen in CI under torchrun), and leave it alone on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _distributed import one_process_env

REPO = Path(__file__).resolve().parents[1]

# A one-process gloo group, as torchrun's environment would give it, then the command under test; prints
# whether the group is still there afterwards.
HARNESS = textwrap.dedent(
    """
    import json, runpy, sys
    import torch.distributed as dist

    dist.init_process_group("gloo")
    kind, args = sys.argv[1], sys.argv[2:]
    outcome = "ok"
    if kind == "helper":
        from posttrain_probe.process_group import end_process_group

        if args == ["vllm"]:  # vLLM loaded (TRL's colocate mode): its groups are its own to tear down
            sys.modules["vllm"] = type(sys)("vllm")
        outcome = [end_process_group(), end_process_group()]
    elif kind == "cycle":  # a finished DDP wrapper in a reference cycle (a trainer and its callbacks) holds the group
        import gc, weakref
        import torch
        from posttrain_probe.process_group import end_process_group

        gc.disable()  # only an explicit collection frees the cycle
        holder = {"ddp": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))}
        holder["self"] = holder
        ref, group_when_freed = weakref.ref(holder["ddp"]), []
        weakref.finalize(holder["ddp"], lambda: group_when_freed.append(dist.is_initialized()))
        del holder
        alive = ref() is not None
        outcome = [alive, end_process_group(), ref() is None, group_when_freed]
    elif kind == "cli":
        from posttrain_probe.cli import app

        try:
            outcome = app(args, standalone_mode=False)  # None after success, the exit code after a user error
        except Exception as err:
            outcome = type(err).__name__
    else:
        sys.argv = [kind, *args]
        runpy.run_module(kind, run_name="__main__", alter_sys=True)
    print(json.dumps({"outcome": outcome, "initialized": dist.is_initialized()}))
    """
)


def _run(tmp_path: Path, *args: str) -> dict:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    env = {
        **os.environ,
        **one_process_env(),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_end_process_group_without_a_group_does_nothing():
    from posttrain_probe.process_group import end_process_group

    assert end_process_group() is False


def test_end_process_group_destroys_the_group_once(tmp_path):
    assert _run(tmp_path, "helper") == {"outcome": [True, False], "initialized": False}


def test_end_process_group_frees_unreachable_holders_of_the_group_first(tmp_path):
    # freed while the group still existed: collected first, then the group destroyed
    assert _run(tmp_path, "cycle") == {"outcome": [True, True, True, [True]], "initialized": False}


def test_end_process_group_leaves_the_group_to_vllm(tmp_path):
    assert _run(tmp_path, "helper", "vllm") == {"outcome": [False, False], "initialized": True}


def test_a_cli_command_ends_the_group_after_success_only(tmp_path):
    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder

    cc = tmp_path / "cc"
    Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=8, n_features=16, layer=1)).save_pretrained(cc)
    assert _run(tmp_path, "cli", "crosscoder", "info", str(cc)) == {"outcome": None, "initialized": False}
    failed = _run(tmp_path, "cli", "crosscoder", "info", str(tmp_path / "missing"))
    assert failed["outcome"] not in ("ok", None) and failed["initialized"] is True


def test_a_recipe_script_ends_the_group(tmp_path):
    """`accelerate launch -m posttrain_probe.recipes.sft ...` runs the module as __main__: the tiny SFT trains
    in the group, then the script destroys it."""
    config = REPO / "recipes" / "configs" / "tiny" / "sft.yaml"
    out = tmp_path / "out"
    args = ("--config", str(config), "--output_dir", str(out), "--max_steps", "4")
    assert _run(tmp_path, "posttrain_probe.recipes.sft", *args) == {"outcome": "ok", "initialized": False}
    assert (out / "model.safetensors").exists()
