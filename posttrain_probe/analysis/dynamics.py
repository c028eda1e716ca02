"""Checkpoint dynamics: how the most tuned-specific features form and move during training.

docs/methods.md sec. 5, after paper R sec. 5.2 and appendix B.1. Every checkpoint c of a run gets a score
vector s_c over one shared feature index (NRN of checkpoint c against the base); T_c is the top-k
(k = 50) of s_c. From the score matrix ``scores [C, F]`` this module computes

- :func:`topk_overlap`: overlap(c, c') = |T_c ∩ T_c'| / k (paper R fig. 2);
- :func:`rank_shifts`: |rank_{c+1}(f) - rank_c(f)| for f in T_c, and which f left the top-k
  ("blanks", paper R figs. 8-11).

The shared index comes by default from one multi-model crosscoder over the base and all
checkpoints (:func:`checkpoint_scores`). The alternative of the paper, one two-model crosscoder
per checkpoint, needs its features matched across crosscoders first: :func:`shared_index` matches
every crosscoder's whole decoders (all model rows) to the features seen so far (Hungarian
assignment on decoder cosine with a cosine floor; below it a feature stays unmatched and gets an
index of its own, never a forced partner) and :func:`indexed_scores` lays the scores out over that
index. :func:`match_features` is the pairwise matching underneath.

A score is undefined (NaN) where the feature's decoder norms in both compared models are below
``norm_floor`` times the largest decoder norm of the crosscoder (:func:`negligible_features`;
such latents carry nothing, but their NRN can be anything in [0, 1]) or where the feature is dead
by its activations. Undefined scores take no part in top-k sets, ranks (they come last) or counts.
When several features tie at the k-th score, :func:`top_k_ties` says how many, and whether the
top-k set is decided by the scores at all or only by the index order used to break the tie.

Everything is vectorised over features. Scores are unitless; ranks are 1-based among all F
features by descending score, ties broken by the lower feature index, NaN (undefined) scores last.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from posttrain_probe.analysis.analyze_config import DEFAULT_K, DEFAULT_MIN_COSINE, DEFAULT_NORM_FLOOR, DEFAULT_TIE_ATOL
from posttrain_probe.analysis.attribution import nrn
from posttrain_probe.errors import ProbeError


class RankShifts(NamedTuple):
    """Rank movement of the top-k features between consecutive checkpoints (paper R B.1)."""

    features: torch.Tensor
    """[C-1, k] int64: row c is T_c, the top-k feature indices of checkpoint c, best first."""
    shift: torch.Tensor
    """[C-1, k] float32: |rank_{c+1}(f) - rank_c(f)| for f = features[c, j] (1-based ranks among
    all F features); defined for blanks too (their rank at c+1 lies beyond k)."""
    blank: torch.Tensor
    """[C-1, k] bool: features[c, j] is in T_c but not in T_{c+1}."""


class TopKTies(NamedTuple):
    """How the k-th score of every checkpoint's top-k set is tied (docs/methods.md sec. 5)."""

    kth_score: torch.Tensor
    """[C] float32: the k-th best score of each row."""
    n_tied: torch.Tensor
    """[C] int64: features whose score lies within ``atol`` of the k-th score (1 = no tie)."""
    n_tied_in_top: torch.Tensor
    """[C] int64: how many of those tied features are in T_c."""
    determined: torch.Tensor
    """[C] bool: every tied feature is in T_c, i.e. the scores alone decide the set (False: the
    set was completed by lowest index among ``n_tied`` equal scores)."""


class MatchQuality(NamedTuple):
    """Summary of a feature matching's decoder cosines over the matched pairs (docs/methods.md sec. 5)."""

    mean: float
    """Mean cosine of the matched pairs (NaN when nothing matched)."""
    median: float
    """Median cosine of the matched pairs (NaN when nothing matched)."""
    frac_above_0_9: float
    """Fraction of matched pairs with cosine > 0.9."""
    frac_above_0_7: float
    """Fraction of matched pairs with cosine > 0.7."""
    n_matched: int
    """Number of matched pairs (min(F_a, F_b) without a cosine floor)."""
    n_unmatched: int = 0
    """Features of a left without a partner (beyond F_b, or below the cosine floor)."""
    min_cosine: float | None = None
    """The cosine floor of the matching (None: forced one-to-one)."""


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
    """T_c: the k highest-scoring features of every checkpoint (docs/methods.md sec. 5, R sec. 5.2).

    ``scores`` [C, F] (tensor or array, unitless, e.g. NRN of checkpoint c against the base over a
    shared feature index). Returns [C, k] int64 feature indices, best first. NaN scores are never
    selected; ties are broken by the lower feature index, so the result is deterministic.
    Raises ProbeError when k is not in [1, F] or a row has fewer than k non-NaN scores.
    """
    s = _as_scores(scores)
    _check_k(k, s)
    return _descending_order(s)[:, :k].contiguous()


