"""One-call reports: `posttrain-probe analyze` (attribution) and `posttrain-probe dynamics` (checkpoints).

Each writes tables (CSV or Parquet), a JSON summary and figures (PNG + SVG) into an output
directory and returns the JSON-ready summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from posttrain_probe.analysis.attribution import NORM_RATIO_SCALES, categorize, decoder_cosine, mas, norm_ratio, nrn
from posttrain_probe.analysis.duplicates import DEFAULT_DUPLICATE_COSINE
from posttrain_probe.analysis.dynamics import DEFAULT_MIN_COSINE, DEFAULT_NORM_FLOOR, DEFAULT_TIE_ATOL
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.analysis.features import feature_activation_stats, feature_table, model_index, summary, write_table
from posttrain_probe.errors import ProbeError
from posttrain_probe.analysis.feature_sets import CATEGORY_NAMES, write_feature_set


def analyze_crosscoder(
    crosscoder,
    *,
    base: str,
    out_dir: str | os.PathLike,
    source=None,
    stats_tokens: int = 1_000_000,
    table_format: str = "parquet",
    p: float = 1,
    crosscoder_path: str | None = None,
    duplicate_cosine: float = DEFAULT_DUPLICATE_COSINE,
    norm_ratio_scale: str = "all",
) -> dict[str, Any]:
    """Per-feature table, summary, figures and NormRatio feature sets of a crosscoder against ``base``.

    Liveness (which latents count): from ``source`` (optional, a paired activation source over the
    crosscoder's models: activation frequency, max activation and dead-by-frequency on up to
    ``stats_tokens`` tokens), else from the training run's firing counters in ``crosscoder_path``
    (:func:`~posttrain_probe.crosscoder.inspect.training_liveness`), else unknown - then the summary
    says so (``liveness: unknown``, ``n_dead`` null) instead of calling every latent live.
    Duplicate latents (whole-decoder cosine >= ``duplicate_cosine``) are grouped and every count is
    given raw and deduplicated; ``settings`` records F, λ or k and the training tokens, which the
    counts depend on. ``norm_ratio_scale`` is NormRatio's denominator (``all``: docs/methods.md's max over every
    model slot; ``pair``: paper S's max over the two compared models). Writes ``features.<table_format>``, ``summary.json``, ``nrn_histograms``,
    ``mas_distributions`` and ``norm_ratio_vs_cosine_<model>`` figures, and
    ``feature_sets/<model>_<category>.json`` (paper S categories of live features, for gradient
    blocking; ``crosscoder_path`` is recorded as provenance). Metrics use the decoder in normalised units.
    """
    from posttrain_probe.analysis.plots import plot_mas_distributions, plot_nrn_histograms, plot_norm_ratio_vs_cosine
    from posttrain_probe.crosscoder.inspect import crosscoder_settings, training_liveness

    if table_format not in ("parquet", "csv"):
        raise ProbeError(f"table format {table_format!r}: expected parquet or csv")
    if norm_ratio_scale not in NORM_RATIO_SCALES:
        raise ProbeError(f"norm_ratio_scale {norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}")
    if isinstance(duplicate_cosine, bool) or not isinstance(duplicate_cosine, (int, float)) or not 0 < duplicate_cosine <= 1:
        raise ProbeError(f"duplicate_cosine={duplicate_cosine!r} is invalid; expected a cosine in (0, 1]")
    names = list(crosscoder.config.model_names)
    base_slot = model_index(names, base, "base model")
    if len(names) < 2:
        raise ProbeError(f"the crosscoder has one model {names}: attribution needs a base and at least one tuned model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats, live, liveness = None, None, "unknown"
    if source is not None:
        if list(source.model_names) != names:
            raise ProbeError(f"the activations hold models {list(source.model_names)}, the crosscoder {names}")
        batches = _limited(source.iter_batches(4096, shuffle=False), stats_tokens)
        stats, liveness = feature_activation_stats(crosscoder, batches), "activations"
    elif crosscoder_path is not None:
        live = training_liveness(crosscoder_path)
        liveness = "unknown" if live is None else "training"
    table = feature_table(crosscoder, base=base, stats=stats, live=live, p=p, duplicate_cosine=duplicate_cosine, norm_ratio_scale=norm_ratio_scale)
    table_path = write_table(table, out / f"features.{table_format}")
    result = summary(table, base=base, model_names=names, liveness=liveness)
    settings = (crosscoder_settings(crosscoder_path) if crosscoder_path is not None else {}) or {
        "n_features": crosscoder.config.n_features, "activation": crosscoder.config.activation}
    result["settings"] = {**settings, "duplicate_cosine": duplicate_cosine, "p": p, "norm_ratio_scale": norm_ratio_scale,
                          "stats_tokens": stats.n_tokens if stats is not None else None}
    result["note"] = COUNTS_NOTE
    W = crosscoder.W_dec.detach()
    tuned = [(slot, name) for slot, name in enumerate(names) if slot != base_slot]
    figures = plot_nrn_histograms({name: nrn(W, base_slot, slot, p=p).cpu().numpy() for slot, name in tuned}, out / "nrn_histograms", title=f"NRN against {base}")
    figures += plot_mas_distributions(mas(W).cpu().numpy(), names, out / "mas_distributions")
    feature_sets = []
    for slot, name in tuned:
        ratio = norm_ratio(W, base_slot, slot, scale=norm_ratio_scale).cpu().numpy()
        labels = table.column(f"category_{name}").to_pylist()  # "dead" where the feature is dead
        figures += plot_norm_ratio_vs_cosine(
            ratio, decoder_cosine(W, base_slot, slot).cpu().numpy(), list(categorize(ratio)), out / f"norm_ratio_vs_cosine_{name}"
        )
        for category in CATEGORY_NAMES:  # inputs for gradient blocking (block_features: <file>)
            feature_sets.append(write_feature_set(
                out / "feature_sets" / f"{name}_{category}.json", [i for i, label in enumerate(labels) if label == category],
                crosscoder=crosscoder, crosscoder_path=crosscoder_path, category=category, base=base, finetuned=name, metric="norm_ratio",
                norm_ratio_scale=norm_ratio_scale, liveness=liveness,
            ))
    result["files"] = {"table": str(table_path), "figures": [str(f) for f in figures], "feature_sets": [str(f) for f in feature_sets]}
    (out / "summary.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


COUNTS_NOTE = (
    "Counts of model-specific latents depend on the dictionary, not only on the models: with the "
    "ReLU + decoder-norm L1 recipe a feature can be split over several latents with the same decoder "
    "at no extra cost, so raw counts grow with F and shrink with lambda (and move with k and the "
    "training tokens). Compare two runs only at equal settings, and prefer the deduplicated counts."
)


def checkpoint_dynamics(
    crosscoder=None,
    *,
    base: str,
    out_dir: str | os.PathLike,
    checkpoints: list[str] | None = None,
    crosscoders: list | None = None,
    labels: list[str] | None = None,
    k: int = 50,
    p: float = 1,
    norm_floor: float = DEFAULT_NORM_FLOOR,
    min_cosine: float = DEFAULT_MIN_COSINE,
    tie_atol: float = DEFAULT_TIE_ATOL,
    duplicate_cosine: float | None = DEFAULT_DUPLICATE_COSINE,
    live=None,
) -> dict[str, Any]:
    """Top-k overlap and rank shifts of NRN across checkpoints (docs/methods.md sec. 5, paper R fig. 2, 8-11).

    Default: one multi-model ``crosscoder`` over base + checkpoints, a shared feature index
    (``checkpoints`` selects and orders its checkpoint models; default all but ``base``).
    Alternative: ``crosscoders``, one two-model (base, checkpoint) crosscoder per checkpoint, whose
    features are matched into one shared index on their whole decoders (all model rows) with the
    cosine floor ``min_cosine`` (:func:`~posttrain_probe.analysis.dynamics.shared_index`; a latent
    below the floor stays unmatched and the matching quality is reported per checkpoint).
    Scores of latents negligible in both compared models (``norm_floor``) or dead (``live``: an
    [F] bool for the multi-model crosscoder, or a list with one entry, None allowed, per
    crosscoder) are undefined and take no part in top-k sets. Duplicate latents of one crosscoder
    (whole-decoder cosine >= ``duplicate_cosine``; None: no grouping) count once, by their group's
    representative, so one feature split over several latents cannot fill several places of a top-k
    set. Ties at the k-th score (within ``tie_atol``) are counted and an undetermined top-k is flagged. Writes ``overlap.csv``,
    ``rank_shifts.json``, ``dynamics.json`` and the two heatmaps; returns the JSON-ready summary.
    """
    from posttrain_probe.analysis.dynamics import (
        checkpoint_scores, indexed_scores, rank_shifts, shared_index, top_k_ties, topk_overlap,
    )
    from posttrain_probe.analysis.plots import plot_rank_shifts, plot_topk_overlap

    out = Path(out_dir)
    matching_quality = None
    if (crosscoder is None) == (not crosscoders):
        raise ProbeError("give one multi-model crosscoder or a list of two-model crosscoders (one per checkpoint)")
    if crosscoder is not None:
        names = list(crosscoder.config.model_names)
        base_slot = model_index(names, base, "base model")
        chosen = checkpoints or [n for n in names if n != base]
        slots = [model_index(names, name, "checkpoint model") for name in chosen]
        scores = checkpoint_scores(crosscoder.W_dec.detach(), base_slot, slots, p=p, norm_floor=norm_floor, live=live)
        scores = _representatives_only(scores, crosscoder.W_dec.detach()[:, [base_slot, *slots]], duplicate_cosine)
        labels = labels or chosen
        index_size = scores.shape[1]
        own_undefined = torch.isnan(scores).sum(dim=1).tolist()
    else:
        lives = live if isinstance(live, (list, tuple)) else [None] * len(crosscoders)
        if len(lives) != len(crosscoders):
            raise ProbeError(f"live has {len(lives)} entries for {len(crosscoders)} crosscoders; expected one per crosscoder")
        per_checkpoint, vectors, include = [], [], []
        for index, (cc, alive) in enumerate(zip(crosscoders, lives)):
            names = list(cc.config.model_names)
            if len(names) != 2:
                raise ProbeError(f"crosscoder {index} has models {names}: the per-checkpoint alternative needs two-model crosscoders")
            base_slot = model_index(names, base, "base model")
            W = cc.W_dec.detach().float().cpu()
            score = checkpoint_scores(W, base_slot, [1 - base_slot], p=p, norm_floor=norm_floor, live=alive)
            score = _representatives_only(score, W, duplicate_cosine)[0]
            per_checkpoint.append(score)
            vectors.append(W.reshape(W.shape[0], -1))
            include.append(~torch.isnan(score))
        index = shared_index(vectors, min_cosine=min_cosine, include=include)
        scores = indexed_scores(per_checkpoint, index)
        labels = labels or [cc.config.model_names[1 - cc.config.model_names.index(base)] for cc in crosscoders]
        matching_quality = [None if q is None else q._asdict() for q in index.quality]
        index_size = index.n_features
        own_undefined = [int(torch.isnan(score).sum()) for score in per_checkpoint]  # of each crosscoder's own latents
    if len(labels) != scores.shape[0]:
        raise ProbeError(f"{len(labels)} labels for {scores.shape[0]} checkpoints")
    if scores.shape[0] < 2:
        raise ProbeError("checkpoint dynamics need at least two checkpoints")
    overlap = topk_overlap(scores, k=k)
    shifts = rank_shifts(scores, k=k)
    ties = top_k_ties(scores, k=k, atol=tie_atol)
    out.mkdir(parents=True, exist_ok=True)  # only once every input has been checked
    lines = ["," + ",".join(labels)] + [label + "," + ",".join(f"{v:.4f}" for v in row) for label, row in zip(labels, overlap.tolist())]
    (out / "overlap.csv").write_text("\n".join(lines) + "\n")
    shift_record = {
        f"{labels[c]}->{labels[c + 1]}": {
            "features": shifts.features[c].tolist(),
            "shift": [None if blank else float(s) for s, blank in zip(shifts.shift[c].tolist(), shifts.blank[c].tolist())],
            "n_blank": int(shifts.blank[c].sum()),
        }
        for c in range(scores.shape[0] - 1)
    }
    (out / "rank_shifts.json").write_text(json.dumps(shift_record, indent=2))
    figures = plot_topk_overlap(overlap.cpu().numpy(), labels, out / "topk_overlap", title=f"top-{k} NRN overlap")
    figures += plot_rank_shifts(shifts, labels, out / "rank_shifts")
    undetermined = [label for label, ok in zip(labels, ties.determined.tolist()) if not ok]
    result = {
        "k": k,
        "checkpoints": labels,
        "index": "multi-model crosscoder" if crosscoder is not None else "per-checkpoint crosscoders matched on whole decoders",
        "n_index_features": int(index_size),
        "overlap": overlap.tolist(),
        "mean_adjacent_overlap": float(torch.diagonal(overlap, 1).mean()),
        "blanks": {key: value["n_blank"] for key, value in shift_record.items()},
        "n_undefined": dict(zip(labels, own_undefined)),
        "ties": {
            label: {"kth_score": float(kth), "n_tied": int(n), "n_tied_in_top": int(n_in), "determined": bool(ok)}
            for label, kth, n, n_in, ok in zip(labels, ties.kth_score.tolist(), ties.n_tied.tolist(), ties.n_tied_in_top.tolist(), ties.determined.tolist())
        },
        "undetermined_top_k": undetermined,
        "matching": None if matching_quality is None else dict(zip(labels, matching_quality)),
        "settings": {"p": p, "norm_floor": norm_floor, "duplicate_cosine": duplicate_cosine, "min_cosine": min_cosine if crosscoder is None else None, "tie_atol": tie_atol,
                     "liveness": "given" if _any_given(live) else "decoder norms only"},
        "files": [str(f) for f in figures] + [str(out / "overlap.csv"), str(out / "rank_shifts.json")],
    }
    (out / "dynamics.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


def _any_given(live) -> bool:
    """Whether any liveness vector was given (one, or a list with at least one not None)."""
    return any(x is not None for x in live) if isinstance(live, (list, tuple)) else live is not None


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


def _limited(batches, max_tokens: int):
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            return
        batch = batch[: max_tokens - seen]
        seen += batch.shape[0]
        yield batch
