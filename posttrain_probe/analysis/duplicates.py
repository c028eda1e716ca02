"""Duplicate latents: features of one crosscoder whose whole decoders point the same way.

The decoder-norm-weighted L1 loss of the papers' recipe (docs/methods.md sec. 3) costs the same whether a
feature is written by one latent or split over several latents with the same decoder direction,
so ReLU+L1 crosscoders learn duplicates, and counts of model-specific latents grow with F and
fall with λ although the models did not change. Grouping latents whose concatenated decoders
(all model rows) have cosine >= ``min_cosine`` and counting each group once gives counts that
describe the models rather than the dictionary.

The pairwise cosines are computed in row blocks (one [block, F] matmul each, never an F x F
matrix), the groups are the connected components of the "near-identical" graph
(``scipy.sparse.csgraph``), so a chain a~b~c is one group.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from posttrain_probe.analysis.analyze_config import DEFAULT_DUPLICATE_COSINE
from posttrain_probe.errors import ProbeError


class DuplicateGroups(NamedTuple):
    """Duplicate groups of a crosscoder's latents."""

    group: torch.Tensor
    """[F] int64: the representative of each feature's group (the member with the largest summed
    decoder norm, lowest index on ties; a feature alone is its own representative); -1 for features
    left out (``include`` False)."""
    n_groups: int
    """Number of distinct groups among the included features (deduplicated count)."""
    n_duplicated: int
    """Included features that share their group with at least one other feature."""


def duplicate_groups(
    W_dec, min_cosine: float = DEFAULT_DUPLICATE_COSINE, include=None, block_size: int = 2048
) -> DuplicateGroups:
    """Group latents whose whole decoders are near-identical in direction (cosine >= ``min_cosine``).

    Args:
        W_dec: decoder ``[F, N, d]`` (any units; the cosine of the concatenated rows ``[F, N*d]`` is
            scale-free, and concatenation makes the per-model norm pattern part of the direction).
        min_cosine: cosine threshold in (0, 1].
        include: optional ``[F]`` bool, the features to group (e.g. live ones); others get -1.
        block_size: rows per cosine block (memory ``block_size * F`` floats).

    Returns:
        :class:`DuplicateGroups`.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    w = torch.as_tensor(W_dec).detach()
    if w.ndim != 3 or min(w.shape) == 0 or not w.is_floating_point():
        raise ProbeError(f"W_dec has shape {tuple(w.shape)} and dtype {w.dtype}; expected a floating [F, N, d] decoder")
    if (
        isinstance(min_cosine, bool)
        or not isinstance(min_cosine, (int, float))
        or math.isnan(min_cosine)
        or not 0 < min_cosine <= 1
    ):
        raise ProbeError(f"min_cosine={min_cosine!r} is invalid; expected a cosine in (0, 1]")
    n_features = w.shape[0]
    keep = torch.ones(n_features, dtype=torch.bool) if include is None else torch.as_tensor(include).detach().cpu()
    if keep.dtype != torch.bool or tuple(keep.shape) != (n_features,):
        raise ProbeError(
            f"include has dtype {keep.dtype} and shape {tuple(keep.shape)}; expected [F={n_features}] bool"
        )
    flat = w.reshape(n_features, -1).float()
    norms = flat.norm(dim=1)
    keep = keep.to(flat.device) & (norms > 0)
    rows = torch.nonzero(keep).flatten()
    unit = flat[rows] / norms[rows, None]
    sources, targets = [], []
    for start in range(0, rows.numel(), block_size):
        cos = unit[start : start + block_size] @ unit.T  # [b, n_kept]
        i, j = torch.nonzero(cos >= min_cosine, as_tuple=True)
        i = i + start
        upper = i < j
        sources.append(i[upper].cpu())
        targets.append(j[upper].cpu())
    n_kept = rows.numel()
    i = torch.cat(sources).numpy() if sources else np.empty(0, np.int64)
    j = torch.cat(targets).numpy() if targets else np.empty(0, np.int64)
    graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n_kept, n_kept))
    n_groups, labels = connected_components(graph, directed=False)
    # Representative: the largest summed per-model decoder norm in the group, lowest index on ties.
    strength = w.float().norm(dim=-1).sum(dim=1)[rows].cpu().numpy()
    order = np.lexsort((np.arange(n_kept), -strength, labels))  # by group, strongest first
    first = np.ones(n_kept, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    representative_of_label = np.empty(n_groups, dtype=np.int64)
    representative_of_label[labels[order][first]] = rows.cpu().numpy()[order][first]
    group = torch.full((n_features,), -1, dtype=torch.int64)
    group[rows.cpu()] = torch.from_numpy(representative_of_label[labels])
    sizes = np.bincount(labels, minlength=n_groups)
    return DuplicateGroups(group=group, n_groups=int(n_groups), n_duplicated=int((sizes[labels] > 1).sum()))
