"""Feature interventions (docs/methods.md sec. 7; paper R sec. 7.1, paper S B.3): edit chosen crosscoder features in a forward.

At site L (the residual stream entering decoder block L, docs/methods.md sec. 1) of model branch m, at the
chosen positions:

    f = f^m(a)[S] ;  f'_S = g(f_S) ;  a' = a + W_dec^m[S]^T (f'_S - f_S) / s_m

with g one of zero (0), set (v, default 3.0), scale (c f), add (f + delta) and steer
(c x the feature's max activation over a reference corpus, c = 2 by default; :func:`max_activations`).
Only the change of the chosen features is written, so the crosscoder's reconstruction error is
kept, and f' = f leaves the model unchanged. Only the [d, |S|] / [|S|, d] slices of the encoder
and decoder are used: O(d |S|) per token.

Positions are read from the forward itself: a pre-hook on the model records its ``attention_mask``
and cached length, so left- and right-padded batches and ``generate`` (KV cache) are handled:

- ``all``: every real (non-pad) token, prompt and generated;
- ``prompt``: real tokens of a forward without cached positions (the prompt of ``generate``, a
  whole scored sequence); decode steps of ``generate`` (forwards with cached positions) are
  generated tokens and are left alone;
- ``last_prompt``: the last real token of such a forward.

:meth:`FeatureIntervention.prompt_lengths` overrides "the prompt is the whole input" for batches
of prompt + continuation (lm-eval loglikelihood requests).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain_probe.errors import ProbeError
from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint, resolve_features
from posttrain_probe.layers import decoder_blocks, hidden_size, unwrap_model, validate_layer
from posttrain_probe.model_identity import check_model, slot_fingerprint

INTERVENTION_MODES = ("zero", "set", "scale", "add", "steer")
"""zero: f'_S = 0; set: f'_S = v; scale: f'_S = c f_S; add: f'_S = f_S + delta; steer: f'_S = c max_S."""
POSITIONS = ("all", "prompt", "last_prompt")
"""Where the edit applies: every real token, the prompt tokens, or the last prompt token."""

_DEFAULT_VALUES = {"set": 3.0, "steer": 2.0}
_HOOKS_ATTR = "_posttrain_probe_feature_hooks"


def _load(crosscoder) -> tuple[Any, Path | None]:
    """(Crosscoder, its directory or None) from an object or a directory."""
    if isinstance(crosscoder, (str, os.PathLike)):
        from posttrain_probe.crosscoder.inspect import load_crosscoder

        return load_crosscoder(crosscoder), Path(crosscoder)
    if not all(hasattr(crosscoder, name) for name in ("W_enc", "W_dec", "scales", "config")):
        raise ProbeError(f"expected a Crosscoder or its directory, got {type(crosscoder).__name__}")
    return crosscoder, None


