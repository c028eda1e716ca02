"""Fisher reasoning features (paper S sec. 2 eq. 1, A.1, B.1; docs/methods.md sec. 8) and the rho statistic.

On texts with a reasoning and a solution segment, with the per-source codes f^m of one crosscoder branch (or of
an SAE, a 1-model crosscoder) at site L:

1. **Segments** (:mod:`posttrain_probe.analysis.segments`: :func:`split_document`, :func:`token_segments`,
   re-exported here): OpenThoughts tags (``<|begin_of_thought|>`` ... ``<|end_of_thought|>``,
   ``<|begin_of_solution|>`` ... ``<|end_of_solution|>``), a user-given delimiter pair per segment, or a reasoning
   column + a solution column joined into one text. Character spans are found in the text as the model sees it
   (chat-template rendering included) and mapped to tokens through the tokenizer's offset mapping, so any fast
   tokenizer works. A token is in a segment when it overlaps the segment's text (surrounding whitespace trimmed)
   and overlaps neither a tag nor the other segment: **tag tokens are excluded**, also tokens that merge a tag
   with a neighbouring character.
2. **Fisher statistics** (:func:`segment_statistics`): E_reasoning[f_j^2] and E_solution[f_j^2], token-weighted
   means over all segment tokens of the dataset (the first position, special tokens and padding never count),
   accumulated in float64 on the model's device; ``ImportanceRatio(j) = E_r / max(E_s, 1e-8)``
   (:func:`fisher_importance_ratio`, S eq. 1; A.1: E[f_j^2] is proportional to the trace of the Fisher
   information of feature j's decoder row).
3. **Selection** (:func:`select_fisher_features`): candidates are live features (fired on some segment token)
   whose E_r reaches the magnitude floor (default: the 0.9 quantile of E_r over live features, i.e. the top
   decile); the top-k (default 50) candidates by ratio.
4. **rho** (:func:`rho_statistic`, S eq. 14, B.1): per sequence and segment, the fraction of the segment's tokens
   on which at least one selected feature fires, for every model given (each through its own branch, or all
   through the one SAE): the distributions of paper S figs. 4-6 (:func:`plot_rho_distributions`).
5. **ReasonScore** baseline (:mod:`posttrain_probe.analysis.reasonscore`, Galichin et al. 2025) on the same
   documents (all kept tokens) and codes, for comparison.

Entry points: :func:`fisher_features` -> :class:`FisherReport` (``.write(out)``: feature-set JSONs, feature
table, per-document rho table, ``summary.json``, ``rho.png``/``.svg``) and ``posttrain-probe features fisher``.
Code units: the crosscoder's per-source codes f^m (its normalised-input units).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.analysis.reasonscore import ALPHA, REASON_TOKENS, WINDOW, ReasonScoreAccumulator, ReasonScoreResult, reasoning_token_groups
from posttrain_probe.analysis.segments import (  # re-exported: the segment API used to live here
    CHAT_COLUMNS,
    OPENTHOUGHTS_REASONING,
    OPENTHOUGHTS_SOLUTION,
    SEGMENT_FORMATS,
    SEGMENTS,
    SegmentBatch,
    SegmentFormat,
    Segments,
    document_column,
    find_delimited,
    segment_batches,
    split_document,
    token_segments,
)
from posttrain_probe.errors import ProbeError

EPSILON = 1e-8
"""Denominator floor of the importance ratio (paper S eq. 1)."""
DEFAULT_TOP_K = 50
DEFAULT_FLOOR_QUANTILE = 0.9
_ENCODE_TOKENS = 1024
"""Tokens encoded at once (bounds the [tokens, F] code tensors)."""


# -- the formulas -------------------------------------------------------------------------------------


def fisher_importance_ratio(e_reasoning: torch.Tensor, e_solution: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """ImportanceRatio(j) = E_reasoning[f_j^2] / max(E_solution[f_j^2], eps) (paper S eq. 1, docs/methods.md sec. 8).

    Args:
        e_reasoning: ``[F]`` mean squared code of every feature over reasoning tokens (code units squared).
        e_solution: ``[F]`` the same over solution tokens.
        eps: floor of the denominator (paper: 1e-8).

    Returns:
        ``[F]`` float64, unitless (>= 0).
    """
    e_r = torch.as_tensor(e_reasoning, dtype=torch.float64)
    e_s = torch.as_tensor(e_solution, dtype=torch.float64, device=e_r.device)
    if e_r.ndim != 1 or e_s.shape != e_r.shape:
        raise ProbeError(f"e_reasoning {tuple(e_r.shape)} and e_solution {tuple(e_s.shape)} must both be [F]")
    if not eps > 0:
        raise ProbeError(f"eps must be > 0, got {eps!r}")
    return e_r / e_s.clamp_min(eps)


def magnitude_floor(e_reasoning: torch.Tensor, live: torch.Tensor, quantile: float = DEFAULT_FLOOR_QUANTILE) -> float:
    """The ``quantile`` of E_reasoning[f^2] over live features (default 0.9: the top decile starts here).

    ``e_reasoning`` ``[F]`` (code units squared), ``live`` ``[F]`` bool. Linear interpolation between order
    statistics (``torch.quantile``). Returns the floor in code units squared.
    """
    if not 0.0 <= quantile < 1.0:
        raise ProbeError(f"floor quantile must be in [0, 1), got {quantile!r} (0.9 = top decile)")
    values = torch.as_tensor(e_reasoning, dtype=torch.float64)[torch.as_tensor(live, dtype=torch.bool)]
    if values.numel() == 0:
        raise ProbeError("no live feature: no feature fired on any reasoning or solution token")
    return float(torch.quantile(values.cpu(), quantile))


@dataclass
class FisherSelection:
    """Result of :func:`select_fisher_features` (CPU tensors)."""

    features: list[int]
    """Selected features, best first (ratio descending; ties: larger E_r, then lower index)."""
    ratio: torch.Tensor
    """[F] float64 importance ratio of every feature."""
    live: torch.Tensor
    """[F] bool: fired on at least one reasoning or solution token."""
    candidates: torch.Tensor
    """[F] bool: live, E_r > 0 and E_r >= floor."""
    floor: float
    """Magnitude floor on E_r (code units squared)."""
    floor_quantile: float | None
    """Quantile the floor was taken at (None: given as an absolute value)."""
    k: int
    """Requested number of features."""


def select_fisher_features(
    e_reasoning: torch.Tensor,
    e_solution: torch.Tensor,
    live: torch.Tensor,
    *,
    k: int = DEFAULT_TOP_K,
    floor_quantile: float = DEFAULT_FLOOR_QUANTILE,
    floor: float | None = None,
    eps: float = EPSILON,
) -> FisherSelection:
    """Candidate reasoning features: high importance ratio **and** E_r above a magnitude floor (docs/methods.md sec. 8).

    Args:
        e_reasoning, e_solution: ``[F]`` E[f_j^2] over reasoning / solution tokens (code units squared).
        live: ``[F]`` bool, features that fired on some segment token.
        k: number of features returned (fewer if fewer candidates exist).
        floor_quantile: the floor is this quantile of E_r over live features (:func:`magnitude_floor`).
        floor: an absolute floor instead (code units squared); overrides ``floor_quantile``.
        eps: denominator floor of the ratio.

    Returns:
        :class:`FisherSelection`; ``features`` are the top-k candidates by ratio, best first.
    """
    e_r = torch.as_tensor(e_reasoning, dtype=torch.float64).cpu()
    e_s = torch.as_tensor(e_solution, dtype=torch.float64).cpu()
    live = torch.as_tensor(live, dtype=torch.bool).cpu()
    if live.shape != e_r.shape:
        raise ProbeError(f"live {tuple(live.shape)} must match e_reasoning {tuple(e_r.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ProbeError(f"k must be a positive number of features, got {k!r}")
    ratio = fisher_importance_ratio(e_r, e_s, eps)
    if floor is None:
        value, quantile = magnitude_floor(e_r, live, floor_quantile), float(floor_quantile)
    else:
        if not (math.isfinite(floor) and floor >= 0):
            raise ProbeError(f"floor must be a finite value >= 0 (code units squared), got {floor!r}")
        value, quantile = float(floor), None
    candidates = live & (e_r > 0) & (e_r >= value)
    index = torch.arange(e_r.numel())
    # rank by ratio desc, then E_r desc, then index asc: stable sorts from the last key to the first
    order = index[candidates]
    order = order[torch.sort(-e_r[order], stable=True).indices]
    order = order[torch.sort(-ratio[order], stable=True).indices]
    return FisherSelection([int(i) for i in order[:k]], ratio, live, candidates, value, quantile, k)


def rho_statistic(hits: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """rho(x) = (1/T) sum_t 1[exists j in S_reasoning: f_j(h_t) > 0] (paper S eq. 14, docs/methods.md sec. 8).

    Args:
        hits: ``[...]`` number of tokens of a segment of a sequence on which some selected feature fires.
        n_tokens: ``[...]`` T, the number of tokens of that segment.

    Returns:
        ``[...]`` float64 in [0, 1]; NaN where the segment has no tokens (the sequence has no such segment).
    """
    hits = torch.as_tensor(hits, dtype=torch.float64)
    n_tokens = torch.as_tensor(n_tokens, dtype=torch.float64, device=hits.device)
    return torch.where(n_tokens > 0, hits / n_tokens.clamp_min(1), torch.full_like(hits, math.nan))


# -- accumulation over tokens -------------------------------------------------------------------------


@dataclass
class SegmentStats:
    """Per-feature statistics of one model's per-source codes over the segment tokens (float64/int64, CPU)."""

    n_tokens: torch.Tensor
    """[2] tokens in the reasoning / solution segments."""
    sq_sum: torch.Tensor
    """[2, F] sum of f_j^2 over reasoning / solution tokens (code units squared)."""
    active: torch.Tensor
    """[2, F] int64 tokens with f_j > 0 per segment."""
    doc_tokens: torch.Tensor
    """[n_docs, 2] int64 segment tokens per document (T of eq. 14)."""
    hits: torch.Tensor | None = None
    """[n_docs, 2] tokens with some selected feature active, per document and segment (when features were given)."""
    n_cut: int = 0
    """Documents whose segments were cut by ``seq_len``."""

    @property
    def mean_sq(self) -> torch.Tensor:
        """[2, F] E_reasoning[f^2], E_solution[f^2] (token-weighted; 0 for an empty segment)."""
        return self.sq_sum / self.n_tokens.clamp_min(1).double()[:, None]

    @property
    def frequency(self) -> torch.Tensor:
        """[2, F] fraction of reasoning / solution tokens with f_j > 0."""
        return self.active.double() / self.n_tokens.clamp_min(1).double()[:, None]

    @property
    def live(self) -> torch.Tensor:
        """[F] bool: fired on at least one segment token."""
        return self.active.sum(dim=0) > 0

    @property
    def rho(self) -> torch.Tensor:
        """[n_docs, 2] rho of every document's reasoning / solution segment (NaN: no such segment)."""
        if self.hits is None:
            raise ProbeError("rho needs the selected features: run segment_statistics with features=")
        return rho_statistic(self.hits, self.doc_tokens)


