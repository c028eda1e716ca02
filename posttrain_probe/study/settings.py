"""The sections of a study file that are not a post-hoc step: ``study:`` (:class:`StudySettings`), the
training ``arms:`` (:class:`ArmConfig`), the gradient-blocked arms ``blocked:`` (:class:`BlockedConfig`), the
feature-preserving arm ``preserve:`` (:class:`PreserveConfig`), the feature monitor ``monitor:``
(:class:`MonitorConfig`) and ``report:`` (:class:`ReportConfig`). Torch-free: ``study --dry-run`` plans without
importing torch.

A study file (docs/study.md) is YAML with one section per stage kind; the keys of a step's section are the
field names of that step's config dataclass (``collect:`` -> ``CollectConfig``, ``crosscoder:`` ->
``CrosscoderTrainConfig`` ...), minus the fields the study wires itself (models, inputs, outputs, layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain_probe.errors import ProbeError

RECIPES = ("sft", "grpo", "sft_kl")
"""Recipes of the training arms (``posttrain_probe.recipes.<name>``; ``sft_blocked`` is the blocked arms',
``sft_preserve`` the preserving arm's)."""
CATEGORIES = ("shared", "base-only", "finetune-only")
"""NormRatio categories (``posttrain_probe.analysis.feature_sets.CATEGORY_NAMES``, here without importing torch)."""
LAUNCHERS = ("accelerate", "torchrun", "python", "inprocess")
"""How a training arm is launched: ``accelerate launch``, ``torchrun``, plain ``python -m``, or inside the study's
own process (one CPU process; no import cost per arm: the CPU demo)."""
TRAINERS = ("trl", "verl")
"""Who trains an arm: TRL (the recipes) or verl (``python -m verl.trainer.main_ppo ... +probe=on``)."""


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a name of letters, digits, '-' and '_' (a directory name), else a one-line ProbeError."""
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "_-" for c in value):
        raise ProbeError(f"{what} {value!r}: expected a name of letters, digits, '-' and '_'")
    return value


DATA_COLUMNS = {"question_column": "question", "answer_column": "answer", "final_answer_column": "final_answer"}
"""Recipe column options the study sets when a data stage writes the arms' data (its sft.jsonl / rl.jsonl columns)."""
DATA_RECIPE_KEYS = (*DATA_COLUMNS, "correct_column", "dataset_train_split")
"""Recipe options that describe the source dataset: dropped from recipe YAMLs when the data stage replaces it."""


@dataclass(kw_only=True)
class StudySettings:
    """The ``study:`` section: what every stage shares (the base model, the site, where things run)."""

    name: str = field(metadata={"help": "Name of the study (recorded in study.json; a directory holds one study)."})
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Base model (HF name or path) every arm starts from; default: the world's pretrained base (world: section)."
        },
    )
    layer: int = field(metadata={"help": "Site L (residual stream entering block L) of every crosscoder and capture."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training data of every arm (a `datasets` name, a local file or synthetic:...); default: the world's train.jsonl."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of `dataset` (hub datasets)."})
    in_domain_tasks: list[str] = field(
        default_factory=list, metadata={"help": "lm-eval in-domain tasks (default: the world's)."}
    )
    general_tasks: list[str] = field(
        default_factory=list, metadata={"help": "lm-eval general tasks (default: the world's)."}
    )
    held_out_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lm-eval tasks held out of feature selection, used to test the interventions (default: the world's)."
        },
    )
    include_path: list[str] = field(
        default_factory=list, metadata={"help": "lm-eval task folders besides the shipped ones (and the world's)."}
    )
    sft_arm: str = field(default="sft", metadata={"help": "The arm whose crosscoder gives NormRatio categories."})
    rl_arm: str = field(default="rl", metadata={"help": "The RL arm (generalization features, interventions)."})
    launcher: str = field(
        default="accelerate", metadata={"help": "How training arms are launched: " + ", ".join(LAUNCHERS) + "."}
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "accelerate config file of the training arms (e.g. recipes/accelerate/zero3.yaml); default: one CPU process."
        },
    )
    num_processes: int = field(
        default=1,
        metadata={"help": "Processes per training arm (torchrun --nproc_per_node; accelerate without config)."},
    )
    device: str = field(default="cpu", metadata={"help": "Device of the post-hoc steps (cpu, cuda, cuda:0)."})
    crosscoder_source: str = field(
        default="stores",
        metadata={
            "help": "stores: crosscoders train on the collect stage's activation stores; live: on paired forwards of the "
            "models over the collect section's dataset (no disk; the stores then only serve analysis and feature cards)."
        },
    )

    def __post_init__(self) -> None:
        check_name(self.name, "study.name")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ProbeError(f"study.layer={self.layer!r}: expected a layer index >= 0")
        if self.crosscoder_source not in ("stores", "live"):
            raise ProbeError(f"study.crosscoder_source={self.crosscoder_source!r}: expected stores or live")
        if self.launcher not in LAUNCHERS:
            raise ProbeError(f"study.launcher={self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise ProbeError(f"study.num_processes={self.num_processes!r}: expected an integer >= 1")
        for name in ("in_domain_tasks", "general_tasks", "held_out_tasks", "include_path"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, str) else [str(v) for v in value])


