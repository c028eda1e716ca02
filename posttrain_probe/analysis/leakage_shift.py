"""Part 1 of the leakage analysis (docs/methods.md sec. 9, paper S E.1): how much every feature's activation moved.

For every feature i of the blocking crosscoder's branch m, the per-source code f_i^m (docs/methods.md sec. 3) of
the base model's and of the blocked model's activations on the same tokens (:func:`feature_shift` ->
:class:`FeatureShift`), and :func:`relative_change`. Code units: the crosscoder's per-source codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain_probe.errors import ProbeError

_ENCODE_TOKENS = 1024
"""Tokens encoded at once (bounds the [tokens, F] code tensors)."""

# -- the formula ------------------------------------------------------------------------------------


def relative_change(abs_change_sum: torch.Tensor, base_sum: torch.Tensor) -> torch.Tensor:
    """Relative change of feature activations, docs/methods.md sec. 9 leakage (paper S E.1), per feature:
    sum_x |f_i(blocked, x) - f_i(base, x)| / sum_x |f_i(base, x)|.

    Args:
        abs_change_sum: ``[F]`` sum over tokens of |f_i^blocked - f_i^base| (code units).
        base_sum: ``[F]`` sum over the same tokens of |f_i^base| (code units; codes are >= 0).

    Returns:
        ``[F]`` float64, unitless; 0 = unchanged, 1 = moved as much as its whole base activation. NaN where
        the feature never fires on the base model's tokens (no base activation to compare with).
    """
    abs_change_sum = torch.as_tensor(abs_change_sum, dtype=torch.float64)
    base_sum = torch.as_tensor(base_sum, dtype=torch.float64)
    if abs_change_sum.shape != base_sum.shape or abs_change_sum.ndim != 1:
        raise ProbeError(
            f"abs_change_sum {tuple(abs_change_sum.shape)} and base_sum {tuple(base_sum.shape)} must both be [F]"
        )
    return torch.where(
        base_sum > 0,
        abs_change_sum / base_sum.clamp_min(torch.finfo(torch.float64).tiny),
        torch.full_like(base_sum, math.nan),
    )


# -- accumulation over tokens -----------------------------------------------------------------------


@dataclass
class FeatureShift:
    """Per-feature sums of per-source codes over the tokens seen (code units, float64, CPU)."""

    n_tokens: int
    """Tokens the sums run over."""
    base_sum: torch.Tensor
    """[F] sum_x f_i(base activations)."""
    blocked_sum: torch.Tensor
    """[F] sum_x f_i(blocked activations)."""
    abs_change_sum: torch.Tensor
    """[F] sum_x |f_i(blocked) - f_i(base)|."""
    base_active: torch.Tensor
    """[F] int64 tokens where f_i(base) > 0."""
    blocked_active: torch.Tensor
    """[F] int64 tokens where f_i(blocked) > 0."""

    @property
    def relative_change(self) -> torch.Tensor:
        """[F] :func:`relative_change` of these sums."""
        return relative_change(self.abs_change_sum, self.base_sum)


@torch.no_grad()
def feature_shift(crosscoder, chunks, model: str | int = "base") -> FeatureShift:
    """Sum the per-source codes f^m (branch ``model``) of paired activations over tokens.

    ``chunks`` yields ``[n, 2, d]`` raw activations of the same n tokens: slot 0 from the base model, slot 1
    from the blocked model (e.g. :meth:`LiveActivations.chunks` over ``{"base": ..., "blocked": ...}``).
    Both are encoded with the same branch's encoder (docs/methods.md sec. 3: act(W_enc^m s_m a + b_enc)). The crosscoder is
    moved to the activations' device.
    """
    slot = crosscoder.model_index(model)
    n_features, d_model = crosscoder.config.n_features, crosscoder.config.d_model
    sums: dict[str, torch.Tensor] | None = None
    n_tokens = 0
    for chunk in chunks:
        if chunk.ndim != 3 or chunk.shape[1] != 2 or chunk.shape[2] != d_model:
            raise ProbeError(
                f"expected paired activations [tokens, 2, {d_model}] (base, blocked), got {tuple(chunk.shape)}"
            )
        device = chunk.device
        if sums is None:
            crosscoder.to(device)
            sums = {
                name: torch.zeros(n_features, dtype=torch.float64, device=device)
                for name in ("base", "blocked", "change")
            }
            sums.update(
                {
                    name: torch.zeros(n_features, dtype=torch.long, device=device)
                    for name in ("base_active", "blocked_active")
                }
            )
        for start in range(0, chunk.shape[0], _ENCODE_TOKENS):
            part = chunk[start : start + _ENCODE_TOKENS].to(crosscoder.W_enc.dtype)
            f_base = crosscoder.encode_source(part[:, 0], slot)
            f_blocked = crosscoder.encode_source(part[:, 1], slot)
            sums["base"] += f_base.sum(0, dtype=torch.float64)
            sums["blocked"] += f_blocked.sum(0, dtype=torch.float64)
            sums["change"] += (f_blocked - f_base).abs().sum(0, dtype=torch.float64)
            sums["base_active"] += (f_base > 0).sum(0)
            sums["blocked_active"] += (f_blocked > 0).sum(0)
            n_tokens += part.shape[0]
    if sums is None or n_tokens == 0:
        raise ProbeError(
            "no tokens to compare: the dataset gave no activations (after dropping the first position, BOS and padding)"
        )
    cpu = {name: value.cpu() for name, value in sums.items()}
    return FeatureShift(n_tokens, cpu["base"], cpu["blocked"], cpu["change"], cpu["base_active"], cpu["blocked_active"])


def group_stats(shift: FeatureShift, mask: torch.Tensor) -> dict[str, Any]:
    """Summary of the relative change over the features selected by ``mask`` [F] (JSON-ready): counts, median, mean,
    pooled (summed over the group's features active on base) and the mean activations."""
    rel = shift.relative_change
    active = mask & (shift.base_sum > 0)
    values = rel[active].numpy()
    base_total = float(shift.base_sum[active].sum())
    stats: dict[str, Any] = {
        "n_features": int(mask.sum()),
        "n_active_on_base": int(active.sum()),
        "median": float(np.median(values)) if values.size else math.nan,
        "mean": float(values.mean()) if values.size else math.nan,
        "pooled": float(shift.abs_change_sum[active].sum()) / base_total if base_total > 0 else math.nan,
        "mean_activation_base": float(shift.base_sum[mask].sum()) / max(shift.n_tokens, 1) / max(int(mask.sum()), 1),
        "mean_activation_blocked": float(shift.blocked_sum[mask].sum())
        / max(shift.n_tokens, 1)
        / max(int(mask.sum()), 1),
    }
    return stats


def ratio_or_nan(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or either is not finite."""
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
