"""Per-feature attribution metrics of a crosscoder's decoder (docs/methods.md sec. 4).

Every function here is a pure function of decoder tensors, vectorised over features:

- ``W_dec`` has shape ``[F, N, d]``: ``W_dec[i, m]`` is the decoder vector d_i^m of feature i for
  model slot m, in the crosscoder's **normalised units** (inputs scaled by s_m, docs/methods.md sec. 2). The
  papers' metrics are defined on these vectors; norms and ratios below are in those units.
- Models are given by slot index (``0 <= m < N``); resolving names to slots is the caller's job
  (:mod:`posttrain_probe.analysis.features` does it from ``cc.config.model_names``).
- Dead features (every decoder norm involved is 0) give NaN, never a made-up number, so that
  counts can exclude them.

Paper R = "SFT vs RL" (rl-generalization.txt), paper S = "SFT robustness" (sft-robustness.txt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from posttrain_probe.analysis.analyze_config import NORM_RATIO_SCALES
from posttrain_probe.errors import ProbeError

BASE_ONLY_ABOVE = 0.6
"""NormRatio above which a feature is "base-only" (paper S, sec. 2)."""
FINETUNE_ONLY_BELOW = 0.4
"""NormRatio below which a feature is "finetune-only" (paper S, sec. 2); [0.4, 0.6] is "shared"."""
CATEGORIES = ("base-only", "shared", "finetune-only", "dead")
"""The labels :func:`categorize` returns."""


def _decoder(W_dec: torch.Tensor, what: str = "W_dec") -> torch.Tensor:
    """Check that ``W_dec`` is a floating [F, N, d] tensor; return it detached, at least fp32."""
    if not isinstance(W_dec, torch.Tensor):
        W_dec = torch.as_tensor(np.asarray(W_dec))
    if W_dec.ndim != 3 or min(W_dec.shape) < 1:
        raise ProbeError(
            f"{what} must be a decoder tensor of shape [F, N, d] (features, models, d_model) "
            f"with no empty dimension, got shape {tuple(W_dec.shape)}"
        )
    if not W_dec.is_floating_point():
        raise ProbeError(f"{what} must be a floating-point tensor, got dtype {W_dec.dtype}")
    W_dec = W_dec.detach()
    if W_dec.dtype in (torch.float16, torch.bfloat16):
        W_dec = W_dec.float()
    return W_dec


def _slot(index: int, n_models: int, what: str) -> int:
    """Check a model slot index against N."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ProbeError(f"{what} must be a model slot index (int), got {index!r}")
    if not 0 <= int(index) < n_models:
        raise ProbeError(f"{what}={index} is out of range: the decoder has {n_models} model slots (0..{n_models - 1})")
    return int(index)


def _pair(W_dec: torch.Tensor, a: int, b: int, names: tuple[str, str]) -> tuple[torch.Tensor, int, int]:
    W_dec = _decoder(W_dec)
    a = _slot(a, W_dec.shape[1], names[0])
    b = _slot(b, W_dec.shape[1], names[1])
    if a == b:
        raise ProbeError(f"{names[0]} and {names[1]} must be different model slots, both are {a}")
    return W_dec, a, b


def _order(p: float) -> float:
    """Check a norm order: a positive real number (or inf)."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or math.isnan(p) or p <= 0:
        raise ProbeError(f"norm order p must be a number > 0 (1 = L1, 2 = L2, inf = max), got {p!r}")
    return float(p)


def decoder_norms(W_dec: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Norms ||d_i^m||_p of every decoder vector (docs/methods.md sec. 4; the building block of NRN, MAS, NormRatio).

    Args:
        W_dec: decoder ``[F, N, d]``, crosscoder-normalised units.
        p: norm order, > 0 (1 = L1, 2 = L2, ``math.inf`` = max).

    Returns:
        ``[F, N]`` norms, in the crosscoder's normalised units, on ``W_dec``'s device.
    """
    W_dec = _decoder(W_dec)
    return torch.linalg.vector_norm(W_dec, ord=_order(p), dim=-1)


def nrn(W_dec: torch.Tensor, base: int, tuned: int, p: float = 1) -> torch.Tensor:
    """Normalized Relative Norm, paper R eq. 4: NRN_i = ||d_i^T||_p / (||d_i^O||_p + ||d_i^T||_p).

    O = ``base``, T = ``tuned``. 1 = tuned-only, 0 = base-only, 0.5 = shared. The paper uses p = 1;
    p = 2 gives the Lindsey et al. / Kissane et al. relative norm.

    Args:
        W_dec: decoder ``[F, N, d]``, crosscoder-normalised units.
        base, tuned: model slot indices (distinct).
        p: norm order, > 0.

    Returns:
        ``[F]`` dimensionless scores in [0, 1]; NaN where both norms are 0 (dead feature).
    """
    W_dec, base, tuned = _pair(W_dec, base, tuned, ("base", "tuned"))
    norms = decoder_norms(W_dec, p)
    n_base, n_tuned = norms[:, base], norms[:, tuned]
    total = n_base + n_tuned
    return torch.where(total > 0, n_tuned / total, torch.full_like(total, math.nan))


