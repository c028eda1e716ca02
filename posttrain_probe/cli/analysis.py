"""CLI: ``analyze`` (attribution of crosscoder features) and ``dynamics`` (checkpoint dynamics)."""

from __future__ import annotations

from pathlib import Path

import typer

from posttrain_probe.cli.common import user_errors


@user_errors
def analyze(
    crosscoder: Path = typer.Option(..., "--crosscoder", help="Crosscoder directory."),
    base: str = typer.Option("base", "--base", help="Name of the base model in the crosscoder."),
    out: Path = typer.Option(..., "--out", help="Output directory for the table, summary.json and figures."),
    acts: list[str] = typer.Option([], "--acts", help="Activations (as for `crosscoder train --acts`) for activation frequency / max / dead flags."),
    stats_tokens: int = typer.Option(1_000_000, "--stats-tokens", help="Tokens read from --acts for the activation statistics."),
    table_format: str = typer.Option("parquet", "--format", help="Feature table format: parquet or csv."),
    p: float = typer.Option(1.0, "--p", help="Norm order of NRN and MAS (1 = the paper's; 2 = relative decoder norm)."),
    norm_ratio_scale: str = typer.Option("all", "--norm-ratio-scale", help="NormRatio denominator: all (max decoder norm over every model slot, docs/methods.md) or pair (over the two compared models, paper S)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    duplicate_cosine: float = typer.Option(0.95, "--duplicate-cosine", help="Latents whose whole decoders have at least this cosine are duplicates: grouped, counted once in the *_dedup counts."),
) -> None:
    """Attribute crosscoder features to models: NRN, MAS, NormRatio, decoder cosine, categories, figures."""
    from posttrain_probe.analysis.report import analyze_crosscoder
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.crosscoder.sources import open_source

    cc = load_crosscoder(crosscoder, allow_incomplete=allow_incomplete)
    source = open_source(acts=acts, layer=cc.config.layer, model_names=cc.model_names) if acts else None
    result = analyze_crosscoder(cc, base=base, out_dir=out, source=source, stats_tokens=stats_tokens, table_format=table_format, p=p,
                                crosscoder_path=str(crosscoder), duplicate_cosine=duplicate_cosine, norm_ratio_scale=norm_ratio_scale)
    for name, counts in result["models"].items():
        typer.echo(f"{name} vs {base}: {counts['categories']} NRN tails {counts['nrn_tails']}; deduplicated {counts['categories_dedup']}")
    if result["liveness"] == "unknown":
        typer.secho("note: liveness unknown (no --acts, no training state): latents that never fire are counted as live; pass --acts", fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(f"liveness from {result['liveness']}: {result['n_dead']} of {result['n_features']} latents dead; {result['n_duplicate_groups']} distinct after grouping duplicates")
    typer.echo(f"table: {result['files']['table']}; summary: {out / 'summary.json'}; {len(result['files']['figures'])} figure files; feature sets in {out / 'feature_sets'}")


@user_errors
def dynamics(
    crosscoder: list[Path] = typer.Option(..., "--crosscoder", help="One multi-model crosscoder over base + checkpoints, or one two-model crosscoder per checkpoint (repeat, in training order)."),
    base: str = typer.Option("base", "--base", help="Name of the base model."),
    checkpoint: list[str] = typer.Option([], "--checkpoint", help="Checkpoint model names in order (multi-model crosscoder; default: all but --base)."),
    k: int = typer.Option(50, "--k", help="Size of the top-NRN feature sets."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    norm_floor: float = typer.Option(0.01, "--norm-floor", help="A score is undefined where both compared decoder norms are below this fraction of the crosscoder's largest one."),
    min_cosine: float = typer.Option(0.7, "--min-cosine", help="Per-checkpoint crosscoders: whole-decoder cosine below which a latent stays unmatched."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of unfinished crosscoder training runs."),
    tie_atol: float = typer.Option(1e-6, "--tie-atol", help="Scores within this distance of the k-th score tie with it (reported; an undetermined top-k is flagged)."),
) -> None:
    """Checkpoint dynamics: top-k NRN overlap matrix and rank shifts between consecutive checkpoints."""
    from posttrain_probe.analysis.report import checkpoint_dynamics
    from posttrain_probe.crosscoder.inspect import load_crosscoder, training_liveness

    models = [load_crosscoder(path, allow_incomplete=allow_incomplete) for path in crosscoder]
    lives = [training_liveness(path) for path in crosscoder]
    options = dict(base=base, k=k, out_dir=out, norm_floor=norm_floor, min_cosine=min_cosine, tie_atol=tie_atol)
    if len(models) == 1:
        result = checkpoint_dynamics(models[0], checkpoints=checkpoint or None, live=lives[0], **options)
    else:
        result = checkpoint_dynamics(crosscoders=models, labels=checkpoint or None, live=lives, **options)
    typer.echo(f"mean top-{k} overlap of consecutive checkpoints: {result['mean_adjacent_overlap']:.3f}; blanks {result['blanks']}")
    if result["matching"]:
        for label, quality in result["matching"].items():
            if quality is not None:
                typer.echo(f"matching {label}: {quality['n_matched']} matched (median cosine {quality['median']:.3f}), {quality['n_unmatched']} unmatched below {min_cosine}")
    for label in result["undetermined_top_k"]:
        tie = result["ties"][label]
        typer.secho(f"warning: top-{k} of {label} is not determined by the scores: {tie['n_tied']} latents tie at {tie['kth_score']:.6g}, {tie['n_tied_in_top']} of them inside", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"written to {out}")
