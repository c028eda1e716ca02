"""Effect of feature interventions on generalization-critical samples (SPEC sec. 7; paper R tables 2-5).

A feature set (e.g. the generalization features of ``posttrain-probe features generalization``) is
intervened on in one model - zeroed in the RL model (paper R table 2, held-out tasks table 4) or set
to 3.0 in the base model (tables 3, 5) - and the model is evaluated with lm-eval on the
generalization-critical samples G_t of every task (``posttrain-probe critical``). On G_t the RL
model was right on every sample and the base model wrong on every one, so

    delta_t = 100 (acc_after - acc_before)   [percentage points]

with acc_before = 100% for the RL model and 0% for the base model (:func:`intervention_delta`): a
multiple of 100 / |G_t|. The **role** of the evaluated model (``rl`` or ``base``) decides which;
critical.json does not name models, so it is given (``role=``) or read from the feature set's
provenance (``base``/``rl`` branch names written by ``features generalization``) by comparing with
the evaluated crosscoder branch.

An un-intervened run on the same documents measures acc_before too (a consistency check: it can
differ from the nominal value when the evaluation settings, dtype or batch size differ from the
runs critical.json came from; both deltas are reported). With ``full_task`` the whole task is
evaluated before and after (the G_t numbers are then read from those runs). A task is flagged
``held_out`` when listed in ``held_out_tasks`` or when the feature set's provenance lists the tasks
it was selected on and the task is not one of them (paper R tables 4-5). Tasks without critical
samples are reported, not evaluated on G_t.

Entry points: :func:`intervention_effects`, :meth:`InterventionEffects.write` (``effects.json``,
``effects.csv``), :func:`format_effects_table`, ``posttrain-probe intervene``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError

ROLES = ("rl", "base")
"""Roles of the evaluated model on G_t: ``rl`` (acc_before = 100%) or ``base`` (acc_before = 0%)."""
NOMINAL_ACC_BEFORE = {"rl": 100.0, "base": 0.0}
"""acc_before on G_t in percent, by role (SPEC sec. 7)."""
RESULT_FORMAT = "posttrain-probe/intervention-effects"


# -- the formula ------------------------------------------------------------------------------------------


def intervention_delta(n_correct_after: int, n_critical: int, role: str) -> float:
    """Change of accuracy on G_t, in percentage points (SPEC sec. 7; paper R tables 2-5).

    Args:
        n_correct_after: samples of G_t answered correctly with the intervention.
        n_critical: |G_t| (>= 1).
        role: ``rl`` (acc_before = 100%: every sample of G_t was right) or ``base`` (acc_before = 0%).

    Returns:
        delta = 100 (acc_after - acc_before) = 100 (n_correct_after - n_before) / |G_t|, with
        n_before = |G_t| (rl) or 0 (base): a multiple of 100 / |G_t| in [-100, 0] (rl) or [0, 100] (base).
    """
    if role not in ROLES:
        raise ProbeError(f"role {role!r}: expected 'rl' (acc_before = 100% on G_t) or 'base' (acc_before = 0%)")
    if n_critical < 1:
        raise ProbeError(f"|G_t| = {n_critical}: a delta on G_t needs at least one critical sample")
    if not 0 <= n_correct_after <= n_critical:
        raise ProbeError(f"n_correct_after = {n_correct_after} is outside [0, |G_t| = {n_critical}]")
    n_before = n_critical if role == "rl" else 0
    return 100.0 * (n_correct_after - n_before) / n_critical


# -- results ------------------------------------------------------------------------------------------


@dataclass
class TaskEffect:
    """One row of the table: the intervention's effect on one task."""

    task: str
    held_out: bool
    """Not one of the tasks the feature set was selected on (paper R tables 4-5)."""
    n_critical: int
    """|G_t| (0: the task has no generalization-critical samples and no G_t numbers)."""
    n_correct_before: int | None = None
    """Measured: samples of G_t right in the un-intervened run."""
    n_correct_after: int | None = None
    """Samples of G_t right with the intervention."""
    acc_before_nominal: float | None = None
    """acc_before on G_t by SPEC sec. 7 (100 for the RL model, 0 for the base), percent."""
    acc_after: float | None = None
    """100 n_correct_after / |G_t|, percent."""
    delta_pp: float | None = None
    """:func:`intervention_delta`: acc_after - acc_before_nominal, percentage points."""
    delta_measured_pp: float | None = None
    """acc_after minus the measured acc_before, percentage points."""
    flipped_docs: list[int] = field(default_factory=list)
    """Doc ids of G_t whose correctness differs between the un-intervened and the intervened run."""
    prompt_mismatches: int = 0
    """G_t docs whose prompt in the runs here differs from critical.json's (other lm-eval settings)."""
    n_docs: int | None = None
    """Full task (``full_task``): documents evaluated."""
    full_acc_before: float | None = None
    """Full task: accuracy without intervention, percent."""
    full_acc_after: float | None = None
    """Full task: accuracy with the intervention, percent."""

    @property
    def full_delta_pp(self) -> float | None:
        """Full task: acc_after - acc_before, percentage points."""
        if self.full_acc_before is None or self.full_acc_after is None:
            return None
        return self.full_acc_after - self.full_acc_before


