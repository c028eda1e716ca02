"""Generalization-critical samples G_t (docs/methods.md sec. 6) from real lm-eval sample logs: a tiny base model
and its tuned copy evaluated on the shipped tasks by lm-eval (``--log_samples --output_path``
layout, written by lm-eval's own EvaluationTracker); expectations come from the records lm-eval
returns in memory, not from the files the code under test reads."""

from __future__ import annotations

import json

import pytest
from _eval_helpers import lm_eval_logging  # noqa: F401  (fixture)
from typer.testing import CliRunner

from posttrain_probe.analysis.critical import CriticalSamples, critical_from_records, critical_samples
from posttrain_probe.analysis.critical_config import CriticalConfig
from posttrain_probe.analysis.sample_logs import find_sample_files
from posttrain_probe.cli import app
from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.lm_eval_config import LmEvalConfig
from posttrain_probe.eval.runner import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ["probe_mcq", "probe_math"]
N_DOCS = 16


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    """lm-eval runs of the base and the tuned model on probe_mcq + probe_math (16 docs each).
    The base output folder also holds an older run over 8 docs (so the newest file must be picked)."""
    out = tmp_path_factory.mktemp("runs")

    def run(model, tasks, limit, folder, **settings):
        config = LmEvalConfig(
            model_args={"pretrained": str(tiny_pair[model])},
            tasks=tasks,
            limit=limit,
            out=out / folder,
            batch_size="8",
            **settings,
        )
        return evaluate(config, gen_kwargs={"max_gen_toks": 4})

    old = run("base", TASKS, 8, "base")
    base = run("base", TASKS, N_DOCS, "base")
    rl = run("tuned", TASKS, N_DOCS, "rl")
    fewshot = run("tuned", ["probe_mcq"], N_DOCS, "rl_fewshot", num_fewshot=1)
    return {"dir": out, "old": old, "base": base, "rl": rl, "fewshot": fewshot}


def _expected(base_records, rl_records, metric):
    base = {r["doc_id"]: r[metric] > 0 for r in base_records}
    rl = {r["doc_id"]: r[metric] > 0 for r in rl_records}
    return sorted(d for d in base if rl[d] and not base[d]), sum(base.values()), sum(rl.values())


def test_critical_samples_from_lm_eval_logs(runs):
    result = critical_samples(runs["dir"] / "base", runs["dir"] / "rl")
    assert set(result.tasks) == set(TASKS)
    for task, metric in (("probe_mcq", "acc"), ("probe_math", "exact_match")):
        entry = result.tasks[task]
        doc_ids, n_base, n_rl = _expected(runs["base"]["samples"][task], runs["rl"]["samples"][task], metric)
        assert entry.metric == metric and entry.n_docs == N_DOCS
        assert (entry.doc_ids, entry.n_base_correct, entry.n_rl_correct) == (doc_ids, n_base, n_rl)
        contexts = {r["doc_id"]: r["arguments"][0][0] for r in runs["base"]["samples"][task]}
        assert entry.prompts == {d: contexts[d] for d in doc_ids}
    assert result.tasks["probe_mcq"].n_critical > 0  # the tuned copy gets some questions right that the base misses
    assert result.tasks["probe_math"].filter == "boxed"
    assert (result.tasks["probe_mcq"].request_type, result.tasks["probe_math"].request_type) == (
        "loglikelihood",
        "generate_until",
    )
    assert result.no_critical == sorted(t for t, e in result.tasks.items() if not e.doc_ids)
    assert result.doc_ids == {t: e.doc_ids for t, e in result.tasks.items() if e.doc_ids}
    # the newest base log (16 docs) was used, not the older 8-doc one
    files = sorted((runs["dir"] / "base").rglob("samples_probe_mcq_*.jsonl"))
    assert len(files) == 2 and result.tasks["probe_mcq"].base_file == str(files[-1])


def test_tasks_without_critical_samples_are_reported(runs):
    """Two runs of the same model: every task has |G_t| = 0; reported, not an error."""
    result = critical_from_records(runs["base"]["samples"], runs["base"]["samples"])
    assert result.no_critical == sorted(TASKS)
    assert result.doc_ids == {}
    assert all(e.n_critical == 0 and e.n_docs == N_DOCS for e in result.tasks.values())


