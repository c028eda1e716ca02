"""Generalization-controlling features (docs/methods.md sec. 6): scores, thresholds, intersection, overlap, last-prompt-token
activations, and `posttrain-probe features generalization` end to end on tiny models with a critical.json from
real lm-eval runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from _critical_runs import LAYER, critical_runs
from typer.testing import CliRunner

from posttrain_probe.analysis.critical import CriticalSamples
from posttrain_probe.analysis.feature_sets import crosscoder_fingerprint, load_feature_set
from posttrain_probe.analysis.generalization import (
    generalization_scores,
    half_split,
    intersect_feature_sets,
    overlap_matrix,
    select_features,
)
from posttrain_probe.cli import app
from posttrain_probe.crosscoder import Crosscoder
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.generalization import GeneralizationFeatures, features_generalization
from posttrain_probe.eval.generalization_config import GeneralizationConfig
from posttrain_probe.eval.prompts import last_prompt_activations, last_token_positions, lm_eval_context_ids, pad_batch
from posttrain_probe.testing import tiny_model, tiny_tokenizer

# -- the formulas on a hand example ----------------------------------------------------------------------


def _identity_crosscoder() -> Crosscoder:
    """d = F = 4, W_enc^m = I, b_enc = 0, s_m = 1: the per-source code f^m(a) = ReLU(a)."""
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "rl"], d_model=4, n_features=4, layer=1))
    with torch.no_grad():
        cc.W_enc.copy_(torch.eye(4).expand(2, 4, 4))
        cc.b_enc.zero_()
    return cc


def test_scores_threshold_intersection_overlap_worked_values():
    cc = _identity_crosscoder()
    # task a: two critical samples; per-source codes f^RL = rows of a_rl, f^base = rows of a_base (ReLU clips -1 to 0)
    a_rl = torch.tensor([[1.0, 0.0, 2.0, 0.5], [3.0, 0.0, 0.0, 0.5]])
    a_base = torch.tensor([[0.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 1.0]])
    score_a = generalization_scores(cc.encode_source(a_rl, "rl"), cc.encode_source(a_base, "base"))
    assert score_a.dtype == torch.float64
    assert score_a.tolist() == [2.0, -1.0, 1.0, 0.0]  # mean (f^RL - f^base) = [2, 0, 1, .5] - [0, 1, 0, .5]
    assert select_features(score_a, 0.2) == [0, 2]  # >= 0.4
    assert select_features(score_a, 0.5) == [0, 2]  # >= 1.0: ties with the threshold are kept
    assert select_features(score_a, 0.6) == [0]  # >= 1.2
    score_b = torch.tensor([1.0, 0.25, 0.5, 0.2], dtype=torch.float64)
    score_c = torch.tensor([-0.5, 0.0, 4.0, 0.8], dtype=torch.float64)
    sets = {"a": select_features(score_a), "b": select_features(score_b), "c": select_features(score_c)}
    assert sets == {"a": [0, 2], "b": [0, 1, 2, 3], "c": [2, 3]}  # b: >= 0.2; c: >= 0.8
    assert intersect_feature_sets(sets) == [2]
    listed = list(sets.values())
    np.testing.assert_array_equal(overlap_matrix(listed, "row"), [[1, 1, 0.5], [0.5, 1, 0.5], [0.5, 1, 1]])
    np.testing.assert_allclose(overlap_matrix(listed, "jaccard"), [[1, 0.5, 1 / 3], [0.5, 1, 0.5], [1 / 3, 0.5, 1]])
    np.testing.assert_array_equal(overlap_matrix(listed, "min"), [[1, 1, 0.5], [1, 1, 1], [0.5, 1, 1]])


def test_select_features_empty_when_no_feature_gains():
    assert select_features(torch.tensor([-1.0, 0.0, -0.5])) == []
    assert select_features(torch.tensor([float("nan"), 1.0, 0.1])) == [1]  # NaN never qualifies; 0.1 < 0.2
    m = overlap_matrix([[1, 2], []], "row")
    assert m[0, 0] == 1 and m[0, 1] == 0 and math.isnan(m[1, 0]) and math.isnan(m[1, 1])
    with pytest.raises(ProbeError, match="threshold"):
        select_features(torch.ones(3), 0.0)
    with pytest.raises(ProbeError, match="threshold"):
        select_features(torch.ones(3), 1.5)
    with pytest.raises(ProbeError, match="at least one task"):
        intersect_feature_sets({})
    with pytest.raises(ProbeError, match="G_t"):
        generalization_scores(torch.zeros(0, 3), torch.zeros(0, 3))


# -- tokenisation and last-prompt-token activations -----------------------------------------------------


def test_context_ids_match_lm_eval_hflm(tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model("qwen3", num_layers=2), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=1)
    for context in [
        "What is 2 + 3?\nAnswer:",
        "Question: the colour of snow \nAnswer: ",
        "<|bos|>already has BOS",
        " x",
    ]:
        assert lm_eval_context_ids(tokenizer, context) == lm._encode_pair(context, " B")[0]
        assert (
            lm_eval_context_ids(tokenizer, context, output_type="generate_until")
            == lm.tok_batch_encode([context])[0][0].tolist()
        )
    assert lm_eval_context_ids(tokenizer, "") == [lm.prefix_token_id]
    assert lm_eval_context_ids(tokenizer, "Answer:", add_bos_token=False) == tokenizer.encode(
        "Answer:", add_special_tokens=False
    )


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])  # gpt2: learned absolute positions, so position_ids matter
def test_last_prompt_token_left_and_right_padding_equal_unpadded(arch):
    model, tokenizer = tiny_model(arch, num_layers=3), tiny_tokenizer()
    prompts = [
        "What is 2 + 3?\nAnswer:",
        "a",
        "Which of these animals lives in the sea?\nA. whale\nB. lion\nAnswer:",
        "Compute 7 * 8.",
    ]
    ids = [lm_eval_context_ids(tokenizer, p) for p in prompts]
    expected = []
    for row in ids:  # independent: one unpadded full forward per prompt, hidden_states[L] at its last token
        out = model(input_ids=torch.tensor([row]), output_hidden_states=True)
        expected.append(out.hidden_states[LAYER][0, -1])
    expected = torch.stack(expected)
    for side in ("left", "right"):
        got = last_prompt_activations(model, ids, LAYER, batch_size=3, padding_side=side)
        assert got.shape == (4, model.config.hidden_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    input_ids, mask, positions = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert last_token_positions(mask).tolist() == [2, 2]
    assert last_token_positions(torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist() == [1, 0]


# -- end to end: real lm-eval runs -> critical.json -> features generalization ---------------------------


@pytest.fixture(scope="module")
def runs():
    return critical_runs()


@pytest.fixture(scope="module")
def cli_out(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("generalization")
    result = CliRunner().invoke(
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
            "--threshold",
            "0.2",
            "--out",
            str(out),
            "--batch-size",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_cli_end_to_end_on_real_critical_samples(runs, cli_out):
    out, output = cli_out
    summary = json.loads((out / "generalization.json").read_text())
    critical = json.loads(runs.critical.read_text())
    tasks = ["probe_mcq", "probe_mcq_qa"]
    assert summary["intersection"]["over_tasks"] == tasks
    assert summary["skipped_tasks"] == ["probe_math"]  # no critical samples: reported, not a crash
    assert "probe_math: no generalization-critical samples, skipped" in output
    assert any("skipped: probe_math" in note for note in summary["notes"])
    sets = {t: summary["tasks"][t]["features"] for t in tasks}
    for t in tasks:
        assert summary["tasks"][t]["n_critical"] == critical["tasks"][t]["n_critical"] > 0
        assert summary["tasks"][t]["n_selected"] == len(sets[t]) > 0
    assert summary["intersection"]["features"] == sorted(set(sets["probe_mcq"]) & set(sets["probe_mcq_qa"]))
    np.testing.assert_allclose(summary["overlap"]["matrix"], overlap_matrix([sets[t] for t in tasks]))

    # scores.csv against an independent computation: unpadded full forwards, per-source codes, mean difference
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    cc = Crosscoder.from_pretrained(str(runs.crosscoder))
    from posttrain_probe.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(runs.base)
    entry = critical["tasks"]["probe_mcq"]
    prompts = [entry["prompts"][str(d)] for d in entry["doc_ids"]]
    codes = {}
    for branch, path in (("base", runs.base), ("rl", runs.rl)):
        model = load_causal_lm(path, device="cpu")
        acts = torch.stack(
            [
                model(
                    input_ids=torch.tensor([lm_eval_context_ids(tokenizer, p)]), output_hidden_states=True
                ).hidden_states[LAYER][0, -1]
                for p in prompts
            ]
        )
        with torch.no_grad():
            codes[branch] = cc.encode_source(acts, branch)
    expected = (codes["rl"] - codes["base"]).double().mean(0)
    got = torch.tensor([float(r["score_probe_mcq"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    threshold = 0.2 * expected.max()
    assert sets["probe_mcq"] == [k for k in range(len(rows)) if got[k] >= 0.2 * got.max()]
    assert abs(summary["tasks"]["probe_mcq"]["threshold_value"] - float(threshold)) < 1e-6
    assert [int(r["feature"]) for r in rows if r["in_intersection"] == "true"] == summary["intersection"]["features"]

    # the feature set: S, bound to this crosscoder, with its provenance
    fs = load_feature_set(out / "generalization_features.json")
    assert fs.features == summary["intersection"]["features"]
    assert fs.crosscoder_fingerprint == crosscoder_fingerprint(cc)
    prov = fs.provenance
    assert (prov["base"], prov["rl"], prov["tasks"], prov["skipped_tasks"]) == ("base", "rl", tasks, ["probe_math"])
    assert prov["threshold_fraction"] == 0.2 and prov["critical"] == str(runs.critical)
    assert prov["set_sizes"] == {t: len(sets[t]) for t in tasks} and prov["intersection_size"] == len(fs.features)
    assert prov["models"] == {"base": str(runs.base), "rl": str(runs.rl)} and prov["layer"] == LAYER
    assert load_feature_set(out / "feature_sets" / "probe_mcq_qa.json").features == sets["probe_mcq_qa"]
    for ext in ("png", "svg"):
        assert (out / f"overlap.{ext}").stat().st_size > 1000


@pytest.mark.slow
def _config(runs, out, **kwargs) -> GeneralizationConfig:
    return GeneralizationConfig(
        crosscoder=runs.crosscoder,
        base="base",
        rl="rl",
        critical=runs.critical,
        model=[f"base={runs.base}", f"rl={runs.rl}"],
        out=out,
        **kwargs,
    )


def test_python_api_task_subset_and_padding_side(runs, cli_out, tmp_path):
    """--tasks restricts; left padding and another batch size give the same scores; the result writes the same files."""
    out, _ = cli_out
    first = json.loads((out / "generalization.json").read_text())
    result = features_generalization(
        _config(
            runs, tmp_path, tasks=["probe_mcq_qa", "probe_math"], padding_side="left", batch_size=2, overlap="jaccard"
        )
    )
    assert isinstance(result, GeneralizationFeatures)
    assert result.tasks == ["probe_mcq_qa"] and result.skipped == ["probe_math"]
    assert result.sets["probe_mcq_qa"] == first["tasks"]["probe_mcq_qa"]["features"]
    assert result.intersection == result.sets["probe_mcq_qa"]
    assert result.overlap.tolist() == [[1.0]]
    assert abs(result.max_scores["probe_mcq_qa"] - first["tasks"]["probe_mcq_qa"]["max_score"]) < 1e-6


@pytest.mark.slow
def test_bad_input(runs, tmp_path):
    base_args = [
        "features",
        "generalization",
        "--crosscoder",
        str(runs.crosscoder),
        "--critical",
        str(runs.critical),
        "--out",
        str(tmp_path),
    ]
    runner = CliRunner()
    # a branch the crosscoder does not have
    result = runner.invoke(
        app,
        [*base_args, "--base", "base", "--rl", "grpo", "--model", f"base={runs.base}", "--model", f"grpo={runs.rl}"],
    )
    assert (
        result.exit_code == 2
        and "'grpo' is not in this crosscoder" in result.output
        and "['base', 'rl']" in result.output
    )
    # a model name that is neither branch
    result = runner.invoke(
        app, [*base_args, "--base", "base", "--rl", "rl", "--model", f"base={runs.base}", "--model", f"sft={runs.rl}"]
    )
    assert result.exit_code == 2 and "--model rl=PATH" in result.output
    # only tasks without critical samples
    result = runner.invoke(
        app,
        [
            *base_args,
            "--base",
            "base",
            "--rl",
            "rl",
            "--model",
            f"base={runs.base}",
            "--model",
            f"rl={runs.rl}",
            "--tasks",
            "probe_math",
        ],
    )
    assert result.exit_code == 2 and "no task has generalization-critical samples" in result.output
    # a task the file does not have
    result = runner.invoke(
        app,
        [
            *base_args,
            "--base",
            "base",
            "--rl",
            "rl",
            "--model",
            f"base={runs.base}",
            "--model",
            f"rl={runs.rl}",
            "--tasks",
            "arc_easy",
        ],
    )
    assert result.exit_code == 2 and "arc_easy" in result.output and "probe_mcq" in result.output
    # a crosscoder of another width: the error names the model
    narrow = Crosscoder(CrosscoderConfig(model_names=["base", "rl"], d_model=32, n_features=8, layer=LAYER))
    narrow.save_pretrained(tmp_path / "cc32")
    args = [a if a != str(runs.crosscoder) else str(tmp_path / "cc32") for a in base_args]
    result = runner.invoke(
        app, [*args, "--base", "base", "--rl", "rl", "--model", f"base={runs.base}", "--model", f"rl={runs.rl}"]
    )
    assert result.exit_code == 2 and "model 'base' (" in result.output, result.output
    assert "the crosscoder has d_model 32, the model's hidden size is" in " ".join(result.output.split())
    # not a critical-samples file
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ProbeError, match="not a critical-samples JSON"):
        CriticalSamples.read(tmp_path / "x.json")
    with pytest.raises(ProbeError, match="threshold"):
        _config(runs, tmp_path, threshold=2.0)


# -- split-half selection ------------------------------------------------------------------------------


def test_half_split_is_seeded_disjoint_and_complete():
    ids = [40, 3, 17, 8, 25, 11, 2]
    selection, held = half_split(ids, 0, "probe_mcq")
    assert sorted(selection + held) == sorted(ids) and not set(selection) & set(held)
    assert (len(selection), len(held)) == (4, 3) and selection == sorted(selection) and held == sorted(held)
    assert half_split(list(reversed(ids)), 0, "probe_mcq") == (selection, held)  # the order given does not matter
    assert len({tuple(half_split(ids, seed, "probe_mcq")[1]) for seed in range(8)}) > 1  # the seed matters
    assert (
        len({tuple(half_split(ids, 0, task)[1]) for task in ("a", "b", "c", "d", "e")}) > 1
    )  # tasks split independently
    assert half_split([5, 9], 1, "t")[0] != half_split([5, 9], 1, "t")[1]
    with pytest.raises(ProbeError, match="needs at least 2"):
        half_split([5], 0, "t")
    with pytest.raises(ProbeError, match="split seed -1"):
        half_split([5, 6], -1, "t")


@pytest.mark.slow
def test_split_half_selection_never_uses_held_out_docs(runs, tmp_path, monkeypatch):
    """S_t are selected on the selection half only: the held-out prompts are never tokenised, and the scores
    equal those of a critical file that holds only the selection half. The halves go into the feature set."""
    import posttrain_probe.eval.generalization as generalization

    critical = json.loads(runs.critical.read_text())
    seen: list[str] = []
    tokenise = generalization.lm_eval_context_ids
    monkeypatch.setattr(
        generalization,
        "lm_eval_context_ids",
        lambda tok, context, **kw: seen.append(context) or tokenise(tok, context, **kw),
    )
    split = features_generalization(_config(runs, tmp_path / "split", split_half=3))
    monkeypatch.undo()
    halves = split.settings["split_half"]
    assert halves["seed"] == 3 and split.tasks == ["probe_mcq", "probe_mcq_qa"]
    for task in split.tasks:
        g = critical["tasks"][task]["doc_ids"]
        selection, held = halves["selection_doc_ids"][task], halves["held_out_doc_ids"][task]
        assert (selection, held) == half_split(g, 3, task)
        assert sorted(selection + held) == sorted(g) and not set(selection) & set(held) and held
        assert split.n_critical[task] == len(selection)
        prompts = critical["tasks"][task]["prompts"]
        held_prompts = {prompts[str(d)] for d in held} - {prompts[str(d)] for d in selection}
        assert held_prompts and not held_prompts & set(seen)  # the held-out prompts were never tokenised
    # the same scores as a critical file that holds only the selection half
    restricted = CriticalSamples.read(runs.critical)
    for task in split.tasks:
        restricted.tasks[task] = restricted.tasks[task].subset(halves["selection_doc_ids"][task])
    alone = features_generalization(
        dataclasses.replace(_config(runs, tmp_path / "alone"), critical=restricted.write(tmp_path / "restricted.json"))
    )
    assert torch.equal(alone.scores, split.scores) and alone.sets == split.sets
    # written: the halves in the feature set's provenance, |held-out half| per task in the summary
    files = split.write(tmp_path)
    prov = load_feature_set(files["feature_set"]).provenance
    assert prov["split_half"]["held_out_doc_ids"] == halves["held_out_doc_ids"]
    assert load_feature_set(files["task_feature_sets"]["probe_mcq"]).provenance["split_half"]["seed"] == 3
    summary = json.loads((tmp_path / "generalization.json").read_text())
    assert summary["tasks"]["probe_mcq"]["n_held_out"] == len(halves["held_out_doc_ids"]["probe_mcq"])
    assert any("held-out half" in note for note in summary["notes"])


@pytest.mark.slow
def test_read_gives_back_what_write_wrote(cli_out, tmp_path):
    out, _ = cli_out
    result = GeneralizationFeatures.read(out)
    on_disk = json.loads((out / "generalization.json").read_text())
    assert result.summary() == {k: v for k, v in on_disk.items() if k != "files"}
    assert result.tasks == ["probe_mcq", "probe_mcq_qa"] and result.skipped == ["probe_math"]
    assert result.intersection == on_disk["intersection"]["features"] and result.scores.dtype == torch.float64
    files = result.write(tmp_path)
    with open(out / "scores.csv") as a, open(tmp_path / "scores.csv") as b:
        assert list(csv.reader(a)) == list(csv.reader(b))
    assert (
        load_feature_set(files["feature_set"]).features
        == load_feature_set(out / "generalization_features.json").features
    )
    assert GeneralizationFeatures.read(tmp_path).summary() == result.summary()


def test_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    import posttrain_probe.eval.generalization as generalization
    from posttrain_probe.config_io import load_config

    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise ProbeError("captured")

    monkeypatch.setattr(generalization, "features_generalization", capture)
    result = CliRunner().invoke(
        app,
        [
            "features",
            "generalization",
            "--crosscoder",
            "runs/cc",
            "--base",
            "base",
            "--rl",
            "rl",
            "--critical",
            "runs/critical.json",
            "--model",
            "base=m0",
            "--model",
            "rl=m1",
            "--out",
            "runs/genfeat",
            "--threshold",
            "0.3",
            "--tasks",
            "a,b",
            "--tasks",
            "c",
            "--overlap",
            "jaccard",
            "--add-bos-token",
            "--padding-side",
            "left",
            "--batch-size",
            "4",
            "--split-half",
            "7",
            "--allow-incomplete",
        ],
    )
    assert "captured" in result.output, result.output
    (tmp_path / "genfeat.yaml").write_text(
        "crosscoder: runs/cc\nbase: base\nrl: rl\ncritical: runs/critical.json\nmodel: [base=m0, rl=m1]\nout: runs/genfeat\n"
        "threshold: 0.3\ntasks: [a, b, c]\noverlap: jaccard\nadd_bos_token: true\npadding_side: left\nbatch_size: 4\n"
        "split_half: 7\nallow_incomplete: true\n"
    )
    from_yaml = load_config(GeneralizationConfig, tmp_path / "genfeat.yaml")
    assert seen[0] == from_yaml
    assert from_yaml.tasks == ["a", "b", "c"] and from_yaml.add_bos_token is True
    result = CliRunner().invoke(
        app, ["features", "generalization", "--config", str(tmp_path / "genfeat.yaml"), "--batch-size", "2"]
    )
    assert "captured" in result.output and seen[1].batch_size == 2 and seen[1].model == from_yaml.model
