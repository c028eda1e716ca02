"""Bad inputs across the CLI and the Python API (issue 14): one clear line, exit code 2, nothing written.

Every CLI case runs in its own empty working directory (fixtures live elsewhere) and must:
exit with code 2, print no traceback, end stderr with one ``error: ...`` line that contains the
expected words (naming the bad value and what was expected), and leave the working directory as it
was. Python API cases must raise ProbeError with the expected words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from posttrain_probe.activations import CollectConfig, PairedActivations
from posttrain_probe.activations.collect import collect
from posttrain_probe.analysis.attribution import norm_ratio, nrn
from posttrain_probe.analysis.duplicates import duplicate_groups
from posttrain_probe.analysis.dynamics import match_features, top_k_ties
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder
from posttrain_probe.crosscoder.inspect import load_crosscoder
from posttrain_probe.data import load_dataset_spec
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import check_model_path
from posttrain_probe.testing import save_tiny_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny base/tuned models, their stores at layer 2, a finished and an unfinished crosscoder, an empty file."""
    root = tmp_path_factory.mktemp("world")
    models = save_tiny_pair(root / "models", "qwen3", steps=3)
    acts = root / "acts"
    collect(
        CollectConfig(
            model=[f"{k}={v}" for k, v in models.items()],
            dataset="synthetic:arithmetic",
            out=acts,
            layer=[2],
            seq_len=48,
            max_tokens=3000,
        ),
        progress=False,
    )
    source = PairedActivations.from_directory(acts, layer=2)
    cfg = dict(batch_size=256, lr=1e-3, log_every=2, checkpoint_every=2)
    train_crosscoder(
        source, CrosscoderConfig(n_features=32), CrosscoderTrainingConfig(**cfg), root / "cc", progress=False
    )
    train_crosscoder(
        source,
        CrosscoderConfig(n_features=32),
        CrosscoderTrainingConfig(**cfg, max_steps_per_run=2),
        root / "cc_part",
        progress=False,
    )
    (root / "empty.jsonl").write_text("")
    (root / "a_file").write_text("not a directory")
    return {
        "root": root,
        "base": models["base"],
        "tuned": models["tuned"],
        "acts": acts,
        "cc": root / "cc",
        "cc_part": root / "cc_part",
        "empty": root / "empty.jsonl",
        "file": root / "a_file",
    }


COLLECT = [
    "collect",
    "--model",
    "base={base}",
    "--dataset",
    "synthetic:arithmetic",
    "--out",
    "out",
    "--max-tokens",
    "200",
]
TRAIN = ["crosscoder", "train", "--acts", "{acts}", "--out", "cc", "--n-features", "16", "--batch-size", "256"]
LM_EVAL = ["lm-eval", "--model", "probe-hf", "--tasks", "probe_mcq", "--limit", "2"]

