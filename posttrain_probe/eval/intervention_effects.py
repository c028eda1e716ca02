"""Effect of feature interventions on generalization-critical samples (docs/methods.md sec. 7; paper R tables 2-5).

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

Beyond the papers:

- **Controls** (docs/methods.md sec. 11; :mod:`posttrain_probe.analysis.controls`): ``control_seeds`` random
  feature sets of |S| features, frequency-matched to S bin by bin (firing rates of the intervened
  branch's per-source codes on a reference corpus: ``reference`` or, by default, the prompts of the
  evaluated G_t documents), each run exactly like S on the same documents. Per task: mean, sample
  std, min and max of their deltas and ``outside_controls`` (S's delta below their min or above
  their max).
- **Per feature** (paper S): with ``per_feature`` each feature of S alone is intervened on too, one
  row per (task, feature).
- **Split-half selection**: a feature set selected with ``features generalization --split-half``
  records the held-out half of each task's G_t; those tasks are evaluated on that half only
  (``held_out_half``), so the selection never saw the documents the effect is measured on.

Entry points: :func:`intervention_effects`, :meth:`InterventionEffects.write` (``effects.json``,
``effects.csv``, ``effects.md``), :func:`format_effects_table`, :func:`control_summary_lines`,
``posttrain-probe intervene``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain_probe.analysis.controls import DEFAULT_CONTROL_SEEDS, DEFAULT_FREQUENCY_BINS, control_spread
from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError
from posttrain_probe.model_identity import check_model_path, slot_fingerprint

ROLES = ("rl", "base")
"""Roles of the evaluated model on G_t: ``rl`` (acc_before = 100%) or ``base`` (acc_before = 0%)."""
NOMINAL_ACC_BEFORE = {"rl": 100.0, "base": 0.0}
"""acc_before on G_t in percent, by role (docs/methods.md sec. 7)."""
RESULT_FORMAT = "posttrain-probe/intervention-effects"
RESULT_FORMAT_VERSION = 2
"""2: control and per-feature rows (``controls``, ``per_feature``), control summaries and ``held_out_half`` per task."""


# -- the formula ------------------------------------------------------------------------------------------


def intervention_delta(n_correct_after: int, n_critical: int, role: str) -> float:
    """Change of accuracy on G_t, in percentage points (docs/methods.md sec. 7; paper R tables 2-5).

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
    """|G_t| evaluated (0: the task has no generalization-critical samples and no G_t numbers); the
    held-out half's size when ``held_out_half``."""
    n_correct_before: int | None = None
    """Measured: samples of G_t right in the un-intervened run."""
    n_correct_after: int | None = None
    """Samples of G_t right with the intervention."""
    acc_before_nominal: float | None = None
    """acc_before on G_t by docs/methods.md sec. 7 (100 for the RL model, 0 for the base), percent."""
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
    held_out_half: bool = False
    """Only the held-out half of G_t was evaluated (the feature set was selected on the other half)."""
    n_controls: int = 0
    """Frequency-matched control sets evaluated on this task (docs/methods.md sec. 11)."""
    controls_mean_pp: float | None = None
    """Mean of the control sets' ``delta_pp``, percentage points."""
    controls_std_pp: float | None = None
    """Sample std (ddof 1) of the control sets' ``delta_pp`` (None with one control), percentage points."""
    controls_min_pp: float | None = None
    """Smallest control ``delta_pp``, percentage points."""
    controls_max_pp: float | None = None
    """Largest control ``delta_pp``, percentage points."""
    outside_controls: bool | None = None
    """``delta_pp`` < controls_min_pp or > controls_max_pp (None without controls)."""

    @property
    def full_delta_pp(self) -> float | None:
        """Full task: acc_after - acc_before, percentage points."""
        if self.full_acc_before is None or self.full_acc_after is None:
            return None
        return self.full_acc_after - self.full_acc_before


