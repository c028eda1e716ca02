"""benchmarks/gpu_suite.py: the GPU suite's code, run on tiny shapes on the CPU (``--device cpu --tiny``)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STATUSES = {"pass", "fail", "skipped", "error", "timeout"}
NAMES = ["crosscoder", "capture", "blocking", "store", "callback", "lm_eval", "feed"]


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_suite_reports_every_benchmark(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--device", "cpu", "--tiny", "--tmp", str(tmp_path), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"]["tiny"] is True and report["suite"]["device"] == "cpu"
    results = report["benchmarks"]
    assert list(results) == NAMES
    for name, result in results.items():
        assert result["status"] in STATUSES, (name, result["status"], result.get("reason"))
        if result["status"] == "skipped":
            assert result["reason"], name  # a skip says why
            continue
        # every benchmark whose packages are there ran to the end and its output was read
        assert result["status"] in {"pass", "fail"}, (name, result.get("reason"), result.get("stderr_tail"))
        assert result["returncode"] == 0 and result["stdout"].strip(), name
        figures = result["figures"]
        assert figures, name
        for key, value in figures.items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, value)
        for check in result["checks"]:
            assert isinstance(check["ok"], bool) and check["target"], (name, check)
    # benchmarks whose packages are installed here were not skipped
    for name, modules in {"callback": ("trl", "datasets"), "lm_eval": ("lm_eval", "datasets")}.items():
        if all(importlib.util.find_spec(m) for m in modules):
            assert results[name]["status"] != "skipped", results[name]["reason"]
    crosscoder = results["crosscoder"]["figures"]
    for act in ("relu", "batchtopk"):
        assert {f"{act}_tokens_per_s", f"{act}_fraction_of_peak"} <= set(crosscoder)
        # where the step's time goes: torch.profiler's operators of one call of ours, kept in the JSON's stdout
        table = results["crosscoder"]["stdout"].split(f"profile of ours, {act} N=3:")[1].split("\nprofile of ours")[0]
        assert "Self CPU" in table and "aten::" in table
    assert "layer2_speedup" in results["capture"]["figures"]
    assert {"store_tokens_per_s", "resident_tokens_per_s", "store_over_resident"} <= set(results["feed"]["figures"])
    assert "| benchmark | key figure | target | status |" in proc.stdout
    assert report["summary_markdown"] in proc.stdout


def test_missing_package_is_skipped_with_reason():
    suite = _load_suite()
    assert suite.missing_modules(("json", "surely_not_a_module_xyz")) == ["surely_not_a_module_xyz"]
    bench = next(b for b in suite.benchmarks() if b.name == "store")
    argv = [sys.executable, "-c", "import surely_not_a_module_xyz"]
    result = suite.run_one(bench, argv, None, timeout=60, echo=False)
    assert result["status"] == "skipped"
    assert "surely_not_a_module_xyz" in result["reason"]


def test_timeout_and_error_are_reported():
    suite = _load_suite()
    bench = next(b for b in suite.benchmarks() if b.name == "store")
    slow = suite.run_one(bench, [sys.executable, "-c", "import time; time.sleep(30)"], None, timeout=1, echo=False)
    assert slow["status"] == "timeout" and slow["seconds"] < 20
    broken = suite.run_one(bench, [sys.executable, "-c", "raise SystemExit('boom')"], None, timeout=60, echo=False)
    assert broken["status"] == "error" and "boom" in broken["reason"]


def test_parsers_read_the_gpu_tables():
    """The cuda-only columns (peak memory) and a loss-check mismatch are read as the GPU run prints them."""
    suite = _load_suite()
    stdout = "\n".join(
        [
            "check relu      N=3: same weights (float64 copies): loss rel. diff 1.0e-12, largest grad rel. diff 2.0e-10: ok",
            "activation |  N |  ref tok/s | ours tok/s |  ours/ref | >= 1.5x |  ref %pk | ours %pk |  ref GiB | ours GiB",
            "-" * 20,
            "relu       |  3 |  1,000,000 |  2,000,000 |     2.00x |     yes |   25.0% |   50.0% |     5.00 |     4.00",
            "batchtopk  |  3 |    500,000 |  1,500,000 |     3.00x |     yes |   10.0% |   30.0% |     6.00 |     3.50"
            "  (loss check MISMATCH: not the same loss)",
            "%pk = ...",
        ]
    )
    figures, details, checks = suite.parse_crosscoder(stdout)
    assert figures["relu_fraction_of_peak"] == pytest.approx(0.5)
    assert figures["batchtopk_peak_gib"] == pytest.approx(3.5)
    assert details["batchtopk_same_loss_as_reference"] is False
    assert [c["ok"] for c in checks] == [True, False, True]  # relu >= 40%, batchtopk < 40%, the check line
    assert suite.parse_lm_eval(
        "without intervention:     2.00 s wall ( 800.0 requests/s), 1.00 s CPU; wall of each run [2.0]\n"
        "with intervention:        2.10 s wall ( 761.9 requests/s), 1.00 s CPU; wall of each run [2.1]\n"
        "throughput ratio (with / without), wall: 0.952x  (target >= 0.9x on GPU for a 4B model: met)\n"
    )[2][0]["ok"]


def test_lm_eval_parser_reads_the_bare_forward_and_its_host_syncs():
    """A GPU run's bare-forward line and host-sync count become a figure and a check; a CPU run has no sync line."""
    suite = _load_suite()
    head = (
        "without intervention:     2.00 s wall ( 800.0 requests/s), 1.00 s CPU; wall of each run [2.0]\n"
        "with intervention:        2.50 s wall ( 640.0 requests/s), 1.00 s CPU; wall of each run [2.5]\n"
        "throughput ratio (with / without), wall: 0.800x  (target >= 0.9x on GPU for a 4B model: NOT met)\n"
        "bare forward (32 x 128 tokens, median of 10): 40.00 ms without, 41.00 ms with the intervention, "
        "speed ratio (with / without) 0.976x\n"
    )
    figures, details, checks = suite.parse_lm_eval(
        head + "host syncs in one forward: 1 without, 3 with the intervention; the intervention's: 2 (target 0)\n"
    )
    assert figures["bare_forward_ratio_with_over_without"] == pytest.approx(0.976)
    assert details["bare_forward_ms_with"] == pytest.approx(41.0) and details["intervention_host_syncs"] == 2
    assert details["model_host_syncs"] == 1  # the model's own syncs are not the intervention's
    assert [(c["name"], c["ok"]) for c in checks] == [
        ("lm-eval throughput with / without intervention", False),
        ("intervention host syncs in one forward", False),
    ]
    assert suite.key_figure("lm_eval", {"figures": figures, "details": details}).endswith(
        "; bare forward 0.976x, 2 host syncs"
    )
    figures, details, checks = suite.parse_lm_eval(head)
    assert "intervention_host_syncs" not in details and len(checks) == 1


