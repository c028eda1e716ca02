"""Python API over ``lm_eval.simple_evaluate`` with the ``probe-hf`` model and the shipped tasks.

The study's step (:class:`~posttrain_probe.eval.lm_eval_config.LmEvalConfig` -> :class:`LmEvalResult`)::

    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import lm_eval
    result = lm_eval(LmEvalConfig(model_args="pretrained=runs/rl", tasks=["probe_mcq"], out="runs/eval/rl-zero",
                                  crosscoder="runs/cc", features="s.json", mode="zero", model_name="rl"))
    result.results["probe_mcq"]["acc,none"]; result.sample_files["probe_mcq"]  # per-document log

and the function below it, for in-memory use (lm-eval's result dict; ``model_args`` may be a mapping holding
probe-hf's intervention keys or loaded objects; a loaded model as ``lm=``, a shared task manager)::

    from posttrain_probe.eval.runner import evaluate
    result = evaluate(LmEvalConfig(model_args={"pretrained": "runs/rl", "crosscoder": "runs/cc", "features": "s.json",
                                               "mode": "zero", "model_name": "rl"},
                                   tasks=["probe_mcq"], samples={"probe_mcq": [3, 7]}))
    result["results"]["probe_mcq"]["acc,none"]; result["samples"]["probe_mcq"]  # per-document records
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval import PROBE_MODEL_NAME, register, task_include_paths
from posttrain_probe.eval.lm_eval_config import LmEvalConfig

__all__ = ["LmEvalResult", "check_task_names", "evaluate", "lm_eval", "load_probe_lm", "make_task_manager"]

LM_EVAL_RESULT_FORMAT = "posttrain-probe/lm-eval"
logger = logging.getLogger(__name__)


@dataclass
class LmEvalResult:
    """Result of :func:`lm_eval`: lm-eval's metrics per task and where its logs are."""

    results: dict[str, dict[str, Any]]
    """Task -> lm-eval's metrics (``acc,none``, ``exact_match,strict-match``, ...)."""
    model_args: dict[str, Any]
    """The model_args of the run (the resolved feature set as ``features``)."""
    results_file: str | None = None
    """lm-eval's ``results_<date>.json`` (None without ``out``)."""
    sample_files: dict[str, str] = field(default_factory=dict)
    """Task -> lm-eval's per-sample log ``samples_<task>_<date>.jsonl`` (with ``out`` and ``log_samples``)."""
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    """Task -> per-document records as lm-eval holds them in memory (not written, not read back)."""
    model: str = PROBE_MODEL_NAME
    """The lm-eval model that ran (``probe-hf`` or ``vllm``, :meth:`LmEvalConfig.chosen_model`)."""
    model_reason: str = ""
    """Why that model (one line)."""

    def write(self, out: str | os.PathLike) -> dict[str, str]:
        """Write ``lm_eval.json`` (metrics, model_args, the log files) to ``out``; returns its path."""
        path = Path(out) / "lm_eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": LM_EVAL_RESULT_FORMAT,
            "format_version": 1,
            "results": self.results,
            "model_args": self.model_args,
            "results_file": self.results_file,
            "sample_files": self.sample_files,
            "model": self.model,
            "model_reason": self.model_reason,
        }
        path.write_text(json.dumps(data, indent=2, default=str))
        return {"json": str(path)}

    @classmethod
    def read(cls, out: str | os.PathLike) -> LmEvalResult:
        """The result :meth:`write` wrote to ``out`` (without the in-memory ``samples``)."""
        path = Path(out) / "lm_eval.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read {path}: {err}") from err
        if data.get("format") != LM_EVAL_RESULT_FORMAT:
            raise ProbeError(f"{path} is not a {LM_EVAL_RESULT_FORMAT} file")
        return cls(
            data["results"],
            data["model_args"],
            data.get("results_file"),
            dict(data.get("sample_files") or {}),
            model=data.get("model", PROBE_MODEL_NAME),
            model_reason=data.get("model_reason", ""),
        )


def lm_eval(config: LmEvalConfig) -> LmEvalResult:
    """Run lm-eval ``config.tasks`` with ``probe-hf`` (docs/methods.md sec. 6-7): the intervention arguments are
    checked and the feature set resolved once (:func:`~posttrain_probe.eval.lm_eval_model.check_intervention_args`),
    the resolved indices go to the model. With ``config.out``, lm-eval's results and sample logs are written there
    (as the ``lm_eval`` command writes them) and ``lm_eval.json`` beside them. ``config.model`` picks lm-eval's
    ``vllm`` model instead for runs without an intervention (:meth:`LmEvalConfig.chosen_model`); the choice and its
    reason are logged and recorded in the result."""
    model, reason = config.chosen_model()
    logger.info("lm-eval model: %s (%s)", model, reason)
    model_args = _probe_model_args(config) if model == PROBE_MODEL_NAME else _vllm_model_args(config)
    raw = _evaluate(config, model_args, model=model)
    files = raw.pop("written_files", {})
    result = LmEvalResult(
        dict(raw.get("results", {})),
        _describe(model_args),
        files.get("results"),
        dict(files.get("samples", {})),
        dict(raw.get("samples") or {}),
        model=model,
        model_reason=reason,
    )
    if config.out is not None:
        result.write(config.out)
    return result