@dataclass
class SetEffect:
    """The effect on one task of another feature set than S, on the same documents as S's row:
    a frequency-matched control set (``kind="control"``) or one feature of S alone (``kind="feature"``)."""

    kind: str
    """``control`` or ``feature``."""
    task: str
    features: list[int]
    """The set intervened on (sorted; one index for ``feature``)."""
    seed: int | None = None
    """``control``: the sampler's seed."""
    n_critical: int = 0
    """|G_t| evaluated (as in the task's :class:`TaskEffect`)."""
    n_correct_after: int | None = None
    acc_after: float | None = None
    """Percent."""
    delta_pp: float | None = None
    """:func:`intervention_delta`, percentage points."""
    delta_measured_pp: float | None = None
    """acc_after minus the measured acc_before (the shared un-intervened run), percentage points."""
    flipped_docs: list[int] = field(default_factory=list)


@dataclass
class InterventionEffects:
    """Result of :func:`intervention_effects`: one :class:`TaskEffect` per task, the control and
    per-feature rows (:class:`SetEffect`) and the settings."""

    rows: list[TaskEffect]
    settings: dict[str, Any]
    controls: list[SetEffect] = field(default_factory=list)
    """One row per (control seed, task with G_t)."""
    per_feature: list[SetEffect] = field(default_factory=list)
    """With ``per_feature``: one row per (task with G_t, feature of S)."""
    runs: dict[str, Any] = field(default_factory=dict, repr=False)
    """The lm-eval results (``before``, ``after``, ``control-seed<s>``, ``feature-<k>``) as returned by
    ``evaluate`` (samples included); not written."""

    @property
    def no_critical(self) -> list[str]:
        """Tasks without generalization-critical samples."""
        return [row.task for row in self.rows if row.n_critical == 0]

    @property
    def notes(self) -> list[str]:
        """Plain-language remarks: tasks without critical samples, baseline and prompt mismatches,
        split-half evaluation, control fallbacks."""
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
        halves = [row.task for row in self.rows if row.held_out_half]
        if halves:
            seed = (self.settings.get("split_half") or {}).get("seed")
            notes.append(f"evaluated on the held-out half of G_t only (the features were selected on the other half, split seed {seed}): {', '.join(halves)}")
        controls = self.settings.get("controls") or {}
        if controls.get("note"):
            notes.append(controls["note"])
        if controls.get("skipped"):
            notes.append(controls["skipped"])
        return notes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: format, settings, one dict per row (with ``full_delta_pp``), the control and
        per-feature rows, notes."""
        rows = [{**asdict(row), "full_delta_pp": row.full_delta_pp} for row in self.rows]
        return json_safe({"format": RESULT_FORMAT, "format_version": RESULT_FORMAT_VERSION, "settings": self.settings, "rows": rows,
                          "controls": [asdict(c) for c in self.controls], "per_feature": [asdict(f) for f in self.per_feature],
                          "no_critical": self.no_critical, "notes": self.notes})

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``effects.json`` (:meth:`to_dict`), ``effects.csv`` and ``effects.md``
        (:func:`format_effects_table`, the control and per-feature tables, the paper-style row);
        returns the paths.

        ``effects.csv`` has one line per task (``row`` = ``set``: the feature set S), then one per
        control set and task (``control``, with ``seed`` and ``features``), then one per feature
        and task (``feature``); ``held_out`` / ``held_out_half`` repeat the task's flags.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": str(out / "effects.json"), "csv": str(out / "effects.csv"), "table": str(out / "effects.md")}
        data = self.to_dict()
        (out / "effects.json").write_text(json.dumps({**data, "files": files}, indent=2))
        columns = ["row", "task", "seed", "features", "held_out", "held_out_half", "n_critical", "n_correct_before", "n_correct_after",
                   "acc_before_nominal", "acc_after", "delta_pp", "delta_measured_pp", "prompt_mismatches", "n_docs", "full_acc_before",
                   "full_acc_after", "full_delta_pp", "n_controls", "controls_mean_pp", "controls_std_pp", "controls_min_pp",
                   "controls_max_pp", "outside_controls"]
        by_task = {row["task"]: row for row in data["rows"]}
        lines = [{**row, "row": "set", "seed": None, "features": None} for row in data["rows"]]
        for kind, others in (("control", data["controls"]), ("feature", data["per_feature"])):
            for other in others:
                task = by_task[other["task"]]
                lines.append({**other, "row": kind, "features": ";".join(str(k) for k in other["features"]),
                              "held_out": task["held_out"], "held_out_half": task["held_out_half"],
                              "n_correct_before": task["n_correct_before"], "acc_before_nominal": task["acc_before_nominal"]})
        with open(out / "effects.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for line in lines:
                writer.writerow(["" if line.get(c) is None else line[c] for c in columns])
        parts = [format_effects_table(self)]
        if self.controls:
            parts.append("Frequency-matched random control sets (docs/methods.md sec. 11), delta (pp) per task:\n\n" + format_set_table(self, "control"))
        if self.per_feature:
            parts.append("Each feature of S alone, delta (pp) per task:\n\n" + format_set_table(self, "feature"))
        parts.append(paper_table(self))
        (out / "effects.md").write_text("\n\n".join(parts) + "\n")
        return files


def _pp(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _aligned(columns: list[str], lines: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(columns[j]), *(len(cells[j]) for cells in lines)) for j in range(len(columns))]
    fmt = "  ".join(f"{{:<{w}}}" if j < left else f"{{:>{w}}}" for j, w in enumerate(widths))
    return [fmt.format(*columns), "  ".join("-" * w for w in widths)] + [fmt.format(*cells).rstrip() for cells in lines]


def format_effects_table(effects: InterventionEffects) -> str:
    """A plain-text table of the effects, one task per line: |G_t|, correct before/after, delta (pp),
    held-out flag (``yes``; ``half``: only the held-out half of G_t evaluated), with controls their
    mean ± std, [min, max] and whether delta lies outside, and with full-task runs, full-task
    accuracy before/after."""
    s = effects.settings
    head = (f"{s.get('mode')} {s.get('n_features')} features of branch {s.get('model_name')!r} in model {s.get('model')} "
            f"(role {s.get('role')}: acc_before on G_t = {NOMINAL_ACC_BEFORE.get(s.get('role'), float('nan')):.0f}%), positions {s.get('positions')}")
    if any(row.held_out_half for row in effects.rows):
        head += f"; held-out half of G_t (split seed {(s.get('split_half') or {}).get('seed')})"
    full = any(row.n_docs is not None for row in effects.rows)
    controlled = any(row.n_controls for row in effects.rows)
    columns = ["task", "held-out", "|G_t|", "right before", "right after", "delta (pp)", "measured delta (pp)"]
    if controlled:
        columns += ["controls mean ± std (pp)", "controls [min, max]", "outside"]
    if full:
        columns += ["full before (%)", "full after (%)", "full delta (pp)"]
    lines = []
    for row in effects.rows:
        flag = "half" if row.held_out_half else "yes" if row.held_out else ""
        if row.n_critical:
            cells = [row.task, flag, str(row.n_critical),
                     f"{row.n_correct_before}/{row.n_critical}" if row.n_correct_before is not None else "-",
                     f"{row.n_correct_after}/{row.n_critical}", _pp(row.delta_pp), _pp(row.delta_measured_pp)]
        else:
            cells = [row.task, flag, "0", "no critical samples", "", "", ""]
        if controlled:
            if row.n_controls:
                spread = f" ± {row.controls_std_pp:.1f}" if row.controls_std_pp is not None else ""
                cells += [f"{_pp(row.controls_mean_pp)}{spread}", f"[{_pp(row.controls_min_pp)}, {_pp(row.controls_max_pp)}]",
                          "yes" if row.outside_controls else "no"]
            else:
                cells += ["", "", ""]
        if full:
            cells += [_pp(row.full_acc_before, False), _pp(row.full_acc_after, False), _pp(row.full_delta_pp)]
        lines.append(cells)
    return "\n".join([head, *_aligned(columns, lines)])


def format_set_table(effects: InterventionEffects, kind: str) -> str:
    """Plain-text table of the control sets (``kind="control"``: one line per seed, with the set) or
    of the single features of S (``kind="feature"``: one line per feature): delta (pp) per task with G_t."""
    if kind not in ("control", "feature"):
        raise ProbeError(f"kind {kind!r}: expected 'control' or 'feature'")
    others = effects.controls if kind == "control" else effects.per_feature
    tasks = list(dict.fromkeys(o.task for o in others))
    key = (lambda o: o.seed) if kind == "control" else (lambda o: o.features[0])
    groups: dict[Any, dict[str, SetEffect]] = {}
    for other in others:
        groups.setdefault(key(other), {})[other.task] = other
    columns = ["seed" if kind == "control" else "feature", *tasks]
    lines = [[str(k), *(_pp(group[t].delta_pp) if t in group else "-" for t in tasks)] for k, group in groups.items()]
    if kind == "control":
        columns.append("features")
        for cells, group in zip(lines, groups.values()):
            features = next(iter(group.values())).features
            cells.append(",".join(str(f) for f in features[:12]) + (f",... ({len(features)})" if len(features) > 12 else ""))
    return "\n".join(_aligned(columns, lines, left=1))


def control_summary_lines(effects: InterventionEffects) -> list[str]:
    """One line per task with controls: S's delta, the controls' mean, std, [min, max] (pp) and
    whether S lies outside their range."""
    out = []
    for row in effects.rows:
        if not row.n_controls:
            continue
        std = f", std {row.controls_std_pp:.1f}" if row.controls_std_pp is not None else ""
        verdict = "OUTSIDE the controls' range" if row.outside_controls else "within the controls' range"
        out.append(f"controls {row.task}: delta {_pp(row.delta_pp)} pp vs {row.n_controls} frequency-matched random sets: "
                   f"mean {_pp(row.controls_mean_pp)}{std}, range [{_pp(row.controls_min_pp)}, {_pp(row.controls_max_pp)}] pp -> {verdict}")
    return out


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
    if any(row.held_out_half for row in rows):
        lines.append("\n" + ", ".join(row.task for row in rows if row.held_out_half) + ": held-out half of G_t only (features selected on the other half)")
    return "\n".join(lines)


# -- the whole computation --------------------------------------------------------------------------------


def _feature_spec(cc, features) -> tuple[list[int], str, dict[str, Any]]:
    """(indices, the model_args value for probe-hf, the feature set's provenance or {})."""
    from posttrain_probe.analysis.feature_sets import load_feature_set, resolve_features

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
    control_seeds: int | Sequence[int] = DEFAULT_CONTROL_SEEDS,
    control_seed: int = 0,
    control_bins: int = DEFAULT_FREQUENCY_BINS,
    per_feature: bool = False,
    allow_model_mismatch: bool = False,
) -> InterventionEffects:
    """Run a feature intervention on G_t of every task and measure the change (docs/methods.md sec. 7, paper R tables 2-5),
    beside frequency-matched random control sets (docs/methods.md sec. 11) and, optionally, each feature alone.

    Args:
        features: the feature set (feature-set JSON, ``3,17,42`` or indices); a JSON made for another
            crosscoder is refused. A JSON written by ``features generalization --split-half`` makes the
            tasks it was selected on be evaluated on their held-out half of G_t only.
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
            model_args for every run (e.g. ``{"dtype": "bfloat16"}``: use those of the critical runs).
        reference: dataset spec of the reference corpus: steer's max activations and the controls'
            firing rates (default for the controls: the prompts of the evaluated G_t documents).
        apply_chat_template, num_fewshot, batch_size, device: as lm-eval's options (use those of the
            critical runs: the prompts are compared with critical.json's).
        output_path: if given, lm-eval's results and sample logs of every run go to
            ``<output_path>/<run>`` (``before``, ``after``, ``control-seed<s>``, ``feature-<k>``).
        control_seeds: number of frequency-matched control sets (seeds ``control_seed``,
            ``control_seed + 1``, ...; 0 disables them) or the list of seeds (distinct ints >= 0).
        control_seed: first seed when ``control_seeds`` is a number.
        control_bins: equal-count frequency bins of the live features
            (:func:`~posttrain_probe.analysis.controls.control_feature_sets`; fewer are used, with a
            note, when a bin has too few candidates).
        per_feature: also intervene on every feature of S alone (one lm-eval run per feature).
        allow_model_mismatch: evaluate even when ``model`` is not the model its crosscoder branch was
            trained on (nor tuned from it), which is refused otherwise (:mod:`posttrain_probe.model_identity`);
            the mismatch is recorded in the settings (``model_mismatch``).

    Returns:
        :class:`InterventionEffects` (deltas in percentage points; counts behind them; one
        :class:`SetEffect` per control set and task and, with ``per_feature``, per feature and task).
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
    seeds = _control_seed_list(control_seeds, control_seed)
    if isinstance(control_bins, bool) or not isinstance(control_bins, int) or control_bins < 1:
        raise ProbeError(f"control_bins={control_bins!r}: expected a positive int (frequency bins of the controls)")
    _check_intervention(cc, indices, mode=mode, value=value, model_name=model_name, positions=positions, reference=reference, controls=bool(seeds))
    model_mismatch = check_model_path(model_path, slot_fingerprint(cc, cc.model_index(model_name)), model_name, allow_mismatch=allow_model_mismatch)

    available, empty, data = load_critical(critical)
    held = split_names(held_out_tasks or [])
    in_file = [*data["tasks"], *[t for t in empty if t not in data["tasks"]]]
    requested = list(dict.fromkeys([*(split_names(tasks) if tasks is not None else in_file), *held]))
    used, skipped = choose_tasks(list(available), empty, requested)
    order = [t for t in requested if t in used or t in skipped]
    selection_tasks = provenance.get("tasks")
    held_set = set(held)
    split = _held_out_halves(provenance, available, used)
    available = {**available, **{t: available[t].subset(docs) for t, docs in split.items()}}

    def is_held_out(task: str) -> bool:
        return task in held_set or (isinstance(selection_tasks, list) and task not in selection_tasks)

    if not used and not full_task:
        raise ProbeError(f"no task has generalization-critical samples (tasks without any: {skipped}); nothing to evaluate on G_t")

    base_args: dict[str, Any] = {"pretrained": str(model_path), **dict(model_args or {})}
    after_args: dict[str, Any] = {**base_args, "crosscoder": str(cc_dir), "features": features_arg, "mode": mode,
                                  "model_name": model_name, "positions": positions}
    if value is not None:
        after_args["value"] = value
    if mode == "steer":
        after_args["reference"] = reference
    if allow_model_mismatch:
        after_args["allow_model_mismatch"] = True

    controls_info: dict[str, Any] | None = None
    drawn = None
    if seeds and used:
        drawn, controls_info = _draw_controls(cc, cc_dir, model_name, model_path, indices, seeds, control_bins, reference,
                                              [p for t in used for p in available[t].prompts], used, base_args, device, allow_model_mismatch)
    elif seeds:
        controls_info = {"seeds": seeds, "skipped": "no task has generalization-critical samples: no controls (their deltas are on G_t)"}

    variants: list[tuple[str, dict[str, Any]]] = [("before", base_args), ("after", after_args)]
    if drawn is not None:
        variants += [(f"control-seed{seed}", {**after_args, "features": ";".join(str(k) for k in sorted(cset))})
                     for seed, cset in zip(drawn.seeds, drawn.sets)]
    if per_feature:
        variants += [(f"feature-{k}", {**after_args, "features": str(k)}) for k in indices]

    eval_tasks = order if full_task else used
    samples = None if full_task else {t: available[t].doc_ids for t in used}
    runs = {}
    task_manager = make_task_manager(eval_tasks, include_path)  # indexed once for every run
    for label, args in variants:
        runs[label] = evaluate(
            args, eval_tasks, samples=samples, include_path=include_path, log_samples=True,
            output_path=None if output_path is None else str(Path(output_path) / label), batch_size=batch_size,
            apply_chat_template=apply_chat_template, num_fewshot=num_fewshot, device=device, task_manager=task_manager,
        )

    rows, control_rows, feature_rows = [], [], []
    for task in order:
        entry = data["tasks"].get(task, {})
        row = TaskEffect(task=task, held_out=is_held_out(task), n_critical=len(available[task].doc_ids) if task in available else 0,
                         held_out_half=task in split)
        records = {label: _records(runs[label], task) for label in runs} if task in eval_tasks else {}
        if row.n_critical:
            g = available[task]
            correct = {label: _correct_by_doc(records[label], entry, task, g.doc_ids) for label in runs}
            row.n_correct_before = sum(correct["before"].values())
            row.acc_before_nominal = NOMINAL_ACC_BEFORE[role]
            after = _set_effect("set", task, indices, None, correct["before"], correct["after"], role)
            row.n_correct_after, row.acc_after, row.delta_pp = after.n_correct_after, after.acc_after, after.delta_pp
            row.delta_measured_pp, row.flipped_docs = after.delta_measured_pp, after.flipped_docs
            prompts = _prompts_by_doc(records["before"], entry, task)
            row.prompt_mismatches = sum(1 for d, p in zip(g.doc_ids, g.prompts) if prompts.get(d) != p)
            if drawn is not None:
                mine = [_set_effect("control", task, sorted(cset), seed, correct["before"], correct[f"control-seed{seed}"], role)
                        for seed, cset in zip(drawn.seeds, drawn.sets)]
                spread = control_spread(row.delta_pp, [c.delta_pp for c in mine])
                row.n_controls, row.controls_mean_pp, row.controls_std_pp = spread.n, spread.mean, spread.std
                row.controls_min_pp, row.controls_max_pp, row.outside_controls = spread.min, spread.max, spread.outside
                control_rows += mine
            if per_feature:
                feature_rows += [_set_effect("feature", task, [k], None, correct["before"], correct[f"feature-{k}"], role) for k in indices]
        if full_task:
            both = {label: _correct_by_doc(records[label], entry, task, None) for label in ("before", "after")}
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
        "model_mismatch": model_mismatch,
        "apply_chat_template": apply_chat_template,
        "num_fewshot": num_fewshot,
        "per_feature": per_feature,
        "controls": controls_info,
        "split_half": {"seed": provenance["split_half"].get("seed"), "held_out_doc_ids": split} if split else None,
        "delta": "100 * (acc_after - acc_before) in percentage points on G_t; acc_before = 100% (role rl) or 0% (role base)",
    }
    return InterventionEffects(rows, settings, controls=control_rows, per_feature=feature_rows, runs=runs)


def _control_seed_list(control_seeds, control_seed) -> list[int]:
    """The control seeds: ``control_seeds`` ints as given, or a count n -> control_seed .. control_seed + n - 1."""
    def bad_int(v) -> bool:
        return isinstance(v, bool) or not isinstance(v, int)

    if isinstance(control_seeds, Sequence) and not isinstance(control_seeds, str):
        seeds = list(control_seeds)
        if any(bad_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ProbeError(f"control_seeds={seeds!r}: expected distinct ints >= 0 (one control set per seed)")
        return seeds
    if bad_int(control_seeds) or control_seeds < 0:
        raise ProbeError(f"control_seeds={control_seeds!r}: expected the number of control sets (int >= 0; 0 disables them) or a list of seeds")
    if bad_int(control_seed) or control_seed < 0:
        raise ProbeError(f"control_seed={control_seed!r}: expected an int >= 0 (the first control seed)")
    return list(range(control_seed, control_seed + control_seeds))


def _draw_controls(cc, cc_dir, model_name, model_path, indices, seeds, n_bins, reference, prompts, used, base_args, device, allow_model_mismatch=False):
    """(ControlSets, settings["controls"]): firing rates of branch ``model_name``'s per-source codes on
    the reference corpus (``reference`` or the G_t ``prompts``; cached next to the crosscoder) and one
    frequency-matched set per seed."""
    from posttrain_probe.analysis.controls import control_feature_sets, frequency_bins
    from posttrain_probe.interventions.features import source_activation_stats
    from posttrain_probe.models import load_causal_lm, load_tokenizer

    layer = cc.config.layer
    tokenizer = load_tokenizer(model_path)
    lm = load_causal_lm(model_path, dtype=base_args.get("dtype", "auto"), device=device, keep_layers=layer)
    data = reference if reference is not None else prompts
    stats = source_activation_stats(cc, model_name, lm, data, tokenizer=tokenizer, cache_dir=cc_dir / "max_activations",
                                    allow_model_mismatch=allow_model_mismatch)
    del lm
    drawn = control_feature_sets(stats.frequency, indices, seeds, n_bins=n_bins)
    frequency = stats.frequency.tolist()
    bins = frequency_bins(stats.frequency, drawn.n_bins).tolist()
    info = {
        "seeds": drawn.seeds,
        "n_bins": drawn.n_bins,
        "requested_bins": drawn.requested_bins,
        "note": drawn.note,
        "matching": "per selected feature, a distinct random feature of the same frequency bin (bin 0: never fires; bins 1..n: "
                    "equal-count bins of the live features by firing rate), none of S (analysis.controls.frequency_matched_controls)",
        "reference": str(reference) if reference is not None else f"prompts of the evaluated G_t documents of {', '.join(used)} ({len(prompts)} prompts)",
        "frequency": f"fraction of reference tokens with f_i^{model_name} > 0 (per-source code of the intervened branch)",
        "n_reference_tokens": stats.n_tokens,
        "selected": {"features": indices, "bins": [bins[k] for k in indices], "frequency": [frequency[k] for k in indices]},
        "sets": [{"seed": seed, "features": cset, "bins": [bins[k] for k in cset], "frequency": [frequency[k] for k in cset]}
                 for seed, cset in zip(drawn.seeds, drawn.sets)],
    }
    return drawn, info


def _held_out_halves(provenance: Mapping[str, Any], available: Mapping[str, Any], used: Sequence[str]) -> dict[str, list[int]]:
    """{task: held-out doc ids} of a feature set selected on one half of G_t (``features generalization
    --split-half``), for the evaluated tasks it was split on; {} otherwise. The two halves must make up
    the task's G_t in ``critical`` exactly (else the set was selected on another critical file)."""
    split = provenance.get("split_half")
    if not split:
        return {}
    if not isinstance(split, Mapping) or not isinstance(split.get("held_out_doc_ids"), Mapping) or not isinstance(split.get("selection_doc_ids"), Mapping):
        raise ProbeError("the feature set's provenance has a malformed split_half; expected held_out_doc_ids and selection_doc_ids per task")
    out = {}
    for task, held in split["held_out_doc_ids"].items():
        if task not in used:
            continue
        held = [int(d) for d in held]
        selection = [int(d) for d in split["selection_doc_ids"].get(task, [])]
        if set(held) & set(selection) or sorted(held + selection) != sorted(available[task].doc_ids):
            raise ProbeError(
                f"task {task!r}: the feature set was selected on half of another G_t (its halves hold {len(selection)} + {len(held)} "
                f"doc ids, critical.json has {len(available[task].doc_ids)} that are not the same); expected the critical file it was selected with"
            )
        if not held:
            raise ProbeError(f"task {task!r}: the held-out half of G_t is empty; nothing to evaluate it on")
        out[task] = held
    return out


