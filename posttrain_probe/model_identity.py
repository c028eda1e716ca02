"""Which model a store or a crosscoder slot was made from: a fingerprint, and the check that refuses another model.

A fingerprint (:func:`model_fingerprint`) is a small JSON dict:

- ``architecture``: the class of the causal LM (``Qwen3ForCausalLM``), ``model_type`` (``qwen3``);
- ``hidden_size``, ``num_hidden_layers``, ``vocab_size`` from the config (so a model loaded with
  ``keep_layers`` has the fingerprint of the full one);
- ``weights``: a sample of the input embedding, rows ``linspace(0, vocab - 1, 16)`` x the first 16
  columns, rounded to bfloat16 and stored as base64 of the little-endian bf16 bytes, and
  ``weights_sha256``, the sha256 of those bytes. Rounding to bf16 makes a bfloat16 copy and a
  float32 copy of one model agree (rounding fp32 -> bf16 is idempotent); a float16 copy may differ
  in a few values (double rounding), which the correlation below absorbs. The sample is None when
  the embedding is sharded across processes (ZeRO-3, FSDP): then only the config fields count.

:func:`check_model` compares a model with the fingerprint a crosscoder slot recorded. The fields
of the config must match. The weights match when their hashes are equal, or when the two samples
correlate (Pearson r >= :data:`SAME_FAMILY_R`): fine-tuning moves embeddings little, so a
checkpoint tuned from the slot's model (base vs instruct, RL steps) is accepted, while a model
trained from another initialisation (another seed, another release) correlates near 0 and is
refused.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import (
    _text_config,
    architecture_name,
    decoder_blocks,
    hidden_size,
    unwrap_model,
    validate_layer,
)

FINGERPRINT_VERSION = 1
SAMPLE_ROWS = 16
SAMPLE_COLS = 16
SAME_FAMILY_R = 0.5
"""Least Pearson correlation of the embedding samples of two models of one lineage (independent inits: ~0 +- 0.07)."""
_CONFIG_FIELDS = ("architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")
OVERRIDE_HINT = "pass allow_model_mismatch=True / --allow-model-mismatch to override"


def _config_int(config, *keys: str) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _embedding_sample(inner: nn.Module, vocab: int | None, hidden: int | None) -> torch.Tensor | None:
    """[rows, cols] bf16 CPU sample of the input embedding, or None when it is not whole on this process."""
    embed = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight).__name__ == "DTensor" or weight.ndim != 2:
        return None
    if (
        weight.device.type == "meta"
        or weight.untyped_storage().nbytes() == 0  # FSDP1 between forwards: a view of a freed flat parameter
        or (vocab is not None and weight.shape[0] < vocab)
        or (hidden is not None and weight.shape[1] != hidden)
    ):
        return None  # sharded (ZeRO-3 gives numel 0, FSDP flat views) or not materialised
    rows = torch.linspace(0, (vocab or weight.shape[0]) - 1, SAMPLE_ROWS).round().long().unique()
    with torch.no_grad():
        return weight.detach()[rows.to(weight.device), :SAMPLE_COLS].float().to(torch.bfloat16).cpu().contiguous()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The identity of ``model`` (through any training wrapper): architecture, sizes and a weight sample (module docstring)."""
    inner = unwrap_model(model)
    config = _text_config(inner)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    vocab = _config_int(config, "vocab_size")
    layers = _config_int(config, "num_hidden_layers", "n_layer")
    sample = _embedding_sample(inner, vocab, hidden)
    raw = None if sample is None else sample.view(torch.int16).numpy().astype("<i2").tobytes()
    return {
        "version": FINGERPRINT_VERSION,
        "architecture": architecture_name(inner),
        "model_type": getattr(config, "model_type", None)
        or getattr(getattr(inner, "config", None), "model_type", None),
        "hidden_size": hidden,
        "num_hidden_layers": layers if layers is not None else len(decoder_blocks(inner)),
        "vocab_size": vocab,
        "weights_sha256": None if raw is None else hashlib.sha256(raw).hexdigest(),
        "weights": None if raw is None else base64.b64encode(raw).decode("ascii"),
    }


def describe(fingerprint: Mapping[str, Any]) -> str:
    """``qwen3 (hidden 64, layers 4, vocab 512, weights 1a2b3c4d5e6f)``: a fingerprint for messages."""
    weights = (fingerprint.get("weights_sha256") or "unknown")[:12]
    kind = fingerprint.get("model_type") or fingerprint.get("architecture")
    return (
        f"{kind} ({fingerprint.get('architecture')}, hidden {fingerprint.get('hidden_size')}, layers "
        f"{fingerprint.get('num_hidden_layers')}, vocab {fingerprint.get('vocab_size')}, weights {weights})"
    )


def _sample(fingerprint: Mapping[str, Any]) -> torch.Tensor | None:
    data = fingerprint.get("weights")
    if not data:
        return None
    import numpy as np

    raw = np.frombuffer(base64.b64decode(data), dtype="<i2").copy()
    return torch.from_numpy(raw).view(torch.bfloat16).float()


def weight_correlation(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """Pearson r of the two embedding samples (None when either is missing or they differ in size)."""
    x, y = _sample(a), _sample(b)
    if x is None or y is None or x.shape != y.shape or x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x @ y) / denominator) if denominator > 0 else None


