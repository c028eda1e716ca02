"""Generalization-controlling features (docs/methods.md sec. 6; paper R sec. 3.2 eq. 11, sec. 7, fig. 4).

For every task t with generalization-critical samples G_t (base model wrong, RL model right; from
``posttrain-probe critical``), at the **last prompt token** of each sample:

1. the residual stream a^m at the crosscoder's site of the base and of the RL model (truncated
   forwards, batched and padded; prompts tokenised as lm-eval's ``HFLM`` tokenises the context:
   :func:`lm_eval_context_ids`);
2. the per-source codes f^m = act(W_enc^m s_m a^m + b_enc) of each model's own branch (docs/methods.md sec. 3);
3. :func:`generalization_scores`: Score_k^t = mean_{x in G_t} [f_k^RL(x) - f_k^base(x)] (code units);
4. :func:`select_features`: S_t = {k : Score_k^t >= fraction * max_j Score_j^t} (fraction 0.2);
   empty when max_j Score_j^t <= 0 (no feature is more active in the RL model), and reported so;
5. :func:`intersect_feature_sets`: S = intersection of S_t over the tasks that have critical samples;
   tasks without any are skipped and listed;
6. :func:`overlap_matrix` (and :func:`plot_feature_overlap`, paper R fig. 4): the pairwise overlap of
   the S_t. Paper R reports overlaps "even over 80%" without its formula; **choice**: by default the
   row-normalised overlap |S_a ∩ S_b| / |S_a| (the share of task a's features that task b selects
   too; it reduces to docs/methods.md sec. 5's |T_c ∩ T_c'| / k for sets of equal size). ``normalize="jaccard"``
   (|S_a ∩ S_b| / |S_a ∪ S_b|) and ``"min"`` (|S_a ∩ S_b| / min(|S_a|, |S_b|)) are offered.

With ``split_half=SEED`` (``--split-half SEED``) each task's G_t is first cut in two by
:func:`half_split`: S_t and S are selected on the selection half only, and the held-out half's doc
ids go into the feature set's provenance (``split_half``), so that ``posttrain-probe intervene``
measures the effect on documents the selection never saw.

Entry points: :func:`generalization_features` (all of it, from a crosscoder, two models and a
critical-samples file), :meth:`GeneralizationResult.write` (``generalization.json``, ``scores.csv``,
``overlap.png``/``.svg``, the feature-set JSON of S with its provenance and one per S_t) and
``posttrain-probe features generalization``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError
from posttrain_probe.analysis.critical import critical_json

DEFAULT_THRESHOLD = 0.2
"""Paper R sec. 7: per task, features scoring at least 20% of the task's maximum score."""
OVERLAP_NORMALIZATIONS = ("row", "jaccard", "min")
"""Denominators of :func:`overlap_matrix`: |S_a| (default), |S_a ∪ S_b|, min(|S_a|, |S_b|)."""
OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")
"""lm-eval task output types; they decide how the context is tokenised (:func:`lm_eval_context_ids`)."""
RESULT_FORMAT = "posttrain-probe/generalization-features"
FEATURE_SET_NAME = "generalization_features.json"
"""File name of the feature set S written by :meth:`GeneralizationResult.write`."""


# -- the formulas --------------------------------------------------------------------------------------


def generalization_scores(f_rl: torch.Tensor, f_base: torch.Tensor) -> torch.Tensor:
    """Generalization score of every feature on one task, paper R eq. 11 (docs/methods.md sec. 6).

    Args:
        f_rl: ``[n, F]`` per-source codes f^RL of the RL model at the last prompt token of the n
            generalization-critical samples G_t (code units, >= 0).
        f_base: ``[n, F]`` per-source codes f^base of the base model on the same samples, same order.

    Returns:
        ``[F]`` float64: Score_k = mean over the n samples of (f_k^RL - f_k^base), in code units.
    """
    f_rl, f_base = torch.as_tensor(f_rl).detach(), torch.as_tensor(f_base).detach()
    if f_rl.ndim != 2 or f_rl.shape != f_base.shape:
        raise ProbeError(f"f_rl {tuple(f_rl.shape)} and f_base {tuple(f_base.shape)} must both be [n_samples, F], in the same sample order")
    if f_rl.shape[0] == 0:
        raise ProbeError("no generalization-critical samples: the score is a mean over G_t and needs |G_t| >= 1")
    return (f_rl.double() - f_base.double()).mean(dim=0)


