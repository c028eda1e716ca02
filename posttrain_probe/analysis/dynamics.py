"""Checkpoint dynamics: how the most tuned-specific features form and move during training.

SPEC.md sec. 5, after paper R sec. 5.2 and appendix B.1. Every checkpoint c of a run gets a score
vector s_c over one shared feature index (NRN of checkpoint c against the base); T_c is the top-k
(k = 50) of s_c. From the score matrix ``scores [C, F]`` this module computes

- :func:`topk_overlap`: overlap(c, c') = |T_c ∩ T_c'| / k (paper R fig. 2);
- :func:`rank_shifts`: |rank_{c+1}(f) - rank_c(f)| for f in T_c, and which f left the top-k
  ("blanks", paper R figs. 8-11).

The shared index comes by default from one multi-model crosscoder over the base and all
checkpoints (:func:`checkpoint_scores`). The alternative of the paper, one two-model crosscoder
per checkpoint, needs its features matched across crosscoders first: :func:`match_features`
(Hungarian assignment on decoder cosine, with a quality summary) and :func:`align_scores`.

Everything is vectorised over features. Scores are unitless; ranks are 1-based among all F
features by descending score, ties broken by the lower feature index, NaN (dead) scores last.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from posttrain_probe.analysis.attribution import nrn
from posttrain_probe.errors import ProbeError

DEFAULT_K = 50


class RankShifts(NamedTuple):
    """Rank movement of the top-k features between consecutive checkpoints (paper R B.1)."""

    features: torch.Tensor
    """[C-1, k] int64: row c is T_c, the top-k feature indices of checkpoint c, best first."""
    shift: torch.Tensor
    """[C-1, k] float32: |rank_{c+1}(f) - rank_c(f)| for f = features[c, j] (1-based ranks among
    all F features); defined for blanks too (their rank at c+1 lies beyond k)."""
    blank: torch.Tensor
    """[C-1, k] bool: features[c, j] is in T_c but not in T_{c+1}."""


class MatchQuality(NamedTuple):
    """Summary of a feature matching's decoder cosines over the matched pairs (SPEC.md sec. 5)."""

    mean: float
    """Mean cosine of the matched pairs."""
    median: float
    """Median cosine of the matched pairs."""
    frac_above_0_9: float
    """Fraction of matched pairs with cosine > 0.9."""
    frac_above_0_7: float
    """Fraction of matched pairs with cosine > 0.7."""
    n_matched: int
    """Number of matched pairs, min(F_a, F_b)."""


class FeatureMatching(NamedTuple):
    """One-to-one matching of the features of crosscoder a to those of crosscoder b."""

    perm: torch.Tensor
    """[F_a] int64: index in b matched to each feature of a; -1 where a has more features than b
    and feature i stayed unmatched."""
    cosine: torch.Tensor
    """[F_a] float32: cosine of each matched pair (0 where either vector is zero); NaN where
    unmatched."""
    quality: MatchQuality
    """Summary of ``cosine`` over the matched pairs; ``quality._asdict()`` is JSON-ready."""


def _as_scores(scores, name: str = "scores") -> torch.Tensor:
    """Score matrix as float tensor [C, F] on CPU, validated."""
    t = torch.as_tensor(scores).detach().cpu()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ProbeError(f"{name} has dtype {t.dtype}; expected a real-valued score matrix")
    t = t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ProbeError(f"{name} has shape {tuple(t.shape)}; expected a non-empty [C, F] matrix")
    return t


