"""Feature tables of a crosscoder: attribution metrics per feature, activation statistics, summaries.

The formulas live in :mod:`posttrain_probe.analysis.attribution`; this module resolves model names,
runs them for every (base, tuned) pair of a crosscoder, and lays the results out as one
``pyarrow.Table`` row per feature, written as CSV or Parquet, plus a JSON-ready summary.

The crosscoder is used through a small interface only: ``cc.W_dec`` ``[F, N, d]`` (decoder,
crosscoder-normalised units), ``cc.config.model_names`` (N names in slot order) and
``cc.encode(x)`` (raw activations ``[B, N, d]`` -> feature activations ``[B, F]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from posttrain_probe.analysis.analyze_config import DEFAULT_DUPLICATE_COSINE
from posttrain_probe.analysis.attribution import (
    CATEGORIES,
    categorize,
    decoder_cosine,
    decoder_norms,
    mas,
    mas_dominant,
    norm_ratio,
    nrn,
)
from posttrain_probe.analysis.duplicates import duplicate_groups
from posttrain_probe.errors import ProbeError

LIVENESS_SOURCES = ("activations", "training", "unknown")
"""Where a feature table's liveness comes from: a pass over activations, the training run's firing
counters, or nowhere (then only all-zero decoders count as dead)."""
NRN_TAILS = (0.7, 0.9)
"""Default tail thresholds t of :func:`summary`: NRN > t (tuned-specific) and NRN < 1 - t (base-specific)."""


class FeatureStats(NamedTuple):
    """Activation statistics of every feature over a token stream."""

    frequency: torch.Tensor
    """``[F]`` float64: fraction of tokens on which f_i > 0 (dimensionless, in [0, 1])."""
    max_activation: torch.Tensor
    """``[F]`` float32: largest f_i seen, in code units (0 for a feature that never fired)."""
    n_tokens: int
    """Number of tokens the statistics were taken over."""


def model_index(model_names: Sequence[str], name: str, what: str = "model") -> int:
    """Slot index of ``name`` in ``model_names``; ProbeError listing the names when it is not there."""
    names = list(model_names)
    if name not in names:
        raise ProbeError(f"{what} {name!r} is not one of the crosscoder's models {names}")
    return names.index(name)


def _crosscoder_decoder(cc: Any) -> tuple[torch.Tensor, list[str]]:
    """``cc.W_dec`` detached and ``cc.config.model_names``, checked against each other."""
    W_dec = getattr(cc, "W_dec", None)
    if not isinstance(W_dec, torch.Tensor) or W_dec.ndim != 3:
        raise ProbeError(
            f"cc.W_dec must be a decoder tensor of shape [F, N, d], got "
            f"{tuple(W_dec.shape) if isinstance(W_dec, torch.Tensor) else type(W_dec).__name__}"
        )
    names = list(cc.config.model_names)
    if len(names) != W_dec.shape[1] or len(set(names)) != len(names):
        raise ProbeError(
            f"cc.config.model_names {names} must be {W_dec.shape[1]} distinct names, one per decoder slot "
            f"(W_dec has shape {tuple(W_dec.shape)})"
        )
    return W_dec.detach(), names


def feature_activation_stats(cc: Any, batches: Iterable[torch.Tensor]) -> FeatureStats:
    """Firing frequency and maximum activation of every feature over ``batches`` (sec. 3 L0/dead, sec. 7 steer).

    Each batch is raw model activations ``[B, N, d]`` (raw model units, as ``cc.encode`` takes
    them), moved to the crosscoder's device. Counts and maxima are accumulated on that device with
    no host sync per batch; the results are copied to the CPU once, at the end.

    Returns:
        :class:`FeatureStats` with CPU tensors.
    """
    W_dec, names = _crosscoder_decoder(cc)
    n_features, n_models, d_model = W_dec.shape
    device = W_dec.device
    count = torch.zeros(n_features, dtype=torch.int64, device=device)
    peak = torch.zeros(n_features, dtype=torch.float32, device=device)
    n_tokens = 0
    with torch.no_grad():
        for k, x in enumerate(batches):
            if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != (n_models, d_model):
                raise ProbeError(
                    f"batch {k} must be raw activations of shape [B, {n_models}, {d_model}] (models {names}), "
                    f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                )
            if x.shape[0] == 0:
                continue
            codes = cc.encode(x.to(device, non_blocking=True))
            if codes.ndim != 2 or tuple(codes.shape) != (x.shape[0], n_features):
                raise ProbeError(
                    f"cc.encode returned shape {tuple(codes.shape)}, expected [{x.shape[0]}, {n_features}]"
                )
            count += (codes > 0).sum(dim=0)
            peak = torch.maximum(peak, codes.amax(dim=0).float())
            n_tokens += x.shape[0]
    if n_tokens == 0:
        raise ProbeError("feature_activation_stats got no tokens: batches was empty")
    if not bool(torch.isfinite(peak).all()):  # one sync, at the end: NaN codes come from NaN activations or weights
        bad = int((~torch.isfinite(peak)).sum())
        raise ProbeError(
            f"{bad} of {n_features} features have NaN/inf activations over {n_tokens} tokens: the activations or the "
            "crosscoder hold non-finite values (check the stores with `posttrain-probe store info --check-values`)"
        )
    return FeatureStats(
        frequency=count.cpu().double() / n_tokens,
        max_activation=peak.cpu(),
        n_tokens=n_tokens,
    )


def feature_table(
    cc: Any,
    *,
    base: str,
    stats: FeatureStats | None = None,
    live: torch.Tensor | None = None,
    p: float = 1,
    duplicate_cosine: float = DEFAULT_DUPLICATE_COSINE,
    norm_ratio_scale: str = "all",
) -> pa.Table:
    """One row per feature with its attribution metrics against ``base`` (docs/methods.md sec. 4).

    Columns, in order:

    - ``feature``: index i.
    - for every tuned model m (every model but ``base``): ``nrn_<m>`` (:func:`nrn`, norm order
      ``p``), ``norm_ratio_<m>`` (:func:`norm_ratio` with ``scale=norm_ratio_scale``), ``category_<m>`` (:func:`categorize` of the
      NormRatio), ``cosine_<m>`` (:func:`decoder_cosine` of base and m).
    - for every model m: ``norm_<m>`` (L2 decoder norm, crosscoder-normalised units), ``mas_<m>``
      (:func:`mas`, norm order ``p``).
    - ``mas_dominant``: name of the model with the largest MAS (null for dead features).
    - ``dead``: every decoder norm is 0, or the feature is dead by its activations: it never fired
      in ``stats`` or, without ``stats``, ``live`` ([F] bool, e.g. from the training run's firing
      counters) says so. With neither, liveness is unknown and only zero decoders are dead.
    - ``duplicate_group``: representative of the feature's group of near-identical decoders
      (:func:`~posttrain_probe.analysis.duplicates.duplicate_groups` at ``duplicate_cosine``,
      live features only; -1 for dead ones).
    - with ``stats``: ``frequency``, ``max_activation`` (:class:`FeatureStats`).

    Metric columns are the decoder's numbers (NaN only where the formula is undefined); the labels
    follow ``dead``: ``category_<m>`` is "dead" and ``mas_dominant`` is null for every dead feature.
    """
    W_dec, names = _crosscoder_decoder(cc)
    b = model_index(names, base, "base")
    n_features = W_dec.shape[0]
    norms = decoder_norms(W_dec, 2)  # computed where W_dec lives; only [F]-sized results come to the host
    dead = (norms == 0).all(dim=1).cpu().numpy()
    if stats is not None:
        if tuple(stats.frequency.shape) != (n_features,) or tuple(stats.max_activation.shape) != (n_features,):
            raise ProbeError(
                f"stats have shapes {tuple(stats.frequency.shape)} (frequency) and {tuple(stats.max_activation.shape)} "
                f"(max_activation); expected [{n_features}], one entry per feature of the crosscoder ({n_features} features)"
            )
        dead = dead | (stats.frequency.cpu().numpy() == 0)
    elif live is not None:
        alive = torch.as_tensor(live).detach().cpu()
        if alive.dtype != torch.bool or tuple(alive.shape) != (n_features,):
            raise ProbeError(
                f"live has dtype {alive.dtype} and shape {tuple(alive.shape)}; expected [F={n_features}] bool"
            )
        dead = dead | ~alive.numpy()
    groups = duplicate_groups(W_dec, duplicate_cosine, include=torch.from_numpy(~dead))

    columns: dict[str, Any] = {"feature": pa.array(np.arange(n_features, dtype=np.int64))}
    for m, name in enumerate(names):
        if m == b:
            continue
        ratio = norm_ratio(W_dec, b, m, scale=norm_ratio_scale)
        category = categorize(ratio).astype(object)
        category[dead] = "dead"
        columns[f"nrn_{name}"] = _floats(nrn(W_dec, b, m, p))
        columns[f"norm_ratio_{name}"] = _floats(ratio)
        columns[f"category_{name}"] = pa.array(category, pa.string())
        columns[f"cosine_{name}"] = _floats(decoder_cosine(W_dec, b, m))
    scores = mas(W_dec, p)
    for m, name in enumerate(names):
        columns[f"norm_{name}"] = _floats(norms[:, m])
        columns[f"mas_{name}"] = _floats(scores[:, m])
    winner = mas_dominant(scores).cpu().numpy()
    columns["mas_dominant"] = pa.array(
        [None if (w < 0 or is_dead) else names[w] for w, is_dead in zip(winner.tolist(), dead.tolist())],
        pa.string(),
    )
    columns["dead"] = pa.array(dead, pa.bool_())
    columns["duplicate_group"] = pa.array(groups.group.numpy(), pa.int64())
    if stats is not None:
        columns["frequency"] = _floats(stats.frequency)
        columns["max_activation"] = _floats(stats.max_activation)
    return pa.table(columns)


def _floats(values: torch.Tensor) -> pa.Array:
    """A float64 Arrow column (NaN kept as NaN, not null)."""
    return pa.array(values.detach().cpu().double().numpy(), pa.float64())


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as CSV (``.csv``) or Parquet (``.parquet``), chosen by the suffix of ``path``.

    Parent directories are created. In CSV, NaN is written as ``nan`` and null as an empty field.
    Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ProbeError(
            f"cannot write a table to {str(path)!r}: the suffix must be .csv or .parquet, got {suffix or 'none'!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        import pyarrow.csv

        pyarrow.csv.write_csv(table, path)
    else:
        import pyarrow.parquet

        pyarrow.parquet.write_table(table, path)
    return path


def summary(
    table: pa.Table,
    *,
    base: str,
    model_names: Sequence[str],
    nrn_tails: Sequence[float] = NRN_TAILS,
    liveness: str = "unknown",
) -> dict[str, Any]:
    """JSON-ready counts of a :func:`feature_table` (paper R fig. 1/3 tails, paper S categories).

    Dead features (``dead`` column) are left out of every count. ``liveness`` says where the table's
    ``dead`` flags come from (:data:`LIVENESS_SOURCES`): with ``"unknown"`` only all-zero decoders
    are known dead, ``n_dead`` is null and ``n_zero_decoder`` is given instead, because a latent
    that never fires looks live from its decoder alone. Per tuned model: ``categories`` (NormRatio
    category counts; ``undefined`` counts live features with both decoders of the pair zero),
    ``nrn_tails`` (counts of NRN > t and NRN < 1 - t for each t in ``nrn_tails``), ``nrn_mean`` and
    ``nrn_median`` (null when no feature counts), and the same counts deduplicated
    (``categories_dedup``, ``nrn_tails_dedup``: each group of near-identical latents counted once,
    by its representative; needs the ``duplicate_group`` column). ``mas_dominant`` counts live
    features per model (``mas_dominant_dedup`` per group).
    """
    names = list(model_names)
    model_index(names, base, "base")
    if liveness not in LIVENESS_SOURCES:
        raise ProbeError(f"liveness {liveness!r} is not one of {LIVENESS_SOURCES}")
    tuned = [name for name in names if name != base]
    needed = ["dead", "mas_dominant", "duplicate_group"] + [
        f"{kind}_{name}" for name in tuned for kind in ("nrn", "category")
    ]
    missing = [column for column in needed if column not in table.column_names]
    if missing:
        raise ProbeError(
            f"table lacks columns {missing} for base {base!r} and models {names}; "
            f"it has {table.column_names} (make it with feature_table)"
        )
    for t in nrn_tails:
        if not 0.5 <= t < 1:
            raise ProbeError(f"nrn_tails must be thresholds in [0.5, 1), got {t!r}")
    dead = np.asarray(table.column("dead").to_pylist(), dtype=bool)
    live = ~dead
    group = np.asarray(table.column("duplicate_group").to_numpy(zero_copy_only=False), dtype=np.int64)
    representative = live & (group == np.arange(group.size))
    out: dict[str, Any] = {
        "base": base,
        "n_features": int(table.num_rows),
        "liveness": liveness,
        "n_dead": None if liveness == "unknown" else int(dead.sum()),
        "n_zero_decoder": int(dead.sum()) if liveness == "unknown" else None,
        "n_duplicate_groups": int(representative.sum()),
        "n_features_in_duplicate_groups": int(
            (live & (np.bincount(group[live], minlength=group.size)[np.maximum(group, 0)] > 1)).sum()
        ),
        "models": {},
    }
    for name in tuned:
        score = np.asarray(table.column(f"nrn_{name}").to_numpy(zero_copy_only=False), dtype=float)
        category = np.asarray(table.column(f"category_{name}").to_pylist(), dtype=object)
        counted = score[live & np.isfinite(score)]
        out["models"][name] = {
            "n": int(counted.size),
            "categories": _category_counts(category[live]),
            "categories_dedup": _category_counts(category[representative]),
            "nrn_tails": _tail_counts(counted, nrn_tails),
            "nrn_tails_dedup": _tail_counts(score[representative & np.isfinite(score)], nrn_tails),
            "nrn_mean": float(counted.mean()) if counted.size else None,
            "nrn_median": float(np.median(counted)) if counted.size else None,
        }
    dominant = np.asarray(table.column("mas_dominant").to_pylist(), dtype=object)
    out["mas_dominant"] = {name: int((dominant[live] == name).sum()) for name in names}
    out["mas_dominant_dedup"] = {name: int((dominant[representative] == name).sum()) for name in names}
    return out


def _category_counts(labels: np.ndarray) -> dict[str, int]:
    """NormRatio category counts of live features; "dead" labels there mean an undefined pair."""
    return {
        **{c: int((labels == c).sum()) for c in CATEGORIES if c != "dead"},
        "undefined": int((labels == "dead").sum()),
    }


def _tail_counts(scores: np.ndarray, tails: Sequence[float]) -> dict[str, int]:
    """Counts of NRN > t and NRN < 1 - t for every t."""
    counts: dict[str, int] = {}
    for t in tails:
        counts[f"nrn>{t:g}"] = int((scores > t).sum())
        counts[f"nrn<{1 - t:g}"] = int((scores < 1 - t).sum())
    return counts
