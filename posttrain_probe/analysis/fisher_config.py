"""Settings of ``features fisher`` (:class:`FisherConfig`) and the segment format it nests (:class:`SegmentFormat`).

Torch-free: the CLI builds its options from these dataclasses at startup. Field names are the flags
(``--top-k``) and the YAML keys (``top_k``); the fields of :class:`SegmentFormat` are flags of their own
(``--format``, ``--reasoning-delimiters``, ...) and, in YAML, the keys of a ``segments:`` section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError

SEGMENT_FORMATS = ("openthoughts", "delimiters", "columns")
"""How reasoning and solution segments are marked (:class:`SegmentFormat`)."""
OPENTHOUGHTS_REASONING = ("<|begin_of_thought|>", "<|end_of_thought|>")
OPENTHOUGHTS_SOLUTION = ("<|begin_of_solution|>", "<|end_of_solution|>")
TABLE_FORMATS = ("csv", "parquet")


@dataclass
class SegmentFormat:
    """Where the reasoning and solution segments of a document are."""

    format: str = field(
        default="openthoughts",
        metadata={
            "help": "openthoughts (the <|begin_of_thought|>... tags), delimiters (--reasoning/--solution-delimiters) or columns (--reasoning/--solution-column)."
        },
    )
    reasoning_delimiters: tuple[str, str] | None = field(
        default=None,
        metadata={
            "help": "--format delimiters: BEGIN END of the reasoning segment (END '' = to the end of the turn/text)."
        },
    )
    solution_delimiters: tuple[str, str] | None = field(
        default=None,
        metadata={
            "help": "--format delimiters: BEGIN END of the solution segment (END '' = to the end of the turn/text)."
        },
    )
    reasoning_column: str | None = field(
        default=None,
        metadata={"help": "--format columns: the reasoning text column (OpenThoughts metadata: deepseek_reasoning)."},
    )
    solution_column: str | None = field(
        default=None,
        metadata={"help": "--format columns: the solution text column (OpenThoughts metadata: deepseek_solution)."},
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "--format columns: optional column put first, in no segment (e.g. problem)."}
    )
    separator: str = field(
        default="\n\n",
        metadata={"help": "--format columns: text between prompt, reasoning and solution (default: a blank line)."},
    )
    column: str | None = field(
        default=None,
        metadata={
            "help": "openthoughts/delimiters: the chat or text column (default: conversations, messages, then the usual text columns)."
        },
    )

    def __post_init__(self) -> None:
        if self.format not in SEGMENT_FORMATS:
            raise ProbeError(f"segment format {self.format!r} is not one of {SEGMENT_FORMATS}")
        pairs = {"reasoning_delimiters": self.reasoning_delimiters, "solution_delimiters": self.solution_delimiters}
        pairs = {k: (tuple(v) if v is not None and any(x is not None for x in v) else None) for k, v in pairs.items()}
        self.reasoning_delimiters, self.solution_delimiters = (
            pairs["reasoning_delimiters"],
            pairs["solution_delimiters"],
        )
        columns = {
            "reasoning_column": self.reasoning_column,
            "solution_column": self.solution_column,
            "prompt_column": self.prompt_column,
        }
        if self.format == "delimiters":
            for name, pair in pairs.items():
                if pair is None:
                    raise ProbeError(
                        f"format 'delimiters' needs {name} (--{name.replace('_', '-')} BEGIN END), e.g. '<think>' '</think>'"
                    )
                if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0] or not isinstance(pair[1], str):
                    raise ProbeError(
                        f"{name} {pair!r}: expected a non-empty begin string and an end string ('' = to the end)"
                    )
        elif any(pair is not None for pair in pairs.values()):
            raise ProbeError(f"delimiters are only used with format 'delimiters' (format is {self.format!r})")
        if self.format == "columns":
            for name in ("reasoning_column", "solution_column"):
                if not columns[name]:
                    raise ProbeError(f"format 'columns' needs {name} (--{name.replace('_', '-')} NAME)")
            if self.column is not None:
                raise ProbeError(
                    "column is for formats openthoughts/delimiters; format 'columns' takes reasoning_column and solution_column"
                )
        elif any(columns.values()):
            raise ProbeError(
                f"reasoning/solution/prompt columns are only used with format 'columns' (format is {self.format!r})"
            )

    @property
    def delimiters(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(reasoning pair, solution pair) for the tag-based formats."""
        if self.format == "openthoughts":
            return OPENTHOUGHTS_REASONING, OPENTHOUGHTS_SOLUTION
        return self.reasoning_delimiters, self.solution_delimiters  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings."""
        out = asdict(self)
        if self.format != "columns":
            reasoning, solution = self.delimiters
            out.update(reasoning_delimiters=list(reasoning), solution_delimiters=list(solution))
        return out


@dataclass(kw_only=True)
class FisherConfig:
    """Settings of ``features fisher`` (paper S eq. 1): Fisher reasoning features, rho distributions and ReasonScore.

    Python: ``features_fisher(FisherConfig(crosscoder="runs/cc", model=["base=...", "sft=..."], dataset=..., out=...))``;
    CLI: ``posttrain-probe features fisher --crosscoder runs/cc --model base=... --dataset ... --out ...``;
    YAML: the same keys (``segments:`` a section of :class:`SegmentFormat` keys).
    """

    crosscoder: Path | None = field(
        default=None,
        metadata={
            "help": "Crosscoder directory: every --model NAME must be one of its branches (this or --sae is required)."
        },
    )
    sae: Path | None = field(
        default=None,
        metadata={
            "help": "Instead of --crosscoder: an SAE (1-model crosscoder) directory; every --model is encoded with it."
        },
    )
    model: list[str] = field(
        metadata={"help": "NAME=PATH (local dir or hub name); repeat. rho is reported for every model."}
    )
    select_model: str | None = field(
        default=None, metadata={"help": "Model whose codes select the features (default: the first --model)."}
    )
    dataset: str = field(
        metadata={
            "help": "Dataset spec as for `collect` (local .jsonl/.parquet/..., a datasets name such as open-thoughts/OpenThoughts-114k)."
        }
    )
    segments: SegmentFormat = field(
        default_factory=SegmentFormat,
        metadata={"help": "Where the reasoning and solution segments are (YAML: a section of its fields)."},
    )
    top_k: int = field(default=50, metadata={"help": "Number of features selected."})
    floor_quantile: float = field(
        default=0.9,
        metadata={"help": "Magnitude floor: this quantile of E_reasoning[f^2] over live features (0.9 = top decile)."},
    )
    floor: float | None = field(
        default=None,
        metadata={
            "help": "Absolute magnitude floor on E_reasoning[f^2] (code units squared); overrides --floor-quantile."
        },
    )
    reasonscore: bool = field(
        default=True,
        metadata={"help": "Also compute the ReasonScore baseline (Galichin et al. 2025) on the select model."},
    )
    alpha: float = field(default=0.7, metadata={"help": "ReasonScore: entropy exponent (paper: 0.7)."})
    reason_words: Path | None = field(
        default=None,
        metadata={"help": 'ReasonScore: JSON list of word variants instead of the paper\'s (e.g. [" Wait", "Hmm"]).'},
    )
    out: Path = field(
        metadata={
            "help": "Output directory: fisher_features.json, reasonscore_features.json, features.csv, rho.csv, summary.json, rho.png/.svg."
        }
    )
    max_docs: int = field(default=1000, metadata={"help": "Documents read (the first N rows; 0: all)."})
    seq_len: int = field(
        default=4096,
        metadata={
            "help": "Tokens per document (longer ones are truncated; documents with cut segments are counted: raise it if many are)."
        },
    )
    forward_batch_size: int = field(
        default=8,
        metadata={
            "help": "Documents per model forward: documents are packed by length into forwards of at most forward_batch_size x the longest document's tokens on a CPU, forward_batch_size x seq_len tokens on an accelerator (shorter ones share a forward)."
        },
    )
    layer: int | None = field(
        default=None, metadata={"help": "Site L (default: the crosscoder's layer; another layer is refused)."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset config name (e.g. metadata for OpenThoughts-114k's column layout)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype (auto: bfloat16 on GPU, float32 on CPU)."})
    device: str | None = field(default=None, metadata={"help": "Device of the models (default: cuda if available)."})
    table_format: str = field(default="csv", metadata={"help": "Tables: csv or parquet."})
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )
    allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Encode even a --model that is not the model its branch was trained on (nor tuned from it); recorded in summary.json."
        },
    )

    def __post_init__(self) -> None:
        if self.crosscoder is not None and self.sae is not None:
            raise ProbeError(
                "give exactly one of --crosscoder DIR and --sae DIR"
            )  # neither: the step takes a crosscoder object
        for name in ("crosscoder", "sae", "reason_words", "out"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if isinstance(self.segments, dict):
            self.segments = SegmentFormat(**self.segments)
        self.model = (
            [str(m) for m in self.model]
            if not isinstance(self.model, dict)
            else [f"{k}={v}" for k, v in self.model.items()]
        )
        if not self.model:
            raise ProbeError("no model given: expected at least one --model NAME=PATH")
        if self.max_docs < 0:
            raise ProbeError(f"max_docs must be >= 0 (0: all documents), got {self.max_docs}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ProbeError(f"top_k must be a positive number of features, got {self.top_k!r}")
        if not 0.0 <= self.floor_quantile < 1.0:
            raise ProbeError(f"floor quantile must be in [0, 1), got {self.floor_quantile!r} (0.9 = top decile)")
        for name in ("seq_len", "forward_batch_size"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.table_format not in TABLE_FORMATS:
            raise ProbeError(f"table_format {self.table_format!r}: expected csv or parquet")

    @property
    def path(self) -> Path | None:
        """The crosscoder or SAE directory (whichever was given; None: neither)."""
        return self.crosscoder if self.crosscoder is not None else self.sae  # type: ignore[return-value]
