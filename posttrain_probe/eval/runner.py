"""Python API over ``lm_eval.simple_evaluate`` with the ``probe-hf`` model and the shipped tasks.

    from posttrain_probe.eval.runner import evaluate
    result = evaluate({"pretrained": "runs/rl", "crosscoder": "runs/cc", "features": "s.json",
                       "mode": "zero", "model_name": "rl"}, ["probe_mcq"], samples={"probe_mcq": [3, 7]})
    result["results"]["probe_mcq"]["acc,none"]; result["samples"]["probe_mcq"]  # per-document records
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval import PROBE_MODEL_NAME, register, task_include_paths

__all__ = ["evaluate", "load_probe_lm", "make_task_manager"]


def load_probe_lm(model_args: Mapping[str, Any], *, batch_size: int | str = 8, device: str = "cpu", max_batch_size: int | None = None):
    """A ``probe-hf`` lm-eval model (:class:`~posttrain_probe.eval.lm_eval_model.ProbeHFLM`) from
    ``model_args`` as in ``--model_args`` (``pretrained`` may also be a loaded
    ``PreTrainedModel``, with ``tokenizer`` then required). ``dtype`` defaults to float32 on the
    CPU. Its intervention is attached; call ``detach_intervention()`` when done with it."""
    cls = register()
    args = dict(model_args)
    if "pretrained" not in args:
        raise ProbeError("model_args needs pretrained= (a model directory, a hub name, or a loaded model)")
    if not isinstance(args["pretrained"], (str, os.PathLike)) and args.get("tokenizer") is None:
        raise ProbeError("model_args: a loaded model as pretrained= needs tokenizer= as well")
    if isinstance(args["pretrained"], os.PathLike):
        args["pretrained"] = str(args["pretrained"])
    if str(device).startswith("cpu"):
        args.setdefault("dtype", "float32")
    extra = {"batch_size": batch_size, "device": device, "max_batch_size": max_batch_size}
    return cls.create_from_arg_obj(args, extra)


def make_task_manager(
    tasks: Sequence[str] | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
):
    """An ``lm_eval.tasks.TaskManager`` over the shipped tasks, ``include_path`` and lm-eval's own
    tasks. When every name in ``tasks`` is a plain task of the shipped folder or ``include_path``,
    lm-eval's ~14k built-in task configs are not indexed (the same tasks resolve, in well under a
    second instead of seconds); otherwise, or with ``tasks=None``, the full index is built.
    ``metadata`` is passed on to the tasks (lm-eval's command passes the model_args)."""
    register()
    from lm_eval.tasks import TaskManager

    paths = task_include_paths(include_path)
    meta = dict(metadata or {})
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
        if all(task in local.all_subtasks for task in tasks):
            return local
    return TaskManager(include_path=paths, metadata=meta)


def _describe(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """model_args as recorded in lm-eval's results (objects replaced by their class name)."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>" for k, v in model_args.items()}


def evaluate(
    model_args: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    samples: Mapping[str, Sequence[int]] | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    log_samples: bool = True,
    output_path: str | os.PathLike | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    apply_chat_template: bool | str = False,
    gen_kwargs: Mapping[str, Any] | None = None,
    device: str = "cpu",
    num_fewshot: int | None = None,
    lm: Any = None,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` with the ``probe-hf`` model built from ``model_args``; returns the
    ``lm_eval.simple_evaluate`` result dict (``results``, ``configs``, ... and, with
    ``log_samples``, ``samples``: task -> per-document records as lm-eval holds them in memory:
    ``doc_id``, the metric values such as ``acc`` / ``exact_match``, ``arguments``, ``resps``).

    * ``model_args`` -- as ``--model_args`` of ``--model probe-hf`` (see
      :class:`~posttrain_probe.eval.lm_eval_model.ProbeHFLM`): ``pretrained`` plus optionally
      ``crosscoder``, ``features``, ``mode``, ``value``, ``model_name``, ``positions``, ``reference``.
    * ``tasks`` -- lm-eval task names (built-in ones, the shipped ``probe_mcq`` / ``probe_math``,
      or tasks under ``include_path``).
    * ``samples`` -- ``{task: [doc ids]}``: evaluate only these documents (e.g. G_t from
      :attr:`posttrain_probe.analysis.critical.CriticalSamples.doc_ids`); excludes ``limit``. Doc ids in
      the returned records are the original ones.
    * ``output_path`` -- also write lm-eval's ``results_*.json`` and ``samples_<task>_*.jsonl`` (as
      the ``lm_eval`` command does, under a model-named subfolder).
    * ``lm`` -- an already built probe-hf model (:func:`load_probe_lm`) to reuse instead of loading
      one from ``model_args`` (then only recorded); it is left attached.
    * ``task_manager`` -- an ``lm_eval.tasks.TaskManager`` to reuse across calls (see
      :func:`make_task_manager`); by default one is made per call (cheap when every task is a
      shipped or ``include_path`` task, several seconds when lm-eval's own tasks are indexed).

    The intervention of a model built here is detached afterwards, so a loaded ``PreTrainedModel``
    passed as ``pretrained`` comes back unhooked.
    """
    register()
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ProbeError("evaluate() needs at least one task name")
    if samples is not None and limit is not None:
        raise ProbeError("give either samples= (doc ids per task) or limit=, not both")
    if samples is not None:
        unknown = sorted(set(samples) - set(tasks))
        if unknown:
            raise ProbeError(f"samples= names tasks that are not evaluated: {unknown} (tasks: {tasks})")
        empty = sorted(t for t, ids in samples.items() if not list(ids))
        if empty:
            raise ProbeError(f"samples= has no doc ids for {empty}: drop those tasks or give ids")
        samples = {t: [int(i) for i in ids] for t, ids in samples.items()}
    own = lm is None
    if own:
        lm = load_probe_lm(model_args, batch_size=batch_size, device=device)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path is not None else None
    recorded = _describe(model_args)
    try:
        if task_manager is None:
            task_manager = make_task_manager(tasks, include_path, metadata=recorded)
        result = simple_evaluate(
            model=lm,
            model_args=recorded,
            tasks=tasks,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            samples=samples,
            log_samples=log_samples,
            evaluation_tracker=tracker,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=bool(apply_chat_template),
            gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
            task_manager=task_manager,
        )
    finally:
        if own:
            lm.detach_intervention()
    if result is None:  # pragma: no cover - non-zero ranks of a distributed run
        return {}
    result["config"]["model"] = PROBE_MODEL_NAME
    if tracker is not None:
        _write(tracker, result, log_samples)
    return result


def _write(tracker: Any, result: dict[str, Any], log_samples: bool) -> None:
    """Write results and per-task sample logs as the ``lm_eval`` command does (lm-eval rewrites
    the records it writes, so it gets copies and the returned records stay as in memory)."""
    payload = {k: v for k, v in result.items() if k != "samples"}
    samples = copy.deepcopy(result["samples"]) if log_samples else None
    tracker.save_results_aggregated(results=payload, samples=samples)
    if samples is not None:
        for task in result["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
