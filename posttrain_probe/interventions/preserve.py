"""Feature-preserving fine-tuning (docs/methods.md sec. 12, docs/preserve.md): penalise the change of chosen features.

At site L (the residual stream entering block L, docs/methods.md sec. 1), on every training batch:

    L_total = L_SFT + lambda * mean_x || f_S(a_theta(x)) - f_S(a_base(x)) ||_2^2

f_S = the per-source code f^m of crosscoder branch m (default ``base``; docs/methods.md sec. 3) restricted to the
feature set S, in code units (the encoder reads s_m a); a_theta(x) = the trained model's residual stream, taken
from the training forward itself; a_base(x) = the frozen base model's, from a truncated forward (blocks < L) on
the same tokens; the mean runs over the real tokens of the batch without the first position of each sequence
(the tokens crosscoders are trained on, :func:`~posttrain_probe.activations.capture.select_tokens`).

This module holds the term and its checks; :mod:`posttrain_probe.callbacks.preserve` adds it to a Trainer's loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from posttrain_probe.activations.capture import select_tokens
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.feature_site import FeatureSite
from posttrain_probe.layers import decoder_blocks, truncated_forward

DEFAULT_FEATURES = "base-only"
"""Default feature set S: the base-only NormRatio category (docs/preserve.md explains the choice)."""
DEFAULT_COEFFICIENT = 1.0
"""Default lambda (docs/preserve.md)."""


def preservation_loss(codes: torch.Tensor, base_codes: torch.Tensor) -> torch.Tensor:
    """docs/methods.md sec. 12: mean over tokens of ||f_S(a_theta(x)) - f_S(a_base(x))||_2^2 (before lambda).

    ``codes`` / ``base_codes``: [n_tokens, |S|] per-source codes of the trained / base model's activations (code
    units). Returns a 0-dim tensor in squared code units, differentiable in ``codes``; 0 for ``n_tokens == 0``.
    """
    if codes.shape != base_codes.shape or codes.ndim != 2:
        raise ProbeError(f"codes {tuple(codes.shape)} and base codes {tuple(base_codes.shape)}: expected [n, |S|] each")
    if codes.shape[0] == 0:
        return codes.sum() * 0.0
    return (codes - base_codes).pow(2).sum(dim=-1).mean()


def preserved_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """[B, T] bool: the tokens the term averages over: real (not padding), not the first of a sequence, not BOS.

    Without ``attention_mask`` (padding-free batches) a sequence starts where ``position_ids`` is 0; without either,
    every column but the first is real.
    """
    if attention_mask is not None:
        return select_tokens(input_ids, attention_mask, bos_token_id=bos_token_id)
    keep = position_ids > 0 if position_ids is not None else torch.ones_like(input_ids, dtype=torch.bool)
    keep[:, 0] = False
    if bos_token_id is not None:
        keep &= input_ids != bos_token_id
    return keep


class FeaturePreserver(FeatureSite):
    """The preservation term for features ``features`` of branch ``model`` of a crosscoder/SAE at ``layer``.

    ``coefficient`` is lambda (>= 0). The per-source code is :meth:`Crosscoder.encode_source` (with b_enc; a
    BatchTopK crosscoder's inference threshold applies) of the crosscoder restricted to S
    (:meth:`Crosscoder.restrict`), so one token costs O(d |S|). ``check_model`` (of
    :class:`~posttrain_probe.interventions.feature_site.FeatureSite`) refuses a model of another width, one without
    block ``layer``, and one that is not the model the branch was trained on (nor tuned from it) unless
    ``allow_model_mismatch``.

    Use: ``with preserver.capture(model) as site: loss = model(**batch).loss`` (``site["hidden"]`` is then the
    residual stream [B, T, d] of that forward, with gradient), ``a_base = preserver.base_activations(base, ...)``,
    ``loss + preserver.coefficient * preserver.loss(site["hidden"], a_base, mask)``.
    """

    def __init__(
        self,
        crosscoder,
        features: Sequence[int],
        *,
        model: str | int = "base",
        layer: int | None = None,
        coefficient: float = DEFAULT_COEFFICIENT,
        allow_model_mismatch: bool = False,
        override_hint: str | None = None,
    ) -> None:
        try:
            coefficient = float(coefficient)
        except (TypeError, ValueError) as err:
            raise ProbeError(f"the preservation coefficient lambda must be a number >= 0, got {coefficient!r}") from err
        if not coefficient >= 0 or coefficient == float("inf"):
            raise ProbeError(f"the preservation coefficient lambda must be a finite number >= 0, got {coefficient}")
        super().__init__(
            crosscoder,
            features,
            model=model,
            layer=layer,
            what="feature preservation",
            allow_model_mismatch=allow_model_mismatch,
            allow_empty=False,
            override_hint=override_hint,
        )
        self.coefficient = coefficient

    # -- the term -------------------------------------------------------------------------------
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """f_S(x): per-source codes [n, |S|] of raw residual activations x [n, d] (code units), differentiable in x.

        Computed in x's dtype on x's device (the restricted encoder is copied there once).
        """
        if x.ndim != 2 or x.shape[-1] != self.d_model:
            raise ProbeError(
                f"the preserver was built for width {self.d_model}: expected activations [n, {self.d_model}], got {tuple(x.shape)}"
            )
        return self.encoder_like(x).encode_source(x, self.slot)

    def loss(self, hidden: torch.Tensor, base_hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`preservation_loss` of residual streams ``hidden`` (trained model) and ``base_hidden`` (frozen base),
        each [B, T, d] in raw model units, over the tokens of ``mask`` [B, T] (default all). 0-dim, before lambda;
        computed in float32 at least (float64 for float64 inputs)."""
        if hidden.shape != base_hidden.shape:
            raise ProbeError(
                f"residual streams of the trained model {tuple(hidden.shape)} and the base model {tuple(base_hidden.shape)} differ in shape"
            )
        if mask is not None:
            hidden, base_hidden = hidden[mask], base_hidden[mask]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 codes would quantise small changes
        hidden = hidden.reshape(-1, self.d_model).to(dtype)
        base_hidden = base_hidden.reshape(-1, self.d_model).to(hidden.device, dtype)
        with torch.no_grad():
            base_codes = self.codes(base_hidden)
        return preservation_loss(self.codes(hidden), base_codes)

    # -- models -------------------------------------------------------------------------------
    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Inside the block, the first forward of ``model`` (any wrapper) leaves the residual stream entering block
        ``layer`` in the yielded dict as ``"hidden"`` [B, T, d] (the tensor itself: the gradient flows through it).

        A forward pre-hook on block ``layer``; later calls (a recomputation under gradient checkpointing) are ignored.
        """
        captured: dict[str, torch.Tensor] = {}

        def hook(module, args, kwargs):
            captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

        handle = decoder_blocks(model)[self.layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    def base_activations(
        self,
        base_model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """a_base: the frozen ``base_model``'s residual stream entering block ``layer`` [B, T, d] (raw units, no
        gradient), from a truncated forward (no block >= ``layer`` runs)."""
        return truncated_forward(base_model, input_ids, attention_mask, [self.layer], position_ids)[self.layer]

    def __repr__(self) -> str:
        return (
            f"FeaturePreserver(model={self.model_name!r}, layer={self.layer}, n_features={len(self.features)}, "
            f"coefficient={self.coefficient:g})"
        )
