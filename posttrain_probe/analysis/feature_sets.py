"""Feature sets: indices of crosscoder features, given directly, by NormRatio category, or as a JSON file.

Feature-set JSON (written by ``posttrain-probe analyze`` and the feature commands)::

    {"format": "posttrain-probe/feature-set", "format_version": 1, "features": [12, 40, ...],
     "crosscoder": "runs/cc", "crosscoder_fingerprint": "<sha256 hex>",
     "provenance": {"category": "shared", "base": "base", "finetuned": "sft", ...}}

``crosscoder_fingerprint`` (:func:`crosscoder_fingerprint`) identifies the crosscoder the indices
refer to; :func:`resolve_features` refuses a set whose fingerprint is not the given crosscoder's.
Sets written without a crosscoder (``crosscoder_fingerprint`` null) are accepted as they are.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from posttrain_probe.crosscoder.model import crosscoder_fingerprint
from posttrain_probe.errors import ProbeError

FEATURE_SET_FORMAT = "posttrain-probe/feature-set"
CATEGORY_NAMES = ("shared", "base-only", "finetune-only")


class FeatureSet(NamedTuple):
    """A feature-set file as read by :func:`load_feature_set`."""

    features: list[int]
    """Feature indices as written (not deduplicated)."""
    crosscoder: str | None
    """Where the crosscoder was (provenance only; None when not recorded)."""
    crosscoder_fingerprint: str | None
    """:func:`crosscoder_fingerprint` of the crosscoder the indices refer to (None: not recorded)."""
    provenance: dict[str, Any]
    """Free-form provenance written with the set."""


@functools.lru_cache(maxsize=16)
def _directory_fingerprint(path: str, mtime_ns: int, size: int, config_mtime_ns: int) -> str:
    from posttrain_probe.crosscoder.inspect import load_crosscoder

    return crosscoder_fingerprint(load_crosscoder(path))


def _fingerprint_of(crosscoder) -> tuple[str | None, str | None]:
    """(path or None, fingerprint or None) of a Crosscoder object or a directory (None if it holds none)."""
    if crosscoder is None:
        return None, None
    if isinstance(crosscoder, (str, os.PathLike)):
        weights = Path(crosscoder) / "model.safetensors"
        if not (Path(crosscoder) / "config.json").exists() or not weights.exists():
            return str(crosscoder), None  # a label only (e.g. a path on another machine)
        stat = weights.stat()
        config_stat = (Path(crosscoder) / "config.json").stat()  # calibration rewrites only the config's content
        return str(crosscoder), _directory_fingerprint(
            str(Path(crosscoder).resolve()), stat.st_mtime_ns, stat.st_size, config_stat.st_mtime_ns
        )
    return None, crosscoder_fingerprint(crosscoder)


def write_feature_set(
    path: str | os.PathLike,
    features: Sequence[int],
    *,
    crosscoder=None,
    crosscoder_path: str | os.PathLike | None = None,
    **provenance: Any,
) -> Path:
    """Write a feature-set JSON with its provenance; returns the path.

    ``crosscoder``: the crosscoder the indices refer to, a ``Crosscoder`` or its directory; its
    :func:`crosscoder_fingerprint` is recorded (a path that holds no crosscoder is recorded as a
    label, without fingerprint). ``crosscoder_path`` records where the crosscoder lives when an
    object is given.
    """
    path = Path(path)
    where, fingerprint = _fingerprint_of(crosscoder)
    if crosscoder_path is not None:
        where = str(crosscoder_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FEATURE_SET_FORMAT,
        "format_version": 1,
        "features": sorted(int(f) for f in features),
        "crosscoder": where,
        "crosscoder_fingerprint": fingerprint,
        "provenance": provenance,
    }
    path.write_text(json.dumps(data, indent=2))
    return path


def load_feature_set(path: str | os.PathLike) -> FeatureSet:
    """A feature-set JSON with its crosscoder fingerprint and provenance."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"cannot read feature set {path}: {err}") from err
    if (
        not isinstance(data, dict)
        or data.get("format") != FEATURE_SET_FORMAT
        or not isinstance(data.get("features"), list)
    ):
        raise ProbeError(
            f"{path} is not a feature-set JSON (expected format {FEATURE_SET_FORMAT!r} with a 'features' list)"
        )
    return FeatureSet(
        _indices(data["features"], path),
        data.get("crosscoder"),
        data.get("crosscoder_fingerprint"),
        dict(data.get("provenance") or {}),
    )