@dataclass(kw_only=True)
class ArmConfig:
    """One training arm (a value under ``arms:``): a recipe and its options, keys as the recipe's flags."""

    recipe: str = field(metadata={"help": "Recipe: " + ", ".join(RECIPES) + " (posttrain_probe.recipes.<recipe>)."})
    trainer: str = field(
        default="trl",
        metadata={"help": "trl (the recipe) or verl (GRPO through verl's main_ppo with +probe=on; recipe grpo only)."},
    )
    label: str | None = field(default=None, metadata={"help": "Name in the report's tables (default: the arm's key)."})
    config: str | None = field(
        default=None,
        metadata={
            "help": "The recipe's own YAML (e.g. sft.yaml; relative to the study file); keys the study wires (model, data, output_dir, probe_layers) are replaced."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate / DeepSpeed config of this arm (relative to the study file; default: study's)."},
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Recipe options (the recipe's --flags without dashes, as in its YAML), or verl overrides (key=value) for trainer verl."
        },
    )

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ProbeError(f"arm recipe {self.recipe!r}: expected one of {', '.join(RECIPES)}")
        if self.trainer not in TRAINERS:
            raise ProbeError(f"arm trainer {self.trainer!r}: expected one of {', '.join(TRAINERS)}")
        if self.trainer == "verl" and self.recipe != "grpo":
            raise ProbeError(f"arm trainer verl runs GRPO only, got recipe {self.recipe!r}")
        if not isinstance(self.args, dict):
            raise ProbeError(f"arm args: expected a mapping of option: value, got {type(self.args).__name__}")


@dataclass(kw_only=True)
class BlockedConfig:
    """The ``blocked:`` section: SFT with gradient blocking (paper S), one arm per NormRatio category of the
    base-vs-SFT crosscoder, each followed by its evaluation and its leakage."""

    categories: list[str] = field(
        default_factory=lambda: ["shared", "base-only", "finetune-only"],
        metadata={"help": "Protected NormRatio categories, one blocked arm each."},
    )
    mode: str = field(
        default="sae", metadata={"help": "Blocking mode: sae, subspace or ablate (docs/methods.md sec. 9)."}
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "Recipe YAML of recipes/sft_blocked.py (relative to the study file; default: the SFT arm's)."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate / DeepSpeed config of the blocked arms (default: the SFT arm's, else study's)."},
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Options of recipes/sft_blocked.py (default: the SFT arm's options)."},
    )

    def __post_init__(self) -> None:
        self.categories = [self.categories] if isinstance(self.categories, str) else list(self.categories)
        bad = [c for c in self.categories if c not in CATEGORIES]
        if bad or not self.categories:
            raise ProbeError(f"blocked.categories {self.categories}: expected some of {', '.join(CATEGORIES)}")
        if not isinstance(self.args, dict):
            raise ProbeError(f"blocked.args: expected a mapping of option: value, got {type(self.args).__name__}")


@dataclass(kw_only=True)
class PreserveConfig:
    """The ``preserve:`` section: SFT with feature preservation (docs/preserve.md), one arm that keeps the features
    of a NormRatio category of the base-vs-SFT crosscoder near the base's, followed by its evaluation and leakage."""

    features: str = field(
        default="base-only",
        metadata={"help": "Preserved NormRatio category S (" + ", ".join(CATEGORIES) + "); the arm is preserve-<S>."},
    )
    coefficient: float = field(
        default=1.0,
        metadata={"help": "lambda: weight of the mean per-token ||f_S(a_theta) - f_S(a_base)||^2 in the loss (>= 0)."},
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "Recipe YAML of recipes/sft_preserve.py (relative to the study file; default: the SFT arm's)."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "accelerate / DeepSpeed config of the preserving arm (default: the SFT arm's, else study's)."
        },
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Options of recipes/sft_preserve.py (default: the SFT arm's options)."},
    )

    def __post_init__(self) -> None:
        if self.features not in CATEGORIES:
            raise ProbeError(f"preserve.features={self.features!r}: expected one of {', '.join(CATEGORIES)}")
        value = self.coefficient
        try:  # YAML reads 1e-3 (no dot) as a string
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not 0 <= number < float("inf"):
            raise ProbeError(f"preserve.coefficient={value!r}: expected a finite number >= 0")
        self.coefficient = number
        if not isinstance(self.args, dict):
            raise ProbeError(f"preserve.args: expected a mapping of option: value, got {type(self.args).__name__}")


@dataclass(kw_only=True)
class MonitorConfig:
    """The ``monitor:`` section: the feature monitor (docs/monitor.md) in the training arms, written to each arm's
    ``probe/monitor.jsonl`` and drawn in the report. Without ``crosscoder`` it watches the arms that train after the
    study's base-vs-SFT crosscoder exists (the blocked and preserving arms) with that crosscoder."""

    every: int = field(default=50, metadata={"help": "Compute the monitor's figures every N optimizer steps."})
    crosscoder: str | None = field(
        default=None,
        metadata={
            "help": "A crosscoder or SAE of the base model at study.layer, trained beforehand (relative to the study "
            "file): then every arm is monitored with it; default: the blocked and preserving arms, with base-<sft_arm>."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ProbeError(f"monitor.every={self.every!r}: expected an integer >= 1 (optimizer steps)")


@dataclass(kw_only=True)
class ReportConfig:
    """The ``report:`` section: what the report shows."""

    n_cards: int = field(
        default=6, metadata={"help": "Feature cards per group (generalization features, each category)."}
    )
    n_contexts: int = field(default=4, metadata={"help": "Top-activating probe-set contexts per card."})
    window: int = field(default=8, metadata={"help": "Tokens shown each side of a context's peak token."})

    def __post_init__(self) -> None:
        for name in ("n_cards", "n_contexts", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProbeError(f"report.{name}={value!r}: expected an integer >= 1")
