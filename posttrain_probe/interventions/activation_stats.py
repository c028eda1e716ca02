"""Activation statistics of a crosscoder branch over a reference corpus: per feature, the max of its
per-source code f^m (what ``steer`` multiplies, docs/methods.md sec. 7) and its firing rate (the
frequency-matched controls, docs/methods.md sec. 11), in one pass, cached next to the crosscoder."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint
from posttrain_probe.crosscoder.inspect import as_crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import architecture_name, decoder_blocks, hidden_size, unwrap_model, validate_layer
from posttrain_probe.model_identity import check_model, slot_fingerprint

_MAX_ACTS_VERSION = 2  # 2: the cache file holds the firing frequency beside the max
_CHUNK_TOKENS = 2048  # tokens encoded at once


@dataclass(frozen=True)
class ReferenceReading:
    """How a dataset spec is read as the reference corpus (token batches given directly ignore it)."""

    seq_len: int = 512
    """Tokens per document (longer ones are cut)."""
    batch_size: int = 8
    """Documents per forward."""
    n_docs: int | None = None
    """Documents read (None: all)."""
    column: str | None = None
    """Text or chat-messages column (default: the first of text, messages, content, prompt, question)."""
    split: str = "train"
    """Dataset split."""
    dataset_config: str | None = None
    """Dataset config name (hub datasets)."""


def max_activations(
    crosscoder, model_name: str | int, model: nn.Module | str | os.PathLike, data, **kwargs: Any
) -> torch.Tensor:
    """``[F]`` float32 (CPU): max over a reference corpus of each feature's per-source code f^m
    (code units), the quantity ``steer`` multiplies (docs/methods.md sec. 7, paper S B.3).

    The ``max_activation`` of :func:`source_activation_stats` (same arguments, same cache).
    """
    return source_activation_stats(crosscoder, model_name, model, data, **kwargs).max_activation


@torch.no_grad()
def source_activation_stats(
    crosscoder,
    model_name: str | int,
    model: nn.Module | str | os.PathLike,
    data,
    *,
    tokenizer=None,
    reading: ReferenceReading = ReferenceReading(),
    layer: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    allow_model_mismatch: bool = False,
):
    """Firing frequency and max of each feature's per-source code f^m over a reference corpus, in one pass
    (docs/methods.md sec. 7 steer, sec. 11 frequency-matched controls).

    ``crosscoder``: a ``Crosscoder`` or its directory; ``model_name``: its branch m; ``model``: the
    HF causal LM of that branch (or a path). ``data``: a dataset spec as
    :func:`~posttrain_probe.data.load_dataset_spec` takes it (read as ``reading`` says, :class:`ReferenceReading`,
    and tokenised with ``tokenizer``), or token batches (``TokenBatch``es,
    dicts with ``input_ids`` [B, T] and optional ``attention_mask``, or [B, T] id tensors).
    Tokens counted are those the crosscoder was trained on: real tokens, not the first position,
    not BOS (docs/methods.md sec. 1). Truncated forwards stop at block ``layer``.

    Returns:
        :class:`~posttrain_probe.analysis.features.FeatureStats` (CPU): ``frequency`` ``[F]`` float64,
        the fraction of counted tokens with f_i^m > 0; ``max_activation`` ``[F]`` float32, the largest
        f_i^m (code units, 0 for a feature that never fired); ``n_tokens``.

    A model other than the branch's (nor tuned from it) is refused unless ``allow_model_mismatch``
    (:mod:`posttrain_probe.model_identity`).

    Cached on disk in ``cache_dir`` (default: ``<crosscoder dir>/max_activations/``; an in-memory
    crosscoder without ``cache_dir`` is not cached), keyed by the crosscoder fingerprint, branch,
    model fingerprint (config + a strided sample of every weight), data fingerprint and layer.
    """
    cc, path = as_crosscoder(crosscoder)
    slot = cc.model_index(model_name)
    layer = cc.site(layer, what="the activation statistics")
    if layer is None:
        raise ProbeError("the crosscoder does not record its layer: pass layer=")
    if isinstance(model, (str, os.PathLike)):
        from posttrain_probe.models import load_causal_lm, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_causal_lm(model, keep_layers=layer)
    validate_layer(model, layer)
    if hidden_size(model) != cc.config.d_model:
        raise ProbeError(
            f"the crosscoder has d_model {cc.config.d_model}, the model's hidden size is {hidden_size(model)}"
        )
    check_model(model, slot_fingerprint(cc, slot), cc.model_names[slot], allow_mismatch=allow_model_mismatch)
    batches, data_key = _reference_batches(data, tokenizer, model, reading)

    key = {
        "version": _MAX_ACTS_VERSION,
        "crosscoder": crosscoder_fingerprint(cc),
        "model_name": cc.model_names[slot],
        "model": _model_fingerprint(model, layer),
        "data": data_key,
        "layer": layer,
        "excluded": ["padding", "first position", "bos"],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if cache_dir is None and path is not None:
        cache_dir = path / "max_activations"
    cache_file = (
        Path(cache_dir) / f"max_activations_{digest[:24]}.safetensors" if cache and cache_dir is not None else None
    )
    if cache_file is not None and cache_file.exists():
        cached = _read_cache(cache_file, key)
        if cached is not None:
            return cached
    stats = _accumulate(cc, slot, model, layer, batches, tokenizer)
    if cache_file is not None:
        _write_cache(cache_file, key, stats)
    return stats


def _accumulate(cc, slot: int, model: nn.Module, layer: int, batches: Sequence, tokenizer):
    """FeatureStats of branch ``slot``'s per-source codes over ``batches`` (residual stream entering block
    ``layer``; padding, the first position and BOS dropped), encoded in chunks of ``_CHUNK_TOKENS`` tokens."""
    from posttrain_probe.activations.capture import capture_batch
    from posttrain_probe.analysis.features import FeatureStats
    from posttrain_probe.data import TokenBatch

    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    encoder = cc if cc.W_enc.device == device else copy.deepcopy(cc).to(device)
    bos = (
        getattr(tokenizer, "bos_token_id", None)
        if tokenizer is not None
        else getattr(inner.config, "bos_token_id", None)
    )
    best = torch.zeros(cc.config.n_features, dtype=torch.float32, device=device)
    fired = torch.zeros(cc.config.n_features, dtype=torch.int64, device=device)
    n_tokens = 0
    was_training = inner.training
    inner.eval()
    try:
        for batch in batches:
            if not isinstance(batch, TokenBatch):
                batch = TokenBatch(batch.input_ids, batch.attention_mask, torch.arange(batch.input_ids.shape[0]))
            acts = capture_batch([model], batch, [layer], bos_token_id=bos).acts[layer][:, 0]  # [n, d]
            n_tokens += acts.shape[0]
            for chunk in acts.split(_CHUNK_TOKENS) if acts.shape[0] else ():
                codes = encoder.encode_source(chunk.to(encoder.W_enc.dtype), slot)
                best = torch.maximum(best, codes.max(dim=0).values.float())
                fired += (codes > 0).sum(dim=0)
    finally:
        inner.train(was_training)
    if n_tokens == 0:
        raise ProbeError("the reference data gave no tokens (after dropping padding, the first position and BOS)")
    return FeatureStats(fired.cpu().double() / n_tokens, best.cpu(), n_tokens)


def _read_cache(cache_file: Path, key: Mapping[str, Any]):
    """The FeatureStats cached in ``cache_file`` under ``key`` (None when the file holds another key)."""
    from safetensors import safe_open

    from posttrain_probe.analysis.features import FeatureStats

    with safe_open(str(cache_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("key") == json.dumps(key, sort_keys=True):
            return FeatureStats(
                handle.get_tensor("frequency"), handle.get_tensor("max_activations"), int(metadata["n_tokens"])
            )
    return None


def _write_cache(cache_file: Path, key: Mapping[str, Any], stats) -> None:
    """Write ``stats`` to ``cache_file`` under ``key`` (through a temporary file, replaced at once)."""
    from safetensors.torch import save_file

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".tmp")
    save_file(
        {"max_activations": stats.max_activation, "frequency": stats.frequency},
        str(partial),
        metadata={"key": json.dumps(key, sort_keys=True), "n_tokens": str(stats.n_tokens)},
    )
    os.replace(partial, cache_file)


class _Batch:
    __slots__ = ("input_ids", "attention_mask")

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ProbeError(
                f"token batches must hold input_ids of shape [B, T], got {getattr(input_ids, 'shape', type(input_ids).__name__)}"
            )
        self.input_ids = input_ids.long()
        self.attention_mask = torch.ones_like(self.input_ids) if attention_mask is None else attention_mask.long()


def _reference_batches(data, tokenizer, model, reading: ReferenceReading) -> tuple[list, dict]:
    """(batches, fingerprint dict) of a dataset spec or of token batches (materialised to hash them)."""
    from posttrain_probe.data import TokenBatch, dataset_fingerprint, load_dataset_spec, token_batches

    loaded_datasets = sys.modules.get("datasets")  # a Dataset can only exist once `datasets` is imported
    spec_like = (
        isinstance(data, (str, os.PathLike))
        or (loaded_datasets is not None and isinstance(data, loaded_datasets.Dataset))
        or (
            isinstance(data, Sequence)
            and not isinstance(data, TokenBatch)
            and len(data) > 0
            and all(isinstance(t, str) for t in data)
        )
    )
    if spec_like:
        if tokenizer is None:
            source = getattr(unwrap_model(model), "name_or_path", "")
            if not source:
                raise ProbeError(
                    "a dataset spec needs tokenizer= (the model object does not name where its tokenizer is)"
                )
            from posttrain_probe.models import load_tokenizer

            tokenizer = load_tokenizer(source)
        from posttrain_probe.models import tokenizer_fingerprint

        r = reading
        dataset = load_dataset_spec(data, split=r.split, config_name=r.dataset_config, n_docs=r.n_docs)
        key = {
            "dataset": dataset_fingerprint(dataset, r.column),
            "n_docs": len(dataset),
            "seq_len": r.seq_len,
            "column": r.column,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        return list(token_batches(dataset, tokenizer, column=r.column, seq_len=r.seq_len, batch_size=r.batch_size)), key
    if isinstance(data, (torch.Tensor, TokenBatch, Mapping)):
        data = [data]
    batches = []
    digest = hashlib.sha256()
    for item in data:
        if isinstance(item, TokenBatch):
            batch = item
        elif isinstance(item, Mapping):
            batch = _Batch(item.get("input_ids"), item.get("attention_mask"))
        else:
            batch = _Batch(item, None)
        ids = torch.where(batch.attention_mask.bool(), batch.input_ids, -1).cpu()
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(memoryview(ids.contiguous().numpy()).cast("B"))
        batches.append(batch)
    if not batches:
        raise ProbeError("no reference data: expected a dataset spec or at least one token batch")
    return batches, {"token_batches": digest.hexdigest()}


def _model_fingerprint(model: nn.Module, layer: int, samples_per_tensor: int = 1024) -> str:
    """sha256 of a model's class, config and a strided sample (float32) of every parameter except
    those of blocks >= ``layer``, which cannot change the residual stream entering block ``layer``
    (so a model loaded with ``keep_layers`` has the same fingerprint as the full one)."""
    inner = unwrap_model(model)
    digest = hashlib.sha256(architecture_name(inner).encode())
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    later = {id(p) for block in decoder_blocks(inner)[layer:] for p in block.parameters()}
    pieces = []
    for name, parameter in inner.named_parameters():
        if id(parameter) in later:
            continue
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        pieces.append(flat[::step][:samples_per_tensor].float())
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
    if pieces:
        sample = torch.cat(pieces).cpu().contiguous()
        digest.update(memoryview(sample.numpy()).cast("B"))
    return digest.hexdigest()