def select_features(scores: torch.Tensor, fraction: float = DEFAULT_THRESHOLD) -> list[int]:
    """S_t = {k : Score_k >= fraction * max_j Score_j} (docs/methods.md sec. 6; paper R: fraction 0.2).

    Args:
        scores: ``[F]`` generalization scores of one task (:func:`generalization_scores`, code units).
        fraction: threshold as a fraction of the task's maximum score, in (0, 1].

    Returns:
        Sorted feature indices. Empty when max_j Score_j <= 0 (no feature is more active in the RL
        model than in the base model on G_t: a positive threshold is then undefined). NaN scores
        never qualify.
    """
    fraction = check_threshold(fraction)
    scores = torch.as_tensor(scores).detach().double()
    if scores.ndim != 1 or scores.numel() == 0:
        raise ProbeError(f"scores has shape {tuple(scores.shape)}; expected a non-empty [F] vector")
    finite = torch.nan_to_num(scores, nan=-math.inf)
    top = float(finite.max())
    if not top > 0:
        return []
    return torch.nonzero(finite >= fraction * top).flatten().tolist()


def check_threshold(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], or ProbeError."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ProbeError(f"threshold {fraction!r} is not a number; expected a fraction of the maximum score in (0, 1], e.g. 0.2") from None
    if not 0 < value <= 1:
        raise ProbeError(f"threshold {fraction!r} is out of range; expected a fraction of the maximum score in (0, 1], e.g. 0.2")
    return value


def intersect_feature_sets(sets: Mapping[str, Sequence[int]]) -> list[int]:
    """S = intersection of the per-task sets S_t (docs/methods.md sec. 6); ``sets`` maps task -> feature indices.

    Returns the sorted indices in every set. Needs at least one task (an intersection over no task
    is undefined, not "all features").
    """
    if not sets:
        raise ProbeError("no task to intersect: expected at least one task with generalization-critical samples")
    common: set[int] | None = None
    for values in sets.values():
        common = {int(v) for v in values} if common is None else common & {int(v) for v in values}
    return sorted(common or ())


def overlap_matrix(sets: Sequence[Sequence[int]], normalize: str = "row") -> np.ndarray:
    """Pairwise overlap of feature sets (paper R fig. 4), ``[T, T]`` float64.

    ``normalize`` picks the denominator of |S_a ∩ S_b|:

    - ``row`` (default): |S_a| (row a, column b: the share of S_a that S_b contains too; not
      symmetric; reduces to docs/methods.md sec. 5's |T_c ∩ T_c'| / k when every set has k features);
    - ``jaccard``: |S_a ∪ S_b|;
    - ``min``: min(|S_a|, |S_b|) (the overlap coefficient).

    The diagonal is 1 for non-empty sets. Entries whose denominator is 0 (an empty set) are NaN.
    """
    if normalize not in OVERLAP_NORMALIZATIONS:
        raise ProbeError(f"overlap normalization {normalize!r} is not one of {OVERLAP_NORMALIZATIONS}")
    if len(sets) == 0:
        raise ProbeError("no feature sets: expected at least one")
    n_features = 1 + max((max(s) for s in sets if len(s)), default=-1)
    member = np.zeros((len(sets), max(n_features, 1)), dtype=np.float64)  # [T, F] indicator matrix
    for row, values in enumerate(sets):
        member[row, np.asarray(list(values), dtype=np.int64)] = 1.0
    inter = member @ member.T
    size = member.sum(axis=1)
    if normalize == "row":
        denom = np.repeat(size[:, None], len(sets), axis=1)
    elif normalize == "jaccard":
        denom = size[:, None] + size[None, :] - inter
    else:
        denom = np.minimum(size[:, None], size[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), np.nan)