class FeatureIntervention:
    """Zero / set / scale / add / steer features ``features`` of branch ``model_name`` of a crosscoder
    at its layer (docs/methods.md sec. 7), at ``positions``, keeping the reconstruction error.

    Args:
        crosscoder: a ``Crosscoder`` or its directory.
        features: anything :func:`~posttrain_probe.interventions.resolve_features` takes: indices,
            ``"3,17,42"``, a feature-set JSON (refused when made for another crosscoder), a category.
        mode: one of :data:`INTERVENTION_MODES`.
        value: ``set``: the new code v (default 3.0, code units); ``scale``: the factor c
            (required); ``add``: the code delta (required); ``steer``: the multiple of the max
            activation (default 2.0); ``zero``: must be None.
        model_name: the crosscoder branch m whose encoder/decoder are used (name or slot);
            required when the crosscoder has more than one model.
        positions: one of :data:`POSITIONS`.
        max_acts: ``[F]`` per-feature max activation f^m (code units) over a reference corpus,
            needed by ``steer`` (:func:`max_activations`).
        layer: the site; default (and must equal) the crosscoder's recorded layer.
        allow_model_mismatch: attach to a model other than the one branch ``model_name`` was trained
            on (nor tuned from it; :mod:`posttrain_probe.model_identity`), which ``attach`` refuses
            otherwise; the mismatch is kept in ``model_mismatch``.

    Use ``iv.attach(model)`` / ``iv.detach()`` or ``with iv.attach(model): ...``. Several
    interventions may be attached to one model; at one layer they apply in attach order. The
    encoder/decoder slices are cast to each activation dtype/device once and cached.
    """

    def __init__(
        self,
        crosscoder,
        features,
        *,
        mode: str = "zero",
        value: float | None = None,
        model_name: str | int | None = None,
        positions: str = "all",
        max_acts: torch.Tensor | None = None,
        layer: int | None = None,
        allow_model_mismatch: bool = False,
    ) -> None:
        if mode not in INTERVENTION_MODES:
            raise ProbeError(f"intervention mode {mode!r} is not one of {', '.join(INTERVENTION_MODES)}")
        if positions not in POSITIONS:
            raise ProbeError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
        cc, path = _load(crosscoder)
        self.crosscoder_path = path
        self.mode, self.positions = mode, positions
        self.value = _check_value(mode, value)
        if model_name is None:
            if cc.n_models != 1:
                raise ProbeError(f"the crosscoder has models {cc.model_names}: pass model_name= (the branch to intervene on)")
            model_name = 0
        self.slot = cc.model_index(model_name)
        self.model_name = cc.model_names[self.slot]
        self.model_fingerprint = slot_fingerprint(cc, self.slot)
        self.allow_model_mismatch = bool(allow_model_mismatch)
        self.model_mismatch: str | None = None
        self.layer = cc.config.layer if layer is None else layer
        if self.layer is None:
            raise ProbeError("the crosscoder does not record its layer: pass layer=")
        if cc.config.layer is not None and self.layer != cc.config.layer:
            raise ProbeError(f"the crosscoder was trained at layer {cc.config.layer}, the intervention asked for layer {self.layer}")
        self.features = resolve_features(cc, features)
        self.n_features = cc.config.n_features
        self.d_model = cc.config.d_model
        self.crosscoder_fingerprint = crosscoder_fingerprint(cc)
        index = torch.tensor(self.features, dtype=torch.long, device=cc.W_dec.device)
        with torch.no_grad():
            scale = cc.scales[self.slot].detach()
            # Raw-unit slices: pre_S = a @ enc + b_enc ; delta = (f'_S - f_S) @ dec  (docs/methods.md sec. 2-3, 7).
            self._enc = (cc.W_enc[self.slot].detach()[:, index] * scale).contiguous()  # [d, |S|]
            self._b_enc = cc.b_enc.detach()[index].clone()  # [|S|]
            self._dec = (cc.W_dec.detach()[index, self.slot] / scale).contiguous()  # [|S|, d]
            self._threshold: float | None = None
            self._score = None
            if cc.config.activation == "batchtopk":
                # The inference threshold is per feature on f_i * sum over ALL models of ||d_i^m||:
                # encode_source's (theta_m when calibrated per source, else the joint one).
                if cc.config.source_thresholds is None and float(cc.threshold) < 0:
                    raise ProbeError("this BatchTopK crosscoder has no inference threshold yet (train it first): its codes are undefined")
                self._threshold = cc.source_threshold(self.slot)
                self._score = cc.decoder_norm_sum().detach()[index].clone()
            self._target = None
            if mode == "steer":
                if max_acts is None:
                    raise ProbeError("mode 'steer' needs max_acts= ([F] max activation per feature): compute it with max_activations(...)")
                max_acts = torch.as_tensor(max_acts).detach()
                if tuple(max_acts.shape) != (self.n_features,) or not torch.isfinite(max_acts).all():
                    raise ProbeError(f"max_acts must be a finite [{self.n_features}] tensor (one max per feature), got shape {tuple(max_acts.shape)}")
                self._target = (self.value * max_acts.to(self._dec.device, self._dec.dtype)[index]).contiguous()
            elif mode == "set":
                self._target = torch.full((len(self.features),), self.value, dtype=self._dec.dtype, device=self._dec.device)
        self._cache: dict[tuple, tuple] = {}
        self._prompt_lengths: torch.Tensor | None = None
        self._model: nn.Module | None = None

    # -- the operation --------------------------------------------------------------------------
    def _weights(self, like: torch.Tensor) -> tuple:
        key = (like.device, like.dtype)
        if key not in self._cache:
            move = lambda t: None if t is None else t.to(like.device, like.dtype)  # noqa: E731
            with torch.inference_mode(False):  # normal tensors: usable in and outside inference mode
                self._cache[key] = (move(self._enc), move(self._b_enc), move(self._dec), move(self._score), move(self._target))
        return self._cache[key]

    def codes(self, a: torch.Tensor) -> torch.Tensor:
        """Per-source codes f^m of the chosen features, ``[..., |S|]`` (code units), of raw activations ``a [..., d]``.

        Equals ``crosscoder.encode_source(a, model_name)[..., features]`` (BatchTopK threshold included).
        """
        enc, b_enc, _, score, _ = self._weights(a)
        codes = torch.relu(a @ enc + b_enc)
        if self._threshold is not None:
            codes = codes * (codes * score > self._threshold)
        return codes

    def edit(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """a' = a + W_dec^m[S]^T (f'_S - f_S) / s_m (docs/methods.md sec. 7) where ``mask``, a elsewhere.

        ``a``: ``[..., d]`` raw residual activations (any float dtype/device; computed in it);
        ``mask``: ``[...]`` bool, None = everywhere. Returns a new tensor of a's shape and dtype.
        """
        if a.shape[-1] != self.d_model:
            raise ProbeError(f"the intervention was built for width {self.d_model}, the activations have width {a.shape[-1]}")
        _, _, dec, _, target = self._weights(a)
        codes = self.codes(a)
        if self.mode == "zero":
            change = -codes
        elif self.mode in ("set", "steer"):
            change = target - codes
        elif self.mode == "scale":
            change = codes * (self.value - 1.0)
        else:  # add
            change = torch.full_like(codes, self.value)
        edited = a + change @ dec
        if mask is None:
            return edited
        return torch.where(mask.to(a.device).unsqueeze(-1), edited, a)

    # -- positions ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prompt_lengths(self, lengths) -> Iterator[FeatureIntervention]:
        """Inside the block, row b's prompt is its first ``lengths[b]`` real tokens (counted from its
        first non-pad token, cached tokens included) instead of the whole input of a forward.

        ``lengths``: ``[B]`` ints >= 0, B = the batch size of the forwards inside the block (e.g.
        lm-eval loglikelihood batches of prompt + continuation). ``prompt`` edits those tokens,
        ``last_prompt`` token ``lengths[b] - 1``; ``all`` is unaffected.
        """
        lengths = torch.as_tensor(lengths, dtype=torch.long).flatten()
        if (lengths < 0).any():
            raise ProbeError(f"prompt lengths must be >= 0, got {lengths.tolist()}")
        previous, self._prompt_lengths = self._prompt_lengths, lengths
        try:
            yield self
        finally:
            self._prompt_lengths = previous

    def _position_mask(self, batch: int, length: int, forward: _ForwardInputs | None, device: torch.device) -> torch.Tensor | None | bool:
        """[B, T] bool mask of the positions to edit in a forward; None = all, False = none."""
        lengths = self._prompt_lengths
        if forward is None:
            if self.positions == "all":
                return None  # no attention mask known: every position
            raise ProbeError(
                f"positions={self.positions!r} needs the model's attention mask: call the model the intervention "
                "was attached to (its forward or generate), not one of its submodules"
            )
        mask, past = forward.mask, forward.past
        real = full = None
        if mask is not None:
            if mask.shape[0] != batch or mask.shape[1] < length:
                raise ProbeError(f"attention mask of shape {tuple(mask.shape)} does not fit a forward of {batch} x {length} tokens")
            past = mask.shape[1] - length
            full = mask.to(device=device, dtype=torch.bool)
            real = full[:, past:]
        if self.positions == "all":
            return real
        if lengths is None:
            if past > 0:
                return False  # decode steps of generate(): generated tokens
            if self.positions == "prompt":
                return real
            if real is None:
                last = torch.zeros(batch, length, dtype=torch.bool, device=device)
                last[:, -1] = True
                return last
            rank = real.long().cumsum(1) - 1
            return real & (rank == rank[:, -1:])  # the last real token of each row
        if lengths.numel() != batch:
            raise ProbeError(f"prompt_lengths has {lengths.numel()} entries, the forward has a batch of {batch}")
        lengths = lengths.to(device)[:, None]
        if full is None:
            rank = torch.arange(past, past + length, device=device).expand(batch, length)
        else:
            rank = (full.long().cumsum(1) - 1)[:, past:]
        chosen = rank < lengths if self.positions == "prompt" else rank == lengths - 1
        return chosen if real is None else chosen & real

    def _apply(self, hidden: torch.Tensor, forward: _ForwardInputs | None) -> torch.Tensor:
        mask = self._position_mask(hidden.shape[0], hidden.shape[1], forward, hidden.device)
        if mask is False:
            return hidden
        return self.edit(hidden, mask)

    # -- attaching ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> FeatureIntervention:
        """Hook the intervention in front of decoder block ``layer`` of ``model`` (through any
        wrapper); returns self, which as a context manager detaches on exit."""
        if self._model is not None:
            raise ProbeError(f"this feature intervention is already attached at layer {self.layer}; detach() it first")
        inner = unwrap_model(model)
        validate_layer(inner, self.layer)
        if hidden_size(inner) != self.d_model:
            raise ProbeError(f"the crosscoder has d_model {self.d_model}, the model's hidden size is {hidden_size(inner)}")
        self.model_mismatch = check_model(inner, self.model_fingerprint, self.model_name, allow_mismatch=self.allow_model_mismatch)
        hooks = getattr(inner, _HOOKS_ATTR, None)
        if hooks is None:
            hooks = _ModelHooks(inner)
            object.__setattr__(inner, _HOOKS_ATTR, hooks)
        hooks.add(self)
        self._model = inner
        return self

    def detach(self) -> None:
        """Remove the intervention from its model (no-op when not attached)."""
        if self._model is None:
            return
        hooks = getattr(self._model, _HOOKS_ATTR)
        if hooks.remove(self):
            object.__delattr__(self._model, _HOOKS_ATTR)
        self._model = None

    @property
    def is_attached(self) -> bool:
        return self._model is not None

    def __enter__(self) -> FeatureIntervention:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        value = "" if self.value is None else f", value={self.value}"
        return (
            f"FeatureIntervention(model_name={self.model_name!r}, layer={self.layer}, mode={self.mode!r}{value}, "
            f"positions={self.positions!r}, n_features={len(self.features)})"
        )


def _check_value(mode: str, value) -> float | None:
    if mode == "zero":
        if value is not None:
            raise ProbeError(f"mode 'zero' takes no value (got {value!r}): the features are set to 0")
        return None
    if value is None:
        if mode not in _DEFAULT_VALUES:
            raise ProbeError(f"mode {mode!r} needs value= ({'the factor c' if mode == 'scale' else 'the code delta'})")
        return _DEFAULT_VALUES[mode]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ProbeError(f"value {value!r} for mode {mode!r} is not a number") from None
    if not math.isfinite(value):
        raise ProbeError(f"value {value!r} for mode {mode!r} must be finite")
    return value


class _ForwardInputs:
    """What the model's pre-hook saw of the current forward: its 2-D attention mask (or None) and,
    without a mask, the number of cached positions."""

    __slots__ = ("mask", "past")

    def __init__(self, mask: torch.Tensor | None, past: int) -> None:
        self.mask, self.past = mask, past


class _ModelHooks:
    """The hooks the feature interventions on one model share: a pre-hook (and clearing post-hook) on
    the model recording each forward's inputs, and one edit pre-hook per layer applying that
    layer's interventions in attach order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        parameters = list(inspect.signature(model.forward).parameters.values())
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._slots = {name: positional.index(name) if name in positional else None for name in ("attention_mask", "past_key_values")}
        self.forward: _ForwardInputs | None = None
        self.by_layer: dict[int, list[FeatureIntervention]] = {}
        self._layer_handles: dict[int, Any] = {}
        self._handles = [
            model.register_forward_pre_hook(self._record, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _argument(self, args: tuple, kwargs: dict, name: str):
        slot = self._slots[name]
        if slot is not None and slot < len(args):
            return args[slot]
        return kwargs.get(name)

    def _record(self, module, args, kwargs) -> None:
        mask = self._argument(args, kwargs, "attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            mask = None  # no mask or a prepared 4-D one: every position counts as a real token
        past = 0
        if mask is None:
            cache = self._argument(args, kwargs, "past_key_values")
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
        self.forward = _ForwardInputs(mask, past)

    def _clear(self, module, args, output) -> None:
        self.forward = None

    def add(self, intervention: FeatureIntervention) -> None:
        layer = intervention.layer
        if layer not in self.by_layer:
            self.by_layer[layer] = []
            # prepend=True: edit before other hooks on the block (sharding wrappers' parameter gathers).
            block = decoder_blocks(self.model)[layer]
            self._layer_handles[layer] = block.register_forward_pre_hook(self._edit_hook(layer), with_kwargs=True, prepend=True)
        self.by_layer[layer].append(intervention)

    def remove(self, intervention: FeatureIntervention) -> bool:
        """Drop ``intervention``; True when no intervention is left (all hooks removed)."""
        layer = intervention.layer
        self.by_layer[layer] = [iv for iv in self.by_layer[layer] if iv is not intervention]
        if not self.by_layer[layer]:
            del self.by_layer[layer]
            self._layer_handles.pop(layer).remove()
        if self.by_layer:
            return False
        for handle in self._handles:
            handle.remove()
        return True

    def _edit_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            for intervention in self.by_layer.get(layer, ()):
                hidden = intervention._apply(hidden, self.forward)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook


# ---------------------------------------------------------------------------------------------
# activation statistics: max (steer) and firing rate (controls)
# ---------------------------------------------------------------------------------------------

_MAX_ACTS_VERSION = 2  # 2: the cache file holds the firing frequency beside the max


def max_activations(crosscoder, model_name: str | int, model: nn.Module | str | os.PathLike, data, **kwargs: Any) -> torch.Tensor:
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
    layer: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    n_docs: int | None = None,
    column: str | None = None,
    split: str = "train",
    dataset_config: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    chunk_tokens: int = 2048,
    allow_model_mismatch: bool = False,
):
    """Firing frequency and max of each feature's per-source code f^m over a reference corpus, in one pass
    (docs/methods.md sec. 7 steer, sec. 11 frequency-matched controls).

    ``crosscoder``: a ``Crosscoder`` or its directory; ``model_name``: its branch m; ``model``: the
    HF causal LM of that branch (or a path). ``data``: a dataset spec as
    :func:`~posttrain_probe.data.load_dataset_spec` takes it (tokenised with ``tokenizer``,
    ``seq_len``, ``batch_size``, ``n_docs``, ``column``), or token batches (``TokenBatch``es,
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
    from posttrain_probe.activations.capture import capture_batch
    from posttrain_probe.analysis.features import FeatureStats
    from posttrain_probe.data import TokenBatch

    cc, path = _load(crosscoder)
    slot = cc.model_index(model_name)
    layer = cc.config.layer if layer is None else layer
    if layer is None:
        raise ProbeError("the crosscoder does not record its layer: pass layer=")
    if cc.config.layer is not None and layer != cc.config.layer:
        raise ProbeError(f"the crosscoder was trained at layer {cc.config.layer}, the activation statistics asked for layer {layer}")
    if chunk_tokens < 1:
        raise ProbeError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if isinstance(model, (str, os.PathLike)):
        from posttrain_probe.models import load_causal_lm, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_causal_lm(model, keep_layers=layer)
    validate_layer(model, layer)
    if hidden_size(model) != cc.config.d_model:
        raise ProbeError(f"the crosscoder has d_model {cc.config.d_model}, the model's hidden size is {hidden_size(model)}")
    check_model(model, slot_fingerprint(cc, slot), cc.model_names[slot], allow_mismatch=allow_model_mismatch)
    batches, data_key = _reference_batches(data, tokenizer, model, seq_len=seq_len, batch_size=batch_size, n_docs=n_docs, column=column, split=split, dataset_config=dataset_config)

    key = {
        "version": _MAX_ACTS_VERSION, "crosscoder": crosscoder_fingerprint(cc), "model_name": cc.model_names[slot],
        "model": _model_fingerprint(model, layer), "data": data_key, "layer": layer, "excluded": ["padding", "first position", "bos"],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    if cache_dir is None and path is not None:
        cache_dir = path / "max_activations"
    cache_file = Path(cache_dir) / f"max_activations_{digest[:24]}.safetensors" if cache and cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        from safetensors import safe_open

        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") == json.dumps(key, sort_keys=True):
                return FeatureStats(handle.get_tensor("frequency"), handle.get_tensor("max_activations"), int(metadata["n_tokens"]))

    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    encoder = cc if cc.W_enc.device == device else copy.deepcopy(cc).to(device)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else getattr(inner.config, "bos_token_id", None)
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
            for chunk in acts.split(chunk_tokens) if acts.shape[0] else ():
                codes = encoder.encode_source(chunk.to(encoder.W_enc.dtype), slot)
                best = torch.maximum(best, codes.max(dim=0).values.float())
                fired += (codes > 0).sum(dim=0)
    finally:
        inner.train(was_training)
    if n_tokens == 0:
        raise ProbeError("the reference data gave no tokens (after dropping padding, the first position and BOS)")
    stats = FeatureStats(fired.cpu().double() / n_tokens, best.cpu(), n_tokens)
    if cache_file is not None:
        from safetensors.torch import save_file

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".tmp")
        save_file({"max_activations": stats.max_activation, "frequency": stats.frequency}, str(partial),
                  metadata={"key": json.dumps(key, sort_keys=True), "n_tokens": str(n_tokens)})
        os.replace(partial, cache_file)
    return stats


class _Batch:
    __slots__ = ("input_ids", "attention_mask")

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ProbeError(f"token batches must hold input_ids of shape [B, T], got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        self.input_ids = input_ids.long()
        self.attention_mask = torch.ones_like(self.input_ids) if attention_mask is None else attention_mask.long()


def _reference_batches(data, tokenizer, model, *, seq_len, batch_size, n_docs, column, split, dataset_config) -> tuple[list, dict]:
    """(batches, fingerprint dict) of a dataset spec or of token batches (materialised to hash them)."""
    from posttrain_probe.data import TokenBatch, dataset_fingerprint, load_dataset_spec, token_batches

    loaded_datasets = sys.modules.get("datasets")  # a Dataset can only exist once `datasets` is imported
    spec_like = isinstance(data, (str, os.PathLike)) or (loaded_datasets is not None and isinstance(data, loaded_datasets.Dataset)) or (
        isinstance(data, Sequence) and not isinstance(data, TokenBatch) and len(data) > 0 and all(isinstance(t, str) for t in data)
    )
    if spec_like:
        if tokenizer is None:
            source = getattr(unwrap_model(model), "name_or_path", "")
            if not source:
                raise ProbeError("a dataset spec needs tokenizer= (the model object does not name where its tokenizer is)")
            from posttrain_probe.models import load_tokenizer

            tokenizer = load_tokenizer(source)
        from posttrain_probe.models import tokenizer_fingerprint

        dataset = load_dataset_spec(data, split=split, config_name=dataset_config, n_docs=n_docs)
        key = {
            "dataset": dataset_fingerprint(dataset, column), "n_docs": len(dataset), "seq_len": seq_len,
            "column": column, "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        return list(token_batches(dataset, tokenizer, column=column, seq_len=seq_len, batch_size=batch_size)), key
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
    digest = hashlib.sha256(type(inner).__name__.encode())
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
