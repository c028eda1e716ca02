"""The step ``analyze`` (attribution of crosscoder features; ``dynamics`` is in
:mod:`posttrain_probe.analysis.checkpoint_dynamics`).

:func:`analyze` (an :class:`~posttrain_probe.analysis.analyze_config.AnalyzeConfig`) -> :class:`AnalysisResult`.
It writes tables (CSV or Parquet), a JSON summary and figures (PNG + SVG) into ``config.out`` and returns
the typed result, which reads back from that directory (``AnalysisResult.read(out)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain_probe.analysis.analyze_config import AnalyzeConfig
from posttrain_probe.analysis.attribution import categorize, decoder_cosine, mas, norm_ratio, nrn
from posttrain_probe.analysis.features import feature_activation_stats, feature_table, model_index, summary, write_table
from posttrain_probe.analysis.jsonable import json_safe, read_json
from posttrain_probe.errors import ProbeError

SUMMARY = "summary.json"
"""The :class:`AnalysisResult` of ``analyze``, in its output directory."""

COUNTS_NOTE = (
    "Counts of model-specific latents depend on the dictionary, not only on the models: with the "
    "ReLU + decoder-norm L1 recipe a feature can be split over several latents with the same decoder "
    "at no extra cost, so raw counts grow with F and shrink with lambda (and move with k and the "
    "training tokens). Compare two runs only at equal settings, and prefer the deduplicated counts."
)


@dataclass
class ModelCounts:
    """Counts of one tuned model against the base (live features only; see :func:`~posttrain_probe.analysis.features.summary`)."""

    n: int
    """Live features with a defined NRN."""
    categories: dict[str, int]
    """NormRatio category counts (``undefined``: both decoders of the pair zero)."""
    categories_dedup: dict[str, int]
    """The same, each group of duplicate latents counted once."""
    nrn_tails: dict[str, int]
    """Counts of NRN > t and NRN < 1 - t per tail threshold t (keys ``nrn>0.7``, ``nrn<0.3``, ...)."""
    nrn_tails_dedup: dict[str, int]
    """The same, deduplicated."""
    nrn_mean: float | None
    """Mean NRN of the counted features (None when none counts)."""
    nrn_median: float | None
    """Median NRN of the counted features (None when none counts)."""


@dataclass
class AnalysisFiles:
    """What ``analyze`` wrote besides ``summary.json`` (paths as strings)."""

    table: str
    """The per-feature table, ``features.parquet`` or ``features.csv``."""
    figures: list[str]
    """Figure files (PNG + SVG)."""
    feature_sets: list[str]
    """``feature_sets/<model>_<category>.json`` files (inputs of gradient blocking)."""


@dataclass
class AnalysisResult:
    """The summary of ``analyze`` (``summary.json``): counts of model-specific latents and the settings they depend on."""

    base: str
    """The base model's name."""
    n_features: int
    """Latents of the crosscoder (F)."""
    liveness: str
    """Where the dead flags come from: ``activations`` (--acts), ``training`` (the run's counters) or ``unknown``."""
    n_dead: int | None
    """Dead latents (None when liveness is unknown)."""
    n_zero_decoder: int | None
    """Latents with all-zero decoders (given only when liveness is unknown)."""
    n_duplicate_groups: int
    """Distinct live latents after grouping duplicates."""
    n_features_in_duplicate_groups: int
    """Live latents in a group of more than one."""
    models: dict[str, ModelCounts]
    """Counts per tuned model, against the base."""
    mas_dominant: dict[str, int]
    """Live latents per model with the largest MAS."""
    mas_dominant_dedup: dict[str, int]
    """The same, each duplicate group counted once."""
    settings: dict[str, Any]
    """F, activation, lambda or k, training tokens, and the analysis settings (p, duplicate_cosine, norm_ratio_scale, stats_tokens)."""
    note: str
    """How to read the counts (:data:`COUNTS_NOTE`)."""
    files: AnalysisFiles
    """The table, figures and feature sets written."""

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready summary, as stored in ``summary.json``."""
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnalysisResult:
        """The result from the mapping of ``summary.json``."""
        models = {name: ModelCounts(**counts) for name, counts in data["models"].items()}
        return cls(**{**data, "models": models, "files": AnalysisFiles(**data["files"])})

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``summary.json`` into ``out``; returns ``{"summary": path}``."""
        path = Path(out) / SUMMARY
        path.write_text(json.dumps(self.to_json(), indent=2))
        return {"summary": path}

    @classmethod
    def read(cls, out: str | os.PathLike) -> AnalysisResult:
        """The result of an ``analyze`` run from its output directory."""
        return cls.from_json(read_json(Path(out) / SUMMARY, "analyze"))


