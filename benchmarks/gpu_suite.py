"""Every GPU figure the project claims, from one command: runs the benchmarks in benchmarks/ as subprocesses.

Usage::

    python benchmarks/gpu_suite.py --device cuda --json gpu_suite.json      # real shapes, one H100/H200, <= 8 min
    python benchmarks/gpu_suite.py --device cpu --tiny --json /tmp/s.json   # the same code on tiny shapes, seconds
    python benchmarks/gpu_suite.py --device cuda --only crosscoder,capture  # a subset

Each benchmark runs in its own process (so GPU memory is freed between them) with a time limit
(``--budget`` caps the whole suite), on randomly initialised models of the real shapes (no download):

=============  ===========================  =======================================================  ================
name           script                       what (``--device cuda``)                                  target
=============  ===========================  =======================================================  ================
crosscoder     crosscoder_throughput.py     N=3, d=2560, F=32768, B=4096, bf16 autocast, ReLU and    ours >= 40% of
                                            BatchTopK: tokens/s, % of bf16 peak, peak memory          bf16 peak
capture        capture_throughput.py        truncated vs full forward at the middle layer (18 of 36)  speed-up >=
                                            of a Qwen3-4B shape, bf16, 8 x 1024 tokens                0.9 * n/L
blocking       blocking_overhead.py         GradientBlocker (sae, subspace; 5% and 95% of F=32768)    op/step <= 3%
                                            on a training step of a Qwen2.5-0.5B shape, 8 x 1024
store          store_throughput.py          activation store write/read/epoch vs plain safetensors    >= 0.8x
                                            (CPU and disk only; run for completeness)
callback       callback_overhead.py         probe callbacks and feature monitor (F 16384) on          activations,
                                            SFTTrainer (TRL) steps of a Qwen2.5-0.5B shape, 200 steps monitor <= 2% each
lm_eval        lm_eval_throughput.py        lm-eval probe_mcq log-likelihood with / without a         >= 0.9x
                                            feature intervention, Qwen3-4B shape
feed           crosscoder_feed.py           train_crosscoder fed from bf16 stores vs from batches     store >= 0.9x
                                            on the device, N=3 d=2560 F=32768 B=4096 BatchTopK        resident
=============  ===========================  =======================================================  ================

``capture`` and ``callback`` build their model through ``posttrain_probe.testing.tiny_config``,
whose defaults (4 heads, MLP 2·d, 512-token vocabulary) are not the real ones; the suite runs
them through a small shim (``gpu_suite.py shim SCRIPT ARGS``, settings in the environment
variable ``GPU_SUITE_SHIM``) that fills in the real MLP width, heads, head size and vocabulary
and creates the weights directly on the device. The other benchmarks have real-shape presets.

A benchmark whose packages are missing (trl and datasets for ``callback``; lm_eval and datasets
for ``lm_eval``) is reported as skipped with the reason, as is one that stops on a
``ModuleNotFoundError``. Statuses: pass, fail (a target missed, or a correctness check of the
benchmark failed), skipped, error (non-zero exit, or output the suite could not read), timeout.
With ``--tiny`` the targets are still evaluated but mean nothing (tiny shapes on a CPU).

Output: progress and each benchmark's own output on stdout, then one summary table (Markdown);
``--json PATH`` writes the suite settings, the environment (versions, GPU) and, per benchmark,
its command, status, reason, figures, checks, seconds, return code and full stdout (and the tail of
stderr). Exit status 0 unless the suite itself fails: a missed target is a result, not an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM_ENV = "GPU_SUITE_SHIM"
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's datasheet
TINY_PEAK_TFLOPS = 0.1  # --tiny: a CPU-sized "peak", so that the crosscoder's % column reads above 0.0%
STDERR_TAIL = 4000  # characters of stderr kept in the JSON (all of stdout is kept)

# Real shapes that tiny_config does not default to (the shim fills them in).
QWEN3_4B = dict(
    intermediate_size=9728,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
)  # 4.02 B parameters, as Qwen3-4B
QWEN25_05B = dict(
    intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True
)  # 0.49 B parameters, as Qwen2.5-0.5B
# Tiny stand-ins that still exercise the shim (GQA, explicit head size, vocabulary > the tokenizer's).
TINY_QWEN3 = dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024)
TINY_QWEN2 = dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "trl",
    "datasets",
    "lm_eval",
    "math-verify",
    "peft",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "pyarrow",
    "posttrain-probe",
)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark script of benchmarks/ as the suite runs it.

    ``args`` / ``tiny_args``: its command-line arguments for ``--device cuda`` and for ``--tiny``
    (``{device}`` is replaced); ``shim`` / ``tiny_shim``: ``tiny_config`` overrides for the shim
    (None: run the script directly); ``needs``: modules that must be importable, else skipped;
    ``limit_s``: its time limit on the GPU (``tiny_limit_s`` with ``--tiny``); ``parse``: stdout
    to (figures, details, checks).
    """

    name: str
    script: str
    what: str
    args: tuple[str, ...]
    tiny_args: tuple[str, ...]
    parse: Callable[[str], tuple[dict, dict, list]]
    needs: tuple[str, ...] = ()
    shim: dict | None = None
    tiny_shim: dict | None = None
    limit_s: float = 120.0
    tiny_limit_s: float = 180.0
    gpu: bool = True


