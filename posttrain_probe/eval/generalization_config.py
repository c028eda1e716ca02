"""Settings of ``features generalization`` (:class:`GeneralizationConfig`).

Torch-free: the CLI builds its options from this dataclass at startup. Field names are the flags
(``--split-half``) and the YAML keys (``split_half``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.analysis.critical import split_names
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs

PADDING_SIDES = ("right", "left")


@dataclass(kw_only=True)
class GeneralizationConfig:
    """Settings of ``features generalization`` (docs/methods.md sec. 6, paper R sec. 3.2): Score_k^t at the last prompt
    token of G_t, the per-task sets S_t, their intersection S and overlap.

    Python: ``features_generalization(GeneralizationConfig(crosscoder="runs/cc", base="base", rl="rl",
    critical="runs/critical.json", model=["base=Qwen/Qwen3-4B-Base", "rl=runs/grpo/final"], out="runs/genfeat"))``;
    CLI: ``posttrain-probe features generalization --crosscoder runs/cc --base base --rl rl --critical runs/critical.json
    --model base=Qwen/Qwen3-4B-Base --model rl=runs/grpo/final --out runs/genfeat``; YAML: the same keys.
    """

    crosscoder: Path | None = field(
        default=None, metadata={"help": "Base-vs-RL crosscoder directory (required unless Python passes crosscoder=)."}
    )
    base: str = field(metadata={"help": "Crosscoder branch of the base model."})
    rl: str = field(metadata={"help": "Crosscoder branch of the RL-tuned model."})
    critical: Path = field(
        metadata={"help": "critical.json from `posttrain-probe critical` (G_t and the exact prompts)."}
    )
    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NAME=PATH for the base and the RL branch (repeat for both; required unless Python passes models=)."
        },
    )
    out: Path = field(
        metadata={
            "help": "Output directory: generalization_features.json, feature_sets/, generalization.json, scores.csv, overlap.png/.svg."
        }
    )
    threshold: float = field(
        default=0.2,
        metadata={
            "help": "Per task, keep features scoring >= this fraction of the task's maximum score (paper R: 0.2)."
        },
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Tasks to use (repeat or comma-separate; default: every task of --critical)."},
    )
    overlap: str = field(
        default="row",
        metadata={"help": "Overlap matrix denominator: row (|S_a|), jaccard (|S_a ∪ S_b|) or min (min(|S_a|, |S_b|))."},
    )
    add_bos_token: bool | None = field(
        default=None,
        metadata={
            "help": "As lm-eval's HFLM model_arg add_bos_token, if the critical runs set it (default: the tokenizer's own)."
        },
    )
    padding_side: str = field(
        default="right", metadata={"help": "Padding of the prompt batches: right or left (results agree)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per truncated forward."})
    device: str | None = field(default=None, metadata={"help": "Device of the models (default: cuda if available)."})
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."}
    )
    split_half: int | None = field(
        default=None,
        metadata={
            "help": "SEED: select on one half of each task's G_t (seeded split); the held-out half's doc ids go into the feature set, and intervene evaluates on them only."
        },
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )
    allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Score even when a --model is not the model its crosscoder branch was trained on (nor tuned from it); recorded in generalization.json."
        },
    )

    def __post_init__(self) -> None:
        from posttrain_probe.analysis.critical_config import OVERLAP_NORMALIZATIONS, check_threshold

        for name in ("crosscoder", "critical", "out"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        self.model = [f"{k}={v}" for k, v in parse_model_specs(self.model).items()]
        self.tasks = split_names(self.tasks)
        if self.base == self.rl:
            raise ProbeError(
                f"base and rl name the same branch {self.base!r}; expected two different branches of the crosscoder"
            )
        self.threshold = check_threshold(self.threshold)
        if self.overlap not in OVERLAP_NORMALIZATIONS:
            raise ProbeError(f"overlap normalization {self.overlap!r} is not one of {OVERLAP_NORMALIZATIONS}")
        if self.padding_side not in PADDING_SIDES:
            raise ProbeError(f"padding_side {self.padding_side!r}: expected 'left' or 'right'")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ProbeError(f"batch_size must be a positive number of prompts per forward, got {self.batch_size!r}")
        if self.split_half is not None and (
            isinstance(self.split_half, bool) or not isinstance(self.split_half, int) or self.split_half < 0
        ):
            raise ProbeError(f"split seed {self.split_half!r}: expected an int >= 0")
