"""``data prepare``: rejection-sampled teacher traces written as SFT and RL datasets over the same problems.

Two kinds of teacher:

- real HF ``generate`` on tiny models saved to disk: a random one (never writes a ``\\boxed{}`` answer: acceptance 0)
  and one overfitted here in seconds to answer four fixed prompts (some right, one wrong, one unboxed). Its sampled
  output is not controlled; the test records what it generated and recounts acceptance with math-verify directly;
- a scripted generator passed to :func:`build_datasets` (the core takes any ``generate(prompts, n)``), for exact
  counts: which try is kept, ``traces_per_problem``, per-source acceptance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from posttrain_probe.cli.main import app
from posttrain_probe.data import load_dataset_spec
from posttrain_probe.errors import ProbeError
from posttrain_probe.prepare.config import DataPrepareConfig
from posttrain_probe.prepare.generate import encode_prompts, load_teacher
from posttrain_probe.prepare.prepare import (
    PROVENANCE,
    RL,
    SFT,
    PreparedData,
    accepted,
    build_datasets,
    data_prepare,
    last_boxed,
    load_problems,
)
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

INSTRUCTION = "Put the answer in \\boxed{}."
# (problem, gold answer, source, what the overfitted teacher learns to write)
PROBLEMS = [
    ("What is 3 + 4?", "7", "MATH", "3 + 4 = 7, so \\boxed{7}"),
    ("What is 2 + 3?", "6", "MATH", "2 + 3 = 5, so \\boxed{5}"),  # wrong answer: rejected
    ("Name a colour.", "3", "DeepScaleR", "Blue is a colour."),  # no boxed answer: rejected
    ("Half of one?", "0.5", "DeepScaleR", "It is \\boxed{\\frac{1}{2}}"),  # equal to 0.5 for math-verify
]


def write_problems(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    rows = [{"problem": p, "answer": a, "source": s} for p, a, s, _ in PROBLEMS]
    return write_problems(tmp_path_factory.mktemp("problems") / "problems.jsonl", rows)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """A random tiny model with the tiny tokenizer: it never writes a boxed answer."""
    path = tmp_path_factory.mktemp("random_teacher")
    tiny_model("qwen3", seed=0, hidden_size=32, num_layers=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def boxing_teacher(tmp_path_factory) -> Path:
    """A tiny model overfitted (80 Adam steps) to answer the PROBLEMS prompts (chat template + INSTRUCTION) with their
    scripted completions, then eos; what it samples is still its own."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3", seed=0, hidden_size=32, num_layers=2).train()
    prompts = encode_prompts(tokenizer, [f"{p}\n\n{INSTRUCTION}" for p, *_ in PROBLEMS], chat_template=True)
    sequences = [
        ids + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for ids, (*_, c) in zip(prompts, PROBLEMS)
    ]
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
    path = tmp_path_factory.mktemp("boxing_teacher")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teacher_config(problems: Path, teacher: Path, out: Path, **overrides) -> DataPrepareConfig:
    fields = dict(
        problems=str(problems),
        teacher=str(teacher),
        out=out,
        source_column="source",
        instruction=INSTRUCTION,
        n_tries=3,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=24,
        batch_size=2,
        backend="hf",
        device="cpu",
        seed=0,
    )
    return DataPrepareConfig(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------
# An independent acceptance count: math-verify called directly
# --------------------------------------------------------------------------------------------

_BRACED = re.compile(r"\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")


def math_verify_accepts(trace: str, gold: str) -> bool:
    """The last \\boxed{} of the trace (complete) against the gold, by math_verify.parse/verify."""
    from math_verify import parse, verify

    head, sep, tail = trace.rpartition("\\boxed")
    match = _BRACED.match(tail) if sep else None
    if match is None:
        return False
    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
    return verify(gold_parsed, parse(f"\\boxed{{{match.group(1)}}}"))


def test_accepted_reads_the_last_complete_boxed_answer():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{2") is None  # the final answer is cut off
    assert last_boxed("no answer") is None
    assert accepted("so \\boxed{\\frac12}.", "0.5")
    assert accepted("\\boxed{7} no, \\boxed{8}", "8") and not accepted("\\boxed{7} no, \\boxed{8}", "7")
    assert accepted("\\boxed{x^2 + 1}", "x^2+1")  # a plain gold that parses only in $...$
    assert accepted("\\boxed{12}", "\\boxed{12}")
    assert accepted("so \\boxed{1/2}", "The area is $x$, hence \\boxed{\\frac{1}{2}}.")  # MATH: a worked solution
    assert accepted("\\boxed{18.9}", "\\$18.90")  # an escaped dollar is not a delimiter
    assert not accepted("the answer is 7", "7")  # no boxed answer
    assert not accepted("\\boxed{7}", "")  # no gold


# --------------------------------------------------------------------------------------------
# A scripted generator: exact counts
# --------------------------------------------------------------------------------------------


def test_scripted_teacher_keeps_the_first_accepted_traces(tmp_path):
    rows = [
        {"problem": "p0", "answer": "7", "source": "MATH", "uid": "a"},
        {"problem": "p1", "answer": "\\frac{1}{3}", "source": "MATH", "uid": "b"},
        {"problem": "p2", "answer": "2", "source": "DeepScaleR", "uid": "c"},
        {"problem": "p3", "answer": "x+1", "source": "DeepScaleR", "uid": "d"},
        {"problem": "p4", "answer": "", "source": "DeepScaleR", "uid": "e"},  # gold does not parse: not sampled
    ]
    scripts = {  # the tries the scripted teacher returns, by problem
        "p0": ["\\boxed{6}", "so \\boxed{7}", "again \\boxed{7.0}", "\\boxed{8}"],
        "p1": ["1/3", "\\boxed{0.5}", "\\boxed{\\frac{2}{6}}", "\\boxed{1/3}"],
        "p2": ["no box", "\\boxed{3}", "\\boxed{4}", "\\boxed{5}"],
        "p3": ["\\boxed{1+x}", "\\boxed{x+1}", "\\boxed{x + 1}", "\\boxed{x-1}"],
    }
    asked = []

    def scripted(prompts, n):
        asked.append((list(prompts), n))
        return [scripts[p.split("\n\n")[0]][:n] for p in prompts]

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "problems.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    config = DataPrepareConfig(
        problems=str(path), teacher="scripted", out=tmp_path / "out", source_column="source", id_column="uid",
        n_tries=4, traces_per_problem=2, batch_size=3,
    )  # fmt: skip
    problem_set = load_problems(config)
    assert problem_set.gold_unparseable == ["e"] and problem_set.n_rows == 5
    result = build_datasets(config, problem_set, scripted, teacher={"backend": "scripted"}, batch_size=3)

    assert [n for _, n in asked] == [4, 4] and [len(p) for p, _ in asked] == [3, 1]  # n_tries, batch_size
    assert asked[0][0][0] == f"p0\n\n{config.instruction}"
    assert [(r["problem_id"], r["attempt"], r["answer"]) for r in result.sft] == [
        ("a", 1, "so \\boxed{7}"),
        ("a", 2, "again \\boxed{7.0}"),
        ("b", 2, "\\boxed{\\frac{2}{6}}"),
        ("b", 3, "\\boxed{1/3}"),
        ("d", 0, "\\boxed{1+x}"),
        ("d", 1, "\\boxed{x+1}"),
    ]
    assert [r["problem_id"] for r in result.rl] == ["a", "b", "d"]
    assert {r["problem_id"] for r in result.sft} == {r["problem_id"] for r in result.rl}
    assert result.rl[2] == {"problem_id": "d", "question": "p3", "final_answer": "$x+1$", "source": "DeepScaleR"}
    by_source = result.acceptance["by_source"]
    assert (by_source["MATH"]["accepted"], by_source["MATH"]["generated"]) == (4, 8)
    assert (by_source["DeepScaleR"]["accepted"], by_source["DeepScaleR"]["generated"]) == (3, 8)
    assert by_source["DeepScaleR"]["gold_unparseable"] == 1 and by_source["DeepScaleR"]["problems_kept"] == 1
    overall = result.acceptance["overall"]
    assert (overall["accepted"], overall["generated"], overall["without_boxed"]) == (7, 16, 2)
    assert overall["acceptance"] == 7 / 16 and overall["traces_kept"] == 6

    files = result.write(config.out)
    assert set(files) == {SFT, RL, PROVENANCE}
    assert not [p for p in config.out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert PreparedData.read(config.out) == result


def test_no_accepted_trace_is_an_error_and_writes_nothing(tmp_path, problems_file):
    config = teacher_config(problems_file, Path("scripted"), tmp_path / "out")
    problem_set = load_problems(config)
    with pytest.raises(ProbeError, match=r"acceptance 0/12: .* \(4 traces without a \\boxed\{\} answer\)"):
        build_datasets(
            config, problem_set, lambda prompts, n: [["\\boxed{999}", "x", "\\boxed{998}"] for _ in prompts], teacher={}
        )
    assert not config.out.exists()


def test_random_hf_teacher_gets_acceptance_zero_and_no_dataset(tmp_path, problems_file, random_teacher):
    """The real HF path on a random tiny model (plain prompts, no chat template): nothing boxed, nothing written."""
    config = teacher_config(problems_file, random_teacher, tmp_path / "out", chat_template=False, n_tries=2)
    with pytest.raises(ProbeError, match=r"^acceptance 0/8: ") as err:
        data_prepare(config)
    assert "\n" not in str(err.value)
    assert not config.out.exists()


# --------------------------------------------------------------------------------------------
# The real HF path: recorded generations, recounted with math-verify
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, problems_file, boxing_teacher):
    """build_datasets on the loaded HF teacher, its generations recorded on the way."""
    config = teacher_config(problems_file, boxing_teacher, tmp_path_factory.mktemp("recorded") / "out")
    teacher = load_teacher(config, "hf")
    calls = []

    def recording(prompts, n):
        completions = teacher.generate(prompts, n)
        calls.append((list(prompts), n, completions))
        return completions

    result = build_datasets(
        config, load_problems(config), recording, teacher=teacher.settings, batch_size=teacher.batch_size
    )
    return config, result, calls


def test_hf_teacher_keeps_exactly_what_math_verify_accepts(recorded_run):
    config, result, calls = recorded_run
    assert [len(p) for p, _, _ in calls] == [2, 2] and all(n == 3 for _, n, _ in calls)  # batch_size, n_tries
    generated = [traces for _, _, completions in calls for traces in completions]
    assert all(len(traces) == config.n_tries for traces in generated)
    expected_rows, expected_counts = [], {}
    for index, ((problem, gold, source, _), traces) in enumerate(zip(PROBLEMS, generated)):
        verdicts = [math_verify_accepts(trace, gold) for trace in traces]
        first = next((i for i, ok in enumerate(verdicts) if ok), None)
        if first is not None:
            expected_rows.append((index, problem, traces[first], first))
        counts = expected_counts.setdefault(source, [0, 0, 0])
        counts[0] += sum(verdicts)
        counts[1] += len(verdicts)
        counts[2] += first is not None
    assert [(r["problem_id"], r["question"], r["answer"], r["attempt"]) for r in result.sft] == expected_rows
    by_source = result.acceptance["by_source"]
    assert {s: [c["accepted"], c["generated"], c["problems_kept"]] for s, c in by_source.items()} == expected_counts
    # the teacher was trained to get problems 0 and 3 right, 1 wrong and 2 unboxed: both verdicts occur
    overall = result.acceptance["overall"]
    assert 0 < overall["accepted"] < overall["generated"] == 12
    assert [r["problem_id"] for r in result.rl] == [r["problem_id"] for r in result.sft]  # traces_per_problem 1
    assert result.provenance["teacher"]["backend"] == "hf" and result.provenance["teacher"]["chat_template"]
    assert result.provenance["sampling"]["n_tries"] == 3 and result.provenance["sampling"]["seed"] == 0


def test_cli_data_prepare_from_yaml_writes_what_the_recipes_read(tmp_path, recorded_run):
    config, recorded, _ = recorded_run
    out = tmp_path / "data"
    settings = {
        "problems": config.problems, "teacher": config.teacher, "out": str(out), "source_column": "source",
        "instruction": INSTRUCTION, "n_tries": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24,
        "batch_size": 2, "backend": "hf", "device": "cpu", "seed": 0,
    }  # fmt: skip
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(settings))
    run = CliRunner().invoke(app, ["data", "prepare", "--config", str(tmp_path / "prepare.yaml")])
    assert run.exit_code == 0, run.output
    assert "traces accepted" in run.output and "MATH:" in run.output
    written = PreparedData.read(out)
    assert written.sft == recorded.sft and written.rl == recorded.rl  # same seed, same traces
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["files"][SFT]["rows"] == len(recorded.sft)
    assert provenance["config"]["teacher"] == config.teacher

    sft = load_dataset_spec(str(out / SFT))
    rl = load_dataset_spec(str(out / RL))
    assert {"question", "answer", "final_answer"} <= set(sft.column_names)  # the recipes' column defaults
    assert {"question", "final_answer"} <= set(rl.column_names)
    assert sorted(sft["problem_id"]) == sorted(rl["problem_id"])

    trl = pytest.importorskip("trl")  # noqa: F841 - the recipes need it
    from recipes.common import MathScriptArguments, grpo_dataset, sft_dataset

    sft_rows = sft_dataset(MathScriptArguments(dataset_name=str(out / SFT), instruction=INSTRUCTION))
    grpo_rows = grpo_dataset(MathScriptArguments(dataset_name=str(out / RL), instruction=INSTRUCTION))
    assert sft_rows[0]["prompt"][0]["content"] == f"{recorded.sft[0]['question']}\n\n{INSTRUCTION}"
    assert sft_rows[0]["completion"][0]["content"] == recorded.sft[0]["answer"]
    assert grpo_rows["solution"] == [r["final_answer"] for r in recorded.rl]