def _probe_model_args(config: LmEvalConfig) -> dict[str, Any]:
    """``config.model_args`` as a dict, plus, with ``config.crosscoder``, the checked intervention (the feature set
    resolved to indices)."""
    from posttrain_probe.eval.intervene_config import parse_model_args
    from posttrain_probe.eval.lm_eval_model import check_intervention_args

    model_args = parse_model_args(config.model_args, "model_args")
    if config.crosscoder is None:
        return model_args
    spec = check_intervention_args(
        crosscoder=config.crosscoder,
        features=config.features,
        mode=config.mode,
        value=config.value,
        model_name=config.model_name,
        positions=config.positions,
        reference=config.reference,
        allow_model_mismatch=config.allow_model_mismatch or None,
    )
    model_args.update(
        crosscoder=str(config.crosscoder), features=spec.features_arg, mode=spec.mode, positions=spec.positions
    )
    model_args.update(
        {
            k: v
            for k, v in (("value", config.value), ("model_name", spec.model_name), ("reference", spec.reference))
            if v is not None
        }
    )
    if config.allow_model_mismatch:
        model_args["allow_model_mismatch"] = True
    return model_args


def _vllm_model_args(config: LmEvalConfig) -> dict[str, Any]:
    """model_args of lm-eval's ``vllm`` model: ``config.model_args`` plus ``config.vllm_args``."""
    from posttrain_probe.eval.intervene_config import parse_model_args

    model_args = parse_model_args(config.model_args, "model_args")
    if config.vllm_args:
        model_args.update(parse_model_args(config.vllm_args, "vllm_args"))
    if not isinstance(model_args.get("pretrained"), str):
        raise ProbeError(
            "model=vllm needs pretrained= as a model directory or hub name (vLLM loads the weights itself), "
            f"got {model_args.get('pretrained')!r}"
        )
    return model_args


def load_probe_lm(
    model_args: Mapping[str, Any], *, batch_size: int | str = 8, device: str = "cpu", max_batch_size: int | None = None
):
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


def check_task_names(tasks: Sequence[str], task_manager: Any) -> None:
    """One-line :class:`ProbeError` for the first name in ``tasks`` that ``task_manager`` (lm-eval's ``TaskManager``)
    knows as no task, group or tag, with the closest known names."""
    import difflib

    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ProbeError(
                f"unknown lm-eval task {name!r}{hint}: expected a task, group or tag of lm-eval or of the shipped "
                "suites (docs/evaluation.md; `posttrain-probe lm-eval ls tasks` lists them)"
            )


