"""``posttrain-probe lm-eval``: full runs of lm-eval's own CLI with the ``probe-hf`` model, on a tiny
Qwen3 saved to disk and a random crosscoder at layer 2, and the real task names of paper R.

Each run of lm-eval's CLI indexes lm-eval's ~14k built-in task configs (several seconds of CPU),
as the ``lm_eval`` command does, so these tests are marked slow.
"""

from __future__ import annotations

import math

import pytest
from _eval_helpers import FEATURES, cc_dir, feature_file, lm_eval_logging, model_dir  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from posttrain_probe.analysis.sample_logs import find_sample_files, read_sample_records
from posttrain_probe.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _lm_eval(args: list[str]):
    return CliRunner().invoke(app, ["lm-eval", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_runs(model_dir, cc_dir, feature_file, tmp_path_factory):
    """Four lm-eval runs of probe_mcq + probe_math through `posttrain-probe lm-eval`: no intervention,
    zero, set (v = 3) and the identity (scale by 1) -> {name: {task: [records]}}."""
    out = tmp_path_factory.mktemp("lm_eval_runs")
    interventions = {
        "none": "",
        "zero": f",crosscoder={cc_dir},features={feature_file},model_name=rl,mode=zero",
        "set": f",crosscoder={cc_dir},features={';'.join(map(str, FEATURES))},model_name=rl,mode=set,value=3.0",
        "identity": f",crosscoder={cc_dir},features={feature_file},model_name=rl,mode=scale,value=1.0",
    }
    runs = {}
    for name, extra in interventions.items():
        result = _lm_eval(
            [
                "--model",
                "probe-hf",
                "--model_args",
                f"pretrained={model_dir},dtype=float32{extra}",
                "--device",
                "cpu",
                "--tasks",
                "probe_mcq,probe_math",
                "--limit",
                "6",
                "--batch_size",
                "8",
                "--gen_kwargs",
                "max_gen_toks=6",
                "--log_samples",
                "--output_path",
                str(out / name),
            ]
        )
        assert result.exit_code == 0, result.output
        files = find_sample_files(out / name)
        assert set(files) == {"probe_mcq", "probe_math"}
        runs[name] = {task: read_sample_records(path) for task, path in files.items()}
    return runs


def _loglikelihoods(records) -> list[float]:
    """Per document, per choice: the logged log-likelihood (lm-eval writes them as strings)."""
    return [float(resp[0][0]) for record in sorted(records, key=lambda r: r["doc_id"]) for resp in record["resps"]]


def _generations(records) -> list[str]:
    return [record["resps"][0][0] for record in sorted(records, key=lambda r: r["doc_id"])]


def test_cli_loglikelihoods_change_with_zero_and_set_not_with_identity(cli_runs):
    base = _loglikelihoods(cli_runs["none"]["probe_mcq"])
    assert len(base) == 6 * 4 and all(math.isfinite(x) and x < 0 for x in base)
    for name in ("zero", "set"):
        other = _loglikelihoods(cli_runs[name]["probe_mcq"])
        assert max(abs(a - b) for a, b in zip(base, other)) > 1e-3, name
    assert _loglikelihoods(cli_runs["identity"]["probe_mcq"]) == pytest.approx(base, abs=1e-5)
    # same documents and prompts in every run
    for run in cli_runs.values():
        assert [r["arguments"] for r in run["probe_mcq"]] == [r["arguments"] for r in cli_runs["none"]["probe_mcq"]]


def test_cli_generate_until_with_intervention(cli_runs):
    """probe_math runs generate_until (left-padded batch, KV cache) under the intervention: the set
    intervention changes the greedy generations, the identity leaves them as they were."""
    base = _generations(cli_runs["none"]["probe_math"])
    assert len(base) == 6 and all(isinstance(g, str) for g in base)
    assert _generations(cli_runs["identity"]["probe_math"]) == base
    assert _generations(cli_runs["set"]["probe_math"]) != base
    record = cli_runs["set"]["probe_math"][0]
    assert record["filter"] == "boxed" and record["metrics"] == ["exact_match"]
    assert record["arguments"]["gen_args_0"]["arg_0"].startswith("Question: ")


def test_real_task_names_resolve_next_to_shipped_and_user_tasks(tmp_path):
    """Paper R's lm-eval tasks keep their names in the task manager evaluate() uses, next to the
    shipped tasks and a user's own include path (index only: nothing is downloaded)."""
    from posttrain_probe.eval.runner import make_task_manager
    from posttrain_probe.eval.tasks import TASKS_DIR

    user = tmp_path / "my_tasks"
    user.mkdir()
    (user / "my_mcq.yaml").write_text(
        (TASKS_DIR / "probe_mcq.yaml").read_text().replace("task: probe_mcq", "task: my_mcq")
    )
    names = ["openbookqa", "commonsense_qa", "headqa", "sciq", "arc_challenge", "logiqa", "piqa"]
    tm = make_task_manager([*names, "probe_mcq", "my_mcq"], include_path=user)
    missing = [n for n in [*names, "probe_mcq", "probe_math", "my_mcq"] if n not in tm.all_tasks]
    assert not missing, missing
    assert set(tm.match_tasks(names)) == set(names)
