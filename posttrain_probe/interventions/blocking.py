"""Gradient blocking (docs/methods.md sec. 9, paper S sec. 2 / RQ5): protect chosen features during fine-tuning.

At site L (the residual stream entering block L, docs/methods.md sec. 1), in every forward pass:

    sae:      f_S = f^m(x)[S];  x_S = W_dec^m[S]^T f_S / s_m;  x_new = sg(x_S) + (x - x_S)
              (f^m with b_enc, docs/methods.md's default; encoder_bias=False: f_S = act(W_enc^m[S]^T s_m x), paper S's
              ReLU(W_enc^T x) without the encoder bias)
    subspace: x_S = P_S x (orthogonal projection onto span{d_k : k in S});  x_new = sg(x_S) + (x - x_S)
    ablate:   x_new = x - P_S x   (the subspace is removed from the forward too)

In ``sae`` and ``subspace`` modes the forward value is unchanged and the gradient reaching x is
(I - J_S)^T g with J_S = dx_S/dx: training cannot move the protected features through this site.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd import forward_ad

from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.feature_site import FeatureSite
from posttrain_probe.layers import decoder_blocks, unwrap_model

MODES = ("sae", "subspace", "ablate")


class _BlockedGradient(torch.autograd.Function):
    """sg(x_S) + (x - x_S) for x [T, d], differentiated by hand: the value x (a copy) and the gradient
    g - J_S^T g, with J_S^T g = scale ((g rows^T) ⊙ fired) columns^T.

    ``sae`` mode: x_S = f_S dec with f_S = act(s_m x W_enc^m[S] + b); rows = dec [|S|, d] (raw units), columns =
    W_enc^m[S] [d, |S|], scale = s_m, fired = 1[f_S > 0] [T, |S|] bool (the derivative of the ReLU and of the
    BatchTopK threshold, as autograd takes it). ``subspace`` mode: x_S = x B B^T for the orthonormal basis B
    [d, r] of span d_S; rows = B^T, columns = B, no scale, no indicator. The forward computes nothing (the
    caller's encode gives ``fired``; no decode) and keeps only ``fired``; the backward's two matmuls run in
    ``dtype`` (autocast's under autocast, as autograd's would). A token costs 6 d |S| FLOPs in ``sae`` mode
    (encode + backward) instead of the 8 d |S| of differentiating x_S, and 4 d r instead of 8 d r in ``subspace``.
    For row-major (contiguous) x the gradient is autograd's through x_S bit for bit (a column-major x: within
    an ulp, autograd then orders its matmul differently). ``jvp`` gives forward mode (I - J_S) t.
    """

    generate_vmap_rule = True  # torch.func transforms (grad, vmap, jvp) work through it

    @staticmethod
    def forward(x, fired, rows, columns, scale, dtype):
        return x.clone()  # not x itself: autograd would make it a view that later in-place ops may not modify

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, fired, ctx.rows, ctx.columns, ctx.scale, ctx.dtype = inputs
        ctx.fired = fired is not None
        if ctx.fired:
            ctx.save_for_backward(fired)
            ctx.save_for_forward(fired)

    @staticmethod
    def backward(ctx, g):
        return g - _BlockedGradient._jacobian_product(ctx, g, ctx.rows, ctx.columns), None, None, None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        """Forward mode: (I - J_S) t, J_S t = scale ((t columns) ⊙ fired) rows."""
        return t - _BlockedGradient._jacobian_product(ctx, t, ctx.columns.T, ctx.rows.T)

    @staticmethod
    def _jacobian_product(ctx, v, first, second):
        """scale ((v first^T) ⊙ fired) second^T in ``ctx.dtype``, returned in v's dtype."""
        dtype = ctx.dtype
        coefficients = v.to(dtype) @ first.to(dtype).T
        if ctx.fired:
            coefficients.mul_(ctx.saved_tensors[0])
        product = (coefficients @ second.to(dtype).T).to(v.dtype)
        return product if ctx.scale is None else product * ctx.scale.to(v.dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x with weights in x's dtype gives here: autocast's under autocast (which leaves float64
    alone), else x's."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class GradientBlocker(FeatureSite):
    """Blocks the gradient through features ``features`` of one model branch of a crosscoder/SAE at ``layer``.

    ``encoder_bias`` (``sae`` mode only): True (docs/methods.md sec. 9 default) protects the per-source code
    f^m(x) = act(W_enc^m ã^m + b_enc) exactly as :meth:`Crosscoder.encode_source` computes it;
    False drops b_enc, paper S's f = ReLU(W_enc^T x). A BatchTopK crosscoder's inference threshold
    (per source when calibrated, as ``encode_source``) applies either way.

    Use ``attach(model)`` / ``detach()`` or ``with blocker.attached(model): ...``. The protected
    weights are copied to the hidden states' device and dtype at the first forward. ``attach``
    refuses a model other than the one the branch was trained on (or a tuned copy of it;
    :mod:`posttrain_probe.model_identity`) unless ``allow_model_mismatch``, which records the
    mismatch in ``model_mismatch`` (:class:`~posttrain_probe.interventions.feature_site.FeatureSite`).
    """

    def __init__(
        self,
        crosscoder,
        features: Sequence[int],
        *,
        model: str | int = 0,
        layer: int | None = None,
        mode: str = "sae",
        encoder_bias: bool = True,
        allow_model_mismatch: bool = False,
        override_hint: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ProbeError(f"blocking mode {mode!r} is not one of {MODES}")
        if not isinstance(encoder_bias, bool):
            raise ProbeError(f"encoder_bias must be True or False, got {encoder_bias!r}")
        if not encoder_bias and mode != "sae":
            raise ProbeError(f"encoder_bias=False changes the code of mode 'sae' only; mode {mode!r} uses no encoder")
        super().__init__(
            crosscoder,
            features,
            model=model,
            layer=layer,
            what="blocking",
            allow_model_mismatch=allow_model_mismatch,
            encoder=mode == "sae",
            encoder_bias=encoder_bias,
            override_hint=override_hint,
        )
        self.mode = mode
        self.encoder_bias = encoder_bias
        index = torch.tensor(self.features, dtype=torch.long)
        with torch.no_grad():
            scale = crosscoder.scales[self.slot].detach().float().cpu()
            self._dec = (
                crosscoder.W_dec.detach().float().cpu()[index, self.slot] / scale
            ).contiguous()  # [|S|, d], raw units
            self._basis = None
            if mode != "sae" and self.features:
                u, sigma, _ = torch.linalg.svd(self._dec.T.double(), full_matrices=False)
                keep = sigma > sigma.max() * max(self._dec.shape) * torch.finfo(torch.float32).eps
                self._basis = u[:, keep].float().contiguous()  # orthonormal basis of span{d_k : k in S}, [d, rank]
        self._cache: dict[tuple, tuple[torch.Tensor | None, ...]] = {}
        self._handle = None
        self._model = None

    # -- the operation --------------------------------------------------------------------------
    def _weights(self, like: torch.Tensor) -> tuple:
        """(encoder crosscoder, decoder rows, subspace basis) on ``like``'s device and dtype (cached)."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            with torch.inference_mode(False):  # normal tensors: usable in and outside inference mode
                move = lambda t: None if t is None else t.to(like.device, like.dtype)  # noqa: E731
                self._cache[key] = (move(self._dec), move(self._basis))
        return (self.encoder_like(like), *self._cache[key])

    def protected_component(self, x: torch.Tensor) -> torch.Tensor:
        """x_S for residual activations x [..., d] (raw units), differentiable in x.

        ``sae``: f_S = the per-source codes f^m of the protected features, :meth:`Crosscoder.encode_source` of
        the crosscoder restricted to them (without b_enc when ``encoder_bias=False``); x_S = W_dec^m[S]^T f_S / s_m.
        ``subspace``/``ablate``: the orthogonal projection of x onto span{d_k : k in S}.
        """
        if not self.features:
            return torch.zeros_like(x)
        encoder, dec, basis = self._weights(x)
        if self.mode == "sae":
            codes = encoder.encode_source(x.reshape(-1, self.d_model), self.slot)
            return (codes @ dec).reshape(x.shape)
        return (x @ basis) @ basis.T

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The blocked residual stream for x [..., d]: same value (except ``ablate``), blocked gradient."""
        if x.shape[-1] != self.d_model:
            raise ProbeError(
                f"the blocker was built for width {self.d_model}, the residual stream has width {x.shape[-1]}"
            )
        if not torch.is_grad_enabled() and self.mode != "ablate":
            return x  # evaluation / generation: the value is x, there is no gradient to block
        if self.mode == "subspace" and self._basis is not None and self._basis.shape[1] == self.d_model:
            # The protected span is the whole space: exactly zero gradient (Adam would amplify rounding).
            return x.detach() + (x * 0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        if self.mode == "ablate":
            return x - self.protected_component(x)
        if not x.requires_grad and forward_ad.unpack_dual(x).tangent is None:
            return x  # nothing upstream of the site trains (frozen lower layers): no gradient to block
        if not self.features:
            return x
        # sg(x_S) + (x - x_S): the value x bit for bit (any dtype), the gradient (I - J_S)^T g
        encoder, dec, basis = self._weights(x)
        flat = x.reshape(-1, self.d_model)
        if self.mode == "sae":
            with torch.no_grad():
                codes = encoder.encode_source(flat, self.slot)
            blocked = _BlockedGradient.apply(
                flat, codes > 0, dec, encoder.W_enc[self.slot], encoder.scales[self.slot], codes.dtype
            )
        else:
            blocked = _BlockedGradient.apply(flat, None, basis.T, basis, None, _matmul_dtype(flat))
        return blocked.reshape(x.shape)

    # -- attaching ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> GradientBlocker:
        """Hook the blocker in front of decoder block ``layer`` of ``model`` (through any wrapper)."""
        if self._handle is not None:
            raise ProbeError(f"this gradient blocker is already attached at layer {self.layer}; detach() it first")
        inner = unwrap_model(model)
        if getattr(inner, "_posttrain_probe_blocker", None) is not None:
            raise ProbeError("the model already has a gradient blocker attached; detach it before attaching another")
        self.model_mismatch = self.check_model(inner)  # this model's check alone (a re-attach starts afresh)

        def hook(module, args, kwargs):
            if args:
                return (self.apply(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = self.apply(kwargs["hidden_states"])
            return args, kwargs

        self._handle = decoder_blocks(inner)[self.layer].register_forward_pre_hook(hook, with_kwargs=True)
        inner._posttrain_probe_blocker = self
        self._model = inner
        return self

    def detach(self) -> None:
        """Remove the hook (no-op when not attached)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._model._posttrain_probe_blocker = None
            self._model = None

    @property
    def is_attached(self) -> bool:
        return self._handle is not None

    def attached(self, model: nn.Module):
        """Context manager: attached inside the block, detached after."""
        blocker = self

        class _Attached:
            def __enter__(self_inner):
                return blocker.attach(model)

            def __exit__(self_inner, *exc):
                blocker.detach()

        return _Attached()

    def __repr__(self) -> str:
        bias = "" if self.encoder_bias else ", encoder_bias=False"
        return f"GradientBlocker(model={self.model_name!r}, layer={self.layer}, mode={self.mode!r}, n_features={len(self.features)}{bias})"
