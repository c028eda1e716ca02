"""Intervention effects on generalization-critical samples (docs/methods.md sec. 7, paper R tables 2-5): deltas end to end
on tiny models through real lm-eval runs (`posttrain-probe intervene` and the Python API), held-out flags,
full-task accuracy, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from _critical_runs import critical_runs
from typer.testing import CliRunner

from posttrain_probe.cli import app
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.effects import InterventionEffects, format_effects_table, intervention_delta, paper_table
from posttrain_probe.eval.generalization import features_generalization
from posttrain_probe.eval.generalization_config import GeneralizationConfig
from posttrain_probe.eval.intervene_config import InterveneConfig
from posttrain_probe.eval.intervention_effects import intervene, resolve_role


def test_intervention_delta_worked_values():
    assert intervention_delta(3, 8, "rl") == -62.5  # 100 (3/8 - 1)
    assert intervention_delta(8, 8, "rl") == 0.0
    assert intervention_delta(2, 8, "base") == 25.0  # 100 (2/8 - 0)
    assert intervention_delta(0, 3, "base") == 0.0
    with pytest.raises(ProbeError, match="outside"):
        intervention_delta(9, 8, "rl")
    with pytest.raises(ProbeError, match="at least one critical sample"):
        intervention_delta(0, 0, "rl")
    with pytest.raises(ProbeError, match="role 'sft'"):
        intervention_delta(1, 2, "sft")


def test_role_from_provenance_or_option():
    prov = {"base": "base", "rl": "rl"}
    assert resolve_role("rl", None, prov) == "rl" and resolve_role("base", None, prov) == "base"
    assert resolve_role("rl", "rl", prov) == "rl"
    assert resolve_role("other", "base", {}) == "base"
    with pytest.raises(ProbeError, match="contradicts"):
        resolve_role("rl", "base", prov)
    with pytest.raises(ProbeError, match="--role"):
        resolve_role("sft", None, prov)


@pytest.fixture(scope="module")
def runs():
    return critical_runs()


@pytest.fixture(scope="module")
def feature_set(runs, tmp_path_factory):
    """S selected on probe_mcq only: probe_mcq_qa is then a held-out task."""
    out = tmp_path_factory.mktemp("features")
    result = features_generalization(
        GeneralizationConfig(
            crosscoder=runs.crosscoder,
            model=[f"base={runs.base}", f"rl={runs.rl}"],
            critical=runs.critical,
            base="base",
            rl="rl",
            tasks=["probe_mcq"],
            out=out,
        )
    )
    assert result.intersection, "the feature set should not be empty"
    return str(out / "generalization_features.json")


def _check_multiples(effects: dict, critical: dict) -> None:
    for row in effects["rows"]:
        n = row["n_critical"]
        if not n:
            continue
        assert n == critical["tasks"][row["task"]]["n_critical"]
        steps = row["delta_pp"] * n / 100  # delta is a multiple of 100 / |G_t|
        assert abs(steps - round(steps)) < 1e-9
        assert row["delta_pp"] == 100 * (row["n_correct_after"] - (n if row["acc_before_nominal"] == 100 else 0)) / n


def _check_controls(row: dict, controls: list[dict]) -> None:
    """The task's control summary against its control rows: mean, sample std, range, outside flag."""
    deltas = [c["delta_pp"] for c in controls]
    assert row["n_controls"] == len(deltas) > 0
    assert row["controls_mean_pp"] == pytest.approx(sum(deltas) / len(deltas))
    assert (row["controls_min_pp"], row["controls_max_pp"]) == (min(deltas), max(deltas))
    if len(deltas) > 1:
        assert row["controls_std_pp"] == pytest.approx(float(np.std(deltas, ddof=1)))
    assert row["outside_controls"] == (row["delta_pp"] < min(deltas) or row["delta_pp"] > max(deltas))
    assert all(c["n_critical"] == row["n_critical"] for c in controls)


def _loglikelihoods(result: dict, task: str) -> dict[int, list[float]]:
    return {int(r["doc_id"]): [float(x[0]) for x in r["filtered_resps"]] for r in result["samples"][task]}


