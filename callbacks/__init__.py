"""Training-loop integrations, shipped as ``posttrain_probe.callbacks``.

Thin adapters over :mod:`posttrain_probe`: TRL/transformers ``TrainerCallback``s (probe snapshots and activations,
gradient blocking, the feature monitor, feature-preserving SFT) and the verl trainer/worker hooks (:mod:`posttrain_probe.callbacks.verl`).
Nothing in :mod:`posttrain_probe` imports this package.

The names below are imported on first use (PEP 562), so importing a sub-module (the Hydra plugin
imports ``posttrain_probe.callbacks.verl.config`` in every Hydra application) does not import
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActivationStreamCallback": "trainer_callbacks",
    "BlockingArguments": "blocking",
    "FeatureMonitorCallback": "feature_monitor",
    "FeaturePreservingMixin": "preserve",
    "GradientBlockingCallback": "blocking",
    "MonitorArguments": "feature_monitor",
    "PreserveArguments": "preserve",
    "ProbeArguments": "arguments",
    "SnapshotCallback": "trainer_callbacks",
    "add_probe_callbacks": "trainer_callbacks",
    "blocking_callback": "blocking",
    "build_blocker": "blocking",
    "build_preserver": "preserve",
    "monitor_callback": "feature_monitor",
    "snapshot_schedule": "arguments",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
