"""Reading lm-eval's per-sample logs (``samples_<task>_<timestamp>.jsonl`` under ``--output_path``): the
files of a run, their records by document, the exact context a record's model was fed and whether it
was answered correctly. Torch-free; used by :mod:`posttrain_probe.analysis.critical` and the lm-eval steps."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError


def _task_and_stamp(name: str) -> tuple[str, str] | None:
    """``samples_<task>_<timestamp>.jsonl`` -> (task, timestamp); task names may contain '_'."""
    if not (name.startswith("samples_") and name.endswith(".jsonl")):
        return None
    stem = name[len("samples_") : -len(".jsonl")]
    task, sep, stamp = stem.rpartition("_")
    if not sep or not task:
        return None
    return task, stamp


def find_sample_files(path: str | os.PathLike) -> dict[str, Path]:
    """task -> newest ``samples_<task>_<timestamp>.jsonl`` under ``path`` (searched recursively,
    so lm-eval's ``--output_path`` or its model-named subfolder both work; a single sample file
    is accepted too). Newest = latest timestamp in the name, then latest modification time."""
    root = Path(path)
    if not root.exists():
        raise ProbeError(f"{path}: no such directory (expected lm-eval's --output_path of a run with --log_samples)")
    files = [root] if root.is_file() else sorted(root.rglob("samples_*.jsonl"))
    newest: dict[str, tuple[tuple[str, float], Path]] = {}
    for file in files:
        parsed = _task_and_stamp(file.name)
        if parsed is None:
            continue
        task, stamp = parsed
        key = (stamp, file.stat().st_mtime)
        if task not in newest or key > newest[task][0]:
            newest[task] = (key, file)
    if not newest:
        raise ProbeError(
            f"{path}: no lm-eval sample logs (samples_<task>_<timestamp>.jsonl); run lm-eval with --log_samples --output_path"
        )
    return {task: file for task, (_, file) in sorted(newest.items())}


def read_sample_records(file: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-sample records of one lm-eval sample log (one JSON object per line)."""
    records = []
    with open(file, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ProbeError(f"{file}:{line_no}: not a JSON line ({err.msg})") from None
    return records


def record_arguments(record: Mapping[str, Any]) -> list[list[Any]]:
    """Request arguments of a record as ``[[context, continuation-or-gen_kwargs], ...]``: lm-eval
    keeps tuples in memory and ``{"gen_args_i": {"arg_j": ...}}`` in the written logs."""
    args = record.get("arguments")
    if isinstance(args, Mapping):
        ordered = sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))
        return [[a[k] for k in sorted(a, key=lambda k: int(k.rsplit("_", 1)[-1]))] for _, a in ordered]
    if isinstance(args, (list, tuple)):
        return [list(a) for a in args]
    raise ProbeError(f"sample record of doc {record.get('doc_id')!r} has no request arguments")


def record_request_type(record: Mapping[str, Any]) -> str:
    """The lm-eval request type of a sample record: ``loglikelihood``, ``loglikelihood_rolling`` or ``generate_until``."""
    args = record_arguments(record)[0]
    if len(args) == 1:
        return "loglikelihood_rolling"
    return "generate_until" if isinstance(args[1], Mapping) else "loglikelihood"


def record_context(record: Mapping[str, Any]) -> str:
    """The context string lm-eval fed the model for this sample record (its first request's first argument)."""
    args = record_arguments(record)
    if not args or not isinstance(args[0][0], str):
        raise ProbeError(
            f"sample record of doc {record.get('doc_id')!r}: expected a context string as its first argument"
        )
    return args[0][0]


def records_by_doc(
    task: str, records: Iterable[Mapping[str, Any]], filter_name: str | None, source: str
) -> tuple[str, dict[int, Mapping[str, Any]]]:
    """(filter used, doc id -> record) for one task of one run."""
    records = list(records)
    if not records:
        raise ProbeError(f"{source}: task {task!r} has no sample records")
    filters = list(dict.fromkeys(str(r.get("filter", "none")) for r in records))
    chosen = filters[0] if filter_name is None else filter_name
    if chosen not in filters:
        raise ProbeError(f"{source}: task {task!r} has no records of filter {chosen!r} (filters: {', '.join(filters)})")
    docs: dict[int, Mapping[str, Any]] = {}
    for record in records:
        if str(record.get("filter", "none")) != chosen:
            continue
        if "doc_id" not in record:
            raise ProbeError(f"{source}: a sample record of task {task!r} has no doc_id (not an lm-eval sample log?)")
        doc_id = int(record["doc_id"])
        if doc_id in docs:
            raise ProbeError(f"{source}: task {task!r} doc {doc_id} appears twice (two runs appended to one log?)")
        docs[doc_id] = record
    return chosen, docs


def task_metric(task: str, record: Mapping[str, Any], metric: str | None, source: str) -> str:
    """The metric deciding correctness: ``metric`` or the task's primary one (first of the record's ``metrics``);
    ProbeError naming ``source`` when the records do not have it."""
    names = record.get("metrics") or []
    name = metric if metric is not None else (names[0] if names else None)
    if name is None or name not in record:
        raise ProbeError(
            f"{source}: task {task!r} records have no metric {name!r} (metrics: {', '.join(map(str, names)) or 'none'})"
        )
    return name


def is_correct(record: Mapping[str, Any], metric: str) -> bool:
    """Whether a sample record counts as answered correctly: its ``metric`` value > 0 (max over per-request values)."""
    value = record[metric]
    if isinstance(value, (list, tuple)):  # some metrics log per-request values
        value = max(value) if value else 0
    return float(value) > 0


def clip(text: str, n: int = 80) -> str:
    """``repr`` of the last ``n`` characters of ``text`` (for error messages about long prompts)."""
    return repr(text if len(text) <= n else "..." + text[-n:])
