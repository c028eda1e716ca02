"""What every command module of the CLI uses: user errors as one line on stderr with exit code 2."""

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
