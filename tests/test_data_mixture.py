"""Dataset mixtures (posttrain_probe.data.load_mixture): documents of several sources interleaved by weight."""

from __future__ import annotations

import json

import pytest

from posttrain_probe.data import load_dataset_spec
from posttrain_probe.errors import ProbeError


def _jsonl(path, column, prefix, n):
    path.write_text("".join(json.dumps({column: f"{prefix} {i}", "other": i}) + "\n" for i in range(n)))
    return path


def test_mixture_interleaves_sources_by_weight(tmp_path):
    _jsonl(tmp_path / "reasoning.jsonl", "trace", "think", 3000)
    _jsonl(tmp_path / "web.jsonl", "text", "page", 3000)
    (tmp_path / "mix.yaml").write_text(
        "seed: 3\nmixture:\n"
        "  - {dataset: reasoning.jsonl, column: trace, weight: 1, name: reasoning}\n"
        "  - {dataset: web.jsonl, weight: 3}\n"
    )
    mixed = load_dataset_spec(str(tmp_path / "mix.yaml"))
    assert mixed.column_names == ["text", "source"]
    sources = mixed["source"]
    share = sources.count("reasoning") / len(sources)
    assert abs(share - 0.25) < 0.03  # planted 1:3 by documents
    # the web source (3/4 of the draws) runs out first: about 4000 rows, every web page used once
    assert sources.count("web.jsonl") == 3000 and 3500 < len(mixed) < 4500
    assert all(t.startswith("think ") for t, s in zip(mixed["text"], sources) if s == "reasoning")
    again = load_dataset_spec(str(tmp_path / "mix.yaml"))
    assert again["text"] == mixed["text"]  # seeded


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("mixture: []\n", "expected a mapping with a non-empty list `mixture:`"),
        ("mixture:\n  - {dataset: web.jsonl, weight: 0}\n", "weight=0: expected a number > 0"),
        ("mixture:\n  - {dataset: web.jsonl, weigth: 2}\n", "unknown key 'weigth'"),
        ("mixture:\n  - {dataset: web.jsonl, column: body}\n", "column 'body' is not in the dataset"),
    ],
)
def test_bad_mixture_files_are_one_line_errors(tmp_path, body, message):
    _jsonl(tmp_path / "web.jsonl", "text", "page", 5)
    (tmp_path / "mix.yaml").write_text(body)
    with pytest.raises(ProbeError, match=message) as err:
        load_dataset_spec(str(tmp_path / "mix.yaml"))
    assert "\n" not in str(err.value)


def test_concatenated_problem_sets_keep_renamed_columns_and_their_source(tmp_path):
    """Two problem sets with their own column names -> one set of (problem, answer, source), every row once."""
    (tmp_path / "math.jsonl").write_text(
        "".join(json.dumps({"problem": f"p{i}", "solution": f"\\boxed{{{i}}}"}) + "\n" for i in range(3))
    )
    (tmp_path / "dsr.jsonl").write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": str(i), "extra": 0}) + "\n" for i in range(2))
    )
    (tmp_path / "problems.yaml").write_text(
        "strategy: concatenate\nmixture:\n"
        "  - {dataset: math.jsonl, columns: {problem: problem, answer: solution}, name: MATH}\n"
        "  - {dataset: dsr.jsonl, columns: {problem: question, answer: answer}, name: DeepScaleR}\n"
    )
    problems = load_dataset_spec(str(tmp_path / "problems.yaml"))
    assert sorted(problems.column_names) == ["answer", "problem", "source"]
    assert problems["problem"] == ["p0", "p1", "p2", "q0", "q1"]
    assert problems["source"] == ["MATH"] * 3 + ["DeepScaleR"] * 2 and problems["answer"][3] == "0"
