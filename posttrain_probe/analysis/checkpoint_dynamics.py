"""The step ``dynamics``: checkpoint dynamics of crosscoder features (docs/methods.md sec. 5).

:func:`dynamics` (a :class:`~posttrain_probe.analysis.analyze_config.DynamicsConfig`) -> :class:`DynamicsResult`:
the top-k NRN overlap matrix of consecutive checkpoints and the rank shifts, from one multi-model crosscoder
over base + checkpoints or one two-model crosscoder per checkpoint (matched through a shared index). It writes
``dynamics.json``, ``rank_shifts.json``, ``overlap.csv`` and figures into ``config.out``;
``DynamicsResult.read(out)`` reads the result back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.analysis.analyze_config import DynamicsConfig
from posttrain_probe.analysis.dynamics import MatchQuality
from posttrain_probe.analysis.features import model_index
from posttrain_probe.analysis.jsonable import json_safe, read_json
from posttrain_probe.errors import ProbeError

DYNAMICS = "dynamics.json"
"""The :class:`DynamicsResult` of ``dynamics`` (without the rank shifts), in its output directory."""
RANK_SHIFTS = "rank_shifts.json"
"""The rank shifts of ``dynamics`` (:attr:`DynamicsResult.rank_shifts`)."""
OVERLAP = "overlap.csv"
"""The top-k overlap matrix of ``dynamics`` as CSV."""


class CheckpointTie(NamedTuple):
    """How the k-th score of one checkpoint's top-k set is tied (:func:`~posttrain_probe.analysis.dynamics.top_k_ties`)."""

    kth_score: float | None
    """The k-th best score."""
    n_tied: int
    """Features within ``tie_atol`` of it (1 = no tie)."""
    n_tied_in_top: int
    """How many of those are in the top-k set."""
    determined: bool
    """Every tied feature is in the set: the scores alone decide it."""


