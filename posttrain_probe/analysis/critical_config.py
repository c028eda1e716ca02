"""Settings of ``posttrain-probe critical`` (:class:`CriticalConfig`).

Torch-free: the CLI builds its options from this dataclass at startup. Field names are the flags
(``--base-samples``) and the YAML keys (``base_samples``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain_probe.errors import ProbeError

OVERLAP_NORMALIZATIONS = ("row", "jaccard", "min")
"""Denominators of :func:`overlap_matrix`: |S_a| (default), |S_a ∪ S_b|, min(|S_a|, |S_b|)."""


def check_threshold(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], or ProbeError."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ProbeError(
            f"threshold {fraction!r} is not a number; expected a fraction of the maximum score in (0, 1], e.g. 0.2"
        ) from None
    if not 0 < value <= 1:
        raise ProbeError(
            f"threshold {fraction!r} is out of range; expected a fraction of the maximum score in (0, 1], e.g. 0.2"
        )
    return value


@dataclass(kw_only=True)
class CriticalConfig:
    """Settings of ``critical`` (docs/methods.md sec. 6): the generalization-critical samples G_t of two lm-eval runs.

    Python: ``critical(CriticalConfig(base_samples="runs/eval/base", rl_samples="runs/eval/rl", out="runs/critical.json"))``;
    CLI: ``posttrain-probe critical --base-samples runs/eval/base --rl-samples runs/eval/rl --out runs/critical.json``;
    YAML: the same keys.
    """

    base_samples: Path = field(
        metadata={
            "help": "lm-eval --output_path (or a subfolder / one samples_<task>_*.jsonl) of the base model's run with --log_samples."
        }
    )
    rl_samples: Path = field(
        metadata={"help": "The same for the RL (tuned) model's run, over the same tasks, documents and prompts."}
    )
    out: Path = field(
        default=Path("critical.json"), metadata={"help": "Output JSON (format posttrain-probe/critical-samples)."}
    )
    metric: str | None = field(
        default=None,
        metadata={"help": "Metric deciding correctness (default: each task's primary metric, e.g. acc, exact_match)."},
    )
    filter_name: str | None = field(
        default=None,
        metadata={
            "help": "lm-eval filter whose records are used (default: each task's first, e.g. none, strict-match)."
        },
    )
    samples_out: Path | None = field(
        default=None,
        metadata={
            "help": "Also write {task: G_t doc ids} (tasks with |G_t| > 0) as JSON, for lm-eval's --samples FILE."
        },
    )

    def __post_init__(self) -> None:
        for name in ("base_samples", "rl_samples", "out", "samples_out"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        for name in ("metric", "filter_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ProbeError(f"{name} {value!r}: expected a non-empty name (or none for each task's default)")
