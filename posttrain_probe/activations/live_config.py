"""How :class:`~posttrain_probe.activations.live.LiveActivations` reads its dataset through its models: torch-free,
so configs of the steps can nest it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain_probe.errors import ProbeError


@dataclass
class LiveConfig:
    """Reading settings of live paired forwards (document length, forward batch, token budget, dataset, models)."""

    seq_len: int = field(default=512, metadata={"help": "Tokens per document; longer documents are truncated."})
    forward_batch_size: int = field(default=8, metadata={"help": "Documents per model forward."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Stop each pass after this many kept tokens (None: the whole dataset)."}
    )
    outlier_factor: float | None = field(
        default=None, metadata={"help": "Drop tokens whose norm exceeds this many times the median norm (any model)."}
    )
    column: str | None = field(
        default=None,
        metadata={"help": "Text or chat-messages column (default: text, messages, content, prompt, question)."},
    )
    split: str = field(default="train", metadata={"help": "Dataset split (hub datasets and folders)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype of models loaded from paths: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32."
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for models loaded from paths (default: cuda if available)."}
    )

    def __post_init__(self) -> None:
        for name in ("seq_len", "forward_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ProbeError(f"max_tokens must be >= 1 (None: the whole dataset), got {self.max_tokens}")
