"""Expose step configs (dataclasses) as typer options, so one dataclass backs the Python API, the CLI and YAML.

Every field becomes a ``--field-name`` option with its ``metadata["help"]`` (the HfArgumentParser /
TrlParser convention); the fields of a nested config dataclass (e.g. ``FisherConfig.segments``) become
options of their own, never re-declared. Every decorated command also takes ``--config FILE.yaml``
whose keys are the field names (a nested config as a nested section) and the command's own options:
the file replaces the defaults, and options given on the command line win over the file.
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

from posttrain_probe.config_io import init_fields, nested_config_type, read_yaml_mapping
from posttrain_probe.errors import ProbeError


def _option_type(hint: Any) -> Any:
    """typer-friendly annotation: ``X | None`` becomes ``Optional[X]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return typing.Optional[args[0]]
    return hint


class _Leaf(typing.NamedTuple):
    field: dataclasses.Field
    hint: Any
    path: tuple[str, ...]  # (config argument, [nested field,] field)


def _leaves(config_cls: type, prefix: tuple[str, ...]) -> list[_Leaf]:
    hints = typing.get_type_hints(config_cls)
    leaves = []
    for f in init_fields(config_cls):
        nested = nested_config_type(hints[f.name])
        if nested is not None:
            leaves += _leaves(nested, (*prefix, f.name))
        elif f.metadata.get("cli", True):
            leaves.append(_Leaf(f, hints[f.name], (*prefix, f.name)))
    return leaves


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _build(config_cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for f in init_fields(config_cls):
        key = (*prefix, f.name)
        nested = nested_config_type(hints[f.name])
        if nested is not None:
            kwargs[f.name] = _build(nested, values, key)
        elif key in values:
            kwargs[f.name] = values[key]
    return config_cls(**kwargs)


def _flatten_yaml(data: dict[str, Any], sections: dict[str, set[str]], path: Path) -> dict[str, Any]:
    """YAML keys -> option names: a nested section's keys are its own fields' option names (checked here,
    so a key in the wrong section is an error, as in :func:`posttrain_probe.config_io.config_from_mapping`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            for sub, sub_value in value.items():
                name = str(sub).replace("-", "_")
                if name not in sections[key]:
                    valid = ", ".join(sorted(sections[key]))
                    raise ProbeError(f"unknown key {sub!r} in {path} section {key}: expected some of {valid}")
                flat[name] = sub_value
        else:
            flat[key] = value
    return flat


def config_options(**config_classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``func(..., <name>: <ConfigClass>, ...)``: the CLI gets one option per (nested) field of
    every config class plus ``--config FILE``, and ``func`` receives the built dataclasses.

    A field without a default is required: on the command line or in the ``--config`` file."""
    leaves = [leaf for name, cls in config_classes.items() for leaf in _leaves(cls, (name,))]
    by_name: dict[str, _Leaf] = {}
    for leaf in leaves:
        if leaf.field.name in by_name:
            raise TypeError(
                f"option --{leaf.field.name} is defined twice ({'.'.join(by_name[leaf.field.name].path)} and {'.'.join(leaf.path)})"
            )
        by_name[leaf.field.name] = leaf
    sections: dict[str, set[str]] = {}
    for leaf in leaves:
        if len(leaf.path) > 2:
            sections.setdefault(leaf.path[-2], set()).add(leaf.field.name)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        resolved = typing.get_type_hints(func)
        own = [
            p.replace(annotation=resolved.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(func).parameters.values()
            if p.name not in config_classes
        ]
        extra = []
        required = set()
        for leaf in leaves:
            default = _default(leaf.field)
            if default is dataclasses.MISSING:
                required.add(leaf.field.name)
                default = None
            flag = "--" + leaf.field.name.replace("_", "-")
            if leaf.hint is bool or _option_type(leaf.hint) == Optional[bool]:
                flag += "/--no-" + leaf.field.name.replace("_", "-")
            help_text = leaf.field.metadata.get("help")
            if leaf.field.name in required:
                help_text = f"{help_text} \\[required]"  # escaped: rich markup would drop [required]
            option = typer.Option(default, flag, help=help_text, show_default=leaf.field.name not in required)
            annotation = _option_type(leaf.hint)
            if leaf.field.name in required and typing.get_origin(annotation) is not typing.Union:
                annotation = Optional[annotation]
            extra.append(
                inspect.Parameter(
                    leaf.field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                )
            )
        config_file = inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                help="YAML file whose keys are the option names (a nested config as a section); command-line options win.",
            ),
            annotation=Optional[Path],
        )
        context = inspect.Parameter("_typer_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [context, *own, *extra, config_file]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            ctx: typer.Context = kwargs.pop("_typer_ctx")
            path = kwargs.pop("config_file")
            given = {
                name
                for name in kwargs
                if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"  # typer may vendor click
            }
            if path is not None:
                data = _flatten_yaml(read_yaml_mapping(path), sections, path)
                for key, value in data.items():
                    if key not in kwargs:
                        valid = ", ".join(sorted(kwargs))
                        raise ProbeError(f"unknown key {key!r} in {path}: expected some of {valid}")
                    if key not in given:
                        kwargs[key] = value
            missing = [name for name in sorted(required) if kwargs.get(name) in (None, [], ())]
            if missing:
                flags = ", ".join("--" + name.replace("_", "-") for name in missing)
                raise ProbeError(f"missing {flags} (give it on the command line or as a key of --config FILE)")
            values = {by_name[name].path: kwargs.pop(name) for name in list(kwargs) if name in by_name}
            configs = {name: _build(cls, values, (name,)) for name, cls in config_classes.items()}
            return func(**kwargs, **configs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not func's
        return command

    return decorate