def mas(W_dec: torch.Tensor, p: float = 1) -> torch.Tensor:
    """Model Attribution Score, paper R eqs. 8-10: MAS_m(i) = ||d_i^m||_p / sum_m' ||d_i^m'||_p.

    Generalises the paper's three-model form to any N; the paper uses p = 1. Each row sums to 1;
    the feature is attributed to argmax_m (see :func:`mas_dominant`).

    Args:
        W_dec: decoder ``[F, N, d]``, crosscoder-normalised units.
        p: norm order, > 0.

    Returns:
        ``[F, N]`` dimensionless scores in [0, 1]; a row of NaN where every norm is 0 (dead feature).
    """
    norms = decoder_norms(W_dec, p)
    total = norms.sum(dim=1, keepdim=True)
    return torch.where(total > 0, norms / total, torch.full_like(norms, math.nan))


def mas_dominant(mas: torch.Tensor) -> torch.Tensor:
    """The model each feature is attributed to, paper R sec. 6: argmax_m MAS_m(i).

    Args:
        mas: ``[F, N]`` scores from :func:`mas`.

    Returns:
        ``[F]`` int64 model slot indices; -1 for dead features (NaN rows). Ties go to the lower slot.
    """
    if not isinstance(mas, torch.Tensor):
        mas = torch.as_tensor(np.asarray(mas))
    if mas.ndim != 2 or min(mas.shape) < 1:
        raise ProbeError(f"mas must be a [F, N] score matrix (from mas()), got shape {tuple(mas.shape)}")
    dead = torch.isnan(mas).all(dim=1)
    winner = torch.nan_to_num(mas, nan=-1.0).argmax(dim=1)
    return torch.where(dead, torch.full_like(winner, -1), winner)


def norm_ratio(W_dec: torch.Tensor, base: int, finetuned: int, scale: str = "all") -> torch.Tensor:
    """NormRatio, paper S eq. 2: ((||d_i^base||_2 - ||d_i^ft||_2) / max ||d_j^m||_2 + 1) / 2.

    ``scale`` chooses the maximum in the denominator (docs/methods.md sec. 4, **choice**):

    - ``"all"`` (default): max over all features j and **all** model slots m of the crosscoder;
    - ``"pair"``: max over all features j and the **two compared** slots (``base``, ``finetuned``)
      only, paper S's form read literally for its two-model crosscoders.

    The two agree for a two-model crosscoder; with more models, ``"all"`` keeps one scale for every
    pair of one crosscoder, ``"pair"`` rescales each pair to fill [0, 1]. **The direction is
    opposite to NRN**: near 1 = base-only, near 0 = fine-tune-only, 0.5 = equal norms. Exactly 1 for a
    feature whose fine-tuned decoder is zero and whose base norm is the maximum.

    Args:
        W_dec: decoder ``[F, N, d]``, crosscoder-normalised units.
        base, finetuned: model slot indices (distinct).
        scale: one of :data:`NORM_RATIO_SCALES`.

    Returns:
        ``[F]`` dimensionless scores in [0, 1]; NaN where both norms are 0 (dead feature).
    """
    if scale not in NORM_RATIO_SCALES:
        raise ProbeError(
            f"NormRatio scale {scale!r} is not one of {NORM_RATIO_SCALES} (all: max over every model slot; pair: over the two compared)"
        )
    W_dec, base, finetuned = _pair(W_dec, base, finetuned, ("base", "finetuned"))
    norms = decoder_norms(W_dec, 2)
    n_base, n_ft = norms[:, base], norms[:, finetuned]
    top = norms.max() if scale == "all" else torch.maximum(n_base.max(), n_ft.max())
    ratio = ((n_base - n_ft) / top.clamp_min(torch.finfo(norms.dtype).tiny) + 1) / 2
    return torch.where((n_base + n_ft) > 0, ratio, torch.full_like(ratio, math.nan))


