"""Feature sets: indices of crosscoder features, given directly, by NormRatio category, or as a JSON file.

Feature-set JSON (written by ``posttrain-probe analyze`` and the feature commands)::

    {"format": "posttrain-probe/feature-set", "format_version": 1, "features": [12, 40, ...],
     "crosscoder": "runs/cc", "provenance": {"category": "shared", "base": "base", "finetuned": "sft", ...}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain_probe.errors import ProbeError

FEATURE_SET_FORMAT = "posttrain-probe/feature-set"
CATEGORY_NAMES = ("shared", "base-only", "finetune-only")


def write_feature_set(path: str | os.PathLike, features: Sequence[int], *, crosscoder: str | None = None, **provenance: Any) -> Path:
    """Write a feature-set JSON with its provenance; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FEATURE_SET_FORMAT, "format_version": 1, "features": sorted(int(f) for f in features), "crosscoder": crosscoder, "provenance": provenance}
    path.write_text(json.dumps(data, indent=2))
    return path


def read_feature_set(path: str | os.PathLike) -> list[int]:
    """The feature indices of a feature-set JSON (a plain JSON list of ints is accepted too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"cannot read feature set {path}: {err}") from err
    if isinstance(data, list):
        return [int(f) for f in data]
    if not isinstance(data, dict) or data.get("format") != FEATURE_SET_FORMAT or not isinstance(data.get("features"), list):
        raise ProbeError(f"{path} is not a feature-set JSON (expected format {FEATURE_SET_FORMAT!r} with a 'features' list)")
    return [int(f) for f in data["features"]]


def resolve_features(
    crosscoder,
    spec: str | Sequence[int] | os.PathLike,
    *,
    base: str | int = 0,
    finetuned: str | int | None = None,
) -> list[int]:
    """Feature indices from ``spec``: a list of ints, a NormRatio category of the crosscoder
    (``shared``, ``base-only``, ``finetune-only``; paper S bands, ``base`` vs ``finetuned`` slot,
    default the other model of a two-model crosscoder), a feature-set JSON path, or a
    comma-separated list of ints. Refuses empty sets and out-of-range indices.
    """
    n_features = crosscoder.config.n_features
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if not text:
            raise ProbeError("the feature set is empty: give a category, a feature-set JSON or indices like 3,17,42")
        if text in CATEGORY_NAMES:
            features = _category(crosscoder, text, base, finetuned)
        elif Path(text).suffix == ".json" or Path(text).exists():
            features = read_feature_set(text)
        elif all(part.strip().lstrip("-").isdigit() for part in text.split(",") if part.strip()):
            features = [int(part) for part in text.split(",") if part.strip()]
        else:
            raise ProbeError(f"unknown feature set {text!r}: expected a category ({', '.join(CATEGORY_NAMES)}), a feature-set JSON or indices like 3,17,42")
    else:
        features = [int(f) for f in spec]
    if not features:
        raise ProbeError(f"the feature set {spec!r} is empty: nothing would be protected")
    bad = [f for f in features if not 0 <= f < n_features]
    if bad:
        raise ProbeError(f"feature indices {bad[:10]} are out of range for a crosscoder of {n_features} features")
    return sorted(set(features))


def _category(crosscoder, category: str, base: str | int, finetuned: str | int | None) -> list[int]:
    from posttrain_probe.analysis.attribution import categorize, norm_ratio

    base_slot = crosscoder.model_index(base)
    if finetuned is None:
        if crosscoder.n_models != 2:
            raise ProbeError(f"the crosscoder has models {crosscoder.model_names}: name the fine-tuned one for category {category!r}")
        finetuned = 1 - base_slot
    ft_slot = crosscoder.model_index(finetuned)
    labels = categorize(norm_ratio(crosscoder.W_dec.detach(), base_slot, ft_slot))
    return [int(i) for i in torch.nonzero(torch.as_tensor(labels == category)).flatten().tolist()]
