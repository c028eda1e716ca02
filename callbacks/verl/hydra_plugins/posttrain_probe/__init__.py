"""Hydra plugin of posttrain-probe, installed as ``hydra_plugins.posttrain_probe``.

Hydra imports every module of the ``hydra_plugins`` namespace package in every Hydra application,
so this stays small: it adds posttrain-probe's verl config directory (config group ``probe``:
``+probe=on``, ``+probe=on_ckpt``) to the config search path and stores the schema of the
``probe`` node. Importing :mod:`posttrain_probe.callbacks.verl.config` is cheap (no torch, no verl).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "posttrain-probe"


def config_dir() -> Path:
    """``<posttrain_probe.callbacks>/verl/config``, found without importing the callbacks package."""
    spec = importlib.util.find_spec("posttrain_probe.callbacks")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("posttrain_probe.callbacks is not installed: reinstall posttrain-probe")
    return Path(next(iter(spec.submodule_search_locations))) / "verl" / "config"


class PosttrainProbeSearchPathPlugin(SearchPathPlugin):
    """Appends ``file://<posttrain_probe.callbacks>/verl/config`` to every Hydra app's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from posttrain_probe.callbacks.verl.config import register_schema

        register_schema()
        search_path.append(provider=PROVIDER, path=f"file://{config_dir()}")
