"""lm-eval integration: the ``probe-hf`` model, ``evaluate()``, argument checks of
``posttrain-probe lm-eval`` and the shipped offline tasks, on a tiny Qwen3 saved to disk and a
random crosscoder at layer 2 (the full lm-eval CLI runs are in test_lm_eval_cli.py).

References are computed without ``posttrain_probe.eval``: plain transformers forwards (with the
intervention of ``posttrain_probe.interventions`` attached for the prompt-position checks).
"""

from __future__ import annotations

import json

import pytest
import torch
from _eval_helpers import FEATURES, cc_dir, feature_file, lm_eval_logging, model_dir, save_random_crosscoder  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from posttrain_probe.analysis.feature_sets import write_feature_set
from posttrain_probe.analysis.sample_logs import find_sample_files, read_sample_records
from posttrain_probe.cli import app
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.features import FeatureIntervention
from posttrain_probe.synthetic import arithmetic_dataset, multiple_choice_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# posttrain-probe lm-eval: argument errors (checked before lm-eval indexes tasks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("features=1;4,mode=bogus", "mode='bogus'"),
        ("features=1;4,positions=middle", "positions='middle'"),
        ("features=999", "out of range"),
    ],
)
def test_cli_bad_model_args_are_one_line_errors(model_dir, cc_dir, extra, expected):
    """Checked before lm-eval indexes tasks or loads the model; exit code 2, no traceback."""
    model_args = f"pretrained={model_dir},crosscoder={cc_dir},model_name=rl,{extra}"
    result = CliRunner().invoke(
        app, ["lm-eval", "--model", "probe-hf", "--model_args", model_args, "--tasks", "probe_mcq", "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output


def test_cli_adds_shipped_tasks_to_the_users_include_path(tmp_path):
    import argparse

    from posttrain_probe.cli.eval import _with_include_path
    from posttrain_probe.eval.tasks import TASKS_DIR

    for given, expected in [(None, [str(TASKS_DIR)]), (str(tmp_path), [str(TASKS_DIR), str(tmp_path)])]:
        args = argparse.Namespace(include_path=given, config=None)
        _with_include_path(args)
        assert args.include_path == expected
    config = tmp_path / "run.yaml"
    config.write_text(f"include_path: {tmp_path / 'from_yaml'}\n")
    args = argparse.Namespace(include_path=None, config=str(config))
    _with_include_path(args)
    assert args.include_path == [str(TASKS_DIR), str(tmp_path / "from_yaml")]


def test_cli_unknown_task_is_one_line_with_the_closest_names(model_dir):
    result = CliRunner().invoke(
        app, ["lm-eval", "--model", "probe-hf", "--model_args", f"pretrained={model_dir}", "--tasks", "pr_math50"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines and "unknown lm-eval task 'pr_math50' (did you mean pr_math500" in lines[0], result.output


def test_cli_bad_lm_eval_arguments_keep_lm_eval_exit_code():
    result = CliRunner().invoke(app, ["lm-eval", "run", "--limit", "not-a-number"])
    assert result.exit_code == 2  # argparse's


# ---------------------------------------------------------------------------------------------
# probe-hf directly: model_args checks, prompt positions of loglikelihood batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (dict(mode="bogus"), "mode='bogus'"),
        (dict(positions="everywhere"), "positions='everywhere'"),
        (dict(features="3;999"), "out of range"),
        (dict(features=None), "needs features="),
        (dict(model_name=None), "model_name="),
        (dict(model_name="sft"), "sft"),
        (dict(mode="zero", value=2.0), "takes no value"),
        (dict(mode="scale"), "needs value="),
        (dict(mode="set", value="high"), "value='high'"),
        (dict(mode="steer"), "reference="),
        (dict(reference="synthetic:mcq"), "only used by mode=steer"),
    ],
)
def test_bad_intervention_model_args(model_dir, cc_dir, args, expected):
    from posttrain_probe.eval.runner import load_probe_lm

    model_args = {
        "pretrained": str(model_dir),
        "crosscoder": str(cc_dir),
        "features": "1;4",
        "model_name": "rl",
        **args,
    }
    model_args = {k: v for k, v in model_args.items() if v is not None}
    with pytest.raises(ProbeError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_probe_lm(model_args)


def test_feature_set_of_another_crosscoder_is_refused(model_dir, cc_dir, feature_file, tmp_path):
    """A feature-set JSON records its crosscoder; probe-hf refuses it for another one."""
    from posttrain_probe.eval.lm_eval_model import check_intervention_args

    spec = check_intervention_args(crosscoder=str(cc_dir), features=str(feature_file), model_name="rl")
    assert spec.features == FEATURES and spec.mode == "zero" and spec.positions == "all"
    other = Crosscoder(CrosscoderConfig(model_names=["base", "rl"], d_model=64, n_features=32, layer=2))
    other.save_pretrained(tmp_path / "other")
    foreign = write_feature_set(tmp_path / "foreign.json", FEATURES, crosscoder=str(tmp_path / "other"))
    with pytest.raises(ProbeError, match="crosscoder"):
        check_intervention_args(crosscoder=str(cc_dir), features=str(foreign), model_name="rl")


def test_intervention_args_need_a_crosscoder(model_dir):
    from posttrain_probe.eval.runner import load_probe_lm

    with pytest.raises(ProbeError, match="need crosscoder="):
        load_probe_lm({"pretrained": str(model_dir), "features": "1;4", "mode": "set"})


# Contexts of different lengths with multi-token continuations; the last two requests have the same
# ids split differently between context and continuation: lm-eval's logits cache would compute them
# in one forward (and, in lm-eval 0.4.13, score the shorter continuation on the first positions of
# the longer one's logits, also for plain `hf`); with prompt positions probe-hf computes each alone.
REQUESTS = [
    ("What colour is fresh snow?", " It is white."),
    ("Which number is the largest? 12, 95, 7", " The largest is 95"),
    ("Let us think step by step", ": first we read the question"),
    ("How many legs does a spider have?", " Eight legs"),
    ("A small model learns to add", " and to multiply numbers"),
    ("A small model learns to add and to", " multiply numbers"),
]


def _lm_loglikelihoods(lm, requests) -> list[float]:
    from lm_eval.api.instance import Instance

    instances = [Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i) for i, req in enumerate(requests)]
    return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]


def _reference_loglikelihood(model, tokenizer, iv, context: str, continuation: str) -> float:
    """One request alone (no padding): log p(continuation | context) with the intervention told
    that the first len(context ids) tokens are the prompt."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad(), iv.prompt_lengths(torch.tensor([len(ctx)])):
        logits = model(input_ids=ids).logits.log_softmax(-1)[0]
    target = torch.tensor(whole[len(ctx) :])
    return float(logits[len(ctx) - 1 :].gather(1, target[:, None]).sum())


@pytest.mark.parametrize("positions", ["prompt", "last_prompt"])
def test_loglikelihood_prompt_positions_match_per_request_reference(model_dir, cc_dir, positions):
    """probe-hf right-pads several requests into one batch and passes each row's context length;
    the result equals scoring every request alone with the prompt length given explicitly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain_probe.eval.runner import load_probe_lm

    lm = load_probe_lm(
        {
            "pretrained": str(model_dir),
            "crosscoder": str(cc_dir),
            "features": "1;4;9;17;30",
            "model_name": "rl",
            "mode": "set",
            "value": 5.0,
            "positions": positions,
        },
        batch_size=8,
    )
    try:
        got = _lm_loglikelihoods(lm, REQUESTS)
    finally:
        lm.detach_intervention()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    iv = FeatureIntervention(str(cc_dir), FEATURES, mode="set", value=5.0, model_name="rl", positions=positions)
    with iv.attach(model):
        expected = [_reference_loglikelihood(model, tokenizer, iv, c, x) for c, x in REQUESTS]
    with torch.no_grad():
        plain = [_reference_loglikelihood(model, tokenizer, iv, c, x) for c, x in REQUESTS]  # detached: no edit
    assert got == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, plain)) > 1e-3