@torch.no_grad()
def segment_statistics(
    model: nn.Module,
    crosscoder,
    branch: str | int,
    batches,
    *,
    layer: int,
    n_docs: int,
    special_ids: Sequence[int] = (),
    features: Sequence[int] | None = None,
    reasonscore: ReasonScoreAccumulator | None = None,
    progress: bool = False,
    desc: str = "fisher",
) -> SegmentStats:
    """Truncated forwards of ``model`` over ``batches`` and the statistics of the branch's per-source codes.

    Kept tokens: real, not the first position, not a special token (``special_ids``). Per segment (reasoning,
    solution): token counts, sum f_j^2 and active counts, accumulated in float64/int64 on the model's device;
    with ``features`` (the selected set S) also per document the tokens on which some j in S fires (rho);
    with ``reasonscore``, its window statistics over **all** kept tokens. ``crosscoder`` must sit on the model's
    device; codes are ``crosscoder.encode_source(a, branch)`` of the raw residual ``a`` entering block ``layer``.
    """
    from tqdm.auto import tqdm

    from posttrain_probe.layers import truncated_forward

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    n_features = crosscoder.config.n_features
    dtype = crosscoder.W_enc.dtype
    n_tokens = torch.zeros(2, dtype=torch.int64, device=device)
    sq_sum = torch.zeros(2, n_features, dtype=torch.float64, device=device)
    active = torch.zeros(2, n_features, dtype=torch.int64, device=device)
    doc_tokens = torch.zeros(n_docs, 2, dtype=torch.int64, device=device)
    selected = torch.as_tensor(list(features), dtype=torch.long, device=device) if features is not None else None
    hits = torch.zeros(n_docs, 2, dtype=torch.float64, device=device) if selected is not None else None
    special = torch.as_tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long, device=device)
    n_cut = 0
    training = model.training
    model.eval()
    try:
        bar = tqdm(total=n_docs, desc=desc, unit="doc", disable=not progress)
        for batch in batches:
            bar.update(batch.input_ids.shape[0])
            n_cut += batch.n_cut
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            keep = mask.bool() & (mask.cumsum(dim=1) > 1) & ~torch.isin(ids, special)
            seg = torch.where(keep, batch.segments.to(device).long(), 0)
            want = keep if reasonscore is not None else seg > 0
            rows, cols = want.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            acts = truncated_forward(model, ids, mask, [layer])[layer]
            x, seg_flat = acts[rows, cols], seg[rows, cols]
            doc_flat = batch.doc_ids.to(device)[rows]
            words = reasonscore.masks(ids, keep)[rows, cols] if reasonscore is not None else None
            del acts
            for start in range(0, x.shape[0], _ENCODE_TOKENS):
                part = slice(start, start + _ENCODE_TOKENS)
                codes = crosscoder.encode_source(x[part].to(dtype), branch)
                kind = seg_flat[part]
                for j in (0, 1):
                    in_seg = kind == j + 1
                    chosen = codes[in_seg]
                    sq_sum[j] += chosen.square().sum(dim=0, dtype=torch.float64)
                    active[j] += (chosen > 0).sum(dim=0)
                    n_tokens[j] += in_seg.sum()
                in_any = kind > 0
                where = (doc_flat[part][in_any], kind[in_any] - 1)
                doc_tokens.index_put_(where, torch.ones_like(where[0]), accumulate=True)
                if selected is not None:
                    fired = (codes[:, selected] > 0).any(dim=1)[in_any] if selected.numel() else torch.zeros_like(where[0], dtype=torch.bool)
                    hits.index_put_(where, fired.double(), accumulate=True)
                if reasonscore is not None:
                    reasonscore.update(codes, words[part])
        bar.close()
    finally:
        model.train(training)
    return SegmentStats(n_tokens.cpu(), sq_sum.cpu(), active.cpu(), doc_tokens.cpu(), hits.cpu() if hits is not None else None, n_cut)


