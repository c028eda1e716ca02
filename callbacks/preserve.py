"""Feature-preserving fine-tuning (docs/methods.md sec. 12, docs/preserve.md) for any transformers / TRL Trainer.

    preserver = FeaturePreserver(Crosscoder.from_pretrained("runs/cc"), features, model="base", coefficient=1.0)

    class MyTrainer(FeaturePreservingMixin, SFTTrainer):  # any Trainer subclass
        pass

    trainer = MyTrainer(model=..., args=..., preserver=preserver, base_model=None, ...)

or from ``PreserveArguments`` (what ``recipes/sft_preserve.py`` parses): ``build_preserver(args)``. The mixin adds
``coefficient * preservation_loss`` to whatever ``compute_loss`` the Trainer computes, reading a_theta from that
same forward (a pre-hook on block L) and a_base from a truncated forward of the frozen base model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.preserve import (
    DEFAULT_COEFFICIENT,
    DEFAULT_FEATURES,
    FeaturePreserver,
    preserved_tokens,
)
from posttrain_probe.layers import decoder_blocks, unwrap_model


@dataclass
class PreserveArguments:
    """Which crosscoder features to preserve during fine-tuning, and how strongly."""

    preserve_crosscoder: str | None = field(
        default=None,
        metadata={"help": "Crosscoder (or SAE) directory whose features are preserved (unset: a plain SFT run)."},
    )
    preserve_features: str = field(
        default=DEFAULT_FEATURES,
        metadata={
            "help": "S: base-only (default), shared, finetune-only (NormRatio category), a feature-set JSON, or indices 3,17,42."
        },
    )
    preserve_coefficient: float = field(
        default=DEFAULT_COEFFICIENT,
        metadata={
            "help": "lambda: weight of the mean per-token ||f_S(a_theta) - f_S(a_base)||^2 added to the loss (>= 0)."
        },
    )
    preserve_model: str = field(
        default="base", metadata={"help": "Crosscoder branch (model name) whose per-source code f_S is preserved."}
    )
    preserve_base: str = field(
        default="base", metadata={"help": "Base model of the NormRatio categories (categories are base vs fine-tuned)."}
    )
    preserve_finetuned: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tuned model of the NormRatio categories (default: the other model of a two-model crosscoder)."
        },
    )
    preserve_layer: int | None = field(default=None, metadata={"help": "Site L (default: the crosscoder's layer)."})
    preserve_base_model: str | None = field(
        default=None,
        metadata={
            "help": "Frozen base model a_base comes from (default: the checkpoint the trained model was loaded from; PEFT: the model without its adapter)."
        },
    )
    preserve_allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Train even when the model is not the one the crosscoder branch was trained on (nor tuned from it)."
        },
    )
    preserve_norm_ratio_scale: str = field(
        default="all",
        metadata={
            "help": "NormRatio denominator of a category: all (max decoder norm over every model slot, docs/methods.md default) or pair (the two compared models, paper S)."
        },
    )

    def __post_init__(self) -> None:
        from posttrain_probe.analysis.attribution import NORM_RATIO_SCALES

        if not (isinstance(self.preserve_coefficient, (int, float)) and 0 <= self.preserve_coefficient < float("inf")):
            raise ProbeError(
                f"preserve_coefficient (lambda) must be a finite number >= 0, got {self.preserve_coefficient}"
            )
        if self.preserve_norm_ratio_scale not in NORM_RATIO_SCALES:
            raise ProbeError(
                f"preserve_norm_ratio_scale {self.preserve_norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}"
            )


def build_preserver(args: PreserveArguments) -> FeaturePreserver | None:
    """The FeaturePreserver that ``args`` describe (None when preservation is off: no ``preserve_crosscoder``)."""
    if args.preserve_crosscoder is None:
        return None
    return FeaturePreserver.from_directory(
        args.preserve_crosscoder,
        args.preserve_features,
        base=args.preserve_base,
        finetuned=args.preserve_finetuned,
        norm_ratio_scale=args.preserve_norm_ratio_scale,
        model=args.preserve_model,
        layer=args.preserve_layer,
        coefficient=args.preserve_coefficient,
        allow_model_mismatch=args.preserve_allow_model_mismatch,
        override_hint="pass --preserve_allow_model_mismatch to override",
    )


class FeaturePreservingMixin:
    """Mix in front of any ``transformers.Trainer`` subclass: ``class T(FeaturePreservingMixin, SFTTrainer)``.

    Extra constructor arguments: ``preserver`` (a :class:`FeaturePreserver`; None: the Trainer unchanged) and
    ``base_model``, the frozen model a_base comes from: a model, a name/path (loaded like TRL's reference models,
    blocks after L dropped except under DeepSpeed), or None for the trained model's own checkpoint
    (``config._name_or_path``) or, for a PEFT model, the model with its adapter switched off. It is prepared as TRL
    prepares reference models (DeepSpeed: TRL's ``prepare_deepspeed``, sharded under ZeRO-3; else
    ``accelerator.prepare_model(evaluation_mode=True)``). FSDP is not supported. Both models are checked against
    the crosscoder branch before training (:meth:`FeaturePreserver.check_model`).

    Loss: ``super().compute_loss(...) + lambda * share * term``; ``term`` is the per-token mean over this
    micro-batch (:meth:`FeaturePreserver.loss`), ``share`` its share of the optimizer batch's loss tokens when the
    Trainer normalises the loss by ``num_items_in_batch`` (then it does not divide by gradient accumulation), else 1:
    micro-batches weigh in the term as they do in the SFT loss, under any accumulation and data parallelism.
    Logged as ``preserve``: per token, before lambda, the mean over every token of the micro-batches and ranks since the
    last log (as one process with the whole batch would compute it).
    """

    def __init__(self, *args, preserver: FeaturePreserver | None = None, base_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preserver = preserver
        self.base_model = None
        # per mode: [term x tokens, tokens] summed over micro-batches and ranks since the last log (on the device)
        self._preserve_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        if preserver is None:
            return
        if self.is_fsdp_enabled:
            raise ProbeError("feature preservation supports DDP and DeepSpeed ZeRO-1/2/3, not FSDP")
        preserver.check_model(self.model, what="the model being trained")
        self.base_model = self._prepare_base_model(base_model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._bos_token_id = getattr(tokenizer, "bos_token_id", None)

    def _prepare_base_model(self, base_model):
        from accelerate.utils import is_peft_model

        if base_model is None and is_peft_model(self.model):
            return None  # the base forward switches the adapter off
        if base_model is None:
            base_model = getattr(unwrap_model(self.model).config, "_name_or_path", "")
            if not base_model:
                raise ProbeError(
                    "the trained model does not record where it was loaded from: pass base_model= (a model or a path)"
                )
        if isinstance(base_model, str):
            base_model = self._load_base_model(base_model)
        self.preserver.check_model(base_model, what="the frozen base model")
        base_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(base_model, self.accelerator)
        return self.accelerator.prepare_model(base_model, evaluation_mode=True)

    def _load_base_model(self, path: str):
        from trl.trainer.utils import create_model_from_path

        init_kwargs = dict(getattr(self.args, "model_init_kwargs", None) or {})
        if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", getattr(self.args, "trust_remote_code", False))
        init_kwargs.setdefault("dtype", self.model.dtype)
        init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        model = create_model_from_path(path, **init_kwargs)
        if not self.is_deepspeed_enabled:
            del decoder_blocks(model)[self.preserver.layer + 1 :]  # a_base needs blocks < L (block L holds the hook)
        return model

    @contextlib.contextmanager
    def _frozen_base(self, model):
        """The frozen base causal LM; for a PEFT model without ``base_model``, the model with its adapter off."""
        if self.base_model is not None:
            yield self.base_model
            return
        peft_model = self.accelerator.unwrap_model(model)
        with peft_model.disable_adapter():
            yield peft_model.get_base_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.preserver is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # The Trainer's own loss; a_theta = the residual stream entering block L in that same forward
        with self.preserver.capture(model) as site:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if "hidden" not in site:
            raise ProbeError(f"the training forward never reached decoder block {self.preserver.layer}")
        loss = result[0] if return_outputs else result

        # a_base: the frozen base model's truncated forward on the same tokens
        ids, mask, positions = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        with torch.no_grad(), self._frozen_base(model) as base:
            base_hidden = self.preserver.base_activations(base, ids, mask, positions)
        keep = preserved_tokens(ids, mask, positions, bos_token_id=self._bos_token_id)
        term = self.preserver.loss(site["hidden"], base_hidden, keep)
        loss = loss + self.preserver.coefficient * self._batch_share(inputs, num_items_in_batch) * term

        # for the log: (term x its tokens, tokens) summed over ranks, added up on the device until the next log
        mode = "train" if self.model.training else "eval"
        wide = torch.float32 if term.device.type == "mps" else torch.float64  # token counts exact past 2^24
        n_kept = keep.sum().to(wide)
        summed = self.accelerator.reduce(torch.stack([term.detach().to(wide) * n_kept, n_kept]), reduction="sum")
        previous = self._preserve_sums[mode]
        self._preserve_sums[mode] = summed if previous is None else previous + summed
        return (loss, result[1]) if return_outputs else loss

    def _batch_share(self, inputs, num_items_in_batch):
        """This micro-batch's weight: its loss tokens / ``num_items_in_batch`` (x processes when the Trainer scales
        its loss so), or 1 when the Trainer divides the loss by the gradient-accumulation steps itself."""
        if num_items_in_batch is None:
            return 1.0
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs["labels"][..., 1:]
        share = (labels != -100).sum() / num_items_in_batch
        if self.args.average_tokens_across_devices:
            share = share * (self.accelerator.num_processes // self.get_tp_size())
        return share

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._preserve_sums[mode]
        if sums is not None:
            total, n_tokens = sums.tolist()
            if n_tokens:  # no kept token since the last log: no value (0 would read as perfectly preserved)
                logs = {**logs, ("preserve" if mode == "train" else "eval_preserve"): total / n_tokens}
            self._preserve_sums[mode] = None
        super().log(logs, *args, **kwargs)
