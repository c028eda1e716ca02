"""Ground truth for the crosscoder (docs/methods.md sec. 3-4): train on paired activations built from a known
dictionary and check that the planted directions come back and that NRN / MAS attribute the
model-exclusive ones to the right model.

Three models (base, sft, rl), d = 32, 48 planted features:
    16 shared by all three (each model's version is the same direction slightly rotated, cos ~0.9),
     8 base-only, 8 sft-only, 8 rl-only, 8 shared by base and rl only.
A token activates each feature with probability 0.05 with magnitude 0.5 + Exp(1), the same
coefficient in every model that has the feature: x^m = sum_k c_k dir_k^m + N(0, 0.01^2).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _planted import write_planted_stores

from posttrain_probe.activations import PairedActivations
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder

NAMES = ["base", "sft", "rl"]
D = 32
GROUPS = [("shared", (0, 1, 2), 16), ("base", (0,), 8), ("sft", (1,), 8), ("rl", (2,), 8), ("base+rl", (0, 2), 8)]
N_TOKENS = 40_000


def planted_dictionary(seed: int = 0, n_tokens: int = N_TOKENS, p: float = 0.05, noise: float = 0.01):
    """Returns x [n, 3, d], directions [K, 3, d] (zero where a model lacks the feature), owners, groups."""
    g = torch.Generator().manual_seed(seed)
    owners = [own for _, own, n in GROUPS for _ in range(n)]
    groups = [name for name, _, n in GROUPS for _ in range(n)]
    dirs = torch.zeros(len(owners), 3, D)
    for k, own in enumerate(owners):
        v = F.normalize(torch.randn(D, generator=g), dim=0)
        for m in own:
            dirs[k, m] = F.normalize(v + 0.08 * torch.randn(D, generator=g), dim=0) if len(own) > 1 else v
    active = torch.rand(n_tokens, len(owners), generator=g) < p
    magnitude = 0.5 + torch.empty(n_tokens, len(owners)).exponential_(1.0, generator=g)
    x = torch.einsum("tk,kmd->tmd", active * magnitude, dirs) + noise * torch.randn(n_tokens, 3, D, generator=g)
    return x, dirs, owners, groups


def write_paired(root, x: torch.Tensor) -> PairedActivations:
    return PairedActivations(write_planted_stores(root, x, NAMES, layer=6))


def l1_norms(W_dec: torch.Tensor) -> torch.Tensor:
    """[F, N] ||d_i^m||_1."""
    return W_dec.abs().sum(-1)


def nrn(W_dec: torch.Tensor, base: int, tuned: int) -> torch.Tensor:
    """docs/methods.md sec. 4: NRN_i = ||d_i^T||_1 / (||d_i^O||_1 + ||d_i^T||_1)."""
    norms = l1_norms(W_dec)
    return norms[:, tuned] / (norms[:, base] + norms[:, tuned])


def mas(W_dec: torch.Tensor) -> torch.Tensor:
    """docs/methods.md sec. 4: MAS_m(i) = ||d_i^m||_1 / sum_m' ||d_i^m'||_1, [F, N]."""
    norms = l1_norms(W_dec)
    return norms / norms.sum(-1, keepdim=True)


@pytest.mark.slow
def test_crosscoder_recovers_planted_features_and_attributes_them(tmp_path):
    x, dirs, owners, groups = planted_dictionary(seed=0)
    source = write_paired(tmp_path / "stores", x)
    assert source.model_names == NAMES and source.n_tokens == N_TOKENS
    cfg = CrosscoderTrainingConfig(
        n_tokens=4 * N_TOKENS,
        batch_size=256,
        lr=3e-3,
        l1_coefficient=2.0,
        log_every=50,
        checkpoint_every=10_000,
        seed=0,
    )
    cc = train_crosscoder(source, CrosscoderConfig(n_features=128), cfg, tmp_path / "cc", progress=False)
    last = json.loads((tmp_path / "cc" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(f < 0.1 for f in last["fvu"]), last
    assert last["l0"] < 10  # ~2.4 planted features per token

    W = cc.W_dec.detach()  # [F, N, d], normalised units: directions are unaffected by the scales
    unit = F.normalize(W, dim=-1)
    # 1. Recovery: every (planted feature, model that has it) pair has a decoder vector of that model
    #    within cos > 0.9; the best match of the owner model is the feature's representative.
    best_cos, match = [], []
    for k, own in enumerate(owners):
        for m in own:
            best_cos.append(float((unit[:, m] @ dirs[k, m]).max()))
        cos_owner = unit[:, own[0]] @ dirs[k, own[0]]
        match.append(int(cos_owner.argmax()))
    best_cos = torch.tensor(best_cos)
    recovered_pairs = float((best_cos > 0.9).float().mean())
    assert recovered_pairs >= 0.8, f"recovered {recovered_pairs:.0%} of planted directions; cosines {best_cos.tolist()}"
    recovered = [bool((unit[match[k], own[0]] @ dirs[k, own[0]]) > 0.9) for k, own in enumerate(owners)]
    assert sum(recovered) >= 0.8 * len(owners)
    # distinct planted features are matched by distinct crosscoder features
    matched = [match[k] for k in range(len(owners)) if recovered[k]]
    assert len(set(matched)) == len(matched)

    mas_all, nrn_sft, nrn_rl = mas(W), nrn(W, 0, 1), nrn(W, 0, 2)
    by_group: dict[str, list[int]] = {}
    for k, group in enumerate(groups):
        if recovered[k]:
            by_group.setdefault(group, []).append(k)
    report = {}
    for group, ks in by_group.items():
        rows = mas_all[[match[k] for k in ks]]
        report[group] = {
            "n": len(ks),
            "mean_mas": [round(v, 3) for v in rows.mean(0).tolist()],
            "max_mas": round(float(rows.max()), 3),
        }
    print("recovery:", f"{recovered_pairs:.0%} of pairs, min cos {best_cos.min():.4f}", report)
    assert set(by_group) == {name for name, _, _ in GROUPS}

    # 2. Exclusive features: MAS of the owning model > 0.8 for >= 80% of them; NRN at the extremes.
    for group, slot in (("base", 0), ("sft", 1), ("rl", 2)):
        ks = by_group[group]
        owner_mas = torch.tensor([float(mas_all[match[k], slot]) for k in ks])
        assert float((owner_mas > 0.8).float().mean()) >= 0.8, (group, owner_mas.tolist())
        assert all(int(mas_all[match[k]].argmax()) == slot for k in ks), group
    sft_nrn = torch.tensor([float(nrn_sft[match[k]]) for k in by_group["sft"]])
    base_nrn_sft = torch.tensor([float(nrn_sft[match[k]]) for k in by_group["base"]])
    base_nrn_rl = torch.tensor([float(nrn_rl[match[k]]) for k in by_group["base"]])
    rl_nrn = torch.tensor([float(nrn_rl[match[k]]) for k in by_group["rl"]])
    assert float((sft_nrn > 0.9).float().mean()) >= 0.8, sft_nrn.tolist()
    assert float((rl_nrn > 0.9).float().mean()) >= 0.8, rl_nrn.tolist()
    assert float((base_nrn_sft < 0.1).float().mean()) >= 0.8, base_nrn_sft.tolist()
    assert float((base_nrn_rl < 0.1).float().mean()) >= 0.8, base_nrn_rl.tolist()

    # 3. Shared by all: MAS spread over the three models, NRN near the middle.
    for k in by_group["shared"]:
        assert float(mas_all[match[k]].max()) < 0.6, mas_all[match[k]].tolist()
        assert 0.3 < float(nrn_sft[match[k]]) < 0.7 and 0.3 < float(nrn_rl[match[k]]) < 0.7
        # each model's decoder vector follows that model's own (rotated) version of the feature
        for m in range(3):
            own = float(unit[match[k], m] @ dirs[k, m])
            others = max(float(unit[match[k], m] @ dirs[k, o]) for o in range(3) if o != m)
            assert own > others, (k, m, own, others)
    # 4. Shared by base and rl only: split between them, nothing in sft; NRN(sft vs base) ~ 0.
    for k in by_group["base+rl"]:
        row = mas_all[match[k]]
        assert float(row[1]) < 0.05 and float(row.max()) < 0.7, row.tolist()
        assert float(nrn_sft[match[k]]) < 0.1 and 0.3 < float(nrn_rl[match[k]]) < 0.7
