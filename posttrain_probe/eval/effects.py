"""The result of ``intervene`` (:class:`InterventionEffects`, docs/methods.md sec. 7 and 11; paper R tables 2-5):
one :class:`TaskEffect` per task, the control and per-feature rows (:class:`SetEffect`), the settings; the delta
formula :func:`intervention_delta`; its plain-text and Markdown tables (:func:`format_effects_table`,
:func:`format_set_table`, :func:`control_summary_lines`, :func:`paper_table`). Written to ``effects.json``, ``effects.csv`` and ``effects.md`` and read back
from ``effects.json`` (:meth:`InterventionEffects.read`)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from posttrain_probe.analysis.jsonable import json_safe
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.intervene_config import ROLES

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
    """The lm-eval task name."""
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
    """The lm-eval task name."""
    features: list[int]
    """The set intervened on (sorted; one index for ``feature``)."""
    seed: int | None = None
    """``control``: the sampler's seed."""
    n_critical: int = 0
    """|G_t| evaluated (as in the task's :class:`TaskEffect`)."""
    n_correct_after: int | None = None
    """Documents of G_t answered correctly with the intervention."""
    acc_after: float | None = None
    """Percent."""
    delta_pp: float | None = None
    """:func:`intervention_delta`, percentage points."""
    delta_measured_pp: float | None = None
    """acc_after minus the measured acc_before (the shared un-intervened run), percentage points."""
    flipped_docs: list[int] = field(default_factory=list)
    """Doc ids of G_t whose correctness the intervention changed."""


@dataclass
class InterventionEffects:
    """Result of :func:`~posttrain_probe.eval.intervention_effects.intervene`: one :class:`TaskEffect` per task, the control and
    per-feature rows (:class:`SetEffect`) and the settings."""

    rows: list[TaskEffect]
    """One row per task (selection tasks, then held-out tasks)."""
    settings: dict[str, Any]
    """What was run: crosscoder, feature set and its provenance, mode, value, model, tasks, lm-eval arguments."""
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
            notes.append(
                f"tasks without generalization-critical samples (no delta on G_t): {', '.join(self.no_critical)}"
            )
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
            notes.append(
                f"evaluated on the held-out half of G_t only (the features were selected on the other half, split seed {seed}): {', '.join(halves)}"
            )
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
        return json_safe(
            {
                "format": RESULT_FORMAT,
                "format_version": RESULT_FORMAT_VERSION,
                "settings": self.settings,
                "rows": rows,
                "controls": [asdict(c) for c in self.controls],
                "per_feature": [asdict(f) for f in self.per_feature],
                "no_critical": self.no_critical,
                "notes": self.notes,
            }
        )

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
        columns = [
            "row",
            "task",
            "seed",
            "features",
            "held_out",
            "held_out_half",
            "n_critical",
            "n_correct_before",
            "n_correct_after",
            "acc_before_nominal",
            "acc_after",
            "delta_pp",
            "delta_measured_pp",
            "prompt_mismatches",
            "n_docs",
            "full_acc_before",
            "full_acc_after",
            "full_delta_pp",
            "n_controls",
            "controls_mean_pp",
            "controls_std_pp",
            "controls_min_pp",
            "controls_max_pp",
            "outside_controls",
        ]
        by_task = {row["task"]: row for row in data["rows"]}
        lines = [{**row, "row": "set", "seed": None, "features": None} for row in data["rows"]]
        for kind, others in (("control", data["controls"]), ("feature", data["per_feature"])):
            for other in others:
                task = by_task[other["task"]]
                lines.append(
                    {
                        **other,
                        "row": kind,
                        "features": ";".join(str(k) for k in other["features"]),
                        "held_out": task["held_out"],
                        "held_out_half": task["held_out_half"],
                        "n_correct_before": task["n_correct_before"],
                        "acc_before_nominal": task["acc_before_nominal"],
                    }
                )
        with open(out / "effects.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for line in lines:
                writer.writerow(["" if line.get(c) is None else line[c] for c in columns])
        parts = [format_effects_table(self)]
        if self.controls:
            parts.append(
                "Frequency-matched random control sets (docs/methods.md sec. 11), delta (pp) per task:\n\n"
                + format_set_table(self, "control")
            )
        if self.per_feature:
            parts.append("Each feature of S alone, delta (pp) per task:\n\n" + format_set_table(self, "feature"))
        parts.append(paper_table(self))
        (out / "effects.md").write_text("\n\n".join(parts) + "\n")
        return files

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> InterventionEffects:
        """The effects :meth:`write` wrote to ``out_dir`` (from ``effects.json``; the lm-eval ``runs`` are not read)."""
        path = Path(out_dir) / "effects.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read {path}: {err}") from err
        if data.get("format") != RESULT_FORMAT or data.get("format_version") != RESULT_FORMAT_VERSION:
            raise ProbeError(
                f"{path} is not {RESULT_FORMAT} version {RESULT_FORMAT_VERSION} (format {data.get('format')!r}, version {data.get('format_version')!r})"
            )
        task_fields = {f.name for f in fields(TaskEffect)}
        rows = [TaskEffect(**{k: v for k, v in row.items() if k in task_fields}) for row in data["rows"]]
        return cls(
            rows,
            data["settings"],
            controls=[SetEffect(**c) for c in data["controls"]],
            per_feature=[SetEffect(**f) for f in data["per_feature"]],
        )


# -- tables (plain text / Markdown) ----------------------------------------------------------------
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
    head = (
        f"{s.get('mode')} {s.get('n_features')} features of branch {s.get('model_name')!r} in model {s.get('model')} "
        f"(role {s.get('role')}: acc_before on G_t = {NOMINAL_ACC_BEFORE.get(s.get('role'), float('nan')):.0f}%), positions {s.get('positions')}"
    )
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
            cells = [
                row.task,
                flag,
                str(row.n_critical),
                f"{row.n_correct_before}/{row.n_critical}" if row.n_correct_before is not None else "-",
                f"{row.n_correct_after}/{row.n_critical}",
                _pp(row.delta_pp),
                _pp(row.delta_measured_pp),
            ]
        else:
            cells = [row.task, flag, "0", "no critical samples", "", "", ""]
        if controlled:
            if row.n_controls:
                spread = f" ± {row.controls_std_pp:.1f}" if row.controls_std_pp is not None else ""
                cells += [
                    f"{_pp(row.controls_mean_pp)}{spread}",
                    f"[{_pp(row.controls_min_pp)}, {_pp(row.controls_max_pp)}]",
                    "yes" if row.outside_controls else "no",
                ]
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
            cells.append(
                ",".join(str(f) for f in features[:12]) + (f",... ({len(features)})" if len(features) > 12 else "")
            )
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
        out.append(
            f"controls {row.task}: delta {_pp(row.delta_pp)} pp vs {row.n_controls} frequency-matched random sets: "
            f"mean {_pp(row.controls_mean_pp)}{std}, range [{_pp(row.controls_min_pp)}, {_pp(row.controls_max_pp)}] pp -> {verdict}"
        )
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
        lines.append(
            "\n"
            + ", ".join(row.task for row in rows if row.held_out_half)
            + ": held-out half of G_t only (features selected on the other half)"
        )
    return "\n".join(lines)
