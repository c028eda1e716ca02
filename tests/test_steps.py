"""Every post-hoc step (posttrain_probe.steps.STEPS) has one shape: its config built from a YAML file,
from command-line flags and from Python is the same dataclass, and the CLI passes it to the step function."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing

import pytest
import yaml
from typer.testing import CliRunner

from posttrain_probe.cli.main import app
from posttrain_probe.config_io import config_from_mapping, config_to_mapping, nested_config_type
from posttrain_probe.steps import STEPS

# One example per step: non-default values for many fields (paths need not exist: the step is not run).
EXAMPLES: dict[str, dict[str, typing.Any]] = {
    "data_prepare": {
        "problems": "problems.jsonl",
        "teacher": "m/teacher",
        "out": "data",
        "source_column": "source",
        "n_tries": 8,
        "traces_per_problem": 2,
        "temperature": 0.7,
        "chat_template": False,
        "backend": "hf",
        "seed": 3,
    },
    "collect": {
        "model": ["base=m/base", "sft=m/sft"],
        "dataset": "synthetic:arithmetic",
        "out": "acts",
        "layer": [1, 2],
        "seq_len": 64,
        "max_tokens": 5000,
        "dtype": "float32",
    },
    "crosscoder_train": {
        "acts": ["acts"],
        "out": "cc",
        "seq_len": 128,
        "crosscoder": {"n_features": 96, "activation": "batchtopk", "k": 8, "layer": 1},
        "training": {"lr": 0.001, "batch_size": 256, "n_tokens": 4096},
    },
    "crosscoder_calibrate": {"crosscoder": "cc", "acts": ["acts"], "max_tokens": 2000, "k": 4, "out": "cc2"},
    "crosscoder_sweep_k": {
        "acts": ["acts"],
        "held_out_acts": ["acts_val"],
        "k_values": [4, 16],
        "held_out_tokens": 3000,
        "out": "sweep",
        "crosscoder": {"n_features": 96, "activation": "batchtopk", "layer": 1},
        "training": {"lr": 0.001, "batch_size": 256, "n_tokens": 4096, "calibration_tokens": 2048},
    },
    "analyze": {
        "crosscoder": "cc",
        "out": "an",
        "base": "b",
        "acts": ["acts"],
        "table_format": "csv",
        "p": 2.0,
        "norm_ratio_scale": "pair",
        "duplicate_cosine": 0.9,
    },
    "dynamics": {
        "crosscoder": ["cc1", "cc2"],
        "out": "dyn",
        "checkpoint": ["c1", "c2"],
        "k": 5,
        "norm_floor": 0.02,
        "min_cosine": 0.6,
    },
    "critical": {
        "base_samples": "b",
        "rl_samples": "r",
        "out": "critical.json",
        "metric": "acc",
        "filter_name": "none",
        "samples_out": "ids.json",
    },
    "features_generalization": {
        "crosscoder": "cc",
        "base": "base",
        "rl": "rl",
        "critical": "critical.json",
        "model": ["base=m/b", "rl=m/r"],
        "out": "gen",
        "threshold": 0.3,
        "tasks": ["t1", "t2"],
        "overlap": "jaccard",
        "batch_size": 4,
        "split_half": 3,
    },
    "features_fisher": {
        "crosscoder": "cc",
        "model": ["base=m/b"],
        "dataset": "d.jsonl",
        "out": "fi",
        "top_k": 7,
        "max_docs": 10,
        "segments": {
            "format": "delimiters",
            "reasoning_delimiters": ["<t>", "</t>"],
            "solution_delimiters": ["</t>", ""],
        },
    },
    "intervene": {
        "features": "f.json",
        "crosscoder": "cc",
        "model": ["rl=m/r"],
        "mode": "set",
        "value": 2.5,
        "critical": "critical.json",
        "out": "iv",
        "tasks": ["t1"],
        "controls": 2,
        "positions": "last_prompt",
    },
    "leakage": {
        "crosscoder": "cc",
        "base": "m/b",
        "blocked": "m/x",
        "features": "shared",
        "dataset": "synthetic:arithmetic",
        "out": "lk",
        "max_tokens": 1000,
        "matching": "argmax",
    },
}


def _is_tuple(hint) -> bool:
    """``tuple[...]`` or ``tuple[...] | None``: one flag taking several values."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) is tuple


def _leaf_flags(config_cls: type, mapping: dict[str, typing.Any]) -> list[str]:
    """The command line that sets ``mapping`` (nested configs flattened, as cli.options does)."""
    hints = typing.get_type_hints(config_cls)
    args: list[str] = []
    for key, value in mapping.items():
        nested = nested_config_type(hints[key])
        if nested is not None:
            args += _leaf_flags(nested, value)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list) and _is_tuple(hints[key]):
            args += [flag, *map(str, value)]
        elif isinstance(value, list):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def _captured_config(monkeypatch, step, argv):
    """Run the CLI with the step function replaced by one that records its config."""
    module_name, _, function_name = step.run.partition(":")
    module = importlib.import_module(module_name)
    seen = []

    class Stop(Exception):
        pass

    def record(config, *args, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(module, function_name, record)
    result = CliRunner().invoke(app, [*step.command, *argv])
    assert seen, result.output
    return seen[0]


def test_every_step_has_an_example():
    assert set(EXAMPLES) == {name for name, step in STEPS.items() if step.generated_cli}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_from_yaml_equals_config_from_flags(name, tmp_path, monkeypatch):
    step = STEPS[name]
    example = EXAMPLES[name]
    from_python = config_from_mapping(step.config_class, example)
    assert config_from_mapping(step.config_class, config_to_mapping(from_python)) == from_python
    yaml_file = tmp_path / f"{name}.yaml"
    yaml_file.write_text(yaml.safe_dump(example))
    assert step.load_config(yaml_file) == from_python
    from_flags = _captured_config(monkeypatch, step, _leaf_flags(step.config_class, example))
    from_cli_yaml = _captured_config(monkeypatch, step, ["--config", str(yaml_file)])
    assert from_flags == from_python
    assert from_cli_yaml == from_python


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_has_a_documented_config_function_and_result(name):
    step = STEPS[name]
    config_cls = step.config_class
    assert dataclasses.is_dataclass(config_cls)
    for field in dataclasses.fields(config_cls):
        assert field.metadata.get("help"), f"{config_cls.__name__}.{field.name} has no help string"
    function = step.function
    assert function.__name__ == name and function.__doc__
    result_cls = step.result_class
    assert callable(getattr(result_cls, "write", None)) and callable(getattr(result_cls, "read", None))


def test_config_modules_and_the_cli_root_do_not_import_torch():
    """Configs are read by the CLI at startup: `posttrain-probe --help` must not pay for torch."""
    import subprocess
    import sys

    modules = sorted({step.config.partition(":")[0] for step in STEPS.values()} | {"posttrain_probe.cli.main"})
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