@dataclass
class InterventionEffects:
    """Result of :func:`intervention_effects`: one :class:`TaskEffect` per task, and the settings."""

    rows: list[TaskEffect]
    settings: dict[str, Any]
    runs: dict[str, Any] = field(default_factory=dict, repr=False)
    """The lm-eval results (``before``, ``after``) as returned by ``evaluate`` (samples included); not written."""

    @property
    def no_critical(self) -> list[str]:
        """Tasks without generalization-critical samples."""
        return [row.task for row in self.rows if row.n_critical == 0]

    @property
    def notes(self) -> list[str]:
        """Plain-language remarks: tasks without critical samples, baseline and prompt mismatches."""
        notes = []
        if self.no_critical:
            notes.append(f"tasks without generalization-critical samples (no delta on G_t): {', '.join(self.no_critical)}")
        for row in self.rows:
            if row.n_critical and row.n_correct_before is not None and row.acc_before_nominal is not None:
                measured = 100.0 * row.n_correct_before / row.n_critical
                if measured != row.acc_before_nominal:
                    notes.append(
                        f"{row.task}: without intervention {row.n_correct_before}/{row.n_critical} of G_t are right here, not "
                        f"{row.acc_before_nominal:.0f}% as in the runs of critical.json (other dtype, batch size or settings?); "
                        "delta_measured_pp uses the measured value"
                    )
            if row.prompt_mismatches:
                notes.append(
                    f"{row.task}: {row.prompt_mismatches} prompt(s) of G_t differ from critical.json (other lm-eval settings: "
                    "few-shot, chat template, include path?); the documents are the same, the contexts are not"
                )
        return notes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: format, settings, one dict per row (with ``full_delta_pp``), notes."""
        rows = [{**asdict(row), "full_delta_pp": row.full_delta_pp} for row in self.rows]
        return json_safe({"format": RESULT_FORMAT, "format_version": 1, "settings": self.settings, "rows": rows,
                           "no_critical": self.no_critical, "notes": self.notes})

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``effects.json`` (:meth:`to_dict`), ``effects.csv`` (one row per task) and
        ``effects.md`` (:func:`format_effects_table` + the paper-style row); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": str(out / "effects.json"), "csv": str(out / "effects.csv"), "table": str(out / "effects.md")}
        data = self.to_dict()
        (out / "effects.json").write_text(json.dumps({**data, "files": files}, indent=2))
        columns = ["task", "held_out", "n_critical", "n_correct_before", "n_correct_after", "acc_before_nominal", "acc_after",
                   "delta_pp", "delta_measured_pp", "prompt_mismatches", "n_docs", "full_acc_before", "full_acc_after", "full_delta_pp"]
        with open(out / "effects.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in data["rows"]:
                writer.writerow(["" if row[c] is None else row[c] for c in columns])
        (out / "effects.md").write_text(format_effects_table(self) + "\n\n" + paper_table(self) + "\n")
        return files


def _pp(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_effects_table(effects: InterventionEffects) -> str:
    """A plain-text table of the effects, one task per line: |G_t|, correct before/after, delta (pp),
    held-out flag and, with full-task runs, full-task accuracy before/after."""
    s = effects.settings
    head = (f"{s.get('mode')} {s.get('n_features')} features of branch {s.get('model_name')!r} in model {s.get('model')} "
            f"(role {s.get('role')}: acc_before on G_t = {NOMINAL_ACC_BEFORE.get(s.get('role'), float('nan')):.0f}%), positions {s.get('positions')}")
    full = any(row.n_docs is not None for row in effects.rows)
    columns = ["task", "held-out", "|G_t|", "right before", "right after", "delta (pp)", "measured delta (pp)"]
    if full:
        columns += ["full before (%)", "full after (%)", "full delta (pp)"]
    lines = []
    for row in effects.rows:
        if row.n_critical:
            cells = [row.task, "yes" if row.held_out else "", str(row.n_critical),
                     f"{row.n_correct_before}/{row.n_critical}" if row.n_correct_before is not None else "-",
                     f"{row.n_correct_after}/{row.n_critical}", _pp(row.delta_pp), _pp(row.delta_measured_pp)]
        else:
            cells = [row.task, "yes" if row.held_out else "", "0", "no critical samples", "", "", ""]
        if full:
            cells += [_pp(row.full_acc_before, False), _pp(row.full_acc_after, False), _pp(row.full_delta_pp)]
        lines.append(cells)
    widths = [max(len(columns[j]), *(len(cells[j]) for cells in lines)) for j in range(len(columns))]
    fmt = "  ".join(f"{{:<{w}}}" if j in (0, 1) else f"{{:>{w}}}" for j, w in enumerate(widths))
    out = [head, fmt.format(*columns), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*cells).rstrip() for cells in lines]
    return "\n".join(out)


def paper_table(effects: InterventionEffects) -> str:
    """The row of paper R tables 2-5: model (mode) and delta (pp) per task with critical samples;
    held-out tasks marked with ``*``. Markdown."""
    s = effects.settings
    rows = [row for row in effects.rows if row.n_critical]
    header = "| Model | " + " | ".join(f"{row.task}{'*' if row.held_out else ''}" for row in rows) + " |"
    rule = "|---|" + "---|" * len(rows)
    body = f"| {s.get('model_name')} ({s.get('mode')}) | " + " | ".join(_pp(row.delta_pp) for row in rows) + " |"
    lines = [header, rule, body]
    if any(row.held_out for row in rows):
        lines.append("\n\\* held-out task (not used to select the features)")
    return "\n".join(lines)


# -- the whole computation --------------------------------------------------------------------------------


def _feature_spec(cc, features) -> tuple[list[int], str, dict[str, Any]]:
    """(indices, the model_args value for probe-hf, the feature set's provenance or {})."""
    from posttrain_probe.interventions.feature_sets import load_feature_set, resolve_features

    indices = resolve_features(cc, features if isinstance(features, (str, os.PathLike)) else list(features))
    text = str(features) if isinstance(features, (str, os.PathLike)) else ""
    if text and (Path(text).suffix == ".json" or Path(text).exists()):
        return indices, str(Path(text).resolve()), load_feature_set(text).provenance
    return indices, ";".join(str(i) for i in indices), {}


def resolve_role(model_name: str, role: str | None, provenance: Mapping[str, Any]) -> str:
    """The role (``rl``/``base``) of crosscoder branch ``model_name`` on G_t.

    Given ``role`` wins but must agree with the feature set's provenance (``base``/``rl`` branch names,
    as ``features generalization`` writes them); without it the provenance decides. Neither: ProbeError.
    """
    prov_base, prov_rl = provenance.get("base"), provenance.get("rl")
    named = "rl" if model_name == prov_rl else "base" if model_name == prov_base else None
    if role is not None:
        if role not in ROLES:
            raise ProbeError(f"role {role!r}: expected 'rl' (the model RL-tuned: acc_before 100% on G_t) or 'base' (acc_before 0%)")
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


def intervention_effects(
    features: str | os.PathLike | Sequence[int],
    crosscoder,
    model: tuple[str, str] | Mapping[str, str],
    critical: str | os.PathLike | Mapping[str, Any],
    *,
    mode: str,
    value: float | None = None,
    positions: str = "all",
    role: str | None = None,
    tasks: Sequence[str] | None = None,
    held_out_tasks: Sequence[str] = (),
    full_task: bool = False,
    include_path: str | os.PathLike | Sequence[str] | None = None,
    model_args: Mapping[str, Any] | None = None,
    reference: str | None = None,
    apply_chat_template: bool = False,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    output_path: str | os.PathLike | None = None,
) -> InterventionEffects:
    """Run a feature intervention on G_t of every task and measure the change (SPEC sec. 7, paper R tables 2-5).

    Args:
        features: the feature set (feature-set JSON, ``3,17,42`` or indices); a JSON made for another
            crosscoder is refused.
        crosscoder: crosscoder directory (``probe-hf`` loads it by path).
        model: ``(branch, path)`` or ``{branch: path}`` with one entry: the evaluated model and its
            crosscoder branch (the intervention's ``model_name``).
        critical: the ``posttrain-probe critical`` JSON (path or dict).
        mode, value, positions: the intervention (``FeatureIntervention``: zero / set (default 3.0) /
            scale / add / steer; positions all / prompt / last_prompt).
        role: ``rl`` or ``base`` (see :func:`resolve_role`; default from the feature set's provenance).
        tasks: tasks to evaluate (default: every task of ``critical``); ``held_out_tasks`` are added
            and flagged held out.
        full_task: also evaluate the whole tasks before/after (G_t numbers then come from those runs).
        include_path: lm-eval task folders besides the shipped ones. ``model_args``: extra HFLM
            model_args for both runs (e.g. ``{"dtype": "bfloat16"}``: use those of the critical runs).
        reference: steer's reference corpus (``probe-hf``'s ``reference=``).
        apply_chat_template, num_fewshot, batch_size, device: as lm-eval's options (use those of the
            critical runs: the prompts are compared with critical.json's).
        output_path: if given, lm-eval's results and sample logs of both runs go to
            ``<output_path>/before`` and ``<output_path>/after``.

    Returns:
        :class:`InterventionEffects` (deltas in percentage points; counts behind them).
    """
    from posttrain_probe.analysis.generalization import choose_tasks, load_critical, split_names
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.eval.runner import evaluate, make_task_manager

    if isinstance(model, Mapping):
        if len(model) != 1:
            raise ProbeError(f"intervene evaluates one model: expected one NAME=PATH, got {len(model)} ({sorted(model)})")
        (model_name, model_path), = model.items()
    else:
        model_name, model_path = model
    cc_dir = Path(crosscoder)
    cc = load_crosscoder(cc_dir)
    cc.model_index(model_name)  # the branch must exist: error lists the crosscoder's models
    indices, features_arg, provenance = _feature_spec(cc, features)
    role = resolve_role(model_name, role, provenance)
    _check_intervention(cc, indices, mode=mode, value=value, model_name=model_name, positions=positions, reference=reference)

    available, empty, data = load_critical(critical)
    held = split_names(held_out_tasks or [])
    in_file = [*data["tasks"], *[t for t in empty if t not in data["tasks"]]]
    requested = list(dict.fromkeys([*(split_names(tasks) if tasks is not None else in_file), *held]))
    used, skipped = choose_tasks(list(available), empty, requested)
    order = [t for t in requested if t in used or t in skipped]
    selection_tasks = provenance.get("tasks")
    held_set = set(held)

    def is_held_out(task: str) -> bool:
        return task in held_set or (isinstance(selection_tasks, list) and task not in selection_tasks)

    if not used and not full_task:
        raise ProbeError(f"no task has generalization-critical samples (tasks without any: {skipped}); nothing to evaluate on G_t")

    base_args: dict[str, Any] = {"pretrained": str(model_path), **dict(model_args or {})}
    after_args: dict[str, Any] = {**base_args, "crosscoder": str(cc_dir), "features": features_arg, "mode": mode,
                                  "model_name": model_name, "positions": positions}
    if value is not None:
        after_args["value"] = value
    if reference is not None:
        after_args["reference"] = reference
    eval_tasks = order if full_task else used
    samples = None if full_task else {t: available[t].doc_ids for t in used}
    runs = {}
    task_manager = make_task_manager(eval_tasks, include_path)  # indexed once for both runs
    for label, args in (("before", base_args), ("after", after_args)):
        runs[label] = evaluate(
            args, eval_tasks, samples=samples, include_path=include_path, log_samples=True,
            output_path=None if output_path is None else str(Path(output_path) / label), batch_size=batch_size,
            apply_chat_template=apply_chat_template, num_fewshot=num_fewshot, device=device, task_manager=task_manager,
        )

    rows = []
    for task in order:
        entry = data["tasks"].get(task, {})
        row = TaskEffect(task=task, held_out=is_held_out(task), n_critical=len(available[task].doc_ids) if task in available else 0)
        records = {label: _records(runs[label], task) for label in runs} if task in eval_tasks else {}
        if row.n_critical:
            g = available[task]
            correct = {label: _correct_by_doc(records[label], entry, task, g.doc_ids) for label in runs}
            row.n_correct_before = sum(correct["before"].values())
            row.n_correct_after = sum(correct["after"].values())
            row.acc_before_nominal = NOMINAL_ACC_BEFORE[role]
            row.acc_after = 100.0 * row.n_correct_after / row.n_critical
            row.delta_pp = intervention_delta(row.n_correct_after, row.n_critical, role)
            row.delta_measured_pp = 100.0 * (row.n_correct_after - row.n_correct_before) / row.n_critical
            row.flipped_docs = sorted(d for d in g.doc_ids if correct["before"][d] != correct["after"][d])
            prompts = _prompts_by_doc(records["before"], entry, task)
            row.prompt_mismatches = sum(1 for d, p in zip(g.doc_ids, g.prompts) if prompts.get(d) != p)
        if full_task:
            both = {label: _correct_by_doc(records[label], entry, task, None) for label in runs}
            row.n_docs = len(both["before"])
            row.full_acc_before = 100.0 * sum(both["before"].values()) / max(row.n_docs, 1)
            row.full_acc_after = 100.0 * sum(both["after"].values()) / max(len(both["after"]), 1)
        rows.append(row)

    settings = {
        "features": str(features) if isinstance(features, (str, os.PathLike)) else indices,
        "n_features": len(indices),
        "crosscoder": str(cc_dir),
        "model_name": model_name,
        "model": str(model_path),
        "role": role,
        "mode": mode,
        "value": value,
        "positions": positions,
        "critical": str(critical) if not isinstance(critical, Mapping) else None,
        "selection_tasks": selection_tasks if isinstance(selection_tasks, list) else None,
        "held_out_tasks": sorted(held_set),
        "full_task": full_task,
        "model_args": {k: v for k, v in base_args.items()},
        "apply_chat_template": apply_chat_template,
        "num_fewshot": num_fewshot,
        "delta": "100 * (acc_after - acc_before) in percentage points on G_t; acc_before = 100% (role rl) or 0% (role base)",
    }
    return InterventionEffects(rows, settings, runs)


def _check_intervention(cc, indices, *, mode, value, model_name, positions, reference) -> None:
    """Refuse a bad mode / value / positions before any lm-eval run (the intervention is built, not attached)."""
    from posttrain_probe.interventions.features import INTERVENTION_MODES, POSITIONS, FeatureIntervention

    if mode not in INTERVENTION_MODES:
        raise ProbeError(f"mode {mode!r} is not one of {', '.join(INTERVENTION_MODES)}")
    if positions not in POSITIONS:
        raise ProbeError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    if mode == "steer":
        if reference is None:
            raise ProbeError("mode steer needs reference (--reference DATASET): the corpus of each feature's max activation")
        return
    if reference is not None:
        raise ProbeError(f"reference is only used by mode steer (mode is {mode!r})")
    FeatureIntervention(cc, indices, mode=mode, value=value, model_name=model_name, positions=positions)


def _records(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    samples = (results or {}).get("samples") or {}
    if task not in samples:
        raise ProbeError(f"the lm-eval run logged no samples for task {task!r} (logged: {sorted(samples)})")
    return list(samples[task])


def _correct_by_doc(records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], task: str, doc_ids: Sequence[int] | None) -> dict[int, bool]:
    """doc id -> correct, scored exactly as ``posttrain-probe critical`` scores (the task's metric in
    critical.json > 0, on the records of its filter), for ``doc_ids`` (all documents if None)."""
    from posttrain_probe.eval.critical import is_correct, records_by_doc

    _, docs = records_by_doc(task, records, entry.get("filter"), "the lm-eval run")
    metric = entry.get("metric")
    if docs and metric not in next(iter(docs.values())):
        raise ProbeError(f"sample records of task {task!r} have no metric {metric!r} (the metric critical.json scored with)")
    out = {doc: is_correct(record, metric) for doc, record in docs.items()}
    if doc_ids is None:
        return out
    missing = [d for d in doc_ids if d not in out]
    if missing:
        raise ProbeError(f"the lm-eval run of task {task!r} has no samples for critical doc ids {missing[:10]}")
    return {d: out[d] for d in doc_ids}


def _prompts_by_doc(records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], task: str) -> dict[int, str]:
    """doc id -> the context lm-eval fed the model (first request of the record)."""
    from posttrain_probe.eval.critical import records_by_doc, record_context

    _, docs = records_by_doc(task, records, entry.get("filter"), "the lm-eval run")
    return {doc: record_context(record) for doc, record in docs.items()}