def analyze(config: AnalyzeConfig, *, crosscoder=None) -> AnalysisResult:
    """Per-feature table, summary, figures and NormRatio feature sets of a crosscoder against ``config.base``.

    The crosscoder is ``config.crosscoder`` (a directory) or, for Python callers, the loaded ``crosscoder``.
    Liveness (which latents count): from ``config.acts`` (activation frequency, max activation and
    dead-by-frequency on up to ``config.stats_tokens`` tokens), else from the training run's firing counters in
    the crosscoder's directory (:func:`~posttrain_probe.crosscoder.inspect.training_liveness`), else unknown -
    then the summary says so (``liveness: unknown``, ``n_dead`` null) instead of calling every latent live.
    Duplicate latents (whole-decoder cosine >= ``config.duplicate_cosine``) are grouped and every count is
    given raw and deduplicated; ``settings`` records F, λ or k and the training tokens, which the counts depend
    on. ``config.norm_ratio_scale`` is NormRatio's denominator (``all``: docs/methods.md's max over every model
    slot; ``pair``: paper S's max over the two compared models). Writes ``features.<table_format>``,
    ``summary.json``, ``nrn_histograms``, ``mas_distributions`` and ``norm_ratio_vs_cosine_<model>`` figures,
    and ``feature_sets/<model>_<category>.json`` (paper S categories of live features, for gradient blocking;
    the crosscoder's directory is recorded as provenance). Metrics use the decoder in normalised units.
    """
    from posttrain_probe.crosscoder.inspect import as_crosscoder, crosscoder_settings

    cc, cc_path = as_crosscoder(
        config.crosscoder if crosscoder is None else crosscoder, allow_incomplete=config.allow_incomplete
    )
    names = list(cc.config.model_names)
    model_index(names, config.base, "base model")
    if len(names) < 2:
        raise ProbeError(f"the crosscoder has one model {names}: attribution needs a base and at least one tuned model")
    source = _open_acts(config, cc)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    stats, live, liveness = _liveness(config, cc, cc_path, source)
    table = feature_table(
        cc,
        base=config.base,
        stats=stats,
        live=live,
        p=config.p,
        duplicate_cosine=config.duplicate_cosine,
        norm_ratio_scale=config.norm_ratio_scale,
    )
    table_path = write_table(table, out / f"features.{config.table_format}")
    counts = summary(table, base=config.base, model_names=names, liveness=liveness)
    settings = (crosscoder_settings(cc_path) if cc_path is not None else {}) or {
        "n_features": cc.config.n_features,
        "activation": cc.config.activation,
    }
    counts["settings"] = {
        **settings,
        "duplicate_cosine": config.duplicate_cosine,
        "p": config.p,
        "norm_ratio_scale": config.norm_ratio_scale,
        "stats_tokens": stats.n_tokens if stats is not None else None,
    }
    counts["note"] = COUNTS_NOTE
    figures, feature_sets = _attribution_files(config, cc, cc_path, table, liveness)
    counts["files"] = {
        "table": str(table_path),
        "figures": [str(f) for f in figures],
        "feature_sets": [str(f) for f in feature_sets],
    }
    result = AnalysisResult.from_json(json_safe(counts))
    result.write(out)
    return result


def _open_acts(config: AnalyzeConfig, cc):
    """The paired activation source of ``config.acts`` over the crosscoder's models (None without --acts)."""
    if not config.acts:
        return None
    from posttrain_probe.crosscoder.sources import open_source

    source = open_source(acts=config.acts, layer=cc.config.layer, model_names=cc.model_names)
    if list(source.model_names) != list(cc.config.model_names):
        raise ProbeError(
            f"the activations hold models {list(source.model_names)}, the crosscoder {list(cc.config.model_names)}"
        )
    return source


def _liveness(config: AnalyzeConfig, cc, cc_path: Path | None, source):
    """``(stats, live, liveness)``: activation statistics from ``source``, else the training run's counters, else unknown."""
    from posttrain_probe.crosscoder.inspect import training_liveness

    if source is not None:
        batches = _limited(source.iter_batches(4096, shuffle=False), config.stats_tokens)
        return feature_activation_stats(cc, batches), None, "activations"
    live = training_liveness(cc_path) if cc_path is not None else None
    return None, live, "unknown" if live is None else "training"


def _attribution_files(
    config: AnalyzeConfig, cc, cc_path: Path | None, table, liveness: str
) -> tuple[list[Path], list[Path]]:
    """Write the figures and the NormRatio feature sets of every tuned model; returns (figures, feature sets)."""
    from posttrain_probe.analysis.feature_sets import CATEGORY_NAMES, write_feature_set
    from posttrain_probe.analysis.plots import plot_mas_distributions, plot_norm_ratio_vs_cosine, plot_nrn_histograms

    out, base, names = config.out, config.base, list(cc.config.model_names)
    base_slot = names.index(base)
    W = cc.W_dec.detach()
    tuned = [(slot, name) for slot, name in enumerate(names) if slot != base_slot]
    figures = plot_nrn_histograms(
        {name: nrn(W, base_slot, slot, p=config.p).cpu().numpy() for slot, name in tuned},
        out / "nrn_histograms",
        title=f"NRN against {base}",
    )
    figures += plot_mas_distributions(mas(W).cpu().numpy(), names, out / "mas_distributions")
    feature_sets = []
    for slot, name in tuned:
        ratio = norm_ratio(W, base_slot, slot, scale=config.norm_ratio_scale).cpu().numpy()
        labels = table.column(f"category_{name}").to_pylist()  # "dead" where the feature is dead
        figures += plot_norm_ratio_vs_cosine(
            ratio,
            decoder_cosine(W, base_slot, slot).cpu().numpy(),
            list(categorize(ratio)),
            out / f"norm_ratio_vs_cosine_{name}",
        )
        for category in CATEGORY_NAMES:  # inputs for gradient blocking (block_features: <file>)
            feature_sets.append(
                write_feature_set(
                    out / "feature_sets" / f"{name}_{category}.json",
                    [i for i, label in enumerate(labels) if label == category],
                    crosscoder=cc,
                    crosscoder_path=str(cc_path) if cc_path is not None else None,
                    category=category,
                    base=base,
                    finetuned=name,
                    metric="norm_ratio",
                    norm_ratio_scale=config.norm_ratio_scale,
                    liveness=liveness,
                )
            )
    return figures, feature_sets


def _limited(batches, max_tokens: int):
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            return
        batch = batch[: max_tokens - seen]
        seen += batch.shape[0]
        yield batch