def _set_effect(kind: str, task: str, features: Sequence[int], seed: int | None, before: Mapping[int, bool], after: Mapping[int, bool], role: str) -> SetEffect:
    """The counts and deltas of one run on G_t (``before``/``after``: doc id -> correct, same docs)."""
    n = len(after)
    right = sum(after.values())
    return SetEffect(kind=kind, task=task, features=list(features), seed=seed, n_critical=n, n_correct_after=right,
                     acc_after=100.0 * right / n, delta_pp=intervention_delta(right, n, role),
                     delta_measured_pp=100.0 * (right - sum(before.values())) / n,
                     flipped_docs=sorted(d for d in after if before[d] != after[d]))


def _check_intervention(cc, indices, *, mode, value, model_name, positions, reference, controls=False) -> None:
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
    if reference is not None and not controls:
        raise ProbeError(f"reference is only used by mode steer and by the controls' firing rates (mode is {mode!r}, controls are off)")
    FeatureIntervention(cc, indices, mode=mode, value=value, model_name=model_name, positions=positions)


def _records(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    samples = (results or {}).get("samples") or {}
    if task not in samples:
        raise ProbeError(f"the lm-eval run logged no samples for task {task!r} (logged: {sorted(samples)})")
    return list(samples[task])


def _correct_by_doc(records: Sequence[Mapping[str, Any]], entry: Mapping[str, Any], task: str, doc_ids: Sequence[int] | None) -> dict[int, bool]:
    """doc id -> correct, scored exactly as ``posttrain-probe critical`` scores (the task's metric in
    critical.json > 0, on the records of its filter), for ``doc_ids`` (all documents if None)."""
    from posttrain_probe.analysis.critical import is_correct, records_by_doc

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
    from posttrain_probe.analysis.critical import records_by_doc, record_context

    _, docs = records_by_doc(task, records, entry.get("filter"), "the lm-eval run")
    return {doc: record_context(record) for doc, record in docs.items()}