def overlap_definition(normalize: str) -> str:
    """Human-readable formula of :func:`overlap_matrix` for ``normalize`` (written into the outputs)."""
    return {
        "row": "overlap[a][b] = |S_a ∩ S_b| / |S_a| (row task a, column task b)",
        "jaccard": "overlap[a][b] = |S_a ∩ S_b| / |S_a ∪ S_b|",
        "min": "overlap[a][b] = |S_a ∩ S_b| / min(|S_a|, |S_b|)",
    }[normalize]


# -- tokenisation as lm-eval does it, and last-prompt-token activations ---------------------------------


def lm_eval_context_ids(
    tokenizer,
    context: str,
    *,
    output_type: str = "loglikelihood",
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
) -> list[int]:
    """Token ids lm-eval's ``HFLM`` (causal models) feeds the model for ``context`` (lm-eval 0.4.x).

    - ``loglikelihood`` / ``multiple_choice``: ``LM._encode_pair`` moves trailing whitespace of the
      context to the continuation, then ``HFLM.tok_encode``: ``add_special_tokens`` = ``add_bos_token``
      when given (HFLM's model_arg, default None: the tokenizer's own default), but False when the text
      already starts with the decoded prefix token (``prefix_token_id``, default BOS, else EOS). An
      empty context becomes ``[prefix_token_id]``.
    - ``generate_until``: ``HFLM.tok_batch_encode``: the context as is; ``add_special_tokens`` False
      when it starts with the tokenizer's BOS string, else ``add_bos_token`` when given.
    - ``loglikelihood_rolling`` has no prompt; it is refused.

    Returns the ids (no truncation: lm-eval left-truncates only contexts longer than its max_length).
    """
    if output_type not in OUTPUT_TYPES or output_type == "loglikelihood_rolling":
        raise ProbeError(f"output_type {output_type!r}: expected one of loglikelihood, multiple_choice, generate_until (a task with a prompt)")
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {} if add_bos_token is None else {"add_special_tokens": bool(add_bos_token)}
    if output_type == "generate_until":
        bos = getattr(tokenizer, "bos_token", None)
        if bos is not None and context.startswith(bos):
            kwargs = {"add_special_tokens": False}
        return list(tokenizer(context, **kwargs)["input_ids"])
    if context == "":
        if prefix_token_id is None:
            raise ProbeError("an empty context needs a prefix token, but the tokenizer has neither BOS nor EOS")
        return [int(prefix_token_id)]
    context = context.rstrip()
    if prefix_token_id is not None and context.startswith(tokenizer.decode(prefix_token_id)):
        kwargs = {"add_special_tokens": False}
    return list(tokenizer.encode(context, **kwargs))


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row of a padded batch, left or right padding alike.

    Args:
        attention_mask: ``[B, T]`` (1/True = real token, 0 = padding).

    Returns:
        ``[B]`` int64 positions in [0, T). Rows without a real token are refused.
    """
    mask = torch.as_tensor(attention_mask).bool()
    if mask.ndim != 2:
        raise ProbeError(f"attention_mask has shape {tuple(mask.shape)}; expected [batch, seq]")
    if not mask.any(dim=1).all():
        raise ProbeError("a row of the attention mask has no real token; expected at least one per row")
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)


def pad_batch(
    sequences: Sequence[Sequence[int]], *, pad_id: int, padding_side: str = "right", device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids``, each ``[B, T]`` int64.

    ``position_ids`` count real tokens from 0 in each row (0 on padding), so a left-padded row sees
    the same positions as it would unpadded.
    """
    if padding_side not in ("left", "right"):
        raise ProbeError(f"padding_side {padding_side!r}: expected 'left' or 'right'")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ProbeError("cannot pad an empty batch or an empty sequence")
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    ones = [torch.ones_like(r) for r in rows]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=padding_side)
    mask = torch.nn.utils.rnn.pad_sequence(ones, batch_first=True, padding_value=0, padding_side=padding_side)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0) * mask
    return input_ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def last_prompt_activations(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    layer: int,
    *,
    batch_size: int = 8,
    padding_side: str = "right",
    pad_id: int = 0,
    progress: bool | str = False,
) -> torch.Tensor:
    """Residual stream at site ``layer`` (docs/methods.md sec. 1) at the last token of every prompt.

    Truncated forwards (no block >= ``layer`` runs) over batches of ``batch_size`` prompts, sorted by
    length to keep padding small, padded on ``padding_side`` with explicit ``position_ids``; the last
    real token of each row is found from the attention mask.

    Args:
        model: HF causal LM (on its device; its dtype is kept).
        token_ids: n prompts as token id lists (e.g. :func:`lm_eval_context_ids`).
        progress: show a progress bar (a string is its description).

    Returns:
        ``[n, d]`` float32 on the CPU, raw model units, in the order of ``token_ids``.
    """
    from posttrain_probe.layers import truncated_forward

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size={batch_size!r}: expected a positive int (prompts per forward)")
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    from tqdm.auto import tqdm

    out: torch.Tensor | None = None
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress if isinstance(progress, str) else "prompts", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        input_ids, mask, positions = pad_batch([token_ids[i] for i in rows], pad_id=pad_id, padding_side=padding_side, device=device)
        hidden = truncated_forward(model, input_ids, mask, [layer], position_ids=positions)[layer]
        last = last_token_positions(mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu()
        if out is None:
            out = torch.empty(len(token_ids), picked.shape[1], dtype=torch.float32)
        out[torch.as_tensor(rows)] = picked
    if out is None:
        raise ProbeError("no prompts: expected at least one")
    return out


# -- split-half selection -------------------------------------------------------------------------------


def half_split(doc_ids: Sequence[int], seed: int, task: str) -> tuple[list[int], list[int]]:
    """Split one task's G_t into a selection half and a held-out half, reproducibly.

    Args:
        doc_ids: the task's critical doc ids (>= 2, distinct).
        seed: split seed (int >= 0).
        task: the task name; mixed into the seed so that tasks are split independently.

    Returns:
        ``(selection, held_out)``, each sorted: a random permutation (``numpy`` generator seeded by
        ``seed`` and a sha256 of ``task``) of the sorted doc ids, its first ceil(n/2) ids selecting and
        the other floor(n/2) held out. The same (doc ids, seed, task) always give the same halves.
    """
    ids = sorted(int(d) for d in doc_ids)
    if len(set(ids)) != len(ids):
        raise ProbeError(f"task {task!r}: repeated critical doc ids; expected distinct ids")
    if len(ids) < 2:
        raise ProbeError(f"task {task!r} has |G_t| = {len(ids)}; a split into a selection and a held-out half needs at least 2 critical samples")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ProbeError(f"split seed {seed!r}: expected an int >= 0")
    salt = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    order = np.random.default_rng([int(seed), salt]).permutation(len(ids))
    n_select = (len(ids) + 1) // 2
    return sorted(ids[i] for i in order[:n_select]), sorted(ids[i] for i in order[n_select:])


# -- critical samples --------------------------------------------------------------------------------------


@dataclass
class CriticalTask:
    """The generalization-critical samples G_t of one task, as far as this module needs them."""

    name: str
    doc_ids: list[int]
    prompts: list[str]
    """The exact contexts lm-eval fed the models, in the order of ``doc_ids``."""
    output_type: str = "loglikelihood"

    def subset(self, doc_ids: Sequence[int]) -> CriticalTask:
        """This task restricted to ``doc_ids`` (a subset of its doc ids, in the given order; prompts kept in step)."""
        prompts = dict(zip(self.doc_ids, self.prompts))
        missing = [d for d in doc_ids if d not in prompts]
        if missing:
            raise ProbeError(f"task {self.name!r}: doc ids {missing[:10]} are not among its critical samples")
        return CriticalTask(self.name, list(doc_ids), [prompts[d] for d in doc_ids], self.output_type)


def load_critical(critical: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, CriticalTask], list[str], dict[str, Any]]:
    """Read a critical-samples JSON (``posttrain-probe critical``; path or the parsed dict; header checked by
    :func:`posttrain_probe.analysis.critical.critical_json`).

    Returns ``(tasks with |G_t| >= 1, tasks with |G_t| = 0, the raw dict)``. The lm-eval output
    type of a task (which decides how its prompts are tokenised) is the entry's ``request_type`` (written by
    ``posttrain-probe critical``) or ``output_type`` if
    present, else read off the first record of the run's sample log (``base_file``: a request whose
    second argument is a dict of generation kwargs is ``generate_until``), else loglikelihood.
    """
    data = critical_json(critical)
    tasks: dict[str, CriticalTask] = {}
    empty: list[str] = [str(t) for t in data.get("no_critical", [])]
    for name, entry in data["tasks"].items():
        doc_ids = [int(d) for d in entry.get("doc_ids", [])]
        if not doc_ids:
            if name not in empty:
                empty.append(name)
            continue
        prompts = entry.get("prompts", {})
        missing = [d for d in doc_ids if str(d) not in prompts]
        if missing:
            raise ProbeError(f"critical samples of task {name!r} lack the prompts of doc ids {missing[:10]}; expected a 'prompts' entry per doc id")
        tasks[name] = CriticalTask(name, doc_ids, [prompts[str(d)] for d in doc_ids], entry.get("output_type") or entry.get("request_type") or _logged_output_type(entry.get("base_file")))
    return tasks, sorted(set(empty)), data


