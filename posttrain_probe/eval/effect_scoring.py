"""Scoring the lm-eval runs of :func:`~posttrain_probe.eval.intervention_effects.intervene` on G_t (docs/methods.md
sec. 7, 11): per task, the :class:`~posttrain_probe.eval.effects.TaskEffect` of the feature set and the
:class:`~posttrain_probe.eval.effects.SetEffect` of every control set and single feature, from lm-eval's
per-document records, scored exactly as ``posttrain-probe critical`` scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.effects import NOMINAL_ACC_BEFORE, SetEffect, TaskEffect, intervention_delta
from posttrain_probe.eval.intervene_config import InterveneConfig


class CriticalTasks(NamedTuple):
    """The tasks of one ``intervene`` run, read from critical.json once."""

    order: list[str]
    """Requested tasks, in order (with and without G_t)."""
    used: list[str]
    """Tasks with G_t."""
    skipped: list[str]
    """Requested tasks without G_t."""
    g: dict[str, Any]
    """Task -> its :class:`~posttrain_probe.analysis.critical.TaskCritical` (the held-out half where split)."""
    entries: dict[str, Any]
    """Task -> its critical.json entry (for the scoring)."""
    split: dict[str, list[int]]
    """Task -> held-out doc ids of a split-half selection."""
    held_out: set[str]
    """Tasks flagged held out."""
    selection_tasks: list[str] | None
    """The tasks the feature set was selected on (its provenance), if recorded."""


def task_effects(
    config: InterveneConfig,
    task: str,
    tasks: CriticalTasks,
    runs: Mapping[str, Any],
    role: str,
    drawn,
    indices: Sequence[int],
):
    """(TaskEffect, control rows, per-feature rows) of one task from the lm-eval ``runs`` ({} when not evaluated)."""
    from posttrain_probe.analysis.controls import control_spread

    entry = tasks.entries.get(task, {})
    g = tasks.g.get(task)
    row = TaskEffect(
        task=task,
        held_out=task in tasks.held_out,
        n_critical=len(g.doc_ids) if g is not None else 0,
        held_out_half=task in tasks.split,
    )
    records = {label: _records(runs[label], task) for label in runs}
    controls, features = [], []
    if row.n_critical:
        correct = {label: _correct_by_doc(records[label], entry, task, g.doc_ids) for label in runs}
        row.n_correct_before = sum(correct["before"].values())
        row.acc_before_nominal = NOMINAL_ACC_BEFORE[role]
        after = _set_effect("set", task, indices, None, correct["before"], correct["after"], role)
        row.n_correct_after, row.acc_after, row.delta_pp = after.n_correct_after, after.acc_after, after.delta_pp
        row.delta_measured_pp, row.flipped_docs = after.delta_measured_pp, after.flipped_docs
        prompts = _prompts_by_doc(records["before"], entry, task)
        row.prompt_mismatches = sum(1 for d, p in zip(g.doc_ids, g.contexts) if prompts.get(d) != p)
        if drawn is not None:
            controls = [
                _set_effect(
                    "control", task, sorted(cset), seed, correct["before"], correct[f"control-seed{seed}"], role
                )
                for seed, cset in zip(drawn.seeds, drawn.sets)
            ]
            spread = control_spread(row.delta_pp, [c.delta_pp for c in controls])
            row.n_controls, row.controls_mean_pp, row.controls_std_pp = spread.n, spread.mean, spread.std
            row.controls_min_pp, row.controls_max_pp, row.outside_controls = spread.min, spread.max, spread.outside
        if config.per_feature:
            features = [
                _set_effect("feature", task, [k], None, correct["before"], correct[f"feature-{k}"], role)
                for k in indices
            ]
    if config.full_task:
        both = {label: _correct_by_doc(records[label], entry, task, None) for label in ("before", "after")}
        row.n_docs = len(both["before"])
        row.full_acc_before = 100.0 * sum(both["before"].values()) / max(row.n_docs, 1)
        row.full_acc_after = 100.0 * sum(both["after"].values()) / max(len(both["after"]), 1)
    return row, controls, features


def _set_effect(
    kind: str,
    task: str,
    features: Sequence[int],
    seed: int | None,
    before: Mapping[int, bool],
    after: Mapping[int, bool],
    role: str,
) -> SetEffect:
    """The counts and deltas of one run on G_t (``before``/``after``: doc id -> correct, same docs)."""
    n = len(after)
    right = sum(after.values())
    return SetEffect(
        kind=kind,
        task=task,
        features=list(features),
        seed=seed,
        n_critical=n,
        n_correct_after=right,
        acc_after=100.0 * right / n,
        delta_pp=intervention_delta(right, n, role),
        delta_measured_pp=100.0 * (right - sum(before.values())) / n,
        flipped_docs=sorted(d for d in after if before[d] != after[d]),
    )


def _records(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    samples = (results or {}).get("samples") or {}
    if task not in samples:
        raise ProbeError(f"the lm-eval run logged no samples for task {task!r} (logged: {sorted(samples)})")
    return list(samples[task])


def _correct_by_doc(
    records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], task: str, doc_ids: Sequence[int] | None
) -> dict[int, bool]:
    """doc id -> correct, scored exactly as ``posttrain-probe critical`` scores (the task's metric in
    critical.json > 0, on the records of its filter), for ``doc_ids`` (all documents if None)."""
    from posttrain_probe.analysis.sample_logs import is_correct, records_by_doc

    _, docs = records_by_doc(task, records, entry.get("filter"), "the lm-eval run")
    metric = entry.get("metric")
    if docs and metric not in next(iter(docs.values())):
        raise ProbeError(
            f"sample records of task {task!r} have no metric {metric!r} (the metric critical.json scored with)"
        )
    out = {doc: is_correct(record, metric) for doc, record in docs.items()}
    if doc_ids is None:
        return out
    missing = [d for d in doc_ids if d not in out]
    if missing:
        raise ProbeError(f"the lm-eval run of task {task!r} has no samples for critical doc ids {missing[:10]}")
    return {d: out[d] for d in doc_ids}


def _prompts_by_doc(records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], task: str) -> dict[int, str]:
    """doc id -> the context lm-eval fed the model (first request of the record)."""
    from posttrain_probe.analysis.sample_logs import record_context, records_by_doc

    _, docs = records_by_doc(task, records, entry.get("filter"), "the lm-eval run")
    return {doc: record_context(record) for doc, record in docs.items()}
