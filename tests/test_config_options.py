"""Step configs from flags, from YAML (``--config``) and from Python give equal dataclasses
(posttrain_probe.cli.options, posttrain_probe.config_io)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from posttrain_probe.cli.common import user_errors
from posttrain_probe.cli.options import config_options
from posttrain_probe.config_io import config_from_mapping, config_to_mapping, load_config
from posttrain_probe.errors import ProbeError


@dataclass
class Inner:
    """A nested config (like Fisher's segment format)."""

    format: str = field(default="openthoughts", metadata={"help": "segment format"})
    delimiters: tuple[str, str] | None = field(default=None, metadata={"help": "BEGIN END"})

    def __post_init__(self) -> None:
        if self.delimiters is not None:
            self.delimiters = tuple(self.delimiters)


@dataclass
class Outer:
    """A step config with a required field, a list, a path and a nested config."""

    crosscoder: str = field(metadata={"help": "crosscoder directory"})
    out: Path | None = field(default=None, metadata={"help": "output directory"})
    k: int = field(default=50, metadata={"help": "top k"})
    model: list[str] = field(default_factory=list, metadata={"help": "NAME=PATH"})
    flag: bool = field(default=False, metadata={"help": "a switch"})
    segments: Inner = field(default_factory=Inner, metadata={"help": "segments"})
    hidden: int = field(default=3, metadata={"cli": False, "help": "not on the command line"})

    def __post_init__(self) -> None:
        if self.out is not None:
            self.out = Path(self.out)
        if self.k < 1:
            raise ProbeError(f"k must be >= 1, got {self.k}")


seen: list[Outer] = []
app = typer.Typer()


@app.command()
@user_errors
@config_options(config=Outer)
def step(config: Outer) -> None:
    seen.append(config)


@app.command()
def other() -> None:  # a second command, so typer keeps `step` as a subcommand
    pass


def _run(args):
    seen.clear()
    result = CliRunner().invoke(app, ["step", *map(str, args)])
    return result, (seen[0] if seen else None)


def test_flags_yaml_and_python_give_equal_configs(tmp_path):
    expected = Outer(
        crosscoder="cc",
        out=Path("o"),
        k=7,
        model=["base=a", "rl=b"],
        flag=True,
        segments=Inner("delimiters", ("<t>", "</t>")),
    )
    result, from_flags = _run(
        [
            "--crosscoder",
            "cc",
            "--out",
            "o",
            "--k",
            "7",
            "--model",
            "base=a",
            "--model",
            "rl=b",
            "--flag",
            "--format",
            "delimiters",
            "--delimiters",
            "<t>",
            "</t>",
        ]
    )
    assert result.exit_code == 0, result.output
    yaml_file = tmp_path / "step.yaml"
    yaml_file.write_text(
        "crosscoder: cc\nout: o\nk: 7\nmodel: [base=a, rl=b]\nflag: true\nsegments:\n  format: delimiters\n  delimiters: ['<t>', '</t>']\n"
    )
    result, from_yaml = _run(["--config", yaml_file])
    assert result.exit_code == 0, result.output
    assert from_flags == from_yaml == expected == load_config(Outer, yaml_file)
    assert config_from_mapping(Outer, config_to_mapping(expected)) == expected


def test_command_line_wins_over_the_file_even_at_the_default_value(tmp_path):
    yaml_file = tmp_path / "step.yaml"
    yaml_file.write_text("crosscoder: cc\nk: 9\nformat: delimiters\n")  # flat keys of the nested config work too
    result, config = _run(["--config", yaml_file, "--k", "50"])  # 50 is the default, given explicitly
    assert result.exit_code == 0, result.output
    assert config.k == 50 and config.crosscoder == "cc" and config.segments.format == "delimiters"


@pytest.mark.parametrize(
    ("args", "yaml_text", "message"),
    [
        ([], None, "missing --crosscoder"),
        (["--crosscoder", "cc", "--k", "0"], None, "k must be >= 1, got 0"),
        ([], "crosscoder: cc\nkk: 3\n", "unknown key 'kk'"),
        ([], "- a\n- b\n", "must hold a mapping"),
        ([], "hidden: 4\ncrosscoder: cc\n", "unknown key 'hidden'"),
        ([], "crosscoder: cc\nsegments:\n  k: 3\n", "unknown key 'k' in"),  # a key of the outer config inside a section
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, args, yaml_text, message):
    if yaml_text is not None:
        yaml_file = tmp_path / "bad.yaml"
        yaml_file.write_text(yaml_text)
        args = [*args, "--config", yaml_file]
    result, config = _run(args)
    assert result.exit_code == 2 and config is None
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_config_from_mapping_checks_keys_and_required_fields():
    with pytest.raises(ProbeError, match="unknown key 'nope' in config: expected some of"):
        config_from_mapping(Outer, {"crosscoder": "cc", "nope": 1})
    with pytest.raises(ProbeError, match="missing crosscoder"):
        config_from_mapping(Outer, {"k": 3})
    with pytest.raises(ProbeError, match="unknown key 'x' in config section segments"):
        config_from_mapping(Outer, {"crosscoder": "cc", "segments": {"x": 1}})
