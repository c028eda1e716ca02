"""Wall time and peak memory of `posttrain-probe demo` (issue 13 budgets: the default demo at most 10 minutes,
`--quick` at most 90 seconds, peak memory under 4 GB, on a 2-core CPU machine).

    python benchmarks/demo_budget.py            # both, each from an empty directory
    python benchmarks/demo_budget.py --quick    # --quick only

Each demo runs as a user runs it (`python -m posttrain_probe demo [--quick] --out DIR`) in a fresh temporary
directory, offline. Peak memory is the largest resident set of any process it started (the study process and
the training arms launched from it: ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is per process, not summed;
arms run one after another). A benchmark, not a test: it prints the figures and the budgets, and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

BUDGETS = {"quick": 90.0, "default": 600.0}
"""Seconds allowed per demo."""
MEMORY_BUDGET_GB = 4.0


def run_demo(quick: bool) -> tuple[float, int, float]:
    """Run one demo in a fresh directory; returns (seconds, exit code, peak RSS in GB of the processes so far)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "posttrain_probe", "demo", "--out", os.path.join(tmp, "study")]
        command += ["--quick"] if quick else []
        started = time.perf_counter()
        done = subprocess.run(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return elapsed, done.returncode, peak_gb


def main() -> None:
    """Run the demos and print a table: seconds, budget, peak memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Run demo --quick only.")
    args = parser.parse_args()
    rows = []
    for name in ["quick"] if args.quick else ["quick", "default"]:
        seconds, code, peak = run_demo(name == "quick")
        budget = BUDGETS[name]
        verdict = "ok" if code == 0 and seconds <= budget and peak < MEMORY_BUDGET_GB else "over budget or failed"
        rows.append((name, seconds, budget, peak, code, verdict))
    print(f"{'demo':8} {'seconds':>8} {'budget':>7} {'peak GB':>8} {'exit':>5}  verdict  ({os.cpu_count()} CPUs)")
    for name, seconds, budget, peak, code, verdict in rows:
        print(f"{name:8} {seconds:8.1f} {budget:7.0f} {peak:8.2f} {code:5d}  {verdict}")


if __name__ == "__main__":
    main()
