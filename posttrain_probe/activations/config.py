"""Settings of an activation collection run: torch-free, so the CLI builds its options without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError
from posttrain_probe.models import parse_model_specs


@dataclass
class CollectConfig:
    """Settings of an activation collection run (Python API, `posttrain-probe collect` and YAML)."""

    model: list[str] = field(
        metadata={"help": "NAME=PATH (local dir or hub name); repeat for every model (a mapping in YAML)."}
    )
    dataset: str = field(
        metadata={"help": "Local .txt/.jsonl/.json/.parquet/.csv, a datasets name, or synthetic:<name>."}
    )
    out: Path = field(metadata={"help": "Output directory: OUT/<name>/layer<L>/ per model and layer."})
    layer: list[int] = field(
        default_factory=list,
        metadata={"help": "Site L (residual stream entering block L); repeat for several. Default n_layers // 2."},
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per document; longer documents are truncated."})
    batch_size: int = field(default=8, metadata={"help": "Documents per forward pass."})
    max_tokens: int | None = field(
        default=1_000_000,
        metadata={"help": "Stop after this many kept tokens per model (0 or None: the whole dataset)."},
    )
    dtype: str = field(default="bfloat16", metadata={"help": "Storage dtype of activations: bf16, fp16 or fp32."})
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype of models loaded from paths: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for models loaded from paths (default: cuda if available)."}
    )
    shard_tokens: int = field(
        default=65536, metadata={"help": "Tokens per shard file (shards are cut at batch boundaries)."}
    )
    outlier_factor: float | None = field(
        default=None, metadata={"help": "Drop tokens whose norm exceeds this many times the median norm (any model)."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split (hub datasets and folders)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    column: str | None = field(
        default=None,
        metadata={"help": "Text or chat-messages column (default: text, messages, content, prompt, question)."},
    )
    n_docs: int | None = field(default=None, metadata={"help": "Use only the first n documents of the dataset."})

    def __post_init__(self) -> None:
        self.model = [f"{name}={path}" for name, path in parse_model_specs(self.model).items()]
        self.out = Path(self.out)
        self.layer = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        bad = [layer for layer in self.layer if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
        if bad:
            raise ProbeError(f"layers {bad} are not sites: expected integers >= 0 (residual stream entering block L)")
        self.dtype = dtype_name(self.dtype)
        for name in ("seq_len", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens == 0:
            self.max_tokens = None
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ProbeError(f"max_tokens must be >= 0 (0 or None: whole dataset), got {self.max_tokens}")