@pytest.mark.slow
def test_set_in_rl_model_cli(runs, feature_set, tmp_path):
    """A strong set (17.5; the random crosscoder's features are weak) breaks the RL model on part of G_t.
    No --crosscoder: the one the feature set records is used."""
    out = tmp_path / "set-rl"
    result = CliRunner().invoke(
        app,
        [
            "intervene",
            "--features",
            feature_set,
            "--model",
            f"rl={runs.rl}",
            "--mode",
            "set",
            "--value",
            "17.5",
            "--critical",
            str(runs.critical),
            "--include-path",
            str(runs.include_path),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    effects = json.loads((out / "effects.json").read_text())
    critical = json.loads(runs.critical.read_text())
    rows = {row["task"]: row for row in effects["rows"]}
    assert list(rows) == ["probe_math", "probe_mcq", "probe_mcq_qa"]  # every task of critical.json
    assert effects["settings"]["role"] == "rl"  # from the feature set's provenance: branch rl is its RL model
    assert rows["probe_math"]["n_critical"] == 0 and rows["probe_math"]["delta_pp"] is None
    assert effects["no_critical"] == ["probe_math"]
    assert (rows["probe_mcq"]["held_out"], rows["probe_mcq_qa"]["held_out"]) == (False, True)
    for task in ("probe_mcq", "probe_mcq_qa"):
        row = rows[task]
        assert row["acc_before_nominal"] == 100.0
        assert row["n_correct_before"] == row["n_critical"]  # the un-intervened RL model is right on all of G_t
        assert row["prompt_mismatches"] == 0
        assert -100.0 <= row["delta_pp"] <= 0.0 and row["delta_measured_pp"] == row["delta_pp"]
        assert len(row["flipped_docs"]) == row["n_critical"] - row["n_correct_after"]
    _check_multiples(effects, critical)
    assert any(rows[t]["delta_pp"] < 0 for t in ("probe_mcq", "probe_mcq_qa"))
    with open(out / "effects.csv") as handle:
        lines = list(csv.DictReader(handle))
    table = {r["task"]: r for r in lines if r["row"] == "set"}
    assert (
        float(table["probe_mcq"]["delta_pp"]) == rows["probe_mcq"]["delta_pp"]
        and table["probe_mcq_qa"]["held_out"] == "True"
    )
    assert "probe_mcq_qa*" in result.output and "no critical samples" in result.output
    assert (out / "lm_eval" / "before").is_dir() and (out / "lm_eval" / "after").is_dir()
    # default: 5 frequency-matched controls (seeds 0-4) per task with G_t, a summary line per task
    assert effects["format_version"] == 2 and effects["settings"]["controls"]["seeds"] == [0, 1, 2, 3, 4]
    assert [(c["task"], c["seed"]) for c in effects["controls"]] == [
        (t, s) for t in ("probe_mcq", "probe_mcq_qa") for s in range(5)
    ]
    assert sum(r["row"] == "control" for r in lines) == 10 and (out / "lm_eval" / "control-seed4").is_dir()
    for task in ("probe_mcq", "probe_mcq_qa"):
        _check_controls(rows[task], [c for c in effects["controls"] if c["task"] == task])
        assert (
            f"controls {task}: delta {rows[task]['delta_pp']:+.1f} pp vs 5 frequency-matched random sets"
            in result.output
        )
    assert "Frequency-matched random control sets" in (out / "effects.md").read_text()


@pytest.mark.slow
def test_set_in_base_model_full_task(runs, feature_set, tmp_path):
    effects = intervene(
        InterveneConfig(
            features=feature_set,
            crosscoder=runs.crosscoder,
            model=[f"base={runs.base}"],
            critical=runs.critical,
            out=tmp_path,
            mode="set",
            value=3.0,
            tasks=["probe_mcq_qa"],
            full_task=True,
            include_path=[str(runs.include_path)],
            controls=0,
        )
    )
    assert isinstance(effects, InterventionEffects)
    critical = json.loads(runs.critical.read_text())
    entry = critical["tasks"]["probe_mcq_qa"]
    (row,) = effects.rows
    assert row.task == "probe_mcq_qa" and row.held_out and effects.settings["role"] == "base"
    assert row.acc_before_nominal == 0.0 and row.n_correct_before == 0  # the base model is wrong on all of G_t
    assert 0.0 <= row.delta_pp <= 100.0
    _check_multiples(effects.to_dict(), critical)
    # full task: the same documents as the critical runs, so the un-intervened accuracy is the base run's
    assert row.n_docs == entry["n_docs"]
    assert row.full_acc_before == pytest.approx(100.0 * entry["n_base_correct"] / entry["n_docs"])
    assert row.full_delta_pp == pytest.approx(row.full_acc_after - row.full_acc_before)
    # set changes the model's log-likelihoods (no intervention = identity in the "before" run)
    before, after = (_loglikelihoods(effects.runs[k], "probe_mcq_qa") for k in ("before", "after"))
    assert before.keys() == after.keys() and any(before[d] != after[d] for d in before)
    text = format_effects_table(effects)
    assert "full before (%)" in text and "probe_mcq_qa" in text
    assert paper_table(effects).splitlines()[2].startswith("| base (set) |")


@pytest.mark.slow
def test_bad_input(runs, feature_set, tmp_path):
    features_generalization(
        GeneralizationConfig(
            crosscoder=runs.other_crosscoder,
            model=[f"base={runs.base}", f"rl={runs.rl}"],
            critical=runs.critical,
            base="base",
            rl="rl",
            tasks=["probe_mcq"],
            out=tmp_path / "other",
        )
    )
    other_set = str(tmp_path / "other" / "generalization_features.json")
    args = [
        "intervene",
        "--crosscoder",
        str(runs.crosscoder),
        "--critical",
        str(runs.critical),
        "--out",
        str(tmp_path / "x"),
        "--mode",
        "zero",
    ]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--features", other_set, "--model", f"rl={runs.rl}"])
    assert result.exit_code == 2 and "was made for" in result.output  # a feature set of another crosscoder
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"grpo={runs.rl}"])
    assert result.exit_code == 2 and "'grpo' is not in this crosscoder" in result.output
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--role", "base"])
    assert result.exit_code == 2 and "contradicts" in result.output
    result = runner.invoke(app, [*args, "--features", "1,2,3", "--model", f"rl={runs.rl}"])
    assert result.exit_code == 2 and "--role rl" in result.output  # indices carry no provenance
    result = runner.invoke(app, [*args, "--features", "1,2,999", "--model", f"rl={runs.rl}", "--role", "rl"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--tasks", "probe_math"])
    assert result.exit_code == 2 and "no task has generalization-critical samples" in result.output
    result = runner.invoke(
        app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--model", f"base={runs.base}"]
    )
    assert result.exit_code == 2 and "one model" in result.output
    bad = [a if a != "zero" else "ablate" for a in args]
    result = runner.invoke(app, [*bad, "--features", feature_set, "--model", f"rl={runs.rl}"])
    assert result.exit_code == 2 and "'ablate' is not one of" in result.output
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--positions", "last"])
    assert result.exit_code == 2 and "'last' is not one of" in result.output
    result = runner.invoke(app, [*args[:-1], "steer", "--features", feature_set, "--model", f"rl={runs.rl}"])
    assert result.exit_code == 2 and "--reference" in result.output
    result = runner.invoke(
        app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--model-args", "dtype=float32,oops"]
    )
    assert result.exit_code == 2 and "'oops' is not key=value" in result.output
    no_cc = [a for a in args if a not in ("--crosscoder", str(runs.crosscoder))]
    result = runner.invoke(app, [*no_cc, "--features", "1,2,3", "--model", f"rl={runs.rl}", "--role", "rl"])
    assert result.exit_code == 2 and "give --crosscoder DIR" in result.output  # indices name no crosscoder
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--controls", "-1"])
    assert result.exit_code == 2 and "control_seeds=-1" in result.output
    result = runner.invoke(app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--control-bins", "0"])
    assert result.exit_code == 2 and "control_bins=0" in result.output
    result = runner.invoke(
        app, [*args, "--features", feature_set, "--model", f"rl={runs.rl}", "--controls", "0", "--reference", "x.txt"]
    )
    assert result.exit_code == 2 and "controls are off" in result.output
    assert not (tmp_path / "x").exists()  # every refusal came before any lm-eval run


@pytest.mark.slow
def test_zero_in_rl_model_changes_loglikelihoods(runs, feature_set, tmp_path):
    """Features given as indices (no provenance: the role is given)."""
    from posttrain_probe.analysis.feature_sets import load_feature_set

    indices = ",".join(str(i) for i in load_feature_set(feature_set).features)
    effects = intervene(
        InterveneConfig(
            features=indices,
            crosscoder=runs.crosscoder,
            model=[f"rl={runs.rl}"],
            critical=runs.critical,
            out=tmp_path,
            mode="zero",
            role="rl",
            tasks=["probe_mcq"],
            include_path=[str(runs.include_path)],
            controls=0,
        )
    )
    (row,) = effects.rows
    assert not row.held_out and effects.settings["selection_tasks"] is None
    assert row.acc_before_nominal == 100.0 and row.n_correct_before == row.n_critical
    _check_multiples(effects.to_dict(), json.loads(runs.critical.read_text()))
    before, after = (_loglikelihoods(effects.runs[k], "probe_mcq") for k in ("before", "after"))
    assert (
        sorted(before) == json.loads(runs.critical.read_text())["tasks"]["probe_mcq"]["doc_ids"]
    )  # only G_t was evaluated
    assert any(before[d] != after[d] for d in before)


# -- controls (docs/methods.md sec. 11), per-feature rows, split-half selection ---------------------------------------


@pytest.mark.slow
def test_controls_reproducible_and_frequency_matched(runs, feature_set, tmp_path):
    """Seeds 0 and 1, then seed 1 alone: seed 1's set and deltas are identical in both calls, seed 0's set
    differs; every control set matches S bin by bin in firing rate (on the G_t prompts) and avoids S."""
    from posttrain_probe.analysis.controls import frequency_bins
    from posttrain_probe.analysis.feature_sets import load_feature_set
    from posttrain_probe.crosscoder.inspect import load_crosscoder
    from posttrain_probe.interventions import source_activation_stats
    from posttrain_probe.models import load_causal_lm, load_tokenizer

    kwargs = dict(
        features=feature_set,
        crosscoder=runs.crosscoder,
        model=[f"rl={runs.rl}"],
        critical=runs.critical,
        mode="set",
        value=17.5,
        tasks=["probe_mcq"],
        include_path=[str(runs.include_path)],
        control_bins=4,
    )
    first = intervene(InterveneConfig(controls=2, out=tmp_path / "first", **kwargs))
    again = intervene(InterveneConfig(controls=1, control_seed=1, out=tmp_path / "again", **kwargs))
    info, info_again = first.settings["controls"], again.settings["controls"]
    assert info["seeds"] == [0, 1] and info_again["seeds"] == [1]
    assert info["sets"][1] == info_again["sets"][0]  # same seed: the same control set ...
    (c0, c1), (c1_again,) = first.controls, again.controls
    assert (c0.seed, c1.seed, c1_again.seed) == (0, 1, 1)
    assert c1 == c1_again  # ... and the same deltas, counts and flipped documents
    assert c0.features != c1.features  # another seed, another set
    (row,) = first.rows
    _check_controls(first.to_dict()["rows"][0], first.to_dict()["controls"])
    assert row.n_controls == 2 and row.outside_controls == (
        row.delta_pp < min(c0.delta_pp, c1.delta_pp) or row.delta_pp > max(c0.delta_pp, c1.delta_pp)
    )
    # frequency-matched: the bins recorded, and recomputed from the firing rates on the G_t prompts
    selected = load_feature_set(feature_set).features
    critical = json.loads(runs.critical.read_text())
    entry = critical["tasks"]["probe_mcq"]
    stats = source_activation_stats(
        load_crosscoder(runs.crosscoder),
        "rl",
        load_causal_lm(runs.rl, device="cpu", keep_layers=2),
        [entry["prompts"][str(d)] for d in entry["doc_ids"]],
        tokenizer=load_tokenizer(runs.rl),
        cache=False,
    )
    assert stats.n_tokens == info["n_reference_tokens"]
    bins = frequency_bins(stats.frequency, info["n_bins"])
    assert info["selected"]["features"] == selected and info["selected"]["bins"] == [int(bins[k]) for k in selected]
    for drawn, effect in zip(info["sets"], first.controls):
        assert [int(bins[k]) for k in drawn["features"]] == info["selected"]["bins"]
        assert len(set(drawn["features"])) == len(selected) and not set(drawn["features"]) & set(selected)
        assert sorted(drawn["features"]) == effect.features
    assert first.runs.keys() == {"before", "after", "control-seed0", "control-seed1"}


@pytest.mark.slow
def test_per_feature_rows(runs, tmp_path):
    """Two features with per_feature: a row per (task, feature); a one-feature set's per-feature row equals its
    whole-set row and the two-feature run's row of that feature."""
    kwargs = dict(
        crosscoder=runs.crosscoder,
        model=[f"rl={runs.rl}"],
        critical=runs.critical,
        mode="set",
        value=17.5,
        role="rl",
        tasks=["probe_mcq"],
        include_path=[str(runs.include_path)],
        controls=0,
        per_feature=True,
    )
    pair = intervene(InterveneConfig(features="1,6", out=tmp_path / "pair", **kwargs))
    assert [(f.kind, f.task, f.features) for f in pair.per_feature] == [
        ("feature", "probe_mcq", [1]),
        ("feature", "probe_mcq", [6]),
    ]
    (row,) = pair.rows
    for f in pair.per_feature:
        assert (
            f.n_critical == row.n_critical
            and f.delta_pp == 100.0 * (f.n_correct_after - row.n_critical) / row.n_critical
        )
        assert f.delta_measured_pp == 100.0 * (f.n_correct_after - row.n_correct_before) / row.n_critical
    single = intervene(InterveneConfig(features="1", out=tmp_path / "single", **kwargs))
    (one,), (alone,) = single.rows, single.per_feature
    assert (alone.n_correct_after, alone.acc_after, alone.delta_pp, alone.delta_measured_pp, alone.flipped_docs) == (
        one.n_correct_after,
        one.acc_after,
        one.delta_pp,
        one.delta_measured_pp,
        one.flipped_docs,
    )
    assert pair.per_feature[0] == alone
    assert single.runs["feature-1"]["samples"]["probe_mcq"] and not single.controls
    files = pair.write(tmp_path)
    with open(files["csv"]) as handle:
        lines = list(csv.DictReader(handle))
    assert [(r["row"], r["features"]) for r in lines] == [("set", ""), ("feature", "1"), ("feature", "6")]
    assert float(lines[1]["delta_pp"]) == pair.per_feature[0].delta_pp
    assert json.loads((tmp_path / "effects.json").read_text())["per_feature"][1]["features"] == [6]
    assert "Each feature of S alone" in (tmp_path / "effects.md").read_text()


@pytest.mark.slow
def test_split_half_intervene_evaluates_the_held_out_half_only(runs, tmp_path):
    """`features generalization --split-half` on probe_mcq, then `intervene` (2 controls): probe_mcq is evaluated
    on its held-out half only (every run), probe_mcq_qa (not selected on) on all of its G_t."""
    out = tmp_path / "genfeat"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "features",
            "generalization",
            "--crosscoder",
            str(runs.crosscoder),
            "--base",
            "base",
            "--rl",
            "rl",
            "--critical",
            str(runs.critical),
            "--model",
            f"base={runs.base}",
            "--model",
            f"rl={runs.rl}",
            "--tasks",
            "probe_mcq",
            "--split-half",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(selection half;" in result.output
    features = out / "generalization_features.json"
    from posttrain_probe.analysis.feature_sets import load_feature_set

    halves = load_feature_set(features).provenance["split_half"]
    held = halves["held_out_doc_ids"]["probe_mcq"]
    effects = intervene(
        InterveneConfig(
            features=str(features),
            crosscoder=runs.crosscoder,
            model=[f"rl={runs.rl}"],
            critical=runs.critical,
            out=tmp_path / "split",
            mode="set",
            value=17.5,
            tasks=["probe_mcq", "probe_mcq_qa"],
            include_path=[str(runs.include_path)],
            controls=2,
            control_bins=4,
        )
    )
    rows = {row.task: row for row in effects.rows}
    critical = json.loads(runs.critical.read_text())
    assert (
        rows["probe_mcq"].held_out_half and rows["probe_mcq"].n_critical == len(held) and not rows["probe_mcq"].held_out
    )
    assert not rows["probe_mcq_qa"].held_out_half and rows["probe_mcq_qa"].held_out
    assert rows["probe_mcq_qa"].n_critical == critical["tasks"]["probe_mcq_qa"]["n_critical"]
    for label, run in effects.runs.items():  # before, after and both controls: the held-out half only
        assert sorted(int(r["doc_id"]) for r in run["samples"]["probe_mcq"]) == held, label
    assert effects.settings["split_half"] == {"seed": 5, "held_out_doc_ids": {"probe_mcq": held}}
    assert {c.n_critical for c in effects.controls if c.task == "probe_mcq"} == {len(held)}
    assert any("held-out half of G_t only" in note for note in effects.notes)
    assert "held-out half of G_t (split seed 5)" in format_effects_table(effects)
    # the feature set and another critical file (one document less in G_t) do not go together
    other = json.loads(runs.critical.read_text())
    entry = other["tasks"]["probe_mcq"]
    dropped, entry["doc_ids"], entry["n_critical"] = entry["doc_ids"][0], entry["doc_ids"][1:], entry["n_critical"] - 1
    entry["prompts"].pop(str(dropped), None)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ProbeError, match="selected on half of another G_t"):
        intervene(
            InterveneConfig(
                features=str(features),
                crosscoder=runs.crosscoder,
                model=[f"rl={runs.rl}"],
                critical=tmp_path / "other.json",
                out=tmp_path / "other",
                mode="zero",
                tasks=["probe_mcq"],
                include_path=[str(runs.include_path)],
                controls=0,
            )
        )
    # the CLI says so
    result = runner.invoke(
        app,
        [
            "intervene",
            "--features",
            str(features),
            "--model",
            f"rl={runs.rl}",
            "--mode",
            "set",
            "--value",
            "17.5",
            "--critical",
            str(runs.critical),
            "--include-path",
            str(runs.include_path),
            "--tasks",
            "probe_mcq",
            "--controls",
            "0",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out half of G_t (split seed 5)" in result.output and "controls probe_mcq" not in result.output


def test_effects_read_back_equal_what_was_written(tmp_path):
    """InterventionEffects.write then .read: the same rows, control and per-feature rows, settings (effects.json)."""
    from posttrain_probe.eval.effects import SetEffect, TaskEffect

    rows = [
        TaskEffect(
            task="probe_mcq",
            held_out=False,
            n_critical=4,
            n_correct_before=4,
            n_correct_after=1,
            acc_before_nominal=100.0,
            acc_after=25.0,
            delta_pp=-75.0,
            delta_measured_pp=-75.0,
            flipped_docs=[1, 3, 7],
            n_controls=2,
            controls_mean_pp=-12.5,
            controls_std_pp=17.7,
            controls_min_pp=-25.0,
            controls_max_pp=0.0,
            outside_controls=True,
        ),
        TaskEffect(
            task="probe_math", held_out=True, n_critical=0, n_docs=10, full_acc_before=50.0, full_acc_after=40.0
        ),
    ]
    controls = [
        SetEffect(
            kind="control",
            task="probe_mcq",
            features=[2, 5],
            seed=s,
            n_critical=4,
            n_correct_after=3 + s,
            acc_after=25.0 * (3 + s),
            delta_pp=-25.0 * (1 - s),
            delta_measured_pp=-25.0 * (1 - s),
            flipped_docs=[1] if s == 0 else [],
        )
        for s in (0, 1)
    ]
    per_feature = [
        SetEffect(
            kind="feature",
            task="probe_mcq",
            features=[4],
            n_critical=4,
            n_correct_after=2,
            acc_after=50.0,
            delta_pp=-50.0,
        )
    ]
    effects = InterventionEffects(
        rows,
        {"mode": "zero", "n_features": 2, "role": "rl", "model_name": "rl", "controls": {"seeds": [0, 1]}},
        controls=controls,
        per_feature=per_feature,
    )
    effects.write(tmp_path)
    back = InterventionEffects.read(tmp_path)
    assert back.rows == effects.rows and back.controls == effects.controls and back.per_feature == effects.per_feature
    assert back.settings == effects.settings and back.to_dict() == effects.to_dict()


def test_intervene_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    import posttrain_probe.eval.intervention_effects as step
    from posttrain_probe.config_io import load_config

    seen = []

    def capture(config):
        seen.append(config)
        raise ProbeError("captured")

    monkeypatch.setattr(step, "intervene", capture)
    result = CliRunner().invoke(app, [
        "intervene", "--features", "3,17", "--crosscoder", "runs/cc", "--model", "rl=runs/rl", "--mode", "set", "--value", "17.5",
        "--critical", "runs/critical.json", "--out", "runs/iv", "--tasks", "probe_mcq,probe_math", "--held-out-tasks", "arc_easy",
        "--model-args", "dtype=bfloat16", "--controls", "2", "--control-seed", "3", "--per-feature", "--batch-size", "auto",
    ])  # fmt: skip
    assert "captured" in result.output, result.output
    (tmp_path / "intervene.yaml").write_text(
        "features: '3,17'\ncrosscoder: runs/cc\nmodel: [rl=runs/rl]\nmode: set\nvalue: 17.5\ncritical: runs/critical.json\nout: runs/iv\n"
        "tasks: [probe_mcq, probe_math]\nheld_out_tasks: [arc_easy]\nmodel_args: dtype=bfloat16\ncontrols: 2\ncontrol_seed: 3\n"
        "per_feature: true\nbatch_size: auto\n"
    )
    assert seen[0] == load_config(InterveneConfig, tmp_path / "intervene.yaml")
    assert seen[0].control_seeds == [3, 4] and seen[0].tasks == ["probe_mcq", "probe_math"]