def test_cli_writes_the_critical_file(runs, tmp_path):
    out = tmp_path / "critical.json"
    samples = tmp_path / "samples.json"
    result = CliRunner().invoke(
        app,
        [
            "critical",
            "--base-samples",
            str(runs["dir"] / "base"),
            "--rl-samples",
            str(runs["dir"] / "rl"),
            "--out",
            str(out),
            "--samples-out",
            str(samples),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(samples.read_text()) == {
        t: e["doc_ids"] for t, e in json.loads(out.read_text())["tasks"].items() if e["doc_ids"]
    }
    data = json.loads(out.read_text())
    assert data["format"] == "posttrain-probe/critical-samples" and data["format_version"] == 1
    expected = critical_samples(runs["dir"] / "base", runs["dir"] / "rl")
    assert data == expected.to_json()
    assert CriticalSamples.read(out).to_json() == data
    mcq = data["tasks"]["probe_mcq"]
    assert mcq["n_critical"] == len(mcq["doc_ids"]) and set(mcq["prompts"]) == {str(d) for d in mcq["doc_ids"]}
    assert f"probe_mcq: |G_t| = {mcq['n_critical']} of {N_DOCS} docs" in result.output
    for task in data["no_critical"]:
        assert task in result.output.split("no critical samples")[1]


def test_runs_over_different_documents_are_refused(runs):
    old_file = find_sample_files(runs["dir"] / "base")  # newest; the older 8-doc log sits next to it
    older = sorted((runs["dir"] / "base").rglob("samples_probe_mcq_*.jsonl"))[0]
    assert older != old_file["probe_mcq"]
    rl_file = find_sample_files(runs["dir"] / "rl")["probe_mcq"]
    with pytest.raises(ProbeError, match=r"task 'probe_mcq'.*different documents.*only in the RL run: \[8, 9"):
        critical_samples(older, rl_file)


def test_runs_with_different_prompts_are_refused(runs):
    base_file = find_sample_files(runs["dir"] / "base")["probe_mcq"]
    with pytest.raises(ProbeError, match=r"task 'probe_mcq' doc 0: the prompts differ"):
        critical_samples(base_file, runs["dir"] / "rl_fewshot")
    with pytest.raises(ProbeError, match="doc 0: the prompts differ"):
        critical_from_records({"probe_mcq": runs["base"]["samples"]["probe_mcq"]}, runs["fewshot"]["samples"])


def test_runs_with_different_tasks_are_refused(runs):
    result = CliRunner().invoke(
        app, ["critical", "--base-samples", str(runs["dir"] / "base"), "--rl-samples", str(runs["dir"] / "rl_fewshot")]
    )
    assert result.exit_code == 2
    assert "different tasks" in result.output and "probe_math" in result.output


def test_missing_logs_are_reported(tmp_path):
    with pytest.raises(ProbeError, match="no lm-eval sample logs"):
        critical_samples(tmp_path, tmp_path)
    with pytest.raises(ProbeError, match="no such directory"):
        critical_samples(tmp_path / "nope", tmp_path)


def test_same_file_for_both_runs_is_refused(runs):
    with pytest.raises(ProbeError, match="same file"):
        critical_samples(runs["dir"] / "rl", runs["dir"] / "rl")


def test_read_gives_back_what_critical_wrote(runs, tmp_path):
    from posttrain_probe.analysis.critical import critical

    config = CriticalConfig(
        base_samples=runs["dir"] / "base",
        rl_samples=runs["dir"] / "rl",
        out=tmp_path / "c.json",
        samples_out=tmp_path / "s.json",
    )
    result = critical(config)
    assert CriticalSamples.read(config.out) == result
    assert json.loads(config.samples_out.read_text()) == result.doc_ids
    # one reader, no fallbacks: a file without its format_version or a task field is refused
    data = json.loads(config.out.read_text())
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in data.items() if k != "format_version"}))
    with pytest.raises(ProbeError, match="format_version None"):
        CriticalSamples.read(tmp_path / "old.json")
    del data["tasks"]["probe_mcq"]["request_type"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(ProbeError, match="request_type"):
        CriticalSamples.read(tmp_path / "old.json")


def test_config_from_yaml_equals_config_from_flags(tmp_path, monkeypatch):
    import posttrain_probe.analysis.critical as critical_module
    from posttrain_probe.config_io import load_config

    seen = []

    def capture(config):
        seen.append(config)
        raise ProbeError("captured")

    monkeypatch.setattr(critical_module, "critical", capture)
    result = CliRunner().invoke(
        app,
        [
            "critical",
            "--base-samples",
            "eval/base",
            "--rl-samples",
            "eval/rl",
            "--out",
            "c.json",
            "--metric",
            "acc",
            "--filter-name",
            "strict-match",
            "--samples-out",
            "s.json",
        ],
    )
    assert "captured" in result.output, result.output
    (tmp_path / "critical.yaml").write_text(
        "base_samples: eval/base\nrl_samples: eval/rl\nout: c.json\nmetric: acc\nfilter_name: strict-match\nsamples_out: s.json\n"
    )
    from_yaml = load_config(CriticalConfig, tmp_path / "critical.yaml")
    assert seen[0] == from_yaml
    result = CliRunner().invoke(
        app, ["critical", "--config", str(tmp_path / "critical.yaml"), "--metric", "exact_match"]
    )
    assert (
        "captured" in result.output
        and seen[1].metric == "exact_match"
        and seen[1].base_samples == from_yaml.base_samples
    )
