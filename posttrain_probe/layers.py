"""Find the decoder blocks of HF causal LMs, through training wrappers, and run truncated forwards.

Site convention (docs/methods.md sec. 1): ``layer=L`` is the residual stream *entering* decoder block ``L``,
i.e. ``hidden_states[L]`` of a forward with ``output_hidden_states=True`` (the output of block
``L-1``; ``L=0`` is the embedding output). Valid sites are ``0 <= L < n_layers``: the last entry
of ``hidden_states`` is the final-norm output in HF, not a residual stream.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from posttrain_probe.errors import ProbeError
from posttrain_probe.fsdp_recovery import finish_aborted_forward, sharded_units_in_forward

# Attribute paths (from the unwrapped model) to the ModuleList of decoder blocks, most common first.
_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 (CausalLM), Phi-3, OLMo, ...
    "model.language_model.layers",  # Gemma 3 / Llava-style multimodal wrappers
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "layers",  # a bare decoder model (Qwen3Model, LlamaModel, ...)
    "h",  # a bare GPT2Model
)


def architecture_name(model: nn.Module) -> str:
    """The class name of the HF model inside ``model`` (``Qwen3ForCausalLM``), also under FSDP2, whose
    ``fully_shard`` gives the module a generated subclass ``FSDPQwen3ForCausalLM``."""
    cls = type(unwrap_model(model))
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return cls.__name__
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel training wrappers off a model until the HF causal LM itself is reached.

    Handles DDP/DataParallel (``.module``), DeepSpeed engines (``.module``), FSDP1
    (``FullyShardedDataParallel.module``; FSDP2 ``fully_shard`` keeps the module but swaps its class for a
    subclass ``FSDP<Class>``: :func:`architecture_name` reads through it), torch.compile
    (``._orig_mod``), accelerate's wrappers and PEFT (``PeftModel.get_base_model()``).
    Returns the innermost module; parameters are shared, nothing is copied.
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()  # PEFT: PeftModel -> LoraModel -> the HF model
        elif type(model).__name__ in {
            "DistributedDataParallel",
            "DataParallel",
            "DeepSpeedEngine",
            "PipelineEngine",
            "FullyShardedDataParallel",
        } and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


def _get_path(module: nn.Module, path: str) -> object | None:
    obj: object = module
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (any wrapper), as the model's own ``nn.ModuleList``.

    Raises ProbeError naming the model class when no block list can be found.
    """
    inner = unwrap_model(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(inner, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    # Fallback: the longest ModuleList whose items all share one class (the block stack).
    best: nn.ModuleList | None = None
    for module in inner.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ProbeError(
            f"cannot find the decoder blocks of {type(inner).__name__}: expected a ModuleList at one "
            f"of {', '.join(_BLOCK_PATHS)}"
        )
    return best


def _text_config(model: nn.Module):
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        raise ProbeError(f"{type(model).__name__} has no `config`; expected a HF PreTrainedModel")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def hidden_size(model: nn.Module) -> int:
    """Width d of the residual stream (``hidden_size``, ``n_embd`` or ``d_model`` of the config)."""
    config = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ProbeError(f"cannot read the hidden size of {type(config).__name__}: no hidden_size/n_embd/d_model")


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of the model."""
    return len(decoder_blocks(model))


def default_layer(model: nn.Module) -> int:
    """The default site, ``n_layers // 2`` (docs/methods.md sec. 1)."""
    return num_layers(model) // 2


def validate_layer(model: nn.Module, layer: int) -> int:
    """Check that ``layer`` is a site of the model (``0 <= layer < n_layers``) and return it."""
    n = num_layers(model)
    # Integral types (int, numpy/torch integer scalars) are accepted and returned as a plain int;
    # bool, float and anything else are rejected rather than silently rounded.
    try:
        index = None if isinstance(layer, bool) else operator.index(layer)
    except TypeError:
        index = None
    if index is None:
        raise ProbeError(
            f"layer must be an integer, got {layer!r}: expected 0 <= layer <= {n - 1} for "
            f"{type(unwrap_model(model)).__name__} with {n} decoder blocks"
        )
    layer = index
    if not 0 <= layer < n:
        raise ProbeError(
            f"layer {layer} is out of range for {type(unwrap_model(model)).__name__} with {n} decoder "
            f"blocks: expected 0 <= layer <= {n - 1} (layer L = residual stream entering block L)"
        )
    return layer


class _StopForward(Exception):
    """Raised by the capture hook to end the forward after the last needed site."""


@contextmanager
def residual_hooks(model: nn.Module, layers: Iterable[int], *, stop: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream entering each block in ``layers`` during forwards in the block.

    Yields a dict that the forward fills with ``layer -> hidden_states [B, T, d]`` (the tensors
    themselves, not copies). With ``stop=True`` the forward is aborted on entering the deepest
    requested block, so nothing after block ``max(layers) - 1`` runs; use :func:`truncated_forward`
    rather than calling the model yourself in that case.
    """
    blocks = decoder_blocks(model)
    sites = sorted({validate_layer(model, layer) for layer in layers})  # no int(): 2.5 must not become 2
    if not sites:
        raise ProbeError("no layers given: expected at least one layer index")
    captured: dict[int, torch.Tensor] = {}
    last = sites[-1]

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = args[0] if args else kwargs["hidden_states"]
            if stop and layer == last:
                raise _StopForward

        return hook

    # prepend=True: run before hooks that sharding wrappers (DeepSpeed ZeRO-3, FSDP) put on the
    # block, so stopping at block L never gathers block L's parameters.
    handles = [
        blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True, prepend=True) for layer in sites
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def truncated_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    position_ids: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Residual streams ``hidden_states[L]`` for every L in ``layers``, computing no block >= max(L).

    ``input_ids``/``attention_mask`` are [B, T] on the model's device. ``position_ids`` [B, T]
    (optional) is passed to the model: give it for left-padded batches (HF models otherwise number
    positions from the first column, pads included). Returns ``{L: [B, T, d]}`` in the model's
    dtype. Runs under no_grad without KV cache; the model's train/eval mode is left as it is
    (callers choose it).
    """
    already_in_forward = {id(unit) for unit, _ in sharded_units_in_forward(model)}
    extra = {} if position_ids is None else {"position_ids": position_ids}
    with residual_hooks(model, layers, stop=True) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        except _StopForward:
            finish_aborted_forward(model, skip=already_in_forward)
    return {layer: captured[layer] for layer in sorted(captured)}
