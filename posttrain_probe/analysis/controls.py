"""Controls for causal claims (docs/methods.md sec. 11): frequency-matched random feature sets and their spread.

An intervention on a selected feature set S is compared with the same intervention on random sets of
|S| features whose **activation frequencies** match S's, one set per seed:

1. :func:`frequency_bins`: features that never fire (frequency 0) form bin 0; the live features
   (frequency > 0) are cut into ``n_bins`` equal-count bins by frequency rank (bins 1..n_bins, ties
   share a bin);
2. :func:`frequency_matched_controls`: for every selected feature, a distinct random feature of the
   same bin, never one of S (one ``numpy`` generator per seed: the same seed gives the same set);
3. :func:`control_feature_sets`: one such set per seed, with fewer bins when a bin holds more
   selected features than other candidates (halving ``n_bins`` down to 1, and saying so);
4. :func:`control_spread`: mean, sample std, min and max of the controls' deltas and whether the
   selected set's delta lies outside [min, max].

Frequencies are fractions of reference tokens on which the per-source code f_i^m > 0
(:func:`posttrain_probe.interventions.activation_stats.source_activation_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from posttrain_probe.errors import ProbeError

DEFAULT_CONTROL_SEEDS = 5
"""docs/methods.md sec. 11: number of random control sets (seeds) per intervention."""
DEFAULT_FREQUENCY_BINS = 10
"""Equal-count frequency bins of the live features (:func:`frequency_bins`)."""


def _frequencies(frequency) -> np.ndarray:
    values = np.asarray(frequency.detach().cpu() if hasattr(frequency, "detach") else frequency, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ProbeError(f"frequency has shape {values.shape}; expected a non-empty [F] vector of firing rates")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ProbeError(
            "frequency has values outside [0, 1] or non-finite ones; expected firing rates (fraction of tokens with f_i > 0)"
        )
    return values


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ProbeError(
            f"n_bins={n_bins!r}: expected a positive int (equal-count frequency bins of the live features)"
        )
    return int(n_bins)


def frequency_bins(frequency, n_bins: int = DEFAULT_FREQUENCY_BINS) -> np.ndarray:
    """Frequency bin of every feature.

    Args:
        frequency: ``[F]`` firing rates in [0, 1] (fraction of reference tokens with f_i > 0).
        n_bins: number of equal-count bins of the live features (frequency > 0).

    Returns:
        ``[F]`` int64: 0 for features that never fire; for live features 1 + floor(n_bins r / n_live),
        r = the number of live features with a strictly smaller frequency (so features of equal
        frequency share a bin; bins hold about n_live / n_bins features each).
    """
    values = _frequencies(frequency)
    n_bins = _check_bins(n_bins)
    bins = np.zeros(values.shape[0], dtype=np.int64)
    live = values > 0
    n_live = int(live.sum())
    if n_live:
        ordered = np.sort(values[live])
        below = np.searchsorted(ordered, values[live], side="left")  # live features with a smaller frequency
        bins[live] = 1 + (n_bins * below) // n_live
    return bins


def frequency_matched_controls(
    frequency, selected: Sequence[int], seed: int, *, n_bins: int = DEFAULT_FREQUENCY_BINS
) -> list[int]:
    """A random feature set matching ``selected`` bin by bin in activation frequency (docs/methods.md sec. 11).

    Args:
        frequency: ``[F]`` firing rates in [0, 1] (:func:`frequency_bins`).
        selected: the selected features S (distinct indices in [0, F)).
        seed: seed of the ``numpy`` generator (int >= 0): the same seed gives the same set.
        n_bins: equal-count bins of the live features (:func:`frequency_bins`).

    Returns:
        ``|S|`` distinct feature indices, none of them in S; entry j is drawn uniformly from the
        features of selected[j]'s bin. A bin holding more selected features than other features
        raises ProbeError (use fewer bins: :func:`control_feature_sets` does).
    """
    values = _frequencies(frequency)
    chosen = _selected(selected, values.shape[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbeError(f"seed={seed!r}: expected an int >= 0")
    bins = frequency_bins(values, n_bins)
    rng = np.random.default_rng(int(seed))
    taken = set(chosen)
    out: dict[int, int] = {}
    for b in sorted({int(bins[k]) for k in chosen}):
        need = [k for k in chosen if bins[k] == b]
        candidates = [int(i) for i in np.flatnonzero(bins == b) if int(i) not in taken]
        if len(candidates) < len(need):
            members = values[bins == b]
            what = "features that never fire" if b == 0 else f"firing rates {members.min():.3g}-{members.max():.3g}"
            raise ProbeError(
                f"frequency bin {b} of {n_bins} ({what}) holds {len(need)} selected feature(s) {need[:8]} but only "
                f"{len(candidates)} other feature(s); expected at least {len(need)} candidates: use fewer bins"
            )
        for k, drawn in zip(need, rng.choice(candidates, size=len(need), replace=False)):
            out[k] = int(drawn)
    return [out[k] for k in chosen]


def _selected(selected: Sequence[int], n_features: int) -> list[int]:
    try:
        chosen = [int(k) for k in selected]
    except (TypeError, ValueError):
        raise ProbeError(f"selected={selected!r}: expected feature indices") from None
    if not chosen:
        raise ProbeError("selected is empty; expected at least one feature to match")
    if len(set(chosen)) != len(chosen):
        raise ProbeError(
            f"selected has repeated features {sorted(k for k in set(chosen) if chosen.count(k) > 1)[:8]}; expected distinct indices"
        )
    bad = [k for k in chosen if not 0 <= k < n_features]
    if bad:
        raise ProbeError(f"selected features {bad[:8]} are out of range; expected indices in [0, {n_features})")
    return chosen


class ControlSets(NamedTuple):
    """Result of :func:`control_feature_sets`."""

    seeds: list[int]
    """The seeds, in order."""
    sets: list[list[int]]
    """One control set per seed; entry j matches selected[j]."""
    n_bins: int
    """Bins actually used (fewer than requested after a fallback)."""
    requested_bins: int
    """Bins asked for."""
    note: str | None
    """Why fewer bins were used (None without a fallback)."""


def control_feature_sets(
    frequency, selected: Sequence[int], seeds: Sequence[int], *, n_bins: int = DEFAULT_FREQUENCY_BINS
) -> ControlSets:
    """:func:`frequency_matched_controls` for every seed, with one bin count for all of them.

    When a bin has too few candidates with ``n_bins`` bins, ``n_bins`` is halved (rounded down) until
    every bin fits, down to 1 (one bin of live features, one of dead features); the fallback is in
    ``note``. Still too few at 1 bin (|S| larger than the other features of its kind): ProbeError.
    """
    requested = _check_bins(n_bins)
    seeds = [int(s) for s in seeds]
    bins, first_error = requested, None
    while True:
        try:
            sets = [frequency_matched_controls(frequency, selected, s, n_bins=bins) for s in seeds]
            break
        except ProbeError as err:
            if "frequency bin" not in str(err) or bins == 1:
                raise
            first_error = first_error or str(err)
            bins //= 2
    note = None
    if bins != requested:
        note = f"frequency-matched controls use {bins} bin(s) instead of {requested}: {first_error}"
    return ControlSets(seeds, sets, bins, requested, note)


class ControlSpread(NamedTuple):
    """:func:`control_spread` of one task: statistics of the controls' deltas (percentage points)."""

    n: int
    """Number of control sets."""
    mean: float
    std: float | None
    """Sample standard deviation (ddof 1); None with a single control."""
    min: float
    max: float
    outside: bool
    """The selected set's delta is < min or > max of the controls' deltas."""


def control_spread(selected_delta: float, control_deltas: Sequence[float]) -> ControlSpread:
    """Mean and spread of the controls' deltas and whether the selected set lies outside them (docs/methods.md sec. 11).

    Args:
        selected_delta: the selected set's delta (percentage points).
        control_deltas: the control sets' deltas on the same documents (percentage points, >= 1 value).

    Returns:
        :class:`ControlSpread`; ``outside`` is True when ``selected_delta`` is strictly below the
        smallest or strictly above the largest control delta.
    """
    values = np.asarray([float(v) for v in control_deltas], dtype=np.float64)
    if values.size == 0:
        raise ProbeError("control_deltas is empty; expected the delta of at least one control set")
    if not np.isfinite(values).all() or not math.isfinite(float(selected_delta)):
        raise ProbeError(f"deltas must be finite; got selected {selected_delta!r} and controls {values.tolist()}")
    lo, hi = float(values.min()), float(values.max())
    std = float(values.std(ddof=1)) if values.size > 1 else None
    return ControlSpread(
        int(values.size), float(values.mean()), std, lo, hi, bool(selected_delta < lo or selected_delta > hi)
    )
