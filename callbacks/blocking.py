"""``GradientBlockingCallback``: gradient blocking (docs/methods.md sec. 9) for any transformers / TRL Trainer.

    blocker = GradientBlocker(Crosscoder.from_pretrained("runs/cc"), features, model="base", mode="sae")
    trainer.add_callback(GradientBlockingCallback(blocker))

or from ``BlockingArguments`` (what ``recipes/sft_blocked.py`` parses): ``blocking_callback(args)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainerCallback

from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.blocking import MODES, GradientBlocker


@dataclass
class BlockingArguments:
    """Which crosscoder features to protect during fine-tuning, and how."""

    block_crosscoder: str | None = field(
        default=None, metadata={"help": "Crosscoder (or SAE) directory whose features are protected."}
    )
    block_features: str | None = field(
        default=None,
        metadata={
            "help": "shared, base-only, finetune-only (NormRatio category), a feature-set JSON, or indices 3,17,42."
        },
    )
    block_model: str = field(
        default="base", metadata={"help": "Crosscoder branch (model name) whose encoder/decoder define the features."}
    )
    block_base: str = field(
        default="base",
        metadata={
            "help": "Base model of the NormRatio categories (categories are always base vs fine-tuned, whichever branch blocks)."
        },
    )
    block_finetuned: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tuned model of the NormRatio categories (default: the other model of a two-model crosscoder)."
        },
    )
    block_mode: str = field(
        default="sae",
        metadata={"help": "sae (paper formula), subspace (orthogonal projection) or ablate (forward ablation)."},
    )
    block_layer: int | None = field(default=None, metadata={"help": "Site L (default: the crosscoder's layer)."})
    block_encoder_bias: bool = field(
        default=True,
        metadata={
            "help": "sae mode: protect the per-source code with the encoder bias b_enc (docs/methods.md default); false: paper S's ReLU(W_enc^T x) without it."
        },
    )
    block_allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Attach even when the model being trained is not the one the crosscoder branch was trained on (nor tuned from it)."
        },
    )
    block_norm_ratio_scale: str = field(
        default="all",
        metadata={
            "help": "NormRatio denominator of a category: all (max decoder norm over every model slot, docs/methods.md default) or pair (over the two compared models, paper S); differs for crosscoders of more than 2 models."
        },
    )

    def __post_init__(self) -> None:
        from posttrain_probe.analysis.attribution import NORM_RATIO_SCALES

        if self.block_mode not in MODES:
            raise ProbeError(f"block_mode {self.block_mode!r} is not one of {MODES}")
        if self.block_norm_ratio_scale not in NORM_RATIO_SCALES:
            raise ProbeError(
                f"block_norm_ratio_scale {self.block_norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}"
            )
        if not self.block_encoder_bias and self.block_mode != "sae":
            raise ProbeError(
                f"block_encoder_bias=false changes the code of block_mode 'sae' only, not {self.block_mode!r}"
            )
        if (self.block_crosscoder is None) != (self.block_features is None):
            raise ProbeError("gradient blocking needs both block_crosscoder and block_features")


def build_blocker(args: BlockingArguments) -> GradientBlocker | None:
    """The GradientBlocker that ``args`` describe (None when blocking is off)."""
    if args.block_crosscoder is None:
        return None
    return GradientBlocker.from_directory(
        args.block_crosscoder,
        args.block_features,
        base=args.block_base,
        finetuned=args.block_finetuned,
        norm_ratio_scale=args.block_norm_ratio_scale,
        model=args.block_model,
        layer=args.block_layer,
        mode=args.block_mode,
        encoder_bias=args.block_encoder_bias,
        allow_model_mismatch=args.block_allow_model_mismatch,
        override_hint="pass --block_allow_model_mismatch to override",
    )


class GradientBlockingCallback(TrainerCallback):
    """Attach a :class:`GradientBlocker` to the Trainer's model for the whole of ``train()``."""

    def __init__(self, blocker: GradientBlocker) -> None:
        self.blocker = blocker

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ProbeError("GradientBlockingCallback got no model from the Trainer")
        if not self.blocker.is_attached:
            self.blocker.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.blocker.detach()


def blocking_callback(args: BlockingArguments) -> GradientBlockingCallback | None:
    """``GradientBlockingCallback(build_blocker(args))``, or None when blocking is off."""
    blocker = build_blocker(args)
    return None if blocker is None else GradientBlockingCallback(blocker)