# --------------------------------------------------------------------------------------------------
# reading the benchmarks' output


def _number(cell: str) -> float:
    """A table cell as a float: '1,234' -> 1234.0, '12.5%' -> 0.125, '2.10x' -> 2.1, '+1.2%' -> 0.012."""
    text = cell.strip().replace(",", "")
    if text.endswith("%"):
        return float(text[:-1]) / 100
    if text.endswith("x"):
        return float(text[:-1])
    return float(text)


def _table(stdout: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, row cells) of the '|'-separated table whose header line starts with ``header_start``."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(header_start) and "|" in line:
            header = [c.strip() for c in line.split("|")]
            rows = []
            for row in lines[i + 2 :]:  # skip the '-----' rule
                cells = [c.strip() for c in row.split("|")]
                if "|" not in row or (rows and len(cells) != len(rows[0])):  # a note after the table
                    break
                rows.append(cells)
            return header, rows
    raise ValueError(f"no table with a header starting {header_start!r} in the output")


def _check(name: str, value: float, op: str, target: float, show: str) -> dict:
    """One target check: ``value op target`` ('>=' or '<='), ``show`` the target as printed."""
    ok = value >= target if op == ">=" else value <= target
    return {"name": name, "value": value, "target": f"{op} {show}", "ok": bool(ok)}


def parse_crosscoder(stdout: str) -> tuple[dict, dict, list]:
    """Figures of crosscoder_throughput.py: ours' tokens/s, fraction of peak and peak GiB per activation."""
    header, rows = _table(stdout, "activation")
    col = {name: i for i, name in enumerate(header)}
    figures, details, checks = {}, {}, []
    for cells in rows:
        mismatch = "MISMATCH" in cells[-1]
        cells[-1] = cells[-1].split("  (")[0]  # "... (loss check MISMATCH: ...)" appended to the last cell
        act = cells[0]
        figures[f"{act}_tokens_per_s"] = _number(cells[col["ours tok/s"]])
        figures[f"{act}_speedup_vs_per_model"] = _number(cells[col["ours/ref"]])
        details[f"{act}_reference_tokens_per_s"] = _number(cells[col["ref tok/s"]])
        if "ours %pk" in col:
            figures[f"{act}_fraction_of_peak"] = _number(cells[col["ours %pk"]])
            checks.append(
                _check(
                    f"{act} % of bf16 peak", figures[f"{act}_fraction_of_peak"], ">=", 0.40, f"40% of {PEAK_TFLOPS:g}"
                )
            )
        if "ours GiB" in col:
            figures[f"{act}_peak_gib"] = float(cells[col["ours GiB"]].split()[0])
            details[f"{act}_reference_peak_gib"] = float(cells[col["ref GiB"]].split()[0])
        details[f"{act}_same_loss_as_reference"] = not mismatch
    for line in stdout.splitlines():
        if line.startswith("check "):
            ok = line.rstrip().endswith("ok")
            checks.append({"name": line.split(":")[0], "value": line.split(": ")[-1], "target": "ok", "ok": ok})
        if line.startswith("host syncs in "):  # cuda only: "host syncs in 10 steps of ours (last N): relu 0, ..."
            for act, count in re.findall(r"(\w+) (\d+)(?=,| \(target)", line.split(": ", 1)[1]):
                details[f"{act}_host_syncs"] = int(count)
                checks.append(_check(f"{act} host syncs in the timed step", int(count), "<=", 0, "0"))
    return figures, details, checks


