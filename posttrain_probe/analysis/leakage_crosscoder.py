"""Part 2 of the leakage analysis (paper S figs. 10-13): the protected features seen through a base-vs-blocked crosscoder.

A two-model crosscoder trained on base vs blocked activations; every protected feature of the blocking crosscoder
is matched to a feature of the new one by the cosine of their **base-branch decoder vectors** (the only space the
two crosscoders share: the same base model at the same site) (:func:`match_protected`). A protected feature that
kept its role shows up as shared (NormRatio in [0.4, 0.6]); one outside the band leaked (base-only: the blocked
model lost it; finetune-only, i.e. blocked-only: it changed into a new direction) (:func:`crosscoder_leakage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain_probe.analysis.attribution import CATEGORIES, categorize, norm_ratio
from posttrain_probe.analysis.dynamics import FeatureMatching, MatchQuality, match_features
from posttrain_probe.analysis.leakage_config import MATCHINGS
from posttrain_probe.errors import ProbeError

WELL_MATCHED_COSINE = 0.7
"""Matched pairs with a base-decoder cosine at least this high count as well matched."""
HUNGARIAN_MAX_CELLS = 100_000_000
"""Largest |S| x F_new cost matrix the Hungarian matching accepts (800 MB of float64, minutes of CPU)."""


def _other_slot(crosscoder, slot: int, what: str) -> int:
    if crosscoder.n_models != 2:
        raise ProbeError(f"the {what} has models {crosscoder.model_names}: name its blocked model")
    return 1 - slot


def match_protected(
    crosscoder,
    new_crosscoder,
    features: Sequence[int],
    *,
    model: str | int = "base",
    new_base: str | int = "base",
    matching: str = "hungarian",
) -> FeatureMatching:
    """Match protected features of ``crosscoder`` to features of ``new_crosscoder`` by base-decoder cosine.

    The vectors are the decoder rows d_i^base of the base branch in each crosscoder (``model`` of the blocking
    crosscoder, ``new_base`` of the new one): both live in the base model's residual space at the same site
    (up to each crosscoder's scalar normalisation, which the cosine ignores). ``matching``:

    - ``hungarian``: one-to-one, maximising the summed cosine (:func:`~posttrain_probe.analysis.dynamics.match_features`,
      docs/methods.md sec. 5); |S| x F_new memory, cubic time: for sets of up to ~10k features.
    - ``argmax``: each protected feature takes the new feature of maximum cosine (several may share one).

    Returns a :class:`FeatureMatching` over the protected features in the order of ``features``: ``perm[j]`` is
    the new crosscoder's feature matched to ``features[j]`` (-1: unmatched, when |S| > F_new under ``hungarian``).
    A protected feature whose base decoder is zero (a dead or purely fine-tune-only feature) has cosine 0.
    """
    if matching not in MATCHINGS:
        raise ProbeError(f"matching {matching!r} is not one of {MATCHINGS}")
    slot, new_slot = crosscoder.model_index(model), new_crosscoder.model_index(new_base)
    if crosscoder.config.d_model != new_crosscoder.config.d_model:
        raise ProbeError(
            f"the crosscoders have different widths: d_model {crosscoder.config.d_model} vs {new_crosscoder.config.d_model}"
        )
    index = torch.as_tensor(list(features), dtype=torch.long)
    if index.numel() == 0:
        raise ProbeError("no protected features to match")
    a = crosscoder.W_dec.detach()[index, slot].float().cpu()
    b = new_crosscoder.W_dec.detach()[:, new_slot].float().cpu()
    if matching == "hungarian":
        return match_features(a, b)
    b_unit = b / b.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    perm = torch.empty(a.shape[0], dtype=torch.long)
    cosine = torch.empty(a.shape[0], dtype=torch.float32)
    for start in range(0, a.shape[0], 1024):
        rows = a[start : start + 1024]
        cos = (rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)) @ b_unit.T
        best = cos.clamp(-1.0, 1.0).max(dim=1)
        perm[start : start + 1024], cosine[start : start + 1024] = best.indices, best.values
    values = cosine.double().numpy()
    quality = MatchQuality(
        mean=float(values.mean()),
        median=float(np.median(values)),
        frac_above_0_9=float((values > 0.9).mean()),
        frac_above_0_7=float((values > 0.7).mean()),
        n_matched=int(values.size),
    )
    return FeatureMatching(perm=perm, cosine=cosine, quality=quality)


def _counts(labels: Sequence[str]) -> dict[str, int]:
    values = list(labels)
    return {name: values.count(name) for name in CATEGORIES}


def _band_leak(labels: Sequence[str]) -> dict[str, Any]:
    live = [c for c in labels if c != "dead"]
    left = sum(c != "shared" for c in live)
    return {"n_live": len(live), "left_shared_band": left, "fraction_left": left / len(live) if live else math.nan}


@dataclass
class CrosscoderLeakage:
    """Protected features seen through a new crosscoder of base vs blocked model (paper S figs. 10-13)."""

    features: list[int]
    """Protected feature indices of the blocking crosscoder."""
    matching: FeatureMatching
    """``perm[j]``/``cosine[j]``: the new crosscoder's feature matched to ``features[j]`` (base-decoder cosine)."""
    method: str
    """``hungarian`` or ``argmax`` (:func:`match_protected`)."""
    norm_ratio: torch.Tensor
    """[F_new] NormRatio (S eq. 2) of every feature of the new crosscoder, base vs blocked (near 1 = base-only,
    near 0 = blocked-only); NaN for dead features."""
    model_names: list[str]
    """Models of the new crosscoder."""
    base: str
    """Its base model."""
    blocked: str
    """Its blocked model."""
    path: str | None = None
    """Where the new crosscoder lives (if on disk)."""
    all_features: dict[str, Any] | None = None
    """NormRatio bands of all the new crosscoder's features as ``leakage.json`` records them, when read back from
    it (``norm_ratio`` then holds the matched features' values only, NaN elsewhere); None: from ``norm_ratio``."""

    @property
    def protected_norm_ratio(self) -> torch.Tensor:
        """[|S|] NormRatio of the matched feature of every protected feature (NaN: unmatched or dead)."""
        perm = self.matching.perm
        values = self.norm_ratio.float()[perm.clamp_min(0)]
        return values.masked_fill(perm < 0, math.nan)

    @property
    def protected_categories(self) -> list[str]:
        """[|S|] NormRatio category of each protected feature's match ("unmatched" where it has none)."""
        labels = categorize(self.protected_norm_ratio)
        return ["unmatched" if p < 0 else str(c) for p, c in zip(self.matching.perm.tolist(), labels)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts: where the protected features ended up in the new crosscoder's NormRatio bands."""
        cats = self.protected_categories
        well = [
            c for c, cos in zip(cats, self.matching.cosine.tolist()) if c != "unmatched" and cos >= WELL_MATCHED_COSINE
        ]
        matched = [c for c in cats if c != "unmatched"]
        ratios = self.protected_norm_ratio.double().numpy()
        ratios = ratios[~np.isnan(ratios)]
        targets = self.matching.perm[self.matching.perm >= 0]
        return {
            "path": self.path,
            "models": self.model_names,
            "base": self.base,
            "blocked": self.blocked,
            "n_features": int(self.norm_ratio.numel()),
            "matching": {
                "method": self.method,
                "vectors": "base-branch decoder rows of both crosscoders (cosine)",
                "quality": self.matching.quality._asdict(),
                "n_unmatched": sum(c == "unmatched" for c in cats),
                "n_distinct_targets": int(torch.unique(targets).numel()),
                "well_matched_cosine": WELL_MATCHED_COSINE,
                "n_well_matched": len(well),
            },
            "protected": {
                "categories": _counts(matched) | {"unmatched": len(cats) - len(matched)},
                **_band_leak(matched),
                "median_norm_ratio": float(np.median(ratios)) if ratios.size else math.nan,
            },
            "protected_well_matched": {"categories": _counts(well), **_band_leak(well)},
            "all_features": self.all_features
            if self.all_features is not None
            else {
                "categories": _counts(categorize(self.norm_ratio).tolist()),
                **_band_leak(categorize(self.norm_ratio).tolist()),
            },
        }


def crosscoder_leakage(
    crosscoder,
    new_crosscoder,
    features: Sequence[int],
    *,
    model: str | int = "base",
    new_base: str | int | None = None,
    new_blocked: str | int | None = None,
    matching: str = "hungarian",
    path: str | None = None,
    norm_ratio_scale: str = "all",
) -> CrosscoderLeakage:
    """Part 2 of the leakage analysis: NormRatio bands of the protected features in a base-vs-blocked crosscoder.

    ``crosscoder``: the blocking crosscoder (branch ``model`` defined the protected ``features``);
    ``new_crosscoder``: a two-model crosscoder trained on base vs blocked activations at the same site.
    ``new_base``/``new_blocked``: its slots (default: the model named ``base``, else slot 0; the other one).
    Features are matched by :func:`match_protected`. ``norm_ratio_scale``: the NormRatio denominator
    (``all`` or ``pair``, :func:`~posttrain_probe.analysis.attribution.norm_ratio`; equal for a two-model crosscoder).
    """
    if (
        crosscoder.config.layer is not None
        and new_crosscoder.config.layer is not None
        and crosscoder.config.layer != new_crosscoder.config.layer
    ):
        raise ProbeError(
            f"the blocking crosscoder is at layer {crosscoder.config.layer}, the base-vs-blocked one at layer {new_crosscoder.config.layer}"
        )
    if new_base is None:
        new_base = "base" if "base" in new_crosscoder.model_names else 0
    base_slot = new_crosscoder.model_index(new_base)
    blocked_slot = (
        _other_slot(new_crosscoder, base_slot, "base-vs-blocked crosscoder")
        if new_blocked is None
        else new_crosscoder.model_index(new_blocked)
    )
    if blocked_slot == base_slot:
        raise ProbeError(f"the base and blocked models of the new crosscoder are the same slot {base_slot}")
    features = sorted({int(f) for f in features})
    result = match_protected(crosscoder, new_crosscoder, features, model=model, new_base=base_slot, matching=matching)
    return CrosscoderLeakage(
        features=features,
        matching=result,
        method=matching,
        norm_ratio=norm_ratio(
            new_crosscoder.W_dec.detach().float().cpu(), base_slot, blocked_slot, scale=norm_ratio_scale
        ),
        model_names=list(new_crosscoder.model_names),
        base=new_crosscoder.model_names[base_slot],
        blocked=new_crosscoder.model_names[blocked_slot],
        path=path,
    )
