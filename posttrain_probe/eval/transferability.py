"""Transferability of post-training gains (docs/methods.md sec. 13): per paradigm, the gain on in-domain tasks
against the gain (or loss) on general and held-out tasks, relative to the base model. Torch-free arithmetic on
accuracies, so the study's report and a user's own tables compute it the same way::

    from posttrain_probe.eval.transferability import transferability
    rows = transferability({"base": {"math": 20.0, "sciq": 50.0}, "rl": {"math": 30.0, "sciq": 55.0}},
                           {"in_domain": ["math"], "general": ["sciq"]})
    rows[0].index["general"]   # 100 * (+10 %) / (+50 %) = 20.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from posttrain_probe.errors import ProbeError

IN_DOMAIN = "in_domain"
"""The group the transferability index is relative to."""


@dataclass
class Transfer:
    """One model's gains against the base, per task group (groups with no task scored by both are left out)."""

    model: str
    gain: dict[str, float] = field(default_factory=dict)
    """Group -> mean accuracy change against the base over its tasks, in percentage points (Delta-bar)."""
    relative_gain: dict[str, float] = field(default_factory=dict)
    """Group -> mean relative change (acc - acc_base) / acc_base over its tasks with acc_base > 0 (r-bar; 0.5 = +50 %)."""
    index: dict[str, float | None] = field(default_factory=dict)
    """Group (other than in-domain) -> transferability index 100 * r-bar_G / r-bar_in; None when the model did not
    gain in-domain (r-bar_in <= 0: there is no gain to transfer)."""


def transferability(
    accuracies: Mapping[str, Mapping[str, float]], groups: Mapping[str, Sequence[str]], *, base: str = "base"
) -> list[Transfer]:
    """Per model other than ``base``: mean gain (pp), mean relative gain and transferability index per group.

    ``accuracies``: model -> task -> accuracy (any fixed unit, e.g. %); ``groups``: group name -> task names,
    one of them :data:`IN_DOMAIN`. A task counts in a group's means when both the model and the base scored it;
    relative gains skip tasks the base scored 0 on. Returns one :class:`Transfer` per model, in input order.
    """
    if base not in accuracies:
        raise ProbeError(f"base model {base!r} has no accuracies: expected one of {sorted(accuracies)}")
    if IN_DOMAIN not in groups:
        raise ProbeError(f"groups {sorted(groups)}: expected an {IN_DOMAIN!r} group (the gains are relative to it)")
    reference = accuracies[base]
    rows = []
    for model, acc in accuracies.items():
        if model == base:
            continue
        row = Transfer(model)
        for group, tasks in groups.items():
            shared = [t for t in tasks if t in acc and t in reference]
            if not shared:
                continue
            row.gain[group] = sum(acc[t] - reference[t] for t in shared) / len(shared)
            scaled = [(acc[t] - reference[t]) / reference[t] for t in shared if reference[t] > 0]
            if scaled:
                row.relative_gain[group] = sum(scaled) / len(scaled)
        inside = row.relative_gain.get(IN_DOMAIN)
        for group in row.relative_gain:
            if group != IN_DOMAIN:
                row.index[group] = 100.0 * row.relative_gain[group] / inside if inside and inside > 0 else None
        rows.append(row)
    return rows