def topk_overlap(scores, k: int = DEFAULT_K) -> torch.Tensor:
    """Top-k overlap matrix overlap(c, c') = |T_c ∩ T_c'| / k (docs/methods.md sec. 5, R sec. 5.2, fig. 2).

    ``scores`` [C, F] as for :func:`top_k_sets`. Returns [C, C] float32, symmetric, in [0, 1], with
    ones on the diagonal.
    """
    s = _as_scores(scores)
    member = _membership(top_k_sets(s, k), s.shape[1]).to(torch.float32)
    return (member @ member.T) / k


def rank_shifts(scores, k: int = DEFAULT_K) -> RankShifts:
    """Rank shifts of each checkpoint's top-k at the next checkpoint (docs/methods.md sec. 5, R B.1).

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


def negligible_features(W_dec, slots: list[int], norm_floor: float = DEFAULT_NORM_FLOOR) -> torch.Tensor:
    """Features whose decoder norms in every one of ``slots`` are negligible (docs/methods.md sec. 5).

    ``W_dec`` [F, M, d] a crosscoder's decoder (normalised units), ``slots`` the compared model
    slots, ``norm_floor`` a fraction in [0, 1): a feature is negligible when ||d_i^m||_2 <
    ``norm_floor`` * max_{j, m'} ||d_j^m'||_2 for every m in ``slots`` (the max runs over all
    features and all slots of the crosscoder). Such a latent writes nothing to the compared models,
    yet its NRN (a ratio of two tiny norms) can be anywhere in [0, 1]; its score is undefined.
    ``norm_floor = 0`` flags only exactly-zero decoders. Returns [F] bool on W_dec's device.
    """
    w = torch.as_tensor(W_dec).detach()
    if isinstance(norm_floor, bool) or not isinstance(norm_floor, (int, float)) or not 0 <= norm_floor < 1:
        raise ProbeError(
            f"norm_floor={norm_floor!r} is invalid; expected a fraction of the largest decoder norm in [0, 1)"
        )
    norms = torch.linalg.vector_norm(w.float(), dim=-1)  # [F, M]
    cut = norm_floor * norms.max()
    selected = norms[:, list(slots)]
    return (selected < cut).all(dim=1) | (selected == 0).all(dim=1)


def checkpoint_scores(
    W_dec,
    base: int,
    checkpoints: list[int],
    p: float = 1,
    *,
    norm_floor: float = DEFAULT_NORM_FLOOR,
    live=None,
) -> torch.Tensor:
    """NRN of every checkpoint against the base over one shared multi-model crosscoder.

    docs/methods.md sec. 5 default: one crosscoder over base + all checkpoints of a run, so all
    checkpoints share one feature index. ``W_dec`` [F, M, d] the crosscoder's decoder (row
    ``W_dec[i, m]`` is feature i's decoder vector for model slot m, in the units of
    :func:`~posttrain_probe.analysis.attribution.nrn`), ``base`` the base model's slot,
    ``checkpoints`` the C checkpoint slots in training order, ``p`` the norm order (1 as in R eq. 4;
    2 gives the relative decoder norm). Returns [C, F] float32 on CPU, row c =
    ``nrn(W_dec, base, checkpoints[c], p)``: ||d_i^c||_p / (||d_i^base||_p + ||d_i^c||_p), unitless,
    and NaN (undefined) where feature i is negligible in both the base and checkpoint c
    (:func:`negligible_features` with ``norm_floor``) or, with ``live`` ([F] bool, from
    activations), dead.
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
    dead = _dead_mask(live, w.shape[0])
    rows = []
    for c in checkpoints:
        undefined = negligible_features(w, [int(base), int(c)], norm_floor).cpu() | dead
        rows.append(nrn(w, int(base), int(c), p=p).float().cpu().masked_fill(undefined, float("nan")))
    return torch.stack(rows)


def _dead_mask(live, n_features: int) -> torch.Tensor:
    """[F] bool dead mask from an optional [F] bool liveness vector."""
    if live is None:
        return torch.zeros(n_features, dtype=torch.bool)
    alive = torch.as_tensor(live).detach().cpu()
    if alive.dtype != torch.bool or tuple(alive.shape) != (n_features,):
        raise ProbeError(f"live has dtype {alive.dtype} and shape {tuple(alive.shape)}; expected [F={n_features}] bool")
    return ~alive


