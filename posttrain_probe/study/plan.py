"""The study's stage graph (docs/study.md): which stages a study file makes, their inputs, outputs and configs.

world -> train-<arm> -> eval-<model> -> collect-<group> -> crosscoder-<name> -> analyze-<name> / dynamics-<arm>
-> critical -> generalization -> intervene-zero-<rl> / intervene-set-base -> fisher -> steer
-> train-blocked-<category> -> eval-blocked-<category> / leakage-blocked-<category>
-> train-preserve-<category> -> eval-preserve-<category> / leakage-preserve-<category> -> report.
A stage exists when its section is in the study file (the report always). Each group below adds its stages;
every config is built when its stage is due (snapshots exist only after training), by :meth:`Study.step_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.study.launch import trl_launch, verl_launch
from posttrain_probe.study.settings import DATA_COLUMNS
from posttrain_probe.study.stage import Stage

TRAIN_SETTINGS = ("base_model", "dataset", "dataset_config", "layer")
"""``study:`` keys a training arm's result depends on."""
EVAL_SETTINGS = ("base_model", "in_domain_tasks", "general_tasks", "held_out_tasks", "include_path")
"""``study:`` keys an lm-eval stage's result depends on."""
BLOCK_KEYS = ("block_crosscoder", "block_features", "block_model", "block_base", "block_finetuned", "block_mode")
"""Recipe options of a blocked arm that the study sets."""
PRESERVE_KEYS = (
    "preserve_crosscoder",
    "preserve_features",
    "preserve_model",
    "preserve_base",
    "preserve_finetuned",
    "preserve_coefficient",
)
"""Recipe options of the preserving arm that the study sets."""
MONITOR_NOTE = ", feature monitor on"
"""Added to the plan line of a training arm the feature monitor watches."""