# --------------------------------------------------------------------------------------------
# Bad input: one line, before anything loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer_column": "gold"}, r"answer_column 'gold' is not a column of .*: it has problem, answer, source"),
        ({"problem_column": "question"}, r"problem_column 'question' is not a column of .*: it has problem, answer"),
        ({"source_column": "origin"}, r"source_column 'origin' is not a column"),
    ],
)
def test_missing_columns_are_named_before_the_teacher_loads(tmp_path, problems_file, change, message):
    config = teacher_config(problems_file, tmp_path / "no_such_teacher", tmp_path / "out", **change)
    with pytest.raises(ProbeError, match=message):
        data_prepare(config)
    assert not config.out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_tries": 0}, r"n_tries must be an integer >= 1, got 0"),
        ({"backend": "tpu"}, r"backend 'tpu' is not one of auto, vllm, hf"),
        ({"traces_per_problem": 4}, r"traces_per_problem 4 exceeds n_tries 3"),
        ({"temperature": 0.0}, r"temperature 0 \(greedy\) with n_tries 3"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"dtype": "int8"}, r"unsupported teacher dtype 'int8'"),
    ],
)
def test_bad_settings_are_refused_by_the_config(tmp_path, change, message):
    with pytest.raises(ProbeError, match=message):
        teacher_config(Path("p.jsonl"), Path("t"), tmp_path / "out", **change)