def top_k_ties(scores, k: int = DEFAULT_K, atol: float = DEFAULT_TIE_ATOL) -> TopKTies:
    """Ties at the cut of every top-k set T_c (docs/methods.md sec. 5).

    ``scores`` [C, F] as for :func:`top_k_sets`; ``atol`` >= 0 the absolute distance (score units)
    within which two scores count as equal. A top-k set is *determined* when no feature outside it
    ties with its k-th member: otherwise the set depends on the lowest-index tie break, not on the
    scores, and dynamics built on it must be read with that in mind. Returns :class:`TopKTies`.
    """
    s = _as_scores(scores)
    _check_k(k, s)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ProbeError(f"atol={atol!r} is invalid; expected a score distance >= 0")
    order = _descending_order(s)
    kth = s.gather(1, order[:, k - 1 : k])  # [C, 1]
    tied = (s - kth).abs() <= atol  # NaN compares False
    in_top = _membership(order[:, :k], s.shape[1])
    n_tied = tied.sum(dim=1)
    n_in = (tied & in_top).sum(dim=1)
    return TopKTies(kth_score=kth[:, 0].float(), n_tied=n_tied, n_tied_in_top=n_in, determined=n_tied == n_in)


class SharedIndex(NamedTuple):
    """One feature index over several crosscoders, from their matched decoders (docs/methods.md sec. 5)."""

    ids: list[torch.Tensor]
    """Per crosscoder c, [F_c] int64: the shared index of each of its features; -1 for features left
    out of the matching (excluded: undefined scores)."""
    n_features: int
    """U, the size of the shared index (features of the first crosscoder plus every later feature
    that matched nothing seen before)."""
    quality: list[MatchQuality | None]
    """Per crosscoder: the quality of its matching to the index built from the crosscoders before it
    (None for the first)."""


def shared_index(vectors, min_cosine: float | None = DEFAULT_MIN_COSINE, include=None) -> SharedIndex:
    """Match the features of C crosscoders into one shared index (docs/methods.md sec. 5, per-checkpoint alternative).

    ``vectors`` a list of C [F_c, D] per-feature vectors, one per crosscoder in training order: the
    whole decoder of each feature, all model rows concatenated (``W_dec.reshape(F, -1)`` of a
    (base, checkpoint) crosscoder; the base rows anchor shared features, the tuned rows carry the
    tuned-specific ones). ``include`` optional list of C [F_c] bool: features to match (default
    all; leave out those whose scores are undefined). The first crosscoder's included features
    start the index; each later crosscoder is matched (:func:`match_features`, Hungarian with the
    cosine floor ``min_cosine``) against every index entry seen so far, represented by its most
    recent vector; a feature below the floor gets a new entry of its own instead of a forced
    partner, so features that appear and disappear from checkpoint to checkpoint stay distinct.
    Memory and time: one dense F_c x U cosine matrix per crosscoder.
    """
    if not isinstance(vectors, (list, tuple)) or not vectors:
        raise ProbeError("vectors must be a non-empty list of [F_c, D] matrices, one per crosscoder")
    mats = [torch.as_tensor(v).detach().cpu().float() for v in vectors]
    width = mats[0].shape[-1] if mats[0].ndim == 2 else None
    for c, m in enumerate(mats):
        if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] != width:
            raise ProbeError(f"vectors[{c}] has shape {tuple(m.shape)}; expected [F_c, D={width}] like vectors[0]")
    masks = (
        [torch.ones(m.shape[0], dtype=torch.bool) for m in mats]
        if include is None
        else [torch.as_tensor(x).cpu() for x in include]
    )
    if len(masks) != len(mats) or any(x.dtype != torch.bool or x.shape != (m.shape[0],) for x, m in zip(masks, mats)):
        raise ProbeError("include must hold one [F_c] bool mask per crosscoder")
    ids: list[torch.Tensor] = []
    quality: list[MatchQuality | None] = []
    index_vectors = torch.empty(0, width)
    for c, (m, mask) in enumerate(zip(mats, masks)):
        own = torch.full((m.shape[0],), -1, dtype=torch.int64)
        rows = torch.nonzero(mask).flatten()
        if c == 0 or index_vectors.shape[0] == 0 or rows.numel() == 0:
            new = rows
            quality.append(None if c == 0 else _quality(torch.empty(0), int(rows.numel()), min_cosine))
        else:
            matching = match_features(m[rows], index_vectors, min_cosine=min_cosine)
            hit = matching.perm >= 0
            own[rows[hit]] = matching.perm[hit]
            index_vectors[matching.perm[hit]] = m[rows[hit]]
            new = rows[~hit]
            quality.append(matching.quality)
        own[new] = torch.arange(index_vectors.shape[0], index_vectors.shape[0] + new.numel())
        index_vectors = torch.cat([index_vectors, m[new]])
        ids.append(own)
    return SharedIndex(ids=ids, n_features=int(index_vectors.shape[0]), quality=quality)


