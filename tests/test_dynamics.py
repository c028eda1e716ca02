"""Checkpoint dynamics (docs/methods.md sec. 5): top-k sets, overlap, rank shifts, shared index, matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posttrain_probe.analysis.dynamics import (
    FeatureMatching,
    RankShifts,
    checkpoint_scores,
    indexed_scores,
    match_features,
    negligible_features,
    rank_shifts,
    shared_index,
    top_k_sets,
    top_k_ties,
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


# ---------------------------------------------------------------- match_features / shared_index


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
    assert set(m.quality._asdict()) == {
        "mean",
        "median",
        "frac_above_0_9",
        "frac_above_0_7",
        "n_matched",
        "n_unmatched",
        "min_cosine",
    }


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


def test_negligible_latents_never_enter_top_k():
    """Latents at ~1e-4 decoder norm in both compared models would get NRN 0.8 and fill the top-k."""
    g = torch.Generator().manual_seed(20)
    n_shared, n_new, n_junk, d = 40, 5, 10, 16
    w = torch.zeros(n_shared + n_new + n_junk, 3, d)  # slots: base, ckpt1, ckpt2
    w[:n_shared] = torch.randn(n_shared, 1, d, generator=g) * 0.3  # shared: NRN 0.5
    w[n_shared : n_shared + n_new, 1:] = torch.randn(n_new, 1, d, generator=g)
    w[n_shared : n_shared + n_new, 0] = 0.6 * w[n_shared : n_shared + n_new, 1]  # new: NRN 1/1.6 = 0.625
    junk = slice(n_shared + n_new, None)
    w[junk, 0] = 1e-4 * torch.randn(n_junk, d, generator=g).abs()
    w[junk, 1] = 4 * w[junk, 0]  # NRN 0.8 against ckpt1, from two negligible norms
    w[junk, 2] = w[junk, 1]
    new = set(range(n_shared, n_shared + n_new))
    loose = checkpoint_scores(w, 0, [1, 2], norm_floor=0.0)
    assert set(top_k_sets(loose, k=n_new)[0].tolist()) & new == set()  # the failure the floor prevents
    scores = checkpoint_scores(w, 0, [1, 2])
    assert torch.isnan(scores[:, junk]).all()
    assert [set(row) for row in top_k_sets(scores, k=n_new).tolist()] == [new, new]
    assert negligible_features(w, [0, 1]).tolist() == [False] * (n_shared + n_new) + [True] * n_junk
    # dead by activations: undefined too
    live = torch.ones(w.shape[0], dtype=torch.bool)
    live[n_shared] = False
    assert torch.isnan(checkpoint_scores(w, 0, [1, 2], live=live)[:, n_shared]).all()


def test_top_k_ties_counts_and_flags_undetermined_sets():
    scores = torch.tensor(
        [
            [0.9, 1.0, 1.0, 1.0, 0.2],  # three tie at the cut of k=2: undetermined
            [0.9, 1.0, 0.8, 0.1, 0.2],  # clean cut
            [1.0, 1.0, 0.5, 0.4, float("nan")],  # two tie but both inside
        ]
    )
    ties = top_k_ties(scores, k=2)
    assert ties.n_tied.tolist() == [3, 1, 2]
    assert ties.n_tied_in_top.tolist() == [2, 1, 2]
    assert ties.determined.tolist() == [False, True, True]
    assert ties.kth_score.tolist() == pytest.approx([1.0, 0.9, 1.0])
    near = top_k_ties(torch.tensor([[1.0, 1.0 - 3e-7, 1.0 - 6e-7, 0.5]]), k=2)
    assert near.n_tied.tolist() == [3] and not near.determined.item()  # within atol counts as a tie
    assert top_k_ties(torch.tensor([[1.0, 1.0 - 3e-7, 1.0 - 6e-7, 0.5]]), k=2, atol=0.0).determined.item()


def test_match_features_floor_leaves_unrelated_latents_unmatched():
    g = torch.Generator().manual_seed(21)
    a = torch.nn.functional.normalize(torch.randn(20, 64, generator=g), dim=1)
    b = a.clone()
    b[15:] = torch.nn.functional.normalize(torch.randn(5, 64, generator=g), dim=1)  # unrelated
    forced = match_features(a, b)
    assert (forced.perm >= 0).all()  # without a floor every latent is paired, related or not
    m = match_features(a, b, min_cosine=0.7)
    assert m.perm[:15].tolist() == list(range(15))
    assert (m.perm[15:] == -1).all() and torch.isnan(m.cosine[15:]).all()
    assert m.quality.n_matched == 15 and m.quality.n_unmatched == 5 and m.quality.min_cosine == 0.7


def test_shared_index_keeps_persistent_features_and_separates_new_ones():
    """Three crosscoders: 10 persistent features (permuted each time), each with 3 features of its own;
    feature 0 of the first is absent from the second and back in the third."""
    g = torch.Generator().manual_seed(22)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 48, generator=g), dim=1)  # noqa: E731
    persistent = unit(10)
    own = [unit(3) for _ in range(3)]
    crosscoders, perms = [], []
    for c in range(3):
        keep = persistent if c != 1 else persistent[1:]
        vectors = torch.cat([keep + 0.01 * torch.randn(keep.shape, generator=g), own[c]])
        perm = torch.randperm(vectors.shape[0], generator=g)
        crosscoders.append(vectors[perm])
        perms.append(perm)
    index = shared_index(crosscoders, min_cosine=0.7)
    assert index.n_features == 10 + 3 * 3

    def ids_of(c: int, rows: range) -> list[int]:
        position = torch.argsort(perms[c])  # where each planted row sits in crosscoder c
        return index.ids[c][position[list(rows)]].tolist()

    assert ids_of(0, range(10)) == ids_of(2, range(10))  # persistent features keep one id, across the gap
    assert ids_of(1, range(9)) == ids_of(0, range(1, 10))
    own_ids = [set(ids_of(c, range(10 if c != 1 else 9, 13 if c != 1 else 12))) for c in range(3)]
    assert not (own_ids[0] & own_ids[1]) and not (own_ids[1] & own_ids[2]) and not (own_ids[0] & own_ids[2])
    assert index.quality[0] is None and index.quality[1].n_unmatched == 3 and index.quality[2].n_unmatched == 3
    # scores laid out over the index: a persistent top-k overlaps fully, the own features not at all
    scores = [torch.zeros(v.shape[0]) for v in crosscoders]
    for c in range(3):
        first_own = 10 if c != 1 else 9
        scores[c][torch.argsort(perms[c])[first_own:]] = 1.0
    laid = indexed_scores(scores, index)
    assert laid.shape == (3, 19) and torch.isnan(laid[1]).sum() == 19 - 12
    assert topk_overlap(laid, k=3)[0, 1].item() == 0.0 and topk_overlap(laid, k=3)[0, 2].item() == 0.0


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
        (lambda: match_features(torch.rand(4, 8), torch.rand(4, 8), min_cosine=1.5), "min_cosine=1.5"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, [1], norm_floor=1.0), "norm_floor=1.0"),
        (lambda: checkpoint_scores(torch.rand(4, 2, 8), 0, [1], live=torch.ones(3, dtype=torch.bool)), "live"),
        (lambda: top_k_ties(torch.rand(2, 10), k=3, atol=-1), "atol=-1"),
        (lambda: shared_index([torch.rand(4, 8), torch.rand(4, 9)]), r"vectors\[1\]"),
        (lambda: indexed_scores([torch.rand(4)], shared_index([torch.rand(5, 8)])), r"scores\[0\]"),
    ],
)
def test_bad_input_raises_probe_error(call, message):
    with pytest.raises(ProbeError, match=message):
        call()


def test_numpy_float64_scores_accepted():
    scores = np.random.default_rng(15).random((3, 100))
    assert topk_overlap(scores, k=10).shape == (3, 3)
    assert rank_shifts(scores, k=10).features.shape == (2, 10)


def test_dynamics_result_reads_back_equal(tmp_path):
    from posttrain_probe.analysis import DynamicsConfig, DynamicsResult
    from posttrain_probe.analysis.checkpoint_dynamics import dynamics
    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder

    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "c1", "c2", "c3"], d_model=8, n_features=40, layer=1))
    config = DynamicsConfig(crosscoder=[str(tmp_path / "cc")], out=tmp_path / "dyn", k=5)
    result = dynamics(config, crosscoders=[cc])
    assert DynamicsResult.read(config.out) == result
    assert result.checkpoints == ["c1", "c2", "c3"] and result.matching is None and len(result.rank_shifts) == 2


def test_dynamics_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import posttrain_probe.analysis.checkpoint_dynamics as report
    from posttrain_probe.analysis import DynamicsConfig
    from posttrain_probe.cli.main import app
    from posttrain_probe.config_io import load_config

    yaml_file = tmp_path / "dynamics.yaml"
    yaml_file.write_text(
        "crosscoder: [runs/cc1, runs/cc2]\nout: runs/dyn\ncheckpoint: [c1, c2]\nk: 5\nnorm_floor: 0.02\nmin_cosine: 0.6\n"
    )
    direct = DynamicsConfig(
        crosscoder=["runs/cc1", "runs/cc2"],
        out="runs/dyn",
        checkpoint=["c1", "c2"],
        k=5,
        norm_floor=0.02,
        min_cosine=0.6,
    )
    assert load_config(DynamicsConfig, yaml_file) == direct
    seen = []
    monkeypatch.setattr(report, "dynamics", lambda config, **kwargs: seen.append(config))
    flags = [
        "--crosscoder",
        "runs/cc1",
        "--crosscoder",
        "runs/cc2",
        "--out",
        "runs/dyn",
        "--checkpoint",
        "c1",
        "--checkpoint",
        "c2",
        "--k",
        "5",
        "--norm-floor",
        "0.02",
        "--min-cosine",
        "0.6",
    ]
    for argv in (flags, ["--config", str(yaml_file)]):
        CliRunner().invoke(app, ["dynamics", *argv])
    assert seen == [direct, direct]
