"""Checkpoint dynamics on planted checkpoints whose true answer is known (docs/methods.md sec. 5, issue 11).

A base model and five checkpoints share 40 features (same coefficient on the same token in every
model, each model's direction slightly rotated). On top, each checkpoint has 8 features the base
lacks:
- ``stable`` (SFT-like): the same 8 new features in all five checkpoints -> true top-8 overlap 1.0;
- ``turnover`` (RL-like): 8 different new features in every checkpoint -> true top-8 overlap 0.0.
Crosscoders are really trained on activation stores of these tokens, with both index strategies:
one crosscoder over base + all checkpoints, and one two-model crosscoder per checkpoint matched on
whole decoders. Each must recover the true overlap within 0.15 at every pair of checkpoints.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from _planted import write_planted_stores

from posttrain_probe.activations import PairedActivations
from posttrain_probe.analysis import DynamicsConfig, DynamicsResult
from posttrain_probe.analysis.checkpoint_dynamics import dynamics
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder

D = 32
N_SHARED = 40
N_NEW = 8
N_CHECKPOINTS = 5
N_TOKENS = 16_000
EPOCHS = 6
CHECKPOINTS = [f"ckpt{c}" for c in range(1, N_CHECKPOINTS + 1)]
NAMES = ["base", *CHECKPOINTS]


def planted_checkpoints(kind: str, seed: int = 0, p: float = 0.05) -> torch.Tensor:
    """Paired activations x [n, 1 + C, d] of base + C checkpoints with the planted new features."""
    g = torch.Generator().manual_seed(seed)
    n_models = 1 + N_CHECKPOINTS
    n_new = N_NEW if kind == "stable" else N_NEW * N_CHECKPOINTS
    n_features = N_SHARED + n_new
    dirs = torch.zeros(n_features, n_models, D)
    for k in range(N_SHARED):
        v = F.normalize(torch.randn(D, generator=g), dim=0)
        dirs[k] = F.normalize(v + 0.05 * torch.randn(n_models, D, generator=g), dim=-1)
    new = torch.cat([torch.linalg.qr(torch.randn(D, N_NEW, generator=g)).Q.T for _ in range(n_new // N_NEW)])
    for j in range(n_new):  # the new features of one checkpoint are orthonormal to each other
        owners = range(1, n_models) if kind == "stable" else [1 + j // N_NEW]
        for m in owners:
            dirs[N_SHARED + j, m] = new[j]
    active = torch.rand(N_TOKENS, n_features, generator=g) < p
    magnitude = 0.5 + torch.empty(N_TOKENS, n_features).exponential_(1.0, generator=g)
    x = torch.einsum("tk,kmd->tmd", active * magnitude, dirs)
    return x + 0.01 * torch.randn(x.shape, generator=g)


def write_stores(root, x: torch.Tensor) -> dict[str, object]:
    """One activation store per model over the same tokens; returns {name: path}."""
    return write_planted_stores(root, x, NAMES, layer=4)


def train(paths: dict, names: list[str], out, n_features: int):
    """The papers' ReLU + decoder-norm L1 recipe; lambda = 1 suits this tiny d = 32 world (at lambda = 2
    the six-model crosscoder leaves most checkpoint-only features unlearned in this short run)."""
    source = PairedActivations({name: paths[name] for name in names})
    cfg = CrosscoderTrainingConfig(
        n_tokens=EPOCHS * N_TOKENS,
        batch_size=256,
        lr=3e-3,
        l1_coefficient=1.0,
        log_every=50,
        checkpoint_every=10_000,
        seed=0,
    )
    return train_crosscoder(source, CrosscoderConfig(n_features=n_features), cfg, out, progress=False)


@pytest.fixture(scope="module", params=["stable", "turnover"])
def planted(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    paths = write_stores(root / "stores", planted_checkpoints(kind, seed=1))
    return kind, paths, root


def _assert_recovers_truth(kind: str, result: DynamicsResult) -> None:
    overlap = torch.tensor(result.overlap)
    truth = torch.ones_like(overlap) if kind == "stable" else torch.eye(N_CHECKPOINTS)
    error = (overlap - truth).abs()
    assert error.max().item() <= 0.15, (
        f"{kind}: top-{N_NEW} overlap {overlap.tolist()} is more than 0.15 from the truth"
    )


@pytest.mark.slow
def test_joint_crosscoder_recovers_true_overlap(planted, tmp_path):
    kind, paths, root = planted
    cc = train(paths, NAMES, root / "joint", n_features=128)
    result = dynamics(
        DynamicsConfig(crosscoder=[root / "joint"], base="base", k=N_NEW, out=tmp_path / "dyn"), crosscoders=[cc]
    )
    _assert_recovers_truth(kind, result)
    assert json.loads((tmp_path / "dyn" / "dynamics.json").read_text())["overlap"] == result.overlap


@pytest.mark.slow
def test_per_checkpoint_crosscoders_recover_true_overlap(planted, tmp_path):
    kind, paths, root = planted
    models = [train(paths, ["base", name], root / f"pair-{name}", n_features=96) for name in CHECKPOINTS]
    config = DynamicsConfig(
        crosscoder=[root / f"pair-{name}" for name in CHECKPOINTS], base="base", k=N_NEW, out=tmp_path / "dyn"
    )
    result = dynamics(config, crosscoders=models)
    _assert_recovers_truth(kind, result)
    for label in CHECKPOINTS[1:]:  # every matching is reported; nothing below the floor is forced
        quality = result.matching[label]
        assert quality.n_matched > 0 and quality.min_cosine == 0.7
        assert quality.mean >= 0.7
    if kind == "turnover":
        # The control: forced one-to-one matching without a floor pairs each checkpoint's new latents
        # with unrelated ones and invents persistence that the planting does not have.
        forced_config = dataclasses.replace(
            config, out=tmp_path / "forced", min_cosine=-1.0, duplicate_cosine=None, norm_floor=0.0
        )
        forced = dynamics(forced_config, crosscoders=models)
        assert (
            torch.diagonal(torch.tensor(forced.overlap), 1).mean()
            > torch.diagonal(torch.tensor(result.overlap), 1).mean() + 0.15
        )