def _logged_output_type(sample_file: str | None) -> str:
    """``generate_until`` when the first record of an lm-eval sample log has generation kwargs as its
    second request argument, else ``loglikelihood`` (also when the log is not readable)."""
    if not sample_file or not Path(sample_file).is_file():
        return "loglikelihood"
    try:
        with open(sample_file, encoding="utf-8") as handle:
            record = json.loads(handle.readline())
        first = next(iter(record["arguments"].values()))
        return "generate_until" if isinstance(first.get("arg_1"), dict) else "loglikelihood"
    except (OSError, ValueError, KeyError, AttributeError, StopIteration, TypeError):
        return "loglikelihood"


def split_names(values: Sequence[str]) -> list[str]:
    """Repeated and/or comma-separated names (``["a,b", "c"]``) -> ``["a", "b", "c"]``, order kept, no duplicates."""
    return list(dict.fromkeys(v.strip() for value in values for v in str(value).split(",") if v.strip()))


def choose_tasks(available: Sequence[str], empty: Sequence[str], requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(tasks to use, tasks skipped for having no critical samples)``, in the requested order.

    ``requested`` None: every task of the file. A requested task that the file does not know is refused.
    """
    known = list(available) + [t for t in empty if t not in available]
    if requested is None:
        return list(available), [t for t in empty if t not in available]
    wanted = split_names(requested)
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise ProbeError(f"tasks {unknown} are not in the critical-samples file; it has {sorted(known)}")
    return [t for t in wanted if t in available], [t for t in wanted if t not in available]


# -- the whole computation ------------------------------------------------------------------------------


@dataclass
class GeneralizationResult:
    """Result of :func:`generalization_features`."""

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
            notes.append(f"tasks without generalization-critical samples were skipped: {', '.join(self.skipped)}; S is the intersection over {', '.join(self.tasks)}")
        for task, top in self.max_scores.items():
            if not top > 0:
                notes.append(f"task {task}: the maximum score is {top:.4g} <= 0 (no feature is more active in the RL model on G_t), so S_t is empty")
        if not self.intersection:
            notes.append("the intersection S is empty")
        split = self.settings.get("split_half")
        if split:
            notes.append(f"features selected on one half of each G_t (split seed {split['seed']}); intervene evaluates them on the held-out half")
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
        return json_safe({
            "format": RESULT_FORMAT,
            "format_version": 1,
            "settings": self.settings,
            "threshold_fraction": self.threshold,
            "tasks": per_task,
            "skipped_tasks": self.skipped,
            "intersection": {"n_features": len(self.intersection), "features": self.intersection, "over_tasks": self.tasks},
            "overlap": {"definition": overlap_definition(self.normalize), "normalize": self.normalize, "tasks": self.tasks, "matrix": self.overlap.tolist()},
            "notes": self.notes,
        })

    def provenance(self) -> dict[str, Any]:
        """Provenance written into the feature-set JSON of S."""
        return json_safe({
            "method": "generalization features, paper R sec. 3.2 eq. 11 / docs/methods.md sec. 6 (last prompt token, per-source codes)",
            **{k: v for k, v in self.settings.items() if k != "crosscoder"},
            "tasks": self.tasks,
            "skipped_tasks": self.skipped,
            "threshold_fraction": self.threshold,
            "n_critical": self.n_critical,
            "set_sizes": {t: len(self.sets[t]) for t in self.tasks},
            "intersection_size": len(self.intersection),
        })

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
        bound = {"crosscoder": self.crosscoder if self.crosscoder is not None else self.settings.get("crosscoder"),
                 "crosscoder_path": self.settings.get("crosscoder")}
        files: dict[str, Any] = {}
        files["feature_set"] = str(write_feature_set(out / FEATURE_SET_NAME, self.intersection, **bound, **self.provenance()))
        files["task_feature_sets"] = {}
        for task in self.tasks:
            path = out / "feature_sets" / f"{_safe_name(task)}.json"
            write_feature_set(path, self.sets[task], **bound, **{**self.provenance(), "task": task, "selection": "S_t of this task only"})
            files["task_feature_sets"][task] = str(path)
        files["scores"] = str(self._write_scores(out / "scores.csv"))
        sizes = [len(self.sets[t]) for t in self.tasks]
        files["figures"] = [str(p) for p in plot_feature_overlap(self.overlap, self.tasks, out / "overlap", normalize=self.normalize, sizes=sizes)]
        (out / "generalization.json").write_text(json.dumps({**self.summary(), "files": files}, indent=2))
        files["summary"] = str(out / "generalization.json")
        return files

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


def generalization_features(
    crosscoder,
    models: Mapping[str, str | os.PathLike | nn.Module],
    critical: str | os.PathLike | Mapping[str, Any],
    *,
    base: str,
    rl: str,
    threshold: float = DEFAULT_THRESHOLD,
    tasks: Sequence[str] | None = None,
    normalize: str = "row",
    tokenizers: Mapping[str, Any] | None = None,
    add_bos_token: bool | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
    model_dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
    split_half: int | None = None,
    allow_model_mismatch: bool = False,
) -> GeneralizationResult:
    """Generalization-controlling features of a base-vs-RL crosscoder (docs/methods.md sec. 6, paper R sec. 3.2/7).

    Args:
        crosscoder: a :class:`~posttrain_probe.crosscoder.Crosscoder` with branches ``base`` and ``rl``,
            or its directory. Its ``config.layer`` is the site.
        models: crosscoder branch name -> the model (local dir, hub name, or a loaded HF causal LM with
            its tokenizer in ``tokenizers``); must contain ``base`` and ``rl``.
        critical: the ``posttrain-probe critical`` JSON (path or dict): G_t and the exact prompts.
        threshold: fraction of each task's maximum score (:func:`select_features`).
        tasks: restrict to these tasks (default: every task of the file); tasks without critical
            samples are skipped and reported.
        normalize: denominator of the overlap matrix (:func:`overlap_matrix`).
        add_bos_token: as lm-eval's HFLM model_arg of the same name (None: the tokenizer's default).
        batch_size, padding_side: prompts per truncated forward and where padding goes.
        model_dtype, device: how models given by path are loaded (``auto``: bf16 on GPU, fp32 on CPU).
        progress: progress bars over the prompt batches.
        split_half: a seed: select on one half of each task's G_t only (:func:`half_split`; scores,
            S_t, S and ``n_critical`` are those of the selection half); both halves' doc ids go into
            ``settings["split_half"]`` and so into the feature sets' provenance, and ``intervene``
            then evaluates on the held-out half. None (default): all of G_t.
        allow_model_mismatch: score even when a model is not the one its branch was trained on (nor
            tuned from it), which is refused otherwise (:mod:`posttrain_probe.model_identity`); the
            mismatches are recorded in ``settings["model_mismatch"]``.

    Returns:
        A :class:`GeneralizationResult` (``.write(out_dir)`` writes the files).
    """
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.layers import hidden_size, validate_layer
    from posttrain_probe.model_identity import check_model, slot_fingerprint
    from posttrain_probe.models import load_causal_lm, load_tokenizer, resolve_device

    cc_path = str(crosscoder) if isinstance(crosscoder, (str, os.PathLike)) else None
    cc = load_crosscoder(crosscoder) if cc_path is not None else crosscoder
    threshold = check_threshold(threshold)
    if normalize not in OVERLAP_NORMALIZATIONS:
        raise ProbeError(f"overlap normalization {normalize!r} is not one of {OVERLAP_NORMALIZATIONS}")
    if base == rl:
        raise ProbeError(f"base and rl name the same branch {base!r}; expected two different branches of the crosscoder {cc.model_names}")
    slots = {name: cc.model_index(name) for name in (base, rl)}
    missing = [name for name in (base, rl) if name not in models]
    if missing:
        raise ProbeError(f"no model given for crosscoder branch(es) {missing}: expected --model {missing[0]}=PATH (given: {sorted(models)})")
    extra = [name for name in models if name not in (base, rl)]
    if extra:
        raise ProbeError(f"models {extra} are neither the base ({base!r}) nor the RL ({rl!r}) branch; expected exactly those two")
    layer = cc.config.layer
    if layer is None:
        raise ProbeError("the crosscoder does not record its layer (config.layer); expected a crosscoder trained by posttrain-probe at a known site")
    available, empty, _ = load_critical(critical)
    used, skipped = choose_tasks(list(available), empty, tasks)
    if not used:
        raise ProbeError(f"no task has generalization-critical samples (tasks without any: {skipped or empty}); nothing to score")
    split = None
    if split_half is not None:
        halves = {task: half_split(available[task].doc_ids, split_half, task) for task in used}
        available = {**available, **{task: available[task].subset(halves[task][0]) for task in used}}
        split = {
            "seed": int(split_half),
            "rule": "per task, a seeded permutation of the sorted G_t doc ids: first ceil(n/2) select, the rest are held out (analysis.generalization.half_split)",
            "selection_doc_ids": {task: halves[task][0] for task in used},
            "held_out_doc_ids": {task: halves[task][1] for task in used},
        }
    device = resolve_device(device)

    contexts = [(task, prompt, available[task].output_type) for task in used for prompt in available[task].prompts]
    acts: dict[str, torch.Tensor] = {}
    tokenization: dict[str, Any] = {}
    mismatches: dict[str, str] = {}
    for name in (base, rl):
        source = models[name]
        if isinstance(source, nn.Module):
            if tokenizers is None or name not in tokenizers:
                raise ProbeError(f"model {name!r} is given as a loaded module: pass its tokenizer in tokenizers[{name!r}]")
            model, tokenizer = source, tokenizers[name]
        else:
            tokenizer = tokenizers[name] if tokenizers and name in tokenizers else load_tokenizer(source)
            model = load_causal_lm(source, dtype=model_dtype, device=device, keep_layers=layer)
        validate_layer(model, layer)
        if hidden_size(model) != cc.config.d_model:
            raise ProbeError(f"model {name!r} has hidden size {hidden_size(model)} but the crosscoder has d_model {cc.config.d_model}: expected the models the crosscoder was trained on")
        what = f"model {name!r}" + (f" ({source})" if not isinstance(source, nn.Module) else "")
        mismatch = check_model(model, slot_fingerprint(cc, slots[name]), name, what=what, allow_mismatch=allow_model_mismatch)
        if mismatch:
            mismatches[name] = mismatch
        ids = [lm_eval_context_ids(tokenizer, prompt, output_type=kind, add_bos_token=add_bos_token) for _, prompt, kind in contexts]
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        acts[name] = last_prompt_activations(model, ids, layer, batch_size=batch_size, padding_side=padding_side, pad_id=pad_id,
                                             progress=f"{name}: last prompt tokens" if progress else False)
        tokenization[name] = {"n_prompts": len(ids), "mean_prompt_tokens": float(np.mean([len(i) for i in ids]))}
        if not isinstance(source, nn.Module):
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    cc_device = next(cc.parameters()).device
    cc_dtype = cc.W_enc.dtype
    scores, sets, counts = [], {}, {}
    start = 0
    with torch.no_grad():
        for task in used:
            n = len(available[task].doc_ids)
            codes = {
                name: cc.encode_source(acts[name][start : start + n].to(cc_device, cc_dtype), slots[name]) for name in (base, rl)
            }
            start += n
            score = generalization_scores(codes[rl], codes[base]).cpu()
            scores.append(score)
            sets[task] = select_features(score, threshold)
            counts[task] = n
    settings = {
        "crosscoder": cc_path,
        "crosscoder_fingerprint": _fingerprint(cc),
        "base": base,
        "rl": rl,
        "models": {name: (str(models[name]) if not isinstance(models[name], nn.Module) else type(models[name]).__name__) for name in (base, rl)},
        "critical": str(critical) if not isinstance(critical, Mapping) else None,
        "layer": layer,
        "position": "last prompt token",
        "tokenization": {"as": "lm-eval HFLM context (tok_encode / tok_batch_encode)", "add_bos_token": add_bos_token, "padding_side": padding_side, **tokenization},
    }
    if split is not None:
        settings["split_half"] = split
    if mismatches:
        settings["model_mismatch"] = mismatches
    return GeneralizationResult(used, skipped, counts, torch.stack(scores), sets, intersect_feature_sets(sets), threshold, normalize, settings, cc)


def _fingerprint(cc) -> str:
    from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint

    return crosscoder_fingerprint(cc)


# -- figure ----------------------------------------------------------------------------------------------


def plot_feature_overlap(
    matrix, labels: Sequence[str], path, *, normalize: str = "row", sizes: Sequence[int] | None = None, title: str | None = None
) -> list[Path]:
    """Heatmap of the pairwise overlap of the per-task feature sets S_t (paper R fig. 4).

    ``matrix`` [T, T] from :func:`overlap_matrix` (fractions in [0, 1]; NaN cells, from empty sets,
    are drawn blank and marked "n/a"), ``labels`` the T task names, ``sizes`` optional |S_t| shown
    in the tick labels; ``normalize`` names the formula in the colour-bar label. Writes
    ``<path>.png`` and ``<path>.svg``; returns both.
    """
    import matplotlib

    from posttrain_probe.analysis.plots import BLANK_COLOUR, new_figure, as_labels, as_matrix, save_figure, plot_style

    m = as_matrix(matrix, "matrix")
    if m.shape[0] != m.shape[1]:
        raise ProbeError(f"matrix has shape {m.shape}; expected a square [T, T] overlap matrix")
    names = as_labels(labels, m.shape[0], "labels", "task")
    finite = m[np.isfinite(m)]
    if finite.size and (finite.min() < 0 or finite.max() > 1 + 1e-12):
        raise ProbeError("matrix has values outside [0, 1]; expected overlap fractions")
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        names = [f"{n}\n|S_t|={s}" for n, s in zip(names, as_labels(sizes, len(names), "sizes", "task"))]
    t = m.shape[0]
    side = min(max(2.4 + 0.6 * t, 3.2), 9.0)
    with plot_style():
        fig = new_figure(side + 1.0, side)
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad=BLANK_COLOUR)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fontsize = 8 if t <= 10 else 6 if t <= 16 else 0
        if fontsize:
            for i in range(t):
                for j in range(t):
                    text = "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}"
                    dark = np.isfinite(m[i, j]) and m[i, j] > 0.6
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "#222222")
        ax.set_xticks(range(t), names, rotation=45 if t > 4 else 0, ha="right" if t > 4 else "center")
        ax.set_yticks(range(t), names)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if normalize == "row":
            ax.set_xlabel("task b")
            ax.set_ylabel("task a")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label(overlap_definition(normalize).split("=", 1)[1].split("(")[0].strip() if normalize in OVERLAP_NORMALIZATIONS else "overlap")
        cbar.outline.set_visible(False)
        ax.set_title(title if title is not None else "Overlap of generalization features across tasks")
        return save_figure(fig, path)