# -- report ------------------------------------------------------------------------------------------------


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _distribution(values: np.ndarray) -> dict[str, Any]:
    values = _finite(values)
    if values.size == 0:
        return {"n_docs": 0}
    q = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "n_docs": int(values.size), "mean": float(values.mean()), "std": float(values.std()), "median": float(q[2]),
        "q10": float(q[0]), "q25": float(q[1]), "q75": float(q[3]), "q90": float(q[4]),
        "fraction_zero": float((values == 0).mean()), "fraction_one": float((values == 1).mean()),
    }  # fmt: skip


DEGENERATE_RHO = 0.99
"""rho at or above this on every document of both segments means the selection fires everywhere."""


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """P(rho_reasoning > rho_solution) + 0.5 P(equal) over document pairs (Mann-Whitney AUC)."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([a, b]))
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


@dataclass
class FisherReport:
    """Everything :func:`fisher_features` found; :meth:`write` puts it on disk."""

    settings: dict[str, Any]
    """Inputs: crosscoder, models and branches, layer, dataset, segment format, limits."""
    select_model: str
    """Model the features were selected on."""
    selection: FisherSelection
    """The selected features and the ratio of every feature."""
    stats: dict[str, SegmentStats]
    """Per model (in the order given): segment statistics, rho included."""
    documents: dict[str, int]
    """Document counts: n_docs, with_reasoning, with_solution, cut_by_seq_len."""
    reasonscore: ReasonScoreResult | None = None
    """The ReasonScore baseline on the select model (None when switched off)."""
    crosscoder: Any = field(default=None, repr=False)
    """The crosscoder object (its fingerprint goes into the feature sets when it has no directory)."""

    @property
    def features(self) -> list[int]:
        """The selected features, best first."""
        return self.selection.features

    def table(self):
        """One row per feature (``pyarrow.Table``): E_r, E_s, ratio, frequencies, flags, ranks, ReasonScore, and
        E_r/E_s/ratio of every other model through its branch."""
        import pyarrow as pa

        stats = self.stats[self.select_model]
        mean_sq, freq = stats.mean_sq.numpy(), stats.frequency.numpy()
        n_features = mean_sq.shape[1]
        rank = np.full(n_features, -1)
        rank[self.selection.features] = np.arange(1, len(self.selection.features) + 1)
        columns: dict[str, Any] = {
            "feature": pa.array(np.arange(n_features, dtype=np.int64)),
            "e_reasoning": pa.array(mean_sq[0], pa.float64()),
            "e_solution": pa.array(mean_sq[1], pa.float64()),
            "importance_ratio": pa.array(self.selection.ratio.numpy(), pa.float64()),
            "freq_reasoning": pa.array(freq[0], pa.float64()),
            "freq_solution": pa.array(freq[1], pa.float64()),
            "live": pa.array(self.selection.live.numpy(), pa.bool_()),
            "candidate": pa.array(self.selection.candidates.numpy(), pa.bool_()),
            "selected": pa.array(rank > 0, pa.bool_()),
            "fisher_rank": pa.array([int(r) if r > 0 else None for r in rank], pa.int64()),
        }
        if self.reasonscore is not None:
            order = torch.sort(self.reasonscore.score, descending=True, stable=True).indices.numpy()
            rs_rank = np.empty(n_features, dtype=np.int64)
            rs_rank[order] = np.arange(1, n_features + 1)
            columns["reasonscore"] = pa.array(self.reasonscore.score.numpy(), pa.float64())
            columns["reasonscore_entropy"] = pa.array(self.reasonscore.entropy.numpy(), pa.float64())
            columns["reasonscore_rank"] = pa.array(rs_rank)
        for name, other in self.stats.items():
            if name == self.select_model:
                continue
            other_sq = other.mean_sq
            columns[f"e_reasoning_{name}"] = pa.array(other_sq[0].numpy(), pa.float64())
            columns[f"e_solution_{name}"] = pa.array(other_sq[1].numpy(), pa.float64())
            columns[f"importance_ratio_{name}"] = pa.array(fisher_importance_ratio(other_sq[0], other_sq[1]).numpy(), pa.float64())
        return pa.table(columns)

    def rho_table(self):
        """One row per (model, document): segment token counts and rho (``pyarrow.Table``; null: no segment)."""
        import pyarrow as pa

        names, docs, n_r, n_s, rho_r, rho_s = [], [], [], [], [], []
        for name, stats in self.stats.items():
            rho = stats.rho.numpy()
            n = rho.shape[0]
            names += [name] * n
            docs.append(np.arange(n))
            n_r.append(stats.doc_tokens[:, 0].numpy())
            n_s.append(stats.doc_tokens[:, 1].numpy())
            rho_r += [None if math.isnan(v) else float(v) for v in rho[:, 0]]
            rho_s += [None if math.isnan(v) else float(v) for v in rho[:, 1]]
        return pa.table({
            "model": pa.array(names, pa.string()), "doc": pa.array(np.concatenate(docs)),
            "n_reasoning_tokens": pa.array(np.concatenate(n_r)), "n_solution_tokens": pa.array(np.concatenate(n_s)),
            "rho_reasoning": pa.array(rho_r, pa.float64()), "rho_solution": pa.array(rho_s, pa.float64()),
        })  # fmt: skip

    def rho_summary(self) -> dict[str, Any]:
        """Per model: distribution of rho over documents for each segment, and how well the two separate."""
        out = {}
        for name, stats in self.stats.items():
            rho = stats.rho.numpy()
            r, s = rho[:, 0], rho[:, 1]
            fr, fs = _finite(r), _finite(s)
            out[name] = {
                "reasoning": _distribution(r),
                "solution": _distribution(s),
                "separation": {
                    "mean_difference": float(fr.mean() - fs.mean()) if fr.size and fs.size else math.nan,
                    "auc_reasoning_above_solution": _auc(r, s),
                },
            }
            if fr.size and fs.size and min(fr.min(), fs.min()) >= DEGENERATE_RHO:
                out[name]["warning"] = (
                    f"rho >= {DEGENERATE_RHO} on every document of both segments: the selected features fire on almost every "
                    "token, so rho cannot separate reasoning from solution; the crosscoder is probably undertrained or not "
                    "sparse (see the warnings in its training_status.json)"
                )
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: settings, documents, the selection and the rho statistics (NaN -> null)."""
        stats = self.stats[self.select_model]
        mean_sq, sel = stats.mean_sq, self.selection
        out: dict[str, Any] = {
            "format": "posttrain-probe/fisher-features",
            "format_version": 1,
            "settings": self.settings,
            "documents": {**self.documents, "tokens": {seg: int(stats.n_tokens[j]) for j, seg in enumerate(SEGMENTS)}},
            "fisher": {
                "definition": "ImportanceRatio(j) = E_reasoning[f_j^2] / max(E_solution[f_j^2], 1e-8) (paper S eq. 1); candidates: live and E_reasoning >= floor; top-k by ratio",
                "model": self.select_model,
                "epsilon": EPSILON,
                "floor": sel.floor,
                "floor_quantile": sel.floor_quantile,
                "n_features": int(sel.ratio.numel()),
                "n_live": int(sel.live.sum()),
                "n_candidates": int(sel.candidates.sum()),
                "k": sel.k,
                "n_selected": len(sel.features),
                "selected": [
                    {"feature": f, "rank": r + 1, "importance_ratio": float(sel.ratio[f]), "e_reasoning": float(mean_sq[0, f]), "e_solution": float(mean_sq[1, f])}
                    for r, f in enumerate(sel.features)
                ],
            },
            "rho": {
                "definition": "rho(x) = fraction of a segment's tokens on which some selected feature fires (paper S eq. 14), per document; documents without the segment are left out",
                "models": self.rho_summary(),
            },
        }
        if len(sel.features) < sel.k:
            out["fisher"]["note"] = f"only {len(sel.features)} candidates passed the magnitude floor, fewer than k={sel.k}"
        if self.reasonscore is not None:
            k = len(sel.features)
            part = self.reasonscore.summary(k)
            overlap = len(set(part["top_features"]) & set(sel.features))
            out["reasonscore"] = {**part, "model": self.select_model, "overlap_with_fisher": overlap, "overlap_fraction": overlap / k if k else math.nan}
        return json_safe(out)

    def write(self, out_dir: str | os.PathLike, *, table_format: str = "csv") -> dict[str, Any]:
        """Write the feature sets, tables, summary and figure into ``out_dir``; returns the file paths.

        Files: ``fisher_features.json`` (feature set: provenance method, model, dataset, floor, k, layer, ...),
        ``reasonscore_features.json`` (the ReasonScore top-k, same size, for comparison), ``features.<fmt>``
        (:meth:`table`), ``rho.<fmt>`` (:meth:`rho_table`), ``summary.json``, ``rho.png``/``rho.svg``.
        """
        from posttrain_probe.analysis.features import write_table
        from posttrain_probe.analysis.feature_sets import write_feature_set

        if table_format not in ("csv", "parquet"):
            raise ProbeError(f"table format {table_format!r}: expected csv or parquet")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sel, s = self.selection, self.settings
        provenance = {
            "model": self.select_model, "branch": s["branches"][self.select_model], "crosscoder_kind": s["kind"],
            "dataset": s["dataset"], "segment_format": s["segment_format"]["format"], "layer": s["layer"], "k": sel.k,
            "n_docs": self.documents["n_docs"],
        }  # fmt: skip
        files: dict[str, Any] = {}
        source = s["crosscoder"] if s["crosscoder"] is not None else self.crosscoder
        files["feature_set"] = str(write_feature_set(
            out / "fisher_features.json", sel.features, crosscoder=source, method="fisher-importance-ratio",
            floor=sel.floor, floor_quantile=sel.floor_quantile, ranked=sel.features, **provenance,
        ))  # fmt: skip
        if self.reasonscore is not None:
            top = self.reasonscore.top(len(sel.features))
            files["reasonscore_feature_set"] = str(write_feature_set(
                out / "reasonscore_features.json", top, crosscoder=source, method="reasonscore",
                alpha=self.reasonscore.alpha, window=list(self.reasonscore.window), ranked=top, **provenance,
            ))  # fmt: skip
        files["table"] = str(write_table(self.table(), out / f"features.{table_format}"))
        files["rho_table"] = str(write_table(self.rho_table(), out / f"rho.{table_format}"))
        rho = {name: (st.rho[:, 0].numpy(), st.rho[:, 1].numpy()) for name, st in self.stats.items()}
        files["figures"] = [str(p) for p in plot_rho_distributions(rho, out / "rho", title_suffix=f"{len(sel.features)} Fisher features of {self.select_model}")]
        files["summary"] = str(out / "summary.json")
        (out / "summary.json").write_text(json.dumps({**self.summary(), "files": files}, indent=2))
        return files


