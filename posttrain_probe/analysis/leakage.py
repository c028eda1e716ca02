"""Leakage of gradient blocking (docs/methods.md sec. 9, paper S appendix E.1): how much the protected features still moved.

After a fine-tuning run with gradient blocking (``recipes/sft_blocked.py``), on the same tokens:

1. **Activation shift** (:func:`relative_change`): for every feature i of the blocking crosscoder's branch m
   (default ``base``), the per-source code f_i^m (docs/methods.md sec. 3) of the base model's and of the blocked model's
   activations at the crosscoder's site, and

       relative_change_i = sum_x |f_i^m(a^blocked(x)) - f_i^m(a^base(x))| / sum_x f_i^m(a^base(x)).

   Protected features are compared with the unprotected ones of the same crosscoder (which training was free
   to move): blocking worked where the protected features moved much less.
2. **NormRatio of a new crosscoder** (:func:`crosscoder_leakage`, paper S figs. 10-13): a two-model
   crosscoder trained on base vs blocked activations; every protected feature of the blocking crosscoder is
   matched to a feature of the new one by the cosine of their **base-branch decoder vectors** (the only
   space the two crosscoders share: the same base model at the same site). A protected feature that kept
   its role shows up as shared (NormRatio in [0.4, 0.6]); one outside the band leaked (base-only: the
   blocked model lost it; finetune-only, i.e. blocked-only: it changed into a new direction).

Entry points: :func:`feature_leakage` (both parts, from models and a dataset), :func:`crosscoder_leakage`
(part 2 from two crosscoders), :meth:`LeakageReport.write` (``leakage.json``, ``features.csv``,
``leakage.png``/``.svg``) and ``posttrain-probe leakage``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain_probe.activations.shuffle import ActivationSource
from posttrain_probe.analysis.attribution import CATEGORIES, categorize, norm_ratio
from posttrain_probe.analysis.dynamics import FeatureMatching, MatchQuality, match_features
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError

MATCHINGS = ("hungarian", "argmax")
"""How protected features are matched to the new crosscoder's features (see :func:`match_protected`)."""
WELL_MATCHED_COSINE = 0.7
"""Matched pairs with a base-decoder cosine at least this high count as well matched."""
_HUNGARIAN_MAX_CELLS = 100_000_000
"""Largest |S| x F_new cost matrix the Hungarian matching accepts (800 MB of float64, minutes of CPU)."""
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
        raise ProbeError(f"abs_change_sum {tuple(abs_change_sum.shape)} and base_sum {tuple(base_sum.shape)} must both be [F]")
    return torch.where(base_sum > 0, abs_change_sum / base_sum.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(base_sum, math.nan))


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
            raise ProbeError(f"expected paired activations [tokens, 2, {d_model}] (base, blocked), got {tuple(chunk.shape)}")
        device = chunk.device
        if sums is None:
            crosscoder.to(device)
            sums = {name: torch.zeros(n_features, dtype=torch.float64, device=device) for name in ("base", "blocked", "change")}
            sums.update({name: torch.zeros(n_features, dtype=torch.long, device=device) for name in ("base_active", "blocked_active")})
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
        raise ProbeError("no tokens to compare: the dataset gave no activations (after dropping the first position, BOS and padding)")
    cpu = {name: value.cpu() for name, value in sums.items()}
    return FeatureShift(n_tokens, cpu["base"], cpu["blocked"], cpu["change"], cpu["base_active"], cpu["blocked_active"])


def _group_stats(shift: FeatureShift, mask: torch.Tensor) -> dict[str, Any]:
    """Summary of the relative change over the features selected by ``mask`` [F] (JSON-ready)."""
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
        "mean_activation_blocked": float(shift.blocked_sum[mask].sum()) / max(shift.n_tokens, 1) / max(int(mask.sum()), 1),
    }
    return stats


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


