"""The N-model sparse crosscoder (docs/methods.md sec. 3; paper R eqs. 1-3 / 5-7). N = 1 is a plain SAE.

Weights live in normalised units (ã^m = s_m a^m, docs/methods.md sec. 2); the scales s_m are a buffer saved
with the weights, and every public method takes and returns raw model activations. Layout, chosen
so that the encoder and the decoder are each ONE matmul over all models:

    W_enc [N, d, F]  -> viewed as [N*d, F]:  pre = ã.flatten(1) @ W_enc + b_enc
    W_dec [F, N, d]  -> viewed as [F, N*d]:  â   = f @ W_dec + b_dec        (d_i^m = W_dec[i, m])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.errors import ProbeError


class CrosscoderOutput(NamedTuple):
    """Result of :meth:`Crosscoder.forward` on a batch of B tokens."""

    reconstruction: torch.Tensor
    """[B, N, d] reconstruction â^m in raw model units."""
    codes: torch.Tensor
    """[B, F] feature activations f (>= 0); a sparse COO tensor in BatchTopK training (k·B entries)."""
    loss: torch.Tensor
    """Scalar training loss: mse + λ·l1 (relu) or mse + aux_coefficient·auxk (batchtopk)."""
    mse: torch.Tensor
    """Scalar mean over tokens of sum_m ||ã^m - â^m||² (normalised units; summed over d and models)."""
    sparsity: torch.Tensor
    """Scalar: mean_x sum_i f_i sum_m ||d_i^m|| (relu) or the AuxK loss (batchtopk)."""
    fvu: torch.Tensor
    """[N] fraction of variance unexplained per model over the batch."""
    l0: torch.Tensor
    """Scalar mean number of active features per token."""
    fired: torch.Tensor
    """[F] bool: the feature is active on at least one token of the batch."""


class Crosscoder(
    nn.Module, PyTorchModelHubMixin, library_name="posttrain-probe", tags=["crosscoder", "sparse-autoencoder"]
):
    """Sparse crosscoder over the residual streams of ``config.model_names`` at one site.

    ``save_pretrained(dir)`` writes config.json + model.safetensors; ``from_pretrained(dir)``
    reads them back (huggingface_hub's ModelHubMixin).
    """

    def __init__(self, config: CrosscoderConfig, *, initialize: bool = True):
        """``initialize=False`` leaves W_enc and W_dec uninitialised (``torch.empty``) for a caller that overwrites them
        (loading, :meth:`restrict`): the paper init of a 3 x 2560 x 32768 crosscoder costs seconds and a second copy of
        the decoder in memory."""
        super().__init__()
        if isinstance(config, dict):  # from_pretrained hands over config.json as a dict
            config = CrosscoderConfig(**config)
        if config.d_model < 1 or not config.model_names:
            raise ProbeError(
                f"a crosscoder needs d_model >= 1 and model names, got {config.d_model} and {config.model_names}"
            )
        self.config = config
        # save_pretrained writes this object's fields: changes to self.config (calibrated
        # source_thresholds) are saved, also for a crosscoder that from_pretrained built from a dict
        self._hub_mixin_config = config
        n, d, f = config.n_models, config.d_model, config.n_features
        self.W_enc = nn.Parameter(torch.empty(n, d, f))
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.W_dec = nn.Parameter(torch.empty(f, n, d))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("scales", torch.ones(n))
        """s_m: raw activation x s_m = normalised activation (docs/methods.md sec. 2)."""
        self.register_buffer("threshold", torch.tensor(-1.0))
        """BatchTopK inference threshold on f_i·sum_m||d_i^m|| (EMA during training; < 0 = unset)."""
        if initialize:
            self.reset_parameters()

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> Crosscoder:
        """ModelHubMixin hook: a local directory or a hub repo, loaded strictly (every tensor must match)."""
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, "model.safetensors")
        else:
            from huggingface_hub import hf_hub_download

            model_file = hf_hub_download(
                repo_id=model_id,
                filename="model.safetensors",
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        # strict: every tensor is read from the file, so the paper init would be overwritten
        model_kwargs.setdefault("initialize", not strict)
        model = cls(**model_kwargs)
        return cls._load_as_safetensor(model, model_file, map_location, strict)

    # -- construction ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Paper init: decoder vectors normal, each scaled to norm ``dec_init_norm``; W_enc = W_dec^T; biases 0."""
        W = torch.randn(self.W_dec.shape, generator=generator, device=self.W_dec.device)
        W = W / W.norm(dim=-1, keepdim=True) * self.config.dec_init_norm
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.permute(1, 2, 0))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def model_names(self) -> list[str]:
        return self.config.model_names

    @property
    def n_models(self) -> int:
        return self.config.n_models

    def model_index(self, name: str | int) -> int:
        """Slot of model ``name`` (or check an integer slot); ProbeError listing the names otherwise."""
        if isinstance(name, int) and not isinstance(name, bool):
            if not 0 <= name < self.n_models:
                raise ProbeError(
                    f"model slot {name} out of range for a crosscoder of {self.n_models} models {self.model_names}"
                )
            return name
        if name not in self.model_names:
            raise ProbeError(f"model {name!r} is not in this crosscoder: expected one of {self.model_names}")
        return self.model_names.index(name)

    def site(self, layer: int | None = None, *, what: str = "this step") -> int | None:
        """The layer L a step works at: ``layer`` if given, else the crosscoder's ``config.layer``.

        The one layer check of the project: a ``layer`` other than the one the crosscoder was trained
        at is a ProbeError naming ``what`` asked for it (a crosscoder only reads its own site).
        """
        trained = self.config.layer
        if layer is None:
            return trained
        if trained is not None and layer != trained:
            raise ProbeError(f"the crosscoder was trained at layer {trained}, {what} asked for layer {layer}")
        return layer

    def restrict(
        self, features: list[int], *, encoder_bias: bool = True, dtype: torch.dtype = torch.float32
    ) -> Crosscoder:
        """This crosscoder restricted to ``features`` (CPU copies in ``dtype``, default float32; no gradients), so
        that its ``encode_source(x, m)`` is ``self.encode_source(x, m)[:, features]`` (BatchTopK thresholds included:
        the decoder norms of a feature and the thresholds are unchanged) at O(d |S|) cost per token; bit for bit
        when ``dtype`` is this crosscoder's own (a float32 copy of float64 weights rounds them).

        The one per-source code f^m for feature edits and gradient blocking (docs/methods.md sec. 7, 9);
        with ``encoder_bias=False`` its b_enc is 0 (paper S's f = act(W_enc^T x)).
        """
        index = torch.tensor(features, dtype=torch.long)
        config = replace(self.config, n_features=len(features))
        if config.activation == "batchtopk" and config.source_thresholds is None:
            # the joint threshold as every source's: the same codes, compared with a number (no device sync per forward)
            config = replace(config, source_thresholds=[float(self.threshold)] * config.n_models)
        sub = Crosscoder(config, initialize=False).to(dtype)
        with torch.no_grad():
            sub.W_enc.copy_(self.W_enc.detach()[:, :, index].cpu())
            sub.b_enc.copy_(self.b_enc.detach()[index].cpu() if encoder_bias else torch.zeros(len(features)))
            sub.W_dec.copy_(self.W_dec.detach()[index].cpu())
            sub.b_dec.copy_(self.b_dec.detach().cpu())
            sub.scales.copy_(self.scales.detach().cpu())
            sub.threshold.copy_(self.threshold.detach().cpu())
        return sub.requires_grad_(False).eval()

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.n_models, self.config.d_model)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ProbeError(
                f"crosscoder over {self.n_models} models {self.model_names} with d_model {self.config.d_model} "
                f"expects activations [batch, {want[0]}, {want[1]}], got {tuple(x.shape)}"
            )

    # -- normalisation ----------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw [B, N, d] -> normalised ã^m = s_m a^m."""
        return x * self.scales.to(x.dtype)[:, None]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, N, d] -> raw units."""
        return x / self.scales.to(x.dtype)[:, None]

    @torch.no_grad()
    def set_scales_from(self, batches: Iterable[torch.Tensor], max_tokens: int = 100_000) -> torch.Tensor:
        """Estimate s_m = sqrt(d) / E||a^m||_2 on up to ``max_tokens`` raw tokens [B, N, d] and store it.

        Returns the scales [N]. docs/methods.md sec. 2: estimated on >= 1e5 tokens (or all there are).
        """
        total = torch.zeros(self.n_models, dtype=torch.float64, device=self.scales.device)
        count = 0
        for batch in batches:
            self._check_input(batch)
            batch = batch[: max_tokens - count]
            total += batch.to(total.device, torch.float64).norm(dim=-1).sum(0)
            count += batch.shape[0]
            if count >= max_tokens:
                break
        if count == 0:
            raise ProbeError("cannot estimate normalisation scales from an empty activation source")
        mean_norm = total / count
        if not torch.isfinite(mean_norm).all() or (mean_norm <= 0).any():
            raise ProbeError(
                f"mean activation norms {mean_norm.tolist()} per model {self.model_names}: expected finite, > 0"
            )
        self.scales.copy_((math.sqrt(self.config.d_model) / mean_norm).to(self.scales.dtype))
        return self.scales.clone()

    # -- encoder / decoder ----------------------------------------------------------------------
    def decoder_norm_sum(self) -> torch.Tensor:
        """[F] sum_m ||d_i^m||_2 (normalised units): the L1 weights and BatchTopK score factors."""
        return self.W_dec.norm(dim=-1).sum(dim=-1)

    def _pre_activations(self, xn: torch.Tensor) -> torch.Tensor:
        """[B, N, d] normalised -> [B, F]: one [B, N*d] x [N*d, F] matmul."""
        return torch.addmm(self.b_enc, xn.flatten(1), self.W_enc.flatten(0, 1))

    def _inference_codes(self, pre: torch.Tensor, threshold: torch.Tensor | float | None = None) -> torch.Tensor:
        """ReLU, and for BatchTopK the inference threshold on f_i·sum_m||d_i^m|| (``threshold``; None: the joint one).

        ``pre`` is overwritten: callers pass the pre-activations they just made (the ReLU runs in place, which saves
        a [B, F] allocation per call; the addmm that made ``pre`` keeps no copy of its output for autograd)."""
        acts = pre.relu_()
        if self.config.activation == "batchtopk":
            if threshold is None:
                if self.threshold < 0:
                    raise ProbeError("this BatchTopK crosscoder has no inference threshold yet: train it first")
                threshold = self.threshold
            acts = acts * (acts * self.decoder_norm_sum() > threshold)
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations f [B, F] of raw activations x [B, N, d] (all models' slots)."""
        self._check_input(x)
        return self._inference_codes(self._pre_activations(self.normalize(x)))

    def source_pre_activations(self, x: torch.Tensor, model: str | int) -> torch.Tensor:
        """Per-source pre-activations W_enc^m ã^m + b_enc [B, F] of one model's raw activations x [B, d]
        (every other model's slot zero; normalised-input code units). One addmm: under autocast the result is in
        the autocast dtype, as :meth:`encode`'s."""
        m = self.model_index(model)
        if x.ndim != 2 or x.shape[1] != self.config.d_model:
            raise ProbeError(
                f"encode_source expects [batch, {self.config.d_model}] activations of one model, got {tuple(x.shape)}"
            )
        return torch.addmm(self.b_enc, x * self.scales[m].to(x.dtype), self.W_enc[m])

    def source_threshold(self, model: str | int, *, joint_threshold: bool = False) -> float:
        """The BatchTopK inference threshold :meth:`encode_source` applies to model ``model``'s codes.

        theta_m of ``config.source_thresholds`` when the crosscoder was calibrated per source
        (:func:`~posttrain_probe.crosscoder.calibrate.calibrate_source_thresholds`), else - or with
        ``joint_threshold`` - the joint threshold learned in training. Units: the score
        f_i·sum_m||d_i^m|| (normalised units). ProbeError for ReLU crosscoders and when no threshold is set.
        """
        m = self.model_index(model)
        if self.config.activation != "batchtopk":
            raise ProbeError(
                f"this crosscoder's activation is {self.config.activation!r}: only BatchTopK crosscoders have an inference threshold"
            )
        if self.config.source_thresholds is not None and not joint_threshold:
            return float(self.config.source_thresholds[m])
        if self.threshold < 0:
            raise ProbeError("this BatchTopK crosscoder has no inference threshold yet: train it first")
        return float(self.threshold)

    def encode_source(self, x: torch.Tensor, model: str | int, *, joint_threshold: bool = False) -> torch.Tensor:
        """Per-source code f^m [B, F] of one model's raw activations x [B, d] (docs/methods.md sec. 3).

        The encoder with every other model's slot set to zero: act(W_enc^m ã^m + b_enc). For a
        BatchTopK crosscoder calibrated per source (``config.source_thresholds``), act thresholds
        at theta_m, so that the per-source codes are as sparse as training's (mean L0 = k on the
        calibration tokens); otherwise, or with ``joint_threshold=True``, at the joint inference
        threshold learned on joint codes.
        """
        pre = self.source_pre_activations(x, model)
        if self.config.source_thresholds is None or joint_threshold or self.config.activation != "batchtopk":
            return self._inference_codes(pre)
        return self._inference_codes(pre, self.config.source_thresholds[self.model_index(model)])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, N, d] in raw units from feature activations [B, F]: one [B, F] x [F, N*d] matmul."""
        flat = codes @ self.W_dec.flatten(1) + self.b_dec.flatten()
        return self.denormalize(flat.view(-1, self.n_models, self.config.d_model))

    # -- training forward -----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        l1_coefficient: float | torch.Tensor = 2.0,
        dead_mask: torch.Tensor | None = None,
        aux_k: int = 512,
        aux_coefficient: float = 1 / 32,
        threshold_decay: float | None = 0.99,
    ) -> CrosscoderOutput:
        """Training forward on raw activations x [B, N, d]: reconstruction, codes and loss terms.

        ReLU: loss = mse + λ·mean_x sum_i f_i sum_m ||d_i^m|| (docs/methods.md sec. 3, λ = ``l1_coefficient``).
        BatchTopK (in train mode): keeps the top k·B of f_i·sum_m||d_i^m|| over the batch and
        touches only those k·B (token, feature) pairs after the encoder matmul: the decode is a
        sparse gather, and the encoder and decoder gradients are sparse accumulations
        (:class:`_BatchTopKEncode`; the same values and gradients as the dense formulation). It
        updates the inference threshold EMA (``threshold_decay``; None leaves it) and adds the
        AuxK loss of the top ``aux_k`` dead features reconstructing the residual error:
        ``dead_mask`` is a bool mask [F] or the dead features' indices [n_dead] (long; the
        trainer's form: no device sync); AuxK is skipped entirely when it is None or empty. In
        eval mode BatchTopK uses the inference threshold. No host-device synchronisation
        happens here.
        """
        self._check_input(x)
        xn = self.normalize(x)
        batch = xn.shape[0]
        if self.config.activation == "batchtopk" and self.training:
            k_total = min(self.config.k * batch, batch * self.config.n_features)
            values, rows, cols, scores = _BatchTopKEncode.apply(
                xn.flatten(1), self.W_enc.flatten(0, 1), self.b_enc, self.decoder_norm_sum().detach(), k_total
            )
            offsets = torch.searchsorted(rows, torch.arange(batch, device=rows.device))
            recon_flat = F.embedding_bag(
                cols, self.W_dec.flatten(1), offsets, mode="sum", per_sample_weights=values.to(self.W_dec.dtype)
            )
            if threshold_decay is not None:
                self._update_threshold(scores, threshold_decay)
            active = values > 0
            codes = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), values, (batch, self.config.n_features), check_invariants=False
            )
            fired = torch.zeros(self.config.n_features, device=xn.device).index_add_(0, cols, active.float()) > 0
            l0 = active.sum() / batch
        else:
            codes = self._inference_codes(self._pre_activations(xn))
            recon_flat = codes @ self.W_dec.flatten(1)
            # codes >= 0 after the ReLU: a feature fired when its column max is > 0 (on CPU 3.7x faster than
            # (codes > 0).any(dim=0), which reduces a bool [B, F] tensor); an empty batch fires nothing
            fired = (
                codes.detach().amax(dim=0) > 0 if batch else codes.new_zeros(self.config.n_features, dtype=torch.bool)
            )
            l0 = torch.count_nonzero(codes) / batch
        recon_n = (recon_flat + self.b_dec.flatten()).view_as(xn)
        error = xn.float() - recon_n.float()
        mse = error.pow(2).sum(dim=(1, 2)).mean()
        if self.config.activation == "relu":
            sparsity = (codes @ self.decoder_norm_sum().to(codes.dtype)).float().mean()
            loss = mse + l1_coefficient * sparsity
        else:
            sparsity = (
                self._auxk_loss(xn.flatten(1), error.detach(), dead_mask, aux_k)
                if self.training and dead_mask is not None
                else mse.new_zeros(())
            )
            loss = mse + aux_coefficient * sparsity
        xf = xn.float()
        fvu = error.pow(2).sum(dim=(0, 2)) / (xf - xf.mean(0)).pow(2).sum(dim=(0, 2)).clamp_min(1e-12)
        return CrosscoderOutput(self.denormalize(recon_n), codes, loss, mse, sparsity, fvu, l0, fired)

    @torch.no_grad()
    def _update_threshold(self, scores: torch.Tensor, decay: float) -> None:
        """EMA of the smallest positive selected score ``scores`` [k·B] (the batch's cut), on the device."""
        smallest = torch.where(scores > 0, scores, torch.full_like(scores, float("inf"))).min()
        smallest = torch.where(torch.isfinite(smallest), smallest.to(self.threshold.dtype), self.threshold)
        blended = torch.where(self.threshold < 0, smallest, self.threshold * decay + smallest * (1 - decay))
        self.threshold.copy_(blended)

    def _auxk_loss(self, xn_flat: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top ``aux_k`` dead features per token reconstruct the residual error.

        ``dead``: bool mask [F] or indices [n_dead]. Only the dead features' encoder columns are
        computed (one [B, N·d] x [N·d, n_dead] matmul) and decoded (one [B, n_dead] x [n_dead, N·d]
        matmul of the top-``aux_k`` codes scattered into the dead columns). Zero when none is dead.

        The decode is dense over the dead features on purpose: gathering the B·aux_k selected decoder
        rows (an ``embedding_bag``) reads B·aux_k·N·d values, 64 GB at B 4096, aux_k 512, N·d 7680, where
        the matmul reads the [n_dead, N·d] rows once; on CPU the gather was 1.4x-4x slower at d 256,
        F 4096, B 2048 with 41 to 2048 dead features (same loss and gradients to float rounding).
        """
        if dead.dtype == torch.bool:
            dead = dead.nonzero().squeeze(1)  # a device sync: the trainer passes indices instead
        if dead.numel() == 0:
            return xn_flat.new_zeros((), dtype=torch.float32)
        pre = torch.addmm(self.b_enc[dead], xn_flat, self.W_enc.flatten(0, 1)[:, dead])
        top = F.relu(pre).topk(min(aux_k, dead.numel()), dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter_(1, top.indices, top.values)  # [B, n_dead]: the top aux_k per token
        recon = acts @ self.W_dec.flatten(1)[dead]  # under autocast both go to its dtype: no float32 [B, n_dead] copy
        return (residual.flatten(1) - recon.float()).pow(2).sum(-1).mean()


SAMPLE_STRIDE = 13
"""Every 13th score (coprime with any power-of-two F, so every feature is sampled) estimates the batch cut."""


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest entries of ``scores`` [n] (unsorted); exactly ``scores.topk(k)``'s set.

    On the CPU a full top-k over B·F scores dominates a BatchTopK step, so the cut is first
    estimated on a strided sample, with a 25% margin, and the top k is taken among the entries
    above it: exact whenever at least k entries pass the estimate (then the k-th largest does),
    which is checked, and a full top-k otherwise. On GPUs ``torch.topk`` (a radix select) is used
    directly: the check would be a host-device sync.
    """
    n = scores.numel()
    if scores.device.type != "cpu" or n < 64 * k or n < 1 << 16:
        return scores.topk(k, sorted=False).indices
    sample = scores[::SAMPLE_STRIDE]
    above = max(1, min(sample.numel(), round(1.25 * k * sample.numel() / n)))
    cut = sample.kthvalue(sample.numel() - above + 1).values
    candidates = (scores >= cut).nonzero().squeeze(1)
    if candidates.numel() < k:
        return scores.topk(k, sorted=False).indices
    return candidates[scores[candidates].topk(k, sorted=False).indices]


class _BatchTopKEncode(torch.autograd.Function):
    """Encoder matmul + BatchTopK selection with a sparse backward.

    Forward: pre = xn @ W_enc + b_enc [B, F]; the top ``k_total`` entries of relu(pre)·w (w = the
    decoder-norm sums [F], a constant here: selection passes no gradient) over the whole batch.
    Returns values [k_total] (relu(pre) at the selected entries; the only differentiable output),
    rows and cols [k_total] (long, sorted by row) and the selected scores [k_total].

    Backward touches only the selected entries: dW_enc[:, c] = sum over selections (r, c) of
    g_rc·xn[r] is an embedding_bag over xn grouped by feature, db_enc = index_add of g, and
    dxn (only when xn needs it) an embedding_bag over W_enc^T grouped by token; g is zero where
    relu(pre) = 0. Cost O(k·B·N·d) instead of the dense O(B·F·N·d).
    """

    @staticmethod
    def forward(ctx, xn_flat, W_enc_flat, b_enc, weights, k_total):
        n_features = W_enc_flat.shape[1]
        pre = torch.addmm(b_enc, xn_flat, W_enc_flat)
        # w >= 0, so relu(pre)·w and pre·w rank the positive entries alike; a non-positive entry is
        # selected only when fewer than k_total are positive, and then carries the value 0 either way
        scores = (pre * weights.to(pre.dtype)).view(-1)
        index = top_indices(scores, k_total).sort().values  # row-major order: sorted by token
        rows = torch.div(index, n_features, rounding_mode="floor")
        cols = index - rows * n_features
        values = pre.view(-1)[index].clamp_min(0)
        ctx.save_for_backward(xn_flat, W_enc_flat, rows, cols, values > 0)
        ctx.mark_non_differentiable(rows, cols)
        ctx.n_features = n_features
        return values, rows, cols, scores[index].clamp_min(0)

    @staticmethod
    def backward(ctx, grad_values, _rows, _cols, _scores):
        xn_flat, W_enc_flat, rows, cols, positive = ctx.saved_tensors
        g = torch.where(positive, grad_values, torch.zeros_like(grad_values)).to(xn_flat.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            # the selections grouped by feature; each feature's bag starts where its index would be inserted
            # (searchsorted, not bincount: on CUDA bincount reads its input's min and max back to the host)
            by_col, by_feature = cols.sort(stable=True)
            offsets = torch.searchsorted(by_col, torch.arange(ctx.n_features, device=cols.device))
            grad_W = F.embedding_bag(
                rows[by_feature], xn_flat, offsets, mode="sum", per_sample_weights=g[by_feature]
            ).t()
            grad_W = grad_W.to(W_enc_flat.dtype)
        if ctx.needs_input_grad[2]:
            # index_put_ with accumulate sums deterministically on CUDA (index_add_ uses atomics there)
            grad_b = torch.zeros(ctx.n_features, dtype=g.dtype, device=g.device).index_put_((cols,), g, accumulate=True)
        if ctx.needs_input_grad[0]:
            offsets = torch.searchsorted(rows, torch.arange(xn_flat.shape[0], device=rows.device))
            grad_x = F.embedding_bag(cols, W_enc_flat.t().to(g.dtype), offsets, mode="sum", per_sample_weights=g).to(
                xn_flat.dtype
            )
        return grad_x, grad_W, grad_b, None, None


def crosscoder_fingerprint(crosscoder) -> str:
    """sha256 (hex) identifying a crosscoder's weights: config, scales, threshold, biases and the
    full decoder ``W_dec``, hashed as float32 bytes on the CPU.

    Calibrated per-source BatchTopK thresholds (``config.source_thresholds``) are part of the
    config, so calibrating a crosscoder changes its fingerprint (its per-source codes change); a
    crosscoder without them hashes exactly as before the field existed. The recorded model
    fingerprints (``config.model_fingerprints``) are provenance and take no part.

    Stable across save/load, devices and processes; any change of the decoder changes it (a cast
    to a lower precision does too). Costs one pass over W_dec (about 0.35 s for 32768 features x
    2 models x 2304 dims on one CPU core) and is cached on the object until its tensors change.
    """
    tensors = (crosscoder.W_dec, crosscoder.b_dec, crosscoder.b_enc, crosscoder.scales, crosscoder.threshold)
    fields = asdict(crosscoder.config)
    if fields.get("source_thresholds", 0) is None:
        del fields["source_thresholds"]  # uncalibrated: the fingerprint of crosscoders saved before the field
    fields.pop("model_fingerprints", None)  # which models it was trained on: provenance, not the weights
    config = json.dumps(fields, sort_keys=True)
    key = (config, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
    cached = getattr(crosscoder, "_posttrain_probe_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(config.encode())
    for tensor in tensors:
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(memoryview(data.numpy()).cast("B"))
    fingerprint = digest.hexdigest()
    object.__setattr__(crosscoder, "_posttrain_probe_fingerprint", (key, fingerprint))
    return fingerprint