def test_steer_takes_max_activations_over_the_reference_corpus(model_dir, tmp_path):
    """mode=steer: f'_S = 2 x max activation over reference=DATASET, computed once and cached next to
    the crosscoder (a second model reuses the cache)."""
    from safetensors.torch import load_file

    from posttrain_probe.eval.runner import load_probe_lm

    cc_dir = save_random_crosscoder(tmp_path / "cc")
    args = {
        "pretrained": str(model_dir),
        "crosscoder": str(cc_dir),
        "features": "4;9;17",
        "model_name": "rl",
        "mode": "steer",
        "reference": "synthetic:mcq",
    }
    lm = load_probe_lm(args)
    (cache,) = (cc_dir / "max_activations").glob("*.safetensors")
    max_acts = load_file(cache)["max_activations"]
    assert lm.intervention.mode == "steer" and lm.intervention.value == 2.0
    reference = FeatureIntervention(str(cc_dir), [4, 9, 17], mode="steer", model_name="rl", max_acts=max_acts)
    a = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lm.intervention.edit(a), reference.edit(a))
    steered = _lm_loglikelihoods(lm, REQUESTS)
    lm.detach_intervention()
    plain = _lm_loglikelihoods(lm, REQUESTS)
    assert max(abs(a - b) for a, b in zip(steered, plain)) > 1e-3
    again = load_probe_lm(args)
    assert list((cc_dir / "max_activations").glob("*.safetensors")) == [cache]
    again.detach_intervention()