def parse_feed(stdout: str) -> tuple[dict, dict, list]:
    """Figures of crosscoder_feed.py: steady-state tokens/s fed from the stores and from resident batches."""
    _, rows = _table(stdout, "fed from")
    rates = {cells[0]: _number(cells[1]) for cells in rows}
    figures = {"store_tokens_per_s": rates["store"], "resident_tokens_per_s": rates["resident"]}
    figures["store_over_resident"] = rates["store"] / rates["resident"]
    checks = [_check("training fed from stores vs resident batches", figures["store_over_resident"], ">=", 0.9, "0.9x")]
    return figures, {}, checks


def parse_capture(stdout: str) -> tuple[dict, dict, list]:
    """Figures of capture_throughput.py: truncated/full tokens/s and the speed-up at each site."""
    _, rows = _table(stdout, "layer")
    figures, details, checks = {}, {}, []
    for cells in rows:
        layer = int(cells[0])
        figures[f"layer{layer}_truncated_tokens_per_s"] = _number(cells[1])
        figures[f"layer{layer}_full_tokens_per_s"] = _number(cells[2])
        figures[f"layer{layer}_speedup"] = _number(cells[3])
        details[f"layer{layer}_ideal_speedup_n_over_L"] = _number(cells[4])
        checks.append(
            {
                "name": f"speed-up at layer {layer}",
                "value": figures[f"layer{layer}_speedup"],
                "target": f">= 0.9 * n/L = {0.9 * _number(cells[4]):.2f}x",
                "ok": cells[5] == "yes",
            }
        )
    return figures, details, checks


def parse_blocking(stdout: str) -> tuple[dict, dict, list]:
    """Figures of blocking_overhead.py: baseline step ms and, per configuration, op/step and step ms."""
    # columns: mode, |S|/F, |S|, rank, step ms, overhead, op ms, op/step, met (the header's '|S|' splits)
    _, rows = _table(stdout, "mode")
    figures, details, checks = {}, {}, []
    for cells in rows:
        if cells[0] == "baseline":
            figures["baseline_step_ms"] = float(cells[4])
            continue
        key = f"{cells[0]}_{cells[1].rstrip('%')}pct"
        figures[f"{key}_op_per_step"] = _number(cells[7])
        figures[f"{key}_step_ms"] = float(cells[4])
        details[f"{key}_measured_overhead"] = _number(cells[5])  # signed: noise can make it < 0
        checks.append(_check(f"blocking {cells[0]} at {cells[1]} of F (op/step)", _number(cells[7]), "<=", 0.03, "3%"))
    match = re.search(r"\|loss\(blocked\) - loss\(baseline\)\|.*?: ([0-9.e+-]+)", stdout)
    if match:
        details["forward_unchanged_max_abs_loss_diff"] = float(match.group(1))
    return figures, details, checks


def parse_store(stdout: str) -> tuple[dict, dict, list]:
    """Figures of store_throughput.py: ours GB/s and ours/baseline per operation."""
    _, rows = _table(stdout, "operation")
    figures, details, checks = {}, {}, []
    for cells in rows:
        # the first column holds a '|' of its own ("write (save_file | Writer.write+close)"): count from the end
        op = cells[0].split()[0] + ("_noverify" if "verify=False" in " ".join(cells) else "")
        figures[f"{op}_gb_per_s"] = _number(cells[-3])
        figures[f"{op}_ratio_vs_safetensors"] = _number(cells[-2])
        details[f"{op}_baseline_gb_per_s"] = _number(cells[-4])
        checks.append(_check(f"store {op} vs safetensors", figures[f"{op}_ratio_vs_safetensors"], ">=", 0.8, "0.8x"))
    return figures, details, checks


