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

from posttrain_probe.analysis.attribution import categorize, decoder_cosine, mas, norm_ratio, nrn
from posttrain_probe.analysis.features import feature_activation_stats, feature_table, model_index, summary, write_table
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.feature_sets import CATEGORY_NAMES, write_feature_set


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
) -> dict[str, Any]:
    """Per-feature table, summary, figures and NormRatio feature sets of a crosscoder against ``base``.

    ``source`` (optional, a paired activation source over the crosscoder's models) adds
    activation frequency, max activation and dead-by-frequency on up to ``stats_tokens`` tokens.
    Writes ``features.<table_format>``, ``summary.json``, ``nrn_histograms``, ``mas_distributions``
    and ``norm_ratio_vs_cosine_<model>`` figures, and ``feature_sets/<model>_<category>.json``
    (paper S categories, for gradient blocking; ``crosscoder_path`` is recorded as provenance). Metrics use the decoder in normalised units.
    """
    from posttrain_probe.analysis.plots import plot_mas_distributions, plot_nrn_histograms, plot_norm_ratio_vs_cosine

    if table_format not in ("parquet", "csv"):
        raise ProbeError(f"table format {table_format!r}: expected parquet or csv")
    names = list(crosscoder.config.model_names)
    base_slot = model_index(names, base, "base model")
    if len(names) < 2:
        raise ProbeError(f"the crosscoder has one model {names}: attribution needs a base and at least one tuned model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = None
    if source is not None:
        if list(source.model_names) != names:
            raise ProbeError(f"the activations hold models {list(source.model_names)}, the crosscoder {names}")
        batches = _limited(source.iter_batches(4096, shuffle=False), stats_tokens)
        stats = feature_activation_stats(crosscoder, batches)
    table = feature_table(crosscoder, base=base, stats=stats, p=p)
    table_path = write_table(table, out / f"features.{table_format}")
    result = summary(table, base=base, model_names=names)
    W = crosscoder.W_dec.detach()
    tuned = [(slot, name) for slot, name in enumerate(names) if slot != base_slot]
    figures = plot_nrn_histograms({name: nrn(W, base_slot, slot, p=p).cpu().numpy() for slot, name in tuned}, out / "nrn_histograms", title=f"NRN against {base}")
    figures += plot_mas_distributions(mas(W).cpu().numpy(), names, out / "mas_distributions")
    feature_sets = []
    for slot, name in tuned:
        ratio = norm_ratio(W, base_slot, slot).cpu().numpy()
        labels = categorize(ratio)
        figures += plot_norm_ratio_vs_cosine(
            ratio, decoder_cosine(W, base_slot, slot).cpu().numpy(), list(labels), out / f"norm_ratio_vs_cosine_{name}"
        )
        for category in CATEGORY_NAMES:  # inputs for gradient blocking (block_features: <file>)
            feature_sets.append(write_feature_set(
                out / "feature_sets" / f"{name}_{category}.json", [i for i, label in enumerate(labels) if label == category],
                crosscoder=crosscoder, crosscoder_path=crosscoder_path, category=category, base=base, finetuned=name, metric="norm_ratio",
            ))
    result["files"] = {"table": str(table_path), "figures": [str(f) for f in figures], "feature_sets": [str(f) for f in feature_sets]}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


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
) -> dict[str, Any]:
    """Top-k overlap and rank shifts of NRN across checkpoints (SPEC sec. 5, paper R fig. 2, 8-11).

    Default: one multi-model ``crosscoder`` over base + checkpoints, a shared feature index
    (``checkpoints`` selects and orders its checkpoint models; default all but ``base``).
    Alternative: ``crosscoders``, one two-model (base, checkpoint) crosscoder per checkpoint,
    whose features are matched to the first one's by Hungarian assignment on the checkpoint
    decoder vectors; the match quality is reported. Writes ``overlap.csv``, ``rank_shifts.json``,
    ``dynamics.json`` and the two heatmaps.
    """
    from posttrain_probe.analysis.dynamics import align_scores, checkpoint_scores, match_features, rank_shifts, topk_overlap
    from posttrain_probe.analysis.plots import plot_rank_shifts, plot_topk_overlap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    matching_quality = None
    if (crosscoder is None) == (not crosscoders):
        raise ProbeError("give one multi-model crosscoder or a list of two-model crosscoders (one per checkpoint)")
    if crosscoder is not None:
        names = list(crosscoder.config.model_names)
        base_slot = model_index(names, base, "base model")
        chosen = checkpoints or [n for n in names if n != base]
        slots = [model_index(names, name, "checkpoint model") for name in chosen]
        scores = checkpoint_scores(crosscoder.W_dec.detach(), base_slot, slots, p=p)
        labels = labels or chosen
    else:
        per_checkpoint, reference, matching_quality = [], None, []
        for index, cc in enumerate(crosscoders):
            names = list(cc.config.model_names)
            if len(names) != 2:
                raise ProbeError(f"crosscoder {index} has models {names}: the per-checkpoint alternative needs two-model crosscoders")
            base_slot = model_index(names, base, "base model")
            tuned_slot = 1 - base_slot
            W = cc.W_dec.detach()
            score = nrn(W, base_slot, tuned_slot, p=p)
            vectors = W[:, tuned_slot]
            if reference is None:
                reference = vectors
            else:
                matching = match_features(reference, vectors)
                score = align_scores(score, matching)
                matching_quality.append(matching.quality._asdict())
            per_checkpoint.append(score)
        scores = torch.stack(per_checkpoint)
        labels = labels or [cc.config.model_names[1 - cc.config.model_names.index(base)] for cc in crosscoders]
    if len(labels) != scores.shape[0]:
        raise ProbeError(f"{len(labels)} labels for {scores.shape[0]} checkpoints")
    if scores.shape[0] < 2:
        raise ProbeError("checkpoint dynamics need at least two checkpoints")
    overlap = topk_overlap(scores, k=k)
    shifts = rank_shifts(scores, k=k)
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
    result = {
        "k": k,
        "checkpoints": labels,
        "overlap": overlap.tolist(),
        "mean_adjacent_overlap": float(torch.diagonal(overlap, 1).mean()),
        "blanks": {key: value["n_blank"] for key, value in shift_record.items()},
        "matching": matching_quality,
        "files": [str(f) for f in figures] + [str(out / "overlap.csv"), str(out / "rank_shifts.json")],
    }
    (out / "dynamics.json").write_text(json.dumps(result, indent=2))
    return result


def _limited(batches, max_tokens: int):
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            return
        batch = batch[: max_tokens - seen]
        seen += batch.shape[0]
        yield batch
