"""Duplicate latents (issue 11): grouping near-identical decoders and deduplicated category counts.

The planted dictionary: 2 models (base, tuned), d = 24, 100 shared features, 40 base-only and
40 tuned-only ones. Every exclusive feature is then written by 1-3 latents with the same decoder
direction and its norm split between them - what the decoder-norm L1 loss cannot tell apart from
one latent - so raw category counts are inflated; deduplicated counts must be the planted 40/40.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from posttrain_probe.analysis.duplicates import duplicate_groups
from posttrain_probe.analysis.features import feature_table, summary
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.errors import ProbeError

D, N_SHARED, N_EXCLUSIVE = 24, 100, 40


def planted_decoder(seed: int = 0):
    """Returns W_dec [F, 2, d] with duplicated exclusive features, and the planted feature of each latent."""
    g = torch.Generator().manual_seed(seed)
    rows, truth = [], []
    for k in range(N_SHARED + 2 * N_EXCLUSIVE):
        v = F.normalize(torch.randn(D, generator=g), dim=0)
        if k < N_SHARED:
            w = torch.stack([v, F.normalize(v + 0.1 * torch.randn(D, generator=g), dim=0)])
            copies = 1
        else:
            slot = 0 if k < N_SHARED + N_EXCLUSIVE else 1
            w = torch.zeros(2, D)
            w[slot] = v
            copies = 1 + k % 3  # 1, 2 or 3 latents for the same exclusive feature
        shares = torch.rand(copies, generator=g) + 0.5
        for share in shares / shares.sum():
            rows.append(share * w + 1e-3 * torch.randn(2, D, generator=g) * (w != 0))
            truth.append(k)
    perm = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[perm], torch.tensor(truth)[perm]


def crosscoder_with(W_dec: torch.Tensor) -> Crosscoder:
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "tuned"], d_model=D, n_features=W_dec.shape[0]))
    with torch.no_grad():
        cc.W_dec.copy_(W_dec)
    return cc


def test_groups_are_the_planted_features():
    W, truth = planted_decoder()
    groups = duplicate_groups(W)
    assert groups.n_groups == N_SHARED + 2 * N_EXCLUSIVE
    # two latents share a group exactly when they write the same planted feature
    same_group = groups.group[:, None] == groups.group[None, :]
    same_feature = truth[:, None] == truth[None, :]
    assert torch.equal(same_group, same_feature)
    # the representative is the member with the largest decoder norm
    strength = W.norm(dim=-1).sum(dim=1)
    for k in truth.unique().tolist():
        members = torch.nonzero(truth == k).flatten()
        assert groups.group[members[0]].item() == members[strength[members].argmax()].item()
    assert groups.n_duplicated == int((torch.bincount(truth)[truth] > 1).sum())


def test_deduplicated_counts_are_the_planted_exclusive_counts():
    W, _ = planted_decoder()
    table = feature_table(crosscoder_with(W), base="base")
    result = summary(table, base="base", model_names=["base", "tuned"])
    json.dumps(result)
    counts = result["models"]["tuned"]
    raw_base, raw_tuned = counts["categories"]["base-only"], counts["categories"]["finetune-only"]
    assert raw_base > N_EXCLUSIVE and raw_tuned > N_EXCLUSIVE  # inflated by the duplicates
    assert counts["categories_dedup"]["base-only"] == N_EXCLUSIVE
    assert counts["categories_dedup"]["finetune-only"] == N_EXCLUSIVE
    assert counts["categories_dedup"]["shared"] == N_SHARED
    assert result["n_duplicate_groups"] == N_SHARED + 2 * N_EXCLUSIVE
    assert counts["nrn_tails_dedup"]["nrn>0.9"] == N_EXCLUSIVE and counts["nrn_tails_dedup"]["nrn<0.1"] == N_EXCLUSIVE
    assert sum(result["mas_dominant_dedup"].values()) == N_SHARED + 2 * N_EXCLUSIVE


def test_chains_are_one_group_and_excluded_features_get_minus_one():
    e = torch.eye(4)
    a, b = e[0], F.normalize(e[0] + 0.25 * e[1], dim=0)
    c = F.normalize(e[0] + 0.5 * e[1], dim=0)  # cos(a, b) 0.97, cos(b, c) 0.99, cos(a, c) 0.89
    W = torch.stack([a, b, c, e[2], e[3]])[:, None, :]
    groups = duplicate_groups(W, min_cosine=0.95)
    assert groups.group[:3].tolist() == [groups.group[0].item()] * 3 and groups.n_groups == 3
    include = torch.tensor([True, False, True, True, True])  # without b, a and c are not duplicates
    groups = duplicate_groups(W, min_cosine=0.95, include=include)
    assert groups.group.tolist() == [0, -1, 2, 3, 4] and groups.n_groups == 4 and groups.n_duplicated == 0
    zero = torch.zeros(2, 1, 4)
    assert duplicate_groups(zero).group.tolist() == [-1, -1]  # zero decoders have no direction


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: duplicate_groups(torch.rand(4, 8)), "F, N, d"),
        (lambda: duplicate_groups(torch.rand(4, 1, 8), min_cosine=0.0), "min_cosine=0.0"),
        (lambda: duplicate_groups(torch.rand(4, 1, 8), include=torch.ones(3, dtype=torch.bool)), "include"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ProbeError, match=message):
        call()
