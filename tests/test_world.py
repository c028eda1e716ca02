"""The study's world: files, determinism, offline lm-eval tasks, disjoint evaluation data, a pretrained base."""

from __future__ import annotations

import json

import pytest
import yaml

from posttrain_probe.errors import ProbeError
from posttrain_probe.study.world import World, arithmetic_choice_row, build_world
from posttrain_probe.study.world_config import ARCHS, WorldConfig
from posttrain_probe.synthetic import arithmetic_rows

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_train=16, n_eval=8, pretrain_steps=12, pretrain_batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two worlds of the same seed, in different directories."""
    root = tmp_path_factory.mktemp("worlds")
    return [build_world(WorldConfig(out=str(root / name), **SMALL)) for name in ("a", "b")]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_files_are_written_and_read_back(worlds):
    world = worlds[0]
    assert World.read(world.out) == world
    rows = _jsonl(world.train_file)
    assert len(rows) == world.n_train == 16
    for row in rows:
        assert row["answer"].endswith(f"\\boxed{{{row['final_answer']}}}.")
        assert row["question"] in row["text"]
    assert world.in_domain_tasks == ["world_arithmetic"]
    assert world.held_out_tasks == ["world_numbers"]
    assert len(world.general_tasks) >= 3
    for task in world.tasks:
        spec = yaml.safe_load(open(f"{world.tasks_dir}/{task}.yaml"))
        assert spec["task"] == task and spec["output_type"] == "multiple_choice"
        docs = _jsonl(spec["dataset_kwargs"]["data_files"]["test"])
        assert len(docs) == world.n_eval
        for doc in docs:
            assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
    assert (worlds[0].pretrain_loss_last < worlds[0].pretrain_loss_first) and world.elapsed_s > 0


def test_same_seed_same_world(worlds):
    import torch
    from safetensors.torch import load_file

    a, b = worlds
    assert open(a.train_file).read() == open(b.train_file).read()
    for task in a.tasks:
        assert _jsonl(f"{a.tasks_dir}/{task}.jsonl") == _jsonl(f"{b.tasks_dir}/{task}.jsonl")
    wa, wb = load_file(f"{a.base_model}/model.safetensors"), load_file(f"{b.base_model}/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_base_loads_with_auto_classes(worlds):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = worlds[0]
    model = AutoModelForCausalLM.from_pretrained(world.base_model)
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    ids = tokenizer(["What is 2 + 3 * 4?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_eval_documents_are_not_training_problems(worlds):
    world = worlds[0]
    train = _jsonl(world.train_file)
    docs = _jsonl(f"{world.tasks_dir}/world_arithmetic.jsonl")
    assert not {d["question"] for d in docs} & {r["question"] for r in train}
    assert not {d["answer"] for d in docs} & {r["answer"] for r in train}  # not even rephrased
    for doc in docs:
        assert doc["choices"][doc["label"]] == doc["answer"]
        assert doc["final_answers"][doc["label"]] == doc["final_answer"] and len(set(doc["final_answers"])) == 4


def test_tasks_resolve_offline_in_lm_eval(worlds):
    from posttrain_probe.eval.runner import make_task_manager

    world = worlds[0]
    manager = make_task_manager(world.tasks, [world.tasks_dir])
    assert set(world.tasks) <= set(manager.all_subtasks)
    loaded = manager.load(world.tasks)["tasks"]
    for task in world.tasks:
        obj = loaded[task]
        docs = list(obj.test_docs())
        assert len(docs) == world.n_eval
        assert obj.doc_to_choice(docs[0]) == docs[0]["choices"]


def test_lm_eval_runs_on_the_base(worlds, tmp_path):
    from posttrain_probe.eval.lm_eval_config import LmEvalConfig
    from posttrain_probe.eval.runner import lm_eval

    world = worlds[0]
    result = lm_eval(
        LmEvalConfig(
            model_args=f"pretrained={world.base_model}",
            tasks=world.tasks,
            include_path=[world.tasks_dir],
            out=tmp_path,
            limit=4,
        )
    )
    for task in world.tasks:
        assert 0 <= result.results[task]["acc,none"] <= 1


def test_wrong_solutions_carry_one_error():
    import random

    rng = random.Random(0)
    for row in arithmetic_rows(50, seed=5):
        doc = arithmetic_choice_row(row, rng)
        for text, value in zip(doc["choices"], doc["final_answers"]):
            assert text.endswith(f"\\boxed{{{value}}}.") and int(value) >= 0
            if text != row["answer"]:  # a wrong step, not only a wrong boxed number
                assert text.split("\n")[:2] != row["answer"].split("\n")[:2]


def test_archs_match_the_tiny_models():
    from posttrain_probe.testing import ARCHITECTURES

    assert ARCHS == ARCHITECTURES


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (dict(n_train=0), "n_train=0"),
        (dict(n_eval=-1), "n_eval=-1"),
        (dict(arch="bert"), "arch='bert'"),
        (dict(hidden_size=30), "hidden_size=30"),
        (dict(pretrain_steps=1.5), "pretrain_steps=1.5"),
        (dict(pretrain_lr=0), "pretrain_lr=0"),
        (dict(seq_len=4), "seq_len=4"),
        (dict(seed="x"), "seed='x'"),
        (dict(out=""), "out=''"),
    ],
)
def test_bad_config_values(bad, words):
    with pytest.raises(ProbeError) as err:
        WorldConfig(**{"out": "w", **bad})
    message = str(err.value)
    assert words in message and "expected" in message and "\n" not in message


def test_read_refuses_a_directory_without_a_world(tmp_path):
    with pytest.raises(ProbeError, match="world.json"):
        World.read(tmp_path)
