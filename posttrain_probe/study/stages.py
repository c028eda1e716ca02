"""The stages of a study, planned from a study file: which step runs with which config, on what, into where.

:class:`Study` reads a study file (YAML, docs/study.md) and lists its :class:`Stage` objects in run order. A
stage is one call of a public step function with that step's config (``STEPS``), or one training arm launched as
a user launches it (:mod:`posttrain_probe.study.launch`), or the world or the report. The study wires every
stage's inputs and outputs (the models, stores, crosscoders, logs) inside its directory; a section of the file
gives the rest of that step's fields, and setting a wired field to another value is an error. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain_probe.config_io import check_keys, config_from_mapping, read_yaml_mapping
from posttrain_probe.errors import ProbeError
from posttrain_probe.steps import STEPS
from posttrain_probe.study.settings import (
    DATA_RECIPE_KEYS,
    ArmConfig,
    BlockedConfig,
    MonitorConfig,
    PreserveConfig,
    ReportConfig,
    StudySettings,
    check_name,
)
from posttrain_probe.study.stage import Stage

STEP_SECTIONS = {
    "data": "data_prepare",
    "eval": "lm_eval",
    "collect": "collect",
    "crosscoder": "crosscoder_train",
    "analyze": "analyze",
    "dynamics": "dynamics",
    "critical": "critical",
    "generalization": "features_generalization",
    "intervene": "intervene",
    "fisher": "features_fisher",
    "steer": "intervene",
    "leakage": "leakage",
}
"""Study-file section -> the step (``STEPS`` key) whose config its keys are."""
OTHER_SECTIONS = ("study", "world", "arms", "blocked", "preserve", "monitor", "report")
SECTIONS = (*OTHER_SECTIONS[:3], *STEP_SECTIONS, *OTHER_SECTIONS[3:])
"""Every section a study file may have, in plan order."""
NOT_HASHED = ("out", "launcher", "accelerate_config", "num_processes", "device")
"""``study:`` keys that do not change any stage's result (where and how it runs)."""
WIRED_RECIPE_KEYS = ("model_name_or_path", "dataset_name", "dataset_config", "output_dir", "probe_layers")
"""Recipe options the study sets for every arm (the base model, the data, the arm's directory, the site)."""
DATA_PATH_KEYS = (("data", "problems"), ("collect", "dataset"), ("fisher", "dataset"), ("leakage", "dataset"))
"""Section keys naming data: a relative path that exists beside the study file is taken from there."""


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class Study:
    """A study file read and checked: its sections, its directory and its stages.

    ``Study.load("study.yaml", out="runs/study")`` (``out`` default: the ``study.out`` key, else
    ``studies/<name>``); :meth:`stages` lists the plan; :meth:`stage_hash` is what decides a re-run.
    """

    def __init__(self, data: Mapping[str, Any], *, out: str | Path | None = None, source: str = "study file") -> None:
        # a section set to false is left out (a file that extends another drops one of its sections that way)
        data = {str(k).replace("-", "_"): v for k, v in data.items() if v is not False}
        unknown = [k for k in data if k not in SECTIONS]
        if unknown:
            raise ProbeError(f"unknown section {unknown[0]!r} in {source}: expected some of {', '.join(SECTIONS)}")
        if "study" not in data:
            raise ProbeError(f"{source} has no study: section (name, layer, ...)")
        self.source = source
        self.raw = {k: (v if v is not None else {}) for k, v in data.items()}
        for key, value in self.raw.items():
            if not isinstance(value, Mapping):
                raise ProbeError(f"section {key} of {source}: expected a mapping, got {type(value).__name__}")
        study = dict(self.raw["study"])
        out = out if out is not None else study.pop("out", None)
        study.pop("out", None)
        self.settings: StudySettings = config_from_mapping(StudySettings, study, source=f"{source} section study")
        self.root = Path(out if out is not None else Path("studies") / self.settings.name).resolve()
        self.settings.accelerate_config = self.resolve(self.settings.accelerate_config)
        self.world = None
        if "world" in self.raw:
            from posttrain_probe.study.world_config import WorldConfig

            world = {**self.raw["world"], "out": str(self.root / "world")}
            if "out" in self.raw["world"]:
                raise ProbeError(f"section world of {source} sets out: the world lives in <study>/world")
            self.world = config_from_mapping(WorldConfig, world, source=f"{source} section world")
        elif self.settings.base_model is None or (self.settings.dataset is None and "data" not in self.raw):
            raise ProbeError(
                f"{source}: without a world: section, study.base_model and study.dataset (or a data: section) are "
                "required (the base model and the training data)"
            )
        if "data" in self.raw and self.settings.dataset is not None:
            raise ProbeError(
                f"{source} has a data: section and study.dataset={self.settings.dataset!r}: the data stage writes the "
                "arms' training data; remove study.dataset (the problems go in data.problems)"
            )
        self.arms: dict[str, ArmConfig] = {}
        for name, arm in self.raw.get("arms", {}).items():
            if not isinstance(arm, Mapping):
                raise ProbeError(f"arm {name!r} in {source}: expected a mapping (recipe, args, ...)")
            self.arms[str(name)] = config_from_mapping(ArmConfig, arm, source=f"{source} arm {name}")
        self.arm_args = {name: self.recipe_args(arm.config, arm.args) for name, arm in self.arms.items()}
        for name in self.arms:
            check_name(name, f"arm name in {source}")
            if name == "base":
                raise ProbeError(f"arm name 'base' in {source}: expected another name (base is the base model)")
        self.blocked = (
            config_from_mapping(BlockedConfig, self.raw["blocked"], source=f"{source} section blocked")
            if "blocked" in self.raw
            else None
        )
        self.preserve = (
            config_from_mapping(PreserveConfig, self.raw["preserve"], source=f"{source} section preserve")
            if "preserve" in self.raw
            else None
        )
        self.monitor = (
            config_from_mapping(MonitorConfig, self.raw["monitor"], source=f"{source} section monitor")
            if "monitor" in self.raw
            else None
        )
        if self.monitor is not None and self.monitor.crosscoder is not None:  # beside the study file, else as given
            self.monitor.crosscoder = str(Path(self.resolve(self.monitor.crosscoder)).resolve())
        self.report = config_from_mapping(ReportConfig, self.raw.get("report", {}), source=f"{source} section report")
        for section, step in STEP_SECTIONS.items():
            if section in self.raw:
                check_keys(STEPS[step].config_class, self.raw[section], source=f"{source} section {section}")
        self._check_roles()
        self._stages: list[Stage] | None = None

    def resolve(self, path: str | None) -> str | None:
        """A path of the study file (an accelerate config, a recipe YAML): relative to the study file's folder when
        it exists there, else as given (relative to the working directory)."""
        if path is None or Path(path).is_absolute() or self.source == "study file":
            return path
        beside = Path(self.source).parent / path
        return str(beside) if beside.exists() else path

    def recipe_args(self, config: str | None, args: Mapping[str, Any]) -> dict[str, Any]:
        """A recipe YAML (:meth:`resolve`) without the keys the study wires, then ``args``."""
        if config is None:
            return dict(args)
        path = Path(self.resolve(config) or config)
        if not path.exists():
            raise ProbeError(
                f"recipe config {config!r} of {self.source} not found (looked beside the study file and in {Path.cwd()})"
            )
        dropped = (*WIRED_RECIPE_KEYS, *(DATA_RECIPE_KEYS if "data" in self.raw else ()))
        data = {k: v for k, v in read_yaml_mapping(path).items() if k not in dropped}
        return {**data, **args}

    @classmethod
    def load(cls, path: str | Path, *, out: str | Path | None = None) -> Study:
        """Read a study file (YAML); ``extends: OTHER.yaml`` (relative to it) takes OTHER's sections and merges
        this file's over them, key by key (a mapping into a mapping; any other value replaces)."""
        return cls(read_study_file(path), out=out, source=str(path))

    # ---- what the study wires ------------------------------------------------------------------------
    def _check_roles(self) -> None:
        s = self.settings
        needs = {
            "generalization": [s.rl_arm],
            "intervene": [s.rl_arm],
            "critical": [s.rl_arm],
            "fisher": [s.sft_arm],
            "steer": [s.sft_arm],
            "blocked": [s.sft_arm],
            "preserve": [s.sft_arm],
            "leakage": [s.sft_arm],
        }
        for role, recipe in (("rl_arm", "grpo"), ("sft_arm", "sft")):
            arm = getattr(s, role)
            if arm in self.arms and self.arms[arm].recipe != recipe:
                raise ProbeError(
                    f"study.{role}={arm!r} names an arm of recipe {self.arms[arm].recipe!r}: expected a {recipe} arm"
                )
        for section, arms in needs.items():
            missing = [a for a in arms if section in self.raw and a not in self.arms]
            if missing:
                raise ProbeError(
                    f"section {section} of {self.source} needs the arm {missing[0]!r} (study.{'rl_arm' if missing[0] == s.rl_arm else 'sft_arm'}); "
                    f"arms are {', '.join(self.arms) or 'none'}"
                )
        for section, dep in (
            ("critical", "eval"),
            ("generalization", "critical"),
            ("intervene", "generalization"),
            ("steer", "fisher"),
            ("fisher", "crosscoder"),
            ("blocked", "analyze"),
            ("preserve", "analyze"),
            ("analyze", "crosscoder"),
            ("dynamics", "crosscoder"),
            ("crosscoder", "collect"),
            ("steer", "critical"),
            ("generalization", "crosscoder"),
            ("leakage", "crosscoder"),
        ):
            if section in self.raw and dep not in self.raw:
                raise ProbeError(f"section {section} of {self.source} needs section {dep} (its inputs come from it)")
        if "leakage" in self.raw and not ("blocked" in self.raw or "preserve" in self.raw):
            raise ProbeError(
                f"section leakage of {self.source} needs section blocked or preserve (it measures their arms)"
            )
        if self.monitor is not None and self.monitor.crosscoder is None and not self.blocked and not self.preserve:
            raise ProbeError(
                f"section monitor of {self.source} watches no arm: give monitor.crosscoder (a crosscoder of the base "
                "model trained beforehand, for every arm) or a blocked: or preserve: section (their arms train after "
                "the study's base-vs-SFT crosscoder exists)"
            )

    @property
    def base_model(self) -> str:
        """The base model every arm starts from (path or HF name)."""
        return self.settings.base_model or str(self.root / "world" / "base")

    @property
    def dataset(self) -> str:
        """The training data of every arm (with a data stage: of the SFT arms; see :meth:`arm_dataset`)."""
        return self.arm_dataset("sft")

    def arm_dataset(self, recipe: str) -> str:
        """The training data of an arm of ``recipe``: the data stage's ``rl.jsonl`` (GRPO) or ``sft.jsonl`` (the SFT
        recipes) when the study has one, else ``study.dataset`` or the world's train.jsonl."""
        if "data" in self.raw:
            return str(self.root / "data" / ("rl.jsonl" if recipe == "grpo" else "sft.jsonl"))
        return self.settings.dataset or str(self.root / "world" / "train.jsonl")

    def tasks(self) -> dict[str, list[str]]:
        """``in_domain``, ``general``, ``held_out`` lm-eval task names."""
        s = self.settings
        world = {}
        if self.world is not None:
            from posttrain_probe.study.world_config import world_tasks

            world = world_tasks()
        return {
            "in_domain": s.in_domain_tasks or world.get("in_domain", []),
            "general": s.general_tasks or world.get("general", []),
            "held_out": s.held_out_tasks or world.get("held_out", []),
        }

    def include_path(self) -> list[str]:
        """lm-eval task folders: the study's and the world's."""
        world = [str(self.root / "world" / "tasks")] if self.world is not None else []
        return [*self.settings.include_path, *world]

    def arm_dir(self, arm: str) -> Path:
        """Where arm ``arm`` trains (its output_dir)."""
        return self.root / "train" / arm

    def arm_model(self, arm: str) -> str:
        """The trained model of an arm: the recipe's saved output_dir (TRL) or its last snapshot (verl)."""
        if arm in self.arms and self.arms[arm].trainer == "verl":
            snaps = self.snapshots(arm)
            return snaps[-1][1] if snaps else str(self.arm_dir(arm) / "probe" / "snapshots" / "step-<last>")
        return str(self.arm_dir(arm))

    def snapshots(self, arm: str) -> list[tuple[str, str]]:
        """(name, path) of an arm's probe snapshots, in step order (empty before it trained)."""
        folder = self.arm_dir(arm) / "probe" / "snapshots"
        found = sorted(folder.glob("step-*")) if folder.is_dir() else []
        return [(f"{arm}-step-{int(p.name.split('-')[1])}", str(p)) for p in found]

    def models(self) -> dict[str, str]:
        """Every model the study evaluates: base, the arms, the blocked arms, the preserving arm."""
        models = {"base": self.base_model}
        models.update({arm: self.arm_model(arm) for arm in self.arms})
        models.update({arm: str(self.arm_dir(arm)) for arm in (*self.blocked_arms(), *self.preserve_arms())})
        return models

    def blocked_arms(self) -> dict[str, str]:
        """Blocked arm name -> protected category."""
        if self.blocked is None:
            return {}
        return {f"blocked-{c}": c for c in self.blocked.categories}

    def preserve_arms(self) -> dict[str, str]:
        """Preserving arm name -> preserved category (``preserve-<category>``; none without a preserve: section)."""
        if self.preserve is None:
            return {}
        return {f"preserve-{self.preserve.features}": self.preserve.features}

    def monitor_args(self, arm: str) -> dict[str, Any]:
        """The feature monitor's recipe options of a training arm (``monitor_crosscoder``, ``monitor_every``), or {}
        when the study monitors no arm or not this one: ``monitor.crosscoder`` watches every arm; without it, the
        base-vs-SFT crosscoder watches the blocked and preserving arms (the others train before it exists)."""
        if self.monitor is None:
            return {}
        crosscoder = self.monitor.crosscoder
        if crosscoder is None:
            if arm not in (*self.blocked_arms(), *self.preserve_arms()):
                return {}
            crosscoder = str(self.crosscoder_dir(f"base-{self.settings.sft_arm}"))
        return {"monitor_crosscoder": crosscoder, "monitor_every": self.monitor.every}

    def dynamics_arms(self) -> list[str]:
        """The arms whose checkpoints get a crosscoder and a dynamics stage (the SFT and RL arms)."""
        if "dynamics" not in self.raw:
            return []
        return [a for a in dict.fromkeys((self.settings.sft_arm, self.settings.rl_arm)) if a in self.arms]

    def snapshot_models(self, arm: str) -> dict[str, str]:
        """Name -> path of an arm's snapshots; before it trained, one ``<arm>-step-*`` placeholder (for the plan)."""
        found = dict(self.snapshots(arm))
        return found or {f"{arm}-step-*": str(self.arm_dir(arm) / "probe" / "snapshots" / "step-*")}

    def collect_groups(self) -> dict[str, dict[str, str]]:
        """Collect stage -> its models (name -> path): ``base``, and per arm the arm (+ its snapshots for dynamics).
        Every group reads the same tokens, so stores of different groups pair up."""
        groups = {"base": {"base": self.base_model}}
        for arm in self.arms:
            groups[arm] = {arm: self.arm_model(arm)}
            if arm in self.dynamics_arms():
                groups[arm].update(self.snapshot_models(arm))
        return groups

    def group_of(self, model: str) -> str:
        """The collect group of a model name (``sft-step-40`` -> ``sft``)."""
        for group, models in self.collect_groups().items():
            if model in models:
                return group
        raise KeyError(model)

    def store(self, model: str) -> Path:
        """Activation store of ``model`` at the study's layer: ``acts/<group>/<model>/layer<L>``."""
        return self.root / "acts" / self.group_of(model) / model / f"layer{self.settings.layer}"

    def crosscoders(self) -> dict[str, list[str]]:
        """Crosscoder name -> its models (collect names), in slot order."""
        s = self.settings
        found: dict[str, list[str]] = {f"base-{arm}": ["base", arm] for arm in self.arms}
        if s.sft_arm in self.arms and s.rl_arm in self.arms:
            found[f"base-{s.sft_arm}-{s.rl_arm}"] = ["base", s.sft_arm, s.rl_arm]
        for arm in self.dynamics_arms():
            found[f"steps-{arm}"] = ["base", *self.snapshot_models(arm)]
        return found

    def crosscoder_dir(self, name: str) -> Path:
        """Directory of crosscoder ``name`` (``base-sft``, ``steps-rl``, ...)."""
        return self.root / "crosscoders" / name

    # ---- configs ------------------------------------------------------------------------------------------
    def check_wired(self, what: str, given: Mapping[str, Any], wired: Mapping[str, Any], prefix: str = "") -> None:
        """ProbeError if ``given`` (a section, an arm's options) sets a key the study wires to another value."""
        for key, value in wired.items():
            if key not in given:
                continue
            if isinstance(value, Mapping) and isinstance(given[key], Mapping):
                self.check_wired(what, given[key], value, prefix=f"{prefix}{key}.")
            elif not _agree(given[key], value):
                raise ProbeError(
                    f"{what} sets {prefix}{key}={given[key]!r}, but the study wires {value!r} "
                    "(study.layer and the study's models and paths decide it): remove the key"
                )

    def step_config(
        self,
        section: str,
        wired: Mapping[str, Any],
        defaults: Mapping[str, Any] | None = None,
        joined: Mapping[str, Any] | None = None,
    ) -> Any:
        """The config of ``section``'s step: the study's ``defaults``, then the section's keys, then ``wired``
        (a section key that disagrees with a wired value is an error naming both); a ``joined`` value is put
        before the section's own (strings joined by ``,``, e.g. ``model_args``; lists concatenated)."""
        step = STEPS[STEP_SECTIONS[section]]
        given = {str(k).replace("-", "_"): v for k, v in self.raw.get(section, {}).items()}
        for key, value in (joined or {}).items():
            own = given.get(key)
            if isinstance(value, str):
                given[key] = value + (f",{own}" if own else "")
            else:
                given[key] = [*value, *([own] if isinstance(own, str) else (own or []))]
        for key in (k for sec, k in DATA_PATH_KEYS if sec == section and isinstance(given.get(k), str)):
            given[key] = self.resolve(given[key])  # a data file beside the study file (a mixture YAML, a JSONL)
        self.check_wired(f"section {section} of {self.source}", given, wired)
        for key, value in wired.items():
            if isinstance(value, Mapping) and isinstance(given.get(key), Mapping):
                given[key] = {**given[key], **value}
            else:
                given[key] = value
        merged = {**(defaults or {}), **given}
        return step.config_from(merged)

    def stage_hash(self, stage: Stage, dep_hashes: Mapping[str, str]) -> str:
        """What a stage's result depends on: its sections of the file (and resolved ``inputs``), the ``study:`` keys
        it reads (as written) and its dependencies' hashes, by name."""
        study = self.raw["study"]
        keys = stage.settings if stage.settings is not None else [k for k in study if k not in NOT_HASHED]
        return _digest(
            {
                "stage": stage.name,
                "kind": stage.kind,
                "settings": {k: study.get(k) for k in keys},
                "sections": {section: self._section(section) for section in stage.sections},
                "data_files": self.data_file_digests(stage.sections),
                "inputs": stage.inputs,
                "deps": {d: dep_hashes[d] for d in stage.deps},
            }
        )

    def data_file_digests(self, sections: Sequence[str]) -> dict[str, str]:
        """sha256 of each local data file (a mixture YAML, a JSONL) that ``sections`` name by a relative or absolute
        path, by ``section.key``: an edited file re-runs the stages that read it, while the path as written keeps
        the hash the same from any working directory."""
        digests = {}
        for section, key in DATA_PATH_KEYS:
            value = self.raw.get(section, {}).get(key) if section in sections else None
            path = Path(self.resolve(value)) if isinstance(value, str) else None
            if path is not None and path.is_file():
                digests[f"{section}.{key}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests

    def _section(self, name: str) -> Any:
        """A section of the study file; ``arms.sft`` is one arm of ``arms``."""
        head, _, tail = name.partition(".")
        value = self.raw.get(head)
        return value.get(tail) if tail and isinstance(value, Mapping) else value

    def stages(self) -> list[Stage]:
        """Every stage of the study, in run order (dependencies first)."""
        if self._stages is None:
            from posttrain_probe.study.plan import plan_stages

            self._stages = plan_stages(self)
            names = [s.name for s in self._stages]
            for stage in self._stages:
                unknown = [d for d in stage.deps if d not in names[: names.index(stage.name)]]
                if unknown:  # a planning bug, not a user error
                    raise AssertionError(f"stage {stage.name} depends on {unknown}, not planned before it")
        return self._stages

    def identity(self) -> dict[str, Any]:
        """What makes two study files the same study (study.json): its name, base model and layer."""
        return {"name": self.settings.name, "base_model": self.settings.base_model, "layer": self.settings.layer}


def read_study_file(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A study file's mapping with its ``extends:`` chain resolved (see :meth:`Study.load`)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
    if str(base_path.resolve()) in _seen or base_path.resolve() == path.resolve():
        raise ProbeError(f"{path} extends {parent}, which extends it back: expected a chain without a loop")
    if not base_path.exists():
        raise ProbeError(f"{path} extends {parent!r}, which is not a file (looked at {base_path})")
    base = _paths_beside(read_study_file(base_path, (*_seen, str(path.resolve()))), base_path.parent)
    return _merge(base, data)


def _paths_beside(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An extended file's relative file paths (recipe YAMLs, accelerate configs) made absolute where they exist
    beside it, so they keep meaning the same files from the extending file."""

    def fix(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
            beside = folder / section[key]
            if beside.exists():
                section[key] = str(beside.resolve())

    fix(data.get("study"), "accelerate_config")
    for section in [*(data.get("arms") or {}).values(), data.get("blocked"), data.get("preserve")]:
        fix(section, "config")
        fix(section, "accelerate_config")
    fix(data.get("monitor"), "crosscoder")
    return data


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _agree(given: Any, wired: Any) -> bool:
    if isinstance(wired, (list, tuple)):
        given = given if isinstance(given, (list, tuple)) else [given]
        return [str(v) for v in given] == [str(v) for v in wired]
    return str(given) == str(wired)
