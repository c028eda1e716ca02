"""Quality of BatchTopK training on planted data where the truth is known (docs/methods.md sec. 3):
recovery of planted directions and of exclusivity at k near the true L0, an inference L0 calibrated to
k, and dead-latent figures that are right on a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain_probe.activations.memory import MemoryActivations
from posttrain_probe.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderTrainingConfig,
    calibrate_joint_threshold,
    train_crosscoder,
)
from posttrain_probe.crosscoder.planted import planted_dictionary, recovery
from posttrain_probe.errors import ProbeError

NAMES = ["base", "ft"]


def _planted(n_tokens: int):
    """2 models, d 32, 24 planted directions per model (8 exclusive to each), true L0 3."""
    planted = planted_dictionary(d_model=32, per_model=24, true_l0=3.0, seed=0)
    g = torch.Generator().manual_seed(1)
    return planted, planted.sample(n_tokens, g), planted.sample(10_000, g)


def _train(x, out_dir, *, n_features: int, k: int = 3, **training):
    cfg = CrosscoderTrainingConfig(
        n_tokens=x.shape[0], batch_size=256, lr=1e-2, log_every=25, calibration_tokens=10_000, **training
    )
    cc_cfg = CrosscoderConfig(n_features=n_features, activation="batchtopk", k=k)
    return train_crosscoder(MemoryActivations(x, NAMES), cc_cfg, cfg, out_dir, progress=False).eval()


def test_batchtopk_near_true_l0_recovers_the_planted_dictionary_with_a_calibrated_threshold(tmp_path):
    planted, x, held_out = _planted(100_000)
    assert planted.true_l0 == pytest.approx(3.0, rel=1e-5)
    cc = _train(x, tmp_path / "cc", n_features=128)
    found = recovery(planted, cc.W_dec)
    assert min(found.recovered) >= 0.9, found
    assert min(found.exclusive_as_exclusive) >= 0.9, found
    with torch.no_grad():
        inference_l0 = float((cc.encode(held_out) > 0).sum(-1).float().mean())
    assert abs(inference_l0 - 3) <= 0.2 * 3  # held-out tokens, not the calibration ones
    summary = json.loads((tmp_path / "cc" / "training_status.json").read_text())["summary"]
    assert summary["inference_l0"] == pytest.approx(3.0, abs=0.01)  # on the calibration tokens: k exactly
    assert summary["train_l0"] == pytest.approx(3.0, abs=0.05)
    assert summary["threshold_calibration"]["threshold"] == pytest.approx(float(cc.threshold))


def test_a_short_run_reports_the_latents_that_never_fire(tmp_path):
    """F = 1024 latents for 48 planted directions: most never fire on held-out tokens, and the
    logged dead fraction (trailing window, from the first log step) says so instead of 0."""
    _, x, held_out = _planted(40_000)
    cc = _train(x, tmp_path / "cc", n_features=1024)  # 156 steps, far below dead_after_tokens = 10M
    with torch.no_grad():
        silent = float((cc.encode(held_out).sum(0) == 0).float().mean())
    records = [json.loads(line) for line in (tmp_path / "cc" / "metrics.jsonl").read_text().splitlines()]
    assert silent > 0.8
    assert records[0]["dead_fraction"] > 0.5  # honest from the first log step
    assert abs(records[-1]["dead_fraction"] - silent) < 0.1
    assert 0 < records[-1]["never_fired_fraction"] <= records[-1]["dead_fraction"]
    status = json.loads((tmp_path / "cc" / "training_status.json").read_text())
    assert status["summary"]["never_fired_fraction"] == records[-1]["never_fired_fraction"]
    assert any("dead" in warning for warning in status["warnings"])


def test_joint_threshold_calibration_keeps_k_codes_per_token():
    """Hand-checkable: the threshold lies halfway between the (k·T)-th and (k·T+1)-th largest score."""
    cc = Crosscoder(CrosscoderConfig(model_names=NAMES, d_model=4, n_features=6, activation="batchtopk", k=2))
    cc.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(50, 2, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cc.b_enc.fill_(0.5)
        scores = torch.relu(cc._pre_activations(cc.normalize(x))) * cc.decoder_norm_sum()
    ranked = scores.flatten().sort(descending=True).values
    result = calibrate_joint_threshold(cc.eval(), [x[:30], x[30:]], max_tokens=50, batch_size=7)
    assert result.previous < 0 and math.isnan(result.l0_before)
    assert result.threshold == pytest.approx(float(ranked[99] + ranked[100]) / 2)
    assert float(cc.threshold) == pytest.approx(result.threshold)
    assert result.l0_calibrated == 2.0 and result.n_tokens == 50
    assert float((cc.encode(x) > 0).sum(-1).float().mean()) == 2.0
    with pytest.raises(ProbeError, match="relu"):
        relu = Crosscoder(CrosscoderConfig(model_names=NAMES, d_model=4, n_features=6))
        calibrate_joint_threshold(relu, [x])
    with pytest.raises(ProbeError, match="max_tokens must be an integer >= 1, got 0"):
        calibrate_joint_threshold(cc, [x], max_tokens=0)


def test_calibration_tokens_must_not_be_negative():
    with pytest.raises(ProbeError, match="calibration_tokens must be >= 0"):
        CrosscoderTrainingConfig(calibration_tokens=-1)


def test_sweep_k_on_planted_stores_through_the_cli(tmp_path):
    """`crosscoder sweep-k`: one run per k on the same stores, scored on held-out stores; held-out FVU falls with k
    and the inference L0 follows each k (calibrated)."""
    from _planted import write_planted_stores
    from typer.testing import CliRunner

    from posttrain_probe.cli import app

    _, x, held_out = _planted(20_000)
    train_dirs = write_planted_stores(tmp_path / "train", x, NAMES, layer=3)
    held_dirs = write_planted_stores(tmp_path / "held", held_out, NAMES, layer=3)
    args = ["crosscoder", "sweep-k", "--out", str(tmp_path / "sweep"), "--n-features", "64", "--batch-size", "256"]
    args += ["--lr", "0.01", "--n-tokens", "20000", "--held-out-tokens", "5000", "--calibration-tokens", "5000"]
    for name in NAMES:
        args += ["--acts", str(train_dirs[name]), "--held-out-acts", str(held_dirs[name])]
    for k in (1, 3, 9):
        args += ["--k-values", str(k)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["k"] for r in rows] == [1, 3, 9] and sweep["held_out_tokens"] == 5000
    assert rows[0]["fvu"][0] > rows[1]["fvu"][0] > rows[2]["fvu"][0]
    for row in rows:
        assert abs(row["inference_l0"] - row["k"]) <= 0.2 * row["k"] + 0.2
        assert (tmp_path / "sweep" / f"k{row['k']}" / "model.safetensors").exists()
    from posttrain_probe.crosscoder.sweep import SweepResult

    assert SweepResult.read(tmp_path / "sweep").rows[1].k == 3
    assert "inf. L0" in result.output and "k sweep on 5,000 held-out tokens" in result.output
    bad = CliRunner().invoke(app, ["crosscoder", "sweep-k", "--out", str(tmp_path / "x"), "--k-values", "0"])
    assert bad.exit_code != 0 and "k_values must be one or more integers >= 1, got [0]" in bad.output
