"""Expose config dataclasses as typer options, so one dataclass backs the Python API, the CLI and YAML.

Fields become ``--field-name`` options with the field's default and its ``metadata["help"]``
(the HfArgumentParser/TrlParser convention). Every decorated command also takes
``--config FILE.yaml``: a flat mapping of option names (dataclass fields and the command's own
options) whose values replace the defaults; options given on the command line win, as in TrlParser.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from posttrain_probe.errors import ProbeError


def _option_type(hint: Any) -> Any:
    """typer-friendly annotation: ``X | None`` becomes ``Optional[X]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return typing.Optional[args[0]]
    return hint


def _cli_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.init and f.metadata.get("cli", True)]


def load_yaml_options(path: Path) -> dict[str, Any]:
    """A flat ``{option_name: value}`` mapping from a YAML file (dashes in keys become underscores)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ProbeError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ProbeError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def config_options(**config_classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``func(..., <name>: <ConfigClass>, ...)``: the CLI gets one option per field of
    every config class (plus ``--config FILE``), and ``func`` receives the built dataclasses."""
    hints = {name: typing.get_type_hints(cls) for name, cls in config_classes.items()}
    fields = {name: _cli_fields(cls) for name, cls in config_classes.items()}
    seen: dict[str, str] = {}
    for name, cls_fields in fields.items():
        for f in cls_fields:
            if f.name in seen:
                raise TypeError(f"option --{f.name} is defined by both {seen[f.name]} and {name}")
            seen[f.name] = name

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        resolved = typing.get_type_hints(func)
        own = [
            p.replace(annotation=resolved.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(func).parameters.values()
            if p.name not in config_classes
        ]
        extra = []
        for name, cls_fields in fields.items():
            for f in cls_fields:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                option = typer.Option(default, "--" + f.name.replace("_", "-"), help=f.metadata.get("help"), show_default=True)
                extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_option_type(hints[name][f.name])))
        config_file = inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="YAML file of option: value pairs (command-line options win)."),
            annotation=Optional[Path],
        )
        params = own + extra + [config_file]
        defaults = {p.name: p.default.default if hasattr(p.default, "default") else p.default for p in params}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            path = kwargs.pop("config_file")
            if path is not None:
                for key, value in load_yaml_options(path).items():
                    if key not in kwargs:
                        valid = ", ".join(sorted(k for k in kwargs))
                        raise ProbeError(f"unknown option {key!r} in {path}: expected some of {valid}")
                    if kwargs[key] == defaults[key] or kwargs[key] in (None, [], ()):
                        kwargs[key] = value
            configs = {name: cls(**{f.name: kwargs.pop(f.name) for f in fields[name]}) for name, cls in config_classes.items()}
            return func(**kwargs, **configs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not func's
        return command

    return decorate
