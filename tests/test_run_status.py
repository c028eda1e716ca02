"""Finished or not, and values checked where they are read (issue 14 parts 3-4).

A crosscoder run says which step its weights are from and whether it completed; an interrupted
one is reported as such (Python: a warning; CLI: refused unless --allow-incomplete); --resume with
nothing to resume is an error; a finished run that looks poor says what to change. NaN inside an
activation store is found by `store info --check-values`, by every reader of the store and by the
activation statistics of `analyze`.
"""

from __future__ import annotations

import json

import pytest
import torch
from _planted import write_planted_stores
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from posttrain_probe.activations import PairedActivations
from posttrain_probe.activations.manifest import file_checksum
from posttrain_probe.analysis.features import feature_activation_stats
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.crosscoder.inspect import crosscoder_summary, load_crosscoder, training_status
from posttrain_probe.crosscoder.metrics import quality_warnings
from posttrain_probe.errors import ProbeError

runner = CliRunner()
NAMES = ["base", "ft"]


def planted_acts(n: int = 4096, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(2, 24, d, generator=g), dim=-1)
    coeff = torch.rand(n, 24, generator=g) * 3 * (torch.rand(n, 24, generator=g) < 0.1)
    return torch.einsum("tk,mkd->tmd", coeff, dirs)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return write_planted_stores(root, planted_acts(), NAMES, layer=2)


def config(**kw) -> CrosscoderTrainingConfig:
    return CrosscoderTrainingConfig(
        **{**dict(n_tokens=256 * 8, batch_size=256, lr=1e-3, log_every=2, checkpoint_every=2), **kw}
    )


def test_interrupted_run_is_reported_and_refused_by_the_cli(stores, tmp_path):
    out = tmp_path / "cc"
    train_crosscoder(
        PairedActivations(stores), CrosscoderConfig(n_features=32), config(max_steps_per_run=4), out, progress=False
    )
    status = training_status(out)
    assert status == {"complete": False, "step": 4, "total_steps": 8, "tokens": 1024}
    info = crosscoder_summary(out)
    assert info["weights_step"] == 4 and info["complete"] is False and info["total_steps"] == 8
    with pytest.warns(UserWarning, match="unfinished training run.*step 4 of 8"):
        load_crosscoder(out)
    with pytest.raises(ProbeError, match=r"unfinished.*--resume.*--allow-incomplete"):
        load_crosscoder(out, allow_incomplete=False)
    result = runner.invoke(app, ["analyze", "--crosscoder", str(out), "--base", "base", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "unfinished training run" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a").exists()  # nothing written
    result = runner.invoke(
        app, ["analyze", "--crosscoder", str(out), "--base", "base", "--out", str(tmp_path / "a"), "--allow-incomplete"]
    )
    assert result.exit_code == 0, result.output
    info_out = runner.invoke(app, ["crosscoder", "info", str(out), "--json"])
    assert json.loads(info_out.output)["weights_step"] == 4
    # finishing the run marks it complete and records what looks poor about it
    with pytest.warns(UserWarning, match="only 8 optimizer steps"):
        train_crosscoder(
            PairedActivations(stores), CrosscoderConfig(n_features=32), config(), out, resume=True, progress=False
        )
    status = training_status(out)
    assert status["complete"] is True and status["step"] == 8
    assert any("optimizer steps" in w for w in status["warnings"])


def test_resume_with_nothing_to_resume_is_an_error(stores, tmp_path):
    with pytest.raises(ProbeError, match="holds no interrupted crosscoder run"):
        train_crosscoder(
            PairedActivations(stores),
            CrosscoderConfig(n_features=32),
            config(),
            tmp_path / "new",
            resume=True,
            progress=False,
        )
    result = runner.invoke(
        app,
        [
            "crosscoder",
            "train",
            "--acts",
            str(stores["base"]),
            "--acts",
            str(stores["ft"]),
            "--out",
            str(tmp_path / "new2"),
            "--resume",
            "--n-features",
            "32",
            "--batch-size",
            "256",
        ],
    )
    assert result.exit_code == 2 and "holds no interrupted crosscoder run" in result.output


def test_quality_warnings_name_what_to_change():
    cfg = CrosscoderConfig(model_names=NAMES, d_model=16, n_features=512)
    record = {"fvu": [0.47, 0.05], "l0": 120.0, "dead_fraction": 0.6}
    problems = quality_warnings(record, cfg, total_steps=39)
    assert len(problems) == 4
    assert "39 optimizer steps" in problems[0] and "n_tokens" in problems[0]
    assert "FVU of base is 0.470" in problems[1] and "l1_coefficient" in problems[1]
    assert "L0 is 120.0 of F=512" in problems[2]
    assert "60% of latents are dead" in problems[3]
    healthy = quality_warnings({"fvu": [0.05, 0.04], "l0": 20.0, "dead_fraction": 0.01}, cfg, total_steps=5000)
    assert healthy == []
    topk = CrosscoderConfig(model_names=NAMES, d_model=16, n_features=512, activation="batchtopk", k=32)
    assert (
        "raise k" in quality_warnings({"fvu": [0.3, 0.3], "l0": 32.0, "dead_fraction": 0.0}, topk, total_steps=5000)[0]
    )


def put_nan_into(store, row: int, column: int) -> None:
    """Write NaN into a store whose checksums stay valid (a store made by another tool, or a bit flip
    before the checksum was taken): the writer itself refuses NaN."""
    manifest = json.loads((store / "manifest.json").read_text())
    start = 0
    for shard in manifest["shards"]:
        if start <= row < start + shard["n_tokens"]:
            tensors = load_file(store / shard["file"])
            tensors["acts"][row - start, column] = float("nan")
            save_file(tensors, store / shard["file"])
            shard["xxh3_128"] = file_checksum(store / shard["file"])
            break
        start += shard["n_tokens"]
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_nan_in_a_store_is_found_by_store_info_readers_and_stats(tmp_path):
    acts = planted_acts()
    paths = write_planted_stores(tmp_path / "nan", acts, NAMES, layer=2)
    put_nan_into(paths["ft"], 3000, 5)
    acts[3000, 1, 5] = float("nan")
    result = runner.invoke(app, ["store", "info", str(tmp_path / "nan"), "--check-values"])
    assert result.exit_code == 1 and "non-finite" in result.output and "NaN/inf" in result.output
    assert runner.invoke(app, ["store", "info", str(tmp_path / "nan")]).exit_code == 0  # checksums alone are fine
    source = PairedActivations(paths)
    with pytest.raises(ProbeError, match=r"1 non-finite activations.*re-collect"):
        for _ in source.iter_batches(512, shuffle=False):
            pass
    cc = load_crosscoder_from(paths, tmp_path)
    with pytest.raises(ProbeError, match="non-finite"):
        feature_activation_stats(cc, PairedActivations(paths).iter_batches(512, shuffle=False))
    # a live source (no store check) with NaN: the statistics refuse them
    with pytest.raises(ProbeError, match="NaN/inf activations"):
        feature_activation_stats(cc, [acts[2990:3010]])


def load_crosscoder_from(paths, tmp_path):
    """A crosscoder trained on the clean first 2048 tokens of the same models."""
    clean = write_planted_stores(tmp_path / "clean", planted_acts()[:2048], NAMES, layer=2)
    return train_crosscoder(
        PairedActivations(clean),
        CrosscoderConfig(n_features=32),
        config(n_tokens=2048),
        tmp_path / "cc",
        progress=False,
    )
