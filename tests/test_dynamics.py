"""Checkpoint dynamics (SPEC.md sec. 5): top-k sets, overlap, rank shifts, shared index, matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posttrain_probe.analysis.dynamics import (
    FeatureMatching,
    RankShifts,
    align_scores,
    checkpoint_scores,
    match_features,
    rank_shifts,
    top_k_sets,
    topk_overlap,
)
from posttrain_probe.errors import ProbeError


def _reference_ranks(row: list[float]) -> dict[int, int]:
    """1-based ranks by descending score, ties by lower index, NaN last; written as a plain loop."""
    keyed = []
    for i, s in enumerate(row):
        keyed.append((1 if math.isnan(s) else 0, 0.0 if math.isnan(s) else -s, i))
    keyed.sort()
    return {i: r + 1 for r, (_, _, i) in enumerate(keyed)}


def _scores_with_ties_and_nans(c: int, f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.round(torch.rand(c, f, generator=g) * 40) / 40  # many ties
    s[torch.rand(c, f, generator=g) < 0.05] = float("nan")
    return s


# ---------------------------------------------------------------- top_k_sets / topk_overlap


def test_top_k_sets_order_ties_and_nan():
    scores = torch.tensor([[0.5, 0.9, 0.9, float("nan"), 0.1, 0.9], [float("nan"), 1.0, 0.0, 0.0, 0.0, 0.0]])
    top = top_k_sets(scores, k=4)
    assert top.dtype == torch.int64
    assert top.tolist() == [[1, 2, 5, 0], [1, 2, 3, 4]]
    # all equal scores: the lowest indices, in order
    assert top_k_sets(torch.zeros(2, 10), k=3).tolist() == [[0, 1, 2], [0, 1, 2]]
    # numpy input works the same
    assert top_k_sets(scores.numpy(), k=4).tolist() == top.tolist()


def test_top_k_sets_matches_reference_loop():
    scores = _scores_with_ties_and_nans(3, 300, seed=1)
    top = top_k_sets(scores, k=50)
    for c in range(3):
        ranks = _reference_ranks(scores[c].tolist())
        expected = sorted(ranks, key=ranks.get)[:50]
        assert top[c].tolist() == expected
        assert not torch.isnan(scores[c, top[c]]).any()


def test_topk_overlap_identity_and_symmetry():
    scores = torch.rand(4, 500, generator=torch.Generator().manual_seed(0))
    ov = topk_overlap(scores, k=50)
    assert ov.shape == (4, 4)
    assert torch.equal(torch.diagonal(ov), torch.ones(4))
    assert torch.equal(ov, ov.T)
    assert ((ov >= 0) & (ov <= 1)).all()


def test_topk_overlap_handmade_pair_30_of_50():
    f = 200
    a = -torch.arange(f, dtype=torch.float32)  # top-50 = 0..49
    b = torch.zeros(f)
    b[20:70] = torch.linspace(2.0, 1.0, 50)  # top-50 = 20..69, 30 shared with a
    c = torch.zeros(f)
    c[100:150] = 1.0  # disjoint from a and b
    ov = topk_overlap(torch.stack([a, b, c]), k=50)
    assert ov[0, 1].item() == pytest.approx(0.6)
    assert ov[1, 0].item() == pytest.approx(0.6)
    assert ov[0, 2].item() == 0.0
    assert ov[1, 2].item() == 0.0


# ---------------------------------------------------------------- rank_shifts


def test_rank_shifts_against_reference_loop():
    k = 50
    scores = _scores_with_ties_and_nans(5, 400, seed=2)
    rs = rank_shifts(scores, k=k)
    assert isinstance(rs, RankShifts)
    assert rs.features.shape == rs.shift.shape == rs.blank.shape == (4, k)
    assert rs.shift.dtype == torch.float32 and rs.blank.dtype == torch.bool
    rows = scores.tolist()
    for c in range(4):
        now, nxt = _reference_ranks(rows[c]), _reference_ranks(rows[c + 1])
        top_now = sorted(now, key=now.get)[:k]
        top_next = set(sorted(nxt, key=nxt.get)[:k])
        assert rs.features[c].tolist() == top_now
        for j, f in enumerate(top_now):
            assert rs.shift[c, j].item() == abs(nxt[f] - now[f])
            assert rs.blank[c, j].item() == (f not in top_next)


def test_rank_shifts_hand_values():
    # checkpoint 0 ranks: f0 1, f1 2, f2 3, f3 4 ; checkpoint 1 ranks: f2 1, f0 2, f3 3, f1 4
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [3.0, 1.0, 4.0, 2.0]])
    rs = rank_shifts(scores, k=2)
    assert rs.features.tolist() == [[0, 1]]
    assert rs.shift.tolist() == [[1.0, 2.0]]
    assert rs.blank.tolist() == [[False, True]]


def test_rank_shifts_nan_ranks_last_and_is_blank():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [float("nan"), 4.0, 3.0, 2.0, 1.0]])
    rs = rank_shifts(scores, k=2)
    assert rs.features.tolist() == [[0, 1]]
    # f0: rank 1 -> rank 5 (NaN last); f1: rank 2 -> rank 1
    assert rs.shift.tolist() == [[4.0, 1.0]]
    assert rs.blank.tolist() == [[True, False]]


def test_identical_checkpoints_have_no_shift():
    scores = torch.rand(1, 300, generator=torch.Generator().manual_seed(3)).expand(3, 300)
    rs = rank_shifts(scores, k=20)
    assert rs.shift.abs().sum().item() == 0.0
    assert not rs.blank.any()


# ---------------------------------------------------------------- checkpoint_scores


def test_checkpoint_scores_worked_values():
    w = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]]])  # [F=1, M=2, d=3]: base, tuned
    assert checkpoint_scores(w, 0, [1], p=1).item() == pytest.approx(0.571429, abs=1e-6)
    assert checkpoint_scores(w, 0, [1], p=2).item() == pytest.approx(0.585786, abs=1e-6)


def test_checkpoint_scores_equals_hand_nrn():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 4, 8, generator=g)
    w[3] = 0.0  # dead in every slot -> NaN
    w[5, 2] = 0.0  # base slot is 2: tuned-only feature -> 1
    w[6, 0] = 0.0  # checkpoint slot 0 empty -> 0 for that checkpoint
    s = checkpoint_scores(w, base=2, checkpoints=[0, 1, 3])
    assert s.shape == (3, 64) and s.dtype == torch.float32
    for c, slot in enumerate([0, 1, 3]):
        for i in range(64):
            o = sum(abs(v) for v in w[i, 2].tolist())
            t = sum(abs(v) for v in w[i, slot].tolist())
            if o + t == 0:
                assert math.isnan(s[c, i].item())
            else:
                assert s[c, i].item() == pytest.approx(t / (o + t), rel=1e-5)
    assert s[:, 5].tolist() == [1.0, 1.0, 1.0]
    assert s[0, 6].item() == 0.0


def test_checkpoint_scores_feed_dynamics():
    w = torch.randn(300, 3, 8, generator=torch.Generator().manual_seed(5))
    w[:10] = 0.0  # dead features never enter a top-k
    scores = checkpoint_scores(w, 0, [1, 2])
    top = top_k_sets(scores, k=50)
    assert (top >= 10).all()
    assert topk_overlap(scores, k=50).shape == (2, 2)


# ---------------------------------------------------------------- match_features / align_scores


def _noisy_permuted_copy(a: torch.Tensor, seed: int, noise: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    src = torch.randperm(a.shape[0], generator=g)  # b[j] = a[src[j]] + noise
    b = a[src] + noise * torch.randn(a.shape, generator=g)
    return b, torch.argsort(src)  # feature i of a sits at b[argsort(src)[i]]


def test_match_features_recovers_permutation():
    a = torch.randn(200, 32, generator=torch.Generator().manual_seed(6))
    b, expected = _noisy_permuted_copy(a, seed=7)
    m = match_features(a, b)
    assert isinstance(m, FeatureMatching)
    assert torch.equal(m.perm, expected)
    assert (m.cosine > 0.99).all()
    assert m.quality.n_matched == 200
    assert m.quality.mean > 0.99 and m.quality.median > 0.99
    assert m.quality.frac_above_0_9 == 1.0 and m.quality.frac_above_0_7 == 1.0
    assert set(m.quality._asdict()) == {"mean", "median", "frac_above_0_9", "frac_above_0_7", "n_matched"}


def test_match_features_rectangular_smaller_a():
    g = torch.Generator().manual_seed(8)
    b = torch.randn(120, 16, generator=g)
    subset = torch.randperm(120, generator=g)[:80]
    a = b[subset] + 0.01 * torch.randn(80, 16, generator=g)
    m = match_features(a, b)
    assert torch.equal(m.perm, subset)
    assert (m.cosine > 0.99).all()
    assert m.quality.n_matched == 80


def test_match_features_rectangular_larger_a():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(120, 16, generator=g)
    keep = torch.randperm(120, generator=g)[:70]
    b = a[keep] + 0.01 * torch.randn(70, 16, generator=g)
    m = match_features(a, b)
    unmatched = m.perm < 0
    assert unmatched.sum().item() == 50
    assert torch.isnan(m.cosine[unmatched]).all()
    assert torch.equal(m.perm[keep], torch.arange(70))
    assert m.quality.n_matched == 70
    assert sorted(m.perm[~unmatched].tolist()) == list(range(70))


def test_match_features_zero_rows_have_cosine_zero():
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(10))
    a[4] = 0.0
    m = match_features(a, a.clone())
    assert m.cosine[4].item() == 0.0
    assert sorted(m.perm.tolist()) == list(range(10))
    others = [i for i in range(10) if i != 4]
    assert m.perm[others].tolist() == others
    assert m.quality.frac_above_0_9 == pytest.approx(0.9)
    all_zero = match_features(torch.zeros(3, 4), torch.zeros(5, 4))
    assert torch.equal(all_zero.cosine, torch.zeros(3))
    assert all_zero.quality.mean == 0.0


def test_align_scores_round_trip_and_dynamics_across_crosscoders():
    a = torch.randn(150, 24, generator=torch.Generator().manual_seed(11))
    b, _ = _noisy_permuted_copy(a, seed=12)
    m_ab, m_ba = match_features(a, b), match_features(b, a)
    scores_a = torch.rand(2, 150, generator=torch.Generator().manual_seed(13))
    in_b = align_scores(scores_a, m_ba)  # a's scores written in b's index
    back = align_scores(in_b, m_ab)
    assert torch.equal(back, scores_a)
    # scores of b, aligned to a, give the same top-k and zero rank shift as a's own scores
    stacked = torch.stack([scores_a[0], align_scores(in_b[0], m_ab)])
    assert topk_overlap(stacked, k=30)[0, 1].item() == 1.0
    assert rank_shifts(stacked, k=30).shift.abs().sum().item() == 0.0


def test_align_scores_unmatched_is_nan():
    a = torch.randn(12, 6, generator=torch.Generator().manual_seed(14))
    m = match_features(a, a[:8].clone())
    out = align_scores(torch.arange(8, dtype=torch.float32), m)
    assert out.shape == (12,)
    assert out[:8].tolist() == list(range(8))
    assert torch.isnan(out[8:]).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: top_k_sets(torch.rand(2, 10), k=0), "k=0"),
        (lambda: top_k_sets(torch.rand(2, 10), k=11), "k=11"),
        (lambda: top_k_sets(torch.rand(10), k=2), "shape"),
        (lambda: top_k_sets(torch.rand(2, 0), k=1), "shape"),
        (lambda: top_k_sets(torch.full((2, 10), float("nan")), k=2), "non-NaN"),
        (lambda: topk_overlap(torch.tensor([[1.0, float("nan"), float("nan")]]), k=2), "row 0"),
        (lambda: rank_shifts(torch.rand(1, 10), k=2), "at least 2"),
        (lambda: checkpoint_scores(torch.rand(4, 8), 0, [1]), "W_dec"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, [2]), "slot 2"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, [0]), "base slot 0"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, []), "checkpoints"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, [1], p=0), "norm order p"),
        (lambda: match_features(torch.rand(4, 8), torch.rand(4, 9)), "width"),
        (lambda: match_features(torch.rand(4), torch.rand(4, 9)), "vectors_a"),
        (lambda: match_features(torch.rand(4, 8), torch.full((4, 8), float("nan"))), "vectors_b"),
        (lambda: align_scores(torch.rand(3), match_features(torch.rand(5, 4), torch.rand(5, 4))), "F_b=3"),
    ],
)
def test_bad_input_raises_probe_error(call, message):
    with pytest.raises(ProbeError, match=message):
        call()


def test_numpy_float64_scores_accepted():
    scores = np.random.default_rng(15).random((3, 100))
    assert topk_overlap(scores, k=10).shape == (3, 3)
    assert rank_shifts(scores, k=10).features.shape == (2, 10)
