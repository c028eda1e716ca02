"""Generalization-critical samples (docs/methods.md sec. 6, paper R sec. 3.2): per task t,
G_t = the documents the base model answers wrong and the RL model answers right, from the
per-sample logs of two lm-eval runs over the same documents and prompts.

lm-eval writes one ``samples_<task>_<timestamp>.jsonl`` per task when run with
``--log_samples --output_path OUT`` (under ``OUT/<model name>/``). Correctness of a document is
the task's primary metric in its sample record (the first of its ``metrics``: ``acc`` for
multiple choice, ``exact_match`` for generation, ...), > 0 meaning correct.

Entry points: :func:`critical` (the step: ``critical(CriticalConfig(...))`` writes ``config.out``),
:func:`critical_samples` (G_t from two runs' logs), :func:`critical_from_records` (from records in memory)
and :meth:`CriticalSamples.read` (the one reader of the file).

File written by ``posttrain-probe critical`` (format ``posttrain-probe/critical-samples``, version 1)::

    {"format": "posttrain-probe/critical-samples", "format_version": 1,
     "base_samples": "<dir>", "rl_samples": "<dir>",
     "tasks": {"<task>": {"metric": "acc", "filter": "none", "n_docs": 100, "n_base_correct": 31,
                          "n_rl_correct": 52, "n_critical": 25, "doc_ids": [3, 7, ...],
                          "prompts": {"3": "<the exact context string lm-eval fed the model>", ...},
                          "request_type": "loglikelihood", "base_file": "...jsonl", "rl_file": "...jsonl"}},
     "no_critical": ["<tasks with |G_t| = 0>"]}

Every task of the runs is in ``tasks`` (with its counts, ``doc_ids`` empty when |G_t| = 0);
``no_critical`` lists those with no critical sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain_probe.analysis.sample_logs import (
    clip,
    find_sample_files,
    is_correct,
    read_sample_records,
    record_arguments,
    record_context,
    record_request_type,
    records_by_doc,
    task_metric,
)
from posttrain_probe.errors import ProbeError

if TYPE_CHECKING:
    from posttrain_probe.analysis.critical_config import CriticalConfig

CRITICAL_FORMAT = "posttrain-probe/critical-samples"
CRITICAL_FORMAT_VERSION = 1

__all__ = [
    "CRITICAL_FORMAT",
    "CriticalSamples",
    "TaskCritical",
    "critical",
    "critical_from_records",
    "critical_samples",
    "find_sample_files",
    "read_sample_records",
    "split_names",
]


@dataclasses.dataclass
class TaskCritical:
    """G_t of one task, with the counts behind it."""

    metric: str
    """Metric that decides correctness (value > 0 = correct)."""
    filter: str
    """lm-eval filter whose records were used (``none`` for tasks without a filter list)."""
    n_docs: int
    """Documents in both runs."""
    n_base_correct: int
    """Documents the base model answers right."""
    n_rl_correct: int
    """Documents the RL (tuned) model answers right."""
    doc_ids: list[int]
    """G_t: lm-eval doc ids (ascending) the base model gets wrong and the RL model right."""
    prompts: dict[int, str]
    """doc id -> the exact context string lm-eval fed the models (for the docs of G_t)."""
    request_type: str = "loglikelihood"
    """lm-eval request type of the task's documents: ``loglikelihood`` (multiple choice; lm-eval
    moves trailing whitespace of the context to the continuation before tokenising),
    ``generate_until`` (the context is the whole model input) or ``loglikelihood_rolling``."""
    base_file: str | None = None
    """Sample log of the base run this was read from (None for in-memory records)."""
    rl_file: str | None = None
    """Sample log of the RL run this was read from."""

    @property
    def n_critical(self) -> int:
        """|G_t|."""
        return len(self.doc_ids)

    @property
    def contexts(self) -> list[str]:
        """The prompts of G_t in the order of :attr:`doc_ids`."""
        return [self.prompts[d] for d in self.doc_ids]

    def subset(self, doc_ids: Sequence[int], task: str = "") -> TaskCritical:
        """This task's G_t restricted to ``doc_ids`` (a subset of its doc ids, in the given order; prompts kept in step)."""
        missing = [d for d in doc_ids if d not in self.prompts]
        if missing:
            raise ProbeError(f"task {task!r}: doc ids {missing[:10]} are not among its critical samples")
        return dataclasses.replace(self, doc_ids=list(doc_ids), prompts={d: self.prompts[d] for d in doc_ids})

    def to_json(self) -> dict[str, Any]:
        """The task's entry in the critical-samples JSON."""
        return {
            "metric": self.metric,
            "filter": self.filter,
            "n_docs": self.n_docs,
            "n_base_correct": self.n_base_correct,
            "n_rl_correct": self.n_rl_correct,
            "n_critical": self.n_critical,
            "doc_ids": list(self.doc_ids),
            "prompts": {str(d): self.prompts[d] for d in self.doc_ids},
            "request_type": self.request_type,
            "base_file": self.base_file,
            "rl_file": self.rl_file,
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], where: str) -> TaskCritical:
        """A task entry of the critical-samples JSON (``where`` names it in errors)."""
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        if missing:
            raise ProbeError(f"{where} lacks {missing}; write the file again with `posttrain-probe critical`")
        doc_ids = [int(d) for d in entry["doc_ids"]]
        prompts = {int(d): p for d, p in entry["prompts"].items()}
        lacking = [d for d in doc_ids if d not in prompts]
        if lacking:
            raise ProbeError(
                f"{where} lacks the prompts of doc ids {lacking[:10]}; expected a 'prompts' entry per doc id"
            )
        if int(entry["n_critical"]) != len(doc_ids):
            raise ProbeError(f"{where} has n_critical {entry['n_critical']} but {len(doc_ids)} doc_ids")
        return cls(
            metric=entry["metric"],
            filter=entry["filter"],
            n_docs=int(entry["n_docs"]),
            n_base_correct=int(entry["n_base_correct"]),
            n_rl_correct=int(entry["n_rl_correct"]),
            doc_ids=doc_ids,
            prompts=prompts,
            request_type=entry["request_type"],
            base_file=entry["base_file"],
            rl_file=entry["rl_file"],
        )


