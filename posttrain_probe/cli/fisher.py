"""``posttrain-probe features fisher``: Fisher reasoning features (paper S), rho distributions and ReasonScore.

Usage::

    posttrain-probe features fisher --crosscoder runs/cc --model base=Qwen/Qwen3-4B-Base --model sft=runs/sft \\
        --select-model sft --dataset open-thoughts/OpenThoughts-114k --max-docs 2000 --out runs/fisher
    posttrain-probe features fisher --sae runs/sae --model distill=deepseek-ai/DeepSeek-R1-Distill-Llama-8B \\
        --dataset traces.jsonl --format delimiters --reasoning-delimiters '<think>' '</think>' \\
        --solution-delimiters '</think>' '' --out runs/fisher
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from posttrain_probe.cli.common import user_errors
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs


@user_errors
def fisher(
    crosscoder: Optional[Path] = typer.Option(None, "--crosscoder", help="Crosscoder directory: every --model NAME must be one of its branches."),
    sae: Optional[Path] = typer.Option(None, "--sae", help="Instead of --crosscoder: an SAE (1-model crosscoder) directory; every --model is encoded with it."),
    model: list[str] = typer.Option(..., "--model", help="NAME=PATH (local dir or hub name); repeat. rho is reported for every model."),
    select_model: Optional[str] = typer.Option(None, "--select-model", help="Model whose codes select the features (default: the first --model)."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset spec as for `collect` (local .jsonl/.parquet/..., a datasets name such as open-thoughts/OpenThoughts-114k)."),
    segment_format: str = typer.Option("openthoughts", "--format", help="openthoughts (<|begin_of_thought|>... tags), delimiters (--reasoning/--solution-delimiters) or columns (--reasoning/--solution-column)."),
    reasoning_delimiters: Optional[tuple[str, str]] = typer.Option(None, "--reasoning-delimiters", help="--format delimiters: BEGIN END of the reasoning segment (END '' = to the end)."),
    solution_delimiters: Optional[tuple[str, str]] = typer.Option(None, "--solution-delimiters", help="--format delimiters: BEGIN END of the solution segment (END '' = to the end)."),
    reasoning_column: Optional[str] = typer.Option(None, "--reasoning-column", help="--format columns: the reasoning text column (OpenThoughts metadata: deepseek_reasoning)."),
    solution_column: Optional[str] = typer.Option(None, "--solution-column", help="--format columns: the solution text column (OpenThoughts metadata: deepseek_solution)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="--format columns: optional column put first, in no segment (e.g. problem)."),
    separator: str = typer.Option("\n\n", "--separator", show_default=False, help="--format columns: text between prompt, reasoning and solution (default: a blank line)."),
    column: Optional[str] = typer.Option(None, "--column", help="openthoughts/delimiters: chat or text column (default: conversations, messages, text, ...)."),
    top_k: int = typer.Option(50, "--top-k", help="Number of features selected."),
    floor_quantile: float = typer.Option(0.9, "--floor-quantile", help="Magnitude floor: this quantile of E_reasoning[f^2] over live features (0.9 = top decile)."),
    floor: Optional[float] = typer.Option(None, "--floor", help="Absolute magnitude floor on E_reasoning[f^2] (code units squared); overrides --floor-quantile."),
    reasonscore: bool = typer.Option(True, "--reasonscore/--no-reasonscore", help="Also compute the ReasonScore baseline (Galichin et al. 2025) on the select model."),
    alpha: float = typer.Option(0.7, "--alpha", help="ReasonScore: entropy exponent (paper: 0.7)."),
    reason_words: Optional[Path] = typer.Option(None, "--reason-words", help="ReasonScore: JSON list of word variants instead of the paper's (e.g. [\" Wait\", \"Hmm\"])."),
    out: Path = typer.Option(..., "--out", help="Output directory: fisher_features.json, reasonscore_features.json, features.csv, rho.csv, summary.json, rho.png/.svg."),
    max_docs: int = typer.Option(1000, "--max-docs", help="Documents read (the first N rows; 0: all)."),
    seq_len: int = typer.Option(4096, "--seq-len", help="Tokens per document (longer ones are truncated; documents with cut segments are counted: raise it if many are)."),
    forward_batch_size: int = typer.Option(4, "--forward-batch-size", help="Documents per model forward."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Site L (default: the crosscoder's layer; another layer is refused)."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    dataset_config: Optional[str] = typer.Option(None, "--dataset-config", help="Dataset config name (e.g. metadata for OpenThoughts-114k's column layout)."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype (auto: bfloat16 on GPU, float32 on CPU)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the models (default: cuda if available)."),
    table_format: str = typer.Option("csv", "--table-format", help="Tables: csv or parquet."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Encode even a --model that is not the model its branch was trained on (nor tuned from it); recorded in summary.json."),
) -> None:
    """Fisher reasoning features (paper S eq. 1): E_r[f^2] / max(E_s[f^2], 1e-8) with a magnitude floor, top-k; rho distributions per model; ReasonScore baseline."""
    from posttrain_probe.analysis.fisher import SegmentFormat, fisher_features

    if (crosscoder is None) == (sae is None):
        raise ProbeError("give exactly one of --crosscoder DIR and --sae DIR")
    path = crosscoder if crosscoder is not None else sae
    if not path.exists():
        raise ProbeError(f"--{'crosscoder' if crosscoder is not None else 'sae'} {path} does not exist")
    if max_docs < 0:
        raise ProbeError(f"--max-docs must be >= 0 (0: all documents), got {max_docs}")
    if table_format not in ("csv", "parquet"):
        raise ProbeError(f"--table-format {table_format!r}: expected csv or parquet")
    words = None
    if reason_words is not None:
        try:
            words = json.loads(reason_words.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read --reason-words {reason_words}: {err}") from err
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ProbeError(f"--reason-words {reason_words} must hold a JSON list of strings")
    fmt = SegmentFormat(
        format=segment_format, reasoning_delimiters=reasoning_delimiters, solution_delimiters=solution_delimiters,
        reasoning_column=reasoning_column, solution_column=solution_column, prompt_column=prompt_column,
        separator=separator, column=column,
    )
    from posttrain_probe.crosscoder.inspect import require_complete

    for given in (crosscoder, sae):
        if given is not None and Path(given).exists():
            require_complete(given, allow_incomplete)
    report = fisher_features(
        path, parse_model_specs(model), dataset, sae=sae is not None, select_model=select_model, segment_format=fmt,
        top_k=top_k, floor_quantile=floor_quantile, floor=floor, layer=layer, max_docs=max_docs or None, seq_len=seq_len,
        forward_batch_size=forward_batch_size, split=split, dataset_config=dataset_config, model_dtype=dtype,
        device=device, reasonscore=reasonscore, alpha=alpha, reason_tokens=words, progress=True, allow_model_mismatch=allow_model_mismatch,
    )
    files = report.write(out, table_format=table_format)
    summary = report.summary()
    part, docs = summary["fisher"], summary["documents"]
    typer.echo(
        f"{docs['n_docs']} documents ({docs['with_reasoning']} with reasoning, {docs['with_solution']} with solution, "
        f"{docs['cut_by_seq_len']} cut by --seq-len); tokens: {docs['tokens']['reasoning']:,} reasoning, {docs['tokens']['solution']:,} solution"
    )
    typer.echo(
        f"{part['model']}: {part['n_selected']} features selected of {part['n_candidates']} candidates "
        f"({part['n_live']} live, floor {part['floor']:.4g}); best: "
        + ", ".join(f"{row['feature']} (ratio {row['importance_ratio']:.3g})" for row in part["selected"][:5])
    )
    for name, rho in summary["rho"]["models"].items():
        r, s = rho["reasoning"], rho["solution"]
        typer.echo(f"rho {name}: reasoning mean {r.get('mean', float('nan')):.3f}, solution mean {s.get('mean', float('nan')):.3f}, AUC {rho['separation']['auc_reasoning_above_solution'] or float('nan'):.3f}")
        if "warning" in rho:
            typer.secho(f"warning: {name}: {rho['warning']}", fg=typer.colors.YELLOW, err=True)
    if "reasonscore" in summary:
        rs = summary["reasonscore"]
        typer.echo(f"ReasonScore top-{rs['top_k']} overlaps the Fisher set in {rs['overlap_with_fisher']} features")
    typer.echo(f"feature set: {files['feature_set']}; table: {files['table']}; summary: {files['summary']}; figures: {', '.join(files['figures'])}")
