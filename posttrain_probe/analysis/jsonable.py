"""Make analysis results writable as strict JSON (the ``summary.json``/``*.json`` reports)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from posttrain_probe.errors import ProbeError


def json_safe(value: Any) -> Any:
    """``value`` with everything ``json.dumps(..., allow_nan=False)`` would reject made plain.

    Non-finite floats (NaN, +-inf) become ``None`` (JSON ``null``); numpy scalars become the Python
    ``int``/``float`` they hold; mappings become dicts with ``str`` keys and lists/tuples become
    lists, both converted recursively. Anything else is returned unchanged (no copy). Values keep
    their units; nothing is rounded.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def read_json(path: Path, step: str) -> dict[str, Any]:
    """The JSON report ``path`` written by ``posttrain-probe <step>``; ProbeError naming the step when it is missing."""
    if not path.exists():
        raise ProbeError(f"{path.parent} holds no {path.name}: write it with `posttrain-probe {step}`")
    return json.loads(path.read_text())
