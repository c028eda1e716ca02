"""benchmarks/peers.py: both modes on tiny shapes, with whichever peer libraries are installed (none in CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
PEERS = ["dictionary_learning", "sparsify", "sae_lens", "llamascopium"]
TINY = ["--threads", "1", "--d-model", "16", "--features", "64", "--batch", "64", "--k", "4", "--per-model", "20"]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *extra, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _check_missing(rows: list[dict], report: dict) -> None:
    """A peer is either measured or reported as a row saying how to install it (or why it cannot run)."""
    for peer in PEERS:
        mine = [r for r in rows if r["library"] == peer]
        assert mine, peer
        missing = [r["missing"] for r in mine if "missing" in r]
        status = report["environment"]["peers"][peer]
        if status.startswith(("not installed", "unavailable")):
            assert missing and all(m == status for m in missing), (peer, missing)
            assert "pip install" in status or status.startswith("unavailable"), status
        if importlib.util.find_spec(peer) is None:
            assert status.startswith("not installed"), (peer, status)


@pytest.mark.slow
def test_speed_table_has_our_rows_and_every_peer(tmp_path):
    report, stdout = _run(tmp_path, "--repeats", "1")
    rows = report["speed"]
    assert "ms/step" in stdout and "posttrain-probe" in stdout
    for arch in ("relu_cc", "batchtopk_cc", "sae"):
        ours = [r for r in rows if r["arch"] == arch and r["library"] == "posttrain-probe"]
        assert len(ours) == 1, arch
        assert ours[0]["check"] == "ok" and ours[0]["vs_ours"] == 1.0
        assert ours[0]["n_models"] == (1 if arch == "sae" else 2)
    for r in rows:
        if "missing" in r:
            continue
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert math.isfinite(r["vs_ours"]) and r["vs_ours"] > 0, r
        assert r["check"] == "ok", (r["library"], r["implementation"], r["check"])
        if r["arch"] != "relu_cc" and r["library"] != "llamascopium":
            assert abs(r["train_l0"] - 4) < 0.7, r
    _check_missing(rows, report)


@pytest.mark.slow
def test_quality_table_has_our_rows_and_sane_numbers(tmp_path):
    report, stdout = _run(tmp_path, "--quality", "--tokens", "2048", "--eval-tokens", "512", "--true-l0", "3")
    rows = report["quality"]
    assert "FVU" in stdout and "batch order:" in stdout
    info = report["quality_info"]
    assert info["steps"] == 32 and info["order"]["per_k"][0]["recorded"]
    assert info["order"]["per_k"][0]["replay_mismatches"] == 0
    assert info["order"]["per_k"][0]["sae_same_batches_as_crosscoder"]
    ours = [r for r in rows if r["library"] == "posttrain-probe"]
    assert [r["implementation"] for r in ours] == ["Crosscoder batchtopk", "SAE on concat (N=1, batchtopk)"]
    for r in rows:
        if "missing" in r:
            continue
        assert r["k"] == 4 and r["eval_tokens"] == 512
        for key in ("fvu", "fvu_train", "train_l0", "inference_l0", "dead_fraction", "lr", "train_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["library"], key, r[key])
        assert 0 < r["fvu"] < 3 and len(r["fvu_per_model"]) == 2
        assert 0 <= r["dead_fraction"] <= 1
        assert len(r["recovered"]) == 2 and all(0 <= v <= 1 for v in r["recovered"])
        assert len(r["exclusive_as_exclusive"]) == 2
    for r in ours:  # batch top-k keeps k per token on average in training
        assert abs(r["train_l0"] - 4) < 0.5, r
    _check_missing(rows, report)
