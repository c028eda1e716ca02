"""Crosscoder training fed from activation stores against the same training fed batches already on the device.

Both runs go through ``train_crosscoder`` (the trainer users run: accelerate, mixed precision, AuxK, logs) with the
same crosscoder and training settings:

* store:    a ``PairedActivations`` over N random bf16 stores written here (``--tokens`` tokens each, the store
            format of ``collect``): reading, verification, the shuffle buffer (default size, refilled every
            ``buffer_tokens / batch`` steps), the transfer to the device and, on a GPU, the prefetching thread
* resident: distinct [batch, N, d] batches of the same random bf16 values made on the device and served in turn,
            as many as the stores hold (at most ``--steps``): no data work at all, and the features fire as they do
            on the stores (BatchTopK's AuxK works on the features that did not fire lately, so repeating one batch
            would change the work of a step)

The steady-state tokens/s of each (between the first and the last logged step of ``metrics.jsonl``, so set-up,
scale estimation, checkpoint and calibration are not counted) and their ratio, the data feed's cost: target
store >= 0.9x resident. Runs are interleaved ``--repeats`` times (median).

Usage::

    python benchmarks/crosscoder_feed.py [--device cuda] [--models 3] [--d-model 2560] [--features 32768]
        [--batch 4096] [--activation batchtopk] [--k 32] [--tokens 262144] [--buffer-tokens N] [--steps 80]
        [--log-every 10] [--repeats 2] [--threads N] [--dir PATH]

A benchmark, not a test: it reports numbers and never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

NAMES = ("base", "sft", "rl", "m3", "m4", "m5")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda: the device the trainer takes (a GPU when one is available; default: that one)",
    )
    p.add_argument("--models", type=int, default=2, help="N models (at most 6)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("--activation", choices=("relu", "batchtopk"), default="batchtopk")
    p.add_argument("--k", type=int, default=32, help="BatchTopK: mean active features per token")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per store (bf16)")
    p.add_argument(
        "--buffer-tokens",
        type=int,
        default=None,
        help="shuffle buffer of the store run (default: the trainer's; smaller refills it within the timed steps)",
    )
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--log-every", type=int, default=10, help="steps between logged (synchronised) steps")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--dir", default=None, help="parent of the temporary directory (default: the system's)")
    args = p.parse_args()
    if not 1 <= args.models <= len(NAMES):
        p.error(f"--models {args.models}: expected 1 to {len(NAMES)}")
    trainer_device = "cuda" if torch.cuda.is_available() else "cpu"  # as train_crosscoder's Accelerator picks
    if args.device is None:
        args.device = trainer_device
    elif args.device.split(":")[0] != trainer_device:
        p.error(f"--device {args.device}: train_crosscoder trains on {trainer_device} on this machine")
    if args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps}: expected at least two logged steps (2 x --log-every {args.log_every})")
    return args


def write_stores(root: Path, args) -> dict[str, Path]:
    """N bf16 stores of ``args.tokens`` random activations over the same tokens; {name: path}."""
    from posttrain_probe.activations import ActivationStoreWriter

    g = torch.Generator().manual_seed(0)
    paths = {}
    for name in NAMES[: args.models]:
        paths[name] = root / name
        writer = ActivationStoreWriter(paths[name], layer=1, d_model=args.d_model, model=name, dtype="bfloat16")
        chunk = 8192
        for start in range(0, args.tokens, chunk):
            ids = torch.arange(start, min(start + chunk, args.tokens))
            acts = torch.randn(len(ids), args.d_model, generator=g).bfloat16()
            writer.write(acts, ids % 1000, ids // 256, ids % 256 + 1, cursor=start // chunk + 1)
        writer.close()
    return paths


class ResidentBatches:
    """``count`` distinct [batch, N, d] batches (random values rounded to bf16, as stored) on the device, served
    in turn: training with no data work."""

    batches_on_host = False

    def __init__(self, names, d_model: int, batch: int, count: int, device: str):
        g = torch.Generator().manual_seed(1)
        self.model_names, self.d_model, self.layer = list(names), d_model, 1
        self.batches = [
            torch.randn(batch, len(names), d_model, generator=g).bfloat16().to(device).float() for _ in range(count)
        ]

    def iter_batches(self, batch_size: int, **_):
        if batch_size != self.batches[0].shape[0]:  # scale estimation and calibration ask for their own sizes
            g = torch.Generator().manual_seed(2)
            x = torch.randn(batch_size, *self.batches[0].shape[1:], generator=g).to(self.batches[0].device)
            while True:
                yield x
        while True:
            yield from self.batches


def resident_count(args) -> int:
    """Distinct resident batches: the batches the stores hold (at least 1, at most the steps)."""
    return max(1, min(args.steps, args.tokens // args.batch))


def steady_tokens_per_s(out_dir: Path, batch: int) -> float:
    """Tokens/s between the first and the last logged step (records hold the rate since the run's first step)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    elapsed = [r["step"] * batch / r["tokens_per_s"] for r in (first, last)]
    return (last["step"] - first["step"]) * batch / (elapsed[1] - elapsed[0])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from posttrain_probe.activations import PairedActivations
    from posttrain_probe.crosscoder.metrics import CrosscoderQualityWarning

    warnings.simplefilter("ignore", CrosscoderQualityWarning)  # random data: a poor fit is expected
    from posttrain_probe.crosscoder import CrosscoderConfig, CrosscoderTrainingConfig, train_crosscoder

    root = Path(tempfile.mkdtemp(prefix="crosscoder_feed_", dir=args.dir))
    try:
        paths = write_stores(root / "stores", args)
        sources = {
            "store": PairedActivations(paths),
            "resident": ResidentBatches(paths, args.d_model, args.batch, resident_count(args), args.device),
        }
        cc = CrosscoderConfig(
            model_names=list(paths), d_model=args.d_model, n_features=args.features, activation=args.activation,
            k=args.k,
        )  # fmt: skip
        training = CrosscoderTrainingConfig(
            n_tokens=args.steps * args.batch, batch_size=args.batch, log_every=args.log_every,
            checkpoint_every=args.steps, scale_tokens=min(8192, args.tokens), calibration_tokens=min(8192, args.tokens),
            buffer_tokens=args.buffer_tokens,
        )  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in sources}
        for repeat in range(args.repeats):
            for name, source in sources.items():
                out = root / f"{name}-{repeat}"
                train_crosscoder(source, cc, training, out, progress=False)
                rates[name].append(steady_tokens_per_s(out, args.batch))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    median = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"crosscoder feed: N={args.models} d={args.d_model} F={args.features} B={args.batch} {args.activation}"
        f"{f' k={args.k}' if args.activation == 'batchtopk' else ''}, {args.steps} steps (log every {args.log_every}), "
        f"stores of {args.tokens:,} bf16 tokens, buffer {args.buffer_tokens or 'default'}, device={args.device} "
        f"threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (median)"
    )
    header = f"{'fed from':<10} | {'tokens/s':>12} | runs"
    print(header)
    print("-" * len(header))
    for name, r in rates.items():
        print(f"{name:<10} | {median[name]:>12,.0f} | {', '.join(f'{v:,.0f}' for v in r)}")
    ratio = median["store"] / median["resident"]
    print(f"store / resident: {ratio:.3f}x (target >= 0.9x: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
