"""Expose a config dataclass as typer options, so one dataclass backs the Python API and the CLI.

Fields become ``--field-name`` options with the field's default and its ``metadata["help"]``
(the HfArgumentParser/TrlParser convention, so the same dataclasses also parse YAML recipes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import typer


def _option_type(hint: Any) -> Any:
    """typer-friendly annotation: ``X | None`` becomes ``Optional[X]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return typing.Optional[args[0]]
    return hint


def config_options(config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command ``func(..., config: config_cls)``: the CLI gets one option per field.

    The wrapped function keeps its other parameters; the dataclass is built from the options
    (its ``__post_init__`` validation runs as for Python callers).
    """
    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.init]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        resolved = typing.get_type_hints(func)
        own = [
            p.replace(annotation=resolved.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "config"
        ]
        extra = []
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            option = typer.Option(default, "--" + f.name.replace("_", "-"), help=f.metadata.get("help"), show_default=True)
            extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_option_type(hints[f.name])))

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            config = config_cls(**{f.name: kwargs.pop(f.name) for f in fields})
            return func(**kwargs, config=config)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not func's
        return command

    return decorate