def test_feed_parser_reads_the_ratio():
    suite = _load_suite()
    stdout = "\n".join(
        [
            "crosscoder feed: N=3 d=2560 F=32768 B=4096 batchtopk k=32, ...",
            "fed from   |     tokens/s | runs",
            "-" * 32,
            "store      |      180,000 | 180,000",
            "resident   |      200,000 | 200,000",
            "store / resident: 0.900x (target >= 0.9x: met)",
        ]
    )
    figures, _, checks = suite.parse_feed(stdout)
    assert figures == {
        "store_tokens_per_s": 180000.0,
        "resident_tokens_per_s": 200000.0,
        "store_over_resident": pytest.approx(0.9),
    }
    assert checks[0]["ok"] is True and checks[0]["target"] == ">= 0.9x"
    assert "0.900x (180,000 vs 200,000 tok/s)" in suite.key_figure("feed", {"figures": figures})


def test_crosscoder_parser_checks_the_host_syncs_of_a_gpu_run():
    suite = _load_suite()
    stdout = "\n".join(
        [
            "activation |  N |  ref tok/s | ours tok/s |  ours/ref | >= 1.5x",
            "-" * 20,
            "relu       |  3 |      1,000 |      2,000 |     2.00x |     yes",
            "batchtopk  |  3 |        500 |      1,500 |     3.00x |     yes",
            "host syncs in 10 steps of ours (last N): relu 0, batchtopk 3 (target 0: the step never waits for the GPU)",
        ]
    )
    _, details, checks = suite.parse_crosscoder(stdout)
    assert details["relu_host_syncs"] == 0 and details["batchtopk_host_syncs"] == 3
    by_name = {c["name"]: c["ok"] for c in checks}
    assert by_name == {"relu host syncs in the timed step": True, "batchtopk host syncs in the timed step": False}