def indexed_scores(scores, index: SharedIndex) -> torch.Tensor:
    """Lay per-crosscoder scores out over a :class:`SharedIndex` (docs/methods.md sec. 5).

    ``scores`` a list of C [F_c] score vectors (e.g. NRN of each (base, checkpoint) crosscoder),
    in the order of :func:`shared_index`'s ``vectors``. Returns [C, U] float32 with
    ``out[c, index.ids[c][i]] = scores[c][i]`` and NaN wherever crosscoder c has no feature for an
    index entry, ready for :func:`topk_overlap` and :func:`rank_shifts`.
    """
    if len(scores) != len(index.ids):
        raise ProbeError(f"{len(scores)} score vectors for a shared index over {len(index.ids)} crosscoders")
    out = torch.full((len(scores), index.n_features), float("nan"), dtype=torch.float32)
    for c, (score, ids) in enumerate(zip(scores, index.ids)):
        score = torch.as_tensor(score).detach().cpu().float()
        if score.shape != ids.shape:
            raise ProbeError(
                f"scores[{c}] has shape {tuple(score.shape)}; expected [{ids.numel()}] (features of crosscoder {c})"
            )
        keep = ids >= 0
        out[c, ids[keep]] = score[keep]
    return out


def match_features(vectors_a, vectors_b, min_cosine: float | None = None) -> FeatureMatching:
    """Match the features of crosscoder a to those of crosscoder b by decoder cosine (docs/methods.md sec. 5).

    For the alternative shared index of docs/methods.md sec. 5 (one two-model crosscoder per checkpoint, as in
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
    NaN). Zero vectors have cosine 0 with everything. ``min_cosine`` (a cosine floor in [-1, 1],
    docs/methods.md sec. 5): pairs below it are worth nothing to the assignment and are never reported
    as matched - their feature of a stays unmatched (perm -1) instead of being forced onto an
    unrelated latent; None keeps the forced one-to-one assignment. Memory and time: a dense
    F_a x F_b float64 cost matrix and an O(F^3) assignment (minutes for F = 16k).
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
        raise ProbeError(f"vectors_a has width {a.shape[1]} but vectors_b has width {b.shape[1]}; expected the same D")
    if min_cosine is not None and not (isinstance(min_cosine, (int, float)) and -1 <= min_cosine <= 1):
        raise ProbeError(f"min_cosine={min_cosine!r} is invalid; expected a cosine in [-1, 1] or None")
    a_unit = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    b_unit = b / b.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    cos = (a_unit @ b_unit.T).clamp_(-1.0, 1.0)  # zero rows stay exactly 0
    # With a floor, a pair below it is worth exactly as much as no pair: the assignment maximises the
    # summed cosine of the pairs that count, and those below the floor are dropped afterwards.
    gain = cos if min_cosine is None else torch.where(cos >= min_cosine, cos - min_cosine + 1e-9, torch.zeros_like(cos))
    rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
    rows_t, cols_t = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    if min_cosine is not None:
        keep = cos[rows_t, cols_t] >= min_cosine
        rows_t, cols_t = rows_t[keep], cols_t[keep]
    perm = torch.full((a.shape[0],), -1, dtype=torch.int64)
    perm[rows_t] = cols_t
    cosine = torch.full((a.shape[0],), float("nan"), dtype=torch.float32)
    matched = cos[rows_t, cols_t]
    cosine[rows_t] = matched.to(torch.float32)
    return FeatureMatching(perm=perm, cosine=cosine, quality=_quality(matched, a.shape[0], min_cosine))


def _quality(matched: torch.Tensor, n_a: int, min_cosine: float | None) -> MatchQuality:
    """MatchQuality of the cosines of the matched pairs out of ``n_a`` features of a."""
    n = int(matched.numel())
    return MatchQuality(
        mean=float(matched.mean()) if n else float("nan"),
        median=float(np.median(matched.numpy())) if n else float("nan"),
        frac_above_0_9=float((matched > 0.9).double().mean()) if n else 0.0,
        frac_above_0_7=float((matched > 0.7).double().mean()) if n else 0.0,
        n_matched=n,
        n_unmatched=n_a - n,
        min_cosine=None if min_cosine is None else float(min_cosine),
    )
