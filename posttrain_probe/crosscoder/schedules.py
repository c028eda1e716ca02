"""The paper's training schedules (docs/methods.md sec. 3): the learning rate and the sparsity coefficient λ per step."""

from __future__ import annotations


def lr_factor(step: int, total: int, decay_fraction: float) -> float:
    """Learning-rate multiplier: 1, then linear to 0 over the last ``decay_fraction`` of ``total`` steps."""
    decay_start = total * (1 - decay_fraction)
    if step < decay_start or decay_fraction == 0:
        return 1.0
    return max(0.0, (total - step) / (total - decay_start))


def l1_factor(step: int, total: int, warmup_fraction: float) -> float:
    """λ multiplier: linear from 0 to 1 over the first ``warmup_fraction`` of ``total`` steps."""
    warmup = total * warmup_fraction
    return 1.0 if warmup == 0 else min(1.0, step / warmup)
