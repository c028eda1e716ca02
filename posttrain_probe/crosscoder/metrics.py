"""What crosscoder training measures: metric sums between log steps, non-finite inputs, and the quality
warnings of a finished run."""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.errors import ProbeError


class MetricSums:
    """Per-step metrics summed on the device; read (one sync) at log steps."""

    def __init__(self, n_models: int, device) -> None:
        self.device = device
        self.reset(n_models)

    def reset(self, n_models: int) -> None:
        """Start a new logging interval for ``n_models`` models (zeroed sums, on the training device)."""
        self.scalars = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, mse, sparsity, l0
        self.fvu = torch.zeros(n_models, device=self.device, dtype=torch.float64)
        self.count = 0

    def add(self, out) -> None:
        """Add one step's CrosscoderOutput (loss, mse, sparsity, L0, FVU per model) without a host sync."""
        self.scalars += torch.stack([out.loss, out.mse, out.sparsity, out.l0]).detach().to(torch.float64)
        self.fvu += out.fvu.detach().to(torch.float64)
        self.count += 1

    def pop(self, accelerator, **extra: Any) -> dict[str, Any]:
        """The interval's means, averaged over data-parallel ranks, as a metrics.jsonl record (plus ``extra``); resets."""
        values = torch.cat([self.scalars, self.fvu]) / max(self.count, 1)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        values = values.tolist()
        record = {
            **extra,
            "loss": values[0],
            "mse": values[1],
            "sparsity": values[2],
            "l0": values[3],
            "fvu": values[4:],
        }
        self.reset(len(self.fvu))
        return record


class NonFiniteInputs:
    """Non-finite input flags per model, kept on the device every step and read at log steps."""

    def __init__(self, n_models: int, device) -> None:
        self.bad = torch.zeros(n_models, dtype=torch.bool, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, x: torch.Tensor, step: int) -> None:
        """Flag the models whose activations in the batch ``x`` [batch, N, d] of 0-based ``step`` hold NaN/inf."""
        bad_now = ~torch.isfinite(x).all(dim=2).all(dim=0)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & bad_now.any(), step + 1, self.first_bad_step)
        self.bad |= bad_now

    def check(self, accelerator, loss: float, names: list[str], step: int, log_every: int) -> None:
        """ProbeError if any rank saw non-finite inputs, or the logged ``loss`` is not finite (a diverged run)."""
        if accelerator.num_processes > 1:
            self.bad = accelerator.reduce(self.bad.to(torch.int32), reduction="sum") > 0
        if self.bad.any() or not math.isfinite(loss):
            raise ProbeError(nonfinite_message(self.bad, int(self.first_bad_step), names, step, log_every))


def nonfinite_message(
    bad_inputs: torch.Tensor, first_bad_step: int, names: list[str], step: int, log_every: int
) -> str:
    """Why training stopped: the models whose inputs held NaN/inf (and from which step), or a diverged loss."""
    bad = [name for name, flag in zip(names, bad_inputs.tolist()) if flag]
    if bad:
        where = f"at step {first_bad_step}" if first_bad_step > 0 else f"by step {step}"
        return f"NaN/inf in the activations of {', '.join(bad)} {where}: training stopped (no checkpoint was written after it)"
    return f"non-finite loss at step {step} (or one of the {log_every - 1} steps before it) with finite inputs: training diverged, lower the lr"


class CrosscoderQualityWarning(UserWarning):
    """A finished crosscoder run looks poor for its settings (:func:`quality_warnings`)."""


QUALITY_LIMITS = {"min_steps": 1000, "max_fvu": 0.2, "max_l0_fraction": 0.1, "max_dead_fraction": 0.5}
"""When a finished run is reported as poor (:func:`quality_warnings`)."""


def quality_warnings(record: dict[str, Any], cc_config: CrosscoderConfig, total_steps: int) -> list[str]:
    """What looks poor about a finished run, each with what to change (from its last metrics ``record``).

    Checks: fewer than 1000 optimizer steps; a model's FVU above 0.2; L0 above 10% of F (ReLU
    crosscoders: BatchTopK's L0 is k by construction); more than half of the latents dead. Thresholds in :data:`QUALITY_LIMITS`; these are hints, not errors.
    """
    limits, out = QUALITY_LIMITS, []
    if total_steps < limits["min_steps"]:
        out.append(
            f"only {total_steps} optimizer steps: the dictionary is far from converged; train on more tokens (n_tokens) or use a smaller batch_size"
        )
    for name, fvu in zip(cc_config.model_names, record.get("fvu", [])):
        if fvu > limits["max_fvu"]:
            hint = "raise k" if cc_config.activation == "batchtopk" else "lower l1_coefficient"
            out.append(
                f"FVU of {name} is {fvu:.3f} (> {limits['max_fvu']}): the reconstruction is poor; train longer, raise n_features or {hint}"
            )
    l0 = record.get("l0", 0.0)
    if cc_config.activation == "relu" and l0 > limits["max_l0_fraction"] * cc_config.n_features:
        out.append(
            f"L0 is {l0:.1f} of F={cc_config.n_features} (> {limits['max_l0_fraction']:.0%}): the codes are not sparse; raise l1_coefficient or train longer"
        )
    dead = record.get("dead_fraction", 0.0)
    if dead > limits["max_dead_fraction"]:
        out.append(
            f"{dead:.0%} of latents are dead: lower n_features or lr, or use activation=batchtopk (AuxK revives dead latents)"
        )
    return out
