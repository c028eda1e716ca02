"""Per-source BatchTopK inference thresholds (calibrate_source_thresholds, `crosscoder calibrate`).

Planted data: two models with the same 32 planted unit directions in d = 16 (every feature
shared), each active with probability 0.1 at magnitude 0.5 + Exp(1). A BatchTopK crosscoder
(F = 64, k = 4) trained on it spreads each shared feature's encoder over both slots, so a
per-source pre-activation (the other slot zero) is about half the joint one: with the joint
threshold the per-source codes keep about 2 features per token instead of k = 4.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from posttrain_probe.activations import ActivationStoreWriter
from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.crosscoder.calibrate import CalibrationReport, calibrate_source_thresholds
from posttrain_probe.crosscoder.model import crosscoder_fingerprint
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.blocking import GradientBlocker
from posttrain_probe.interventions.features import FeatureIntervention

pytestmark = pytest.mark.usefixtures("one_thread")

D, N_PLANTED, N_FEATURES, K = 16, 32, 64, 4


def planted(n_tokens: int, seed: int) -> torch.Tensor:
    """[n, 2, d] raw paired activations: the same planted coefficients in both models, plus noise."""
    dirs = F.normalize(torch.randn(N_PLANTED, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    coefficients = (torch.rand(n_tokens, N_PLANTED, generator=g) < 0.1) * (
        0.5 + torch.empty(n_tokens, N_PLANTED).exponential_(1.0, generator=g)
    )
    x = (coefficients @ dirs)[:, None].expand(-1, 2, -1)
    return (x + 0.01 * torch.randn(n_tokens, 2, D, generator=g)) * torch.tensor([1.0, 3.0])[
        :, None
    ]  # model 2 at 3x the norm


@pytest.fixture(scope="module")
def trained() -> Crosscoder:
    """A BatchTopK crosscoder trained by its own training forward (batch-top-k, threshold EMA), Adam, 3 epochs."""
    torch.manual_seed(0)
    x = planted(20_000, seed=1)
    cc = Crosscoder(
        CrosscoderConfig(
            model_names=["base", "sft"], d_model=D, n_features=N_FEATURES, activation="batchtopk", k=K, layer=3
        )
    )
    cc.reset_parameters(torch.Generator().manual_seed(0))
    cc.set_scales_from(iter([x]))
    optimizer = torch.optim.Adam(cc.parameters(), lr=3e-3)
    cc.train()
    for _ in range(3):
        for start in range(0, x.shape[0], 256):
            loss = cc(x[start : start + 256]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return cc.eval()


def mean_l0(codes: torch.Tensor) -> float:
    return (codes > 0).sum().item() / codes.shape[0]


def old_encode_source(cc: Crosscoder, x: torch.Tensor, m: int) -> torch.Tensor:
    """encode_source as written before per-source thresholds existed (the joint threshold)."""
    pre = (x * cc.scales[m].to(x.dtype)) @ cc.W_enc[m] + cc.b_enc
    acts = F.relu(pre)
    return acts * (acts * cc.decoder_norm_sum() > cc.threshold)


def test_calibrated_per_source_l0_is_k_on_held_out_tokens(trained):
    cc = trained
    held_out = planted(5000, seed=2)
    with torch.no_grad():
        joint_l0 = [mean_l0(cc.encode_source(held_out[:, m], m)) for m in range(2)]
        # planted: with the joint threshold the per-source codes are about half as dense as training's k
        assert all(l0 < 0.6 * K for l0 in joint_l0), joint_l0

        calibration = planted(5000, seed=3)
        result = calibrate_source_thresholds(cc, iter([calibration[:3000], calibration[3000:]]))
        assert result.k == K and result.n_tokens == 5000
        assert result.l0_calibrated == [K, K]  # exactly k on the calibration tokens (continuous scores: no ties)
        # reported "before" = the per-source L0 with the joint threshold on the same tokens
        want_before = [mean_l0(cc.encode_source(calibration[:, m], m, joint_threshold=True)) for m in range(2)]
        assert result.l0_joint_threshold == pytest.approx(want_before, abs=1e-9)
        assert cc.config.source_thresholds == result.thresholds
        assert all(0 < theta < float(cc.threshold) for theta in result.thresholds)  # per-source scores are smaller

        calibrated_l0 = [mean_l0(cc.encode_source(held_out[:, m], m)) for m in range(2)]
        assert all(abs(l0 - K) < 0.1 * K for l0 in calibrated_l0), calibrated_l0
        assert all(abs(c - K) < abs(j - K) / 4 for c, j in zip(calibrated_l0, joint_l0))
        # joint_threshold=True still gives the joint threshold's codes
        assert torch.equal(
            cc.encode_source(held_out[:, 0], 0, joint_threshold=True), old_encode_source(cc, held_out[:, 0], 0)
        )
    cc.config.source_thresholds = None


def test_thresholds_are_the_kT_th_largest_scores_whatever_the_batching(trained):
    """Brute force over all T x F scores; the streaming top-k (with its compactions) must agree."""
    cc = trained
    x = planted(1500, seed=4)
    with torch.no_grad():
        want = []
        for m in range(2):
            scores = F.relu((x[:, m] * cc.scales[m]) @ cc.W_enc[m] + cc.b_enc) * cc.decoder_norm_sum()
            ordered = scores.flatten().sort(descending=True).values
            want.append(float((ordered[K * 1500 - 1] + ordered[K * 1500]) / 2))
        for batches, batch_size in (([x], 1500), ([x[:7], x[7:900], x[900:]], 64), ([x, x], 33)):
            result = calibrate_source_thresholds(cc, iter(batches), max_tokens=1500, batch_size=batch_size)
            # equal up to the last bits a matmul of another batch size may round differently
            assert result.thresholds == pytest.approx(want, rel=1e-6) and result.n_tokens == 1500
        # another target k
        result = calibrate_source_thresholds(cc, iter([x]), k=2)
        assert result.k == 2 and result.l0_calibrated == [2, 2]
    cc.config.source_thresholds = None


def test_without_thresholds_encode_source_is_bitwise_as_before(trained):
    cc = trained
    x = planted(300, seed=5)
    assert cc.config.source_thresholds is None
    with torch.no_grad():
        for m in range(2):
            assert torch.equal(cc.encode_source(x[:, m], m), old_encode_source(cc, x[:, m], m))
            assert torch.equal(cc.encode_source(x[:, m], m, joint_threshold=True), old_encode_source(cc, x[:, m], m))
            assert cc.source_threshold(m) == float(cc.threshold)


def deterministic_crosscoder() -> Crosscoder:
    cc = Crosscoder(
        CrosscoderConfig(model_names=["base", "sft"], d_model=3, n_features=4, activation="batchtopk", k=2, layer=1)
    )
    with torch.no_grad():
        cc.W_enc.copy_(torch.arange(24.0).view(2, 3, 4) / 10)
        cc.W_dec.copy_(torch.arange(24.0).view(4, 2, 3) / 10)
        cc.b_enc.fill_(-0.5)
        cc.b_dec.fill_(0.25)
        cc.scales.copy_(torch.tensor([0.5, 2.0]))
        cc.threshold.fill_(0.75)
    return cc


def test_fingerprint_unchanged_without_thresholds_and_distinct_with_them():
    cc = deterministic_crosscoder()
    # the value computed before CrosscoderConfig had source_thresholds: feature sets recorded then still resolve
    assert crosscoder_fingerprint(cc) == "04e3320f00bd2eb272c0e3f66403975d7728fa51ae47e6b99aed2d2f93866a2c"
    cc.config.source_thresholds = [0.25, 0.5]
    calibrated = crosscoder_fingerprint(cc)
    assert calibrated != "04e3320f00bd2eb272c0e3f66403975d7728fa51ae47e6b99aed2d2f93866a2c"
    cc.config.source_thresholds = [0.25, 0.75]
    assert crosscoder_fingerprint(cc) not in (
        calibrated,
        "04e3320f00bd2eb272c0e3f66403975d7728fa51ae47e6b99aed2d2f93866a2c",
    )


def test_save_load_round_trip_and_old_config_files(trained, tmp_path):
    cc = trained
    x = planted(500, seed=6)
    calibrate_source_thresholds(cc, iter([planted(2000, seed=7)]))
    try:
        thresholds = list(cc.config.source_thresholds)
        cc.save_pretrained(tmp_path / "cc")
        assert json.loads((tmp_path / "cc" / "config.json").read_text())["source_thresholds"] == thresholds
        loaded = Crosscoder.from_pretrained(str(tmp_path / "cc"))
        assert loaded.config.source_thresholds == thresholds and loaded.config == cc.config
        assert crosscoder_fingerprint(loaded) == crosscoder_fingerprint(cc)
        with torch.no_grad():
            for m in range(2):
                assert torch.equal(loaded.encode_source(x[:, m], m), cc.encode_source(x[:, m], m))
        # a loaded crosscoder saves what its config holds now (calibrated after loading, or cleared)
        loaded.config.source_thresholds = None
        loaded.save_pretrained(tmp_path / "cleared")
        assert Crosscoder.from_pretrained(str(tmp_path / "cleared")).config.source_thresholds is None
    finally:
        cc.config.source_thresholds = None
    # a config.json written before the field existed loads, without thresholds
    config_file = tmp_path / "cc" / "config.json"
    data = json.loads(config_file.read_text())
    del data["source_thresholds"]
    config_file.write_text(json.dumps(data))
    old = Crosscoder.from_pretrained(str(tmp_path / "cc"))
    assert old.config.source_thresholds is None
    with torch.no_grad():
        assert torch.equal(old.encode_source(x[:, 1], 1), old_encode_source(cc, x[:, 1], 1))


def test_blocker_and_intervention_codes_follow_the_calibrated_encode_source(trained):
    cc = trained
    x = planted(400, seed=8)
    calibrate_source_thresholds(cc, iter([planted(2000, seed=9)]))
    try:
        features = list(range(0, N_FEATURES, 3))
        with torch.no_grad():
            want = cc.encode_source(x[:, 1], "sft")[:, features]
            assert not torch.equal(want, cc.encode_source(x[:, 1], "sft", joint_threshold=True)[:, features])
            torch.testing.assert_close(
                FeatureIntervention(cc, features, model_name="sft").codes(x[:, 1]), want, rtol=1e-6, atol=1e-6
            )
            blocker = GradientBlocker(cc, features, model="sft")
            want_xs = want @ cc.W_dec[features, 1] / cc.scales[1]
            torch.testing.assert_close(blocker.protected_component(x[:, 1]), want_xs, rtol=1e-5, atol=1e-6)
    finally:
        cc.config.source_thresholds = None


def test_refusals(trained):
    relu = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=4, n_features=8))
    with pytest.raises(ProbeError, match="BatchTopK.*'relu'"):
        calibrate_source_thresholds(relu, iter([torch.randn(10, 2, 4)]))
    with pytest.raises(ProbeError, match="source_thresholds.*'relu'"):
        CrosscoderConfig(model_names=["base", "sft"], d_model=4, source_thresholds=[0.1, 0.2])
    with pytest.raises(ProbeError, match="only BatchTopK"):
        relu.source_threshold("base")
    untrained = Crosscoder(CrosscoderConfig(model_names=["base"], d_model=4, n_features=8, activation="batchtopk", k=2))
    with pytest.raises(ProbeError, match="train it before calibrating"):
        calibrate_source_thresholds(untrained, iter([torch.randn(10, 1, 4)]))
    batchtopk = dict(model_names=["base", "sft"], d_model=4, activation="batchtopk")
    for bad, match in (
        ([0.1], r"one threshold per model.*got 1"),
        ([0.1, -1.0], "finite and >= 0"),
        ([0.1, float("nan")], "finite"),
        ("0.1", "list of numbers"),
        ([0.1, "x"], "list of numbers"),
    ):
        with pytest.raises(ProbeError, match=match):
            CrosscoderConfig(**batchtopk, source_thresholds=bad)
    cc = trained
    for kwargs, match in (
        ({"k": 0}, "k must be an integer >= 1, got 0"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"batch_size": 2.5}, "batch_size"),
    ):
        with pytest.raises(ProbeError, match=match):
            calibrate_source_thresholds(cc, iter([planted(10, seed=0)]), **kwargs)
    with pytest.raises(ProbeError, match="empty"):
        calibrate_source_thresholds(cc, iter([]))
    with pytest.raises(ProbeError, match=r"\[batch, 2, 16\]"):
        calibrate_source_thresholds(cc, iter([torch.randn(10, 16)]))
    assert cc.config.source_thresholds is None  # refused calls change nothing


def write_stores(root, x: torch.Tensor, names=("base", "sft")) -> list[str]:
    paths = []
    for m, name in enumerate(names):
        writer = ActivationStoreWriter(
            root / name, layer=3, d_model=x.shape[-1], model=name, dtype="float32", shard_tokens=1000
        )
        ids = torch.arange(x.shape[0])
        writer.write(x[:, m], ids % 100, ids // 50, ids % 50 + 1, cursor=1)
        writer.close()
        paths.append(str(root / name))
    return paths


def test_cli_calibrate_out_in_place_clear_and_relu(trained, tmp_path):
    from posttrain_probe.cli import app

    runner = CliRunner()
    cc = trained
    cc.save_pretrained(tmp_path / "cc")
    stores = write_stores(tmp_path / "acts", planted(2500, seed=10))
    acts = sum((["--acts", p] for p in stores), [])
    uncalibrated = crosscoder_fingerprint(cc)

    result = runner.invoke(
        app,
        [
            "crosscoder",
            "calibrate",
            "--crosscoder",
            str(tmp_path / "cc"),
            *acts,
            "--max-tokens",
            "2000",
            "--out",
            str(tmp_path / "cal"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_tokens"] == 2000 and report["k"] == K and set(report["models"]) == {"base", "sft"}
    assert all(row["l0_calibrated"] == K and row["l0_joint_threshold"] < 0.6 * K for row in report["models"].values())
    calibrated = Crosscoder.from_pretrained(str(tmp_path / "cal"))
    assert calibrated.config.source_thresholds == [report["models"][n]["threshold"] for n in ("base", "sft")]
    assert (
        report["fingerprint_before"] == uncalibrated
        and report["fingerprint_after"] == crosscoder_fingerprint(calibrated) != uncalibrated
    )
    assert CalibrationReport.read(tmp_path / "cal").to_json() == report
    assert (
        Crosscoder.from_pretrained(str(tmp_path / "cc")).config.source_thresholds is None
    )  # --out: the original is untouched
    want = calibrate_source_thresholds(cc, iter([planted(2500, seed=10)]), max_tokens=2000)
    cc.config.source_thresholds = None
    assert calibrated.config.source_thresholds == pytest.approx(
        want.thresholds, rel=1e-6
    )  # the first 2000 tokens of the stores

    # in place, then --clear; the text output names both fingerprints
    result = runner.invoke(
        app, ["crosscoder", "calibrate", "--crosscoder", str(tmp_path / "cc"), *acts, "--k", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "k = 2" in result.output and uncalibrated[:12] in result.output
    assert Crosscoder.from_pretrained(str(tmp_path / "cc")).config.source_thresholds is not None
    result = runner.invoke(app, ["crosscoder", "calibrate", "--crosscoder", str(tmp_path / "cc"), "--clear"])
    assert result.exit_code == 0, result.output
    assert crosscoder_fingerprint(Crosscoder.from_pretrained(str(tmp_path / "cc"))) == uncalibrated

    relu = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=D, n_features=8, layer=3))
    relu.save_pretrained(tmp_path / "relu")
    result = runner.invoke(app, ["crosscoder", "calibrate", "--crosscoder", str(tmp_path / "relu"), *acts])
    assert result.exit_code == 2 and "relu crosscoder" in result.output and "BatchTopK" in result.output
    result = runner.invoke(app, ["crosscoder", "calibrate", "--crosscoder", str(tmp_path / "cc")])
    assert result.exit_code == 2 and "--acts" in result.output
    result = runner.invoke(app, ["crosscoder", "calibrate", "--crosscoder", str(tmp_path / "cc"), "--acts", stores[0]])
    assert result.exit_code == 2 and "['base', 'sft']" in result.output