def _describe(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """model_args as recorded in lm-eval's results (objects replaced by their class name)."""
    return {
        k: v if isinstance(v, (str, int, float, bool, type(None))) else f"<{type(v).__name__}>"
        for k, v in model_args.items()
    }


def evaluate(
    config: LmEvalConfig, *, lm: Any = None, task_manager: Any = None, gen_kwargs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run lm-eval ``config.tasks`` with the ``probe-hf`` model built from ``config.model_args`` (with
    ``config.crosscoder``, the intervention checked and resolved as :func:`lm_eval` does); returns the
    ``lm_eval.simple_evaluate`` result dict (``results``, ``configs``, ... and, with ``log_samples``,
    ``samples``: task -> per-document records as lm-eval holds them in memory: ``doc_id``, the metric values
    such as ``acc`` / ``exact_match``, ``arguments``, ``resps``); :func:`lm_eval` returns the typed result and writes
    ``lm_eval.json`` too.

    * ``config.model_args`` -- as ``--model_args`` of ``--model probe-hf`` (see
      :class:`~posttrain_probe.eval.lm_eval_model.ProbeHFLM`), a ``k=v`` string or a mapping (which may hold
      ``crosscoder``, ``features``, ``mode``, ``value``, ``model_name``, ``positions``, ``reference`` directly,
      and a loaded ``PreTrainedModel`` as ``pretrained`` with ``tokenizer``).
    * ``config.tasks`` -- lm-eval task names (built-in ones, the shipped ``probe_mcq`` / ``probe_math``,
      or tasks under ``include_path``).
    * ``config.samples`` -- ``{task: [doc ids]}`` (or its JSON): evaluate only these documents (e.g. G_t from
      :attr:`posttrain_probe.analysis.critical.CriticalSamples.doc_ids`); excludes ``limit``. Doc ids in
      the returned records are the original ones.
    * ``config.out`` -- also write lm-eval's ``results_*.json`` and ``samples_<task>_*.jsonl`` (as
      the ``lm_eval`` command does, under a model-named subfolder).
    * ``lm`` -- an already built probe-hf model (:func:`load_probe_lm`) to reuse instead of loading
      one from ``model_args`` (then only recorded); it is left attached.
    * ``task_manager`` -- an ``lm_eval.tasks.TaskManager`` to reuse across calls (see
      :func:`make_task_manager`); by default one is made per call (cheap when every task is a
      shipped or ``include_path`` task, several seconds when lm-eval's own tasks are indexed).
    * ``gen_kwargs`` -- generation arguments of generate-until tasks, as lm-eval's ``--gen_kwargs``.

    The intervention of a model built here is detached afterwards, so a loaded ``PreTrainedModel``
    passed as ``pretrained`` comes back unhooked. ``config.model`` = ``vllm`` (or ``auto`` on a GPU machine with
    vllm) runs lm-eval's vLLM model instead, unless ``lm`` is given.
    """
    model = PROBE_MODEL_NAME if lm is not None else config.chosen_model()[0]
    model_args = _probe_model_args(config) if model == PROBE_MODEL_NAME else _vllm_model_args(config)
    return _evaluate(config, model_args, lm=lm, task_manager=task_manager, gen_kwargs=gen_kwargs, model=model)


def _evaluate(
    config: LmEvalConfig,
    model_args: Mapping[str, Any],
    *,
    lm: Any = None,
    task_manager: Any = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    model: str = PROBE_MODEL_NAME,
) -> dict[str, Any]:
    """:func:`evaluate` with the model_args already resolved; ``model="vllm"`` runs lm-eval's vLLM model instead of
    probe-hf (``lm`` then unused)."""
    register()
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tasks = list(config.tasks)
    samples = config.doc_ids
    if samples is not None:
        unknown = sorted(set(samples) - set(tasks))
        if unknown:
            raise ProbeError(f"samples= names tasks that are not evaluated: {unknown} (tasks: {tasks})")
        empty = sorted(t for t, ids in samples.items() if not list(ids))
        if empty:
            raise ProbeError(f"samples= has no doc ids for {empty}: drop those tasks or give ids")
    batch_size, device = config.lm_eval_batch_size, config.device
    recorded = _describe(model_args)
    if task_manager is None:
        task_manager = make_task_manager(tasks, config.include_path or None, metadata=recorded)
    check_task_names(tasks, task_manager)  # before any model is loaded
    own = lm is None and model == PROBE_MODEL_NAME
    if own:
        lm = load_probe_lm(model_args, batch_size=batch_size, device=device)
    elif model != PROBE_MODEL_NAME:
        lm = model  # lm-eval builds its vllm model from the registry and model_args
    tracker = EvaluationTracker(output_path=str(config.out)) if config.out is not None else None
    try:
        result = simple_evaluate(
            model=lm,
            model_args=recorded,
            tasks=tasks,
            num_fewshot=config.num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=config.lm_eval_limit,
            samples=samples,
            log_samples=config.log_samples,
            evaluation_tracker=tracker,
            apply_chat_template=config.apply_chat_template,
            fewshot_as_multiturn=bool(config.apply_chat_template),
            gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
            task_manager=task_manager,
            confirm_run_unsafe_code=config.confirm_run_unsafe_code,
        )
    finally:
        if own:
            lm.detach_intervention()
    if result is None:  # pragma: no cover - non-zero ranks of a distributed run
        return {}
    result["config"]["model"] = model
    if tracker is not None:
        result["written_files"] = _write(tracker, result, config.log_samples)
    return result


def _write(tracker: Any, result: dict[str, Any], log_samples: bool) -> dict[str, Any]:
    """Write results and per-task sample logs as the ``lm_eval`` command does (lm-eval rewrites
    the records it writes, so it gets copies and the returned records stay as in memory); returns
    ``{"results": results file, "samples": {task: sample log}}``."""
    payload = {k: v for k, v in result.items() if k != "samples"}
    samples = copy.deepcopy(result["samples"]) if log_samples else None
    tracker.save_results_aggregated(results=payload, samples=samples)
    folder = Path(tracker.output_path) / str(tracker.general_config_tracker.model_name_sanitized)
    files: dict[str, Any] = {"results": str(folder / f"results_{tracker.date_id}.json"), "samples": {}}
    if samples is not None:
        for task in result["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
            files["samples"][task] = str(folder / f"samples_{task}_{tracker.date_id}.jsonl")
    return files
