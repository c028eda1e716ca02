"""CLI: ``crosscoder train``, ``crosscoder info``, ``crosscoder calibrate`` and ``crosscoder sweep-k``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.crosscoder.config import CalibrateConfig, CrosscoderTrainConfig, SweepKConfig


@user_errors
@config_options(config=CrosscoderTrainConfig)
def crosscoder_train(config: CrosscoderTrainConfig) -> None:
    """Train a crosscoder on paired activation stores (--acts) or live model forwards (--model ... --dataset)."""
    from posttrain_probe.crosscoder.run import crosscoder_train as train

    run = train(config)
    for problem in run.warnings or []:
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)
    if not run.complete:
        typer.echo(f"stopped at step {run.step} of {run.total_steps}: continue with --resume")
    typer.echo(f"crosscoder: {run.out}")


@user_errors
def crosscoder_info(
    path: Path = typer.Argument(..., help="Crosscoder directory (config.json + model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Models, layer, size, normalisation scales, dead features and last training metrics of a crosscoder."""
    from posttrain_probe.crosscoder.inspect import crosscoder_summary

    info = crosscoder_summary(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:>18}: {value}")


@user_errors
@config_options(config=CalibrateConfig)
def crosscoder_calibrate(
    config: CalibrateConfig, as_json: bool = typer.Option(False, "--json", help="Print JSON.")
) -> None:
    """Calibrate one BatchTopK inference threshold per model so per-source codes f^m have mean L0 = k (their fingerprint changes)."""
    from posttrain_probe.crosscoder.calibrate import crosscoder_calibrate as calibrate

    report = calibrate(config)
    before, after = report.fingerprint_before[:12], report.fingerprint_after[:12]
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    elif report.cleared:
        typer.echo(f"{report.crosscoder}: per-source thresholds removed (fingerprint {before} -> {after})")
    else:
        typer.echo(
            f"per-source thresholds on {report.n_tokens:,} tokens (target mean L0 k = {report.k}; joint threshold {report.joint_threshold:.4g}):"
        )
        for name, theta, l0_joint, l0_calibrated in zip(
            report.model_names, report.thresholds, report.l0_joint_threshold, report.l0_calibrated
        ):
            typer.echo(
                f"  {name}: theta {theta:.4g}; per-source L0 {l0_joint:.2f} with the joint threshold -> {l0_calibrated:.2f}"
            )
        typer.echo(
            f"written to {report.crosscoder}; fingerprint {before} -> {after}: feature sets made for the uncalibrated crosscoder are refused "
            "for it (remake them, or keep the uncalibrated copy with --out)"
        )


@user_errors
@config_options(config=SweepKConfig)
def crosscoder_sweep_k(config: SweepKConfig) -> None:
    """Train a BatchTopK crosscoder per k on the same data and print held-out FVU, train/inference L0 and dead fraction."""
    from posttrain_probe.crosscoder.sweep import crosscoder_sweep_k as sweep

    result = sweep(config)
    typer.echo(f"k sweep on {result.held_out_tokens:,} held-out tokens:")
    typer.echo(result.table())
    typer.echo(f"runs and sweep.json: {result.out}")
