"""CLI: ``testing make-models`` (offline tiny models for the demo and tests)."""

from __future__ import annotations

from pathlib import Path

import typer

from posttrain_probe.cli.common import user_errors


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