_ENTRY_KEYS = (
    "metric",
    "filter",
    "n_docs",
    "n_base_correct",
    "n_rl_correct",
    "n_critical",
    "doc_ids",
    "prompts",
    "request_type",
    "base_file",
    "rl_file",
)


@dataclasses.dataclass
class CriticalSamples:
    """G_t for every task of two runs (see the module docstring for the JSON form); the result of :func:`critical`."""

    base_samples: str
    """Where the base run's sample logs came from."""
    rl_samples: str
    """Where the RL run's sample logs came from."""
    tasks: dict[str, TaskCritical]
    """task -> its G_t (every task of the runs, also those with |G_t| = 0)."""

    @property
    def no_critical(self) -> list[str]:
        """Tasks with no critical sample (|G_t| = 0), sorted."""
        return sorted(t for t, c in self.tasks.items() if c.n_critical == 0)

    @property
    def doc_ids(self) -> dict[str, list[int]]:
        """task -> G_t doc ids, for tasks with |G_t| > 0 (the ``samples=`` of
        :func:`posttrain_probe.eval.runner.evaluate` and of lm-eval's ``--samples``)."""
        return {t: list(c.doc_ids) for t, c in sorted(self.tasks.items()) if c.n_critical}

    def choose_tasks(self, requested: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """``(tasks with critical samples to use, tasks skipped for having none)``, in the requested order.

        ``requested`` None: every task (file order, then the skipped ones sorted). A requested task the
        file does not know is refused.
        """
        if requested is None:
            return [t for t, c in self.tasks.items() if c.n_critical], self.no_critical
        wanted = split_names(requested)
        unknown = [t for t in wanted if t not in self.tasks]
        if unknown:
            raise ProbeError(f"tasks {unknown} are not in the critical-samples file; it has {sorted(self.tasks)}")
        return [t for t in wanted if self.tasks[t].n_critical], [t for t in wanted if not self.tasks[t].n_critical]

    def to_json(self) -> dict[str, Any]:
        """The critical-samples JSON object."""
        return {
            "format": CRITICAL_FORMAT,
            "format_version": CRITICAL_FORMAT_VERSION,
            "base_samples": self.base_samples,
            "rl_samples": self.rl_samples,
            "tasks": {t: c.to_json() for t, c in sorted(self.tasks.items())},
            "no_critical": self.no_critical,
        }

    def write(self, out: str | os.PathLike) -> Path:
        """Write the JSON to the file ``out`` (parent folders created); returns the path."""
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        tmp.replace(path)
        return path

    def write_doc_ids(self, path: str | os.PathLike) -> Path:
        """Write :attr:`doc_ids` as JSON (lm-eval's ``--samples FILE``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.doc_ids))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> CriticalSamples:
        """The critical-samples JSON written by :meth:`write` (``posttrain-probe critical``).

        Checked: ``format`` is :data:`CRITICAL_FORMAT`, ``format_version`` is :data:`CRITICAL_FORMAT_VERSION`,
        every task entry has every field, a prompt per doc id and ``n_critical`` = the number of doc ids.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read critical samples {path}: {err}") from err
        if (
            not isinstance(data, dict)
            or data.get("format") != CRITICAL_FORMAT
            or not isinstance(data.get("tasks"), dict)
        ):
            raise ProbeError(
                f"{path} is not a critical-samples JSON (expected format {CRITICAL_FORMAT!r} with a 'tasks' object; write it with `posttrain-probe critical`)"
            )
        version = data.get("format_version")
        if version != CRITICAL_FORMAT_VERSION:
            raise ProbeError(
                f"{path}: critical-samples format_version {version!r}, this posttrain-probe reads {CRITICAL_FORMAT_VERSION} (write it again with `posttrain-probe critical`, or upgrade posttrain-probe)"
            )
        tasks = {
            str(task): TaskCritical.from_json(entry, f"{path}: task {task!r}") for task, entry in data["tasks"].items()
        }
        return cls(base_samples=data["base_samples"], rl_samples=data["rl_samples"], tasks=tasks)


def split_names(values: Sequence[str] | str | None) -> list[str]:
    """Repeated and/or comma-separated names (``["a,b", "c"]`` or ``"a,b,c"``) -> ``["a", "b", "c"]``, order kept, no duplicates."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return list(dict.fromkeys(v.strip() for value in values for v in str(value).split(",") if v.strip()))


def _task_critical(
    task: str,
    base_records: Iterable[Mapping[str, Any]],
    rl_records: Iterable[Mapping[str, Any]],
    *,
    metric: str | None,
    filter_name: str | None,
    base_source: str,
    rl_source: str,
) -> TaskCritical:
    base_filter, base = records_by_doc(task, base_records, filter_name, base_source)
    rl_filter, rl = records_by_doc(task, rl_records, filter_name, rl_source)
    if base_filter != rl_filter:
        raise ProbeError(
            f"task {task!r}: the runs' first filters differ ({base_filter!r} vs {rl_filter!r}); choose one with --filter-name"
        )
    if set(base) != set(rl):
        only_base = sorted(set(base) - set(rl))
        only_rl = sorted(set(rl) - set(base))
        raise ProbeError(
            f"task {task!r}: the runs evaluated different documents (doc ids only in the base run: {only_base[:10]}, "
            f"only in the RL run: {only_rl[:10]}); run both with the same --limit/--samples"
        )
    first = base[min(base)]
    name = task_metric(task, first, metric, base_source)
    task_metric(task, rl[min(rl)], name, rl_source)
    doc_ids, prompts, n_base, n_rl = [], {}, 0, 0
    for doc_id in sorted(base):
        b, r = base[doc_id], rl[doc_id]
        if b.get("doc_hash") is not None and r.get("doc_hash") is not None and b["doc_hash"] != r["doc_hash"]:
            raise ProbeError(
                f"task {task!r} doc {doc_id}: the runs evaluated different documents under this id (doc_hash differs)"
            )
        b_args, r_args = record_arguments(b), record_arguments(r)
        if b_args != r_args:
            pair = next(((x, y) for x, y in zip(b_args, r_args) if x != y), (b_args, r_args))
            raise ProbeError(
                f"task {task!r} doc {doc_id}: the prompts differ between the runs (base: {clip(str(pair[0]))}, "
                f"RL: {clip(str(pair[1]))}); run both with the same few-shot, chat-template and generation settings"
            )
        base_ok, rl_ok = is_correct(b, name), is_correct(r, name)
        n_base += base_ok
        n_rl += rl_ok
        if rl_ok and not base_ok:
            doc_ids.append(doc_id)
            prompts[doc_id] = record_context(b)
    return TaskCritical(
        metric=name,
        filter=base_filter,
        n_docs=len(base),
        n_base_correct=n_base,
        n_rl_correct=n_rl,
        doc_ids=doc_ids,
        prompts=prompts,
        request_type=record_request_type(first),
    )


def _check_same_tasks(
    base_tasks: Iterable[str], rl_tasks: Iterable[str], base_source: str, rl_source: str
) -> list[str]:
    base_tasks, rl_tasks = set(base_tasks), set(rl_tasks)
    if base_tasks != rl_tasks:
        raise ProbeError(
            f"the runs have different tasks: only in {base_source}: {sorted(base_tasks - rl_tasks)}, "
            f"only in {rl_source}: {sorted(rl_tasks - base_tasks)}"
        )
    return sorted(base_tasks)


def critical_from_records(
    base: Mapping[str, Iterable[Mapping[str, Any]]],
    rl: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    metric: str | None = None,
    filter_name: str | None = None,
    base_source: str = "base run",
    rl_source: str = "RL run",
) -> CriticalSamples:
    """G_t from per-sample records held in memory: ``{task: [record, ...]}`` for each run (the
    ``"samples"`` of an lm-eval result, e.g. of :func:`posttrain_probe.eval.runner.evaluate`, or
    records read from the logs). ``metric`` / ``filter_name`` override the task's primary metric /
    first filter. Refuses runs whose tasks, doc ids or prompts differ (names the task and doc)."""
    tasks = _check_same_tasks(base, rl, base_source, rl_source)
    result = {
        task: _task_critical(
            task,
            base[task],
            rl[task],
            metric=metric,
            filter_name=filter_name,
            base_source=base_source,
            rl_source=rl_source,
        )
        for task in tasks
    }
    return CriticalSamples(base_samples=base_source, rl_samples=rl_source, tasks=result)


def critical_samples(
    base_dir: str | os.PathLike,
    rl_dir: str | os.PathLike,
    *,
    metric: str | None = None,
    filter_name: str | None = None,
) -> CriticalSamples:
    """G_t per task from the lm-eval sample logs of a base run (``base_dir``) and an RL run
    (``rl_dir``): each is lm-eval's ``--output_path`` (or a subfolder, or one sample file); the
    newest ``samples_<task>_*.jsonl`` per task is used and recorded (``base_file``/``rl_file``).

    Correct = the task's primary metric (first of the record's ``metrics``, or ``metric``) > 0, on
    the records of the first filter (or ``filter_name``). Refuses runs whose tasks, doc ids or
    prompts differ, naming the task and the doc. Tasks with |G_t| = 0 are kept and listed in
    :attr:`CriticalSamples.no_critical`.
    """
    base_files = find_sample_files(base_dir)
    rl_files = find_sample_files(rl_dir)
    tasks = _check_same_tasks(base_files, rl_files, str(base_dir), str(rl_dir))
    result = {}
    for task in tasks:
        b_file, r_file = base_files[task], rl_files[task]
        if b_file.resolve() == r_file.resolve():
            raise ProbeError(f"task {task!r}: --base-samples and --rl-samples resolve to the same file {b_file}")
        entry = _task_critical(
            task,
            read_sample_records(b_file),
            read_sample_records(r_file),
            metric=metric,
            filter_name=filter_name,
            base_source=str(b_file),
            rl_source=str(r_file),
        )
        entry.base_file, entry.rl_file = str(b_file), str(r_file)
        result[task] = entry
    return CriticalSamples(base_samples=str(base_dir), rl_samples=str(rl_dir), tasks=result)


def critical(config: CriticalConfig) -> CriticalSamples:
    """The step ``critical``: G_t per task from two lm-eval runs' sample logs (:func:`critical_samples`),
    written to ``config.out`` (and the doc ids to ``config.samples_out`` when given); returns them."""
    result = critical_samples(
        config.base_samples, config.rl_samples, metric=config.metric, filter_name=config.filter_name
    )
    result.write(config.out)
    if config.samples_out is not None:
        result.write_doc_ids(config.samples_out)
    return result
