"""Planted dictionaries: paired activations built from known feature directions, and how well a trained
crosscoder recovers them. The ground truth for crosscoder quality checks (tests, benchmarks/quality.py).

A planted dictionary over N models has K features; feature k has an owner set (the models it
exists in) and a direction d_k^m [d] (unit norm) in each owner, slightly rotated between owners. A
token activates feature k with probability p_k (log-uniform over a 30x range, scaled so that the
mean number of active features per token is ``true_l0``), magnitude 0.5 + Exp(1), the same
coefficient in every owner: x^m = sum_k c_k d_k^m + noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from posttrain_probe.errors import ProbeError


class PlantedDictionary(NamedTuple):
    """Known features of a planted activation distribution."""

    directions: torch.Tensor
    """[K, N, d] unit direction d_k^m of feature k in model m (zero where m does not own k)."""
    owners: torch.Tensor
    """[K, N] bool: model m has feature k."""
    probabilities: torch.Tensor
    """[K] firing probability per token (sum = the true mean L0)."""
    noise: float
    """Standard deviation of the isotropic Gaussian noise added to every model's activation."""

    @property
    def true_l0(self) -> float:
        """Mean number of active planted features per token."""
        return float(self.probabilities.sum())

    def sample(self, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """Activations x [n_tokens, N, d] (float32) drawn from the planted distribution."""
        k, n, d = self.directions.shape
        active = torch.rand(n_tokens, k, generator=generator) < self.probabilities
        magnitude = 0.5 + torch.empty(n_tokens, k).exponential_(1.0, generator=generator)
        x = (active * magnitude) @ self.directions.flatten(1)
        x = x + self.noise * torch.randn(n_tokens, n * d, generator=generator)
        return x.view(n_tokens, n, d)


def planted_dictionary(
    *,
    n_models: int = 2,
    d_model: int = 256,
    per_model: int = 300,
    exclusive_fraction: float = 1 / 3,
    true_l0: float = 10.8,
    rotation: float = 0.08,
    noise: float = 0.01,
    seed: int = 0,
) -> PlantedDictionary:
    """A planted dictionary: ``per_model`` features per model, of which ``exclusive_fraction`` are exclusive to
    that model and the rest shared by all models (each owner's copy rotated by ``rotation`` noise, cos ~0.9+).

    K = shared + N * exclusive features; firing probabilities are log-uniform over a 30x range
    scaled so that their sum is ``true_l0``. Deterministic in ``seed``.
    """
    if n_models < 1 or d_model < 2 or per_model < 1 or not 0 <= exclusive_fraction <= 1:
        raise ProbeError(
            f"planted_dictionary needs n_models >= 1, d_model >= 2, per_model >= 1 and exclusive_fraction in [0, 1], "
            f"got {n_models}, {d_model}, {per_model}, {exclusive_fraction}"
        )
    g = torch.Generator().manual_seed(seed)
    n_exclusive = round(per_model * exclusive_fraction) if n_models > 1 else 0
    n_shared = per_model - n_exclusive
    owners = [tuple(range(n_models))] * n_shared + [(m,) for m in range(n_models) for _ in range(n_exclusive)]
    directions = torch.zeros(len(owners), n_models, d_model)
    owned = torch.zeros(len(owners), n_models, dtype=torch.bool)
    for k, own in enumerate(owners):
        v = F.normalize(torch.randn(d_model, generator=g), dim=0)
        for m in own:
            directions[k, m] = (
                F.normalize(v + rotation * torch.randn(d_model, generator=g), dim=0) if len(own) > 1 else v
            )
            owned[k, m] = True
    log_p = torch.rand(len(owners), generator=g) * torch.log(torch.tensor(30.0))
    probabilities = log_p.exp()
    probabilities = (probabilities * true_l0 / probabilities.sum()).clamp(max=1.0)
    return PlantedDictionary(directions, owned, probabilities, noise)


class Recovery(NamedTuple):
    """How well a decoder recovers a planted dictionary, per model (slot order)."""

    recovered: list[float]
    """Fraction of model m's planted directions matched by some latent's decoder d_i^m at cosine > ``threshold``."""
    exclusive_as_exclusive: list[float]
    """Fraction of model m's exclusive planted features whose best-matching latent is exclusive to m
    (its decoder norm in m is at least 90% of its summed norms over the models); NaN without exclusives."""


def recovery(planted: PlantedDictionary, W_dec: torch.Tensor, *, threshold: float = 0.9) -> Recovery:
    """Match planted directions against a crosscoder decoder ``W_dec`` [F, N, d] (any units): see :class:`Recovery`."""
    k, n, d = planted.directions.shape
    if W_dec.ndim != 3 or tuple(W_dec.shape[1:]) != (n, d):
        raise ProbeError(
            f"recovery expects a decoder [F, {n}, {d}] for this planted dictionary, got {tuple(W_dec.shape)}"
        )
    W = W_dec.detach().float().cpu()
    norms = W.norm(dim=-1)  # [F, N]
    share = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)
    exclusive = planted.owners.sum(-1) == 1
    recovered, as_exclusive = [], []
    for m in range(n):
        mine = planted.owners[:, m]
        cos = F.normalize(planted.directions[mine, m], dim=-1) @ F.normalize(W[:, m], dim=-1).T  # [K_m, F]
        best, best_latent = cos.max(dim=-1)
        recovered.append(float((best > threshold).float().mean()))
        only = exclusive[mine]
        if only.any():
            as_exclusive.append(float((share[best_latent[only], m] >= 0.9).float().mean()))
        else:
            as_exclusive.append(float("nan"))
    return Recovery(recovered, as_exclusive)
