"""``posttrain-probe data prepare``: teacher traces kept by math-verify, as SFT and RL datasets over the same problems.

Usage::

    posttrain-probe data prepare --problems problems.jsonl --teacher deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
        --source-column source --n-tries 4 --out data/math
    posttrain-probe data prepare --config prepare.yaml   # keys: the DataPrepareConfig fields
"""

from __future__ import annotations

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.prepare.config import DataPrepareConfig


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@user_errors
@config_options(config=DataPrepareConfig)
def data_prepare(config: DataPrepareConfig) -> None:
    """Rejection-sample teacher traces (math-verify against the gold answer); write sft.jsonl and rl.jsonl over the same problems, and provenance.json."""
    from posttrain_probe.prepare.prepare import data_prepare as run

    result = run(config, progress=True)
    overall = result.acceptance["overall"]
    typer.echo(
        f"teacher {result.provenance['teacher']['model']} ({result.provenance['teacher']['backend']}): "
        f"{overall['accepted']}/{overall['generated']} traces accepted ({_rate(overall['acceptance'])}); "
        f"{overall['problems_kept']}/{overall['problems']} problems kept"
        + (
            f"; {overall['gold_unparseable']} skipped (gold answer does not parse)"
            if overall["gold_unparseable"]
            else ""
        )
    )
    by_source = result.acceptance["by_source"]
    if len(by_source) > 1:
        for source, counts in by_source.items():
            typer.echo(
                f"  {source}: {counts['accepted']}/{counts['generated']} accepted ({_rate(counts['acceptance'])}), "
                f"{counts['problems_kept']}/{counts['problems']} problems kept"
            )
    out = config.out
    typer.echo(
        f"sft: {out / 'sft.jsonl'} ({len(result.sft)} rows); rl: {out / 'rl.jsonl'} ({len(result.rl)} rows); provenance: {out / 'provenance.json'}"
    )