class _Plan:
    """Builds the stage list of one study, group by group (each method adds its stages in run order)."""

    def __init__(self, study: Any) -> None:  # a posttrain_probe.study.stages.Study
        self.study = study
        self.s = study.settings
        self.raw = study.raw
        self.root = study.root
        self.stages: list[Stage] = []
        self.world_dep = ("world",) if study.world is not None else ()
        self.train_dep = self.world_dep  # + the data stage when there is one
        self.tasks = study.tasks()
        self.critical = self.root / "critical" / "critical.json"

    def add(self, name: str, kind: str, deps, sections, outputs, build, about: str, **extra: Any) -> None:
        self.stages.append(
            Stage(name, kind, tuple(deps), tuple(sections), tuple(Path(o) for o in outputs), build, about, **extra)
        )

    # ---- world and training ---------------------------------------------------------------------------
    def world(self) -> None:
        study = self.study
        if study.world is not None:
            world = study.world
            self.add("world", "world", (), ("world",), [self.root / "world"], lambda: world, "synthetic world + base")

    def data(self) -> None:
        """The data stage: teacher traces kept by math-verify, the same problems for SFT and RL (data prepare)."""
        study = self.study
        if "data" not in self.raw:
            return
        out = self.root / "data"
        self.add(
            "data",
            "data_prepare",
            (),
            ("data",),
            [out],
            lambda: study.step_config("data", {"out": str(out)}, {"device": self.s.device}),
            "teacher traces (math-verify rejection sampling): sft.jsonl + rl.jsonl over the same problems",
        )
        self.train_dep = (*self.world_dep, "data")

    def train_args(
        self, arm: str, args: dict[str, Any], extra: dict[str, Any] | None = None, recipe: str = "sft"
    ) -> dict[str, Any]:
        """An arm's recipe options: its own, then what the study wires (checked), then ``extra``."""
        study = self.study
        wired = {
            "model_name_or_path": study.base_model,
            "dataset_name": study.arm_dataset(recipe),
            "output_dir": str(study.arm_dir(arm)),
            "probe_layers": [self.s.layer],
        }
        if "data" in self.raw:
            wired.update(DATA_COLUMNS)
        elif self.s.dataset_config is not None:
            wired["dataset_config"] = self.s.dataset_config
        study.check_wired(f"arm {arm} of {study.source}", args, {**wired, **(extra or {})})
        return {**args, **wired, **(extra or {})}

    def launch(self, arm: str, recipe: str, args: dict[str, Any], accelerate_config: str | None = None):
        return trl_launch(
            recipe,
            args,
            launcher=self.s.launcher,
            accelerate_config=self.study.resolve(accelerate_config) or self.s.accelerate_config,
            num_processes=self.s.num_processes,
            log=self.study.arm_dir(arm) / "train.log",
        )

    def train(self) -> None:
        study = self.study
        for arm, cfg in study.arms.items():
            args, monitor = study.arm_args[arm], study.monitor_args(arm)
            if cfg.trainer == "verl":

                def build(arm=arm, args=args, monitor=monitor):
                    # verl: probe.monitor.* (the monitor's options without their monitor_ prefix)
                    overrides = {f"probe.monitor.{k.removeprefix('monitor_')}": v for k, v in monitor.items()}
                    study.check_wired(f"arm {arm} of {study.source}", args, overrides)
                    return verl_launch(
                        {**args, **overrides},
                        base_model=study.base_model,
                        out=study.arm_dir(arm),
                        layer=self.s.layer,
                        log=study.arm_dir(arm) / "train.log",
                    )
            else:

                def build(arm=arm, cfg=cfg, args=args, monitor=monitor):
                    return self.launch(
                        arm, cfg.recipe, self.train_args(arm, args, monitor, recipe=cfg.recipe), cfg.accelerate_config
                    )

            inputs = {"recipe": cfg.recipe, "trainer": cfg.trainer, "args": args}
            self.add(
                f"train-{arm}",
                "train",
                self.train_dep,
                (),
                [study.arm_dir(arm)],
                build,
                f"{cfg.recipe} ({cfg.trainer})" + (MONITOR_NOTE if monitor else ""),
                inputs={**inputs, "monitor": monitor} if monitor else inputs,
                settings=TRAIN_SETTINGS,
            )

    # ---- evaluation -----------------------------------------------------------------------------------
    def eval_stage(self, model: str, path_of, deps: tuple[str, ...]) -> None:
        if "eval" not in self.raw:
            return
        study, out = self.study, self.root / "eval" / model
        all_tasks = [*self.tasks["in_domain"], *self.tasks["general"], *self.tasks["held_out"]]

        def build():
            return study.step_config(
                "eval",
                {"tasks": all_tasks, "out": str(out)},
                {"device": self.s.device},
                joined={"model_args": f"pretrained={path_of()}", "include_path": study.include_path()},
            )

        self.add(
            f"eval-{model}",
            "lm_eval",
            (*self.world_dep, *deps),
            ("eval",),
            [out],
            build,
            f"lm-eval of {model}",
            settings=EVAL_SETTINGS,
        )

    def evals(self) -> None:
        study = self.study
        self.eval_stage("base", lambda: study.base_model, ())
        for arm in study.arms:
            self.eval_stage(arm, lambda arm=arm: study.arm_model(arm), (f"train-{arm}",))

    # ---- activations, crosscoders, attribution ---------------------------------------------------------
    def data_defaults(self, section: str) -> dict[str, Any]:
        """The training data as a section's dataset, unless the section names its own (required with a data stage:
        its files hold prompts and traces, not the text a collect, fisher or leakage stage should read)."""
        if "dataset" in self.raw.get(section, {}):
            return {}
        if "data" in self.raw:
            raise ProbeError(
                f"section {section} of {self.study.source} has no dataset: with a data: section, give {section}.dataset "
                "(e.g. the mixture recipes/configs/data/reasoning-general-mix.yaml)"
            )
        defaults = {"dataset": self.study.dataset}
        if self.s.dataset_config is not None:
            defaults["dataset_config"] = self.s.dataset_config
        return defaults

    def collect(self) -> None:
        if "collect" not in self.raw:
            return
        study = self.study
        for group in study.collect_groups():
            out = self.root / "acts" / group

            def build(group=group, out=out):
                models = study.collect_groups()[group]
                return study.step_config(
                    "collect",
                    {"model": [f"{n}={p}" for n, p in models.items()], "out": str(out), "layer": [self.s.layer]},
                    {**self.data_defaults("collect"), "device": self.s.device},
                )

            deps = (*self.world_dep, *((f"train-{group}",) if group != "base" else ()))
            self.add(f"collect-{group}", "collect", deps, ("collect",), [out], build, f"activations of {group}")

    def crosscoders(self) -> None:
        if "crosscoder" not in self.raw:
            return
        study = self.study
        for name, models in study.crosscoders().items():

            def build(name=name):
                names = study.crosscoders()[name]
                wired: dict[str, Any] = {"out": str(study.crosscoder_dir(name)), "crosscoder": {"layer": self.s.layer}}
                if self.s.crosscoder_source == "live":
                    paths = {m: p for group in study.collect_groups().values() for m, p in group.items()}
                    wired["model"] = [f"{n}={paths[n]}" for n in names]
                    collect = self.raw.get("collect", {})
                    defaults = {
                        "dataset": study.resolve(collect.get("dataset") or self.data_defaults("collect")["dataset"]),
                        "seq_len": collect.get("seq_len", 512),
                    }
                    return study.step_config("crosscoder", wired, defaults)
                wired["acts"] = [str(study.store(m)) for m in names]
                return study.step_config("crosscoder", wired)

            groups = dict.fromkeys("base" if m == "base" else study.group_of(m) for m in models)
            about = f"crosscoder of {' / '.join(models)}" if not name.startswith("steps-") else f"crosscoder of {name}"
            self.add(
                f"crosscoder-{name}",
                "crosscoder_train",
                [f"collect-{g}" for g in groups],
                ("crosscoder",),
                [study.crosscoder_dir(name)],
                build,
                about,
            )

    def analysis(self) -> None:
        study = self.study
        if "analyze" in self.raw:
            for name, models in study.crosscoders().items():
                if name.startswith("steps-"):
                    continue
                out = self.root / "analysis" / name
                wired = {
                    "crosscoder": str(study.crosscoder_dir(name)),
                    "out": str(out),
                    "base": "base",
                    "acts": [str(study.store(m)) for m in models],
                }
                self.add(
                    f"analyze-{name}",
                    "analyze",
                    (f"crosscoder-{name}",),
                    ("analyze",),
                    [out],
                    lambda wired=wired: study.step_config("analyze", wired),
                    f"NRN, MAS, NormRatio, categories of {name}",
                )
        for arm in study.dynamics_arms():
            out = self.root / "dynamics" / arm
            wired = {"crosscoder": [str(study.crosscoder_dir(f"steps-{arm}"))], "out": str(out), "base": "base"}
            self.add(
                f"dynamics-{arm}",
                "dynamics",
                (f"crosscoder-steps-{arm}",),
                ("dynamics",),
                [out],
                lambda wired=wired: study.step_config("dynamics", wired),
                f"top-k overlap and rank shifts over {arm}'s checkpoints",
            )

    # ---- paper R: critical samples, generalization features, interventions ------------------------------
    def no_critical(self) -> str | None:
        data = json.loads(self.critical.read_text()) if self.critical.exists() else {}
        counts = {t: e.get("n_critical", 0) for t, e in (data.get("tasks") or {}).items()}
        if counts and not any(counts.values()):
            return (
                f"no generalization-critical samples: |G_t| = 0 on every task ({', '.join(counts)}); "
                f"{self.s.rl_arm} gets no document right that base gets wrong"
            )
        return None

    def empty_set(self, path: Path, what: str):
        def check() -> str | None:
            reason = self.no_critical()
            if reason is None and path.exists() and not json.loads(path.read_text()).get("features"):
                reason = f"{what} is empty ({path.name})"
            return reason

        return check

    def lm_eval_defaults(self) -> dict[str, Any]:
        """The eval runs' lm-eval settings, which interventions must repeat (model_args, chat template, shots)."""
        keys = ("model_args", "apply_chat_template", "num_fewshot", "batch_size")
        return {k: v for k, v in self.raw.get("eval", {}).items() if k in keys}

    def generalization(self) -> None:
        study, rl = self.study, self.s.rl_arm
        if "critical" in self.raw:
            wired = {
                "base_samples": str(self.root / "eval" / "base"),
                "rl_samples": str(self.root / "eval" / rl),
                "out": str(self.critical),
            }
            self.add(
                "critical",
                "critical",
                ("eval-base", f"eval-{rl}"),
                ("critical",),
                [self.critical.parent],
                lambda: study.step_config("critical", wired),
                f"G_t: base wrong, {rl} right",
            )
        genfeat = self.root / "generalization"
        if "generalization" in self.raw:
            self.add(
                "generalization",
                "features_generalization",
                ("critical", f"crosscoder-base-{rl}"),
                ("generalization",),
                [genfeat],
                lambda: study.step_config(
                    "generalization",
                    {
                        "crosscoder": str(study.crosscoder_dir(f"base-{rl}")),
                        "base": "base",
                        "rl": rl,
                        "critical": str(self.critical),
                        "model": [f"base={study.base_model}", f"{rl}={study.arm_model(rl)}"],
                        "out": str(genfeat),
                    },
                    {"tasks": [*self.tasks["in_domain"], *self.tasks["general"]], "device": self.s.device},
                ),
                "Score_k^t at the last prompt token, S_t per task",
                skip_if=self.no_critical,
            )
        if "intervene" not in self.raw:
            return
        features = genfeat / "generalization_features.json"
        for label, model, mode in ((f"zero-{rl}", rl, "zero"), ("set-base", "base", "set")):
            out = self.root / "intervene" / label

            def build(model=model, mode=mode, out=out):
                path = study.base_model if model == "base" else study.arm_model(model)
                return study.step_config(
                    "intervene",
                    {
                        "features": str(features),
                        "model": [f"{model}={path}"],
                        "mode": mode,
                        "critical": str(self.critical),
                        "out": str(out),
                        "crosscoder": str(study.crosscoder_dir(f"base-{rl}")),
                    },
                    {**self.lm_eval_defaults(), "held_out_tasks": self.tasks["held_out"], "device": self.s.device},
                    joined={"include_path": study.include_path()},
                )

            self.add(
                f"intervene-{label}",
                "intervene",
                ("generalization",),
                ("intervene", "eval"),
                [out],
                build,
                f"{mode} the generalization features in {model}, on G_t (held-out tasks marked)",
                skip_if=self.empty_set(features, "S, the features in every task's S_t,"),
            )

    # ---- paper S: Fisher features, steering, gradient blocking, leakage ----------------------------------
    def fisher(self) -> None:
        study, sft = self.study, self.s.sft_arm
        fisher = self.root / "fisher"
        if "fisher" in self.raw:
            self.add(
                "fisher",
                "features_fisher",
                (f"crosscoder-base-{sft}",),
                ("fisher",),
                [fisher],
                lambda: study.step_config(
                    "fisher",
                    {
                        "crosscoder": str(study.crosscoder_dir(f"base-{sft}")),
                        "model": [f"base={study.base_model}", f"{sft}={study.arm_model(sft)}"],
                        "select_model": sft,
                        "out": str(fisher),
                        "layer": self.s.layer,
                    },
                    {**self.data_defaults("fisher"), "device": self.s.device},
                ),
                f"Fisher importance ratio of {sft}'s features on reasoning vs solution tokens",
            )
        if "steer" not in self.raw:
            return
        out = self.root / "intervene" / "steer-base"
        features = fisher / "fisher_features.json"
        self.add(
            "steer",
            "intervene",
            ("fisher", "critical"),
            ("steer", "eval"),
            [out],
            lambda: study.step_config(
                "steer",
                {
                    "features": str(features),
                    "model": [f"base={study.base_model}"],
                    "mode": "steer",
                    "critical": str(self.critical),
                    "out": str(out),
                    "crosscoder": str(study.crosscoder_dir(f"base-{sft}")),
                    "role": "base",
                },
                {
                    **self.lm_eval_defaults(),
                    "held_out_tasks": self.tasks["held_out"],
                    "full_task": True,
                    "device": self.s.device,
                    "reference": study.dataset,
                },
                joined={"include_path": study.include_path()},
            ),
            "steer the Fisher features in the base model",
            skip_if=self.empty_set(features, "the Fisher feature set"),
        )

    def feature_set(self, category: str) -> Path:
        """The live features of a NormRatio category of base-<sft>, as its analysis wrote them."""
        sft = self.s.sft_arm
        return self.root / "analysis" / f"base-{sft}" / "feature_sets" / f"{sft}_{category}.json"

    def empty_category(self, category: str):
        """skip_if of an arm that protects ``category``: the category has no live feature."""
        path, sft = self.feature_set(category), self.s.sft_arm

        def check() -> str | None:
            if path.exists() and not json.loads(path.read_text()).get("features"):
                return f"the {category} category of base-{sft} has no live feature: nothing to protect"
            return None

        return check

    def sft_like_args(self, config: str | None, args: dict[str, Any], wired_keys: tuple[str, ...]) -> dict[str, Any]:
        """Options of an arm derived from the SFT arm (blocked, preserving): its own recipe YAML (without the keys the
        study sets, unless its ``args`` set them) and ``args``; without a YAML, the SFT arm's options under them."""
        study = self.study
        own = study.recipe_args(config, args)
        own = {k: v for k, v in own.items() if k not in wired_keys or k in args}
        return {**study.arm_args[self.s.sft_arm], **own} if config is None else own

    def blocked(self) -> None:
        """SFT with gradient blocking (recipes/sft_blocked.py), one arm per protected category of base-<sft>."""
        blocked = self.study.blocked
        if blocked is not None:
            self.sft_variant_arms(
                blocked, BLOCK_KEYS, self.study.blocked_arms(), "sft_blocked", "block", {"block_mode": blocked.mode},
                lambda category: f"SFT with the {category} features of base-{self.s.sft_arm} protected",
                "protected",
            )  # fmt: skip

    def preserve(self) -> None:
        """SFT with feature preservation (recipes/sft_preserve.py): the features of one category of base-<sft> kept near
        the base's, then its evaluation and leakage, as a blocked arm's."""
        preserve = self.study.preserve
        if preserve is not None:
            self.sft_variant_arms(
                preserve, PRESERVE_KEYS, self.study.preserve_arms(), "sft_preserve", "preserve",
                {"preserve_coefficient": preserve.coefficient},
                lambda category: f"SFT with the {category} features of base-{self.s.sft_arm} preserved (lambda {preserve.coefficient:g})",
                "preserved",
            )  # fmt: skip

    def sft_variant_arms(
        self, spec, wired_keys: tuple[str, ...], arms: dict[str, str], recipe: str, prefix: str,
        options: dict[str, Any], describe, verb: str,
    ) -> None:  # fmt: skip
        """Arms trained like the SFT arm with the features of one category of base-<sft> wired into ``recipe`` (its
        ``<prefix>_*`` options, and ``options``): train-<arm>, its evaluation and leakage-<arm>, per arm -> category."""
        study, sft = self.study, self.s.sft_arm
        base_args = self.sft_like_args(spec.config, spec.args, wired_keys)
        accelerate = spec.accelerate_config or study.arms[sft].accelerate_config
        for arm, category in arms.items():
            wired = {
                f"{prefix}_crosscoder": str(study.crosscoder_dir(f"base-{sft}")),
                f"{prefix}_features": str(self.feature_set(category)),
                f"{prefix}_model": "base",
                f"{prefix}_base": "base",
                f"{prefix}_finetuned": sft,
                **options,
            }
            monitor = study.monitor_args(arm)
            self.add(
                f"train-{arm}",
                "train",
                (f"analyze-base-{sft}", *self.train_dep),
                (),
                [study.arm_dir(arm)],
                lambda arm=arm, wired=wired, monitor=monitor: self.launch(
                    arm, recipe, self.train_args(arm, base_args, {**wired, **monitor}), accelerate
                ),
                describe(category) + (MONITOR_NOTE if monitor else ""),
                skip_if=self.empty_category(category),
                inputs={"args": base_args, prefix: wired, **({"monitor": monitor} if monitor else {})},
                settings=TRAIN_SETTINGS,
            )
            self.eval_stage(arm, lambda arm=arm: str(study.arm_dir(arm)), (f"train-{arm}",))
            self.leakage(arm, category, f"how far the {verb} {category} features still moved")

    def leakage(self, arm: str, category: str, about: str) -> None:
        """leakage-<arm>: how far the protected features moved from the base in ``arm`` (blocked or preserving)."""
        if "leakage" not in self.raw:
            return
        study, sft = self.study, self.s.sft_arm
        out = self.root / "leakage" / arm
        wired = {
            "crosscoder": str(study.crosscoder_dir(f"base-{sft}")),
            "base": study.base_model,
            "blocked": str(study.arm_dir(arm)),
            "features": str(self.feature_set(category)),
            "out": str(out),
            "model_name": "base",
            "finetuned": sft,
            "layer": self.s.layer,
        }
        self.add(
            f"leakage-{arm}",
            "leakage",
            (f"train-{arm}",),
            ("leakage",),
            [out],
            lambda wired=wired: study.step_config(
                "leakage", wired, {**self.data_defaults("leakage"), "device": self.s.device}
            ),
            about,
        )

    def report(self) -> None:
        study = self.study
        deps = [st.name for st in self.stages]
        self.add("report", "report", deps, ("report",), [self.root / "report"], lambda: study.report, "the report")


def plan_stages(study: Any) -> list[Stage]:
    """Every stage of ``study`` (a :class:`~posttrain_probe.study.stages.Study`) in run order."""
    plan = _Plan(study)
    for group in (
        plan.world,
        plan.data,
        plan.train,
        plan.evals,
        plan.collect,
        plan.crosscoders,
        plan.analysis,
        plan.generalization,
        plan.fisher,
        plan.blocked,
        plan.preserve,
        plan.report,
    ):
        group()
    for section in ("blocked", "preserve"):
        if section in study.raw and f"analyze-base-{study.settings.sft_arm}" not in {s.name for s in plan.stages}:
            raise ProbeError(
                f"section {section} of {study.source} needs the crosscoder and analysis of base-{study.settings.sft_arm}"
            )
    return plan.stages