def plot_rho_distributions(rho_by_model: Mapping[str, tuple[Any, Any]], path, *, bins: int = 20, title_suffix: str | None = None) -> list[Path]:
    """Histograms of rho for reasoning vs solution segments, one panel per model (paper S figs. 4-6).

    ``rho_by_model`` maps a model name to ``(rho_reasoning [n_docs], rho_solution [n_docs])`` (unitless, in
    [0, 1]; NaN = the document has no such segment, left out). Bars give the fraction of documents per bin
    (``bins`` equal bins over [0, 1]); dotted lines mark the means. Writes ``<path>.png`` and ``<path>.svg``.
    """
    from posttrain_probe.analysis.plots import PALETTE, new_figure, save_figure, plot_style

    if not rho_by_model:
        raise ProbeError("rho_by_model is empty: expected model name -> (rho_reasoning, rho_solution)")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ProbeError(f"bins={bins!r}: expected a positive integer")
    edges = np.linspace(0.0, 1.0, bins + 1)
    colours = {"reasoning": PALETTE[1], "solution": PALETTE[0]}  # paper: reasoning red, solution blue
    n = len(rho_by_model)
    with plot_style():
        fig = new_figure(3.4 * n + 0.4, 3.0)
        axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
        for ax, (name, (rho_r, rho_s)) in zip(axes, rho_by_model.items()):
            for segment, values in (("reasoning", rho_r), ("solution", rho_s)):
                values = _finite(np.asarray(values, dtype=np.float64).reshape(-1))
                if values.size == 0:
                    continue
                counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)
                fraction = counts / values.size
                colour = colours[segment]
                ax.stairs(fraction, edges, fill=True, color=colour, alpha=0.3)
                ax.stairs(fraction, edges, color=colour, linewidth=1.3, label=f"{segment} (n={values.size:,}, mean {values.mean():.2f})")
                ax.axvline(float(values.mean()), color=colour, linestyle=":", linewidth=1.0)
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel(r"$\rho$ (fraction of tokens with a reasoning feature active)")
            ax.set_title(name)
            ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
            ax.set_axisbelow(True)
            ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="best")
        axes[0].set_ylabel("fraction of documents")
        if title_suffix:
            fig.suptitle(rf"Distribution of $\rho$ per model ({title_suffix})", fontsize=10)
        return save_figure(fig, path)


