"""Generalization-controlling features (docs/methods.md sec. 6; paper R sec. 3.2 eq. 11, sec. 7, fig. 4).

For every task t with generalization-critical samples G_t (base model wrong, RL model right; from
``posttrain-probe critical``), at the **last prompt token** of each sample:

1. the residual stream a^m at the crosscoder's site of the base and of the RL model (truncated
   forwards, batched and padded; prompts tokenised as lm-eval's ``HFLM`` tokenises the context:
   :mod:`posttrain_probe.eval.prompts`);
2. the per-source codes f^m = act(W_enc^m s_m a^m + b_enc) of each model's own branch (docs/methods.md sec. 3);
3. :func:`generalization_scores`: Score_k^t = mean_{x in G_t} [f_k^RL(x) - f_k^base(x)] (code units);
4. :func:`select_features`: S_t = {k : Score_k^t >= fraction * max_j Score_j^t} (fraction 0.2);
   empty when max_j Score_j^t <= 0 (no feature is more active in the RL model), and reported so;
5. :func:`intersect_feature_sets`: S = intersection of S_t over the tasks that have critical samples;
   tasks without any are skipped and listed;
6. :func:`overlap_matrix` (and :func:`plot_feature_overlap`, paper R fig. 4): the pairwise overlap of
   the S_t. Paper R reports overlaps "even over 80%" without its formula; **choice**: by default the
   row-normalised overlap |S_a ∩ S_b| / |S_a| (the share of task a's features that task b selects
   too; it reduces to docs/methods.md sec. 5's |T_c ∩ T_c'| / k for sets of equal size). ``normalize="jaccard"``
   (|S_a ∩ S_b| / |S_a ∪ S_b|) and ``"min"`` (|S_a ∩ S_b| / min(|S_a|, |S_b|)) are offered.

With ``split_half=SEED`` (``--split-half SEED``) each task's G_t is first cut in two by
:func:`half_split`: S_t and S are selected on the selection half only, and the held-out half's doc
ids go into the feature set's provenance (``split_half``), so that ``posttrain-probe intervene``
measures the effect on documents the selection never saw.

This module holds the formulas, the split and the figure. The step that runs all of it (from a
crosscoder, two models and a critical-samples file) is
:func:`posttrain_probe.eval.generalization.features_generalization` (``posttrain-probe features generalization``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from posttrain_probe.analysis.critical_config import OVERLAP_NORMALIZATIONS, check_threshold
from posttrain_probe.errors import ProbeError

DEFAULT_THRESHOLD = 0.2
"""Paper R sec. 7: per task, features scoring at least 20% of the task's maximum score."""
# -- the formulas --------------------------------------------------------------------------------------