def mismatch(model: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The fields in which ``model`` differs from ``recorded`` (empty: the same model or one tuned from it)."""
    fields = [
        k
        for k in _CONFIG_FIELDS
        if model.get(k) is not None and recorded.get(k) is not None and model.get(k) != recorded.get(k)
    ]
    if fields:
        return fields
    if (
        model.get("weights_sha256")
        and recorded.get("weights_sha256")
        and model["weights_sha256"] != recorded["weights_sha256"]
    ):
        r = weight_correlation(model, recorded)
        if r is None or r < SAME_FAMILY_R:
            return ["weights"]
    return []


def slot_fingerprint(crosscoder, slot: int) -> dict[str, Any] | None:
    """The fingerprint crosscoder slot ``slot`` recorded, or None (older crosscoders, raw-tensor training)."""
    prints = getattr(crosscoder.config, "model_fingerprints", None)
    entry = prints[slot] if prints and slot < len(prints) else None
    if isinstance(entry, str):  # a bare weights hash
        return {"weights_sha256": entry}
    return dict(entry) if isinstance(entry, Mapping) else None


def check_model(
    model: nn.Module,
    recorded: Mapping[str, Any] | None,
    slot_name: str,
    *,
    what: str | None = None,
    allow_mismatch: bool = False,
    override: str | None = None,
) -> str | None:
    """Refuse ``model`` when it is not the model (or a tuned copy of it) that crosscoder slot ``slot_name``
    recorded as ``recorded`` (:func:`slot_fingerprint`).

    Returns None when it matches or nothing was recorded; with ``allow_mismatch`` a mismatch is
    returned as its message (for the caller to record) instead of raised as a ProbeError.
    ``what`` names the model in the message (default: its ``name_or_path``); ``override`` ends it, saying how
    to let the mismatch through (default :data:`OVERRIDE_HINT`: the Python argument and the CLI flag).
    """
    if recorded is None:
        return None
    have = model_fingerprint(model)
    fields = mismatch(have, recorded)
    if not fields:
        return None
    if what is None:
        where = getattr(unwrap_model(model), "name_or_path", "")
        what = f"the model at {where}" if where else "the model"
    name = slot_name
    r = weight_correlation(have, recorded) if fields == ["weights"] else None
    detail = (
        f" (weights differ: embedding correlation {r:.2f})" if r is not None else f" (differs in {', '.join(fields)})"
    )
    message = f"{what} is {describe(have)}, but crosscoder slot {name!r} was trained on {describe(recorded)}{detail}"
    if allow_mismatch:
        return message
    raise ProbeError(f"{message}; {override or OVERRIDE_HINT}")


def check_site_model(
    model: nn.Module,
    layer: int,
    d_model: int,
    recorded: Mapping[str, Any] | None,
    slot_name: str,
    *,
    what: str | None = None,
    allow_mismatch: bool = False,
    override: str | None = None,
) -> str | None:
    """Refuse ``model`` (through any wrapper) for crosscoder slot ``slot_name`` at site ``layer``: no block
    ``layer``, a hidden size other than the crosscoder's ``d_model``, or another model than the one the slot
    recorded as ``recorded`` (nor tuned from it; :func:`check_model`, which gives the return value). ``what``
    names the model in every message."""
    inner = unwrap_model(model)
    named = f"{what}: " if what else ""
    try:
        validate_layer(inner, layer)
    except ProbeError as err:
        raise ProbeError(f"{named}{err}") from None
    if hidden_size(inner) != d_model:
        raise ProbeError(
            f"{named}the crosscoder has d_model {d_model}, the model's hidden size is {hidden_size(inner)}: "
            "expected the models the crosscoder was trained on"
        )
    return check_model(inner, recorded, slot_name, what=what, allow_mismatch=allow_mismatch, override=override)


def source_fingerprints(source) -> list[dict[str, Any] | None] | None:
    """Per model slot, the fingerprint of the model a crosscoder source was made from: from the store
    manifests of a PairedActivations / ActivationStore, from the models of a LiveActivations; None when
    none is known (stores written before fingerprints, raw tensors)."""
    if hasattr(source, "stores"):
        prints = [store.manifest.model.get("fingerprint") for store in source.stores.values()]
    elif hasattr(source, "models"):
        prints = [model_fingerprint(model) for model in source.models.values()]
    elif hasattr(source, "manifest"):
        prints = [source.manifest.model.get("fingerprint")]
    else:
        return None
    return prints if any(p is not None for p in prints) else None


def check_model_path(
    path, recorded: Mapping[str, Any] | None, slot_name: str, *, allow_mismatch: bool = False
) -> str | None:
    """:func:`check_model` for a model directory / hub name, before a step hands the path on (lm-eval runs):
    loads it on the CPU in bfloat16 without its decoder blocks (nothing is loaded when nothing was recorded)."""
    if recorded is None:
        return None
    from posttrain_probe.models import load_causal_lm

    model = load_causal_lm(path, dtype=torch.bfloat16, device="cpu", keep_layers=-1)
    try:
        return check_model(model, recorded, slot_name, what=f"the model at {path}", allow_mismatch=allow_mismatch)
    finally:
        del model
