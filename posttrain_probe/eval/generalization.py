"""The step ``features generalization`` (docs/methods.md sec. 6; paper R sec. 3.2 eq. 11, sec. 7, fig. 4):
generalization-controlling features of a base-vs-RL crosscoder.

:func:`features_generalization` reads G_t and its exact lm-eval prompts (:meth:`CriticalSamples.read`),
runs both models to the crosscoder's site on the prompts (:mod:`posttrain_probe.eval.prompts`), encodes
each model with its own branch and applies the formulas of :mod:`posttrain_probe.analysis.generalization`;
the result (:class:`GeneralizationFeatures`) writes ``generalization.json``, ``scores.csv``,
``overlap.png``/``.svg``, the feature-set JSON of S with its provenance and one per S_t, and reads back
from them. ``posttrain-probe features generalization`` is its CLI.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain_probe.analysis.critical import CriticalSamples, TaskCritical
from posttrain_probe.analysis.generalization import (
    DEFAULT_THRESHOLD,
    generalization_scores,
    half_split,
    intersect_feature_sets,
    overlap_definition,
    overlap_matrix,
    plot_feature_overlap,
    select_features,
)
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.generalization_config import GeneralizationConfig
from posttrain_probe.eval.prompts import last_prompt_activations, lm_eval_context_ids

RESULT_FORMAT = "posttrain-probe/generalization-features"
FEATURE_SET_NAME = "generalization_features.json"
"""File name of the feature set S written by :meth:`GeneralizationFeatures.write`."""
SUMMARY_NAME = "generalization.json"
SCORES_NAME = "scores.csv"


@dataclass
class GeneralizationFeatures:
    """Result of :func:`features_generalization`."""

    tasks: list[str]
    """Tasks scored (those with critical samples), in order; rows of ``scores``."""
    skipped: list[str]
    """Tasks left out because they have no generalization-critical sample."""
    n_critical: dict[str, int]
    """|G_t| per scored task (of its selection half with ``split_half``: the samples scored)."""
    scores: torch.Tensor
    """[T, F] float64 Score_k^t (code units)."""
    sets: dict[str, list[int]]
    """S_t per scored task (sorted indices)."""
    intersection: list[int]
    """S: features in every S_t."""
    threshold: float = DEFAULT_THRESHOLD
    """The fraction of the per-task maximum."""
    normalize: str = "row"
    """Denominator of the overlap matrix (:func:`overlap_matrix`)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Provenance: crosscoder, fingerprint, models, branches, critical file, layer, tokenisation."""
    crosscoder: Any = field(default=None, repr=False)
    """The crosscoder object the indices refer to (its fingerprint goes into the feature sets)."""

    @property
    def overlap(self) -> np.ndarray:
        """[T, T] :func:`overlap_matrix` of the S_t (NaN where a set is empty)."""
        return overlap_matrix([self.sets[t] for t in self.tasks], self.normalize)

    @property
    def max_scores(self) -> dict[str, float]:
        """max_k Score_k^t per task (code units)."""
        return {t: float(torch.nan_to_num(self.scores[i], nan=-math.inf).max()) for i, t in enumerate(self.tasks)}

    @property
    def notes(self) -> list[str]:
        """Plain-language remarks: skipped tasks, tasks whose maximum score is <= 0, an empty S."""
        notes = []
        if self.skipped:
            notes.append(
                f"tasks without generalization-critical samples were skipped: {', '.join(self.skipped)}; S is the intersection over {', '.join(self.tasks)}"
            )
        for task, top in self.max_scores.items():
            if not top > 0:
                notes.append(
                    f"task {task}: the maximum score is {top:.4g} <= 0 (no feature is more active in the RL model on G_t), so S_t is empty"
                )
        if not self.intersection:
            notes.append("the intersection S is empty")
        split = self.settings.get("split_half")
        if split:
            notes.append(
                f"features selected on one half of each G_t (split seed {split['seed']}); intervene evaluates them on the held-out half"
            )
        return notes

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: per-task |G_t|, max score, threshold, |S_t| and S_t; S; overlap; notes."""
        tops = self.max_scores
        per_task = {
            t: {
                "n_critical": self.n_critical[t],
                "max_score": tops[t],
                "threshold_value": self.threshold * tops[t] if tops[t] > 0 else None,
                "n_selected": len(self.sets[t]),
                "features": self.sets[t],
            }
            for t in self.tasks
        }
        split = self.settings.get("split_half")
        if split:
            for t in self.tasks:
                per_task[t]["n_held_out"] = len(split["held_out_doc_ids"][t])
        return json_safe(
            {
                "format": RESULT_FORMAT,
                "format_version": 1,
                "settings": self.settings,
                "threshold_fraction": self.threshold,
                "tasks": per_task,
                "skipped_tasks": self.skipped,
                "intersection": {
                    "n_features": len(self.intersection),
                    "features": self.intersection,
                    "over_tasks": self.tasks,
                },
                "overlap": {
                    "definition": overlap_definition(self.normalize),
                    "normalize": self.normalize,
                    "tasks": self.tasks,
                    "matrix": self.overlap.tolist(),
                },
                "notes": self.notes,
            }
        )

    def provenance(self) -> dict[str, Any]:
        """Provenance written into the feature-set JSON of S."""
        return json_safe(
            {
                "method": "generalization features, paper R sec. 3.2 eq. 11 / docs/methods.md sec. 6 (last prompt token, per-source codes)",
                **{k: v for k, v in self.settings.items() if k != "crosscoder"},
                "tasks": self.tasks,
                "skipped_tasks": self.skipped,
                "threshold_fraction": self.threshold,
                "n_critical": self.n_critical,
                "set_sizes": {t: len(self.sets[t]) for t in self.tasks},
                "intersection_size": len(self.intersection),
            }
        )

    def write(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write the outputs into ``out_dir``; returns the paths.

        - ``generalization_features.json``: the feature set S with provenance (feature-set format,
          bound to the crosscoder by its fingerprint);
        - ``feature_sets/<task>.json``: each S_t in the same format;
        - ``generalization.json``: :meth:`summary` plus the file list;
        - ``scores.csv``: one row per feature: ``score_<task>`` and ``in_<task>`` per task, ``in_intersection``;
        - ``overlap.png`` / ``overlap.svg``: :func:`plot_feature_overlap` (when there are >= 1 tasks).
        """
        from posttrain_probe.analysis.feature_sets import write_feature_set

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bound = {
            "crosscoder": self.crosscoder if self.crosscoder is not None else self.settings.get("crosscoder"),
            "crosscoder_path": self.settings.get("crosscoder"),
        }
        files: dict[str, Any] = {}
        files["feature_set"] = str(
            write_feature_set(out / FEATURE_SET_NAME, self.intersection, **bound, **self.provenance())
        )
        files["task_feature_sets"] = {}
        for task in self.tasks:
            path = out / "feature_sets" / f"{_safe_name(task)}.json"
            write_feature_set(
                path,
                self.sets[task],
                **bound,
                **{**self.provenance(), "task": task, "selection": "S_t of this task only"},
            )
            files["task_feature_sets"][task] = str(path)
        files["scores"] = str(self._write_scores(out / SCORES_NAME))
        sizes = [len(self.sets[t]) for t in self.tasks]
        files["figures"] = [
            str(p)
            for p in plot_feature_overlap(
                self.overlap, self.tasks, out / "overlap", normalize=self.normalize, sizes=sizes
            )
        ]
        (out / SUMMARY_NAME).write_text(json.dumps({**self.summary(), "files": files}, indent=2))
        files["summary"] = str(out / SUMMARY_NAME)
        return files

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> GeneralizationFeatures:
        """The result :meth:`write` wrote into ``out_dir`` (``generalization.json`` and ``scores.csv``;
        :attr:`crosscoder` is None: the feature sets name it by path and fingerprint)."""
        import pyarrow.csv

        out = Path(out_dir)
        try:
            summary = json.loads((out / SUMMARY_NAME).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(
                f"cannot read {out / SUMMARY_NAME}: {err} (expected the output of `posttrain-probe features generalization`)"
            ) from err
        if summary.get("format") != RESULT_FORMAT or summary.get("format_version") != 1:
            raise ProbeError(
                f"{out / SUMMARY_NAME} is not a generalization-features summary (expected format {RESULT_FORMAT!r}, version 1)"
            )
        tasks = list(summary["intersection"]["over_tasks"])
        table = pyarrow.csv.read_csv(out / SCORES_NAME)
        scores = torch.tensor(np.stack([table.column(f"score_{t}").to_numpy() for t in tasks]), dtype=torch.float64)
        per_task = summary["tasks"]
        return cls(
            tasks=tasks,
            skipped=list(summary["skipped_tasks"]),
            n_critical={t: int(per_task[t]["n_critical"]) for t in tasks},
            scores=scores,
            sets={t: [int(k) for k in per_task[t]["features"]] for t in tasks},
            intersection=[int(k) for k in summary["intersection"]["features"]],
            threshold=float(summary["threshold_fraction"]),
            normalize=summary["overlap"]["normalize"],
            settings=summary["settings"],
        )

    def _write_scores(self, path: Path) -> Path:
        import pyarrow as pa

        from posttrain_probe.analysis.features import write_table

        n_features = self.scores.shape[1]
        columns: dict[str, Any] = {"feature": pa.array(np.arange(n_features, dtype=np.int64))}
        for i, task in enumerate(self.tasks):
            member = np.zeros(n_features, dtype=bool)
            member[np.asarray(self.sets[task], dtype=np.int64)] = True
            columns[f"score_{task}"] = pa.array(self.scores[i].numpy(), pa.float64())
            columns[f"in_{task}"] = pa.array(member, pa.bool_())
        both = np.zeros(n_features, dtype=bool)
        both[np.asarray(self.intersection, dtype=np.int64)] = True
        columns["in_intersection"] = pa.array(both, pa.bool_())
        return write_table(pa.table(columns), path)


def _safe_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task) or "task"


def features_generalization(
    config: GeneralizationConfig,
    *,
    models: Mapping[str, tuple[nn.Module, Any]] | None = None,
    crosscoder=None,
    progress: bool = False,
) -> GeneralizationFeatures:
    """The step ``features generalization`` (docs/methods.md sec. 6, paper R sec. 3.2/7): Score_k^t of every feature
    at the last prompt token of each task's G_t, S_t, their intersection S and overlap; written to ``config.out``.

    Args:
        config: the settings (:class:`GeneralizationConfig`).
        models: loaded models instead of ``config.model``: branch name -> ``(HF causal LM, its tokenizer)``
            for ``config.base`` and ``config.rl``.
        crosscoder: a loaded :class:`~posttrain_probe.crosscoder.Crosscoder` instead of ``config.crosscoder``.
        progress: progress bars over the prompt batches.

    Returns:
        :class:`GeneralizationFeatures` (already written to ``config.out``).
    """
    from posttrain_probe.crosscoder.inspect import as_crosscoder
    from posttrain_probe.models import resolve_device

    critical = CriticalSamples.read(config.critical)
    used, skipped = critical.choose_tasks(config.tasks or None)
    if not used:
        raise ProbeError(
            f"no task has generalization-critical samples (tasks without any: {skipped or critical.no_critical}); nothing to score"
        )
    if crosscoder is None and config.crosscoder is None:
        raise ProbeError("no crosscoder: give --crosscoder DIR (or, in Python, crosscoder= a loaded Crosscoder)")
    cc, cc_dir = as_crosscoder(
        crosscoder if crosscoder is not None else config.crosscoder, allow_incomplete=config.allow_incomplete
    )
    branches = (config.base, config.rl)
    slots = {name: cc.model_index(name) for name in branches}
    sources = _model_sources(config, models)
    layer = cc.site(what="features generalization")
    if layer is None:
        raise ProbeError(
            "the crosscoder does not record its layer (config.layer); expected a crosscoder trained by posttrain-probe at a known site"
        )
    selected, split = _selection(critical, used, config.split_half)
    contexts = [(prompt, selected[task].request_type) for task in used for prompt in selected[task].contexts]
    device = resolve_device(config.device)
    acts, tokenization, mismatches = {}, {}, {}
    for name in branches:
        acts[name], tokenization[name], mismatch = _branch_activations(
            name,
            sources[name],
            cc,
            slots[name],
            contexts,
            layer,
            config,
            device,
            f"{name}: last prompt tokens" if progress else False,
        )
        if mismatch:
            mismatches[name] = mismatch
    scores, sets = _task_scores(cc, acts, slots, config, {task: selected[task].n_critical for task in used})
    settings = {
        "crosscoder": str(cc_dir) if cc_dir is not None else None,
        "crosscoder_fingerprint": _fingerprint(cc),
        "base": config.base,
        "rl": config.rl,
        "models": {
            name: source if isinstance(source, str) else type(source[0]).__name__ for name, source in sources.items()
        },
        "critical": str(config.critical),
        "layer": layer,
        "position": "last prompt token",
        "tokenization": {
            "as": "lm-eval HFLM context (tok_encode / tok_batch_encode)",
            "add_bos_token": config.add_bos_token,
            "padding_side": config.padding_side,
            **tokenization,
        },
    }
    if split is not None:
        settings["split_half"] = split
    if mismatches:
        settings["model_mismatch"] = mismatches
    result = GeneralizationFeatures(
        used,
        skipped,
        {task: selected[task].n_critical for task in used},
        scores,
        sets,
        intersect_feature_sets(sets),
        config.threshold,
        config.overlap,
        settings,
        cc,
    )
    result.write(config.out)
    return result


def _model_sources(config: GeneralizationConfig, models: Mapping[str, tuple[nn.Module, Any]] | None) -> dict[str, Any]:
    """Branch name -> model path (``config.model``) or loaded ``(model, tokenizer)`` (``models``), for exactly base and rl."""
    from posttrain_probe.models import parse_model_specs

    given: dict[str, Any] = dict(models) if models is not None else parse_model_specs(config.model)
    branches = (config.base, config.rl)
    missing = [name for name in branches if name not in given]
    if missing:
        raise ProbeError(
            f"no model given for crosscoder branch(es) {missing}: expected --model {missing[0]}=PATH (given: {sorted(given)})"
        )
    extra = [name for name in given if name not in branches]
    if extra:
        raise ProbeError(
            f"models {extra} are neither the base ({config.base!r}) nor the RL ({config.rl!r}) branch; expected exactly those two"
        )
    for name, source in given.items():
        if not isinstance(source, str) and not (
            isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], nn.Module)
        ):
            raise ProbeError(f"models[{name!r}]: expected a (model, tokenizer) pair, got {type(source).__name__}")
    return {name: given[name] for name in branches}


def _selection(
    critical: CriticalSamples, used: list[str], seed: int | None
) -> tuple[dict[str, TaskCritical], dict[str, Any] | None]:
    """The G_t to score per task (the selection half with a split ``seed``) and the split's record (None without)."""
    if seed is None:
        return {task: critical.tasks[task] for task in used}, None
    halves = {task: half_split(critical.tasks[task].doc_ids, seed, task) for task in used}
    split = {
        "seed": int(seed),
        "rule": "per task, a seeded permutation of the sorted G_t doc ids: first ceil(n/2) select, the rest are held out (analysis.generalization.half_split)",
        "selection_doc_ids": {task: halves[task][0] for task in used},
        "held_out_doc_ids": {task: halves[task][1] for task in used},
    }
    return {task: critical.tasks[task].subset(halves[task][0], task) for task in used}, split


def _branch_activations(
    name: str,
    source,
    cc,
    slot: int,
    contexts: list[tuple[str, str]],
    layer: int,
    config: GeneralizationConfig,
    device: torch.device,
    progress: bool | str,
) -> tuple[torch.Tensor, dict[str, Any], str | None]:
    """``([n, d] residual stream at the last prompt token, tokenisation facts, model mismatch or None)`` of one branch's model."""
    from posttrain_probe.model_identity import check_site_model, slot_fingerprint
    from posttrain_probe.models import load_causal_lm, load_tokenizer

    loaded = isinstance(source, str)
    if loaded:
        tokenizer = load_tokenizer(source)
        model = load_causal_lm(source, dtype=config.dtype, device=device, keep_layers=layer)
    else:
        model, tokenizer = source
    what = f"model {name!r}" + (f" ({source})" if loaded else "")
    mismatch = check_site_model(
        model,
        layer,
        cc.config.d_model,
        slot_fingerprint(cc, slot),
        name,
        what=what,
        allow_mismatch=config.allow_model_mismatch,
    )
    ids = [
        lm_eval_context_ids(tokenizer, prompt, output_type=kind, add_bos_token=config.add_bos_token)
        for prompt, kind in contexts
    ]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    acts = last_prompt_activations(
        model,
        ids,
        layer,
        batch_size=config.batch_size,
        padding_side=config.padding_side,
        pad_id=pad_id,
        progress=progress,
    )
    if loaded:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return acts, {"n_prompts": len(ids), "mean_prompt_tokens": float(np.mean([len(i) for i in ids]))}, mismatch


def _task_scores(
    cc,
    acts: Mapping[str, torch.Tensor],
    slots: Mapping[str, int],
    config: GeneralizationConfig,
    counts: Mapping[str, int],
) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """``([T, F] Score_k^t, {task: S_t})``: per-source codes of each branch on its rows of ``acts`` (tasks in the order of ``counts``)."""
    cc_device, cc_dtype = next(cc.parameters()).device, cc.W_enc.dtype
    scores, sets, start = [], {}, 0
    with torch.no_grad():
        for task, n in counts.items():
            codes = {
                name: cc.encode_source(acts[name][start : start + n].to(cc_device, cc_dtype), slots[name])
                for name in (config.base, config.rl)
            }
            start += n
            score = generalization_scores(codes[config.rl], codes[config.base]).cpu()
            scores.append(score)
            sets[task] = select_features(score, config.threshold)
    return torch.stack(scores), sets


def _fingerprint(cc) -> str:
    from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint

    return crosscoder_fingerprint(cc)