def test_prompt_positions_exclude_the_continuation(model_dir, cc_dir):
    """With multi-token continuations, editing the prompt only differs from editing every position."""
    from posttrain_probe.eval.runner import load_probe_lm

    results = {}
    for positions in ("all", "prompt"):
        lm = load_probe_lm(
            {
                "pretrained": str(model_dir),
                "crosscoder": str(cc_dir),
                "features": "1;4;9;17;30",
                "model_name": "rl",
                "mode": "set",
                "value": 5.0,
                "positions": positions,
            }
        )
        results[positions] = _lm_loglikelihoods(lm, REQUESTS)
        lm.detach_intervention()
        assert not lm.intervention.is_attached
    assert max(abs(a - b) for a, b in zip(results["all"], results["prompt"])) > 1e-3


# ---------------------------------------------------------------------------------------------
# evaluate(): Python API, document subsets, written logs
# ---------------------------------------------------------------------------------------------


def test_evaluate_on_a_doc_subset_writes_lm_eval_logs(model_dir, cc_dir, tmp_path):
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import evaluate

    model_args = {
        "pretrained": str(model_dir),
        "crosscoder": str(cc_dir),
        "features": [1, 4],
        "model_name": "rl",
        "mode": "zero",
    }
    result = evaluate(
        LmEvalConfig(
            model_args=model_args, tasks=["probe_mcq"], samples={"probe_mcq": [3, 7, 11]}, out=tmp_path / "out"
        )
    )
    records = result["samples"]["probe_mcq"]
    assert sorted(r["doc_id"] for r in records) == [3, 7, 11]
    docs = multiple_choice_dataset(n=200, seed=100)
    for record in records:
        assert record["doc"]["question"] == docs[record["doc_id"]]["question"]
        assert isinstance(record["arguments"][0], tuple)  # kept as lm-eval holds them in memory
    assert result["config"]["model"] == "probe-hf"
    assert result["config"]["probe_intervention"]["mode"] == "zero"
    (written,) = find_sample_files(tmp_path / "out").values()
    on_disk = read_sample_records(written)
    assert [r["doc_id"] for r in on_disk] == [r["doc_id"] for r in records]
    assert [r["acc"] for r in on_disk] == [r["acc"] for r in records]


def test_evaluate_rejects_samples_and_limit(model_dir):
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import evaluate

    model_args = {"pretrained": str(model_dir)}
    with pytest.raises(ProbeError, match="not both"):
        evaluate(LmEvalConfig(model_args=model_args, tasks=["probe_mcq"], samples={"probe_mcq": [1]}, limit=2))
    with pytest.raises(ProbeError, match="not evaluated"):
        evaluate(LmEvalConfig(model_args=model_args, tasks=["probe_mcq"], samples={"probe_math": [1]}))