def _check_k(k: int, scores: torch.Tensor) -> None:
    n_features = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_features:
        raise ProbeError(f"k={k!r} is invalid; expected an integer in [1, F={n_features}]")
    n_live = (~torch.isnan(scores)).sum(dim=1)
    short = torch.nonzero(n_live < k).flatten()
    if short.numel():
        c = int(short[0])
        raise ProbeError(
            f"checkpoint row {c} has only {int(n_live[c])} non-NaN scores; expected at least k={k} "
            "(NaN scores are never selected)"
        )


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """[C, F] feature indices by descending score; ties by lower index; NaN last (by index)."""
    nan = torch.isnan(scores)
    key = torch.where(nan, torch.zeros_like(scores), -scores)
    order = torch.sort(key, dim=1, stable=True).indices
    # Second stable pass moves NaN to the end and keeps the score order of the rest.
    return order.gather(1, torch.sort(nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """[C, F] 1-based rank of every feature, from a [C, F] order."""
    positions = torch.arange(1, order.shape[1] + 1, dtype=torch.int64).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _membership(top: torch.Tensor, n_features: int) -> torch.Tensor:
    """[C, F] bool: feature f is in T_c, from the [C, k] top-k indices."""
    return torch.zeros(top.shape[0], n_features, dtype=torch.bool).scatter_(1, top, True)


def top_k_sets(scores, k: int = DEFAULT_K) -> torch.Tensor:
    """T_c: the k highest-scoring features of every checkpoint (SPEC.md sec. 5, R sec. 5.2).

    ``scores`` [C, F] (tensor or array, unitless, e.g. NRN of checkpoint c against the base over a
    shared feature index). Returns [C, k] int64 feature indices, best first. NaN scores are never
    selected; ties are broken by the lower feature index, so the result is deterministic.
    Raises ProbeError when k is not in [1, F] or a row has fewer than k non-NaN scores.
    """
    s = _as_scores(scores)
    _check_k(k, s)
    return _descending_order(s)[:, :k].contiguous()


def topk_overlap(scores, k: int = DEFAULT_K) -> torch.Tensor:
    """Top-k overlap matrix overlap(c, c') = |T_c ∩ T_c'| / k (SPEC.md sec. 5, R sec. 5.2, fig. 2).

    ``scores`` [C, F] as for :func:`top_k_sets`. Returns [C, C] float32, symmetric, in [0, 1], with
    ones on the diagonal.
    """
    s = _as_scores(scores)
    member = _membership(top_k_sets(s, k), s.shape[1]).to(torch.float32)
    return (member @ member.T) / k


def rank_shifts(scores, k: int = DEFAULT_K) -> RankShifts:
    """Rank shifts of each checkpoint's top-k at the next checkpoint (SPEC.md sec. 5, R B.1).

    ``scores`` [C, F] with C >= 2 checkpoints in training order. For every consecutive pair (c, c+1)
    and every f in T_c: shift = |rank_{c+1}(f) - rank_c(f)|, with 1-based ranks among all F
    features by descending score (ties by lower index, NaN last), and blank = f not in T_{c+1}.
    Returns :class:`RankShifts` with ``features`` [C-1, k] int64, ``shift`` [C-1, k] float32 (rank
    units), ``blank`` [C-1, k] bool.
    """
    s = _as_scores(scores)
    if s.shape[0] < 2:
        raise ProbeError(f"scores has {s.shape[0]} checkpoint row(s); rank shifts need at least 2")
    _check_k(k, s)
    order = _descending_order(s)
    ranks = _ranks(order)
    top = order[:, :k]
    member = _membership(top, s.shape[1])
    features = top[:-1].contiguous()
    rank_now = ranks[:-1].gather(1, features)
    rank_next = ranks[1:].gather(1, features)
    shift = (rank_next - rank_now).abs().to(torch.float32)
    blank = ~member[1:].gather(1, features)
    return RankShifts(features=features, shift=shift, blank=blank)


def checkpoint_scores(W_dec, base: int, checkpoints: list[int], p: float = 1) -> torch.Tensor:
    """NRN of every checkpoint against the base over one shared multi-model crosscoder.

    SPEC.md sec. 5 default: one crosscoder over base + all checkpoints of a run, so all
    checkpoints share one feature index. ``W_dec`` [F, M, d] the crosscoder's decoder (row
    ``W_dec[i, m]`` is feature i's decoder vector for model slot m, in the units of
    :func:`~posttrain_probe.analysis.attribution.nrn`), ``base`` the base model's slot,
    ``checkpoints`` the C checkpoint slots in training order, ``p`` the norm order (1 as in R eq. 4;
    2 gives the relative decoder norm). Returns [C, F] float32 on CPU, row c =
    ``nrn(W_dec, base, checkpoints[c], p)``: ||d_i^c||_p / (||d_i^base||_p + ||d_i^c||_p), NaN where
    both norms are 0 (dead), unitless.
    """
    w = torch.as_tensor(W_dec).detach()
    if w.ndim != 3 or min(w.shape) == 0:
        raise ProbeError(f"W_dec has shape {tuple(w.shape)}; expected a non-empty [F, M, d] decoder")
    n_models = w.shape[1]
    slots = [base, *checkpoints]
    if not checkpoints:
        raise ProbeError("checkpoints is empty; expected at least one checkpoint model slot")
    for slot in slots:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < n_models:
            raise ProbeError(f"model slot {slot!r} is invalid; expected an integer in [0, M={n_models})")
    if base in checkpoints:
        raise ProbeError(f"base slot {base} is also listed in checkpoints {checkpoints}; expected distinct slots")
    return torch.stack([nrn(w, int(base), int(c), p=p) for c in checkpoints]).to(torch.float32).cpu()


def match_features(vectors_a, vectors_b) -> FeatureMatching:
    """Match the features of crosscoder a to those of crosscoder b by decoder cosine (SPEC.md sec. 5).

    For the alternative shared index of SPEC.md sec. 5 (one two-model crosscoder per checkpoint, as in
    paper R sec. 5.2): a one-to-one assignment maximising the summed cosine between feature vectors
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).

    ``vectors_a`` [F_a, D] and ``vectors_b`` [F_b, D] are per-feature vectors (decoder rows, in the
    crosscoders' decoder units; the cosine is scale-free).
    Recommended: the concatenated decoder rows ``W_dec.reshape(F, -1)`` ([base; tuned], D = 2d) of
    each (base, checkpoint) crosscoder. The base half lives in the same space in both crosscoders
    (same base model) and anchors shared features; the tuned half matches the tuned-only features
    (NRN near 1, base row near 0) that the dynamics analysis is about. The tuned rows alone are a
    valid choice too; the function only sees vectors.

    F_a and F_b may differ: with F_a > F_b, F_a - F_b features of a stay unmatched (perm -1, cosine
    NaN). Zero vectors have cosine 0 with everything. Memory and time: a dense F_a x F_b float64
    cost matrix and an O(F^3) assignment (minutes for F = 16k).
    Returns :class:`FeatureMatching` with ``perm`` [F_a], ``cosine`` [F_a] and a quality summary.
    """
    from scipy.optimize import linear_sum_assignment

    a = torch.as_tensor(vectors_a).detach().cpu().to(torch.float64)
    b = torch.as_tensor(vectors_b).detach().cpu().to(torch.float64)
    for name, t in (("vectors_a", a), ("vectors_b", b)):
        if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ProbeError(f"{name} has shape {tuple(t.shape)}; expected a non-empty [F, D] matrix")
        if not torch.isfinite(t).all():
            raise ProbeError(f"{name} contains NaN or inf; expected finite decoder vectors")
    if a.shape[1] != b.shape[1]:
        raise ProbeError(
            f"vectors_a has width {a.shape[1]} but vectors_b has width {b.shape[1]}; expected the same D"
        )
    a_unit = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    b_unit = b / b.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    cos = (a_unit @ b_unit.T).clamp_(-1.0, 1.0)  # zero rows stay exactly 0
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    rows_t, cols_t = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    perm = torch.full((a.shape[0],), -1, dtype=torch.int64)
    perm[rows_t] = cols_t
    cosine = torch.full((a.shape[0],), float("nan"), dtype=torch.float32)
    matched = cos[rows_t, cols_t]
    cosine[rows_t] = matched.to(torch.float32)
    quality = MatchQuality(
        mean=float(matched.mean()),
        median=float(np.median(matched.numpy())),
        frac_above_0_9=float((matched > 0.9).double().mean()),
        frac_above_0_7=float((matched > 0.7).double().mean()),
        n_matched=int(matched.numel()),
    )
    return FeatureMatching(perm=perm, cosine=cosine, quality=quality)


def align_scores(scores_b, matching: FeatureMatching) -> torch.Tensor:
    """Carry per-feature scores of crosscoder b into crosscoder a's feature index (SPEC.md sec. 5).

    ``scores_b`` [..., F_b] (e.g. NRN of checkpoint c+1 from its own two-model crosscoder),
    ``matching`` from ``match_features(vectors_a, vectors_b)``. Returns [..., F_a] float32 with
    ``out[..., i] = scores_b[..., matching.perm[i]]`` and NaN for unmatched features of a, so rows
    from several crosscoders matched to one reference can be stacked into the [C, F] matrix that
    :func:`topk_overlap` and :func:`rank_shifts` take.
    """
    s = torch.as_tensor(scores_b).detach().cpu()
    if s.ndim == 0 or s.shape[-1] == 0:
        raise ProbeError(f"scores_b has shape {tuple(s.shape)}; expected [..., F_b] with F_b > 0")
    perm = matching.perm
    n_b = s.shape[-1]
    if perm.numel() and int(perm.max()) >= n_b:
        raise ProbeError(
            f"matching refers to feature {int(perm.max())} of b but scores_b has F_b={n_b}; "
            "expected the scores of the crosscoder the matching was computed against"
        )
    s = s.to(torch.float32)
    out = s[..., perm.clamp_min(0)]
    return out.masked_fill(perm < 0, float("nan"))
