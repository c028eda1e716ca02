"""CLI: ``collect`` (activation stores) and ``store info``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.errors import ProbeError


@user_errors
@config_options(config=CollectConfig)
def collect(config: CollectConfig) -> None:
    """Capture residual-stream activations of several models on identical tokens into activation stores."""
    from accelerate import PartialState

    from posttrain_probe.activations.collect import collect as run_collect

    result = run_collect(config)
    if not PartialState().is_main_process:
        return
    for name, per_layer in result.stores.items():
        for site, path in per_layer.items():
            typer.echo(f"{name} layer {site}: {path}")


def _find_stores(path: Path) -> list[Path]:
    if (path / "manifest.json").exists() or any(path.glob("manifest.rank*.json")):
        return [path]
    found = sorted(
        {p.parent for p in path.rglob("manifest.json")} | {p.parent for p in path.rglob("manifest.rank*.json")}
    )
    if not found:
        raise ProbeError(f"no activation store under {path}: expected a directory with manifest.json")
    return found


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@user_errors
def store_info(
    path: Path = typer.Argument(..., help="A store directory, or a directory holding stores (e.g. a collect output)."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Check every shard's checksum (xxh3_128; sha256 in version-1 stores)."
    ),
    check_values: bool = typer.Option(
        False, "--check-values", help="Also read every shard and look for NaN/inf activations."
    ),
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
        for column in (
            "model",
            "layer",
            "tokens",
            "d_model",
            "dtype",
            "shards",
            "size",
            "complete",
            "checksums",
            "values",
            "fingerprint",
            "path",
        ):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["model"],
                str(row["layer"]),
                f"{row['n_tokens']:,}",
                str(row["d_model"]),
                row["dtype"],
                str(row["n_shards"]),
                _human_bytes(row["bytes"]),
                "yes" if row["complete"] else "no (resumable)",
                row["checksums"],
                row["values"],
                row["token_fingerprint"][:12],
                row["path"],
            )
        Console(width=200).print(table)
        for row in rows:
            for problem in row["problems"]:
                typer.secho(f"{row['path']}: {problem}", fg=typer.colors.RED, err=True)
    if any(row["problems"] for row in rows):
        raise typer.Exit(1)
