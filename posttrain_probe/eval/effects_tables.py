"""Plain-text and Markdown tables of :class:`~posttrain_probe.eval.effects.InterventionEffects`: the effect per
task, the control and single-feature tables, the control summary lines and the row of paper R tables 2-5."""

from __future__ import annotations

from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.effects import NOMINAL_ACC_BEFORE, InterventionEffects, SetEffect


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