# -- part 2: a new base-vs-blocked crosscoder ---------------------------------------------------------


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
        raise ProbeError(f"the crosscoders have different widths: d_model {crosscoder.config.d_model} vs {new_crosscoder.config.d_model}")
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
        mean=float(values.mean()), median=float(np.median(values)), frac_above_0_9=float((values > 0.9).mean()),
        frac_above_0_7=float((values > 0.7).mean()), n_matched=int(values.size),
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
        well = [c for c, cos in zip(cats, self.matching.cosine.tolist()) if c != "unmatched" and cos >= WELL_MATCHED_COSINE]
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
            "all_features": {"categories": _counts(categorize(self.norm_ratio).tolist()), **_band_leak(categorize(self.norm_ratio).tolist())},
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
    if crosscoder.config.layer is not None and new_crosscoder.config.layer is not None and crosscoder.config.layer != new_crosscoder.config.layer:
        raise ProbeError(f"the blocking crosscoder is at layer {crosscoder.config.layer}, the base-vs-blocked one at layer {new_crosscoder.config.layer}")
    if new_base is None:
        new_base = "base" if "base" in new_crosscoder.model_names else 0
    base_slot = new_crosscoder.model_index(new_base)
    blocked_slot = _other_slot(new_crosscoder, base_slot, "base-vs-blocked crosscoder") if new_blocked is None else new_crosscoder.model_index(new_blocked)
    if blocked_slot == base_slot:
        raise ProbeError(f"the base and blocked models of the new crosscoder are the same slot {base_slot}")
    features = sorted({int(f) for f in features})
    result = match_protected(crosscoder, new_crosscoder, features, model=model, new_base=base_slot, matching=matching)
    return CrosscoderLeakage(
        features=features,
        matching=result,
        method=matching,
        norm_ratio=norm_ratio(new_crosscoder.W_dec.detach().float().cpu(), base_slot, blocked_slot, scale=norm_ratio_scale),
        model_names=list(new_crosscoder.model_names),
        base=new_crosscoder.model_names[base_slot],
        blocked=new_crosscoder.model_names[blocked_slot],
        path=path,
    )


class _TensorSource(ActivationSource):
    """Paired activations held in memory, [n, N, d], served like a store (for a small base-vs-blocked crosscoder)."""

    default_buffer_tokens = 65536

    def __init__(self, acts: torch.Tensor, model_names: list[str], layer: int | None) -> None:
        self.acts, self._names, self.layer = acts, list(model_names), layer

    @property
    def model_names(self) -> list[str]:
        return self._names

    @property
    def n_models(self) -> int:
        return len(self._names)

    @property
    def d_model(self) -> int:
        return self.acts.shape[-1]

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[0]

    def chunks(self, *, shuffle: bool = False, seed: int = 0, epochs: int | None = 1) -> Iterator[torch.Tensor]:
        size = 16384
        starts = list(range(0, self.n_tokens, size))
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed + epoch)).tolist() if shuffle else range(len(starts))
            for i in order:
                yield self.acts[starts[i] : starts[i] + size]
            epoch += 1


# -- the report ----------------------------------------------------------------------------------------


