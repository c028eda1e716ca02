"""Settings of ``intervene`` (:class:`InterveneConfig`) and of the study's lm-eval runs (:class:`LmEvalConfig`);
torch-free, so the CLI builds its options at startup."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.analysis.critical import split_names
from posttrain_probe.errors import ProbeError

ROLES = ("rl", "base")
"""Roles of the evaluated model on G_t: ``rl`` (acc_before = 100%) or ``base`` (acc_before = 0%)."""


def parse_model_args(text: str | Mapping[str, Any] | None, flag: str = "--model-args") -> dict[str, Any]:
    """``"dtype=bfloat16,add_bos_token=True"`` (or a mapping) -> dict, parsed as lm-eval parses ``--model_args`` (typed values)."""
    if not text:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    check_model_args_text(text, flag)
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def check_model_args_text(text: str, flag: str = "--model-args") -> None:
    """ProbeError unless ``text`` is ``key=value[,key=value...]``."""
    bad = [part for part in text.split(",") if "=" not in part or not part.partition("=")[0].strip()]
    if bad:
        raise ProbeError(
            f"{flag} {text!r}: {bad[0]!r} is not key=value; expected e.g. dtype=bfloat16,add_bos_token=True"
        )


def _check_count(name: str, value: Any, least: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ProbeError(f"{name}={value!r}: expected {meaning}")


@dataclass(kw_only=True)
class InterveneConfig:
    """Settings of ``intervene`` (docs/methods.md sec. 7 and 11; paper R tables 2-5): intervene on a feature set in
    one model, evaluate it with lm-eval on the generalization-critical samples G_t of every task, beside
    frequency-matched random control sets.

    Python: ``intervene(InterveneConfig(features="runs/genfeat/generalization_features.json", model=["rl=runs/rl"],
    mode="zero", critical="runs/critical/critical.json", out="runs/intervene"))``;
    CLI: ``posttrain-probe intervene --features ... --model rl=runs/rl --mode zero --critical ... --out ...``;
    YAML: the same keys.
    """

    features: str = field(
        metadata={"help": "Feature set: a feature-set JSON (e.g. generalization_features.json) or indices 3,17,42."}
    )
    model: list[str] = field(
        metadata={
            "help": "NAME=PATH: the evaluated model; NAME is its crosscoder branch (the intervention's model_name)."
        }
    )
    mode: str = field(
        metadata={
            "help": "zero | set | scale | add | steer (paper R: zero in the RL model, set 3.0 in the base model)."
        }
    )
    critical: Path = field(metadata={"help": "critical.json from `posttrain-probe critical` (G_t per task)."})
    out: Path = field(
        metadata={"help": "Output directory: effects.json, effects.csv, effects.md, lm-eval logs under lm_eval/."}
    )
    crosscoder: Path | None = field(
        default=None,
        metadata={
            "help": "Crosscoder directory the features belong to (default: the one the feature-set JSON records)."
        },
    )
    value: float | None = field(
        default=None,
        metadata={
            "help": "set: the value (default 3.0); scale: factor; add: delta; steer: multiple of the max activation (default 2.0)."
        },
    )
    positions: str = field(default="all", metadata={"help": "Where to intervene: all, prompt or last_prompt."})
    role: str | None = field(
        default=None,
        metadata={
            "help": "rl (acc_before = 100% on G_t) or base (0%); default: from the feature set's provenance (its base/rl branch names)."
        },
    )
    tasks: list[str] = field(
        default_factory=list, metadata={"help": "Tasks (repeat or comma-separate; default: every task of --critical)."}
    )
    held_out_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Tasks not used to select the features (evaluated too, flagged held out)."},
    )
    full_task: bool = field(
        default=False, metadata={"help": "Also evaluate the whole tasks before and after (accuracy in %)."}
    )
    include_path: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-eval task folder(s) besides the shipped ones (as lm-eval's --include_path)."},
    )
    model_args: str | None = field(
        default=None,
        metadata={
            "help": "Extra lm-eval HF model_args for every run, k=v,k=v (use those of the critical runs, e.g. dtype=bfloat16)."
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "Reference corpus (dataset spec): steer's max activations and the controls' firing rates (controls default: the G_t prompts)."
        },
    )
    apply_chat_template: bool = field(
        default=False, metadata={"help": "As lm-eval's --apply_chat_template (if the critical runs used it)."}
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "As lm-eval's --num_fewshot (if the critical runs set it)."}
    )
    batch_size: str = field(default="8", metadata={"help": "lm-eval batch size (an int or auto)."})
    device: str = field(default="cpu", metadata={"help": "lm-eval device (cpu, cuda, cuda:0)."})
    controls: int = field(
        default=5,
        metadata={
            "help": "Frequency-matched random feature sets of the same size, one per seed, each evaluated like the selected set (0: none)."
        },
    )
    control_seed: int = field(
        default=0, metadata={"help": "First control seed (seeds SEED .. SEED+N-1): the same seed draws the same sets."}
    )
    control_bins: int = field(
        default=10,
        metadata={
            "help": "Equal-count firing-rate bins of the live features for the matching (fewer are used, with a note, if a bin runs short)."
        },
    )
    per_feature: bool = field(
        default=False,
        metadata={
            "help": "Also intervene on each feature alone: one row per task and feature (one lm-eval run per feature)."
        },
    )
    allow_incomplete: bool = field(
        default=False, metadata={"help": "Accept the weights of an unfinished crosscoder training run."}
    )
    allow_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Evaluate even when --model is not the model its crosscoder branch was trained on (nor tuned from it); recorded in effects.json."
        },
    )

    def __post_init__(self) -> None:
        for name in ("critical", "out", "crosscoder"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        if isinstance(self.features, (list, tuple)):
            self.features = ",".join(str(f) for f in self.features)
        self.features = str(self.features)
        self.model = [self.model] if isinstance(self.model, str) else list(self.model)
        self.tasks, self.held_out_tasks = split_names(self.tasks), split_names(self.held_out_tasks)
        self.include_path = [
            str(p)
            for p in ([self.include_path] if isinstance(self.include_path, (str, Path)) else self.include_path or [])
        ]
        self.batch_size = str(self.batch_size)
        if self.role is not None and self.role not in ROLES:
            raise ProbeError(
                f"role {self.role!r}: expected 'rl' (the model RL-tuned: acc_before 100% on G_t) or 'base' (acc_before 0%)"
            )
        if self.model_args:
            check_model_args_text(self.model_args)
        _check_count("control_seeds", self.controls, 0, "the number of control sets (int >= 0; 0 disables them)")
        _check_count("control_seed", self.control_seed, 0, "an int >= 0 (the first control seed)")
        _check_count("control_bins", self.control_bins, 1, "a positive int (frequency bins of the controls)")
        if self.num_fewshot is not None:
            _check_count("num_fewshot", self.num_fewshot, 0, "an int >= 0")

    @property
    def control_seeds(self) -> list[int]:
        """The control sets' seeds: ``control_seed`` .. ``control_seed + controls - 1``."""
        return list(range(self.control_seed, self.control_seed + self.controls))