def parse_callback(stdout: str) -> tuple[dict, dict, list]:
    """Figures of callback_overhead.py: wall times and the activation/snapshot shares of the probed run."""
    figures, details = {}, {}
    for kind in ("without", "with"):
        match = re.search(rf"training {kind} callbacks:\s+([0-9.]+) s", stdout)
        if not match:
            raise ValueError(f"no 'training {kind} callbacks' line in the output")
        figures[f"train_seconds_{kind}_callbacks"] = float(match.group(1))
    shares = {}
    for name in ("activations", "snapshots"):
        match = re.search(rf"{name}\s+([0-9.]+) s =\s+([0-9.]+)% of that run", stdout)
        if not match:
            raise ValueError(f"no '{name}' line in the output")
        details[f"{name}_seconds"] = float(match.group(1))
        shares[name] = float(match.group(2)) / 100
    # shares are printed to 0.01%: they can read 0, so they are details, and the check uses them.
    details["activation_share"] = shares["activations"]
    details["snapshot_share"] = shares["snapshots"]
    if shares["activations"] > 0:
        figures["activation_share"] = shares["activations"]
    checks = [_check("activation streaming share of training", shares["activations"], "<=", 0.02, "2%")]
    match = re.search(r"monitor\s+([0-9.]+) s =\s+([0-9.]+)% of that run", stdout)
    if match:  # run with --monitor
        details["monitor_seconds"], details["monitor_share"] = float(match.group(1)), float(match.group(2)) / 100
        if details["monitor_share"] > 0:
            figures["monitor_share"] = details["monitor_share"]
        checks.append(_check("feature monitor share of training", details["monitor_share"], "<=", 0.02, "2%"))
    return figures, details, checks


def parse_lm_eval(stdout: str) -> tuple[dict, dict, list]:
    """Figures of lm_eval_throughput.py: requests/s without and with the intervention, and their ratio."""
    figures, details = {}, {}
    for kind in ("without", "with"):
        match = re.search(rf"^{kind} intervention:\s+([0-9.]+) s wall \(\s*([0-9.]+) requests/s\)", stdout, re.M)
        if not match:
            raise ValueError(f"no '{kind} intervention' line in the output")
        figures[f"requests_per_s_{kind}"] = float(match.group(2))
        details[f"wall_seconds_{kind}"] = float(match.group(1))
    match = re.search(r"throughput ratio \(with / without\), wall: ([0-9.]+)x", stdout)
    if not match:
        raise ValueError("no 'throughput ratio' line in the output")
    figures["throughput_ratio_with_over_without"] = float(match.group(1))
    checks = [_check("lm-eval throughput with / without intervention", float(match.group(1)), ">=", 0.9, "0.9x")]
    bare = re.search(
        r"^bare forward \((.*)\): ([0-9.]+) ms without, ([0-9.]+) ms with the intervention, "
        r"speed ratio \(with / without\) ([0-9.]+)x",
        stdout,
        re.M,
    )
    if bare:  # the intervention's own cost on the model's forward, apart from lm-eval's request handling
        details["bare_forward"] = bare.group(1)
        details["bare_forward_ms_without"] = float(bare.group(2))
        details["bare_forward_ms_with"] = float(bare.group(3))
        figures["bare_forward_ratio_with_over_without"] = float(bare.group(4))
    syncs = re.search(
        r"^host syncs in one forward: (\d+) without, (\d+) with the intervention; the intervention's: (-?\d+)",
        stdout,
        re.M,
    )
    if syncs:  # cuda only
        details["model_host_syncs"] = int(syncs.group(1))
        details["intervention_host_syncs"] = int(syncs.group(3))
        checks.append(_check("intervention host syncs in one forward", int(syncs.group(3)), "<=", 0, "0"))
    return figures, details, checks


# --------------------------------------------------------------------------------------------------
# the benchmarks


