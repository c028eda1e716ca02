"""``posttrain-probe features fisher``: Fisher reasoning features (paper S), rho distributions and ReasonScore.

Usage::

    posttrain-probe features fisher --crosscoder runs/cc --model base=Qwen/Qwen3-4B-Base --model sft=runs/sft \\
        --select-model sft --dataset open-thoughts/OpenThoughts-114k --max-docs 2000 --out runs/fisher
    posttrain-probe features fisher --sae runs/sae --model distill=deepseek-ai/DeepSeek-R1-Distill-Llama-8B \\
        --dataset traces.jsonl --format delimiters --reasoning-delimiters '<think>' '</think>' \\
        --solution-delimiters '</think>' '' --out runs/fisher
    posttrain-probe features fisher --config fisher.yaml   # keys: the FisherConfig fields, segments: a section
"""

from __future__ import annotations

import math

import typer

from posttrain_probe.analysis.fisher_config import FisherConfig
from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options


@user_errors
@config_options(config=FisherConfig)
def fisher(config: FisherConfig) -> None:
    """Fisher reasoning features (paper S eq. 1): E_r[f^2] / max(E_s[f^2], 1e-8) with a magnitude floor, top-k; rho distributions per model; ReasonScore baseline."""
    from posttrain_probe.analysis.fisher import features_fisher

    report = features_fisher(config, progress=True)
    docs, sel, stats = report.documents, report.selection, report.stats[report.select_model]
    typer.echo(
        f"{docs['n_docs']} documents ({docs['with_reasoning']} with reasoning, {docs['with_solution']} with solution, "
        f"{docs['cut_by_seq_len']} cut by --seq-len); tokens: {int(stats.n_tokens[0]):,} reasoning, {int(stats.n_tokens[1]):,} solution"
    )
    typer.echo(
        f"{report.select_model}: {len(sel.features)} features selected of {int(sel.candidates.sum())} candidates "
        f"({int(sel.live.sum())} live, floor {sel.floor:.4g}); best: "
        + ", ".join(f"{f} (ratio {float(sel.ratio[f]):.3g})" for f in sel.features[:5])
    )
    for name, rho in report.rho_summary().items():
        r, s, auc = rho["reasoning"], rho["solution"], rho["separation"]["auc_reasoning_above_solution"]
        typer.echo(
            f"rho {name}: reasoning mean {r.get('mean', math.nan):.3f}, solution mean {s.get('mean', math.nan):.3f}, AUC {auc:.3f}"
        )
        if "warning" in rho:
            typer.secho(f"warning: {name}: {rho['warning']}", fg=typer.colors.YELLOW, err=True)
    if report.reasonscore is not None:
        overlap = len(set(report.reasonscore.top(len(sel.features))) & set(sel.features))
        typer.echo(f"ReasonScore top-{len(sel.features)} overlaps the Fisher set in {overlap} features")
    out, fmt = config.out, config.table_format
    typer.echo(
        f"feature set: {out / 'fisher_features.json'}; table: {out / f'features.{fmt}'}; summary: {out / 'summary.json'}; figures: {out / 'rho.png'}, {out / 'rho.svg'}"
    )
