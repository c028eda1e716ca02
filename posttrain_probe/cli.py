"""The ``posttrain-probe`` command line (typer). Heavy imports sit inside the commands."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.cli_config import config_options
from posttrain_probe.crosscoder.config import CrosscoderConfig, CrosscoderTrainingConfig
from posttrain_probe.errors import ProbeError

app = typer.Typer(
    help="posttrain-probe: observe and steer LLM post-training at the level of sparse features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
store_app = typer.Typer(help="Inspect activation stores.", no_args_is_help=True)
crosscoder_app = typer.Typer(help="Train and inspect N-model sparse crosscoders.", no_args_is_help=True)
testing_app = typer.Typer(help="Offline tiny models and data (demo, tests).", no_args_is_help=True)
features_app = typer.Typer(help="Find the features that matter: generalization-controlling (paper R) and Fisher reasoning features (paper S).", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(features_app, name="features")
app.add_typer(crosscoder_app, name="crosscoder")
app.add_typer(testing_app, name="testing")


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print ProbeError as one line on stderr and exit 2, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ProbeError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from posttrain_probe import __version__

        typer.echo(f"posttrain-probe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """posttrain-probe: observe and steer LLM post-training at the level of sparse features."""


def parse_models(specs: list[str]) -> dict[str, str]:
    """``["base=PATH", "sft=PATH"]`` -> ``{"base": "PATH", "sft": "PATH"}`` (names unique)."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ProbeError(f"--model {spec!r}: expected NAME=PATH, e.g. --model base=Qwen/Qwen3-4B-Base")
        if name in models:
            raise ProbeError(f"--model name {name!r} is given twice")
        models[name] = path
    return models


@app.command()
@user_errors
@config_options(config=CollectConfig)
def collect(
    model: list[str] = typer.Option(..., "--model", help="NAME=PATH (local dir or hub name); repeat for every model."),
    dataset: str = typer.Option(..., "--dataset", help="Local .txt/.jsonl/.json/.parquet/.csv, a datasets name, or synthetic:<name>."),
    out: Path = typer.Option(..., "--out", help="Output directory: OUT/<name>/layer<L>/ per model and layer."),
    layer: list[int] = typer.Option([], "--layer", help="Site L (residual stream entering block L); repeat for several. Default n_layers // 2."),
    config: CollectConfig = None,  # type: ignore[assignment]
) -> None:
    """Capture residual-stream activations of several models on identical tokens into activation stores."""
    from posttrain_probe.activations.collect import collect_activations

    from accelerate import PartialState

    paths = collect_activations(parse_models(model), dataset, layer or None, out, config=config)
    if not PartialState().is_main_process:
        return
    for name, per_layer in paths.items():
        for site, path in per_layer.items():
            typer.echo(f"{name} layer {site}: {path}")


