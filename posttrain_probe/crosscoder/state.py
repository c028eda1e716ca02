"""Training state on disk as safetensors + JSON (no pickle): optimizer, RNG, counters.

``trainer_state/step-NNNNNNNN/`` holds one complete state; ``trainer_state/latest.json`` names the
newest and is replaced atomically after the directory is complete, so a killed run always
resumes from a whole state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from posttrain_probe.errors import ProbeError

LATEST = "latest.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_tensors`: restore the optimizer state exactly."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # the implementation flags are this optimizer's, not the saved ones (a state saved on a CPU, or before fused
    # Adam was used on GPUs, says fused=None): they decide where the step counters go and how steps are scaled
    flags = ("fused", "foreach", "capturable", "differentiable")
    groups = [
        {**saved, **{key: group[key] for key in flags if key in group}}
        for saved, group in zip(meta["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(
    root: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    counters: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write the state of ``step`` under ``root/step-NNNNNNNN`` and point ``root/latest.json`` at it.

    Older step directories beyond the newest ``keep`` are removed afterwards.
    """
    root = Path(root)
    target = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in counters.items()}, str(tmp / "counters.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **meta}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(json.dumps({"step": step, "dir": target.name}))
        os.replace(pointer, root / LATEST)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ProbeError(f"disk error while writing the training state to {root}: {err}") from err
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_state(root: str | os.PathLike) -> dict[str, Any] | None:
    """The newest complete state under ``root`` (None when there is none) as a dict with
    ``step``, ``model``, ``optimizer`` (tensors), ``counters``, ``rng`` and the JSON ``meta``."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    target = root / json.loads(pointer.read_text())["dir"]
    try:
        meta = json.loads((target / "state.json").read_text())
        return {
            "step": int(meta["step"]),
            "meta": meta,
            "model": load_file(str(target / "model.safetensors")),
            "optimizer": load_file(str(target / "optimizer.safetensors")),
            "counters": load_file(str(target / "counters.safetensors")),
            "rng": load_file(str(target / "rng.safetensors")),
        }
    except (OSError, ValueError, KeyError) as err:
        raise ProbeError(f"cannot read the training state in {target}: {err}") from err


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Put back the CPU (and, where saved and present, CUDA) RNG states."""
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
