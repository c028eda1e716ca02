"""Throughput of ``truncated_forward`` against a full forward with ``output_hidden_states``.

Builds a randomly initialised model from ``posttrain_probe.testing.tiny_config`` (tiny-tokenizer
vocabulary), sized so that the decoder blocks dominate the compute, and times, under no_grad:

* baseline: ``model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)``
* ours:     ``truncated_forward(model, ids, mask, [L])`` for each site L

Capturing the residual stream entering block L runs only blocks 0..L-1 (and skips the final norm
and lm_head), so the ideal speed-up is about n_layers / L, a little more thanks to the lm_head.

Usage::

    python benchmarks/capture_throughput.py [--arch qwen3] [--hidden-size 512] [--layers 8]
        [--seq-len 256] [--batch-size 8] [--dtype float32] [--device cpu|cuda]
        [--sites 1,2,4,6] [--repeats 3] [--threads N]

This is a benchmark, not a test: it reports numbers and never fails on timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers

from posttrain_probe.layers import truncated_forward
from posttrain_probe.testing import SPECIAL_TOKEN_IDS, tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen3")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--sites", default=None, help="comma-separated layers (default: 1, n/4, n/2, 3n/4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument(
        "--tolerance", type=float, default=0.9, help="a site meets the target if speed-up >= tolerance * n/L"
    )
    return p.parse_args()


def median_seconds(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median wall time of each ``fns[key]()`` after one warm-up run of each.

    The functions are timed round-robin (one run of each per repeat) so that baseline and ours
    see the same machine load when other processes compete for the cores.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():  # warm-up (allocator, kernels, sdpa dispatch)
        fn()
    times: dict = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    n = args.layers

    # tiny_config accepts any hidden size divisible by its 4 heads and any layer count; the vocab
    # is the tiny tokenizer's (512), so the lm_head is small next to the blocks.
    config = tiny_config(args.arch, hidden_size=args.hidden_size, num_layers=n)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()

    if args.sites:
        sites = sorted({int(s) for s in args.sites.split(",")})
    else:
        sites = sorted({1, n // 4, n // 2, 3 * n // 4})
    sites = [s for s in sites if 1 <= s < n]

    generator = torch.Generator().manual_seed(0)
    low = max(SPECIAL_TOKEN_IDS.values()) + 1
    ids = torch.randint(low, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    tokens = ids.numel()

    def full() -> None:
        with torch.no_grad():
            model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)

    fns = {"full": full}
    for layer in sites:
        fns[layer] = lambda layer=layer: truncated_forward(model, ids, mask, [layer])
    seconds = median_seconds(fns, device, args.repeats)
    full_tps = tokens / seconds["full"]
    rows = []
    for layer in sites:
        trunc_tps = tokens / seconds[layer]
        speedup, target = trunc_tps / full_tps, n / layer
        rows.append((layer, trunc_tps, full_tps, speedup, target, speedup >= args.tolerance * target))

    print(
        f"capture throughput: {args.arch} hidden={args.hidden_size} layers={n} vocab={config.vocab_size} "
        f"batch={args.batch_size}x{args.seq_len} ({tokens} tokens) dtype={args.dtype} device={device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} (median after 1 warm-up)"
    )
    header = f"{'layer':>5} | {'truncated tok/s':>15} | {'full tok/s':>11} | {'speed-up':>8} | {'n/L':>5} | meets"
    print(header)
    print("-" * len(header))
    for layer, trunc_tps, full_tps_, speedup, target, ok in rows:
        print(
            f"{layer:>5} | {trunc_tps:>15,.0f} | {full_tps_:>11,.0f} | {speedup:>7.2f}x | {target:>4.2f}x | "
            f"{'yes' if ok else 'NO'}"
        )
    print(
        f"target: >= n/L (e.g. >= {args.tolerance * 2:.1f}x at the middle layer); "
        f"'meets' = speed-up >= {args.tolerance:g} * n/L. The full forward also runs the final norm and "
        "lm_head, so the speed-up can exceed n/L."
    )


if __name__ == "__main__":
    main()