# -- entry point -----------------------------------------------------------------------------------------------


def fisher_features(
    crosscoder,
    models: Mapping[str, str | os.PathLike | nn.Module],
    dataset: Any,
    *,
    sae: bool = False,
    select_model: str | None = None,
    segment_format: SegmentFormat | None = None,
    top_k: int = DEFAULT_TOP_K,
    floor_quantile: float = DEFAULT_FLOOR_QUANTILE,
    floor: float | None = None,
    layer: int | None = None,
    tokenizer=None,
    max_docs: int | None = 1000,
    seq_len: int = 4096,
    forward_batch_size: int = 4,
    split: str = "train",
    dataset_config: str | None = None,
    model_dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    reasonscore: bool = True,
    alpha: float = ALPHA,
    window: tuple[int, int] = WINDOW,
    reason_tokens: Sequence[str] | None = None,
    decoder_norm_weighted: bool = True,
    progress: bool = False,
    allow_model_mismatch: bool = False,
) -> FisherReport:
    """Fisher reasoning features of one model's codes, rho for every model, and the ReasonScore baseline.

    Args:
        crosscoder: a :class:`~posttrain_probe.crosscoder.Crosscoder` or its directory. With ``sae=False`` every
            model name must be one of its branches (each model is encoded with its own branch); with ``sae=True``
            it must be a 1-model crosscoder (an SAE), and every model is encoded with that one branch.
        models: model name -> local dir, hub name or loaded causal LM (loaded models need ``tokenizer``).
            Models given as paths are loaded one at a time (blocks after ``layer`` dropped) and freed after use.
        dataset: a dataset spec (:func:`posttrain_probe.data.load_dataset_spec`) or a ``datasets.Dataset``.
        select_model: the model whose codes select the features (default: the first).
        segment_format: where the segments are (:class:`SegmentFormat`; default OpenThoughts tags).
        top_k, floor_quantile, floor: the selection (:func:`select_fisher_features`).
        layer: site (default and required match: the crosscoder's layer).
        max_docs, seq_len, forward_batch_size, split, dataset_config: the documents read (the first ``max_docs``
            rows; each truncated at ``seq_len`` tokens; documents whose segments are cut are counted).
        reasonscore, alpha, window, reason_tokens, decoder_norm_weighted: the ReasonScore baseline on the select
            model (:mod:`~posttrain_probe.analysis.reasonscore`; defaults: the official settings and word list).
        allow_model_mismatch: encode even a model that is not the one its branch (the SAE's model) was trained on
            nor tuned from it, which is refused otherwise (:mod:`posttrain_probe.model_identity`); the mismatches are
            recorded in ``settings["model_mismatch"]``.

    Returns:
        :class:`FisherReport`. Raises ProbeError when no document has a reasoning (or a solution) segment.
    """
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.data import load_dataset_spec
    from posttrain_probe.layers import hidden_size, validate_layer
    from posttrain_probe.model_identity import check_model, slot_fingerprint
    from posttrain_probe.models import check_same_tokenizer, load_causal_lm, load_tokenizer, resolve_device

    if isinstance(crosscoder, (str, os.PathLike)):
        cc, cc_path = load_crosscoder(crosscoder), str(crosscoder)
    else:
        cc, cc_path = crosscoder, None
    if sae and cc.n_models != 1:
        raise ProbeError(f"an SAE is a 1-model crosscoder, but {cc_path or 'the crosscoder'} has models {cc.model_names}: pass it as --crosscoder")
    models = dict(models)
    if not models:
        raise ProbeError("no model given: expected at least one NAME=PATH")
    select_model = next(iter(models)) if select_model is None else select_model
    if select_model not in models:
        raise ProbeError(f"select model {select_model!r} is not one of the models given {list(models)}")
    branches = {name: (0 if sae else cc.model_index(name)) for name in models}
    if layer is None:
        layer = cc.config.layer
        if layer is None:
            raise ProbeError("the crosscoder does not record its layer: pass layer= (--layer)")
    elif cc.config.layer is not None and layer != cc.config.layer:
        raise ProbeError(f"the crosscoder was trained at layer {cc.config.layer}, fisher asked for layer {layer}")
    fmt = segment_format if segment_format is not None else SegmentFormat()
    if not 0.0 <= floor_quantile < 1.0:
        raise ProbeError(f"floor quantile must be in [0, 1), got {floor_quantile!r} (0.9 = top decile)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ProbeError(f"top_k must be a positive number of features, got {top_k!r}")

    path_models = {n: m for n, m in models.items() if not isinstance(m, nn.Module)}
    if tokenizer is None:
        if len(path_models) < len(models):
            raise ProbeError("models were given as objects: pass tokenizer= as well")
        tokenizers = {n: load_tokenizer(m) for n, m in path_models.items()}
        check_same_tokenizer(tokenizers)
        tokenizer = tokenizers[select_model]
    elif path_models:
        check_same_tokenizer({"tokenizer=": tokenizer, **{n: load_tokenizer(m) for n, m in path_models.items()}})
    if not getattr(tokenizer, "is_fast", False):
        raise ProbeError(f"{type(tokenizer).__name__} is not a fast tokenizer: segment spans need its offset mapping")

    data = load_dataset_spec(dataset, split=split, config_name=dataset_config, n_docs=max_docs)
    column = None if fmt.format == "columns" else document_column(list(data.column_names), fmt)
    docs = [split_document(row, fmt, tokenizer, column=column) for row in data]
    documents = {
        "n_docs": len(docs),
        "with_reasoning": sum(bool(d.reasoning) for d in docs),
        "with_solution": sum(bool(d.solution) for d in docs),
    }
    where = f"column {column!r}" if column else f"columns {fmt.reasoning_column!r}/{fmt.solution_column!r}"
    for segment in SEGMENTS:
        if documents[f"with_{segment}"] == 0:
            expected = (
                f"non-empty text in {where}" if fmt.format == "columns"
                else "{} ... {} in the assistant turns or text of {}".format(*fmt.delimiters[SEGMENTS.index(segment)], where)
            )  # fmt: skip
            raise ProbeError(f"no {segment} segment found in any of the {len(docs)} documents of {dataset if isinstance(dataset, (str, os.PathLike)) else 'the dataset'} (format {fmt.format!r}): expected {expected}")
    special_ids = set(tokenizer.all_special_ids) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())

    def batches() -> Iterator[SegmentBatch]:
        return segment_batches(docs, tokenizer, seq_len=seq_len, batch_size=forward_batch_size)

    run_device = resolve_device(device)
    home = cc.W_enc.device
    stats: dict[str, SegmentStats] = {}
    selection: FisherSelection | None = None
    reason_result: ReasonScoreResult | None = None
    order = [select_model] + [n for n in models if n != select_model]
    mismatches: dict[str, str] = {}
    try:
        for name in order:
            given = models[name]
            model = given if isinstance(given, nn.Module) else load_causal_lm(given, dtype=model_dtype, device=run_device, keep_layers=layer)
            try:
                validate_layer(model, layer)
            except ProbeError as err:
                raise ProbeError(f"model {name!r}: {err}") from None
            if hidden_size(model) != cc.config.d_model:
                raise ProbeError(f"model {name!r} has hidden size {hidden_size(model)} but the crosscoder has d_model {cc.config.d_model}: expected the crosscoder trained on this model family")
            what = f"model {name!r}" + (f" ({given})" if not isinstance(given, nn.Module) else "")
            mismatch = check_model(model, slot_fingerprint(cc, branches[name]), cc.model_names[branches[name]], what=what, allow_mismatch=allow_model_mismatch)
            if mismatch:
                mismatches[name] = mismatch
            param = next(model.parameters(), None)
            cc.to(param.device if param is not None else run_device)
            common = dict(layer=layer, n_docs=len(docs), special_ids=special_ids, progress=progress)
            if name == select_model:
                accumulator = None
                if reasonscore:
                    words, groups = reasoning_token_groups(tokenizer, REASON_TOKENS if reason_tokens is None else reason_tokens)
                    weights = cc.W_dec.detach()[:, branches[name]].norm(dim=-1) if decoder_norm_weighted else None
                    accumulator = ReasonScoreAccumulator(words, groups, cc.config.n_features, weights=weights, alpha=alpha, window=window)
                first = segment_statistics(model, cc, branches[name], batches(), reasonscore=accumulator, desc=f"fisher {name}", **common)
                if int(first.n_tokens[0]) == 0 or int(first.n_tokens[1]) == 0:
                    missing = "reasoning" if int(first.n_tokens[0]) == 0 else "solution"
                    raise ProbeError(f"no {missing} tokens left after tokenisation (seq_len {seq_len}): the segments start beyond the first {seq_len} tokens; raise --seq-len")
                e = first.mean_sq
                selection = select_fisher_features(e[0], e[1], first.live, k=top_k, floor_quantile=floor_quantile, floor=floor)
                if not selection.features:
                    raise ProbeError(f"no candidate feature: no live feature of {name!r} has E_reasoning[f^2] > 0 and >= the floor {selection.floor:.4g}")
                reason_result = accumulator.result() if accumulator is not None else None
            stats[name] = segment_statistics(model, cc, branches[name], batches(), features=selection.features, desc=f"rho {name}", **common)
            del model
            if run_device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        cc.to(home)
    stats = {name: stats[name] for name in models}
    documents["cut_by_seq_len"] = stats[select_model].n_cut
    settings = {
        "crosscoder": cc_path,
        "kind": "sae" if sae else "crosscoder",
        "crosscoder_models": cc.model_names,
        "models": {n: (str(m) if not isinstance(m, nn.Module) else None) for n, m in models.items()},
        "branches": {n: cc.model_names[b] for n, b in branches.items()},
        "select_model": select_model,
        "layer": layer,
        "dataset": str(dataset) if isinstance(dataset, (str, os.PathLike)) else None,
        "split": split,
        "dataset_config": dataset_config,
        "segment_format": fmt.describe(),
        "column": column,
        "max_docs": max_docs,
        "seq_len": seq_len,
        "code_units": "per-source codes f^m of the crosscoder branch (normalised-input units)",
    }
    if mismatches:
        settings["model_mismatch"] = mismatches
    return FisherReport(settings, select_model, selection, stats, documents, reason_result, cc)