def test_vllm_without_the_package_or_a_gpu_is_refused_first(tmp_path, monkeypatch):
    from posttrain_probe.prepare import generate

    config = teacher_config(tmp_path / "missing.jsonl", tmp_path / "missing", tmp_path / "out", backend="vllm")
    monkeypatch.setattr(generate, "vllm_missing", lambda: ["the vllm package", "a CUDA GPU"])
    with pytest.raises(ProbeError, match=r"backend 'vllm' needs the vllm package, which is not installed"):
        data_prepare(config)  # the missing problem file is not reached
    monkeypatch.setattr(generate, "vllm_missing", lambda: ["a CUDA GPU"])
    with pytest.raises(ProbeError, match=r"backend 'vllm' needs a CUDA GPU and torch sees none"):
        data_prepare(config)
    assert generate.choose_backend("auto") == "hf"
    monkeypatch.setattr(generate, "vllm_missing", lambda: [])
    assert generate.choose_backend("auto") == generate.choose_backend("vllm", tensor_parallel_size=8) == "vllm"


@pytest.mark.parametrize("backend", ["hf", "auto"])
def test_tensor_parallel_on_the_hf_backend_is_refused_before_loading(tmp_path, monkeypatch, backend):
    """HF generate runs the teacher on one device: tensor_parallel_size > 1 there is an error, not a silent 1."""
    from posttrain_probe.prepare import generate

    monkeypatch.setattr(generate, "vllm_missing", lambda: ["a CUDA GPU"])  # auto resolves to hf
    config = teacher_config(
        tmp_path / "missing.jsonl", tmp_path / "missing", tmp_path / "out", backend=backend, tensor_parallel_size=8
    )
    with pytest.raises(ProbeError, match=r"^tensor_parallel_size=8 needs the vllm backend: HF generate runs"):
        data_prepare(config)  # the missing problem file is not reached
    assert not config.out.exists()


