"""The ``posttrain-probe`` command line (typer): the root app and its sub-apps.

This module is the only one that knows every command: it imports the command modules (one per
group of steps) and registers their functions. Command modules import :mod:`posttrain_probe.cli.common`
and :mod:`posttrain_probe.cli.options`, never this module. Heavy imports sit inside the commands.
"""

from __future__ import annotations

import typer

from posttrain_probe.cli import (
    activations,
    analysis,
    blocking,
    crosscoder,
    data,
    eval,
    fisher,
    generalization,
    study,
    testing,
)
from posttrain_probe.process_group import end_process_group


def _after_command(*results: object, **_params: object) -> object:
    """After a command succeeded: destroy the process group that torchrun / accelerate launch gave it; passes
    the command's return value on (``app(args, standalone_mode=False)`` returns it)."""
    end_process_group()
    return results[0] if results else None


app = typer.Typer(
    help="posttrain-probe: observe and steer LLM post-training at the level of sparse features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    result_callback=_after_command,
)
store_app = typer.Typer(help="Inspect activation stores.", no_args_is_help=True)
crosscoder_app = typer.Typer(help="Train and inspect N-model sparse crosscoders.", no_args_is_help=True)
testing_app = typer.Typer(help="Offline tiny models and data (demo, tests).", no_args_is_help=True)
data_app = typer.Typer(
    help="Prepare training data: teacher traces for SFT and RL over the same problems.", no_args_is_help=True
)
features_app = typer.Typer(
    help="Find the features that matter: generalization-controlling (paper R) and Fisher reasoning features (paper S).",
    no_args_is_help=True,
)
app.add_typer(store_app, name="store")
app.add_typer(features_app, name="features")
app.add_typer(crosscoder_app, name="crosscoder")
app.add_typer(data_app, name="data")
app.add_typer(testing_app, name="testing")


def _version(value: bool) -> None:
    if value:
        from posttrain_probe import __version__

        typer.echo(f"posttrain-probe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """posttrain-probe: observe and steer LLM post-training at the level of sparse features."""


app.command("study")(study.study)
app.command("demo")(study.demo)
app.command("report")(study.report)
app.command("collect")(activations.collect)
store_app.command("info")(activations.store_info)
crosscoder_app.command("train")(crosscoder.crosscoder_train)
crosscoder_app.command("info")(crosscoder.crosscoder_info)
crosscoder_app.command("calibrate")(crosscoder.crosscoder_calibrate)
crosscoder_app.command("sweep-k")(crosscoder.crosscoder_sweep_k)
app.command("analyze")(analysis.analyze)
app.command("dynamics")(analysis.dynamics)
app.command("critical")(generalization.critical)
app.command("lm-eval", **eval.LM_EVAL_COMMAND)(eval.lm_eval_command)
features_app.command("generalization")(generalization.features_generalization)
features_app.command("fisher")(fisher.fisher)
app.command("intervene")(eval.intervene)
app.command("leakage")(blocking.leakage)
testing_app.command("make-models")(testing.make_models)
data_app.command("prepare")(data.data_prepare)
