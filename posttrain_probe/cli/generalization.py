"""CLI: ``posttrain-probe critical`` and ``posttrain-probe features generalization`` (docs/methods.md sec. 6).

Usage::

    posttrain-probe critical --base-samples runs/eval/base --rl-samples runs/eval/rl --out runs/critical.json
    posttrain-probe features generalization --crosscoder runs/cc --base base --rl rl --critical runs/critical.json \\
        --model base=Qwen/Qwen3-4B-Base --model rl=runs/grpo/final --out runs/genfeat
    posttrain-probe features generalization --config genfeat.yaml   # keys: the GeneralizationConfig fields
"""

from __future__ import annotations

import os

import typer

from posttrain_probe.analysis.critical_config import CriticalConfig
from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.eval.generalization_config import GeneralizationConfig


@user_errors
@config_options(config=GeneralizationConfig)
def features_generalization(config: GeneralizationConfig) -> None:
    """Generalization-controlling features (paper R sec. 3.2): Score_k^t at the last prompt token of G_t, S_t, their intersection and overlap."""
    from posttrain_probe.eval.generalization import FEATURE_SET_NAME, SCORES_NAME, SUMMARY_NAME
    from posttrain_probe.eval.generalization import features_generalization as step

    result = step(config, progress=True)
    split = result.settings.get("split_half")
    for task, top in result.max_scores.items():
        size = (
            f"{result.n_critical[task]} (selection half; {len(split['held_out_doc_ids'][task])} held out)"
            if split
            else result.n_critical[task]
        )
        typer.echo(f"{task}: |G_t| = {size}, max score {top:.4g}, |S_t| = {len(result.sets[task])}")
    for task in result.skipped:
        typer.echo(f"{task}: no generalization-critical samples, skipped")
    typer.echo(f"|S| = {len(result.intersection)} (intersection over {', '.join(result.tasks)})")
    for note in result.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    out = config.out
    typer.echo(
        f"feature set: {out / FEATURE_SET_NAME}; summary: {out / SUMMARY_NAME}; scores: {out / SCORES_NAME}; figures: {out / 'overlap.png'}, {out / 'overlap.svg'}"
    )


@user_errors
@config_options(config=CriticalConfig)
def critical(config: CriticalConfig) -> None:
    """Generalization-critical samples G_t (paper R): per task, the documents the base model gets wrong and the RL model right."""
    from posttrain_probe.analysis.critical import critical as step

    result = step(config)
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
    typer.echo(f"written to {config.out}")
    if config.samples_out is not None:
        typer.echo(f"G_t doc ids for lm-eval --samples: {config.samples_out}")
