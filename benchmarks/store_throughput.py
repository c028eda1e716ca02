"""Write/read throughput of the activation store against plain safetensors, on the same data.

One random bf16 tensor ``acts [tokens, d_model]`` (with token_ids int32, doc_ids int64,
positions int32, as the store keeps) is written and read back in shards of ``--shard-tokens``:

* write:   ``safetensors.torch.save_file`` per shard-sized slice (same tensors and metadata; the store's
           shard files are a few hundred bytes larger: header space reserved while streaming) vs
           ``ActivationStoreWriter.write`` in chunks of ``--chunk-tokens`` then ``close()`` (includes
           the value check, checksums and manifest updates).
* read:    ``load_file`` of each shard + ``acts.clone()`` vs ``ActivationStore.load_shard`` (fresh
           store object, so verify=True really hashes) + the same ``clone()``; also verify=False.
* epoch:   ``iter_batches(--batch, shuffle=True)`` to float32 (fresh store, verify=True) vs
           load_file of all shards, one randperm over all tokens, ``acts[idx].float()`` per batch.

Usage::

    python benchmarks/store_throughput.py [--tokens 131072] [--d-model 1024] [--shard-tokens 65536]
        [--chunk-tokens 4096] [--batch 4096] [--repeats 3] [--threads N] [--dir PATH]

Reads come from the page cache warmed by the writes (dropping it needs root), equally for both
sides. Each round of timings starts one function further on, so that no side always runs right after
the other (its writes' dirty pages, its freed memory). A benchmark, not a test: it reports numbers
and never fails on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain_probe.activations.store import ActivationStore, ActivationStoreWriter, shard_metadata

METADATA = shard_metadata(0)  # what the writer puts in each shard header


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131072, help="131072 x 1024 bf16 = 256 MiB")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per ActivationStoreWriter.write call")
    p.add_argument("--batch", type=int, default=4096, help="batch size of the shuffled epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--dir", default=".", help="parent of the temporary directory (default: current directory)")
    return p.parse_args()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds of each ``fns[key](rep)`` after one warm-up (rep=-1); round-robin per repeat, starting each
    round one key further on (so that no side always runs right after the other)."""
    times: dict = {key: [] for key in fns}
    keys = list(fns)
    for rep in range(-1, repeats):
        for key in keys[(rep + 1) % len(keys) :] + keys[: (rep + 1) % len(keys)]:
            start = time.perf_counter()
            fns[key](rep)
            if rep >= 0:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    n, d, shard = args.tokens, args.d_model, args.shard_tokens
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    token_ids = torch.randint(0, 50_000, (n,), generator=gen, dtype=torch.int32)
    doc_ids = torch.arange(n, dtype=torch.int64) // 512
    positions = (torch.arange(n) % 512).to(torch.int32)
    root = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        # ---- write ---------------------------------------------------------------------------
        def write_base(rep: int) -> None:
            out = root / f"base{rep}"
            out.mkdir()
            for i, s in enumerate(range(0, n, shard)):
                part = {
                    "acts": acts[s : s + shard],
                    "token_ids": token_ids[s : s + shard],
                    "doc_ids": doc_ids[s : s + shard],
                    "positions": positions[s : s + shard],
                }
                save_file(part, out / f"shard-{i:05d}.safetensors", metadata=METADATA)

        def write_ours(rep: int) -> None:
            writer = ActivationStoreWriter(
                root / f"ours{rep}", layer=0, d_model=d, model="bench", dtype="bfloat16", shard_tokens=shard
            )
            for s in range(0, n, args.chunk_tokens):
                e = s + args.chunk_tokens
                writer.write(acts[s:e], token_ids[s:e], doc_ids[s:e], positions[s:e], cursor=e)
            writer.close()

        sec = timed({"write_base": write_base, "write_ours": write_ours}, args.repeats)
        last = args.repeats - 1
        for rep in range(-1, last):  # keep only the last write of each side, to read back
            shutil.rmtree(root / f"base{rep}", ignore_errors=True)
            shutil.rmtree(root / f"ours{rep}", ignore_errors=True)
        base_dir, ours_dir = root / f"base{last}", root / f"ours{last}"
        base_files = sorted(base_dir.glob("shard-*.safetensors"))
        base_bytes, ours_bytes = dir_bytes(base_dir), dir_bytes(ours_dir)
        ours_shard_bytes = sum(f.stat().st_size for f in ours_dir.glob("shard-*.safetensors"))

        # ---- read ----------------------------------------------------------------------------
        def read_base(rep: int) -> None:
            for f in base_files:
                load_file(f)["acts"].clone()

        def read_ours(verify: bool):
            def run(rep: int) -> None:
                store = ActivationStore(ours_dir, verify=verify)  # fresh: verify=True hashes every shard
                for i in range(store.n_shards):
                    store.load_shard(i)["acts"].clone()

            return run

        def epoch_base(rep: int) -> None:
            all_acts = torch.cat([load_file(f)["acts"] for f in base_files])
            perm = torch.randperm(all_acts.shape[0], generator=torch.Generator().manual_seed(rep))
            for s in range(0, all_acts.shape[0], args.batch):
                all_acts[perm[s : s + args.batch]].float()

        def epoch_ours(rep: int) -> None:
            for _ in ActivationStore(ours_dir).iter_batches(args.batch, shuffle=True, seed=rep, dtype=torch.float32):
                pass

        sec |= timed(
            {
                "read_base": read_base,
                "read_ours": read_ours(True),
                "read_ours_nv": read_ours(False),
                "epoch_base": epoch_base,
                "epoch_ours": epoch_ours,
            },
            args.repeats,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"store throughput: {n} tokens x d_model {d} bf16 ({acts.numel() * 2 / 2**20:.0f} MiB acts), "
        f"shards of {shard} tokens, threads={torch.get_num_threads()}, repeats={args.repeats} (median after 1 warm-up)"
    )
    print(
        f"bytes written: baseline {base_bytes:,} (shards) | ours {ours_bytes:,} = shards {ours_shard_bytes:,} "
        f"+ manifest {ours_bytes - ours_shard_bytes:,}"
    )
    rows = [  # (what, baseline key, ours key, bytes baseline, bytes ours)
        ("write (save_file | Writer.write+close)", "write_base", "write_ours", base_bytes, ours_bytes),
        ("read  (load_file | load_shard verify=True)", "read_base", "read_ours", base_bytes, ours_shard_bytes),
        ("read  (load_file | load_shard verify=False)", "read_base", "read_ours_nv", base_bytes, ours_shard_bytes),
        (
            f"epoch (randperm | iter_batches({args.batch}) fp32)",
            "epoch_base",
            "epoch_ours",
            base_bytes,
            ours_shard_bytes,
        ),
    ]
    header = f"{'operation (baseline | ours)':<48} | {'base GB/s':>9} | {'ours GB/s':>9} | {'ours/base':>9} | >= 0.8x"
    print(header)
    print("-" * len(header))
    for what, kb, ko, nb, no in rows:
        gb, go = nb / sec[kb] / 1e9, no / sec[ko] / 1e9
        print(f"{what:<48} | {gb:>9.2f} | {go:>9.2f} | {go / gb:>8.2f}x | {'yes' if go / gb >= 0.8 else 'NO'}")
    print("reads are served from the page cache warmed by the writes, for both sides equally (no root to drop it);")
    print("writes end in the page cache too (neither side fsyncs; the writer's fsync=True would, shard and manifest).")


if __name__ == "__main__":
    main()
