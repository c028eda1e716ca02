"""The study's stage graph (docs/study.md): which stages a study file makes, their inputs, outputs and configs.

world -> train-<arm> -> eval-<model> -> collect -> crosscoder-<name> -> analyze-<name> / dynamics-<arm>
-> critical -> generalization -> intervene-zero-<rl> / intervene-set-base -> fisher -> steer
-> train-blocked-<category> -> eval-blocked-<category> -> leakage-blocked-<category> -> report.
A stage exists when its section is in the study file (``world``, ``eval``, ... ``report`` is always planned).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain_probe.study.launch import trl_launch, verl_launch
from posttrain_probe.study.stages import Stage, Study


def plan_stages(study: Study) -> list[Stage]:
    """Every stage of ``study`` in run order."""
    stages: list[Stage] = []
    root, s, raw = study.root, study.settings, study.raw
    L = s.layer
    tasks = study.tasks()
    all_tasks = [*tasks["in_domain"], *tasks["general"], *tasks["held_out"]]
    world_dep = ("world",) if study.world is not None else ()

    def add(name: str, kind: str, deps, sections, outputs, build, about: str, skip_if=None) -> None:
        outputs = tuple(Path(o) for o in outputs)
        stages.append(Stage(name, kind, tuple(deps), tuple(sections), outputs, build, about, skip_if))

    if study.world is not None:
        add(
            "world", "world", (), ("world",), [root / "world"], lambda: study.world, "synthetic world + pretrained base"
        )

    # ---- training arms -------------------------------------------------------------------------------------
    def train_args(arm: str, recipe_args: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        wired = {
            "model_name_or_path": study.base_model,
            "dataset_name": study.dataset,
            "output_dir": str(study.arm_dir(arm)),
            "probe_layers": [L],
        }
        if s.dataset_config is not None:
            wired["dataset_config"] = s.dataset_config
        from posttrain_probe.study.stages import _agree

        for key, value in wired.items():
            if key in recipe_args and not _agree(recipe_args[key], value):
                from posttrain_probe.errors import ProbeError

                raise ProbeError(
                    f"arm {arm} of {study.source} sets {key}={recipe_args[key]!r}, but the study wires {value!r}: remove the key"
                )
        return {**recipe_args, **wired, **(extra or {})}

    def trl(arm: str, recipe: str, args: dict[str, Any]):
        return trl_launch(
            recipe,
            args,
            launcher=s.launcher,
            accelerate_config=s.accelerate_config,
            num_processes=s.num_processes,
            log=study.arm_dir(arm) / "train.log",
        )

    for arm, cfg in study.arms.items():
        if cfg.trainer == "verl":
            build = lambda arm=arm, cfg=cfg: verl_launch(  # noqa: E731
                study.arm_args[arm],
                base_model=study.base_model,
                out=study.arm_dir(arm),
                layer=L,
                log=root / f"train-{arm}.log",
            )
        else:
            build = lambda arm=arm, cfg=cfg: trl(arm, cfg.recipe, train_args(arm, study.arm_args[arm]))  # noqa: E731
        add(
            f"train-{arm}",
            "train",
            world_dep,
            (f"arms.{arm}",),
            [study.arm_dir(arm)],
            build,
            f"{cfg.recipe} ({cfg.trainer})",
        )

    # ---- evaluation ----------------------------------------------------------------------------------------
    def eval_stage(model: str, path_of, train_dep: tuple[str, ...]) -> None:
        out = root / "eval" / model

        def build():
            return study.step_config(
                "eval",
                {"tasks": all_tasks, "out": str(out)},
                {"device": s.device},
                joined={"model_args": f"pretrained={path_of()}", "include_path": study.include_path()},
            )

        add(f"eval-{model}", "lm_eval", (*world_dep, *train_dep), ("eval",), [out], build, f"lm-eval of {model}")

    if "eval" in raw:
        eval_stage("base", lambda: study.base_model, ())
        for arm in study.arms:
            eval_stage(arm, lambda arm=arm: study.arm_model(arm), (f"train-{arm}",))

    # ---- activations and crosscoders ---------------------------------------------------------------------
    acts = root / "acts"
    if "collect" in raw:

        def collect_config():
            models = {"base": study.base_model, **{arm: study.arm_model(arm) for arm in study.arms}}
            if "dynamics" in raw:
                for arm in study._dynamics_arms():
                    models.update(dict(study._snapshot_names(arm)))
            return study.step_config(
                "collect",
                {"model": [f"{n}={p}" for n, p in models.items()], "out": str(acts), "layer": [L]},
                {"dataset": study.dataset, "device": s.device},
            )

        add(
            "collect",
            "collect",
            [*world_dep, *(f"train-{a}" for a in study.arms)],
            ("collect",),
            [acts],
            collect_config,
            "activations of base, arms (and snapshots) on the same tokens",
        )

    crosscoders = study.crosscoders() if "crosscoder" in raw else {}
    for name, models in crosscoders.items():

        def cc_config(name=name, models=models):
            names = models
            paths = {"base": study.base_model, **{arm: study.arm_model(arm) for arm in study.arms}}
            if name.startswith("steps-"):
                arm = name.removeprefix("steps-")
                snapshots = study._snapshot_names(arm)
                names = ["base", *(n for n, _ in snapshots)]
                paths.update(dict(snapshots))
            wired: dict[str, Any] = {"out": str(root / "crosscoders" / name), "crosscoder": {"layer": L}}
            if s.crosscoder_source == "live":
                collect = raw.get("collect", {})
                wired["model"] = [f"{n}={paths[n]}" for n in names]
                defaults = {"dataset": collect.get("dataset", study.dataset), "seq_len": collect.get("seq_len", 512)}
                return study.step_config("crosscoder", wired, defaults)
            wired["acts"] = [str(acts / m / f"layer{L}") for m in names]
            return study.step_config("crosscoder", wired)

        add(
            f"crosscoder-{name}",
            "crosscoder_train",
            ("collect",),
            ("crosscoder",),
            [root / "crosscoders" / name],
            cc_config,
            f"crosscoder of {' / '.join(models) if not name.startswith('steps-') else 'base + checkpoints of ' + name[6:]}",
        )

    if "analyze" in raw:
        for name, models in crosscoders.items():
            if name.startswith("steps-"):
                continue
            out = root / "analysis" / name
            add(
                f"analyze-{name}",
                "analyze",
                (f"crosscoder-{name}",),
                ("analyze",),
                [out],
                lambda name=name, out=out, models=models: study.step_config(
                    "analyze",
                    {
                        "crosscoder": str(root / "crosscoders" / name),
                        "out": str(out),
                        "base": "base",
                        "acts": [str(acts / m / f"layer{L}") for m in models],
                    },
                ),
                f"NRN, MAS, NormRatio, categories of {name}",
            )
    if "dynamics" in raw:
        for arm in study._dynamics_arms():
            out = root / "dynamics" / arm
            add(
                f"dynamics-{arm}",
                "dynamics",
                (f"crosscoder-steps-{arm}",),
                ("dynamics",),
                [out],
                lambda arm=arm, out=out: study.step_config(
                    "dynamics",
                    {"crosscoder": [str(root / "crosscoders" / f"steps-{arm}")], "out": str(out), "base": "base"},
                ),
                f"top-k overlap and rank shifts over {arm}'s checkpoints",
            )

    # ---- paper R: critical samples, generalization features, interventions --------------------------------
    rl, sft = s.rl_arm, s.sft_arm
    critical = root / "critical" / "critical.json"
    if "critical" in raw:
        add(
            "critical",
            "critical",
            ("eval-base", f"eval-{rl}"),
            ("critical",),
            [critical.parent],
            lambda: study.step_config(
                "critical",
                {
                    "base_samples": str(root / "eval" / "base"),
                    "rl_samples": str(root / "eval" / rl),
                    "out": str(critical),
                },
            ),
            f"G_t: base wrong, {rl} right",
        )

    def no_critical() -> str | None:
        import json

        data = json.loads(critical.read_text()) if critical.exists() else {}
        counts = {t: e.get("n_critical", 0) for t, e in (data.get("tasks") or {}).items()}
        if counts and not any(counts.values()):
            return f"no generalization-critical samples: |G_t| = 0 on every task ({', '.join(counts)}); {rl} gets no document right that base gets wrong"
        return None

    def empty_set(path: Path, what: str):
        def check() -> str | None:
            import json

            reason = no_critical()
            if reason is not None:
                return reason
            if path.exists() and not json.loads(path.read_text()).get("features"):
                return f"{what} is empty ({path.name})"
            return None

        return check

    genfeat = root / "generalization"
    if "generalization" in raw:
        add(
            "generalization",
            "features_generalization",
            ("critical", f"crosscoder-base-{rl}"),
            ("generalization",),
            [genfeat],
            lambda: study.step_config(
                "generalization",
                {
                    "crosscoder": str(root / "crosscoders" / f"base-{rl}"),
                    "base": "base",
                    "rl": rl,
                    "critical": str(critical),
                    "model": [f"base={study.base_model}", f"{rl}={study.arm_model(rl)}"],
                    "out": str(genfeat),
                },
                {"tasks": [*tasks["in_domain"], *tasks["general"]], "device": s.device},
            ),
            "Score_k^t at the last prompt token, S_t per task",
            no_critical,
        )
    if "intervene" in raw:
        for label, model, mode in ((f"zero-{rl}", rl, "zero"), ("set-base", "base", "set")):
            out = root / "intervene" / label
            add(
                f"intervene-{label}",
                "intervene",
                ("generalization",),
                ("intervene",),
                [out],
                lambda model=model, mode=mode, out=out: study.step_config(
                    "intervene",
                    {
                        "features": str(genfeat / "generalization_features.json"),
                        "model": [f"{model}={study.base_model if model == 'base' else study.arm_model(model)}"],
                        "mode": mode,
                        "critical": str(critical),
                        "out": str(out),
                        "crosscoder": str(root / "crosscoders" / f"base-{rl}"),
                    },
                    {"held_out_tasks": tasks["held_out"], "device": s.device},
                    joined={"include_path": study.include_path()},
                ),
                f"{mode} the generalization features in {model}, on G_t (held-out task marked)",
                empty_set(genfeat / "generalization_features.json", "S, the features in every task's S_t,"),
            )

    # ---- paper S: Fisher features, steering, gradient blocking, leakage -----------------------------------
    fisher = root / "fisher"
    if "fisher" in raw:
        add(
            "fisher",
            "features_fisher",
            (f"crosscoder-base-{sft}",),
            ("fisher",),
            [fisher],
            lambda: study.step_config(
                "fisher",
                {
                    "crosscoder": str(root / "crosscoders" / f"base-{sft}"),
                    "model": [f"base={study.base_model}", f"{sft}={study.arm_model(sft)}"],
                    "select_model": sft,
                    "out": str(fisher),
                    "layer": L,
                },
                {"dataset": study.dataset, "device": s.device},
            ),
            f"Fisher importance ratio of {sft}'s features on reasoning vs solution tokens",
        )
    if "steer" in raw:
        out = root / "intervene" / "steer-base"
        add(
            "steer",
            "intervene",
            ("fisher", "critical"),
            ("steer",),
            [out],
            lambda out=out: study.step_config(
                "steer",
                {
                    "features": str(fisher / "fisher_features.json"),
                    "model": [f"base={study.base_model}"],
                    "mode": "steer",
                    "critical": str(critical),
                    "out": str(out),
                    "crosscoder": str(root / "crosscoders" / f"base-{sft}"),
                    "role": "base",
                },
                {
                    "held_out_tasks": tasks["held_out"],
                    "full_task": True,
                    "device": s.device,
                    "reference": study.dataset,
                },
                joined={"include_path": study.include_path()},
            ),
            "steer the Fisher features in the base model",
            empty_set(fisher / "fisher_features.json", "the Fisher feature set"),
        )
    blocked = study.blocked
    for arm, category in study.blocked_arms().items():

        def blocked_launch(arm=arm, category=category):
            own = study._recipe_args(blocked.config, blocked.args)
            base_args = {**study.arm_args[sft], **own} if blocked.config is None else own
            extra = {
                "block_crosscoder": str(root / "crosscoders" / f"base-{sft}"),
                "block_features": category,
                "block_model": "base",
                "block_base": "base",
                "block_finetuned": sft,
                "block_mode": blocked.mode,
            }
            return trl(arm, "sft_blocked", train_args(arm, base_args, extra))

        def empty_category(category=category) -> str | None:
            import json

            path = root / "analysis" / f"base-{sft}" / "feature_sets" / f"{sft}_{category}.json"
            if path.exists() and not json.loads(path.read_text()).get("features"):
                return f"the {category} category of base-{sft} has no live feature: nothing to protect"
            return None

        add(
            f"train-{arm}",
            "train",
            (f"analyze-base-{sft}", *world_dep),
            (f"arms.{sft}", "blocked"),
            [study.arm_dir(arm)],
            blocked_launch,
            f"SFT with the {category} features of base-{sft} protected",
            empty_category,
        )
        if "eval" in raw:
            eval_stage(arm, lambda arm=arm: str(study.arm_dir(arm)), (f"train-{arm}",))
        if "leakage" in raw:
            out = root / "leakage" / arm
            add(
                f"leakage-{arm}",
                "leakage",
                (f"train-{arm}",),
                ("leakage",),
                [out],
                lambda arm=arm, category=category, out=out: study.step_config(
                    "leakage",
                    {
                        "crosscoder": str(root / "crosscoders" / f"base-{sft}"),
                        "base": study.base_model,
                        "blocked": str(study.arm_dir(arm)),
                        "features": category,
                        "out": str(out),
                        "model_name": "base",
                        "finetuned": sft,
                        "layer": L,
                    },
                    {"dataset": study.dataset, "device": s.device},
                ),
                f"how far the protected {category} features still moved",
            )

    report = root / "report"
    add(
        "report",
        "report",
        [st.name for st in stages],
        ("report",),
        [report],
        lambda: study.report,
        "report.html + report.md",
    )
    return stages
