"""CLI: ``posttrain-probe features generalization`` (docs/methods.md sec. 6) and ``posttrain-probe intervene`` (docs/methods.md sec. 7)."""

from __future__ import annotations

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


@user_errors
def intervene(
    features: str = typer.Option(..., "--features", help="Feature set: a feature-set JSON (e.g. generalization_features.json) or indices 3,17,42."),
    crosscoder: Optional[Path] = typer.Option(None, "--crosscoder", help="Crosscoder directory the features belong to (default: the one the feature-set JSON records)."),
    model: list[str] = typer.Option(..., "--model", help="NAME=PATH: the evaluated model; NAME is its crosscoder branch (the intervention's model_name)."),
    mode: str = typer.Option(..., "--mode", help="zero | set | scale | add | steer (paper R: zero in the RL model, set 3.0 in the base model)."),
    critical: Path = typer.Option(..., "--critical", help="critical.json from `posttrain-probe critical` (G_t per task)."),
    out: Path = typer.Option(..., "--out", help="Output directory: effects.json, effects.csv, effects.md, lm-eval logs under lm_eval/."),
    value: Optional[float] = typer.Option(None, "--value", help="set: the value (default 3.0); scale: factor; add: delta; steer: multiple of the max activation (default 2.0)."),
    positions: str = typer.Option("all", "--positions", help="Where to intervene: all, prompt or last_prompt."),
    role: Optional[str] = typer.Option(None, "--role", help="rl (acc_before = 100% on G_t) or base (0%); default: from the feature set's provenance (its base/rl branch names)."),
    tasks: list[str] = typer.Option([], "--tasks", help="Tasks (repeat or comma-separate; default: every task of --critical)."),
    held_out_tasks: list[str] = typer.Option([], "--held-out-tasks", help="Tasks not used to select the features (evaluated too, flagged held out)."),
    full_task: bool = typer.Option(False, "--full-task", help="Also evaluate the whole tasks before and after (accuracy in %)."),
    include_path: list[str] = typer.Option([], "--include-path", help="lm-eval task folder(s) besides the shipped ones (as lm-eval's --include_path)."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="Extra lm-eval HF model_args for both runs, k=v,k=v (use those of the critical runs, e.g. dtype=bfloat16)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference corpus (dataset spec): steer's max activations and the controls' firing rates (controls default: the G_t prompts)."),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template", help="As lm-eval's --apply_chat_template (if the critical runs used it)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="As lm-eval's --num_fewshot (if the critical runs set it)."),
    batch_size: str = typer.Option("8", "--batch-size", help="lm-eval batch size (an int or auto)."),
    device: str = typer.Option("cpu", "--device", help="lm-eval device (cpu, cuda, cuda:0)."),
    controls: int = typer.Option(5, "--controls", metavar="N", help="Frequency-matched random feature sets of the same size, one per seed, each evaluated like the selected set (0: none)."),
    control_seed: int = typer.Option(0, "--control-seed", help="First control seed (seeds SEED .. SEED+N-1): the same seed draws the same sets."),
    control_bins: int = typer.Option(10, "--control-bins", help="Equal-count firing-rate bins of the live features for the matching (fewer are used, with a note, if a bin runs short)."),
    per_feature: bool = typer.Option(False, "--per-feature", help="Also intervene on each feature alone: one row per task and feature (one lm-eval run per feature)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Evaluate even when --model is not the model its crosscoder branch was trained on (nor tuned from it); recorded in effects.json."),
) -> None:
    """Intervene on features and report the change on generalization-critical samples (paper R tables 2-5), beside frequency-matched random controls."""
    from posttrain_probe.analysis.generalization import split_names
    from posttrain_probe.eval.intervention_effects import (
        control_summary_lines,
        format_effects_table,
        intervention_effects,
        paper_table,
    )

    if crosscoder is None:
        crosscoder = _recorded_crosscoder(features)
    models = _inputs(crosscoder, critical, model, allow_incomplete)
    if len(models) != 1:
        raise ProbeError(f"--model: intervene evaluates one model, got {len(models)} ({', '.join(models)})")
    extra = _parse_model_args(model_args)
    effects = intervention_effects(
        features, crosscoder, models, critical, mode=mode, value=value, positions=positions, role=role,
        tasks=split_names(tasks) or None, held_out_tasks=split_names(held_out_tasks), full_task=full_task,
        include_path=include_path or None, model_args=extra, reference=reference, apply_chat_template=apply_chat_template,
        num_fewshot=num_fewshot, batch_size=int(batch_size) if batch_size.isdigit() else batch_size, device=device, output_path=out / "lm_eval",
        control_seeds=controls, control_seed=control_seed, control_bins=control_bins, per_feature=per_feature,
        allow_model_mismatch=allow_model_mismatch,
    )
    files = effects.write(out)
    typer.echo(format_effects_table(effects))
    typer.echo("")
    typer.echo(paper_table(effects))
    for line in control_summary_lines(effects):
        typer.echo(line)
    for note in effects.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"written: {files['json']}, {files['csv']}, {files['table']}")


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


def _recorded_crosscoder(features: str) -> Path:
    """The crosscoder directory a feature-set JSON records (``--crosscoder`` left out)."""
    from posttrain_probe.analysis.feature_sets import load_feature_set

    if not Path(features).is_file():
        raise ProbeError(f"--features {features!r} is not a feature-set file: give --crosscoder DIR with feature indices")
    recorded = load_feature_set(features).crosscoder
    if not recorded:
        raise ProbeError(f"the feature set {features} records no crosscoder: give --crosscoder DIR")
    if not Path(recorded).exists():
        raise ProbeError(f"the crosscoder {recorded} that {features} records does not exist here: give --crosscoder DIR")
    return Path(recorded)


def _parse_model_args(text: Optional[str]) -> dict:
    """``"dtype=bfloat16,add_bos_token=True"`` -> dict, parsed as lm-eval parses ``--model_args`` (typed values)."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    bad = [part for part in text.split(",") if "=" not in part or not part.partition("=")[0].strip()]
    if bad:
        raise ProbeError(f"--model-args {text!r}: {bad[0]!r} is not key=value; expected e.g. dtype=bfloat16,add_bos_token=True")
    return simple_parse_args_string(text)
