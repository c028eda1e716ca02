"""Helpers every command module of the CLI uses: one-line errors and ``NAME=PATH`` model arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from posttrain_probe.errors import ProbeError


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

