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
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint, resolve_features
from posttrain_probe.crosscoder.inspect import as_crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import decoder_blocks, hidden_size, unwrap_model, validate_layer
from posttrain_probe.model_identity import check_model, slot_fingerprint

INTERVENTION_MODES = ("zero", "set", "scale", "add", "steer")
"""zero: f'_S = 0; set: f'_S = v; scale: f'_S = c f_S; add: f'_S = f_S + delta; steer: f'_S = c max_S."""
POSITIONS = ("all", "prompt", "last_prompt")
"""Where the edit applies: every real token, the prompt tokens, or the last prompt token."""

_DEFAULT_VALUES = {"set": 3.0, "steer": 2.0}
_HOOKS_ATTR = "_posttrain_probe_feature_hooks"


class FeatureEdit:
    """The one feature edit of docs/methods.md sec. 7: f'_S = a f_S + b, with one constructor per mode.

    zero: a = 0, b = 0; set: a = 0, b = v; scale: a = c, b = 0; add: a = 1, b = delta;
    steer: a = 0, b = c max_S (the features' max activations over a reference corpus).
    """

    def __init__(self, a: float, b: float | torch.Tensor) -> None:
        self.a = float(a)
        """The factor on the current code f_S."""
        self.b = b
        """The offset: a number or an ``[|S|]`` tensor (code units)."""

    @classmethod
    def zero(cls) -> FeatureEdit:
        """f'_S = 0."""
        return cls(0.0, 0.0)

    @classmethod
    def set(cls, v: float) -> FeatureEdit:
        """f'_S = v."""
        return cls(0.0, v)

    @classmethod
    def scale(cls, c: float) -> FeatureEdit:
        """f'_S = c f_S."""
        return cls(c, 0.0)

    @classmethod
    def add(cls, delta: float) -> FeatureEdit:
        """f'_S = f_S + delta."""
        return cls(1.0, delta)

    @classmethod
    def steer(cls, c: float, max_acts: torch.Tensor) -> FeatureEdit:
        """f'_S = c max_S (``max_acts``: ``[|S|]`` max activation of each chosen feature)."""
        return cls(0.0, c * max_acts)

    def change(self, codes: torch.Tensor) -> torch.Tensor:
        """f'_S - f_S = (a - 1) f_S + b, ``[..., |S|]`` (what the decoder rows are scaled by)."""
        b = self.b.to(codes.device, codes.dtype) if isinstance(self.b, torch.Tensor) else self.b
        if self.a == 1.0:
            return torch.zeros_like(codes) + b
        return codes * (self.a - 1.0) + b

    def __repr__(self) -> str:
        return f"FeatureEdit(a={self.a}, b={self.b})"


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
        check_mode(mode, positions)
        cc, path = as_crosscoder(crosscoder)
        self.crosscoder_path = path
        self.mode, self.positions = mode, positions
        self.value = check_value(mode, value)
        if model_name is None:
            if cc.n_models != 1:
                raise ProbeError(
                    f"the crosscoder has models {cc.model_names}: pass model_name= (the branch to intervene on)"
                )
            model_name = 0
        self.slot = cc.model_index(model_name)
        self.model_name = cc.model_names[self.slot]
        self.model_fingerprint = slot_fingerprint(cc, self.slot)
        self.allow_model_mismatch = bool(allow_model_mismatch)
        self.model_mismatch: str | None = None
        self.layer = cc.site(layer, what="the intervention")
        if self.layer is None:
            raise ProbeError("the crosscoder does not record its layer: pass layer=")
        self.features = resolve_features(cc, features)
        self.n_features = cc.config.n_features
        self.d_model = cc.config.d_model
        self.crosscoder_fingerprint = crosscoder_fingerprint(cc)
        index = torch.tensor(self.features, dtype=torch.long, device=cc.W_dec.device)
        with torch.no_grad():
            scale = cc.scales[self.slot].detach()
            # delta = (f'_S - f_S) @ dec, raw units (docs/methods.md sec. 2-3, 7); f_S from the crosscoder restricted to S.
            self._dec = (cc.W_dec.detach()[index, self.slot] / scale).contiguous()  # [|S|, d]
            if cc.config.activation == "batchtopk" and cc.config.source_thresholds is None and float(cc.threshold) < 0:
                raise ProbeError(
                    "this BatchTopK crosscoder has no inference threshold yet (train it first): its codes are undefined"
                )
            self._encoder = cc.restrict(self.features)
            if mode == "steer":
                if max_acts is None:
                    raise ProbeError(
                        "mode 'steer' needs max_acts= ([F] max activation per feature): compute it with max_activations(...)"
                    )
                max_acts = torch.as_tensor(max_acts).detach()
                if tuple(max_acts.shape) != (self.n_features,) or not torch.isfinite(max_acts).all():
                    raise ProbeError(
                        f"max_acts must be a finite [{self.n_features}] tensor (one max per feature), got shape {tuple(max_acts.shape)}"
                    )
                max_acts = max_acts.to(self._dec.device, self._dec.dtype)[index].contiguous()
            self.feature_edit = feature_edit(mode, self.value, max_acts)
            """The edit f'_S = a f_S + b of this intervention (:class:`FeatureEdit`)."""
        self._cache: dict[tuple, tuple] = {}
        self._prompt_lengths: torch.Tensor | None = None
        self._model: nn.Module | None = None

    # -- the operation --------------------------------------------------------------------------
    def _weights(self, like: torch.Tensor) -> tuple:
        key = (like.device, like.dtype)
        if key not in self._cache:
            move = lambda t: None if t is None else t.to(like.device, like.dtype)  # noqa: E731
            with torch.inference_mode(False):  # normal tensors: usable in and outside inference mode
                edit = self.feature_edit
                b = move(edit.b) if isinstance(edit.b, torch.Tensor) else edit.b
                encoder = copy.deepcopy(self._encoder).to(like.device, like.dtype)
                self._cache[key] = (encoder, move(self._dec), FeatureEdit(edit.a, b))
        return self._cache[key]

    def codes(self, a: torch.Tensor) -> torch.Tensor:
        """Per-source codes f^m of the chosen features, ``[..., |S|]`` (code units), of raw activations ``a [..., d]``.

        ``crosscoder.encode_source(a, model_name)[..., features]``, computed by :meth:`Crosscoder.encode_source` of the
        crosscoder restricted to the chosen features (BatchTopK threshold included): O(d |S|) per token.
        """
        encoder = self._weights(a)[0]
        return encoder.encode_source(a.reshape(-1, a.shape[-1]), self.slot).reshape(*a.shape[:-1], len(self.features))

    def edit(self, a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """a' = a + W_dec^m[S]^T (f'_S - f_S) / s_m (docs/methods.md sec. 7) where ``mask``, a elsewhere.

        ``a``: ``[..., d]`` raw residual activations (any float dtype/device; computed in it);
        ``mask``: ``[...]`` bool, None = everywhere. Returns a new tensor of a's shape and dtype.
        """
        if a.shape[-1] != self.d_model:
            raise ProbeError(
                f"the intervention was built for width {self.d_model}, the activations have width {a.shape[-1]}"
            )
        _, dec, edit = self._weights(a)
        edited = a + edit.change(self.codes(a)) @ dec
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

    def _position_mask(
        self, batch: int, length: int, forward: _ForwardInputs | None, device: torch.device
    ) -> torch.Tensor | None | bool:
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
                raise ProbeError(
                    f"attention mask of shape {tuple(mask.shape)} does not fit a forward of {batch} x {length} tokens"
                )
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
            raise ProbeError(
                f"the crosscoder has d_model {self.d_model}, the model's hidden size is {hidden_size(inner)}"
            )
        self.model_mismatch = check_model(
            inner, self.model_fingerprint, self.model_name, allow_mismatch=self.allow_model_mismatch
        )
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


def feature_edit(mode: str, value: float | None, max_acts: torch.Tensor | None = None) -> FeatureEdit:
    """The :class:`FeatureEdit` of ``mode`` with its checked ``value`` (:func:`check_value`); ``max_acts``
    (``[|S|]``) for ``steer``."""
    if mode == "zero":
        return FeatureEdit.zero()
    if mode == "steer":
        if max_acts is None:
            raise ProbeError("mode 'steer' needs the max activations of the chosen features")
        return FeatureEdit.steer(value, max_acts)
    return {"set": FeatureEdit.set, "scale": FeatureEdit.scale, "add": FeatureEdit.add}[mode](value)


def check_mode(mode: str, positions: str) -> None:
    """The one check of an intervention's mode (:data:`INTERVENTION_MODES`) and positions (:data:`POSITIONS`)."""
    if mode not in INTERVENTION_MODES:
        raise ProbeError(f"mode={mode!r} is not one of {', '.join(INTERVENTION_MODES)}")
    if positions not in POSITIONS:
        raise ProbeError(f"positions={positions!r} is not one of {', '.join(POSITIONS)}")


def check_value(mode: str, value) -> float | None:
    """The value of ``mode`` checked (a finite number; None for ``zero``) or its default (set 3.0, steer 2.0)."""
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
        self._slots = {
            name: positional.index(name) if name in positional else None
            for name in ("attention_mask", "past_key_values")
        }
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
            self._layer_handles[layer] = block.register_forward_pre_hook(
                self._edit_hook(layer), with_kwargs=True, prepend=True
            )
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
