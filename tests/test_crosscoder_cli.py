"""End to end through the CLI: collect -> crosscoder train (stores, YAML, live) -> info -> analyze -> dynamics."""

from __future__ import annotations

import json

import pyarrow.csv as pacsv
import pytest
from typer.testing import CliRunner

from posttrain_probe.cli import app
from posttrain_probe.crosscoder import Crosscoder
from posttrain_probe.testing import save_tiny_pair, tiny_model, tiny_tokenizer, tuned_copy

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A base model and two 'checkpoints' of one run (3 and 10 optimizer steps), on disk."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = tiny_tokenizer()
    base = tiny_model("qwen3", seed=0)
    paths = {}
    for name, model in (
        ("base", base),
        ("ckpt1", tuned_copy(base, tokenizer, steps=3, lr=1e-3)),
        ("ckpt2", tuned_copy(base, tokenizer, steps=10, lr=1e-3)),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    out = root / "acts"
    _ok(
        [
            "collect",
            *sum([["--model", f"{n}={p}"] for n, p in paths.items()], []),
            "--dataset",
            "synthetic:arithmetic",
            "--layer",
            "2",
            "--seq-len",
            "48",
            "--max-tokens",
            "6000",
            "--out",
            out,
        ]
    )
    return paths, out


def test_train_info_analyze_dynamics(checkpoints, tmp_path):
    paths, acts = checkpoints
    config = tmp_path / "cc.yaml"
    config.write_text(
        f"acts: [{acts}]\nn_features: 128\nbatch_size: 256\nlr: 0.001\nlog_every: 5\nout: {tmp_path / 'cc'}\n"
    )
    _ok(["crosscoder", "train", "--config", config, "--n-features", "96"])  # the command line wins over the YAML
    cc = Crosscoder.from_pretrained(str(tmp_path / "cc"))
    assert cc.model_names == ["base", "ckpt1", "ckpt2"] and cc.config.n_features == 96 and cc.config.layer == 2
    info = json.loads(_ok(["crosscoder", "info", tmp_path / "cc", "--json"]))
    assert (
        info["models"] == ["base", "ckpt1", "ckpt2"]
        and info["steps"] == 6000 // 256
        and set(info["fvu"]) == {"base", "ckpt1", "ckpt2"}
    )

    out = _ok(
        [
            "analyze",
            "--crosscoder",
            tmp_path / "cc",
            "--base",
            "base",
            "--out",
            tmp_path / "analysis",
            "--acts",
            acts,
            "--table-format",
            "csv",
            "--stats-tokens",
            "2000",
        ]
    )
    assert "ckpt1 vs base" in out and "ckpt2 vs base" in out
    table = pacsv.read_csv(tmp_path / "analysis" / "features.csv")
    assert table.num_rows == 96 and {
        "nrn_ckpt1",
        "norm_ratio_ckpt2",
        "mas_base",
        "frequency",
        "max_activation",
        "dead",
    } <= set(table.column_names)
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert (
        set(summary["models"]) == {"ckpt1", "ckpt2"} and sum(summary["mas_dominant"].values()) == 96 - summary["n_dead"]
    )
    assert (
        summary["liveness"] == "activations"
        and summary["settings"]["n_features"] == 96
        and summary["settings"]["l1_coefficient"] == 2.0
    )
    assert summary["n_duplicate_groups"] <= 96 - summary["n_dead"]
    # Without --acts, liveness comes from the run's training counters, never silently "all live".
    _ok(["analyze", "--crosscoder", tmp_path / "cc", "--base", "base", "--out", tmp_path / "analysis_noacts"])
    no_acts = json.loads((tmp_path / "analysis_noacts" / "summary.json").read_text())
    assert no_acts["liveness"] == "training" and no_acts["n_dead"] is not None
    from posttrain_probe.analysis.feature_sets import load_feature_set

    shared = load_feature_set(tmp_path / "analysis" / "feature_sets" / "ckpt1_shared.json").features
    assert (
        len(shared) >= summary["models"]["ckpt1"]["categories"]["shared"] > 0
    )  # the summary also drops never-firing features
    for stem in ("nrn_histograms", "mas_distributions", "norm_ratio_vs_cosine_ckpt1", "norm_ratio_vs_cosine_ckpt2"):
        assert (tmp_path / "analysis" / f"{stem}.png").stat().st_size > 1000 and (
            tmp_path / "analysis" / f"{stem}.svg"
        ).exists()

    _ok(["dynamics", "--crosscoder", tmp_path / "cc", "--base", "base", "--k", "10", "--out", tmp_path / "dyn"])
    result = json.loads((tmp_path / "dyn" / "dynamics.json").read_text())
    assert (
        result["checkpoints"] == ["ckpt1", "ckpt2"] and len(result["overlap"]) == 2 and result["overlap"][0][0] == 1.0
    )
    assert (tmp_path / "dyn" / "topk_overlap.png").exists() and (tmp_path / "dyn" / "rank_shifts.png").exists()


def test_dynamics_over_separate_two_model_crosscoders(checkpoints, tmp_path):
    paths, acts = checkpoints
    for name in ("ckpt1", "ckpt2"):
        _ok(
            [
                "crosscoder",
                "train",
                "--acts",
                acts,
                "--model-names",
                "base",
                "--model-names",
                name,
                "--n-features",
                "64",
                "--batch-size",
                "256",
                "--lr",
                "0.001",
                "--out",
                tmp_path / name,
            ]
        )
    _ok(
        [
            "dynamics",
            "--crosscoder",
            tmp_path / "ckpt1",
            "--crosscoder",
            tmp_path / "ckpt2",
            "--k",
            "10",
            "--out",
            tmp_path / "dyn",
        ]
    )
    result = json.loads((tmp_path / "dyn" / "dynamics.json").read_text())
    assert result["checkpoints"] == ["ckpt1", "ckpt2"]
    assert result["matching"]["ckpt1"] is None  # the first crosscoder starts the shared index
    quality = result["matching"]["ckpt2"]
    assert 0.7 <= quality["mean"] <= 1 and quality["min_cosine"] == 0.7
    # every defined latent of ckpt2 is matched or gets a new index entry; undefined ones (negligible or duplicate) neither
    assert quality["n_matched"] + quality["n_unmatched"] + result["n_undefined"]["ckpt2"] == 64
    assert result["n_index_features"] == 64 - result["n_undefined"]["ckpt1"] + quality["n_unmatched"]


def test_live_training_from_models(tmp_path):
    pair = save_tiny_pair(tmp_path / "m", steps=5)
    _ok(
        [
            "crosscoder",
            "train",
            "--model",
            f"base={pair['base']}",
            "--model",
            f"tuned={pair['tuned']}",
            "--dataset",
            "synthetic:mcq",
            "--layer",
            "1",
            "--seq-len",
            "32",
            "--n-tokens",
            "1024",
            "--batch-size",
            "128",
            "--n-features",
            "32",
            "--scale-tokens",
            "512",
            "--out",
            tmp_path / "cc",
        ]
    )
    cc = Crosscoder.from_pretrained(str(tmp_path / "cc"))
    assert cc.model_names == ["base", "tuned"] and cc.config.layer == 1
    lines = (tmp_path / "cc" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["tokens"] == 1024


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--acts", "{acts}", "--layer", "3"], "layer 3 was not collected"),
        (["--acts", "{acts}", "--model-names", "base", "--model-names", "rl"], "models ['rl'] are not in"),
        (["--acts", "{acts}/base/layer2", "--acts", "{acts}/base/layer2"], "names must differ"),
        (["--acts", "{acts}", "--model", "base=x"], "not both or neither"),
        (["--acts", "{acts}", "--batch-size", "0"], "batch_size must be >= 1"),
        (["--acts", "{acts}", "--activation", "topk"], "activation 'topk' is not one of"),
        (["--acts", "/no/such/dir"], "not found"),
    ],
)
def test_crosscoder_train_bad_input(checkpoints, tmp_path, args, message):
    _, acts = checkpoints
    result = runner.invoke(
        app, ["crosscoder", "train", "--out", str(tmp_path / "cc"), *[a.format(acts=acts) for a in args]]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_an_existing_run_needs_resume_or_overwrite(checkpoints, tmp_path):
    _, acts = checkpoints
    args = [
        "crosscoder",
        "train",
        "--acts",
        acts,
        "--n-features",
        "32",
        "--batch-size",
        "256",
        "--n-tokens",
        "1024",
        "--out",
        tmp_path / "cc",
    ]
    _ok(args)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    _ok([*args, "--overwrite"])
    _ok([*args, "--resume"])  # already finished: resuming is a no-op that keeps the result
    bad = runner.invoke(
        app, ["analyze", "--crosscoder", str(tmp_path / "cc"), "--base", "sft", "--out", str(tmp_path / "a")]
    )
    assert bad.exit_code == 2 and "'sft'" in bad.output and "base" in bad.output


@pytest.mark.slow
def test_module_entry_point_with_the_tiny_recipe(checkpoints, tmp_path):
    """`python -m posttrain_probe crosscoder train --config recipes/configs/tiny/crosscoder.yaml` (what
    `accelerate launch -m ...` runs), with the data and output paths overridden on the command line."""
    import subprocess
    import sys
    from pathlib import Path

    _, acts = checkpoints
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny" / "crosscoder.yaml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain_probe",
            "crosscoder",
            "train",
            "--config",
            str(recipe),
            "--acts",
            str(acts),
            "--out",
            str(tmp_path / "cc"),
            "--n-tokens",
            "2048",
        ],
        check=True,
        cwd=tmp_path,
    )
    cc = Crosscoder.from_pretrained(str(tmp_path / "cc"))
    assert cc.config.n_features == 512 and cc.model_names == ["base", "ckpt1", "ckpt2"]
