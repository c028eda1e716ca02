"""Capture residual streams of one or several models on identical token batches.

Tokens kept (docs/methods.md sec. 1): real tokens only, without the first position of every sequence and
without BOS tokens; optionally without norm outliers (norm > k x median, jointly over models, so
paired activations stay aligned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from posttrain_probe.data import TokenBatch
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import truncated_forward


class CapturedTokens(NamedTuple):
    """Selected tokens of one batch with the residual streams of every model at every layer."""

    acts: dict[int, torch.Tensor]
    """layer -> [n, n_models, d] activations (model dtype, on the first model's device)."""
    token_ids: torch.Tensor
    """[n] int64 token ids (CPU)."""
    doc_ids: torch.Tensor
    """[n] int64 document index (CPU)."""
    positions: torch.Tensor
    """[n] int64 position of the token in its sequence, 0 = first real token (CPU)."""


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token among the real tokens of its row (0-based; padding gets -1)."""
    return attention_mask.long().cumsum(dim=1) - 1


def select_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bos_token_id: int | None) -> torch.Tensor:
    """[B, T] bool mask of tokens to keep: real, not the first of its sequence, not BOS."""
    keep = attention_mask.bool() & (token_positions(attention_mask) > 0)
    if bos_token_id is not None:
        keep &= input_ids != bos_token_id
    return keep


def outlier_mask(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """[n] bool: tokens whose norm is <= ``factor`` x the median norm in every model; acts [n, N, d]."""
    if factor <= 0:
        raise ProbeError(f"outlier factor must be > 0, got {factor}")
    norms = acts.float().norm(dim=-1)  # [n, N]
    median = norms.median(dim=0).values  # [N]
    return (norms <= factor * median).all(dim=1)


@torch.no_grad()
def capture_batch(
    models: Sequence[nn.Module],
    batch: TokenBatch,
    layers: Sequence[int],
    *,
    bos_token_id: int | None,
    outlier_factor: float | None = None,
    max_tokens: int | None = None,
) -> CapturedTokens:
    """Paired truncated forwards of ``models`` on ``batch``; returns the selected tokens' activations.

    Every model sees the same input ids; inputs are moved to each model's device and outputs are
    gathered on the first model's device. ``max_tokens`` keeps only the first n selected tokens.
    """
    if not models:
        raise ProbeError("capture needs at least one model")
    keep = select_tokens(batch.input_ids, batch.attention_mask, bos_token_id=bos_token_id)
    home = _device_of(models[0])
    per_model: list[dict[int, torch.Tensor]] = []
    for model in models:
        device = _device_of(model)
        out = truncated_forward(model, batch.input_ids.to(device), batch.attention_mask.to(device), layers)
        per_model.append(out)
    keep_dev = keep.to(home)
    acts = {layer: torch.stack([out[layer].to(home)[keep_dev] for out in per_model], dim=1) for layer in layers}
    rows, cols = keep.nonzero(as_tuple=True)
    token_ids = batch.input_ids[rows, cols]
    doc_ids = batch.doc_ids[rows]
    positions = token_positions(batch.attention_mask)[rows, cols]
    if outlier_factor is not None and token_ids.numel():
        ok = torch.ones(token_ids.numel(), dtype=torch.bool, device=home)
        for layer_acts in acts.values():
            ok &= outlier_mask(layer_acts, outlier_factor)
        acts = {layer: value[ok] for layer, value in acts.items()}
        ok = ok.cpu()
        token_ids, doc_ids, positions = token_ids[ok], doc_ids[ok], positions[ok]
    if max_tokens is not None and token_ids.numel() > max_tokens:
        acts = {layer: value[:max_tokens] for layer, value in acts.items()}
        token_ids, doc_ids, positions = token_ids[:max_tokens], doc_ids[:max_tokens], positions[:max_tokens]
    return CapturedTokens(acts, token_ids, doc_ids, positions)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