@dataclass
class DynamicsResult:
    """The result of ``dynamics`` (``dynamics.json``, ``rank_shifts.json``, ``overlap.csv``)."""

    k: int
    """Size of the top-NRN sets T_c."""
    checkpoints: list[str]
    """Checkpoint labels in training order."""
    index: str
    """The shared feature index: ``multi-model crosscoder`` or ``per-checkpoint crosscoders matched on whole decoders``."""
    n_index_features: int
    """Size of the shared index."""
    overlap: list[list[float]]
    """[C, C] overlap(c, c') = |T_c ∩ T_c'| / k."""
    mean_adjacent_overlap: float
    """Mean overlap of consecutive checkpoints."""
    blanks: dict[str, int]
    """Per ``c->c+1``: members of T_c that left the top-k."""
    n_undefined: dict[str, int]
    """Per checkpoint: latents with an undefined score (negligible, dead or duplicate)."""
    ties: dict[str, CheckpointTie]
    """Per checkpoint: ties at the k-th score."""
    undetermined_top_k: list[str]
    """Checkpoints whose top-k set is not decided by the scores alone."""
    matching: dict[str, MatchQuality | None] | None
    """Per-checkpoint crosscoders: quality of each crosscoder's matching into the shared index (None for the
    first, which starts it); None for a multi-model crosscoder."""
    settings: dict[str, Any]
    """p, norm_floor, duplicate_cosine, min_cosine, tie_atol and where liveness came from."""
    files: list[str]
    """Figures, ``overlap.csv`` and ``rank_shifts.json``."""
    rank_shifts: dict[str, dict[str, Any]]
    """Per ``c->c+1`` (``rank_shifts.json``): ``features`` (T_c, best first), ``shift`` (|rank change|, None for
    blanks) and ``n_blank``."""

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready summary, as stored in ``dynamics.json`` (without the rank shifts)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rank_shifts"}
        data["ties"] = {label: tie._asdict() for label, tie in self.ties.items()}
        if self.matching is not None:
            data["matching"] = {label: None if q is None else q._asdict() for label, q in self.matching.items()}
        return json_safe(data)

    @classmethod
    def from_json(cls, data: dict[str, Any], rank_shifts: dict[str, dict[str, Any]]) -> DynamicsResult:
        """The result from the mappings of ``dynamics.json`` and ``rank_shifts.json``."""
        ties = {label: CheckpointTie(**tie) for label, tie in data["ties"].items()}
        matching = data["matching"]
        if matching is not None:
            matching = {label: None if q is None else MatchQuality(**q) for label, q in matching.items()}
        return cls(**{**data, "ties": ties, "matching": matching}, rank_shifts=rank_shifts)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``overlap.csv``, ``rank_shifts.json`` and ``dynamics.json`` into ``out``; returns their paths."""
        out = Path(out)
        labels = self.checkpoints
        lines = ["," + ",".join(labels)] + [
            label + "," + ",".join(f"{v:.4f}" for v in row) for label, row in zip(labels, self.overlap)
        ]
        files = {"overlap": out / OVERLAP, "rank_shifts": out / RANK_SHIFTS, "dynamics": out / DYNAMICS}
        files["overlap"].write_text("\n".join(lines) + "\n")
        files["rank_shifts"].write_text(json.dumps(self.rank_shifts, indent=2))
        files["dynamics"].write_text(json.dumps(self.to_json(), indent=2))
        return files

    @classmethod
    def read(cls, out: str | os.PathLike) -> DynamicsResult:
        """The result of a ``dynamics`` run from its output directory."""
        return cls.from_json(
            read_json(Path(out) / DYNAMICS, "dynamics"), read_json(Path(out) / RANK_SHIFTS, "dynamics")
        )


class _Scores(NamedTuple):
    """Checkpoint scores over one shared index, and how the index was made."""

    scores: torch.Tensor
    """[C, U] NRN per checkpoint, NaN where undefined."""
    labels: list[str]
    index: str
    n_index_features: int
    own_undefined: list[int]
    matching: list[dict[str, Any] | None] | None


def dynamics(config: DynamicsConfig, *, crosscoders=None) -> DynamicsResult:
    """Top-k overlap and rank shifts of NRN across checkpoints (docs/methods.md sec. 5, paper R fig. 2, 8-11).

    The crosscoders are ``config.crosscoder`` (directories) or, for Python callers, ``crosscoders`` (loaded
    :class:`~posttrain_probe.crosscoder.Crosscoder` objects or directories). One crosscoder: a multi-model
    crosscoder over base + checkpoints, a shared feature index (``config.checkpoint`` selects and orders its
    checkpoint models; default all but ``config.base``). Several: one two-model (base, checkpoint) crosscoder
    per checkpoint, whose features are matched into one shared index on their whole decoders (all model rows)
    with the cosine floor ``config.min_cosine`` (:func:`~posttrain_probe.analysis.dynamics.shared_index`; a
    latent below the floor stays unmatched and the matching quality is reported per checkpoint).
    Scores of latents negligible in both compared models (``config.norm_floor``) or dead by the training run's
    firing counters (crosscoders given as directories) are undefined and take no part in top-k sets. Duplicate
    latents of one crosscoder (whole-decoder cosine >= ``config.duplicate_cosine``; None: no grouping) count
    once, by their group's representative, so one feature split over several latents cannot fill several
    places of a top-k set. Ties at the k-th score (within ``config.tie_atol``) are counted and an undetermined
    top-k is flagged. Writes ``overlap.csv``, ``rank_shifts.json``, ``dynamics.json`` and the two heatmaps.
    """
    from posttrain_probe.analysis.dynamics import rank_shifts, top_k_ties, topk_overlap
    from posttrain_probe.analysis.plots import plot_rank_shifts, plot_topk_overlap

    models, lives = _dynamics_crosscoders(config, crosscoders)
    scored = (
        _joint_scores(config, models[0], lives[0])
        if len(models) == 1
        else _per_checkpoint_scores(config, models, lives)
    )
    scores, labels, k = scored.scores, scored.labels, config.k
    if len(labels) != scores.shape[0]:
        raise ProbeError(f"{len(labels)} labels for {scores.shape[0]} checkpoints")
    if scores.shape[0] < 2:
        raise ProbeError("checkpoint dynamics need at least two checkpoints")
    overlap = topk_overlap(scores, k=k)
    shifts = rank_shifts(scores, k=k)
    ties = top_k_ties(scores, k=k, atol=config.tie_atol)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been checked
    shift_record = {
        f"{labels[c]}->{labels[c + 1]}": {
            "features": shifts.features[c].tolist(),
            "shift": [
                None if blank else float(s) for s, blank in zip(shifts.shift[c].tolist(), shifts.blank[c].tolist())
            ],
            "n_blank": int(shifts.blank[c].sum()),
        }
        for c in range(scores.shape[0] - 1)
    }
    figures = plot_topk_overlap(overlap.cpu().numpy(), labels, out / "topk_overlap", title=f"top-{k} NRN overlap")
    figures += plot_rank_shifts(shifts, labels, out / "rank_shifts")
    undetermined = [label for label, ok in zip(labels, ties.determined.tolist()) if not ok]
    data = {
        "k": k,
        "checkpoints": labels,
        "index": scored.index,
        "n_index_features": int(scored.n_index_features),
        "overlap": overlap.tolist(),
        "mean_adjacent_overlap": float(torch.diagonal(overlap, 1).mean()),
        "blanks": {key: value["n_blank"] for key, value in shift_record.items()},
        "n_undefined": dict(zip(labels, scored.own_undefined)),
        "ties": {
            label: {"kth_score": float(kth), "n_tied": int(n), "n_tied_in_top": int(n_in), "determined": bool(ok)}
            for label, kth, n, n_in, ok in zip(
                labels,
                ties.kth_score.tolist(),
                ties.n_tied.tolist(),
                ties.n_tied_in_top.tolist(),
                ties.determined.tolist(),
            )
        },
        "undetermined_top_k": undetermined,
        "matching": None if scored.matching is None else dict(zip(labels, scored.matching)),
        "settings": {
            "p": config.p,
            "norm_floor": config.norm_floor,
            "duplicate_cosine": config.duplicate_cosine,
            "min_cosine": config.min_cosine if scored.matching is not None else None,
            "tie_atol": config.tie_atol,
            "liveness": "given" if any(live is not None for live in lives) else "decoder norms only",
        },
        "files": [str(f) for f in figures] + [str(out / OVERLAP), str(out / RANK_SHIFTS)],
    }
    result = DynamicsResult.from_json(json_safe(data), shift_record)
    result.write(out)
    return result


def _dynamics_crosscoders(config: DynamicsConfig, crosscoders) -> tuple[list, list]:
    """The crosscoders of ``config.crosscoder`` (or the given ones) and the training liveness of each ([F] bool or None)."""
    from posttrain_probe.crosscoder.inspect import as_crosscoder, training_liveness

    given = config.crosscoder if crosscoders is None else list(crosscoders)
    if not given:
        raise ProbeError("give one multi-model crosscoder or a list of two-model crosscoders (one per checkpoint)")
    models, lives = [], []
    for item in given:
        cc, path = as_crosscoder(item, allow_incomplete=config.allow_incomplete)
        models.append(cc)
        lives.append(training_liveness(path) if path is not None else None)
    return models, lives


def _joint_scores(config: DynamicsConfig, crosscoder, live) -> _Scores:
    """NRN of the checkpoint models of one multi-model crosscoder against the base (its own feature index)."""
    from posttrain_probe.analysis.dynamics import checkpoint_scores

    names = list(crosscoder.config.model_names)
    base_slot = model_index(names, config.base, "base model")
    chosen = config.checkpoint or [n for n in names if n != config.base]
    slots = [model_index(names, name, "checkpoint model") for name in chosen]
    W = crosscoder.W_dec.detach()
    scores = checkpoint_scores(W, base_slot, slots, p=config.p, norm_floor=config.norm_floor, live=live)
    scores = _representatives_only(scores, W[:, [base_slot, *slots]], config.duplicate_cosine)
    return _Scores(
        scores, chosen, "multi-model crosscoder", scores.shape[1], torch.isnan(scores).sum(dim=1).tolist(), None
    )


def _per_checkpoint_scores(config: DynamicsConfig, crosscoders: list, lives: list) -> _Scores:
    """NRN of one two-model crosscoder per checkpoint, laid out over their features matched on whole decoders."""
    from posttrain_probe.analysis.dynamics import checkpoint_scores, indexed_scores, shared_index

    per_checkpoint, vectors, include = [], [], []
    for index, (cc, alive) in enumerate(zip(crosscoders, lives)):
        names = list(cc.config.model_names)
        if len(names) != 2:
            raise ProbeError(
                f"crosscoder {index} has models {names}: the per-checkpoint alternative needs two-model crosscoders"
            )
        base_slot = model_index(names, config.base, "base model")
        W = cc.W_dec.detach().float().cpu()
        score = checkpoint_scores(W, base_slot, [1 - base_slot], p=config.p, norm_floor=config.norm_floor, live=alive)
        score = _representatives_only(score, W, config.duplicate_cosine)[0]
        per_checkpoint.append(score)
        vectors.append(W.reshape(W.shape[0], -1))
        include.append(~torch.isnan(score))
    index = shared_index(vectors, min_cosine=config.min_cosine, include=include)
    labels = config.checkpoint or [
        cc.config.model_names[1 - cc.config.model_names.index(config.base)] for cc in crosscoders
    ]
    matching = [None if q is None else q._asdict() for q in index.quality]
    own_undefined = [int(torch.isnan(score).sum()) for score in per_checkpoint]  # of each crosscoder's own latents
    return _Scores(
        indexed_scores(per_checkpoint, index),
        labels,
        "per-checkpoint crosscoders matched on whole decoders",
        index.n_features,
        own_undefined,
        matching,
    )


def _representatives_only(scores: torch.Tensor, W_dec: torch.Tensor, duplicate_cosine: float | None) -> torch.Tensor:
    """``scores`` [C, F] with every duplicate latent but its group's representative made undefined (NaN).

    Groups come from the whole decoders ``W_dec`` [F, M, d] of the features defined in any row.
    """
    if duplicate_cosine is None:
        return scores
    from posttrain_probe.analysis.duplicates import duplicate_groups

    defined = ~torch.isnan(scores).all(dim=0)
    group = duplicate_groups(W_dec, duplicate_cosine, include=defined).group
    duplicate = defined & (group != torch.arange(group.numel()))
    return scores.masked_fill(duplicate, float("nan"))