# ---------------------------------------------------------------------------------------------
# tasks: shipped data, real task names
# ---------------------------------------------------------------------------------------------


def test_shipped_task_data_is_the_synthetic_generators_output():
    from posttrain_probe.eval.tasks import TASKS_DIR

    expected = {
        "probe_mcq_test.jsonl": multiple_choice_dataset(n=200, seed=100),
        "probe_mcq_train.jsonl": multiple_choice_dataset(n=16, seed=101),
        "probe_math_test.jsonl": arithmetic_dataset(n=200, seed=200),
        "probe_math_train.jsonl": arithmetic_dataset(n=16, seed=201),
    }
    for name, dataset in expected.items():
        rows = [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines()]
        assert len(rows) == len(dataset)
        for row, want in zip(rows, dataset):
            assert row == {k: want[k] for k in row}


def test_shipped_tasks_resolve_without_lm_eval_builtin_index():
    from posttrain_probe.eval.runner import make_task_manager

    tm = make_task_manager(["probe_mcq", "probe_math"])
    assert {"probe_mcq", "probe_math"} <= set(tm.all_subtasks)
    assert "arc_challenge" not in tm.all_tasks  # the ~14k built-in configs were not indexed


# ---------------------------------------------------------------------------------------------
# the study's step: lm_eval(LmEvalConfig) -> LmEvalResult
# ---------------------------------------------------------------------------------------------


def test_lm_eval_step_resolves_the_set_once_and_reads_back(model_dir, cc_dir, feature_file, tmp_path):
    """A feature-set file goes to probe-hf as its resolved indices; lm_eval.json reads back to the same result; the
    per-sample log it names holds the evaluated documents."""
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import LmEvalResult, lm_eval

    config = LmEvalConfig(
        model_args=f"pretrained={model_dir}",
        tasks=["probe_mcq"],
        samples='{"probe_mcq": [3, 7]}',
        out=tmp_path / "run",
        crosscoder=cc_dir,
        features=str(feature_file),
        model_name="rl",
        mode="set",
        value=3.0,
    )
    result = lm_eval(config)
    assert result.model_args["features"] == ";".join(str(f) for f in FEATURES) and result.model_args["mode"] == "set"
    assert "acc,none" in result.results["probe_mcq"]
    assert sorted(r["doc_id"] for r in read_sample_records(result.sample_files["probe_mcq"])) == [3, 7]
    back = LmEvalResult.read(tmp_path / "run")
    assert (back.results, back.model_args, back.results_file, back.sample_files) == (
        json.loads(json.dumps(result.results)),
        result.model_args,
        result.results_file,
        result.sample_files,
    )


def test_lm_eval_config_from_yaml_equals_config_from_python(tmp_path):
    from posttrain_probe.config_io import load_config
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig

    (tmp_path / "lm_eval.yaml").write_text(
        "model_args: pretrained=runs/rl,dtype=bfloat16\ntasks: [probe_mcq, probe_math]\nout: runs/eval\nlimit: 8\n"
        "crosscoder: runs/cc\nfeatures: '3,17'\nmode: zero\nmodel_name: rl\n"
    )
    expected = LmEvalConfig(
        model_args="pretrained=runs/rl,dtype=bfloat16",
        tasks=["probe_mcq,probe_math"],
        out="runs/eval",
        limit=8,
        crosscoder="runs/cc",
        features=[3, 17],
        mode="zero",
        model_name="rl",
    )
    assert load_config(LmEvalConfig, tmp_path / "lm_eval.yaml") == expected
    as_mapping = tmp_path / "mapping.yaml"
    as_mapping.write_text("model_args: {pretrained: runs/rl, dtype: bfloat16}\ntasks: probe_mcq\n")
    assert load_config(LmEvalConfig, as_mapping).model_args == {"pretrained": "runs/rl", "dtype": "bfloat16"}
    with pytest.raises(ProbeError, match="need crosscoder"):
        LmEvalConfig(model_args="pretrained=runs/rl", tasks=["probe_mcq"], features="3")
