"""The feature monitor's figures (docs/monitor.md): how the live model's features at site L have moved from the base's.

Inputs are raw-unit residual activations [T, d] of the probe set at site L, from the base model and
from the model being trained, encoded with one branch m (the base model's) of a crosscoder or SAE:
f^m(a) = :meth:`Crosscoder.encode_source` (per-source code, code units of the normalised input).

Everything is computed from per-feature sums over tokens (:class:`MonitorSums`), so a probe set split
over ranks gives, with the sums added (all-reduced), the figures of a one-process run:

    mean change      c_i = (sum_t f_i(a_live,t) - sum_t f_i(a_base,t)) / T            per feature i
    category change  mean of c_i over the features of a NormRatio category (paper S eq. 2 bands)
    suppressed       #{i : mean f_i(base) > 0, mean f_i(live) < fraction * mean f_i(base)} / #{i : mean f_i(base) > 0}
    FVU              sum_t ||a_t - â_t||² / sum_t ||a_t - ā||²,   â = decode^m(f^m(a))  (raw units; equal in normalised units)
    top-k            the k features of largest |c_i|, with their signed c_i
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain_probe.analysis.attribution import categorize, norm_ratio
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError
from posttrain_probe.model_identity import check_site_model, slot_fingerprint

MONITOR_CATEGORIES = ("base-only", "shared", "finetune-only")
"""The NormRatio categories (:func:`~posttrain_probe.analysis.attribution.categorize`) the monitor reports."""


@dataclass
class MonitorSums:
    """Sums over the probe tokens of one model's activations, the only state the figures need (float64)."""

    code_sum: torch.Tensor
    """[F] sum over tokens of the per-source codes f^m_i(a_t) (code units)."""
    act_sum: torch.Tensor
    """[d] sum over tokens of a_t (raw units)."""
    sq_norm: torch.Tensor
    """[] sum over tokens of ||a_t||² (raw units²)."""
    sq_error: torch.Tensor
    """[] sum over tokens of ||a_t - â_t||², â the branch's reconstruction (raw units²)."""
    n_tokens: torch.Tensor
    """[] number of tokens T."""

    @classmethod
    def zeros(cls, n_features: int, d_model: int, device=None) -> MonitorSums:
        """The sums over no token."""
        zero = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(n_features), zero(d_model), zero(), zero(), zero())

    def __add__(self, other: MonitorSums) -> MonitorSums:
        return MonitorSums(*(a + b.to(a.device) for a, b in zip(self.flat_parts(), other.flat_parts())))

    def flat_parts(self) -> tuple[torch.Tensor, ...]:
        return self.code_sum, self.act_sum, self.sq_norm, self.sq_error, self.n_tokens

    def flat(self) -> torch.Tensor:
        """[F + d + 3] float64: every sum in one vector, for one all-reduce (sum) and for saving."""
        return torch.cat([part.reshape(-1) for part in self.flat_parts()])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_features: int) -> MonitorSums:
        """Inverse of :meth:`flat` (``n_features`` = F; d follows from the length)."""
        d = flat.numel() - n_features - 3
        if flat.ndim != 1 or d < 1:
            raise ProbeError(
                f"monitor sums of {n_features} features need a vector longer than {n_features + 3}, got {tuple(flat.shape)}"
            )
        flat = flat.to(torch.float64)
        return cls(flat[:n_features], flat[n_features:-3], flat[-3], flat[-2], flat[-1])

    @property
    def fvu(self) -> float:
        """sum ||a - â||² / sum ||a - ā||², from raw units; the same in the crosscoder's normalised units
        (s_m is one scalar per model). NaN when the tokens have no variance."""
        n = float(self.n_tokens)
        total = float(self.sq_norm) - float(self.act_sum @ self.act_sum) / n if n > 0 else 0.0
        return float(self.sq_error) / total if total > 0 else math.nan


