"""lm-eval integration: the ``probe-hf`` model (lm-eval's HF model with a crosscoder-feature
intervention), the shipped offline tasks, a Python API over ``lm_eval.simple_evaluate`` and the
generalization-critical samples of two runs (docs/methods.md sec. 6).

* :func:`register` -- make ``probe-hf`` known to lm-eval (idempotent; imports lm-eval).
* :func:`task_include_paths` -- lm-eval include paths: the shipped task folder plus the user's.
* :func:`posttrain_probe.eval.runner.lm_eval` -- the study's lm-eval step
  (:class:`~posttrain_probe.eval.lm_eval_config.LmEvalConfig` -> :class:`~posttrain_probe.eval.runner.LmEvalResult`);
  :func:`posttrain_probe.eval.runner.evaluate` -- run tasks (optionally a subset of documents)
  with or without an intervention, from Python, on in-memory objects.
* :func:`posttrain_probe.eval.intervention_effects.intervene` -- a feature intervention's effect on G_t
  (:class:`~posttrain_probe.eval.intervene_config.InterveneConfig` -> :class:`~posttrain_probe.eval.effects.InterventionEffects`).
* :func:`posttrain_probe.analysis.critical.critical_samples` -- G_t from lm-eval per-sample logs.

lm-eval (the ``[eval]`` extra) is imported only when one of these runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from posttrain_probe.errors import ProbeError

PROBE_MODEL_NAME = "probe-hf"
"""Name of the lm-eval model registered by :func:`register` (``--model probe-hf``)."""

__all__ = ["PROBE_MODEL_NAME", "register", "task_include_paths"]


def register() -> Any:
    """Register the lm-eval model ``probe-hf`` with lm-eval's ``@register_model``; returns its class.

    Idempotent (the registration happens once, when :mod:`posttrain_probe.eval.lm_eval_model`
    is first imported). Raises :class:`ProbeError` when lm-eval is not installed.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:  # pragma: no cover - lm-eval is part of the dev environment
        raise ProbeError("lm-eval is not installed: pip install 'posttrain-probe[eval]' (lm-eval==0.4.13)") from err
    from posttrain_probe.eval.lm_eval_model import ProbeHFLM

    return ProbeHFLM


def task_include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Include paths for lm-eval's ``TaskManager``: the shipped task folder
    (:data:`posttrain_probe.eval.tasks.TASKS_DIR`, tasks ``probe_mcq`` and ``probe_math``) first,
    then the user's folder(s), so a user task of the same name wins. Built-in lm-eval task names
    (openbookqa, arc_challenge, ...) are always available as well."""
    from posttrain_probe.eval.tasks import TASKS_DIR

    paths = [str(TASKS_DIR)]
    if include_path is None:
        extra: list[Any] = []
    elif isinstance(include_path, (str, os.PathLike)):
        extra = [include_path]
    else:
        extra = list(include_path)
    for path in extra:
        if str(path) not in paths:
            paths.append(str(path))
    return paths