CLI_CASES = [
    (["collect", "--model", "base", "--dataset", "synthetic:arithmetic", "--out", "out"], "expected NAME=PATH"),
    (
        [
            "collect",
            "--model",
            "base={base}",
            "--model",
            "base={tuned}",
            "--dataset",
            "synthetic:arithmetic",
            "--out",
            "out",
        ],
        "given twice",
    ),
    (
        ["collect", "--model", "base=./no/such/model", "--dataset", "synthetic:arithmetic", "--out", "out"],
        "does not exist",
    ),
    (["collect", "--model", "base={base}", "--dataset", "{empty}", "--out", "out"], "is empty"),
    (["collect", "--model", "base={base}", "--dataset", "missing.jsonl", "--out", "out"], "does not exist"),
    (["collect", "--model", "base={base}", "--dataset", "synthetic:nope", "--out", "out"], "nope"),
    (["collect", "--model", "base={base}", "--dataset", "synthetic:arithmetic", "--out", "{file}"], "not a directory"),
    ([*COLLECT, "--layer", "99"], "layer 99 is out of range"),
    ([*COLLECT, "--seq-len", "0"], "seq_len must be >= 1"),
    ([*COLLECT, "--dtype", "int8"], "int8"),
    ([*COLLECT, "--max-tokens", "-5"], "max_tokens must be >= 0"),
    (["crosscoder", "train", "--acts", "nowhere", "--out", "cc"], "not found: nowhere"),
    ([*TRAIN, "--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    ([*TRAIN, "--lr", "nan"], "lr must be a finite number > 0, got nan"),
    ([*TRAIN, "--batch-size", "0"], "batch_size must be >= 1"),
    ([*TRAIN, "--activation", "topk"], "activation 'topk' is not one of"),
    ([*TRAIN, "--l1-coefficient", "-2"], "l1_coefficient must be a finite number >= 0"),
    ([*TRAIN, "--beta2", "1.0"], "beta2 must be in [0, 1)"),
    ([*TRAIN, "--lr-decay-fraction", "2"], "lr_decay_fraction must be in [0, 1]"),
    ([*TRAIN, "--resume"], "holds no interrupted crosscoder run"),
    (["crosscoder", "train", "--acts", "{acts}"], "--out is required"),
    (["crosscoder", "info", "nowhere"], "holds no crosscoder"),
    (["analyze", "--crosscoder", "nowhere", "--out", "a"], "holds no crosscoder"),
    (
        ["analyze", "--crosscoder", "{cc}", "--base", "nope", "--out", "a"],
        "'nope' is not one of the crosscoder's models",
    ),
    (["analyze", "--crosscoder", "{cc}", "--out", "a", "--table-format", "xlsx"], "expected parquet or csv"),
    (["analyze", "--crosscoder", "{cc_part}", "--out", "a"], "unfinished training run"),
    (["crosscoder", "calibrate", "--crosscoder", "{cc_part}", "--acts", "{acts}"], "unfinished training run"),
    (
        ["crosscoder", "calibrate", "--crosscoder", "{cc_part}", "--acts", "{acts}", "--allow-incomplete"],
        "calibrating it in place would be overwritten",
    ),
    (
        [
            "leakage",
            "--crosscoder",
            "{cc_part}",
            "--base",
            "{base}",
            "--blocked",
            "{tuned}",
            "--features",
            "0",
            "--dataset",
            "synthetic:arithmetic",
            "--out",
            "l",
        ],
        "unfinished training run",
    ),
    (
        [
            "features",
            "fisher",
            "--crosscoder",
            "{cc_part}",
            "--model",
            "base={base}",
            "--dataset",
            "synthetic:openthoughts",
            "--out",
            "f",
        ],
        "unfinished training run",
    ),
    (["analyze", "--crosscoder", "{cc}", "--out", "a", "--norm-ratio-scale", "max"], "'max'"),
    (["dynamics", "--crosscoder", "{cc}", "--out", "d"], "at least two checkpoints"),
    (["dynamics", "--crosscoder", "{cc}", "--crosscoder", "{cc}", "--out", "d", "--k", "0"], "k=0"),
    (
        ["dynamics", "--crosscoder", "{cc}", "--crosscoder", "{cc}", "--out", "d", "--norm-floor", "1.5"],
        "norm_floor=1.5",
    ),
    (["dynamics", "--crosscoder", "{cc}", "--crosscoder", "{cc}", "--out", "d", "--min-cosine", "2"], "min_cosine=2.0"),
    (["store", "info", "nowhere"], "does not exist"),
    (["critical", "--base-samples", "nowhere", "--rl-samples", "nowhere2", "--out", "c.json"], "nowhere"),
    ([*LM_EVAL, "--model_args", "pretrained={base},crosscoderr=x"], "did you mean 'crosscoder'"),
    ([*LM_EVAL, "--model_args", "pretrained=./no/such/model"], "does not exist"),
    ([*LM_EVAL, "--model_args", "dtype=float32"], "needs pretrained="),
    ([*LM_EVAL, "--model_args", "pretrained={base},crosscoder={cc},features=0,mode=bogus"], "bogus"),
]


def _fill(args: list[str], world: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in world.items()}) for a in args]


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"), CLI_CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CLI_CASES)]
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, args, expected):
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    before = _listing(world["root"])
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        result = runner.invoke(app, _fill(args, world))
    finally:
        os.chdir(cwd)
    stderr = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert stderr and stderr[-1].startswith("error: ") and expected in stderr[-1], result.stderr
    assert _listing(run_dir) == [], f"wrote {_listing(run_dir)}"
    assert _listing(world["root"]) == before  # nothing written or lost among the inputs


PYTHON_CASES = [
    (lambda w: nrn(torch.rand(4, 2, 3), 0, 2), "tuned=2 is out of range"),
    (lambda w: norm_ratio(torch.rand(4, 2, 3), 0, 1, scale="max"), "'max'"),
    (lambda w: duplicate_groups(torch.rand(4, 1, 3), min_cosine=0), "min_cosine=0"),
    (lambda w: match_features(torch.rand(3, 4), torch.rand(3, 4), min_cosine=2.0), "min_cosine=2.0"),
    (lambda w: top_k_ties(torch.rand(2, 5), k=9), "k=9"),
    (lambda w: CrosscoderTrainingConfig(lr=0.0), "lr must be a finite number > 0"),
    (lambda w: CrosscoderTrainingConfig(threshold_decay=1.0), "threshold_decay must be in [0, 1)"),
    (
        lambda w: CollectConfig(model=["base=m"], dataset="synthetic:arithmetic", out=w["root"] / "o", seq_len=0),
        "seq_len must be >= 1",
    ),
    (lambda w: load_dataset_spec(str(w["empty"])), "is empty"),
    (lambda w: check_model_path("./no/such/model"), "does not exist"),
    (lambda w: load_crosscoder(w["root"] / "nowhere"), "holds no crosscoder"),
    (lambda w: load_crosscoder(w["cc_part"], allow_incomplete=False), "unfinished training run"),
    (
        lambda w: train_crosscoder(
            PairedActivations.from_directory(w["acts"], layer=2),
            CrosscoderConfig(n_features=8),
            CrosscoderTrainingConfig(batch_size=256),
            w["root"] / "never",
            resume=True,
            progress=False,
        ),
        "holds no interrupted crosscoder run",
    ),
]


@pytest.mark.parametrize(("call", "expected"), PYTHON_CASES, ids=[str(i) for i in range(len(PYTHON_CASES))])
def test_python_bad_input_raises_probe_error(world, call, expected):
    with pytest.raises(ProbeError) as info:
        call(world)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_suite_covers_at_least_40_cases():
    assert len(CLI_CASES) + len(PYTHON_CASES) >= 40
    json.dumps([case[1] for case in CLI_CASES])  # messages are plain strings
