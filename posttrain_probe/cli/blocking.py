"""CLI: ``leakage`` (after gradient-blocked SFT: how much the protected features still moved).

Usage::

    posttrain-probe leakage --crosscoder runs/cc --base Qwen/Qwen3-4B-Base --blocked runs/sft-blocked \\
        --features shared --dataset synthetic:arithmetic --out runs/leakage [--blocked-crosscoder runs/cc-base-blocked]
    posttrain-probe leakage --config leakage.yaml   # keys: the LeakageConfig fields
"""

from __future__ import annotations

import typer

from posttrain_probe.analysis.leakage_config import LeakageConfig
from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options


@user_errors
@config_options(config=LeakageConfig)
def leakage(config: LeakageConfig) -> None:
    """After blocked training: how much the protected features still moved (relative activation change vs unprotected features; with --blocked-crosscoder, their NormRatio bands in a base-vs-blocked crosscoder)."""
    from posttrain_probe.analysis.leakage import leakage as run_leakage

    report = run_leakage(config, progress=True)
    relative = report.summary()["relative_change"]
    for name in ("protected", "unprotected"):
        group = relative[name]
        typer.echo(
            f"{name:>11}: {group['n_features']} features ({group['n_active_on_base']} active on base), relative change median {group['median']:.4g}, pooled {group['pooled']:.4g}"
        )
    median, pooled = (
        relative["median_ratio_protected_to_unprotected"],
        relative["pooled_ratio_protected_to_unprotected"],
    )
    typer.echo(f"protected / unprotected: median {median:.4g}, pooled {pooled:.4g}")
    part = report.crosscoder
    if part is not None:
        summary = part.summary()
        typer.echo(
            f"base-vs-blocked crosscoder: protected features by NormRatio band {summary['protected']['categories']}, left the shared band "
            f"{summary['protected']['left_shared_band']} of {summary['protected']['n_live']}; match quality {summary['matching']['quality']}"
        )
    out = config.out
    typer.echo(
        f"report: {out / 'leakage.json'}; table: {out / 'features.csv'}; figures: {out / 'leakage.png'}, {out / 'leakage.svg'}"
    )
