"""CLI: ``analyze`` (attribution of crosscoder features) and ``dynamics`` (checkpoint dynamics)."""

from __future__ import annotations

import typer

from posttrain_probe.analysis.analyze_config import AnalyzeConfig, DynamicsConfig
from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options


@user_errors
@config_options(config=AnalyzeConfig)
def analyze(config: AnalyzeConfig) -> None:
    """Attribute crosscoder features to models: NRN, MAS, NormRatio, decoder cosine, categories, figures."""
    from posttrain_probe.analysis.report import analyze as run

    result = run(config)
    for name, counts in result.models.items():
        typer.echo(
            f"{name} vs {result.base}: {counts.categories} NRN tails {counts.nrn_tails}; deduplicated {counts.categories_dedup}"
        )
    if result.liveness == "unknown":
        typer.secho(
            "note: liveness unknown (no --acts, no training state): latents that never fire are counted as live; pass --acts",
            fg=typer.colors.YELLOW,
            err=True,
        )
    else:
        typer.echo(
            f"liveness from {result.liveness}: {result.n_dead} of {result.n_features} latents dead; {result.n_duplicate_groups} distinct after grouping duplicates"
        )
    out = config.out
    typer.echo(
        f"table: {result.files.table}; summary: {out / 'summary.json'}; {len(result.files.figures)} figure files; feature sets in {out / 'feature_sets'}"
    )


@user_errors
@config_options(config=DynamicsConfig)
def dynamics(config: DynamicsConfig) -> None:
    """Checkpoint dynamics: top-k NRN overlap matrix and rank shifts between consecutive checkpoints."""
    from posttrain_probe.analysis.checkpoint_dynamics import dynamics as run

    result = run(config)
    typer.echo(
        f"mean top-{result.k} overlap of consecutive checkpoints: {result.mean_adjacent_overlap:.3f}; blanks {result.blanks}"
    )
    for label, quality in (result.matching or {}).items():
        if quality is not None:
            typer.echo(
                f"matching {label}: {quality.n_matched} matched (median cosine {quality.median:.3f}), {quality.n_unmatched} unmatched below {quality.min_cosine}"
            )
    for label in result.undetermined_top_k:
        tie = result.ties[label]
        typer.secho(
            f"warning: top-{result.k} of {label} is not determined by the scores: {tie.n_tied} latents tie at {tie.kth_score:.6g}, "
            f"{tie.n_tied_in_top} of them inside",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"written to {config.out}")
