"""CLI: ``lm-eval`` (lm-eval's own CLI with the ``probe-hf`` model and the shipped tasks) and ``intervene``
(a feature intervention's effect on the generalization-critical samples G_t, :class:`InterveneConfig`)."""

from __future__ import annotations

import sys
from typing import Any

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval import PROBE_MODEL_NAME, register
from posttrain_probe.eval.intervene_config import InterveneConfig

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


def _raise_unknown_task(args: Any) -> None:
    """After lm-eval found no task of ``args.tasks``: :func:`~posttrain_probe.eval.runner.check_task_names` on the
    plain names (not YAML files or folders), which raises a one-line ProbeError with the closest known names."""
    from posttrain_probe.eval.runner import check_task_names, make_task_manager

    tasks = args.tasks if isinstance(args.tasks, list) else str(args.tasks or "").split(",")
    names = [t.strip() for t in tasks if t.strip() and "/" not in t and not t.endswith((".yaml", ".yml"))]
    check_task_names(names, make_task_manager(names, getattr(args, "include_path", None)))


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
            _raise_unknown_task(args)  # one line naming the first unknown name and the closest known ones
            raise ProbeError(
                f"{str(err).splitlines()[0]}: expected lm-eval task or group names (list them with `posttrain-probe lm-eval ls tasks`)"
            ) from None
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
@config_options(config=InterveneConfig)
def intervene(config: InterveneConfig) -> None:
    """Intervene on features and report the change on generalization-critical samples (paper R tables 2-5), beside frequency-matched random controls."""
    from posttrain_probe.eval.effects import control_summary_lines, format_effects_table, paper_table
    from posttrain_probe.eval.intervention_effects import intervene as run_intervene

    effects = run_intervene(config)
    typer.echo(format_effects_table(effects))
    typer.echo("")
    typer.echo(paper_table(effects))
    for line in control_summary_lines(effects):
        typer.echo(line)
    for note in effects.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    out = config.out
    typer.echo(f"written: {out / 'effects.json'}, {out / 'effects.csv'}, {out / 'effects.md'}")
