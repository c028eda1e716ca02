"""Choosing BatchTopK's k: train one crosscoder per k on the same data and score each on held-out activations.

    crosscoder_sweep_k(SweepKConfig(acts=["runs/acts"], held_out_acts=["runs/acts_val"], k_values=[8, 16, 32], out="runs/sweep",
                                    training=CrosscoderTrainingConfig(n_tokens=50_000_000)))
    posttrain-probe crosscoder sweep-k --acts runs/acts --held-out-acts runs/acts_val --k-values 8 --k-values 16 --k-values 32 --out runs/sweep

Reading the table: FVU falls as k grows; past the data's own sparsity it falls slowly while the
dictionary gets worse (latents split and mix; tests/test_crosscoder_quality.py shows it on planted
data). Take the smallest k after which held-out FVU stops improving much, and a k whose dead
fraction is low.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.crosscoder.config import SweepKConfig
from posttrain_probe.errors import ProbeError

SWEEP_FILE = "sweep.json"


class SweepRow(NamedTuple):
    """One k of a sweep, scored on the held-out tokens."""

    k: int
    fvu: list[float]
    """Held-out FVU per model (slot order)."""
    train_l0: float
    """Mean L0 in the last logged training steps (k by construction, fewer if fewer scores are positive)."""
    inference_l0: float
    """Held-out mean L0 of the inference codes (calibrated threshold)."""
    dead_fraction: float
    """Fraction of latents that fire on none of the held-out tokens."""
    run: str
    """The crosscoder run directory."""


class SweepResult(NamedTuple):
    """Result of :func:`crosscoder_sweep_k`: one :class:`SweepRow` per k, ascending."""

    model_names: list[str]
    rows: list[SweepRow]
    held_out_tokens: int
    out: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "model_names": self.model_names,
            "held_out_tokens": self.held_out_tokens,
            "rows": [row._asdict() for row in self.rows],
        }

    def write(self, out) -> dict[str, Path]:
        """Write ``sweep.json`` into ``out``; returns ``{"sweep": path}``."""
        path = Path(out) / SWEEP_FILE
        path.write_text(json.dumps(self.to_json(), indent=2))
        return {"sweep": path}

    @classmethod
    def read(cls, out) -> SweepResult:
        """The sweep in ``out`` (its ``sweep.json``); ProbeError when there is none."""
        path = Path(out) / SWEEP_FILE
        if not path.exists():
            raise ProbeError(f"{out} holds no k sweep: expected {SWEEP_FILE}")
        data = json.loads(path.read_text())
        rows = [SweepRow(**row) for row in data["rows"]]
        return cls(data["model_names"], rows, data["held_out_tokens"], Path(out))

    def table(self) -> str:
        """The rows as an aligned text table."""
        head = f"{'k':>5} | {'FVU ' + '/'.join(self.model_names):>24} | {'train L0':>8} | {'inf. L0':>8} | {'dead':>6}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            fvu = "/".join(f"{v:.4f}" for v in r.fvu)
            lines.append(
                f"{r.k:>5} | {fvu:>24} | {r.train_l0:>8.1f} | {r.inference_l0:>8.1f} | {r.dead_fraction:>6.1%}"
            )
        return "\n".join(lines)


@torch.no_grad()
def _score(crosscoder, held_out: torch.Tensor, batch_size: int = 4096) -> tuple[list[float], float, float]:
    """Held-out FVU per model [N], mean inference L0 and the fraction of latents that never fire."""
    device = crosscoder.W_enc.device
    n = held_out.shape[0]
    sq_err = torch.zeros(crosscoder.n_models, dtype=torch.float64)
    sums = torch.zeros(crosscoder.n_models, crosscoder.config.d_model, dtype=torch.float64)
    sq_norms = torch.zeros(crosscoder.n_models, dtype=torch.float64)
    fired = torch.zeros(crosscoder.config.n_features, dtype=torch.bool, device=device)
    active = 0
    for start in range(0, n, batch_size):
        x = held_out[start : start + batch_size].to(device, crosscoder.W_enc.dtype)
        codes = crosscoder.encode(x)
        xn = crosscoder.normalize(x).double()
        sq_err += (xn - crosscoder.normalize(crosscoder.decode(codes)).double()).pow(2).sum(dim=(0, 2)).cpu()
        sums += xn.sum(0).cpu()
        sq_norms += xn.pow(2).sum(dim=(0, 2)).cpu()
        fired |= (codes > 0).any(0)
        active += int((codes > 0).sum())
    variance = sq_norms - sums.pow(2).sum(-1) / n  # sum over tokens of ||x - mean||², per model
    fvu = (sq_err / variance.clamp_min(1e-12)).tolist()
    return fvu, active / n, float((~fired).float().mean())


def crosscoder_sweep_k(config: SweepKConfig, *, source=None, held_out=None, progress: bool = True) -> SweepResult:
    """Train a BatchTopK crosscoder for every k of ``config.k_values`` (same data, seed and settings; runs in
    ``config.out/k<k>``) and score each on the held-out activations; writes ``sweep.json``.

    ``source`` / ``held_out``: already opened activation sources (or a [T, N, d] tensor for
    ``held_out``) instead of ``config.acts`` / ``config.held_out_acts``. The first
    ``held_out_tokens`` held-out tokens are scored: FVU per model, inference L0 (the calibrated
    threshold) and the fraction of latents that fire on none of them.
    """
    from posttrain_probe.crosscoder.sources import open_source
    from posttrain_probe.crosscoder.train import train_crosscoder

    if source is None:
        if not config.acts:
            raise ProbeError("a k sweep needs training activations: --acts DIR (or source=)")
        source = open_source(
            acts=config.acts, layer=config.crosscoder.layer, model_names=config.crosscoder.model_names or None
        )
    if held_out is None:
        if not config.held_out_acts:
            raise ProbeError(
                "a k sweep needs held-out activations: --held-out-acts DIR (e.g. `collect` on another split)"
            )
        held_out = open_source(
            acts=config.held_out_acts, layer=config.crosscoder.layer, model_names=config.crosscoder.model_names or None
        )
    if not isinstance(held_out, torch.Tensor):
        if list(held_out.model_names) != list(source.model_names):
            raise ProbeError(
                f"held-out activations are of models {held_out.model_names}, the training ones of {source.model_names}"
            )
        parts, count = [], 0
        for batch in held_out.iter_batches(min(4096, config.held_out_tokens), shuffle=False, epochs=1):
            parts.append(batch[: config.held_out_tokens - count])
            count += parts[-1].shape[0]
            if count >= config.held_out_tokens:
                break
        held_out = torch.cat(parts)
    held_out = held_out[: config.held_out_tokens]
    rows = []
    for k in config.k_values:
        run_dir = config.out / f"k{k}"
        crosscoder = train_crosscoder(
            source,
            replace(config.crosscoder, k=k),
            config.training,
            run_dir,
            overwrite=config.overwrite,
            progress=progress,
        ).eval()
        if held_out.shape[1:] != (crosscoder.n_models, crosscoder.config.d_model):
            raise ProbeError(
                f"held-out activations [T, N, d] = {tuple(held_out.shape)} do not match the crosscoder's "
                f"{crosscoder.n_models} models of width {crosscoder.config.d_model}"
            )
        fvu, inference_l0, dead = _score(crosscoder, held_out)
        summary = json.loads((run_dir / "training_status.json").read_text()).get("summary", {})
        rows.append(SweepRow(k, fvu, float(summary.get("train_l0", float("nan"))), inference_l0, dead, str(run_dir)))
    result = SweepResult(list(source.model_names), rows, int(held_out.shape[0]), config.out)
    config.out.mkdir(parents=True, exist_ok=True)
    result.write(config.out)
    return result