@dataclass
class LeakageReport:
    """Result of :func:`feature_leakage`: the activation shift of every feature, and optionally part 2."""

    features: list[int]
    """Protected feature indices (sorted)."""
    shift: FeatureShift
    """Per-feature sums over the compared tokens."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What was compared: crosscoder, branch, layer, models, dataset, token budget."""
    crosscoder: CrosscoderLeakage | None = None
    """Part 2 (a base-vs-blocked crosscoder), if asked for."""

    @property
    def protected_mask(self) -> torch.Tensor:
        """[F] bool: protected features."""
        mask = torch.zeros(self.shift.base_sum.numel(), dtype=torch.bool)
        mask[torch.as_tensor(self.features, dtype=torch.long)] = True
        return mask

    @property
    def relative_change(self) -> torch.Tensor:
        """[F] relative change of every feature's activation, base -> blocked (NaN: never fires on base)."""
        return self.shift.relative_change

    def summary(self) -> dict[str, Any]:
        """JSON-ready: relative change of protected vs unprotected features (and part 2, if any)."""
        protected = _group_stats(self.shift, self.protected_mask)
        unprotected = _group_stats(self.shift, ~self.protected_mask)
        out: dict[str, Any] = {
            "n_tokens": self.shift.n_tokens,
            "relative_change": {
                "definition": "per feature: sum_x |f_i(blocked) - f_i(base)| / sum_x f_i(base), per-source codes of one crosscoder branch on the same tokens; median/mean over features active on base; pooled = summed over the group's features",
                "protected": protected,
                "unprotected": unprotected,
                "median_ratio_protected_to_unprotected": _ratio(protected["median"], unprotected["median"]),
                "pooled_ratio_protected_to_unprotected": _ratio(protected["pooled"], unprotected["pooled"]),
            },
        }
        if self.crosscoder is not None:
            out["crosscoder"] = self.crosscoder.summary()
        return out

    def to_dict(self) -> dict[str, Any]:
        """Settings, summary and the protected feature list, JSON-ready (NaN -> null)."""
        return json_safe({"format": "posttrain-probe/leakage", "format_version": 1, "settings": self.settings, **self.summary(), "protected_features": self.features})

    def write(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write ``leakage.json``, ``features.csv`` (one row per feature) and ``leakage.png``/``.svg``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {"report": str(out / "leakage.json"), "table": str(out / "features.csv")}
        self._write_csv(out / "features.csv")
        files["figures"] = [str(p) for p in plot_leakage(self, out / "leakage")]
        (out / "leakage.json").write_text(json.dumps({**self.to_dict(), "files": files}, indent=2))
        return files

    def _write_csv(self, path: Path) -> None:
        shift, n = self.shift, max(self.shift.n_tokens, 1)
        rel = shift.relative_change.tolist()
        protected = self.protected_mask.tolist()
        columns = ["feature", "protected", "base_mean", "blocked_mean", "base_frequency", "blocked_frequency", "relative_change"]
        part2: dict[int, tuple] = {}
        if self.crosscoder is not None:
            columns += ["matched_feature", "match_cosine", "matched_norm_ratio", "matched_category"]
            cc = self.crosscoder
            for f, p, cos, nr, cat in zip(cc.features, cc.matching.perm.tolist(), cc.matching.cosine.tolist(), cc.protected_norm_ratio.tolist(), cc.protected_categories):
                part2[f] = (p, cos, nr, cat)

        def number(x: float) -> str:
            return "" if not math.isfinite(x) else f"{x:.6g}"

        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for i in range(shift.base_sum.numel()):
                row = [i, int(protected[i]), number(float(shift.base_sum[i]) / n), number(float(shift.blocked_sum[i]) / n),
                       number(int(shift.base_active[i]) / n), number(int(shift.blocked_active[i]) / n), number(rel[i])]
                if self.crosscoder is not None:
                    p, cos, nr, cat = part2.get(i, (None, math.nan, math.nan, ""))
                    row += ["" if p is None or p < 0 else p, number(cos), number(nr), cat]
                writer.writerow(row)


def plot_leakage(report: LeakageReport, path) -> list[Path]:
    """Figure of a leakage report: (a) distribution of the relative change of protected vs unprotected features
    (features active on base; log axis, floor 1e-4); (b) with part 2, the NormRatio histogram of the new
    base-vs-blocked crosscoder, all live features vs the matches of protected features (paper S figs. 10-12).
    Writes ``<path>.png`` and ``<path>.svg``; returns both."""
    from posttrain_probe.analysis.plots import PALETTE, new_figure, save_figure, plot_style

    rel = report.relative_change.numpy()
    mask = report.protected_mask.numpy()
    floor = 1e-4
    groups = [("protected", rel[mask]), ("unprotected", rel[~mask])]
    groups = [(name, np.clip(v[~np.isnan(v)], floor, None)) for name, v in groups]
    present = [g for g in groups if g[1].size]
    panels = 2 if report.crosscoder is not None else 1
    with plot_style():
        fig = new_figure(5.0 * panels, 3.4)
        axes = fig.subplots(1, panels, squeeze=False)[0]
        ax = axes[0]
        if present:
            low = max(floor, 0.8 * min(float(v.min()) for _, v in present))
            top = max(float(v.max()) for _, v in present)
            edges = np.logspace(math.log10(low), math.log10(max(top * 1.05, low * 10)), 26)
            for j, (name, values) in enumerate(present):
                colour = PALETTE[j]
                weights = np.full(values.size, 1.0 / values.size)
                counts, _ = np.histogram(values, bins=edges, weights=weights)
                median = float(np.median(values))
                ax.stairs(counts, edges, color=colour, linewidth=1.4, label=f"{name} (n={values.size:,}, median {median:.3g})")
                ax.axvline(median, color=colour, linestyle=":", linewidth=1.0)
            ax.set_xscale("log")
            ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="best")
        ax.set_xlabel("relative change of activation, base -> blocked")
        ax.set_ylabel("fraction of features")
        ax.set_title("How much features moved under blocking")
        if report.crosscoder is not None:
            cc = report.crosscoder
            ax = axes[1]
            edges = np.linspace(0.0, 1.0, 41)
            all_nr = cc.norm_ratio.double().numpy()
            prot_nr = cc.protected_norm_ratio.double().numpy()
            for j, (name, values) in enumerate((("all features", all_nr), ("matched protected", prot_nr))):
                values = values[~np.isnan(values)]
                counts, _ = np.histogram(values, bins=edges)
                ax.stairs(counts, edges, color=PALETTE[j + 2], linewidth=1.4, label=f"{name} (n={values.size:,})")
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)
            for edge in (0.4, 0.6):
                ax.axvline(edge, color="#444444", linestyle="--", linewidth=0.8)
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel(f"NormRatio {cc.base} vs {cc.blocked}  (0 = {cc.blocked}-only, 1 = {cc.base}-only)")
            ax.set_ylabel("features (log scale)")
            ax.set_title("Base-vs-blocked crosscoder")
            ax.legend(frameon=False, loc="upper left")
        return save_figure(fig, path)


