"""Planted activations on disk: one activation store per model over the same synthetic tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain_probe.activations import ActivationStoreWriter


def write_planted_stores(root: Path, x: torch.Tensor, names: list[str], layer: int) -> dict[str, Path]:
    """Write x [n, N, d] (raw units) as N float32 stores ``root/<name>`` over the same n tokens; returns {name: path}."""
    paths = {}
    for m, name in enumerate(names):
        paths[name] = root / name
        writer = ActivationStoreWriter(
            paths[name], layer=layer, d_model=x.shape[-1], model=name, dtype="float32", shard_tokens=8192
        )
        for start in range(0, x.shape[0], 4096):
            ids = torch.arange(start, min(start + 4096, x.shape[0]))
            writer.write(x[ids, m], ids % 1000, ids // 128, ids % 128 + 1, cursor=start // 4096 + 1)
        writer.close()
    return paths
