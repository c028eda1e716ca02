"""Which lm-eval model a study evaluation runs on (LmEvalConfig.model: probe-hf | vllm | auto), and the errors."""

from __future__ import annotations

import pytest
from _eval_helpers import model_dir  # noqa: F401 (fixture)

from posttrain_probe.errors import ProbeError
from posttrain_probe.eval.lm_eval_config import LmEvalConfig


def _config(**extra) -> LmEvalConfig:
    return LmEvalConfig(model_args="pretrained=runs/rl,dtype=bfloat16", tasks=["probe_math"], **extra)


@pytest.mark.parametrize(
    ("model", "vllm_installed", "gpu", "expected"),
    [
        ("probe-hf", True, True, "probe-hf"),
        ("auto", True, True, "vllm"),
        ("auto", False, True, "probe-hf"),
        ("auto", True, False, "probe-hf"),
        ("vllm", True, True, "vllm"),
    ],
)
def test_chosen_model(model, vllm_installed, gpu, expected):
    chosen, reason = _config(model=model).chosen_model(vllm_installed=vllm_installed, gpu=gpu)
    assert chosen == expected and reason


def test_auto_stays_on_probe_hf_with_an_intervention():
    config = _config(model="auto", crosscoder="runs/cc", features="3,4")
    assert config.chosen_model(vllm_installed=True, gpu=True) == (
        "probe-hf",
        "an intervention runs on probe-hf (vLLM has no feature hooks)",
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"model": "vLLM"}, "model='vLLM': expected one of probe-hf, vllm, auto"),
        ({"model": "vllm", "crosscoder": "runs/cc"}, "model=vllm cannot run an intervention"),
        ({"model": "vllm", "vllm_args": "tensor_parallel_size"}, "vllm_args 'tensor_parallel_size'"),
    ],
)
def test_bad_model_settings_are_one_line_errors(extra, expected):
    with pytest.raises(ProbeError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        _config(**extra)
    assert "\n" not in str(err.value)


def test_vllm_missing_names_what_this_machine_lacks():
    import importlib.util

    import torch

    from posttrain_probe.models import vllm_missing

    assert vllm_missing(vllm_installed=True, gpu=True) == []
    assert vllm_missing(vllm_installed=False, gpu=False) == ["the vllm package", "a CUDA GPU"]
    here = vllm_missing()
    assert ("the vllm package" in here) == (importlib.util.find_spec("vllm") is None)
    assert ("a CUDA GPU" in here) == (not torch.cuda.is_available())


def test_vllm_without_a_gpu_names_what_is_missing():
    with pytest.raises(ProbeError) as err:
        _config(model="vllm").chosen_model(vllm_installed=False, gpu=False)
    assert str(err.value).startswith("model=vllm needs the vllm package and a CUDA GPU")


def test_vllm_model_args_merge_the_vllm_only_keys():
    pytest.importorskip("lm_eval")
    from posttrain_probe.eval.runner import _vllm_model_args

    args = _vllm_model_args(_config(model="vllm", vllm_args={"tensor_parallel_size": 8, "max_model_len": 32768}))
    assert args == {"pretrained": "runs/rl", "dtype": "bfloat16", "tensor_parallel_size": 8, "max_model_len": 32768}


def test_vllm_model_args_without_a_pretrained_path_name_what_they_got():
    pytest.importorskip("lm_eval")
    from posttrain_probe.eval.runner import _vllm_model_args

    with pytest.raises(ProbeError, match=r"model=vllm needs pretrained= .*, got None$"):
        _vllm_model_args(LmEvalConfig(model="vllm", model_args="dtype=bfloat16", tasks=["probe_math"]))


def test_auto_on_this_machine_runs_probe_hf_and_records_why(model_dir, tmp_path):  # noqa: F811
    """On a machine without vllm or a GPU, auto evaluates on probe-hf (the HF fallback) and lm_eval.json says why."""
    pytest.importorskip("lm_eval")
    import importlib.util

    import torch

    from posttrain_probe.eval.runner import LmEvalResult, lm_eval

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("this machine has vllm and a GPU: auto picks vllm (the GPU check covers it)")
    result = lm_eval(
        LmEvalConfig(
            model_args=f"pretrained={model_dir}",
            model="auto",
            tasks=["probe_mcq"],
            samples='{"probe_mcq": [0, 1]}',
            out=tmp_path / "run",
        )
    )
    assert result.model == "probe-hf" and result.model_reason.startswith("model=auto: no ")
    assert 0.0 <= result.results["probe_mcq"]["acc,none"] <= 1.0
    back = LmEvalResult.read(tmp_path / "run")
    assert (back.model, back.model_reason) == (result.model, result.model_reason)


def test_unknown_task_is_a_one_line_error_before_any_model_loads(tmp_path):
    """A misspelled suite task fails with the closest names, before the model (here: a path that does not exist)."""
    pytest.importorskip("lm_eval")
    from posttrain_probe.eval.runner import lm_eval

    config = LmEvalConfig(model_args=f"pretrained={tmp_path / 'no-model'}", tasks=["pr_math5000"], out=tmp_path / "o")
    with pytest.raises(ProbeError, match=r"unknown lm-eval task 'pr_math5000' \(did you mean pr_math500") as err:
        lm_eval(config)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
