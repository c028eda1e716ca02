"""Load a crosscoder with a clear error and summarise it (``posttrain-probe crosscoder info``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError


def load_crosscoder(path: str | os.PathLike, *, device: str | None = None) -> Crosscoder:
    """``Crosscoder.from_pretrained(path)`` with a ProbeError when ``path`` holds no crosscoder."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ProbeError(f"{path} holds no crosscoder: expected config.json and model.safetensors")
    try:
        model = Crosscoder.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise ProbeError(f"cannot load the crosscoder in {path}: {err}") from err
    return model.to(device) if device else model


def crosscoder_summary(path: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready facts about the crosscoder in ``path`` and, if present, its training run."""
    cc = load_crosscoder(path)
    norms = cc.W_dec.detach().norm(dim=-1)  # [F, N]
    info: dict[str, Any] = {
        "path": str(path),
        "models": cc.model_names,
        "layer": cc.config.layer,
        "d_model": cc.config.d_model,
        "n_features": cc.config.n_features,
        "activation": cc.config.activation + (f" (k={cc.config.k})" if cc.config.activation == "batchtopk" else ""),
        "scales": [round(v, 6) for v in cc.scales.tolist()],
        "zero_decoder_features": int((norms.sum(-1) == 0).sum()),
    }
    metrics = Path(path) / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            info.update(
                steps=last["step"], tokens=last["tokens"], loss=round(last["loss"], 6),
                fvu={name: round(v, 4) for name, v in zip(cc.model_names, last["fvu"])},
                l0=round(last["l0"], 2), dead_fraction=round(last["dead_fraction"], 4),
            )
    return info