def benchmarks(peak_tflops: float = PEAK_TFLOPS) -> list[Benchmark]:
    """The suite's benchmarks in the order they run (the ones that need no extra packages first)."""
    # fmt: off
    return [
        Benchmark(
            name="crosscoder",
            script="crosscoder_throughput.py",
            what="crosscoder training step, N=3 d=2560 F=32768 B=4096, bf16 autocast (ReLU, BatchTopK)",
            args=(
                "--device", "{device}", "--models", "3", "--d-model", "2560", "--features", "32768",
                "--batch", "4096", "--activation", "relu,batchtopk", "--steps", "10", "--repeats", "5",
                "--peak-tflops", f"{peak_tflops:g}", "--profile-rows", "15",
            ),
            tiny_args=(
                "--device", "{device}", "--models", "3", "--d-model", "64", "--features", "512", "--batch", "256",
                "--activation", "relu,batchtopk", "--k", "8", "--aux-k", "64", "--steps", "1", "--repeats", "1",
                "--threads", "1", "--peak-tflops", f"{TINY_PEAK_TFLOPS:g}", "--profile-rows", "5",
            ),
            parse=parse_crosscoder,
            limit_s=120,
        ),
        Benchmark(
            name="capture",
            script="capture_throughput.py",
            what="truncated vs full forward at the middle layer (18/36), Qwen3-4B shape, bf16, 8x1024 tokens",
            args=(
                "--device", "{device}", "--arch", "qwen3", "--hidden-size", "2560", "--layers", "36",
                "--sites", "18", "--seq-len", "1024", "--batch-size", "8", "--dtype", "bfloat16", "--repeats", "5",
            ),
            tiny_args=(
                "--device", "{device}", "--arch", "qwen3", "--hidden-size", "64", "--layers", "4", "--sites", "2",
                "--seq-len", "32", "--batch-size", "2", "--repeats", "1", "--threads", "1",
            ),
            parse=parse_capture,
            shim=QWEN3_4B,
            tiny_shim=TINY_QWEN3,
            limit_s=100,
        ),
        Benchmark(
            name="blocking",
            script="blocking_overhead.py",
            what="gradient blocking (sae, subspace; 5%/95% of F=32768) on a training step, Qwen2.5-0.5B shape, 8x1024",
            args=(
                "--device", "{device}", "--model", "qwen2.5-0.5b", "--dtype", "bfloat16", "--batch", "8",
                "--seq-len", "1024", "--features", "32768", "--modes", "sae,subspace", "--fractions", "0.05,0.95",
                "--repeats", "7",
            ),
            tiny_args=(
                "--device", "{device}", "--model", "tiny", "--hidden-size", "64", "--layers", "2",
                "--features", "256", "--batch", "2", "--seq-len", "32", "--modes", "sae,subspace",
                "--fractions", "0.05,0.95", "--repeats", "1", "--threads", "1",
            ),
            parse=parse_blocking,
            limit_s=100,
        ),
        Benchmark(
            name="store",
            script="store_throughput.py",
            what="activation store write/read/epoch vs safetensors, 131072 x 1024 bf16 (CPU and disk)",
            args=("--tokens", "131072", "--d-model", "1024", "--repeats", "3", "--dir", "{tmp}"),
            tiny_args=(
                "--tokens", "4096", "--d-model", "64", "--shard-tokens", "2048", "--chunk-tokens", "512",
                "--batch", "512", "--repeats", "1", "--threads", "1", "--dir", "{tmp}",
            ),
            parse=parse_store,
            limit_s=60,
            gpu=False,
        ),
        Benchmark(
            name="callback",
            script="callback_overhead.py",
            what="probe callbacks + feature monitor on SFTTrainer, Qwen2.5-0.5B shape, 200 steps of 8 (max 1024 tokens)",
            args=(
                "--device", "{device}", "--model", "tiny:qwen2", "--hidden-size", "896", "--layers", "24",
                "--steps", "200", "--batch-size", "8", "--seq-len", "1024", "--monitor", "--monitor-features", "16384",
            ),
            tiny_args=(
                "--device", "{device}", "--model", "tiny:qwen2", "--hidden-size", "32", "--layers", "2",
                "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--probe-docs", "4", "--probe-seq-len", "32",
                "--monitor", "--monitor-features", "64",
            ),
            parse=parse_callback,
            needs=("trl", "datasets", "posttrain_probe.callbacks"),
            shim=QWEN25_05B,
            tiny_shim=TINY_QWEN2,
            limit_s=210,  # two 200-step runs took 128 s on the H200 before the monitor was added
        ),
        Benchmark(
            name="lm_eval",
            script="lm_eval_throughput.py",
            what="lm-eval probe_mcq log-likelihood (all 200 docs) with / without a feature intervention, Qwen3-4B shape",
            args=(
                "--device", "{device}", "--model", "shape:qwen3-4b", "--limit", "200", "--gen-limit", "0",
                "--batch-size", "32", "--repeats", "5",
            ),
            tiny_args=(
                "--device", "{device}", "--model", "tiny:qwen3", "--hidden-size", "32", "--layers", "2",
                "--limit", "4", "--gen-limit", "0", "--n-features", "128", "--batch-size", "4", "--repeats", "1",
                "--forward-tokens", "16", "--forward-repeats", "2",
            ),
            parse=parse_lm_eval,
            needs=("lm_eval", "datasets"),
            limit_s=180,
        ),
        Benchmark(
            name="feed",
            script="crosscoder_feed.py",
            what="train_crosscoder fed from bf16 stores vs resident batches, N=3 d=2560 F=32768 B=4096 BatchTopK",
            args=(
                "--device", "{device}", "--models", "3", "--d-model", "2560", "--features", "32768", "--batch", "4096",
                "--activation", "batchtopk", "--k", "32", "--tokens", "65536", "--buffer-tokens", "32768",
                "--steps", "48", "--log-every", "12", "--repeats", "1", "--dir", "{tmp}",
            ),
            tiny_args=(
                "--device", "{device}", "--models", "2", "--d-model", "32", "--features", "256", "--batch", "128",
                "--tokens", "2048", "--buffer-tokens", "512", "--steps", "8", "--log-every", "2", "--repeats", "1",
                "--threads", "1",
                "--dir", "{tmp}",
            ),
            parse=parse_feed,
            limit_s=150,  # last: a slow run cannot crowd out the figures above
        ),
    ]
    # fmt: on