def generalization_scores(f_rl: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """Generalization score of every feature on one task, paper R eq. 11 (docs/methods.md sec. 6).

    Args:
        f_rl: ``[n, F]`` per-source codes f^RL of the RL model at the last prompt token of the n
            generalization-critical samples G_t (code units, >= 0).
        f_base: ``[n, F]`` per-source codes f^base of the base model on the same samples, same order.

    Returns:
        ``[F]`` float64: Score_k = mean over the n samples of (f_k^RL - f_k^base), in code units.
    """
    f_rl, f_base = torch.as_tensor(f_rl).detach(), torch.as_tensor(f_base).detach()
    if f_rl.ndim != 2 or f_rl.shape != f_base.shape:
        raise ProbeError(
            f"f_rl {tuple(f_rl.shape)} and f_base {tuple(f_base.shape)} must both be [n_samples, F], in the same sample order"
        )
    if f_rl.shape[0] == 0:
        raise ProbeError("no generalization-critical samples: the score is a mean over G_t and needs |G_t| >= 1")
    return (f_rl.double() - f_base.double()).mean(dim=0)


def select_features(scores: torch.Tensor, fraction: float = DEFAULT_THRESHOLD) -> list[int]:
    """S_t = {k : Score_k >= fraction * max_j Score_j} (docs/methods.md sec. 6; paper R: fraction 0.2).

    Args:
        scores: ``[F]`` generalization scores of one task (:func:`generalization_scores`, code units).
        fraction: threshold as a fraction of the task's maximum score, in (0, 1].

    Returns:
        Sorted feature indices. Empty when max_j Score_j <= 0 (no feature is more active in the RL
        model than in the base model on G_t: a positive threshold is then undefined). NaN scores
        never qualify.
    """
    fraction = check_threshold(fraction)
    scores = torch.as_tensor(scores).detach().double()
    if scores.ndim != 1 or scores.numel() == 0:
        raise ProbeError(f"scores has shape {tuple(scores.shape)}; expected a non-empty [F] vector")
    finite = torch.nan_to_num(scores, nan=-math.inf)
    top = float(finite.max())
    if not top > 0:
        return []
    return torch.nonzero(finite >= fraction * top).flatten().tolist()


def intersect_feature_sets(sets: Mapping[str, Sequence[int]]) -> list[int]:
    """S = intersection of the per-task sets S_t (docs/methods.md sec. 6); ``sets`` maps task -> feature indices.

    Returns the sorted indices in every set. Needs at least one task (an intersection over no task
    is undefined, not "all features").
    """
    if not sets:
        raise ProbeError("no task to intersect: expected at least one task with generalization-critical samples")
    common: set[int] | None = None
    for values in sets.values():
        common = {int(v) for v in values} if common is None else common & {int(v) for v in values}
    return sorted(common or ())


def overlap_matrix(sets: Sequence[Sequence[int]], normalize: str = "row") -> np.ndarray:
    """Pairwise overlap of feature sets (paper R fig. 4), ``[T, T]`` float64.

    ``normalize`` picks the denominator of |S_a ∩ S_b|:

    - ``row`` (default): |S_a| (row a, column b: the share of S_a that S_b contains too; not
      symmetric; reduces to docs/methods.md sec. 5's |T_c ∩ T_c'| / k when every set has k features);
    - ``jaccard``: |S_a ∪ S_b|;
    - ``min``: min(|S_a|, |S_b|) (the overlap coefficient).

    The diagonal is 1 for non-empty sets. Entries whose denominator is 0 (an empty set) are NaN.
    """
    if normalize not in OVERLAP_NORMALIZATIONS:
        raise ProbeError(f"overlap normalization {normalize!r} is not one of {OVERLAP_NORMALIZATIONS}")
    if len(sets) == 0:
        raise ProbeError("no feature sets: expected at least one")
    n_features = 1 + max((max(s) for s in sets if len(s)), default=-1)
    member = np.zeros((len(sets), max(n_features, 1)), dtype=np.float64)  # [T, F] indicator matrix
    for row, values in enumerate(sets):
        member[row, np.asarray(list(values), dtype=np.int64)] = 1.0
    inter = member @ member.T
    size = member.sum(axis=1)
    if normalize == "row":
        denom = np.repeat(size[:, None], len(sets), axis=1)
    elif normalize == "jaccard":
        denom = size[:, None] + size[None, :] - inter
    else:
        denom = np.minimum(size[:, None], size[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), np.nan)


def overlap_definition(normalize: str) -> str:
    """Human-readable formula of :func:`overlap_matrix` for ``normalize`` (written into the outputs)."""
    return {
        "row": "overlap[a][b] = |S_a ∩ S_b| / |S_a| (row task a, column task b)",
        "jaccard": "overlap[a][b] = |S_a ∩ S_b| / |S_a ∪ S_b|",
        "min": "overlap[a][b] = |S_a ∩ S_b| / min(|S_a|, |S_b|)",
    }[normalize]


# -- split-half selection -------------------------------------------------------------------------------


def half_split(doc_ids: Sequence[int], seed: int, task: str) -> tuple[list[int], list[int]]:
    """Split one task's G_t into a selection half and a held-out half, reproducibly.

    Args:
        doc_ids: the task's critical doc ids (>= 2, distinct).
        seed: split seed (int >= 0).
        task: the task name; mixed into the seed so that tasks are split independently.

    Returns:
        ``(selection, held_out)``, each sorted: a random permutation (``numpy`` generator seeded by
        ``seed`` and a sha256 of ``task``) of the sorted doc ids, its first ceil(n/2) ids selecting and
        the other floor(n/2) held out. The same (doc ids, seed, task) always give the same halves.
    """
    ids = sorted(int(d) for d in doc_ids)
    if len(set(ids)) != len(ids):
        raise ProbeError(f"task {task!r}: repeated critical doc ids; expected distinct ids")
    if len(ids) < 2:
        raise ProbeError(
            f"task {task!r} has |G_t| = {len(ids)}; a split into a selection and a held-out half needs at least 2 critical samples"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbeError(f"split seed {seed!r}: expected an int >= 0")
    salt = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    order = np.random.default_rng([int(seed), salt]).permutation(len(ids))
    n_select = (len(ids) + 1) // 2
    return sorted(ids[i] for i in order[:n_select]), sorted(ids[i] for i in order[n_select:])


# -- figure ----------------------------------------------------------------------------------------------


def plot_feature_overlap(
    matrix,
    labels: Sequence[str],
    path,
    *,
    normalize: str = "row",
    sizes: Sequence[int] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Heatmap of the pairwise overlap of the per-task feature sets S_t (paper R fig. 4).

    ``matrix`` [T, T] from :func:`overlap_matrix` (fractions in [0, 1]; NaN cells, from empty sets,
    are drawn blank and marked "n/a"), ``labels`` the T task names, ``sizes`` optional |S_t| shown
    in the tick labels; ``normalize`` names the formula in the colour-bar label. Writes
    ``<path>.png`` and ``<path>.svg``; returns both.
    """
    import matplotlib

    from posttrain_probe.analysis.plots import BLANK_COLOUR, as_labels, as_matrix, new_figure, plot_style, save_figure

    m = as_matrix(matrix, "matrix")
    if m.shape[0] != m.shape[1]:
        raise ProbeError(f"matrix has shape {m.shape}; expected a square [T, T] overlap matrix")
    names = as_labels(labels, m.shape[0], "labels", "task")
    finite = m[np.isfinite(m)]
    if finite.size and (finite.min() < 0 or finite.max() > 1 + 1e-12):
        raise ProbeError("matrix has values outside [0, 1]; expected overlap fractions")
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        names = [f"{n}\n|S_t|={s}" for n, s in zip(names, as_labels(sizes, len(names), "sizes", "task"))]
    t = m.shape[0]
    side = min(max(2.4 + 0.6 * t, 3.2), 9.0)
    with plot_style():
        fig = new_figure(side + 1.0, side)
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad=BLANK_COLOUR)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fontsize = 8 if t <= 10 else 6 if t <= 16 else 0
        if fontsize:
            for i in range(t):
                for j in range(t):
                    text = "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}"
                    dark = np.isfinite(m[i, j]) and m[i, j] > 0.6
                    ax.text(
                        j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "#222222"
                    )
        ax.set_xticks(range(t), names, rotation=45 if t > 4 else 0, ha="right" if t > 4 else "center")
        ax.set_yticks(range(t), names)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if normalize == "row":
            ax.set_xlabel("task b")
            ax.set_ylabel("task a")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label(
            overlap_definition(normalize).split("=", 1)[1].split("(")[0].strip()
            if normalize in OVERLAP_NORMALIZATIONS
            else "overlap"
        )
        cbar.outline.set_visible(False)
        ax.set_title(title if title is not None else "Overlap of generalization features across tasks")
        return save_figure(fig, path)
