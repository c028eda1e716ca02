"""Settings of ``data prepare`` (:class:`DataPrepareConfig`); torch-free, so the CLI builds its options at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.dtypes import dtype_name
from posttrain_probe.errors import ProbeError
from posttrain_probe.math_answers import MATH_INSTRUCTION

BACKENDS = ("auto", "vllm", "hf")
"""Generation backends: ``auto`` is vLLM when it is installed and a GPU is visible, else HF ``generate``."""
DEFAULT_INSTRUCTION = MATH_INSTRUCTION
"""Appended to every problem after a blank line: :data:`posttrain_probe.math_answers.MATH_INSTRUCTION`, the
instruction of the eval suites' math tasks and of the recipes' real configs."""


@dataclass(kw_only=True)
class DataPrepareConfig:
    """Settings of ``data prepare`` (docs/data.md): chain-of-thought traces of a teacher model on a math problem
    set, kept when math-verify accepts their final answer against the gold answer (rejection sampling), written
    as an SFT dataset (prompt + trace) and an RL dataset (prompt + gold answer) over the same problems.

    Python: ``data_prepare(DataPrepareConfig(problems="problems.jsonl", teacher="deepseek-ai/...", out="data"))``;
    CLI: ``posttrain-probe data prepare --problems problems.jsonl --teacher ... --out data``; YAML: the same keys.
    """

    problems: str = field(
        metadata={
            "help": "Math problem set with gold answers: a `datasets` hub name, or a local .jsonl/.json/.parquet/.csv file or folder."
        }
    )
    teacher: str = field(metadata={"help": "Teacher model that writes the traces: a hub name or a local directory."})
    out: Path = field(metadata={"help": "Output directory: sft.jsonl, rl.jsonl, provenance.json."})
    problems_config: str | None = field(default=None, metadata={"help": "Dataset config name (hub datasets)."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    problem_column: str = field(default="problem", metadata={"help": "Column holding the problem statement."})
    answer_column: str = field(
        default="answer",
        metadata={"help": "Column holding the gold final answer (e.g. 42, \\frac{1}{3}, or a \\boxed{} answer)."},
    )
    source_column: str | None = field(
        default=None,
        metadata={
            "help": "Column naming each problem's source (e.g. MATH, DeepScaleR): acceptance is reported per source (default: one source, all)."
        },
    )
    id_column: str | None = field(
        default=None,
        metadata={"help": "Column of unique problem ids, written as problem_id (default: the row index)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N problems."})
    n_tries: int = field(default=4, metadata={"help": "Traces sampled per problem (rejection sampling tries)."})
    traces_per_problem: int = field(
        default=1,
        metadata={"help": "Accepted traces kept per problem (the first ones, in sampling order); at most n_tries."},
    )
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (0: greedy, needs n_tries 1)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: keep the smallest token set of this mass."})
    max_new_tokens: int = field(default=16384, metadata={"help": "Longest trace in tokens (longer ones are cut)."})
    batch_size: int = field(
        default=8,
        metadata={
            "help": "Problems per HF generate call (each with n_tries samples); vLLM gets all problems at once and batches itself."
        },
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={
            "help": "Appended to each problem after a blank line in the teacher's prompt; give the recipes the same `instruction`."
        },
    )
    chat_template: bool = field(
        default=True,
        metadata={
            "help": "Render the prompt as a user turn with the teacher tokenizer's chat template (if it has one)."
        },
    )
    backend: str = field(
        default="auto",
        metadata={"help": "Generation: auto (vllm if installed and a GPU is visible, else hf), vllm or hf."},
    )
    dtype: str = field(default="auto", metadata={"help": "Teacher dtype (auto: bfloat16 on GPU, float32 on CPU)."})
    device: str | None = field(
        default=None, metadata={"help": "Device of the hf backend (default: cuda if available); vLLM places itself."}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "vllm backend: GPUs the teacher is split over (tensor parallel); hf: 1."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (recorded in provenance.json)."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.problems = str(self.problems)
        self.teacher = str(self.teacher)
        if self.backend not in BACKENDS:
            raise ProbeError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.dtype != "auto":
            dtype_name(self.dtype, what="teacher")
        for name in ("n_tries", "traces_per_problem", "max_new_tokens", "batch_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProbeError(f"{name} must be an integer >= 1, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ProbeError(f"limit must be an integer >= 1 (or unset: every problem), got {self.limit!r}")
        if self.traces_per_problem > self.n_tries:
            raise ProbeError(
                f"traces_per_problem {self.traces_per_problem} exceeds n_tries {self.n_tries}: expected at most n_tries"
            )
        if self.temperature < 0:
            raise ProbeError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_tries > 1:
            raise ProbeError(
                f"temperature 0 (greedy) with n_tries {self.n_tries}: every try would be the same trace; expected "
                "temperature > 0 or n_tries 1"
            )
        if not 0 < self.top_p <= 1:
            raise ProbeError(f"top_p must be in (0, 1], got {self.top_p}")