# --------------------------------------------------------------------------------------------------
# running


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported (found) in this Python."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def command_of(
    bench: Benchmark, device: str, tiny: bool, tmp: str, python: str, dry_run: bool = False
) -> tuple[list[str], dict | None]:
    """(argv, shim settings or None) that run ``bench`` (``dry_run``: through the shim, parsing its arguments only)."""
    args = [a.format(device=device, tmp=tmp) for a in (bench.tiny_args if tiny else bench.args)]
    overrides = bench.tiny_shim if tiny else bench.shim
    script = str(HERE / bench.script)
    if overrides is None and not dry_run:
        return [python, script, *args], None
    shim: dict = {"config_overrides": overrides or {}, "init_device": device if overrides else None}
    if dry_run:
        shim["parse_only"] = True
    return [python, str(Path(__file__).resolve()), "shim", script, *args], shim


def run_one(bench: Benchmark, argv: list[str], shim: dict | None, timeout: float, echo: bool) -> dict:
    """Runs one benchmark process (in its own process group, killed whole at the timeout) and reads its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if shim is not None:
        env[SHIM_ENV] = json.dumps(shim)
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if echo and stdout:
        print(stdout.rstrip(), flush=True)
    result = {
        "command": argv,
        "shim": shim,
        "seconds": round(seconds, 2),
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr_tail": stderr[-STDERR_TAIL:],
        "figures": {},
        "details": {},
        "checks": [],
    }
    if timed_out:
        result.update(status="timeout", reason=f"stopped at its time limit of {timeout:.0f} s")
        return result
    if proc.returncode != 0:
        missing = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", stderr)
        if missing:
            result.update(status="skipped", reason=f"package missing: No module named {missing[-1]!r}")
        else:
            last = [line for line in stderr.strip().splitlines() if line.strip()]
            result.update(status="error", reason=f"exit {proc.returncode}: {last[-1] if last else 'no stderr'}"[:300])
        return result
    if shim and shim.get("parse_only"):
        result.update(status="parsed", reason="--dry-run: the arguments parsed, nothing was run")
        return result
    try:
        figures, details, checks = bench.parse(stdout)
    except (ValueError, KeyError, IndexError) as exc:
        result.update(status="error", reason=f"could not read the output: {exc}")
        return result
    failed = [c["name"] for c in checks if not c["ok"]]
    result.update(
        figures=figures,
        details=details,
        checks=checks,
        status="fail" if failed else "pass",
        reason=("missed: " + "; ".join(failed)) if failed else "",
    )
    return result


def environment(device: str) -> dict:
    """Python, platform, package versions and (cuda) the GPU, as seen by this process."""
    env: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": {}}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            env["torch_cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        env["cuda_available"] = False
    try:
        import posttrain_probe

        env["posttrain_probe_path"] = str(Path(posttrain_probe.__file__).parent)
    except ImportError:
        env["posttrain_probe_path"] = None
    try:
        git = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True)
        env["git_commit"] = git.stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    if device.startswith("cuda"):
        try:
            query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
            out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
            env["nvidia_smi"] = out.stdout.strip()
        except OSError:
            env["nvidia_smi"] = None
    return env


def key_figure(name: str, result: dict) -> str:
    """The one figure the summary table shows for a benchmark's result."""
    f = result.get("figures", {})
    d = result.get("details", {})
    if not f:
        return "-"
    if name == "crosscoder":
        parts = []
        for act in ("relu", "batchtopk"):
            if f"{act}_tokens_per_s" in f:
                text = f"{act}: {f[f'{act}_tokens_per_s']:,.0f} tok/s"
                if f"{act}_fraction_of_peak" in f:
                    text += f", {f[f'{act}_fraction_of_peak']:.1%} of peak"
                if f"{act}_peak_gib" in f:
                    text += f", {f[f'{act}_peak_gib']:.2f} GiB"
                parts.append(text)
        return "; ".join(parts)
    if name == "feed":
        return (
            f"{f['store_over_resident']:.3f}x ({f['store_tokens_per_s']:,.0f} vs "
            f"{f['resident_tokens_per_s']:,.0f} tok/s)"
        )
    if name == "capture":
        layers = sorted(int(k[5:].split("_")[0]) for k in f if k.endswith("_speedup"))
        return "; ".join(
            f"layer {n}: {f[f'layer{n}_speedup']:.2f}x ({f[f'layer{n}_truncated_tokens_per_s']:,.0f} vs "
            f"{f[f'layer{n}_full_tokens_per_s']:,.0f} tok/s; n/L {d[f'layer{n}_ideal_speedup_n_over_L']:.2f})"
            for n in layers
        )
    if name == "blocking":
        ops = {k[: -len("_op_per_step")]: v for k, v in f.items() if k.endswith("_op_per_step")}
        worst = max(ops, key=ops.get)
        return (
            f"worst op/step {ops[worst]:.2%} ({worst}); step {f['baseline_step_ms']:.1f} ms; measured overhead "
            + ", ".join(f"{k} {d[f'{k}_measured_overhead']:+.1%}" for k in ops)
        )
    if name == "store":
        return ", ".join(
            f"{k[: -len('_ratio_vs_safetensors')]} {v:.2f}x"
            for k, v in f.items()
            if k.endswith("_ratio_vs_safetensors")
        )
    if name == "callback":
        return (
            f"activations {d['activation_share']:.2%}, snapshots {d['snapshot_share']:.2%} of the run "
            f"({f['train_seconds_with_callbacks']:.1f} s with, {f['train_seconds_without_callbacks']:.1f} s without)"
        )
    if name == "lm_eval":
        bare = f.get("bare_forward_ratio_with_over_without")
        syncs = d.get("intervention_host_syncs")
        return (
            f"{f['throughput_ratio_with_over_without']:.3f}x ({f['requests_per_s_with']:.1f} vs "
            f"{f['requests_per_s_without']:.1f} requests/s)"
            + (f"; bare forward {bare:.3f}x" if bare is not None else "")
            + (f", {syncs} host syncs" if syncs is not None else "")
        )
    return ", ".join(f"{k} {v:.4g}" for k, v in f.items())


