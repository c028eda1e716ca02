"""The result of ``intervene`` (:class:`InterventionEffects`, docs/methods.md sec. 7 and 11; paper R tables 2-5):
one :class:`TaskEffect` per task, the control and per-feature rows (:class:`SetEffect`), the settings; the delta
formula :func:`intervention_delta`. Written to ``effects.json``, ``effects.csv`` and ``effects.md`` and read back
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
        from posttrain_probe.eval.effects_tables import format_effects_table, format_set_table, paper_table

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
