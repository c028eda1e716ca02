"""CLI: ``study`` (the whole study from one YAML file), ``demo`` (the study on the embedded CPU world) and
``report`` (rebuild the report of a study directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from posttrain_probe.cli.common import user_errors


def _run(config: Path, out: Optional[Path], stage: Optional[str], dry_run: bool) -> None:
    from posttrain_probe.study.runner import run_study
    from posttrain_probe.study.stages import Study

    study = Study.load(config, out=out)
    result = run_study(study, stage=stage, dry_run=dry_run, echo=typer.echo)
    if dry_run:
        return
    _print_timings(result)
    if result.report is not None:
        typer.echo(f"report: {result.report}")


def _print_timings(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stage timings", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for record in result.stages:
        table.add_row(record.name, record.status, f"{record.elapsed_s:.1f}")
    table.add_row("total (this run)", "", f"{result.elapsed_s:.1f}")
    Console().print(table)


@user_errors
def study(
    config: Path = typer.Option(..., "--config", help="Study file (YAML): a section per stage kind (docs/study.md)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Study directory (default: study.out, else studies/<name>)."
    ),
    stage: Optional[str] = typer.Option(None, "--stage", help="Run this stage only (its dependencies must be done)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (commands, inputs, outputs); run nothing."),
) -> None:
    """Run the study: SFT, RL, SFT+KL (and blocked SFT) from one base, evaluated, compared feature by feature,
    generalization features found and tested, all in a report. Finished stages are skipped."""
    _run(config, out, stage, dry_run)


@user_errors
def demo(
    out: Optional[Path] = typer.Option(
        None, "--out", help="Study directory (default: posttrain-probe-demo, with --quick posttrain-probe-demo-quick)."
    ),
    quick: bool = typer.Option(False, "--quick", help="The smallest world and runs (about a minute)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Run this stage only."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; run nothing."),
) -> None:
    """The whole study on a tiny embedded world, on this CPU, offline: a tiny base model pretrained on synthetic
    arithmetic and multiple-choice domains, then SFT, GRPO, SFT+KL and blocked SFT, and the report."""
    from posttrain_probe.study.demo import demo_config

    default = Path("posttrain-probe-demo-quick" if quick else "posttrain-probe-demo")
    _run(demo_config(quick), out or default, stage, dry_run)


@user_errors
def report(
    directory: Path = typer.Argument(..., help="A study directory (holds study.json)."),
) -> None:
    """Rebuild report.html and report.md of a study directory from what its stages wrote."""
    import json

    from posttrain_probe.config_io import config_from_mapping
    from posttrain_probe.errors import ProbeError
    from posttrain_probe.study.report import build_report
    from posttrain_probe.study.settings import ReportConfig

    info = directory / "study.json"
    if not info.exists():
        raise ProbeError(f"{directory} is not a study directory: study.json is missing")
    section = json.loads(info.read_text()).get("config", {}).get("report") or {}
    config = config_from_mapping(ReportConfig, section, source=f"{info} section report")
    html = build_report(directory, config)
    typer.echo(f"report: {html}")