TARGETS = {
    "crosscoder": ">= 40% of bf16 peak (989 TFLOP/s)",
    "feed": "store >= 0.9x resident",
    "capture": ">= 0.9 * n/L",
    "blocking": "op/step <= 3%",
    "store": ">= 0.8x safetensors",
    "callback": "activations <= 2%",
    "lm_eval": ">= 0.9x",
}


def summary_table(results: dict) -> str:
    """The summary as a Markdown table: benchmark, key figure, target, status (and reason)."""
    lines = ["| benchmark | key figure | target | status |", "| --- | --- | --- | --- |"]
    for name, result in results.items():
        status = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
        lines.append(f"| {name} | {key_figure(name, result)} | {TARGETS.get(name, '-')} | {status} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (real shapes) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the same code in seconds (tests, CPU)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole suite (default: 460 on cuda, 900 tiny)"
    )
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak for the crosscoder %%")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the benchmarks")
    p.add_argument("--tmp", default="/tmp", help="directory for the store benchmark's files")
    p.add_argument("--quiet", action="store_true", help="do not echo each benchmark's output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only parse each benchmark's command line with its own argument parser (checks the commands; status 'parsed')",
    )
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 900.0 if args.tiny else 460.0
    return args


def run_suite(args: argparse.Namespace) -> dict:
    """Runs the selected benchmarks within the budget; returns the JSON-able report."""
    started = time.perf_counter()
    selected = benchmarks(args.peak_tflops)
    names = [b.name for b in selected]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {names}")
        selected = [b for b in selected if b.name in wanted]
    env = environment(args.device)
    print(f"gpu_suite: device={args.device} tiny={args.tiny} budget={args.budget:.0f}s", flush=True)
    print(f"environment: {json.dumps(env)}", flush=True)
    cuda_missing = args.device.startswith("cuda") and not env.get("cuda_available")
    results: dict = {}
    for bench in selected:
        argv, shim = command_of(bench, args.device, args.tiny, args.tmp, args.python, args.dry_run)
        left = args.budget - (time.perf_counter() - started)
        base = {"command": argv, "shim": shim, "what": bench.what, "figures": {}, "details": {}, "checks": []}
        missing = missing_modules(bench.needs)
        if cuda_missing and bench.gpu and not args.dry_run:
            results[bench.name] = {**base, "status": "skipped", "reason": "CUDA is not available"}
        elif missing:
            results[bench.name] = {**base, "status": "skipped", "reason": f"package missing: {', '.join(missing)}"}
        elif left < 20:
            results[bench.name] = {**base, "status": "skipped", "reason": f"suite budget used up ({left:.0f} s left)"}
        else:
            timeout = min(bench.tiny_limit_s if args.tiny else bench.limit_s, left)
            print(f"\n=== {bench.name}: {' '.join(argv)} (limit {timeout:.0f} s)", flush=True)
            results[bench.name] = {"what": bench.what, **run_one(bench, argv, shim, timeout, not args.quiet)}
        r = results[bench.name]
        print(f"=== {bench.name}: {r['status']} {r.get('reason', '')} ({r.get('seconds', 0)} s)", flush=True)
    total = time.perf_counter() - started
    table = summary_table(results)
    note = ", tiny shapes: the targets are for the GPU shapes" if args.tiny else ""
    print(f"\nsummary (device={args.device}{note}, {total:.0f} s):")
    print(table, flush=True)
    return {
        "suite": {
            "device": args.device,
            "tiny": args.tiny,
            "budget_s": args.budget,
            "total_seconds": round(total, 2),
            "peak_tflops": args.peak_tflops,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total)),
            "argv": sys.argv,
        },
        "environment": env,
        "summary_markdown": table,
        "benchmarks": results,
    }