def test_problem_sets_without_usable_gold_or_unique_ids_are_refused(tmp_path):
    rows = [{"problem": "p0", "answer": "", "uid": 1}, {"problem": "p1", "answer": None, "uid": 1}]
    path = write_problems(tmp_path / "p.jsonl", rows)
    with pytest.raises(ProbeError, match=r"no gold answer in column 'answer' of .* parses with math-verify"):
        load_problems(DataPrepareConfig(problems=str(path), teacher="t", out=tmp_path / "out"))
    with pytest.raises(ProbeError, match=r"id_column 'uid' holds 1 twice"):
        load_problems(DataPrepareConfig(problems=str(path), teacher="t", out=tmp_path / "out", id_column="uid"))


def test_cli_bad_input_is_one_line(tmp_path, problems_file):
    run = CliRunner().invoke(
        app, ["data", "prepare", "--problems", str(problems_file), "--teacher", "t", "--out", str(tmp_path / "o"),
              "--answer-column", "gold"],
    )  # fmt: skip
    assert run.exit_code == 2
    assert run.output.strip().count("\n") == 0 and "answer_column 'gold' is not a column" in run.output


# --------------------------------------------------------------------------------------------
# Writing: atomic, and read refuses an incomplete directory
# --------------------------------------------------------------------------------------------