def _indices(values: list, path) -> list[int]:
    try:
        return [int(f) for f in values]
    except (TypeError, ValueError) as err:
        raise ProbeError(f"the features of {path} are not integer indices: {err}") from err


def resolve_features(
    crosscoder,
    spec: str | Sequence[int] | os.PathLike,
    *,
    base: str | int = 0,
    finetuned: str | int | None = None,
    norm_ratio_scale: str = "all",
) -> list[int]:
    """Feature indices from ``spec``: a list of ints, a NormRatio category of the crosscoder
    (``shared``, ``base-only``, ``finetune-only``; paper S bands, ``base`` vs ``finetuned`` slot,
    default the other model of a two-model crosscoder), a feature-set JSON path, or a
    comma-separated list of ints. Refuses empty sets, out-of-range indices and feature-set JSONs
    whose recorded crosscoder fingerprint is not ``crosscoder``'s.

    ``norm_ratio_scale``: the NormRatio denominator of a category, ``"all"`` (max decoder norm over
    every model slot, docs/methods.md sec. 4 default) or ``"pair"`` (over ``base`` and ``finetuned`` only,
    paper S); see :func:`~posttrain_probe.analysis.attribution.norm_ratio`. Checked for every
    ``spec``; it only matters for categories of crosscoders with more than two models.
    """
    from posttrain_probe.analysis.attribution import NORM_RATIO_SCALES

    if norm_ratio_scale not in NORM_RATIO_SCALES:
        raise ProbeError(f"norm_ratio_scale {norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}")
    n_features = crosscoder.config.n_features
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if not text:
            raise ProbeError("the feature set is empty: give a category, a feature-set JSON or indices like 3,17,42")
        if text in CATEGORY_NAMES:
            features = _category(crosscoder, text, base, finetuned, norm_ratio_scale)
        elif Path(text).suffix == ".json" or Path(text).exists():
            features = _checked_set(crosscoder, text)
        elif all(part.strip().lstrip("-").isdigit() for part in text.split(",") if part.strip()):
            features = [int(part) for part in text.split(",") if part.strip()]
        else:
            raise ProbeError(
                f"unknown feature set {text!r}: expected a category ({', '.join(CATEGORY_NAMES)}), a feature-set JSON or indices like 3,17,42"
            )
    else:
        features = [int(f) for f in spec]
    if not features:
        raise ProbeError(f"the feature set {spec!r} is empty: nothing would be protected")
    bad = [f for f in features if not 0 <= f < n_features]
    if bad:
        raise ProbeError(f"feature indices {bad[:10]} are out of range for a crosscoder of {n_features} features")
    return sorted(set(features))


def _checked_set(crosscoder, path: str) -> list[int]:
    """The indices of the feature-set file ``path``, refused when made for another crosscoder."""
    loaded = load_feature_set(path)
    if loaded.crosscoder_fingerprint is not None:
        fingerprint = crosscoder_fingerprint(crosscoder)
        if fingerprint != loaded.crosscoder_fingerprint:
            made_for = f"crosscoder {loaded.crosscoder!r}" if loaded.crosscoder else "another crosscoder"
            raise ProbeError(
                f"feature set {path} was made for {made_for} (fingerprint {loaded.crosscoder_fingerprint[:12]}), not for the "
                f"given crosscoder over {crosscoder.model_names} with {crosscoder.config.n_features} features "
                f"(fingerprint {fingerprint[:12]}): its indices would name other features"
            )
    return loaded.features


def _category(crosscoder, category: str, base: str | int, finetuned: str | int | None, scale: str = "all") -> list[int]:
    from posttrain_probe.analysis.attribution import categorize, norm_ratio

    base_slot = crosscoder.model_index(base)
    if finetuned is None:
        if crosscoder.n_models != 2:
            raise ProbeError(
                f"the crosscoder has models {crosscoder.model_names}: name the fine-tuned one for category {category!r}"
            )
        finetuned = 1 - base_slot
    ft_slot = crosscoder.model_index(finetuned)
    labels = categorize(norm_ratio(crosscoder.W_dec.detach(), base_slot, ft_slot, scale=scale))
    return [int(i) for i in torch.nonzero(torch.as_tensor(labels == category)).flatten().tolist()]