def decoder_cosine(W_dec: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Cosine similarity cos(d_i^a, d_i^b) of one feature's decoders in two models (paper S sec. 3, fig. 1).

    Args:
        W_dec: decoder ``[F, N, d]`` (cosine is scale-free, so units do not matter).
        a, b: model slot indices (distinct).

    Returns:
        ``[F]`` values in [-1, 1]; NaN where either decoder vector is 0.
    """
    W_dec, a, b = _pair(W_dec, a, b, ("a", "b"))
    da, db = W_dec[:, a], W_dec[:, b]
    denom = torch.linalg.vector_norm(da, dim=-1) * torch.linalg.vector_norm(db, dim=-1)
    cos = (da * db).sum(dim=-1) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, cos.clamp(-1.0, 1.0), torch.full_like(cos, math.nan))


def categorize(
    norm_ratio: torch.Tensor | np.ndarray | Sequence[float],
    *,
    base_only_above: float = BASE_ONLY_ABOVE,
    finetune_only_below: float = FINETUNE_ONLY_BELOW,
) -> np.ndarray:
    """NormRatio categories of paper S sec. 2 (eq. 2 bands).

    "base-only" if NormRatio > ``base_only_above`` (0.6), "finetune-only" if < ``finetune_only_below``
    (0.4), "shared" in between, edges included; "dead" for NaN. The edges are compared in the
    input's own float precision, so a float32 0.6 is "shared".

    Args:
        norm_ratio: ``[F]`` scores from :func:`norm_ratio`.

    Returns:
        ``[F]`` numpy array of str (one of :data:`CATEGORIES`).
    """
    if not finetune_only_below <= base_only_above:
        raise ProbeError(
            f"finetune_only_below ({finetune_only_below}) must not exceed base_only_above ({base_only_above})"
        )
    if isinstance(norm_ratio, torch.Tensor):
        values = norm_ratio.detach().cpu()
        values = (values.float() if values.dtype in (torch.float16, torch.bfloat16) else values).numpy()
    else:
        values = np.asarray(norm_ratio)
    if values.ndim != 1:
        raise ProbeError(f"norm_ratio must be a 1-d [F] array, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        try:
            values = values.astype(float)
        except (TypeError, ValueError) as error:
            raise ProbeError(f"norm_ratio must hold numbers, got dtype {values.dtype}") from error
    high = np.asarray(base_only_above, dtype=values.dtype)
    low = np.asarray(finetune_only_below, dtype=values.dtype)
    out = np.full(values.shape, "shared", dtype=object)
    out[values > high] = "base-only"
    out[values < low] = "finetune-only"
    out[np.isnan(values)] = "dead"
    return out.astype(str)


def latent_scaling(f: torch.Tensor, Y: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Latent scaling of Minder et al. (2025), docs/methods.md sec. 4: beta_j^m = <Y^m, f_j d_j^m> / (||f_j||^2 ||d_j^m||^2).

    beta_j^m is the least-squares coefficient of the rank-one fit Y^m ~ beta f_j (d_j^m)^T, i.e. how
    much of the target Y^m of model m is explained by feature j's activations along its own decoder
    direction. Used with the reconstruction error (Y = ã - â) and with the reconstruction (Y = â)
    of each model as targets; for a tuned-only feature j, a ratio beta_j^base / beta_j^tuned ~ 0
    says the base model genuinely lacks the feature, while a ratio near 1 flags an artifact of the
    L1 objective ("complete shrinkage" for the error target, "latent decoupling" for the
    reconstruction target). If feature j's own contribution f_j d_j^m is to be removed from a
    reconstruction target, subtract 1 from beta_j^m (the fit is linear in Y). An optional
    diagnostic; computed with two matmuls, no loop over features.

    Args:
        f: feature activations ``[T, F]`` over T tokens (e.g. ``cc.encode(x)``).
        Y: targets ``[T, N, d]`` in the crosscoder's **normalised units** (the same units as W_dec).
        W_dec: decoder ``[F, N, d]``, crosscoder-normalised units.

    Returns:
        ``[F, N]`` dimensionless coefficients; NaN where f_j is zero on every token or d_j^m = 0.
    """
    W_dec = _decoder(W_dec)
    n_features, n_models, d_model = W_dec.shape
    if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[1] != n_features:
        raise ProbeError(
            f"f must be a [T, F] tensor of feature activations with F = {n_features}, "
            f"got {tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}"
        )
    if (
        not isinstance(Y, torch.Tensor)
        or Y.ndim != 3
        or tuple(Y.shape[1:]) != (n_models, d_model)
        or Y.shape[0] != f.shape[0]
    ):
        raise ProbeError(
            f"Y must be a [T, N, d] target tensor with T = {f.shape[0]} (rows of f), N = {n_models}, d = {d_model}, "
            f"got {tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__}"
        )
    dtype = W_dec.dtype
    f = f.detach().to(W_dec.device, dtype)
    Y = Y.detach().to(W_dec.device, dtype)
    # <Y^m, f_j d_j^m>_F = sum_t f_tj <Y_t^m, d_j^m> = ((f^T Y^m) . d_j^m) summed over d
    fY = (f.T @ Y.reshape(Y.shape[0], n_models * d_model)).reshape(n_features, n_models, d_model)
    numerator = (fY * W_dec).sum(dim=-1)
    denominator = (f * f).sum(dim=0)[:, None] * (W_dec * W_dec).sum(dim=-1)
    beta = numerator / denominator.clamp_min(torch.finfo(dtype).tiny)
    return torch.where(denominator > 0, beta, torch.full_like(beta, math.nan))