def test_a_crash_while_writing_leaves_no_dataset_that_reads_as_complete(tmp_path, monkeypatch):
    from posttrain_probe.prepare import prepare

    old = PreparedData(
        [{"problem_id": 0, "answer": "old"}], [{"problem_id": 0}], {"format": prepare.FORMAT, "format_version": 1}
    )
    new = PreparedData(
        [{"problem_id": 1, "answer": "new"}], [{"problem_id": 1}], {"format": prepare.FORMAT, "format_version": 1}
    )
    old.write(tmp_path)
    assert PreparedData.read(tmp_path) == old
    real_replace, moved = prepare.os.replace, []

    def crash_after_the_first_file(src, dst):
        if moved:
            raise OSError("disk full")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(prepare.os, "replace", crash_after_the_first_file)
    with pytest.raises(OSError, match="disk full"):
        new.write(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / PROVENANCE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ProbeError, match="holds no provenance.json"):
        PreparedData.read(tmp_path)
    new.write(tmp_path)
    assert PreparedData.read(tmp_path) == new


def test_hf_teacher_samples_with_temperature_and_top_p_only(tmp_path, problems_file):
    """A generation_config.json with top_k, min_p and a repetition penalty (as real models ship) changes nothing:
    the same weights and seed give the same traces as without it."""
    paths = {}
    for name, defaults in (("plain", {}), ("tuned", dict(do_sample=True, top_k=3, min_p=0.2, repetition_penalty=1.5))):
        model = tiny_model("qwen3", seed=0, hidden_size=32, num_layers=2)
        for key, value in defaults.items():
            setattr(model.generation_config, key, value)
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tiny_tokenizer().save_pretrained(paths[name])
    traces = {
        name: load_teacher(teacher_config(problems_file, path, tmp_path / "out"), "hf").generate(["What is 3 + 4?"], 3)
        for name, path in paths.items()
    }
    assert traces["plain"] == traces["tuned"]
    assert len(set(traces["plain"][0])) > 1  # really sampled