def _find_stores(path: Path) -> list[Path]:
    if (path / "manifest.json").exists() or any(path.glob("manifest.rank*.json")):
        return [path]
    found = sorted({p.parent for p in path.rglob("manifest.json")} | {p.parent for p in path.rglob("manifest.rank*.json")})
    if not found:
        raise ProbeError(f"no activation store under {path}: expected a directory with manifest.json")
    return found


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@store_app.command("info")
@user_errors
def store_info(
    path: Path = typer.Argument(..., help="A store directory, or a directory holding stores (e.g. a collect output)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every shard's sha256."),
    check_values: bool = typer.Option(False, "--check-values", help="Also read every shard and look for NaN/inf activations."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Models, layer, tokens, size and checksum status of activation stores. Exits 1 if a shard is bad."""
    from posttrain_probe.activations.manifest import read_manifest, shard_bytes, shard_problems

    if not path.exists():
        raise ProbeError(f"{path} does not exist")
    rows = []
    for store_path in _find_stores(path):
        manifest = read_manifest(store_path)
        problems = shard_problems(store_path, manifest) if verify else []
        value_problems = []
        if check_values and not problems:
            from posttrain_probe.activations.store import ActivationStore  # torch, only to read the values

            value_problems = ActivationStore(store_path, verify=False).check_values()
        problems += value_problems
        rows.append(
            {
                "path": str(store_path),
                "model": str(manifest.model["name"]),
                "model_path": manifest.model.get("path"),
                "layer": manifest.layer,
                "n_tokens": manifest.n_tokens,
                "d_model": manifest.d_model,
                "dtype": manifest.dtype,
                "n_shards": len(manifest.shards),
                "bytes": shard_bytes(store_path, manifest),
                "complete": manifest.complete,
                "token_fingerprint": manifest.token_fingerprint,
                "checksums": ("ok" if not problems else "BAD") if verify else "not checked",
                "values": ("ok" if not value_problems else "NaN/inf") if check_values else "not checked",
                "problems": problems,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"activation stores under {path}")
        for column in ("model", "layer", "tokens", "d_model", "dtype", "shards", "size", "complete", "checksums", "values", "fingerprint", "path"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["model"], str(row["layer"]), f"{row['n_tokens']:,}", str(row["d_model"]), row["dtype"],
                str(row["n_shards"]), _human_bytes(row["bytes"]), "yes" if row["complete"] else "no (resumable)",
                row["checksums"], row["values"], row["token_fingerprint"][:12], row["path"],
            )
        Console(width=200).print(table)
        for row in rows:
            for problem in row["problems"]:
                typer.secho(f"{row['path']}: {problem}", fg=typer.colors.RED, err=True)
    if any(row["problems"] for row in rows):
        raise typer.Exit(1)


@crosscoder_app.command("train")
@user_errors
@config_options(crosscoder=CrosscoderConfig, training=CrosscoderTrainingConfig)
def crosscoder_train(
    acts: list[str] = typer.Option([], "--acts", help="A collect output directory, or one store directory per model (repeat)."),
    model: list[str] = typer.Option([], "--model", help="Live training: NAME=PATH per model (repeat), with --dataset."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Live training: dataset spec as for `collect`."),
    seq_len: int = typer.Option(512, "--seq-len", help="Live training: tokens per document."),
    forward_batch_size: int = typer.Option(8, "--forward-batch-size", help="Live training: documents per model forward."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory of the crosscoder run."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    crosscoder: CrosscoderConfig = None,  # type: ignore[assignment]
    training: CrosscoderTrainingConfig = None,  # type: ignore[assignment]
) -> None:
    """Train a crosscoder on paired activation stores (--acts) or live model forwards (--model ... --dataset)."""
    from posttrain_probe.crosscoder.sources import open_source
    from posttrain_probe.crosscoder.train import train_crosscoder

    if out is None:
        raise ProbeError("--out is required (the directory of the crosscoder run)")
    source = open_source(
        acts=acts, models=parse_models(model) if model else None, dataset=dataset, layer=crosscoder.layer,
        model_names=crosscoder.model_names or None, seq_len=seq_len, forward_batch_size=forward_batch_size,
    )
    import warnings

    from posttrain_probe.crosscoder.inspect import training_status
    from posttrain_probe.crosscoder.train import CrosscoderQualityWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CrosscoderQualityWarning)  # printed below as plain lines
        train_crosscoder(source, crosscoder, training, out, resume=resume, overwrite=overwrite)
    status = training_status(out) or {}
    for problem in status.get("warnings", []):
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)
    if not status.get("complete", True):
        typer.echo(f"stopped at step {status['step']} of {status['total_steps']}: continue with --resume")
    typer.echo(f"crosscoder: {out}")


@crosscoder_app.command("info")
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


@app.command()
@user_errors
def analyze(
    crosscoder: Path = typer.Option(..., "--crosscoder", help="Crosscoder directory."),
    base: str = typer.Option("base", "--base", help="Name of the base model in the crosscoder."),
    out: Path = typer.Option(..., "--out", help="Output directory for the table, summary.json and figures."),
    acts: list[str] = typer.Option([], "--acts", help="Activations (as for `crosscoder train --acts`) for activation frequency / max / dead flags."),
    stats_tokens: int = typer.Option(1_000_000, "--stats-tokens", help="Tokens read from --acts for the activation statistics."),
    table_format: str = typer.Option("parquet", "--format", help="Feature table format: parquet or csv."),
    p: float = typer.Option(1.0, "--p", help="Norm order of NRN and MAS (1 = the paper's; 2 = relative decoder norm)."),
    norm_ratio_scale: str = typer.Option("all", "--norm-ratio-scale", help="NormRatio denominator: all (max decoder norm over every model slot, docs/methods.md) or pair (over the two compared models, paper S)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    duplicate_cosine: float = typer.Option(0.95, "--duplicate-cosine", help="Latents whose whole decoders have at least this cosine are duplicates: grouped, counted once in the *_dedup counts."),
) -> None:
    """Attribute crosscoder features to models: NRN, MAS, NormRatio, decoder cosine, categories, figures."""
    from posttrain_probe.analysis.report import analyze_crosscoder
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.crosscoder.sources import open_source

    cc = load_crosscoder(crosscoder, allow_incomplete=allow_incomplete)
    source = open_source(acts=acts, layer=cc.config.layer, model_names=cc.model_names) if acts else None
    result = analyze_crosscoder(cc, base=base, out_dir=out, source=source, stats_tokens=stats_tokens, table_format=table_format, p=p,
                                crosscoder_path=str(crosscoder), duplicate_cosine=duplicate_cosine, norm_ratio_scale=norm_ratio_scale)
    for name, counts in result["models"].items():
        typer.echo(f"{name} vs {base}: {counts['categories']} NRN tails {counts['nrn_tails']}; deduplicated {counts['categories_dedup']}")
    if result["liveness"] == "unknown":
        typer.secho("note: liveness unknown (no --acts, no training state): latents that never fire are counted as live; pass --acts", fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(f"liveness from {result['liveness']}: {result['n_dead']} of {result['n_features']} latents dead; {result['n_duplicate_groups']} distinct after grouping duplicates")
    typer.echo(f"table: {result['files']['table']}; summary: {out / 'summary.json'}; {len(result['files']['figures'])} figure files; feature sets in {out / 'feature_sets'}")


@app.command()
@user_errors
def dynamics(
    crosscoder: list[Path] = typer.Option(..., "--crosscoder", help="One multi-model crosscoder over base + checkpoints, or one two-model crosscoder per checkpoint (repeat, in training order)."),
    base: str = typer.Option("base", "--base", help="Name of the base model."),
    checkpoint: list[str] = typer.Option([], "--checkpoint", help="Checkpoint model names in order (multi-model crosscoder; default: all but --base)."),
    k: int = typer.Option(50, "--k", help="Size of the top-NRN feature sets."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    norm_floor: float = typer.Option(0.01, "--norm-floor", help="A score is undefined where both compared decoder norms are below this fraction of the crosscoder's largest one."),
    min_cosine: float = typer.Option(0.7, "--min-cosine", help="Per-checkpoint crosscoders: whole-decoder cosine below which a latent stays unmatched."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of unfinished crosscoder training runs."),
    tie_atol: float = typer.Option(1e-6, "--tie-atol", help="Scores within this distance of the k-th score tie with it (reported; an undetermined top-k is flagged)."),
) -> None:
    """Checkpoint dynamics: top-k NRN overlap matrix and rank shifts between consecutive checkpoints."""
    from posttrain_probe.analysis.report import checkpoint_dynamics
    from posttrain_probe.crosscoder.inspect import load_crosscoder, training_liveness

    models = [load_crosscoder(path, allow_incomplete=allow_incomplete) for path in crosscoder]
    lives = [training_liveness(path) for path in crosscoder]
    options = dict(base=base, k=k, out_dir=out, norm_floor=norm_floor, min_cosine=min_cosine, tie_atol=tie_atol)
    if len(models) == 1:
        result = checkpoint_dynamics(models[0], checkpoints=checkpoint or None, live=lives[0], **options)
    else:
        result = checkpoint_dynamics(crosscoders=models, labels=checkpoint or None, live=lives, **options)
    typer.echo(f"mean top-{k} overlap of consecutive checkpoints: {result['mean_adjacent_overlap']:.3f}; blanks {result['blanks']}")
    if result["matching"]:
        for label, quality in result["matching"].items():
            if quality is not None:
                typer.echo(f"matching {label}: {quality['n_matched']} matched (median cosine {quality['median']:.3f}), {quality['n_unmatched']} unmatched below {min_cosine}")
    for label in result["undetermined_top_k"]:
        tie = result["ties"][label]
        typer.secho(f"warning: top-{k} of {label} is not determined by the scores: {tie['n_tied']} latents tie at {tie['kth_score']:.6g}, {tie['n_tied_in_top']} of them inside", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"written to {out}")


@app.command()
@user_errors
@config_options(training=CrosscoderTrainingConfig)
def leakage(
    crosscoder: Path = typer.Option(..., "--crosscoder", help="The blocking crosscoder/SAE directory (block_crosscoder of the blocked run)."),
    base: str = typer.Option(..., "--base", help="Base model the blocked run started from (local dir or hub name)."),
    blocked: str = typer.Option(..., "--blocked", help="Model fine-tuned with gradient blocking (local dir or hub name)."),
    features: str = typer.Option(..., "--features", help="Protected features (block_features): shared, base-only, finetune-only, a feature-set JSON, or 3,17,42."),
    dataset: str = typer.Option(..., "--dataset", help="Tokens to compare on: a dataset spec as for `collect`."),
    out: Path = typer.Option(..., "--out", help="Output directory: leakage.json, features.csv, leakage.png/.svg (and crosscoder/)."),
    model_name: str = typer.Option("base", "--model-name", help="Crosscoder branch whose per-source codes define the features (block_model)."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="Branch a NormRatio category is computed against (default: the other model of a two-model crosscoder)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Site L (default: the crosscoder's layer; another layer is refused)."),
    max_tokens: int = typer.Option(100_000, "--max-tokens", help="Tokens compared (0: the whole dataset)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per document."),
    forward_batch_size: int = typer.Option(8, "--forward-batch-size", help="Documents per model forward."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    column: Optional[str] = typer.Option(None, "--column", help="Text or chat-messages column (default: text, messages, content, prompt, question)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the models (default: cuda if available)."),
    train_crosscoder: bool = typer.Option(False, "--train-crosscoder", help="Also train a base-vs-blocked crosscoder on the compared activations (OUT/crosscoder; --n-tokens, --lr, ... set its training) and report the NormRatio bands of the protected features."),
    blocked_crosscoder: Optional[Path] = typer.Option(None, "--blocked-crosscoder", help="Instead of --train-crosscoder: an already trained base-vs-blocked crosscoder."),
    n_features: Optional[int] = typer.Option(None, "--n-features", help="--train-crosscoder: dictionary size (default: the blocking crosscoder's)."),
    matching: str = typer.Option("hungarian", "--matching", help="Protected -> new crosscoder features by base-decoder cosine: hungarian (one-to-one) or argmax (large sets)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Accept the weights of an unfinished crosscoder training run."),
    norm_ratio_scale: str = typer.Option("all", "--norm-ratio-scale", help="NormRatio denominator of a category --features and of the base-vs-blocked bands: all (max over every model slot, docs/methods.md) or pair (the two compared models, paper S)."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch", help="Compare even when --base/--blocked is not the model --model-name was trained on (nor tuned from it); recorded in leakage.json."),
    training: CrosscoderTrainingConfig = None,  # type: ignore[assignment]
) -> None:
    """After blocked training: how much the protected features still moved (relative activation change vs unprotected features; optionally NormRatio of a base-vs-blocked crosscoder)."""
    from posttrain_probe.analysis.leakage import feature_leakage

    if not crosscoder.exists():
        raise ProbeError(f"--crosscoder {crosscoder} does not exist")
    from posttrain_probe.crosscoder.inspect import require_complete

    require_complete(crosscoder, allow_incomplete)
    if max_tokens < 0:
        raise ProbeError(f"--max-tokens must be >= 0 (0: the whole dataset), got {max_tokens}")
    report = feature_leakage(
        crosscoder, base, blocked, dataset, features, model_name=model_name, finetuned=finetuned, layer=layer,
        max_tokens=max_tokens or None, seq_len=seq_len, forward_batch_size=forward_batch_size, split=split, column=column,
        device=device, train_crosscoder=train_crosscoder, crosscoder_out=out / "crosscoder", n_features=n_features,
        training_config=training, blocked_crosscoder=blocked_crosscoder, matching=matching, norm_ratio_scale=norm_ratio_scale, progress=True,
        allow_model_mismatch=allow_model_mismatch,
    )
    files = report.write(out)
    summary = report.summary()
    rel = summary["relative_change"]
    for group in ("protected", "unprotected"):
        stats = rel[group]
        typer.echo(f"{group:>11}: {stats['n_features']} features ({stats['n_active_on_base']} active on base), relative change median {stats['median']:.4g}, pooled {stats['pooled']:.4g}")
    typer.echo(f"protected / unprotected: median {rel['median_ratio_protected_to_unprotected']:.4g}, pooled {rel['pooled_ratio_protected_to_unprotected']:.4g}")
    if "crosscoder" in summary:
        part = summary["crosscoder"]
        typer.echo(f"base-vs-blocked crosscoder: protected features by NormRatio band {part['protected']['categories']}, left the shared band {part['protected']['left_shared_band']} of {part['protected']['n_live']}; match quality {part['matching']['quality']}")
    typer.echo(f"report: {files['report']}; table: {files['table']}; figures: {', '.join(files['figures'])}")


@testing_app.command("make-models")
@user_errors
def make_models(
    out: Path = typer.Argument(..., help="Directory for OUT/base and OUT/tuned."),
    arch: str = typer.Option("qwen3", help="Architecture: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt2."),
    steps: int = typer.Option(20, help="Optimizer steps that turn the base model into the tuned one."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a tiny base model and a tuned copy of it (HF save_pretrained layout, offline)."""
    from posttrain_probe.testing import save_tiny_pair

    for name, path in save_tiny_pair(out, arch, seed=seed, steps=steps).items():
        typer.echo(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


# Commands defined in their own modules register themselves on `app` / `features_app` when imported.
from posttrain_probe import cli_crosscoder_calibrate, cli_eval, cli_fisher, cli_generalization  # noqa: E402,F401  (registration)