def shim_main(argv: list[str]) -> None:
    """``gpu_suite.py shim SCRIPT ARGS``: run SCRIPT as __main__ with tiny_config overrides from $GPU_SUITE_SHIM.

    The overrides fill in the ``tiny_config`` keywords the caller does not pass (so the benchmark's
    own --hidden-size / --layers still apply); ``init_device`` creates models from a config on that
    device (no slow CPU initialisation of billions of weights).
    """
    settings = json.loads(os.environ.get(SHIM_ENV, "{}"))
    import torch
    import transformers

    import posttrain_probe.testing as testing

    overrides = settings.get("config_overrides") or {}
    original_config = testing.tiny_config

    def tiny_config(arch: str = "qwen3", **kwargs):
        """posttrain_probe.testing.tiny_config with the shim's overrides as defaults."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        return original_config(arch, **{**overrides, **given})

    testing.tiny_config = tiny_config
    device = settings.get("init_device")
    if device:
        original_from_config = transformers.AutoModelForCausalLM.from_config

        def from_config(config, **kwargs):
            """AutoModelForCausalLM.from_config, creating the weights on the shim's device."""
            with torch.device(device):
                return original_from_config(config, **kwargs)

        transformers.AutoModelForCausalLM.from_config = from_config
    if settings.get("parse_only"):
        original_parse_args = argparse.ArgumentParser.parse_args

        def parse_args(self, *args, **kwargs):
            """ArgumentParser.parse_args that prints the parsed namespace and stops the script."""
            namespace = original_parse_args(self, *args, **kwargs)
            print(f"shim: parsed {vars(namespace)}", flush=True)
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = parse_args
    script, *rest = argv
    print(f"shim: tiny_config overrides {overrides}, models created on {device}", flush=True)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    """Entry point: the suite, or the shim when the first argument is ``shim``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "shim":
        shim_main(argv[1:])
        return 0
    args = parse_args(argv)
    report = run_suite(args)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        print(f"wrote {path}")
    return 0


def _jsonable(value):
    """json.dumps fallback: non-finite floats and other objects as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
