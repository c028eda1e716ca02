"""Per-source BatchTopK inference thresholds, calibrated on data (beyond the papers; docs/methods.md sec. 3).

A BatchTopK crosscoder learns one inference threshold theta on the joint scores
f_i(x)·sum_m ||d_i^m|| (all model slots filled). Per-source codes f^m (docs/methods.md sec. 3: every other
slot zero) have pre-activations of another scale - for a feature shared by two models, roughly
half the joint one - so theta makes them far sparser (or denser) than training's k per token.
:func:`calibrate_source_thresholds` gives every source m its own theta_m: the batch-top-k rule of
training (keep the k·B largest scores of a batch of B tokens) applied to the per-source scores
f^m_i·sum_m ||d_i^m|| with all T calibration tokens as one batch, so that the per-source codes'
mean L0 over those tokens is k.

    cc = Crosscoder.from_pretrained("runs/cc")
    result = calibrate_source_thresholds(cc, source.iter_batches(4096, shuffle=False), max_tokens=100_000)
    cc.save_pretrained("runs/cc")          # config.json now holds source_thresholds
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.crosscoder.config import CalibrateConfig
from posttrain_probe.crosscoder.layout import CALIBRATION
from posttrain_probe.crosscoder.model import Crosscoder, crosscoder_fingerprint
from posttrain_probe.errors import ProbeError


class SourceCalibration(NamedTuple):
    """Result of :func:`calibrate_source_thresholds` (one entry per model, in slot order)."""

    thresholds: list[float]
    """theta_m, in score units f^m_i·sum_m ||d_i^m|| (normalised units); stored in ``config.source_thresholds``."""
    l0_joint_threshold: list[float]
    """Mean per-source L0 on the calibration tokens with the joint threshold (before calibration)."""
    l0_calibrated: list[float]
    """Mean per-source L0 on the calibration tokens with theta_m: k, unless fewer codes are positive."""
    k: int
    """The target mean L0 per token."""
    n_tokens: int
    """Calibration tokens used."""


class _TopScores:
    """The ``capacity`` largest positive values of a stream, kept in O(capacity) memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parts: list[torch.Tensor] = []
        self.held = 0
        self.floor: torch.Tensor | None = None  # values <= floor can never be among the largest `capacity`

    def add(self, scores: torch.Tensor) -> None:
        keep = scores[scores > 0] if self.floor is None else scores[scores > self.floor]
        if keep.numel():
            self.parts.append(keep)
            self.held += keep.numel()
        if self.held > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        values = torch.cat(self.parts)
        if values.numel() > self.capacity:
            values = values.topk(self.capacity, sorted=False).values
            # `capacity` values >= floor are held: a later value <= floor ranks below them (or ties)
            self.floor = values.min()
        self.parts, self.held = [values], values.numel()

    def largest(self, n: int) -> torch.Tensor:
        """The n + 1 largest values seen (fewer if fewer positive values came), descending."""
        values = torch.cat(self.parts) if self.parts else torch.zeros(0)
        return values.topk(min(n + 1, values.numel()), sorted=True).values


