"""CLI: ``leakage`` (after gradient-blocked SFT: how much the protected features still moved)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.crosscoder.config import CrosscoderTrainingConfig
from posttrain_probe.errors import ProbeError


@user_errors
@config_options(training=CrosscoderTrainingConfig)
def leakage(
    crosscoder: Path = typer.Option(..., "--crosscoder", help="The blocking crosscoder/SAE directory (block_crosscoder of the blocked run)."),
    base: str = typer.Option(..., "--base", help="Base model the blocked run started from (local dir or hub name)."),
    blocked: str = typer.Option(..., "--blocked", help="Model fine-tuned with gradient blocking (local dir or hub name)."),
    features: str = typer.Option(..., "--features", help="Protected features (block_features): shared, base-only, finetune-only, a feature-set JSON, or 3,17,42."),
    dataset: str = typer.Option(..., "--dataset", help="Tokens to compare on: a dataset spec as for `collect`."),
    out: Path = typer.Option(..., "--out", help="Output directory: leakage.json, features.csv, leakage.png/.svg (and crosscoder/)."),
    model_name: str = typer.Option("base", "--model-name", help="Crosscoder branch whose per-source codes define the features (block_model)."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="Branch a NormRatio category is computed against (default: the other model of a two-model crosscoder)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Site L (default: the crosscoder's layer; another layer is refused)."),
    max_tokens: int = typer.Option(100_000, "--max-tokens", help="Tokens compared (0: the whole dataset)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per document."),
    forward_batch_size: int = typer.Option(8, "--forward-batch-size", help="Documents per model forward."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    column: Optional[str] = typer.Option(None, "--column", help="Text or chat-messages column (default: text, messages, content, prompt, question)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the models (default: cuda if available)."),
    train_crosscoder: bool = typer.Option(False, "--train-crosscoder", help="Also train a base-vs-blocked crosscoder on the compared activations (OUT/crosscoder; --n-tokens, --lr, ... set its training) and report the NormRatio bands of the protected features."),
    blocked_crosscoder: Optional[Path] = typer.Option(None, "--blocked-crosscoder", help="Instead of --train-crosscoder: an already trained base-vs-blocked crosscoder."),
    n_features: Optional[int] = typer.Option(None, "--n-features", help="--train-crosscoder: dictionary size (default: the blocking crosscoder's)."),
    matching: str = typer.Option("hungarian", "--matching", help="Protected -> new crosscoder features by base-decoder cosine: hungarian (one-to-one) or argmax (large sets)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    norm_ratio_scale: str = typer.Option("all", "--norm-ratio-scale", help="NormRatio denominator of a category --features and of the base-vs-blocked bands: all (max over every model slot, docs/methods.md) or pair (the two compared models, paper S)."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Compare even when --base/--blocked is not the model --model-name was trained on (nor tuned from it); recorded in leakage.json."),
    training: CrosscoderTrainingConfig = None,  # type: ignore[assignment]
) -> None:
    """After blocked training: how much the protected features still moved (relative activation change vs unprotected features; optionally NormRatio of a base-vs-blocked crosscoder)."""
    from posttrain_probe.analysis.leakage import feature_leakage

    if not crosscoder.exists():
        raise ProbeError(f"--crosscoder {crosscoder} does not exist")
    from posttrain_probe.crosscoder.inspect import require_complete

    require_complete(crosscoder, allow_incomplete)
    if max_tokens < 0:
        raise ProbeError(f"--max-tokens must be >= 0 (0: the whole dataset), got {max_tokens}")
    report = feature_leakage(
        crosscoder, base, blocked, dataset, features, model_name=model_name, finetuned=finetuned, layer=layer,
        max_tokens=max_tokens or None, seq_len=seq_len, forward_batch_size=forward_batch_size, split=split, column=column,
        device=device, train_crosscoder=train_crosscoder, crosscoder_out=out / "crosscoder", n_features=n_features,
        training_config=training, blocked_crosscoder=blocked_crosscoder, matching=matching, norm_ratio_scale=norm_ratio_scale, progress=True,
        allow_model_mismatch=allow_model_mismatch,
    )
    files = report.write(out)
    summary = report.summary()
    rel = summary["relative_change"]
    for group in ("protected", "unprotected"):
        stats = rel[group]
        typer.echo(f"{group:>11}: {stats['n_features']} features ({stats['n_active_on_base']} active on base), relative change median {stats['median']:.4g}, pooled {stats['pooled']:.4g}")
    typer.echo(f"protected / unprotected: median {rel['median_ratio_protected_to_unprotected']:.4g}, pooled {rel['pooled_ratio_protected_to_unprotected']:.4g}")
    if "crosscoder" in summary:
        part = summary["crosscoder"]
        typer.echo(f"base-vs-blocked crosscoder: protected features by NormRatio band {part['protected']['categories']}, left the shared band {part['protected']['left_shared_band']} of {part['protected']['n_live']}; match quality {part['matching']['quality']}")
    typer.echo(f"report: {files['report']}; table: {files['table']}; figures: {', '.join(files['figures'])}")
