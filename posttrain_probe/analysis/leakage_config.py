"""Settings of ``leakage`` (:class:`LeakageConfig`); torch-free, so the CLI builds its options at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.analysis.analyze_config import NORM_RATIO_SCALES
from posttrain_probe.errors import ProbeError

MATCHINGS = ("hungarian", "argmax")
"""How protected features are matched to a base-vs-blocked crosscoder's features (:func:`~posttrain_probe.analysis.leakage_crosscoder.match_protected`)."""


@dataclass(kw_only=True)
class LeakageConfig:
    """Settings of ``leakage`` (docs/methods.md sec. 9, paper S E.1): how much the protected features still moved
    after gradient-blocked fine-tuning, and (with ``blocked_crosscoder``) their NormRatio bands in an already trained
    base-vs-blocked crosscoder.

    Python: ``leakage(LeakageConfig(crosscoder="runs/cc", base=..., blocked=..., features="shared", dataset=..., out=...))``;
    CLI: ``posttrain-probe leakage --crosscoder runs/cc --base ... --blocked ... --features shared --dataset ... --out ...``;
    YAML: the same keys.
    """

    crosscoder: Path = field(
        metadata={"help": "The blocking crosscoder/SAE directory (block_crosscoder of the blocked run)."}
    )
    base: str = field(metadata={"help": "Base model the blocked run started from (local dir or hub name)."})
    blocked: str = field(metadata={"help": "Model fine-tuned with gradient blocking (local dir or hub name)."})
    features: str = field(
        metadata={
            "help": "Protected features (block_features): shared, base-only, finetune-only, a feature-set JSON, or 3,17,42."
        }
    )
    dataset: str = field(metadata={"help": "Tokens to compare on: a dataset spec as for `collect`."})
    out: Path = field(metadata={"help": "Output directory: leakage.json, features.csv, leakage.png/.svg."})
    model_name: str = field(
        default="base", metadata={"help": "Crosscoder branch whose per-source codes define the features (block_model)."}
    )
    finetuned: str | None = field(
        default=None,
        metadata={
            "help": "Branch a NormRatio category is computed against (default: the other model of a two-model crosscoder)."
        },
    )
    layer: int | None = field(
        default=None, metadata={"help": "Site L (default: the crosscoder's layer; another layer is refused)."}
    )
    max_tokens: int = field(default=100_000, metadata={"help": "Tokens compared (0: the whole dataset)."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per document."})
    forward_batch_size: int = field(default=8, metadata={"help": "Documents per model forward."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset config name (hub datasets)."})
    column: str | None = field(
        default=None,
        metadata={"help": "Text or chat-messages column (default: text, messages, content, prompt, question)."},
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype (auto: bfloat16 on GPU, float32 on CPU)."})
    device: str | None = field(default=None, metadata={"help": "Device of the models (default: cuda if available)."})
    blocked_crosscoder: Path | None = field(
        default=None,
        metadata={
            "help": "An already trained base-vs-blocked crosscoder (e.g. `collect` + `crosscoder train` on --base and --blocked): report the NormRatio bands of the protected features in it."
        },
    )
    matching: str = field(
        default="hungarian",
        metadata={
            "help": "Protected -> base-vs-blocked crosscoder features by base-decoder cosine: hungarian (one-to-one) or argmax (large sets)."
        },
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )
    norm_ratio_scale: str = field(
        default="all",
        metadata={
            "help": "NormRatio denominator of a category --features and of the base-vs-blocked bands: all (max over every model slot, docs/methods.md) or pair (the two compared models, paper S)."
        },
    )
    allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Compare even when --base/--blocked is not the model --model-name was trained on (nor tuned from it); recorded in leakage.json."
        },
    )

    def __post_init__(self) -> None:
        for name in ("crosscoder", "out", "blocked_crosscoder"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        self.features = (
            str(self.features) if not isinstance(self.features, list) else ",".join(str(f) for f in self.features)
        )
        if self.max_tokens < 0:
            raise ProbeError(f"max_tokens must be >= 0 (0: the whole dataset), got {self.max_tokens}")
        for name in ("seq_len", "forward_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.matching not in MATCHINGS:
            raise ProbeError(f"matching {self.matching!r} is not one of {MATCHINGS}")
        if self.norm_ratio_scale not in NORM_RATIO_SCALES:
            raise ProbeError(f"norm_ratio_scale {self.norm_ratio_scale!r} is not one of {NORM_RATIO_SCALES}")