@torch.no_grad()
def calibrate_source_thresholds(
    crosscoder: Crosscoder,
    batches: Iterable[torch.Tensor],
    *,
    max_tokens: int = 100_000,
    k: int | None = None,
    batch_size: int = 1024,
) -> SourceCalibration:
    """Set per-source BatchTopK inference thresholds theta_m so that per-source codes have mean L0 = k.

    For every model slot m, the per-source scores s^m_i(x) = f^m_i(x)·sum_m' ||d_i^m'|| (f^m: the
    ReLU of the per-source pre-activation, docs/methods.md sec. 3; the same score training ranks) of the T
    calibration tokens are ranked as one batch, as training's batch-top-k ranks a batch of B
    tokens; theta_m lies halfway between the (k·T)-th and the (k·T+1)-th largest score, so that
    exactly k·T codes exceed it (mean L0 = k per token) when no scores tie there. Fewer than k·T
    positive scores give theta_m = 0 (every positive code kept; ``l0_calibrated`` says how many).
    The thresholds are written into ``crosscoder.config.source_thresholds`` (save with
    ``save_pretrained``); :meth:`Crosscoder.encode_source` then uses them.

    Args:
        crosscoder: a trained BatchTopK crosscoder (it must have its joint threshold).
        batches: raw paired activations ``[B, N, d]`` in model units (e.g.
            ``source.iter_batches(4096, shuffle=False)``); read until ``max_tokens`` tokens.
        max_tokens: calibration tokens T at most (>= 1). Memory: about 2·k·max_tokens floats per model.
        k: the target mean L0 per token (default: the crosscoder's training k).
        batch_size: tokens scored at once (memory only: the result does not depend on it).

    Returns:
        A :class:`SourceCalibration` with theta_m and the per-source mean L0 before and after.
    """
    config = crosscoder.config
    if config.activation != "batchtopk":
        raise ProbeError(
            f"per-source thresholds calibrate BatchTopK crosscoders; this one's activation is {config.activation!r} "
            "(ReLU codes have no threshold to calibrate)"
        )
    if crosscoder.threshold < 0:
        raise ProbeError("this BatchTopK crosscoder has no inference threshold yet: train it before calibrating it")
    k = config.k if k is None else k
    for name, value in (("k", k), ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be an integer >= 1, got {value!r}")
    n_models = crosscoder.n_models
    device, dtype = crosscoder.W_enc.device, crosscoder.W_enc.dtype
    weights = crosscoder.decoder_norm_sum()
    joint = crosscoder.threshold
    tops = [_TopScores(k * max_tokens + 1) for _ in range(n_models)]  # + 1: the midpoint needs the (k·T+1)-th
    above_joint = [0] * n_models
    count = 0
    for batch in batches:
        crosscoder._check_input(batch)
        batch = batch[: max_tokens - count].to(device, dtype)
        for start in range(0, batch.shape[0], batch_size):
            part = batch[start : start + batch_size]
            for m in range(n_models):
                acts = torch.relu(crosscoder.source_pre_activations(part[:, m], m))
                scores = acts * weights  # the expression of Crosscoder._inference_codes
                above_joint[m] += int((scores > joint).sum())
                tops[m].add(scores.flatten())
        count += batch.shape[0]
        if count >= max_tokens:
            break
    if count == 0:
        raise ProbeError("cannot calibrate per-source thresholds on an empty activation source")
    thresholds, l0_after = [], []
    for top in tops:
        theta, kept = _cut(top, k * count)
        thresholds.append(theta)
        l0_after.append(kept / count)
    crosscoder.config.source_thresholds = thresholds
    crosscoder.config._check_source_thresholds()
    return SourceCalibration(thresholds, [n / count for n in above_joint], l0_after, k, count)


def _cut(top: _TopScores, target: int) -> tuple[float, int]:
    """The threshold halfway between the ``target``-th and the next largest score (0 when at most ``target``
    are positive) and how many scores exceed it."""
    largest = top.largest(target)
    if largest.numel() <= target:  # at most k·T positive scores: keep them all
        return 0.0, largest.numel()
    theta = (largest[target - 1] + largest[target]) / 2
    return float(theta), int((largest > theta).sum())


class JointCalibration(NamedTuple):
    """Result of :func:`calibrate_joint_threshold`."""

    threshold: float
    """The calibrated joint inference threshold (score units f_i·sum_m ||d_i^m||, normalised units)."""
    previous: float
    """The threshold before (the training EMA; < 0 when unset)."""
    l0_before: float
    """Mean inference L0 on the calibration tokens with the previous threshold (NaN when unset)."""
    l0_calibrated: float
    """Mean inference L0 on the calibration tokens with the calibrated threshold: k, unless fewer codes are positive."""
    k: int
    """The target mean L0 per token."""
    n_tokens: int
    """Calibration tokens used."""


@torch.no_grad()
def calibrate_joint_threshold(
    crosscoder: Crosscoder, batches: Iterable[torch.Tensor], *, max_tokens: int = 100_000, batch_size: int = 1024
) -> JointCalibration:
    """Set the joint BatchTopK inference threshold so that inference codes have mean L0 = k on data.

    Training keeps the k·B largest scores f_i·sum_m ||d_i^m|| of each batch of B tokens; the
    threshold used at inference (:meth:`Crosscoder.encode`) is, during training, an EMA of each
    batch's smallest kept score, which lags the weights and is a per-batch extreme. This applies
    training's rule to all T calibration tokens as one batch: the threshold lies halfway between
    the (k·T)-th and the (k·T+1)-th largest score, so that the codes' mean L0 over those tokens
    is k (one global threshold, not one per latent: the inference codes then keep training's
    ranking of latents by score). The trainer calls it at the end of a BatchTopK run
    (``calibration_tokens``); ``batches`` are raw paired activations [B, N, d].
    """
    if crosscoder.config.activation != "batchtopk":
        raise ProbeError(
            f"the joint threshold calibrates BatchTopK crosscoders; this one's activation is {crosscoder.config.activation!r}"
        )
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be an integer >= 1, got {value!r}")
    k = crosscoder.config.k
    device, dtype = crosscoder.W_enc.device, crosscoder.W_enc.dtype
    weights = crosscoder.decoder_norm_sum()
    previous = float(crosscoder.threshold)
    top = _TopScores(k * max_tokens + 1)
    above_previous = count = 0
    for batch in batches:
        crosscoder._check_input(batch)
        batch = batch[: max_tokens - count].to(device, dtype)
        for start in range(0, batch.shape[0], batch_size):
            scores = torch.relu(crosscoder._pre_activations(crosscoder.normalize(batch[start : start + batch_size])))
            scores = scores * weights
            above_previous += int((scores > previous).sum()) if previous >= 0 else 0
            top.add(scores.flatten())
        count += batch.shape[0]
        if count >= max_tokens:
            break
    if count == 0:
        raise ProbeError("cannot calibrate the inference threshold on an empty activation source")
    theta, kept = _cut(top, k * count)
    crosscoder.threshold.fill_(theta)
    before = above_previous / count if previous >= 0 else float("nan")
    return JointCalibration(theta, previous, before, kept / count, k, count)


class CalibrationReport(NamedTuple):
    """What :func:`crosscoder_calibrate` did (one entry per model, in slot order)."""

    crosscoder: Path
    """Directory the calibrated (or cleared) crosscoder was written to."""
    model_names: list[str]
    """The crosscoder's models in slot order."""
    thresholds: list[float]
    """theta_m per model (empty when the thresholds were cleared)."""
    l0_joint_threshold: list[float]
    """Mean per-source L0 on the calibration tokens with the joint threshold (empty when cleared)."""
    l0_calibrated: list[float]
    """Mean per-source L0 on the calibration tokens with theta_m (empty when cleared)."""
    k: int | None
    """The target mean L0 per token (None when cleared)."""
    n_tokens: int
    """Calibration tokens used (0 when cleared)."""
    joint_threshold: float
    """The crosscoder's joint BatchTopK inference threshold."""
    fingerprint_before: str
    """:func:`~posttrain_probe.crosscoder.model.crosscoder_fingerprint` before calibrating."""
    fingerprint_after: str
    """... and after: feature sets made for the other fingerprint are refused."""

    @property
    def cleared(self) -> bool:
        """True when the thresholds were removed instead of calibrated."""
        return self.k is None

    def to_json(self) -> dict[str, Any]:
        """The report as printed by ``crosscoder calibrate --json`` and stored in calibration.json."""
        rows = zip(self.model_names, self.thresholds, self.l0_joint_threshold, self.l0_calibrated)
        return {
            "crosscoder": str(self.crosscoder),
            "k": self.k,
            "n_tokens": self.n_tokens,
            "joint_threshold": self.joint_threshold,
            "models": {
                name: {"threshold": theta, "l0_joint_threshold": before, "l0_calibrated": after}
                for name, theta, before, after in rows
            },
            "fingerprint_before": self.fingerprint_before,
            "fingerprint_after": self.fingerprint_after,
        }

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``calibration.json`` into ``out``; returns ``{"calibration": path}``."""
        path = Path(out) / CALIBRATION
        path.write_text(json.dumps(self.to_json(), indent=2))
        return {"calibration": path}

    @classmethod
    def read(cls, out: str | os.PathLike) -> CalibrationReport:
        """The report of the last calibration of the crosscoder in ``out``."""
        path = Path(out) / CALIBRATION
        if not path.exists():
            raise ProbeError(
                f"{out} holds no calibration report ({CALIBRATION}): calibrate it with `posttrain-probe crosscoder calibrate`"
            )
        data = json.loads(path.read_text())
        rows = data["models"]
        return cls(
            Path(data["crosscoder"]),
            list(rows),
            [r["threshold"] for r in rows.values()],
            [r["l0_joint_threshold"] for r in rows.values()],
            [r["l0_calibrated"] for r in rows.values()],
            data["k"],
            data["n_tokens"],
            data["joint_threshold"],
            data["fingerprint_before"],
            data["fingerprint_after"],
        )


def crosscoder_calibrate(config: CalibrateConfig) -> CalibrationReport:
    """Calibrate (or, with ``config.clear``, remove) the per-source thresholds of ``config.crosscoder`` and
    save it to ``config.out`` (default: in place); writes and returns the :class:`CalibrationReport`."""
    from posttrain_probe.crosscoder.inspect import load_crosscoder, training_status
    from posttrain_probe.locks import DirectoryLock

    cc = load_crosscoder(config.crosscoder, allow_incomplete=config.allow_incomplete)
    before = crosscoder_fingerprint(cc)
    target = config.out if config.out is not None else config.crosscoder
    status = training_status(config.crosscoder)
    if config.out is None and status is not None and not status.get("complete", True):
        raise ProbeError(
            f"{config.crosscoder} is an unfinished training run: calibrating it in place would be overwritten when it resumes; write the calibrated copy elsewhere with --out DIR"
        )
    # in place: the run directory is a crosscoder run's, hold its lock while config.json is rewritten
    held = DirectoryLock(target, what="crosscoder run") if config.out is None else contextlib.nullcontext()
    if config.clear:
        cc.config.source_thresholds = None
        result = SourceCalibration([], [], [], None, 0)  # type: ignore[arg-type]
    else:
        result = _calibrate(cc, config)
    with held:
        cc.cpu().save_pretrained(target)
        report = CalibrationReport(
            target,
            cc.model_names,
            *result[:3],
            result.k,
            result.n_tokens,
            float(cc.threshold),
            before,
            crosscoder_fingerprint(cc),
        )
        report.write(target)
    return report


def _calibrate(cc: Crosscoder, config: CalibrateConfig) -> SourceCalibration:
    """:func:`calibrate_source_thresholds` on the first ``config.max_tokens`` tokens of ``config.acts``."""
    from posttrain_probe.crosscoder.sources import open_source

    if cc.config.activation != "batchtopk":
        raise ProbeError(
            f"{config.crosscoder} is a {cc.config.activation} crosscoder: only BatchTopK crosscoders have inference thresholds to calibrate"
        )
    if not config.acts:
        raise ProbeError(
            "give the calibration activations: --acts DIR (a collect output) or one --acts store directory per model"
        )
    source = open_source(acts=config.acts, layer=cc.config.layer, model_names=cc.model_names)
    if list(source.model_names) != cc.model_names or source.d_model != cc.config.d_model:
        raise ProbeError(
            f"the activations hold models {source.model_names} of width {source.d_model}; the crosscoder expects {cc.model_names} of width {cc.config.d_model}"
        )
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cc.to(device).eval()
    batches = source.iter_batches(config.batch_size, shuffle=False, device=device, dtype=cc.W_enc.dtype)
    return calibrate_source_thresholds(
        cc, batches, max_tokens=config.max_tokens, k=config.k, batch_size=config.batch_size
    )
