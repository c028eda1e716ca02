"""Build step configs (dataclasses) from mappings and YAML files, and turn them back into mappings.

The one reader behind ``--config FILE.yaml`` of every command (:mod:`posttrain_probe.cli.options`) and
the sections of a study file: keys are the dataclass's field names (``-`` and ``_`` alike); a field
whose type is itself a dataclass (e.g. the segment format of Fisher features) takes a nested mapping.
Torch-free: the CLI uses it before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from posttrain_probe.errors import ProbeError

C = TypeVar("C")


def nested_config_type(hint: Any) -> type | None:
    """The dataclass type of a field annotated ``SomeConfig`` or ``SomeConfig | None``, else None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def init_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields a user sets (``init=True``), in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if f.init]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (``{}`` for an empty file); ProbeError if it is not one."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ProbeError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ProbeError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def check_keys(config_cls: type, data: Mapping[str, Any], *, source: str = "config") -> None:
    """ProbeError naming the first key of ``data`` (or of a nested section) that is not a field of ``config_cls``;
    values are not checked (what a study checks before anything runs)."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in init_fields(config_cls)}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            raise ProbeError(f"unknown key {raw_key!r} in {source}: expected some of {', '.join(sorted(fields))}")
        nested = nested_config_type(hints[key])
        if nested is not None and isinstance(value, Mapping):
            check_keys(nested, value, source=f"{source} section {key}")


def config_from_mapping(config_cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """``config_cls(**data)`` with nested dataclass fields built from nested mappings.

    Keys are field names (dashes become underscores). An unknown key is an error that lists the
    valid ones; the dataclass's own ``__post_init__`` checks the values.
    """
    check_keys(config_cls, data, source=source)
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in init_fields(config_cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        nested = nested_config_type(hints[key])
        if nested is not None and isinstance(value, Mapping):
            value = config_from_mapping(nested, value, source=f"{source} section {key}")
        kwargs[key] = value
    try:
        return config_cls(**kwargs)
    except TypeError:
        missing = [
            name
            for name, f in fields.items()
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]  # type: ignore[misc]
        if missing:
            raise ProbeError(f"{source} is missing {', '.join(missing)} (required by {config_cls.__name__})") from None
        raise


def load_config(config_cls: type[C], path: str | Path) -> C:
    """A config dataclass from a YAML file whose keys are its field names."""
    return config_from_mapping(config_cls, read_yaml_mapping(path), source=str(path))


def config_to_mapping(config: Any) -> dict[str, Any]:
    """The dataclass as a plain mapping (nested configs as nested mappings, paths as strings, tuples as
    lists): what :func:`config_from_mapping` reads back to an equal config, and what YAML/JSON can hold."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in init_fields(type(value))}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def config_to_flags(config: Any) -> list[str]:
    """The command-line flags that rebuild ``config`` through the generated CLI (:mod:`posttrain_probe.cli.options`):
    ``--field-name value`` for every field that differs from its default (a list as the flag repeated, a bool as
    ``--x`` / ``--no-x``, a nested config's fields as flags of their own, a mapping as a JSON value). Required
    fields always appear. What ``study --dry-run`` prints as each step's exact command."""
    import json

    flags: list[str] = []
    hints = typing.get_type_hints(type(config))
    for f in init_fields(type(config)):
        value = getattr(config, f.name)
        if nested_config_type(hints[f.name]) is not None and dataclasses.is_dataclass(value):
            flags += config_to_flags(value)
            continue
        if not f.metadata.get("cli", True):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if value is None or (default is not dataclasses.MISSING and _same(value, default)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for item in value:
                flags += [flag, str(item)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    if isinstance(value, Path) or isinstance(default, Path):
        return str(value) == str(default)
    return value == default