# -- entry point -----------------------------------------------------------------------------------------


def _load(crosscoder):
    from posttrain_probe.crosscoder.inspect import load_crosscoder

    if isinstance(crosscoder, (str, os.PathLike)):
        return load_crosscoder(crosscoder), str(crosscoder)
    return crosscoder, None


def feature_leakage(
    crosscoder,
    base_model: str | os.PathLike | nn.Module,
    blocked_model: str | os.PathLike | nn.Module,
    dataset: Any,
    features: str | Sequence[int] | os.PathLike,
    *,
    model_name: str = "base",
    finetuned: str | None = None,
    layer: int | None = None,
    tokenizer=None,
    max_tokens: int | None = 100_000,
    seq_len: int = 512,
    forward_batch_size: int = 8,
    column: str | None = None,
    split: str = "train",
    dataset_config: str | None = None,
    model_dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    train_crosscoder: bool = False,
    crosscoder_out: str | os.PathLike | None = None,
    n_features: int | None = None,
    training_config=None,
    blocked_crosscoder=None,
    matching: str = "hungarian",
    progress: bool = False,
    norm_ratio_scale: str = "all",
    allow_model_mismatch: bool = False,
) -> LeakageReport:
    """How much the protected features still moved after blocked training (docs/methods.md sec. 9, paper S E.1).

    Args:
        crosscoder: the blocking crosscoder/SAE (a :class:`Crosscoder` or its directory: ``block_crosscoder``).
        base_model, blocked_model: the model fine-tuning started from and the blocked result (paths, hub names
            or loaded models; loaded models need ``tokenizer``). Compared on the same tokens of ``dataset``.
        features: the protected set, as :func:`~posttrain_probe.interventions.resolve_features` takes it
            (``shared``/``base-only``/``finetune-only``, a feature-set JSON, ``3,17,42`` or a list).
        model_name: crosscoder branch whose per-source codes define the features (``block_model``);
            ``finetuned``: the branch NormRatio categories are computed against (default: the other one).
        layer: site (default and required match: the crosscoder's layer).
        max_tokens, seq_len, forward_batch_size, column, split, dataset_config: the compared tokens.
        train_crosscoder: also train a two-model crosscoder ``["base", "blocked"]`` on the same activations
            (kept in memory: max_tokens x 2 x d values) into ``crosscoder_out``, with ``n_features``
            (default: the blocking crosscoder's) and ``training_config`` (a ``CrosscoderTrainingConfig``;
            ``n_tokens`` > max_tokens makes several passes), then run :func:`crosscoder_leakage`.
        blocked_crosscoder: instead, an already trained base-vs-blocked crosscoder (object or directory).
        matching: ``hungarian`` or ``argmax`` (:func:`match_protected`).
        norm_ratio_scale: NormRatio denominator of a category ``features`` and of the new crosscoder's bands:
            ``all`` (max decoder norm over every model slot, docs/methods.md default) or ``pair`` (the two compared models,
            paper S); see :func:`~posttrain_probe.analysis.attribution.norm_ratio`.
        allow_model_mismatch: compare even when the base or blocked model is not the model branch ``model_name``
            was trained on (nor tuned from it), which is refused otherwise (:mod:`posttrain_probe.model_identity`);
            the mismatches are recorded in ``settings["model_mismatch"]``.

    Returns:
        A :class:`LeakageReport`; ``report.write(out_dir)`` writes the JSON, CSV and figure.
    """
    from posttrain_probe.activations.live import LiveActivations
    from posttrain_probe.analysis.feature_sets import resolve_features
    from posttrain_probe.model_identity import check_model, slot_fingerprint, source_fingerprints

    cc, cc_path = _load(crosscoder)
    slot = cc.model_index(model_name)
    if matching not in MATCHINGS:
        raise ProbeError(f"matching {matching!r} is not one of {MATCHINGS}")
    if train_crosscoder and blocked_crosscoder is not None:
        raise ProbeError("give either train_crosscoder (--train-crosscoder) or an already trained blocked_crosscoder (--blocked-crosscoder), not both")
    if train_crosscoder and crosscoder_out is None:
        raise ProbeError("train_crosscoder needs crosscoder_out: the directory for the new base-vs-blocked crosscoder")
    if layer is None:
        layer = cc.config.layer
        if layer is None:
            raise ProbeError("the crosscoder does not record its layer: pass layer= (--layer)")
    elif cc.config.layer is not None and layer != cc.config.layer:
        raise ProbeError(f"the crosscoder was trained at layer {cc.config.layer}, leakage asked for layer {layer}")
    protected = resolve_features(cc, features, base=model_name, finetuned=finetuned, norm_ratio_scale=norm_ratio_scale)
    new_cc, new_path = (None, None)
    if blocked_crosscoder is not None:
        new_cc, new_path = _load(blocked_crosscoder)
        if new_cc.config.d_model != cc.config.d_model:
            raise ProbeError(f"the base-vs-blocked crosscoder has d_model {new_cc.config.d_model}, the blocking crosscoder {cc.config.d_model}")
    if matching == "hungarian" and (new_cc is not None or train_crosscoder):
        f_new = new_cc.config.n_features if new_cc is not None else (n_features or cc.config.n_features)
        if len(protected) * f_new > _HUNGARIAN_MAX_CELLS:
            raise ProbeError(f"Hungarian matching of {len(protected)} protected features to {f_new} features is too large: use matching='argmax' (--matching argmax)")

    source = LiveActivations(
        {"base": base_model, "blocked": blocked_model}, dataset, layer=layer, tokenizer=tokenizer, seq_len=seq_len,
        forward_batch_size=forward_batch_size, max_tokens=max_tokens, column=column, split=split,
        dataset_config=dataset_config, model_dtype=model_dtype, device=device,
    )
    if source.d_model != cc.config.d_model:
        raise ProbeError(
            f"the crosscoder {cc_path or ''} has d_model {cc.config.d_model} but the models' hidden size is {source.d_model}: "
            "expected the crosscoder trained on (a model of the family of) the base model"
        )
    mismatches = {}
    for role, given in (("base", base_model), ("blocked", blocked_model)):
        what = f"the {role} model" + (f" {given}" if not isinstance(given, nn.Module) else "")
        mismatch = check_model(source.models[role], slot_fingerprint(cc, slot), cc.model_names[slot], what=what, allow_mismatch=allow_model_mismatch)
        if mismatch:
            mismatches[role] = mismatch
    kept: list[torch.Tensor] = []

    def chunks() -> Iterator[torch.Tensor]:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="leakage", unit="tok", disable=not progress)  # no total: the whole dataset
        for chunk in source.chunks():
            bar.update(chunk.shape[0])
            if train_crosscoder:
                kept.append(chunk.cpu())
            yield chunk
        bar.close()

    home = cc.W_enc.device
    shift = feature_shift(cc, chunks(), slot)
    cc.to(home)
    settings = {
        "crosscoder": cc_path,
        "crosscoder_models": cc.model_names,
        "model_name": cc.model_names[slot],
        "features_spec": str(features) if isinstance(features, (str, os.PathLike)) else [int(f) for f in features],
        "n_protected": len(protected),
        "n_features": cc.config.n_features,
        "layer": layer,
        "base": str(base_model) if not isinstance(base_model, nn.Module) else None,
        "blocked": str(blocked_model) if not isinstance(blocked_model, nn.Module) else None,
        "dataset": str(dataset) if isinstance(dataset, (str, os.PathLike)) else None,
        "max_tokens": max_tokens,
        "seq_len": seq_len,
        "code_units": "per-source codes f^m of the crosscoder (normalised-input units)",
        "norm_ratio_scale": norm_ratio_scale,
    }
    if mismatches:
        settings["model_mismatch"] = mismatches
    report = LeakageReport(protected, shift, settings)
    if train_crosscoder:
        from posttrain_probe.crosscoder.config import CrosscoderConfig
        from posttrain_probe.crosscoder.train import CrosscoderTrainingConfig, train_crosscoder as train

        acts = torch.cat(kept)
        kept.clear()
        config = CrosscoderConfig(
            model_names=["base", "blocked"], n_features=n_features or cc.config.n_features, activation=cc.config.activation,
            k=cc.config.k, layer=layer, dec_init_norm=cc.config.dec_init_norm, model_fingerprints=source_fingerprints(source),
        )
        new_cc = train(_TensorSource(acts, ["base", "blocked"], layer), config, training_config or CrosscoderTrainingConfig(), crosscoder_out, overwrite=True, progress=progress)
        new_cc, new_path = new_cc.cpu().eval(), str(crosscoder_out)
        del acts
    if new_cc is not None:
        report.crosscoder = crosscoder_leakage(cc, new_cc, protected, model=slot, matching=matching, path=new_path, norm_ratio_scale=norm_ratio_scale)
    return report
