"""Effect of feature interventions on generalization-critical samples (docs/methods.md sec. 7; paper R tables 2-5).

A feature set (e.g. the generalization features of ``posttrain-probe features generalization``) is
intervened on in one model - zeroed in the RL model (paper R table 2, held-out tasks table 4) or set
to 3.0 in the base model (tables 3, 5) - and the model is evaluated with lm-eval on the
generalization-critical samples G_t of every task (``posttrain-probe critical``). On G_t the RL
model was right on every sample and the base model wrong on every one, so

    delta_t = 100 (acc_after - acc_before)   [percentage points]

with acc_before = 100% for the RL model and 0% for the base model (:func:`intervention_delta`): a
multiple of 100 / |G_t|. The **role** of the evaluated model (``rl`` or ``base``) decides which;
critical.json does not name models, so it is given (``role``) or read from the feature set's
provenance (``base``/``rl`` branch names written by ``features generalization``) by comparing with
the evaluated crosscoder branch.

An un-intervened run on the same documents measures acc_before too (a consistency check: it can
differ from the nominal value when the evaluation settings, dtype or batch size differ from the
runs critical.json came from; both deltas are reported). With ``full_task`` the whole task is
evaluated before and after (the G_t numbers are then read from those runs). A task is flagged
``held_out`` when listed in ``held_out_tasks`` or when the feature set's provenance lists the tasks
it was selected on and the task is not one of them (paper R tables 4-5). Tasks without critical
samples are reported, not evaluated on G_t.

Beyond the papers:

- **Controls** (docs/methods.md sec. 11; :mod:`posttrain_probe.analysis.controls`): ``control_seeds`` random
  feature sets of |S| features, frequency-matched to S bin by bin (firing rates of the intervened
  branch's per-source codes on a reference corpus: ``reference`` or, by default, the prompts of the
  evaluated G_t documents), each run exactly like S on the same documents. Per task: mean, sample
  std, min and max of their deltas and ``outside_controls`` (S's delta below their min or above
  their max).
- **Per feature** (paper S): with ``per_feature`` each feature of S alone is intervened on too, one
  row per (task, feature).
- **Split-half selection**: a feature set selected with ``features generalization --split-half``
  records the held-out half of each task's G_t; those tasks are evaluated on that half only
  (``held_out_half``), so the selection never saw the documents the effect is measured on.

Entry points: :func:`intervene` (settings: :class:`~posttrain_probe.eval.intervene_config.InterveneConfig`;
result: :class:`~posttrain_probe.eval.effects.InterventionEffects`, written to ``effects.json``,
``effects.csv``, ``effects.md``; scoring of the runs: :mod:`posttrain_probe.eval.effect_scoring`; tables:
:mod:`posttrain_probe.eval.effects`),
``posttrain-probe intervene``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.effect_scoring import CriticalTasks, task_effects
from posttrain_probe.eval.effects import InterventionEffects
from posttrain_probe.eval.intervene_config import ROLES, InterveneConfig, parse_model_args
from posttrain_probe.model_identity import check_model_path, slot_fingerprint


def resolve_role(model_name: str, role: str | None, provenance: Mapping[str, Any]) -> str:
    """The role (``rl``/``base``) of crosscoder branch ``model_name`` on G_t.

    Given ``role`` wins but must agree with the feature set's provenance (``base``/``rl`` branch names,
    as ``features generalization`` writes them); without it the provenance decides. Neither: ProbeError.
    """
    prov_base, prov_rl = provenance.get("base"), provenance.get("rl")
    named = "rl" if model_name == prov_rl else "base" if model_name == prov_base else None
    if role is not None:
        if role not in ROLES:
            raise ProbeError(
                f"role {role!r}: expected 'rl' (the model RL-tuned: acc_before 100% on G_t) or 'base' (acc_before 0%)"
            )
        if named is not None and named != role:
            raise ProbeError(
                f"role {role!r} contradicts the feature set: branch {model_name!r} is its {named!r} model "
                f"(provenance base={prov_base!r}, rl={prov_rl!r})"
            )
        return role
    if named is None:
        known = f" (the feature set names base={prov_base!r}, rl={prov_rl!r})" if prov_base or prov_rl else ""
        raise ProbeError(
            f"cannot tell whether branch {model_name!r} is the base or the RL model on G_t{known}: pass role "
            "(--role rl: acc_before = 100%, --role base: acc_before = 0%)"
        )
    return named


def intervene(config: InterveneConfig) -> InterventionEffects:
    """Run a feature intervention on G_t of every task and measure the change (docs/methods.md sec. 7, paper R tables 2-5),
    beside frequency-matched random control sets (docs/methods.md sec. 11) and, optionally, each feature alone;
    write it to ``config.out`` (``effects.json``, ``effects.csv``, ``effects.md``; lm-eval's results and sample logs of
    every run under ``lm_eval/<run>``: ``before``, ``after``, ``control-seed<s>``, ``feature-<k>``).

    Every argument is checked (:func:`~posttrain_probe.eval.lm_eval_model.check_intervention_args`, where the feature
    set is resolved, once) before any lm-eval run. Returns :class:`InterventionEffects` (deltas in percentage points;
    the counts behind them; one :class:`SetEffect` per control set and task and, with ``per_feature``, per feature and task).
    """
    from posttrain_probe.eval.lm_eval_model import check_intervention_args

    cc_dir = _crosscoder_dir(config)
    model_name, model_path = _evaluated_model(config)
    spec = check_intervention_args(
        crosscoder=cc_dir,
        features=config.features,
        mode=config.mode,
        value=config.value,
        model_name=model_name,
        positions=config.positions,
        reference=config.reference,
        controls=bool(config.control_seeds),
    )
    cc, indices = spec.crosscoder, spec.features
    role = resolve_role(model_name, config.role, spec.provenance)
    model_mismatch = check_model_path(
        model_path,
        slot_fingerprint(cc, cc.model_index(model_name)),
        model_name,
        allow_mismatch=config.allow_model_mismatch,
    )
    tasks = _tasks(config, spec.provenance)
    base_args: dict[str, Any] = {"pretrained": str(model_path), **parse_model_args(config.model_args)}
    drawn, controls_info = _controls(config, spec, model_path, tasks, base_args)
    eval_tasks = tasks.order if config.full_task else tasks.used
    runs = _run_variants(config, tasks, eval_tasks, _variants(config, spec, cc_dir, base_args, drawn))
    rows, control_rows, feature_rows = [], [], []
    for task in tasks.order:
        row, controls, features = task_effects(
            config, task, tasks, runs if task in eval_tasks else {}, role, drawn, indices
        )
        rows.append(row)
        control_rows += controls
        feature_rows += features

    settings = {
        "features": config.features,
        "n_features": len(indices),
        "crosscoder": str(cc_dir),
        "model_name": model_name,
        "model": str(model_path),
        "role": role,
        "mode": config.mode,
        "value": config.value,
        "positions": config.positions,
        "critical": str(config.critical),
        "selection_tasks": tasks.selection_tasks,
        "held_out_tasks": sorted(config.held_out_tasks),
        "full_task": config.full_task,
        "model_args": dict(base_args),
        "model_mismatch": model_mismatch,
        "apply_chat_template": config.apply_chat_template,
        "num_fewshot": config.num_fewshot,
        "per_feature": config.per_feature,
        "controls": controls_info,
        "split_half": {"seed": spec.provenance["split_half"].get("seed"), "held_out_doc_ids": tasks.split}
        if tasks.split
        else None,
        "delta": "100 * (acc_after - acc_before) in percentage points on G_t; acc_before = 100% (role rl) or 0% (role base)",
    }
    effects = InterventionEffects(rows, settings, controls=control_rows, per_feature=feature_rows, runs=runs)
    effects.write(config.out)
    return effects


def _variants(
    config: InterveneConfig, spec, cc_dir: Path, base_args: Mapping[str, Any], drawn
) -> list[tuple[str, dict[str, Any]]]:
    """(label, probe-hf model_args) of every lm-eval run: ``before`` (no intervention), ``after`` (the feature set),
    ``control-seed<s>`` (each control set, with ``drawn``) and ``feature-<k>`` (each feature alone, ``per_feature``)."""
    after_args: dict[str, Any] = {
        **base_args,
        "crosscoder": str(cc_dir),
        "features": spec.features_arg,
        "mode": config.mode,
        "model_name": spec.model_name,
        "positions": config.positions,
    }
    if config.value is not None:
        after_args["value"] = config.value
    if config.mode == "steer":
        after_args["reference"] = config.reference
    if config.allow_model_mismatch:
        after_args["allow_model_mismatch"] = True
    variants: list[tuple[str, dict[str, Any]]] = [("before", dict(base_args)), ("after", after_args)]
    if drawn is not None:
        variants += [
            (f"control-seed{seed}", {**after_args, "features": ";".join(str(k) for k in sorted(cset))})
            for seed, cset in zip(drawn.seeds, drawn.sets)
        ]
    if config.per_feature:
        variants += [(f"feature-{k}", {**after_args, "features": str(k)}) for k in spec.features]
    return variants


def _run_variants(
    config: InterveneConfig, tasks: CriticalTasks, eval_tasks: list[str], variants: Sequence[tuple[str, dict]]
) -> dict[str, Any]:
    """label -> lm-eval's result of each variant on ``eval_tasks`` (G_t only unless ``full_task``), logs written to
    ``config.out/lm_eval/<label>``; the task manager is indexed once for every run."""
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import evaluate, make_task_manager

    samples = None if config.full_task else {t: tasks.g[t].doc_ids for t in tasks.used}
    task_manager = make_task_manager(eval_tasks, config.include_path or None)
    return {
        label: evaluate(
            LmEvalConfig(
                model_args=args,
                tasks=eval_tasks,
                samples=samples,
                include_path=config.include_path,
                log_samples=True,
                out=config.out / "lm_eval" / label,
                batch_size=config.batch_size,
                apply_chat_template=config.apply_chat_template,
                num_fewshot=config.num_fewshot,
                device=config.device,
            ),
            task_manager=task_manager,
        )
        for label, args in variants
    }


def _crosscoder_dir(config: InterveneConfig) -> Path:
    """``config.crosscoder`` or the crosscoder directory the feature-set JSON records; it and ``config.critical``
    must exist (and the crosscoder's training be complete unless ``allow_incomplete``)."""
    from posttrain_probe.analysis.feature_sets import load_feature_set
    from posttrain_probe.crosscoder.inspect import require_complete

    crosscoder = config.crosscoder
    if crosscoder is None:
        features = config.features
        if not Path(features).is_file():
            raise ProbeError(
                f"--features {features!r} is not a feature-set file: give --crosscoder DIR with feature indices"
            )
        recorded = load_feature_set(features).crosscoder
        if not recorded:
            raise ProbeError(f"the feature set {features} records no crosscoder: give --crosscoder DIR")
        if not Path(recorded).exists():
            raise ProbeError(
                f"the crosscoder {recorded} that {features} records does not exist here: give --crosscoder DIR"
            )
        crosscoder = Path(recorded)
    if not crosscoder.exists():
        raise ProbeError(f"--crosscoder {crosscoder} does not exist")
    if not config.critical.exists():
        raise ProbeError(f"--critical {config.critical} does not exist")
    require_complete(crosscoder, config.allow_incomplete)
    return crosscoder


def _evaluated_model(config: InterveneConfig) -> tuple[str, str]:
    """(branch, path) of the one ``--model NAME=PATH``."""
    from posttrain_probe.models import parse_model_specs

    models = parse_model_specs(config.model)
    if len(models) != 1:
        raise ProbeError(f"--model: intervene evaluates one model, got {len(models)} ({', '.join(models)})")
    return next(iter(models.items()))


def _tasks(config: InterveneConfig, provenance: Mapping[str, Any]) -> CriticalTasks:
    """The requested tasks (default: every task of critical.json; held-out tasks added), their G_t (the held-out half
    of a split-half selection) and flags."""
    from posttrain_probe.analysis.critical import CriticalSamples

    critical = CriticalSamples.read(config.critical)
    available = {t: g for t, g in critical.tasks.items() if g.n_critical}
    requested = list(dict.fromkeys([*(config.tasks or list(critical.tasks)), *config.held_out_tasks]))
    used, skipped = critical.choose_tasks(requested)
    if not used and not config.full_task:
        raise ProbeError(
            f"no task has generalization-critical samples (tasks without any: {skipped}); nothing to evaluate on G_t"
        )
    split = _held_out_halves(provenance, available, used)
    selection = provenance.get("tasks")
    selection = selection if isinstance(selection, list) else None
    held = set(config.held_out_tasks)
    order = [t for t in requested if t in used or t in skipped]
    return CriticalTasks(
        order=order,
        used=used,
        skipped=skipped,
        g={**available, **{t: available[t].subset(docs) for t, docs in split.items()}},
        entries={t: critical.tasks[t].to_json() for t in order},
        split=split,
        held_out={t for t in order if t in held or (selection is not None and t not in selection)},
        selection_tasks=selection,
    )


def _controls(config: InterveneConfig, spec, model_path: str, tasks: CriticalTasks, base_args: Mapping[str, Any]):
    """(ControlSets or None, settings["controls"] or None): firing rates of the intervened branch's per-source codes
    on the reference corpus (``config.reference`` or the evaluated G_t prompts; cached next to the crosscoder) and
    one frequency-matched set per seed; none without ``control_seeds`` or without a task with G_t."""
    if not config.control_seeds:
        return None, None
    if not tasks.used:
        return None, {
            "seeds": config.control_seeds,
            "skipped": "no task has generalization-critical samples: no controls (their deltas are on G_t)",
        }
    from posttrain_probe.analysis.controls import control_feature_sets, frequency_bins
    from posttrain_probe.interventions.activation_stats import source_activation_stats
    from posttrain_probe.models import load_causal_lm, load_tokenizer

    cc, indices, model_name = spec.crosscoder, spec.features, spec.model_name
    prompts = [p for t in tasks.used for p in tasks.g[t].contexts]
    layer = cc.config.layer
    tokenizer = load_tokenizer(model_path)
    lm = load_causal_lm(model_path, dtype=base_args.get("dtype", "auto"), device=config.device, keep_layers=layer)
    data = config.reference if config.reference is not None else prompts
    stats = source_activation_stats(
        cc,
        model_name,
        lm,
        data,
        tokenizer=tokenizer,
        cache_dir=Path(spec.crosscoder_dir) / "max_activations",
        allow_model_mismatch=config.allow_model_mismatch,
    )
    del lm
    drawn = control_feature_sets(stats.frequency, indices, config.control_seeds, n_bins=config.control_bins)
    frequency = stats.frequency.tolist()
    bins = frequency_bins(stats.frequency, drawn.n_bins).tolist()
    reference = (
        str(config.reference)
        if config.reference is not None
        else f"prompts of the evaluated G_t documents of {', '.join(tasks.used)} ({len(prompts)} prompts)"
    )
    info = {
        "seeds": drawn.seeds,
        "n_bins": drawn.n_bins,
        "requested_bins": drawn.requested_bins,
        "note": drawn.note,
        "matching": "per selected feature, a distinct random feature of the same frequency bin (bin 0: never fires; bins 1..n: "
        "equal-count bins of the live features by firing rate), none of S (analysis.controls.frequency_matched_controls)",
        "reference": reference,
        "frequency": f"fraction of reference tokens with f_i^{model_name} > 0 (per-source code of the intervened branch)",
        "n_reference_tokens": stats.n_tokens,
        "selected": {
            "features": indices,
            "bins": [bins[k] for k in indices],
            "frequency": [frequency[k] for k in indices],
        },
        "sets": [
            {"seed": seed, "features": cset, "bins": [bins[k] for k in cset], "frequency": [frequency[k] for k in cset]}
            for seed, cset in zip(drawn.seeds, drawn.sets)
        ],
    }
    return drawn, info


def _held_out_halves(
    provenance: Mapping[str, Any], available: Mapping[str, Any], used: Sequence[str]
) -> dict[str, list[int]]:
    """{task: held-out doc ids} of a feature set selected on one half of G_t (``features generalization
    --split-half``), for the evaluated tasks it was split on; {} otherwise. The two halves must make up
    the task's G_t in ``critical`` exactly (else the set was selected on another critical file)."""
    split = provenance.get("split_half")
    if not split:
        return {}
    if (
        not isinstance(split, Mapping)
        or not isinstance(split.get("held_out_doc_ids"), Mapping)
        or not isinstance(split.get("selection_doc_ids"), Mapping)
    ):
        raise ProbeError(
            "the feature set's provenance has a malformed split_half; expected held_out_doc_ids and selection_doc_ids per task"
        )
    out = {}
    for task, held in split["held_out_doc_ids"].items():
        if task not in used:
            continue
        held = [int(d) for d in held]
        selection = [int(d) for d in split["selection_doc_ids"].get(task, [])]
        if set(held) & set(selection) or sorted(held + selection) != sorted(available[task].doc_ids):
            raise ProbeError(
                f"task {task!r}: the feature set was selected on half of another G_t (its halves hold {len(selection)} + {len(held)} "
                f"doc ids, critical.json has {len(available[task].doc_ids)} that are not the same); expected the critical file it was selected with"
            )
        if not held:
            raise ProbeError(f"task {task!r}: the held-out half of G_t is empty; nothing to evaluate it on")
        out[task] = held
    return out
