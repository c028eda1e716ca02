"""lm-eval task configs shipped with posttrain-probe, and the loader their YAMLs name.

``posttrain-probe lm-eval`` and :func:`posttrain_probe.eval.runner.evaluate` add this folder to
lm-eval's task include path, so these tasks run offline on the tiny models of
:mod:`posttrain_probe.testing` (or on any model):

* ``probe_mcq`` (multiple_choice, metric ``acc``/``acc_norm``) -- 4-way lettered questions from
  :func:`posttrain_probe.synthetic.multiple_choice_dataset`: colours, made-up capitals, animal facts,
  largest/smallest number. The model scores the letters ``A``..``D`` after ``Answer:``.
* ``probe_math`` (generate_until, metric ``exact_match``) -- arithmetic problems from
  :func:`posttrain_probe.synthetic.arithmetic_dataset`; the answer is the content of the last
  ``\\boxed{...}`` of the generation, compared with the integer answer.

Their data are local JSONL files next to the YAMLs (``*_test.jsonl`` 200 rows, ``*_train.jsonl``
16 rows for few-shot examples), read through :func:`load_local_jsonl`. To evaluate your own
local files, copy a YAML, give it another ``task:`` name and point ``dataset_kwargs.data_files``
at your files (absolute paths, or paths relative to this folder).

The papers' evaluation suites live in the ``suites/`` subfolder (lm-eval indexes include paths
recursively): the groups in :data:`SUITES` (``paper_r``, ``paper_s``, ... ) and their ``pr_*`` / ``ps_*``
tasks over the public benchmarks' HF datasets (downloaded on first use, so they need a networked
machine); see :mod:`posttrain_probe.eval.tasks.suites` and docs/evaluation.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError

TASKS_DIR: Path = Path(__file__).resolve().parent
"""This folder: the directory to give lm-eval as an include path."""

LOCAL_TASKS: tuple[str, ...] = ("probe_mcq", "probe_math")
"""Names of the tasks defined here."""

SUITES: tuple[str, ...] = (
    "paper_r",
    "paper_r_in_domain",
    "paper_r_general_gen",
    "paper_r_general_ll",
    "paper_r_held_out_gen",
    "paper_r_held_out_ll",
    "paper_s",
    "paper_s_math",
    "paper_s_other_reasoning",
    "paper_s_general",
    "paper_s_non_reasoning",
    "ps_acpbench_mcq",
)
"""lm-eval groups of the papers' evaluation suites (``suites/``); ``paper_r`` is the study's default."""


def load_local_jsonl(data_files: dict[str, str | os.PathLike] | None = None, **_metadata: Any):
    """The ``custom_dataset`` of the shipped YAMLs: ``{split: path}`` JSONL files -> ``datasets.DatasetDict``.

    Relative paths are resolved against :data:`TASKS_DIR` (not the working directory), so the
    shipped tasks work from anywhere. lm-eval also passes the run's metadata (the model_args,
    the task's ``metadata:``) as keyword arguments; they are ignored. One row per document.
    """
    import datasets

    if not data_files:
        raise ProbeError("custom_dataset load_local_jsonl needs dataset_kwargs.data_files: {split: file.jsonl}")
    resolved = {}
    for split, path in dict(data_files).items():
        full = Path(path) if Path(path).is_absolute() else TASKS_DIR / path
        if not full.is_file():
            raise ProbeError(
                f"data file of split {split!r} not found: {full} (expected a JSONL file, one document per line)"
            )
        resolved[split] = str(full)
    return datasets.load_dataset("json", data_files=resolved)
