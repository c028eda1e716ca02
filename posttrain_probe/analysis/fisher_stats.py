"""Fisher statistics of per-source codes over reasoning and solution tokens (paper S eq. 1, eq. 14; docs/methods.md sec. 8).

The formulas: :func:`fisher_importance_ratio` (S eq. 1), :func:`magnitude_floor` and :func:`select_fisher_features`
(the selection), :func:`rho_statistic` (S eq. 14); and their accumulation over the tokens of a corpus
(:func:`segment_statistics` -> :class:`SegmentStats`): E_reasoning[f_j^2] and E_solution[f_j^2] as token-weighted
means over all segment tokens (the first position, special tokens and padding never count), accumulated in
float64 on the model's device. Code units: the crosscoder's per-source codes f^m (its normalised-input units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from posttrain_probe.analysis.reasonscore import ReasonScoreAccumulator
from posttrain_probe.analysis.segments import SegmentCorpus
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
    active: torch.Tensor | None
    """[2, F] int64 tokens with f_j > 0 per segment (None: not on disk, for a model other than the select model
    of a :meth:`FisherReport.read <posttrain_probe.analysis.fisher_report.FisherReport.read>`)."""
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
        if self.active is None:
            raise ProbeError(
                "these statistics were read back without their active counts (only the select model's are on disk)"
            )
        return self.active.double() / self.n_tokens.clamp_min(1).double()[:, None]

    @property
    def live(self) -> torch.Tensor:
        """[F] bool: fired on at least one segment token."""
        if self.active is None:
            raise ProbeError(
                "these statistics were read back without their active counts (only the select model's are on disk)"
            )
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
    corpus: SegmentCorpus,
    *,
    layer: int,
    features: list[int] | None = None,
    reasonscore: ReasonScoreAccumulator | None = None,
    progress: bool = False,
    desc: str = "fisher",
) -> SegmentStats:
    """Truncated forwards of ``model`` over the documents of ``corpus`` and the statistics of the branch's per-source codes.

    Kept tokens: real, not the first position, not a special token (``corpus.special_ids``). Per segment
    (reasoning, solution): token counts, sum f_j^2 and active counts, accumulated in float64/int64 on the model's
    device; with ``features`` (the selected set S) also per document the tokens on which some j in S fires (rho);
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
    n_docs = corpus.n_docs
    doc_tokens = torch.zeros(n_docs, 2, dtype=torch.int64, device=device)
    selected = torch.as_tensor(list(features), dtype=torch.long, device=device) if features is not None else None
    hits = torch.zeros(n_docs, 2, dtype=torch.float64, device=device) if selected is not None else None
    special = torch.as_tensor(sorted(set(int(i) for i in corpus.special_ids)), dtype=torch.long, device=device)
    n_cut = 0
    training = model.training
    model.eval()
    try:
        bar = tqdm(total=n_docs, desc=desc, unit="doc", disable=not progress)
        for batch in corpus.batches():
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
                    fired = (
                        (codes[:, selected] > 0).any(dim=1)[in_any]
                        if selected.numel()
                        else torch.zeros_like(where[0], dtype=torch.bool)
                    )
                    hits.index_put_(where, fired.double(), accumulate=True)
                if reasonscore is not None:
                    reasonscore.update(codes, words[part])
        bar.close()
    finally:
        model.train(training)
    return SegmentStats(
        n_tokens.cpu(), sq_sum.cpu(), active.cpu(), doc_tokens.cpu(), hits.cpu() if hits is not None else None, n_cut
    )
