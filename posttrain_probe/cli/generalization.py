"""CLI: ``posttrain-probe features generalization`` (docs/methods.md sec. 6) and ``posttrain-probe intervene`` (docs/methods.md sec. 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs


@user_errors
def features_generalization(
    crosscoder: Path = typer.Option(..., "--crosscoder", help="Base-vs-RL crosscoder directory."),
    base: str = typer.Option(..., "--base", help="Crosscoder branch of the base model."),
    rl: str = typer.Option(..., "--rl", help="Crosscoder branch of the RL-tuned model."),
    critical: Path = typer.Option(..., "--critical", help="critical.json from `posttrain-probe critical` (G_t and the exact prompts)."),
    model: list[str] = typer.Option(..., "--model", help="NAME=PATH for the base and the RL branch (repeat for both)."),
    out: Path = typer.Option(..., "--out", help="Output directory: generalization_features.json, feature_sets/, generalization.json, scores.csv, overlap.png/.svg."),
    threshold: float = typer.Option(0.2, "--threshold", help="Per task, keep features scoring >= this fraction of the task's maximum score (paper R: 0.2)."),
    tasks: list[str] = typer.Option([], "--tasks", help="Tasks to use (repeat or comma-separate; default: every task of --critical)."),
    overlap: str = typer.Option("row", "--overlap", help="Overlap matrix denominator: row (|S_a|), jaccard (|S_a ∪ S_b|) or min (min(|S_a|, |S_b|))."),
    add_bos_token: Optional[bool] = typer.Option(None, "--add-bos-token/--no-add-bos-token", help="As lm-eval's HFLM model_arg add_bos_token, if the critical runs set it (default: the tokenizer's own)."),
    padding_side: str = typer.Option("right", "--padding-side", help="Padding of the prompt batches: right or left (results agree)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per truncated forward."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the models (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
    split_half: Optional[int] = typer.Option(None, "--split-half", metavar="SEED", help="Select on one half of each task's G_t (seeded split); the held-out half's doc ids go into the feature set, and intervene evaluates on them only."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Score even when a --model is not the model its crosscoder branch was trained on (nor tuned from it); recorded in generalization.json."),
) -> None:
    """Generalization-controlling features (paper R sec. 3.2): Score_k^t at the last prompt token of G_t, S_t, their intersection and overlap."""
    from posttrain_probe.analysis.generalization import generalization_features, split_names

    models = _inputs(crosscoder, critical, model, allow_incomplete)
    result = generalization_features(
        str(crosscoder), models, critical, base=base, rl=rl, threshold=threshold, tasks=split_names(tasks) or None,
        normalize=overlap, add_bos_token=add_bos_token, batch_size=batch_size, padding_side=padding_side,
        model_dtype=dtype, device=device, progress=True, split_half=split_half, allow_model_mismatch=allow_model_mismatch,
    )
    files = result.write(out)
    tops = result.max_scores
    split = result.settings.get("split_half")
    for task in result.tasks:
        size = f"{result.n_critical[task]} (selection half; {len(split['held_out_doc_ids'][task])} held out)" if split else result.n_critical[task]
        typer.echo(f"{task}: |G_t| = {size}, max score {tops[task]:.4g}, |S_t| = {len(result.sets[task])}")
    for task in result.skipped:
        typer.echo(f"{task}: no generalization-critical samples, skipped")
    typer.echo(f"|S| = {len(result.intersection)} (intersection over {', '.join(result.tasks)})")
    for note in result.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"feature set: {files['feature_set']}; summary: {files['summary']}; scores: {files['scores']}; figures: {', '.join(files['figures'])}")


def _inputs(crosscoder: Path, critical: Path, model: list[str], allow_incomplete: bool = False) -> dict[str, str]:
    """The inputs both commands share: ``--crosscoder`` and ``--critical`` must exist; returns the
    ``--model NAME=PATH`` pairs as {name: path}."""
    if not crosscoder.exists():
        raise ProbeError(f"--crosscoder {crosscoder} does not exist")
    if not critical.exists():
        raise ProbeError(f"--critical {critical} does not exist")
    from posttrain_probe.crosscoder.inspect import require_complete

    require_complete(crosscoder, allow_incomplete)
    return parse_model_specs(model)


@user_errors
def critical(
    base_samples: Path = typer.Option(..., "--base-samples", help="lm-eval --output_path (or a subfolder / one samples_<task>_*.jsonl) of the base model's run with --log_samples."),
    rl_samples: Path = typer.Option(..., "--rl-samples", help="The same for the RL (tuned) model's run, over the same tasks, documents and prompts."),
    out: Path = typer.Option(Path("critical.json"), "--out", help="Output JSON (format posttrain-probe/critical-samples)."),
    metric: str = typer.Option(None, "--metric", help="Metric deciding correctness (default: each task's primary metric, e.g. acc, exact_match)."),
    filter_name: str = typer.Option(None, "--filter", help="lm-eval filter whose records are used (default: each task's first, e.g. none, strict-match)."),
    samples_out: Path = typer.Option(None, "--samples-out", help="Also write {task: G_t doc ids} (tasks with |G_t| > 0) as JSON, for lm-eval's --samples FILE."),
) -> None:
    """Generalization-critical samples G_t (paper R): per task, the documents the base model gets wrong and the RL model right."""
    from posttrain_probe.analysis.critical import critical_samples

    result = critical_samples(base_samples, rl_samples, metric=metric, filter_name=filter_name)
    for task, entry in sorted(result.tasks.items()):
        typer.echo(
            f"{task}: |G_t| = {entry.n_critical} of {entry.n_docs} docs ({entry.metric}, filter {entry.filter}; "
            f"base correct {entry.n_base_correct}, RL correct {entry.n_rl_correct})"
        )
        typer.echo(f"  base: {os.path.relpath(entry.base_file)}\n  RL:   {os.path.relpath(entry.rl_file)}")
    if result.no_critical:
        typer.echo(f"no critical samples (|G_t| = 0): {', '.join(result.no_critical)}")
    if not result.doc_ids:
        typer.echo("warning: no task has critical samples", err=True)
    typer.echo(f"written to {result.write(out)}")
    if samples_out is not None:
        samples_out.parent.mkdir(parents=True, exist_ok=True)
        samples_out.write_text(json.dumps(result.doc_ids))
        typer.echo(f"G_t doc ids for lm-eval --samples: {samples_out}")
