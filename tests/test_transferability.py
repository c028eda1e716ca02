"""The transferability summary (docs/methods.md sec. 13) against hand-computed values."""

from __future__ import annotations

import pytest

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.transferability import transferability

GROUPS = {"in_domain": ["math500", "aime24"], "general": ["sciq", "piqa"], "held_out": ["logiqa"]}
ACC = {
    "base": {"math500": 20.0, "aime24": 0.0, "sciq": 50.0, "piqa": 80.0, "logiqa": 30.0},
    "sft": {"math500": 40.0, "aime24": 10.0, "sciq": 40.0, "piqa": 72.0, "logiqa": 30.0},
    "rl": {"math500": 30.0, "aime24": 3.0, "sciq": 55.0, "piqa": 84.0},
    "flat": {"math500": 18.0, "aime24": 0.0, "sciq": 60.0, "piqa": 80.0, "logiqa": 33.0},
}


def test_gains_relative_gains_and_index_match_hand_computation():
    rows = {row.model: row for row in transferability(ACC, GROUPS)}
    assert list(rows) == ["sft", "rl", "flat"]
    sft = rows["sft"]
    # pp: in-domain (20 + 10) / 2; general (-10 - 8) / 2; held-out 0
    assert sft.gain == pytest.approx({"in_domain": 15.0, "general": -9.0, "held_out": 0.0})
    # relative: aime24 has base 0 -> left out; math500 +100 %; general (-20 % - 10 %) / 2
    assert sft.relative_gain == pytest.approx({"in_domain": 1.0, "general": -0.15, "held_out": 0.0})
    assert sft.index == pytest.approx({"general": -15.0, "held_out": 0.0})
    rl = rows["rl"]  # no logiqa score: no held-out group
    assert rl.relative_gain == pytest.approx({"in_domain": 0.5, "general": (0.1 + 0.05) / 2})
    assert rl.index == pytest.approx({"general": 100 * 0.075 / 0.5}) and "held_out" not in rl.gain
    assert rows["flat"].index == {"general": None, "held_out": None}  # no in-domain gain to transfer


def test_missing_base_or_in_domain_group_is_a_one_line_error():
    with pytest.raises(ProbeError, match="base model 'base' has no accuracies: expected one of"):
        transferability({"rl": {"a": 1.0}}, GROUPS)
    with pytest.raises(ProbeError, match="expected an 'in_domain' group"):
        transferability(ACC, {"general": ["sciq"]})