@dataclass
class MonitorFigures:
    """The monitor's figures at one step (module docstring); code units for changes, dimensionless otherwise."""

    n_tokens: int
    """Probe tokens T the figures are over."""
    mean_change: float
    """Mean over all F features of c_i = mean_t f_i(live) - mean_t f_i(base) (code units)."""
    category_change: dict[str, float] = field(default_factory=dict)
    """NormRatio category -> mean of c_i over its features (NaN for an empty category); empty for an SAE."""
    n_active: int = 0
    """Features active on the base: mean_t f_i(base) > 0."""
    n_suppressed: int = 0
    """Of those, features whose live mean fell below ``suppress_fraction`` x their base mean."""
    suppressed_fraction: float = math.nan
    """n_suppressed / n_active (NaN when no feature is active on the base)."""
    fvu: float = math.nan
    """The branch's FVU on the live activations (drift out of the base dictionary)."""
    top_features: list[int] = field(default_factory=list)
    """Ids of the ``top_k`` features of largest |c_i|, largest first (ties: lower id first)."""
    top_changes: list[float] = field(default_factory=list)
    """Their signed c_i (code units)."""

    def to_log(self, prefix: str = "monitor/") -> dict[str, float]:
        """Flat scalars for a Trainer's ``report_to``: mean_change, change/<category>, suppressed_fraction,
        n_suppressed, fvu, top<j>/feature and top<j>/change (j = 1..k)."""
        logs = {f"{prefix}mean_change": self.mean_change}
        logs.update({f"{prefix}change/{name}": value for name, value in self.category_change.items()})
        logs[f"{prefix}suppressed_fraction"] = self.suppressed_fraction
        logs[f"{prefix}n_suppressed"] = float(self.n_suppressed)
        logs[f"{prefix}fvu"] = self.fvu
        for j, (feature, change) in enumerate(zip(self.top_features, self.top_changes), start=1):
            logs[f"{prefix}top{j}/feature"] = float(feature)
            logs[f"{prefix}top{j}/change"] = change
        return logs

    def to_json(self) -> dict:
        """Strict-JSON dict (NaN -> null) of every field; :meth:`from_json` reads it back."""
        return json_safe(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> MonitorFigures:
        nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(
            n_tokens=int(data["n_tokens"]),
            mean_change=nan(data["mean_change"]),
            category_change={k: nan(v) for k, v in data.get("category_change", {}).items()},
            n_active=int(data["n_active"]),
            n_suppressed=int(data["n_suppressed"]),
            suppressed_fraction=nan(data["suppressed_fraction"]),
            fvu=nan(data["fvu"]),
            top_features=[int(i) for i in data["top_features"]],
            top_changes=[nan(v) for v in data["top_changes"]],
        )


def category_masks(
    crosscoder,
    *,
    model: str | int = 0,
    finetuned: str | int | None = None,
    categories: Sequence[str] | None = None,
    norm_ratio_scale: str = "all",
) -> dict[str, torch.Tensor]:
    """[F] bool CPU masks of NormRatio categories, ``model`` (base) vs ``finetuned`` (paper S eq. 2;
    :func:`~posttrain_probe.analysis.attribution.norm_ratio` with ``norm_ratio_scale``, then ``categorize``).

    ``categories`` None: all of :data:`MONITOR_CATEGORIES` when they are defined (a two-model crosscoder,
    or ``finetuned`` given), else none. Categories asked for by name with an SAE (N = 1), or with more
    than two models and no ``finetuned``, are a ProbeError.
    """
    names = list(MONITOR_CATEGORIES if categories is None else categories)
    bad = [name for name in names if name not in MONITOR_CATEGORIES]
    if bad:
        raise ProbeError(f"unknown monitor categories {bad}: expected some of {list(MONITOR_CATEGORIES)}")
    base = crosscoder.model_index(model)
    if not names:
        return {}
    if crosscoder.n_models == 1:
        if categories is None:
            return {}
        raise ProbeError(
            f"NormRatio categories {names} need a crosscoder of two models (base and fine-tuned), got an SAE of "
            f"{crosscoder.model_names}: leave the categories out"
        )
    if finetuned is None:
        if crosscoder.n_models != 2:
            if categories is None:
                return {}
            raise ProbeError(
                f"the crosscoder has models {crosscoder.model_names}: name the fine-tuned one for categories {names}"
            )
        finetuned = 1 - base
    labels = categorize(
        norm_ratio(crosscoder.W_dec.detach(), base, crosscoder.model_index(finetuned), scale=norm_ratio_scale)
    )
    return {name: torch.from_numpy(labels == name) for name in names}


@torch.no_grad()
def monitor_sums(crosscoder, acts: torch.Tensor, *, model: str | int = 0, chunk_tokens: int = 1024) -> MonitorSums:
    """:class:`MonitorSums` of raw activations ``acts`` [T, d] encoded with branch ``model`` of ``crosscoder``.

    Codes are :meth:`Crosscoder.encode_source` (per-source, BatchTopK thresholds as there), the
    reconstruction is :meth:`Crosscoder.decode` of them at slot ``model`` (raw units). Runs on the
    crosscoder's device and dtype, ``chunk_tokens`` tokens at a time; sums are float64.
    """
    slot = crosscoder.model_index(model)
    d_model = crosscoder.config.d_model
    if acts.ndim != 2 or acts.shape[1] != d_model:
        raise ProbeError(
            f"the monitor expects activations [tokens, {d_model}] at the crosscoder's site, got {tuple(acts.shape)}"
        )
    weight = crosscoder.W_enc
    total = MonitorSums.zeros(crosscoder.config.n_features, d_model, device=weight.device)
    for start in range(0, acts.shape[0], chunk_tokens):
        a = acts[start : start + chunk_tokens].to(weight.device, weight.dtype)
        codes = crosscoder.encode_source(a, slot)
        error = a - crosscoder.decode(codes)[:, slot]
        total = total + MonitorSums(
            codes.sum(0, dtype=torch.float64),
            a.sum(0, dtype=torch.float64),
            a.double().pow(2).sum(),
            error.double().pow(2).sum(),
            torch.tensor(float(a.shape[0]), dtype=torch.float64, device=weight.device),
        )
    return total


def suppressed_features(base: MonitorSums, live: MonitorSums, *, suppress_fraction: float = 0.5) -> torch.Tensor:
    """[F] bool (CPU): features active on the base (mean_t f_i(base) > 0) whose live mean fell below
    ``suppress_fraction`` x their base mean. Both sums must cover the same tokens."""
    n = float(base.n_tokens)
    base_mean = base.code_sum.detach().cpu().double() / n
    live_mean = live.code_sum.detach().cpu().double() / n
    return (base_mean > 0) & (live_mean < suppress_fraction * base_mean)


def figures_from_sums(
    base: MonitorSums,
    live: MonitorSums,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    suppress_fraction: float = 0.5,
    top_k: int = 10,
) -> MonitorFigures:
    """The figures (module docstring) from the base's and the live model's sums over the same probe tokens.

    ``masks``: category -> [F] bool (:func:`category_masks`); ``suppress_fraction`` in (0, 1];
    ``top_k`` >= 0 (at most F are reported).
    """
    if not 0 < suppress_fraction <= 1:
        raise ProbeError(f"suppress_fraction must be in (0, 1], got {suppress_fraction}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ProbeError(f"top_k must be an integer >= 0, got {top_k!r}")
    if base.code_sum.shape != live.code_sum.shape or base.act_sum.shape != live.act_sum.shape:
        raise ProbeError(
            f"base and live sums are of different crosscoders: {base.code_sum.numel()} vs {live.code_sum.numel()} "
            f"features, d {base.act_sum.numel()} vs {live.act_sum.numel()}"
        )
    n = float(base.n_tokens)
    if n < 1 or float(live.n_tokens) != n:
        raise ProbeError(
            f"base and live sums cover {n:.0f} and {float(live.n_tokens):.0f} probe tokens: expected the same probe set, > 0 tokens"
        )
    base_mean = base.code_sum.detach().cpu().double() / n
    change = live.code_sum.detach().cpu().double() / n - base_mean
    n_active = int((base_mean > 0).sum())
    n_suppressed = int(suppressed_features(base, live, suppress_fraction=suppress_fraction).sum())
    top = torch.argsort(change.abs(), descending=True, stable=True)[:top_k]
    return MonitorFigures(
        n_tokens=int(n),
        mean_change=float(change.mean()),
        category_change={
            name: float(change[mask.cpu()].mean()) if bool(mask.any()) else math.nan
            for name, mask in (masks or {}).items()
        },
        n_active=n_active,
        n_suppressed=n_suppressed,
        suppressed_fraction=n_suppressed / n_active if n_active else math.nan,
        fvu=live.fvu,
        top_features=[int(i) for i in top],
        top_changes=[float(change[i]) for i in top],
    )


def monitor_figures(
    crosscoder,
    base_acts: torch.Tensor,
    live_acts: torch.Tensor,
    *,
    model: str | int = 0,
    finetuned: str | int | None = None,
    categories: Sequence[str] | None = None,
    norm_ratio_scale: str = "all",
    suppress_fraction: float = 0.5,
    top_k: int = 10,
) -> MonitorFigures:
    """The monitor's figures of live activations against base activations of the same probe tokens.

    Args:
        crosscoder: a :class:`~posttrain_probe.crosscoder.model.Crosscoder` (N = 1: an SAE) trained at the site.
        base_acts, live_acts: [T, d] raw-unit residual activations at site L, token t the same in both.
        model: the branch (base model's slot) whose per-source code and decoder are used.
        finetuned, categories, norm_ratio_scale: NormRatio categories, :func:`category_masks`.
        suppress_fraction: a base-active feature is suppressed when its live mean < this x its base mean.
        top_k: how many of the most changed features to report.
    """
    if base_acts.shape != live_acts.shape:
        raise ProbeError(
            f"base and live activations differ in shape: {tuple(base_acts.shape)} vs {tuple(live_acts.shape)}"
        )
    masks = category_masks(
        crosscoder, model=model, finetuned=finetuned, categories=categories, norm_ratio_scale=norm_ratio_scale
    )
    return figures_from_sums(
        monitor_sums(crosscoder, base_acts, model=model),
        monitor_sums(crosscoder, live_acts, model=model),
        masks=masks,
        suppress_fraction=suppress_fraction,
        top_k=top_k,
    )


def check_monitored_model(
    crosscoder,
    model: nn.Module,
    *,
    layer: int | None = None,
    branch: str | int = 0,
    allow_model_mismatch: bool = False,
    override_hint: str | None = None,
) -> tuple[int, str | None]:
    """Check that ``model`` (through any wrapper) can be monitored with branch ``branch`` of ``crosscoder``;
    returns (site L, the model mismatch let through by ``allow_model_mismatch`` or None).

    ProbeError (one line) for: a ``layer`` other than the crosscoder's (:meth:`Crosscoder.site`), no
    layer at all, a layer out of range, a hidden size other than the crosscoder's d_model, and a model
    that is not the one the branch was trained on nor tuned from it (:func:`~posttrain_probe.model_identity.check_model`;
    ``override_hint`` ends that message).
    """
    site = crosscoder.site(layer, what="the feature monitor")
    if site is None:
        raise ProbeError("the crosscoder does not record its layer: give the monitored layer (monitor_layer)")
    slot = crosscoder.model_index(branch)
    mismatch = check_site_model(
        model,
        site,
        crosscoder.config.d_model,
        slot_fingerprint(crosscoder, slot),
        crosscoder.model_names[slot],
        allow_mismatch=allow_model_mismatch,
        override=override_hint,
    )
    return site, mismatch


def read_monitor_log(path: str | os.PathLike) -> dict[int, MonitorFigures]:
    """step -> figures of a ``monitor.jsonl`` (one JSON object per line: ``step``, the figures' fields, ``seconds``)."""
    path = Path(path)
    if not path.exists():
        raise ProbeError(
            f"{path} does not exist: the feature monitor writes monitor.jsonl into the probe run directory"
        )
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out[int(entry["step"])] = MonitorFigures.from_json(entry)
    return out


def monitor_categories(logs: Mapping[str, Mapping[int, Any]]) -> list[str]:
    """The NormRatio categories with a number at some step of some log, in the monitor's order."""
    return [
        c
        for c in MONITOR_CATEGORIES
        if any(not math.isnan(f.category_change.get(c, math.nan)) for log in logs.values() for f in log.values())
    ]


def plot_monitor_curves(logs: Mapping[str, Mapping[int, Any]], path) -> list[Path]:
    """The feature monitor's figures over optimizer steps, one line per run, in one figure of panels: suppressed
    fraction, drift FVU, mean change over all features and over each NormRatio category with a number (docs/monitor.md).

    ``logs``: run label -> step -> :class:`~posttrain_probe.analysis.monitor.MonitorFigures`
    (:func:`~posttrain_probe.analysis.monitor.read_monitor_log`); changes in code units of the monitor's branch.
    Writes ``<stem>.png`` and ``<stem>.svg`` (:func:`~posttrain_probe.analysis.plots.save_figure`); returns them.
    """
    from posttrain_probe.analysis.plots import PALETTE, new_figure, plot_style, save_figure

    panels = [
        ("suppressed fraction", "fraction of base-active features", lambda f: f.suppressed_fraction),
        ("drift: FVU of the base branch", "FVU", lambda f: f.fvu),
        ("mean change, all features", "code units", lambda f: f.mean_change),
    ]  # (title, y label, value of one step's figures)
    for category in monitor_categories(logs):
        panels.append(
            (f"mean change, {category}", "code units", lambda f, c=category: f.category_change.get(c, math.nan))
        )
    n_cols = 3
    n_rows = -(-len(panels) // n_cols)
    with plot_style():
        fig = new_figure(10.0, 2.7 * n_rows + 0.4)
        axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax, (title, unit, value) in zip(axes, panels):
            for j, (label, log) in enumerate(logs.items()):
                steps = sorted(log)
                ax.plot(
                    steps,
                    [value(log[step]) for step in steps],
                    marker="o",
                    markersize=3,
                    linewidth=1.3,
                    color=PALETTE[j % len(PALETTE)],
                    label=label,
                )
            if unit == "code units":
                ax.axhline(0.0, color="#BBBBBB", linewidth=0.8, zorder=0)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(unit)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), frameon=False)
        return save_figure(fig, path)
