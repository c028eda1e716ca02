"""CLI: ``lm-eval`` (lm-eval's own CLI with the ``probe-hf`` model and the shipped tasks) and
``critical`` (generalization-critical samples G_t of two runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval import PROBE_MODEL_NAME, register
from posttrain_probe.models import parse_model_specs

_LM_EVAL_HELP = """Run lm-eval's own command line with the `probe-hf` model registered and posttrain-probe's tasks on the include path.

Every argument goes to lm-eval unchanged (`posttrain-probe lm-eval ARGS` = `lm-eval ARGS`): --tasks, --model_args,
--include_path, --log_samples, --output_path, --limit, --samples, --apply_chat_template, subcommands `run` / `ls` / `validate`.
`posttrain-probe lm-eval --help` shows lm-eval's help. The exit code is lm-eval's.

\b
--model probe-hf takes HFLM's model_args plus:
  crosscoder=DIR          crosscoder (or SAE) directory; without it probe-hf is plain `hf`
  features=F              feature-set JSON, category, or indices 3;17;42 (';' since ',' separates model_args)
  mode=M                  zero (default) | set | scale | add | steer
  value=V                 set: code value (default 3.0); scale: factor; add: delta; steer: x max activation (default 2.0)
  model_name=NAME         crosscoder branch whose per-source code is edited
  positions=P             all (default) | prompt | last_prompt
  reference=DATASET       steer: corpus of the max activations (dataset spec as for `collect`)

\b
Offline tasks shipped with posttrain-probe: probe_mcq (multiple choice), probe_math (generate_until, boxed answer).

\b
Example:
  posttrain-probe lm-eval --model probe-hf --tasks probe_mcq,arc_challenge --batch_size 8 --log_samples --output_path out/rl-zero \\
      --model_args pretrained=runs/rl,crosscoder=runs/cc,features=runs/feats.json,mode=zero,model_name=rl
"""


def _with_include_path(args: Any) -> None:
    """Put the shipped task folder on ``args.include_path`` (a list, which lm-eval's TaskManager
    takes), keeping the user's ``--include_path`` (or the one of a ``--config`` YAML)."""
    from posttrain_probe.eval import task_include_paths

    user = getattr(args, "include_path", None)
    if user is None and getattr(args, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        user = EvaluatorConfig.load_yaml_config(args.config).get("include_path")
    args.include_path = task_include_paths(user)


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's CLI (the ``lm_eval`` console command: ``HarnessCLI`` parse + execute) on
    ``argv`` with ``probe-hf`` registered and the shipped tasks discoverable; returns lm-eval's
    exit code (0 on success, argparse's 2 on bad arguments). lm-eval's own exceptions propagate."""
    register()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv (it inserts `run` for the legacy form)
    try:
        parser = HarnessCLI()
        try:
            args = parser.parse_args()
        except SystemExit as stop:  # --help, or bad arguments (argparse has printed why)
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved
    if hasattr(args, "include_path"):
        _with_include_path(args)
    if getattr(args, "model", None) == PROBE_MODEL_NAME and isinstance(getattr(args, "model_args", None), dict):
        # Fail on bad intervention arguments now, not after indexing tasks and loading the model.
        from posttrain_probe.eval.lm_eval_model import INTERVENTION_ARGS, check_intervention_args

        check_intervention_args(**{k: v for k, v in args.model_args.items() if k in INTERVENTION_ARGS})
    if getattr(args, "model", None) in (PROBE_MODEL_NAME, "hf") and isinstance(getattr(args, "model_args", None), dict):
        _check_hf_model_args(args.model_args, args.model)
    try:
        parser.execute(args)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except ValueError as err:
        if "Tasks not found" in str(err):
            raise ProbeError(f"{err}: expected lm-eval task or group names (list them with `posttrain-probe lm-eval ls tasks`)") from None
        raise
    except OSError as err:  # a hub name that cannot be fetched (offline, or no such repository)
        raise ProbeError(f"lm-eval could not load a model or file: {str(err).splitlines()[0]}") from None
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ProbeError(f"--model_args: {err} (HF from_pretrained refused a key; check its spelling)") from None
        raise
    return 0


def _check_hf_model_args(model_args: dict[str, Any], model: str) -> None:
    """Fail before any task indexing or model loading: ``pretrained`` missing or a local path that does
    not exist, or a key that is a misspelling of one of probe-hf's / HFLM's own arguments."""
    import difflib
    import inspect

    from lm_eval.models.huggingface import HFLM

    from posttrain_probe.eval.lm_eval_model import INTERVENTION_ARGS
    from posttrain_probe.models import check_model_path

    if "pretrained" not in model_args:
        raise ProbeError(f"--model_args for {model} needs pretrained=PATH_OR_HUB_NAME, got keys {sorted(model_args)}")
    check_model_path(model_args["pretrained"], "pretrained")
    known = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    if model == PROBE_MODEL_NAME:
        known |= set(INTERVENTION_ARGS)
    for key in model_args:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ProbeError(f"--model_args key {key!r} is not an argument of {model}; did you mean {close[0]!r}?")


LM_EVAL_COMMAND = dict(
    help=_LM_EVAL_HELP,
    short_help="lm-eval's CLI with the probe-hf model (feature interventions) and the offline tasks.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
"""typer settings of the ``lm-eval`` command: every argument is passed through to lm-eval."""


@user_errors
def lm_eval_command(ctx: typer.Context) -> None:
    argv = list(ctx.args)
    if not argv or any(a in ("-h", "--help") for a in argv):
        typer.echo(_LM_EVAL_HELP.replace("\b\n", ""))
        typer.echo("lm-eval's help follows.\n")
        if not argv:
            argv = ["--help"]
    code = run_lm_eval(argv)
    if code:
        raise typer.Exit(code)


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
