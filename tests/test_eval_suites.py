"""The papers' evaluation suites (posttrain_probe/eval/tasks/suites, docs/evaluation.md), offline.

* Every suite task and group resolves in lm-eval's TaskManager over the shipped include path, and the
  groups name only resolvable tasks (lm-eval's built-in index is built once for the module).
* Every task runs end to end through lm-eval on local copies of a few documents written in its dataset's
  raw schema (the task's YAML with ``dataset_path: json``): with a scripted model whose answers are
  known (exact scores), and with a tiny random Qwen3 (a number in [0, 1], per-document logs).
* The scorers (math-verify, the strict letter reader) and the per-dataset normalisers, on known inputs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from posttrain_probe.eval import task_include_paths
from posttrain_probe.eval.tasks import SUITES, TASKS_DIR
from posttrain_probe.eval.tasks.suites import utils

pytestmark = pytest.mark.usefixtures("one_thread")

SUITES_DIR = TASKS_DIR / "suites"

# ---------------------------------------------------------------------------------------------
# raw documents, three per dataset, in each dataset's own schema (as on the HF hub)
# ---------------------------------------------------------------------------------------------

RAW: dict[str, list[dict]] = {
    "openbookqa": [
        {
            "id": "1",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": ["puppies barking", "plants growing", "rocks talking", "cars honking"],
                "label": list("ABCD"),
            },
            "answerKey": "B",
        },
        {
            "id": "2",
            "question_stem": "Which is a conductor?",
            "choices": {"text": ["wood", "rubber", "copper", "glass"], "label": list("ABCD")},
            "answerKey": "C",
        },
        {
            "id": "3",
            "question_stem": "Ice melts when it is",
            "choices": {"text": ["heated", "frozen", "painted", "counted"], "label": list("ABCD")},
            "answerKey": "A",
        },
    ],
    "commonsense_qa": [
        {
            "id": "a",
            "question": "Where would you keep milk cold?",
            "question_concept": "milk",
            "choices": {"label": list("ABCDE"), "text": ["oven", "fridge", "roof", "drawer", "car"]},
            "answerKey": "B",
        },
        {
            "id": "b",
            "question": "What do you use to cut paper?",
            "question_concept": "paper",
            "choices": {"label": list("ABCDE"), "text": ["spoon", "pillow", "scissors", "cup", "sock"]},
            "answerKey": "C",
        },
        {
            "id": "c",
            "question": "What falls from clouds?",
            "question_concept": "cloud",
            "choices": {"label": list("ABCDE"), "text": ["stones", "books", "shoes", "lamps", "rain"]},
            "answerKey": "E",
        },
    ],
    "headqa": [
        {
            "name": "Cuaderno_2013_1_B",
            "year": "2013",
            "category": "biology",
            "qid": 1,
            "qtext": "Which organelle makes ATP?",
            "ra": 3,
            "image": "",
            "answers": [
                {"aid": 1, "atext": "Ribosome"},
                {"aid": 2, "atext": "Nucleus"},
                {"aid": 3, "atext": "Mitochondrion"},
                {"aid": 4, "atext": "Golgi apparatus"},
            ],
        },
        {
            "name": "Cuaderno_2013_1_B",
            "year": "2013",
            "category": "medicine",
            "qid": 2,
            "qtext": "Insulin is produced by the",
            "ra": 1,
            "image": "",
            "answers": [
                {"aid": 1, "atext": "pancreas"},
                {"aid": 2, "atext": "liver"},
                {"aid": 3, "atext": "spleen"},
                {"aid": 4, "atext": "kidney"},
                {"aid": 5, "atext": "skin"},
            ],
        },
        {
            "name": "Cuaderno_2013_1_B",
            "year": "2013",
            "category": "chemistry",
            "qid": 3,
            "qtext": "The symbol of sodium is",
            "ra": 4,
            "image": "",
            "answers": [
                {"aid": 1, "atext": "S"},
                {"aid": 2, "atext": "So"},
                {"aid": 3, "atext": "Sd"},
                {"aid": 4, "atext": "Na"},
            ],
        },
    ],
    "sciq": [
        {
            "question": "What gas do plants absorb?",
            "distractor1": "oxygen",
            "distractor2": "helium",
            "distractor3": "neon",
            "correct_answer": "carbon dioxide",
            "support": "Plants take in carbon dioxide for photosynthesis.",
        },
        {
            "question": "What is the closest star to Earth?",
            "distractor1": "Sirius",
            "distractor2": "Vega",
            "distractor3": "Polaris",
            "correct_answer": "the Sun",
            "support": "",
        },
        {
            "question": "Water boils at what Celsius temperature at sea level?",
            "distractor1": "50",
            "distractor2": "0",
            "distractor3": "150",
            "correct_answer": "100",
            "support": "",
        },
    ],
    "arc": [
        {
            "id": "x1",
            "question": "Which is a mammal?",
            "choices": {"text": ["shark", "whale", "trout", "eel"], "label": list("ABCD")},
            "answerKey": "B",
        },
        {
            "id": "x2",
            "question": "What causes day and night?",
            "choices": {"text": ["Earth's rotation", "the Moon", "wind", "tides"], "label": ["1", "2", "3", "4"]},
            "answerKey": "1",
        },
        {
            "id": "x3",
            "question": "A magnet attracts",
            "choices": {"text": ["paper", "plastic", "iron"], "label": list("ABC")},
            "answerKey": "C",
        },
    ],
    "logiqa": [
        {
            "label": "c",
            "context": "All cats are animals. Tom is a cat.",
            "question": "Which follows?",
            "options": ["Tom is a dog", "Tom is a plant", "Tom is an animal", "Nothing follows"],
        },
        {
            "label": "a",
            "context": "If it rains, the road is wet. It rains.",
            "question": "Which follows?",
            "options": ["The road is wet", "The road is dry", "It is sunny", "Nothing follows"],
        },
        {
            "label": "d",
            "context": "Some birds fly.",
            "question": "Which must be true?",
            "options": ["All birds fly", "No bird flies", "Penguins fly", "At least one bird flies"],
        },
    ],
    "piqa": [
        {"goal": "To open a jar,", "sol1": "twist the lid", "sol2": "paint the lid", "label": 0},
        {"goal": "To dry wet hands,", "sol1": "use more water", "sol2": "use a towel", "label": 1},
        {"goal": "To cool soup,", "sol1": "let it sit", "sol2": "boil it", "label": 0},
    ],
    "race": [
        {
            "example_id": "high1.txt",
            "article": "Tom went to the market and bought three apples.",
            "problems": str(
                [
                    {"answer": "B", "options": ["school", "market", "park", "zoo"], "question": "Where did Tom go?"},
                    {"answer": "C", "options": ["one", "two", "three", "four"], "question": "How many apples?"},
                ]
            ),
        },
        {
            "example_id": "high2.txt",
            "article": "Anna plays the violin every evening.",
            "problems": str(
                [{"answer": "A", "options": ["violin", "piano", "drums", "flute"], "question": "Anna plays the  _  ."}]
            ),
        },
    ],
    "social_iqa": [
        {
            "context": "Kai gave Sam a gift.",
            "question": "How would Sam feel?",
            "answerA": "angry",
            "answerB": "grateful",
            "answerC": "bored",
            "label": "2",
        },
        {
            "context": "Riley fell asleep early.",
            "question": "Why did Riley do this?",
            "answerA": "was tired",
            "answerB": "was hungry",
            "answerC": "was late",
            "label": "1",
        },
        {
            "context": "Jo lost a wallet.",
            "question": "What will Jo do next?",
            "answerA": "sing",
            "answerB": "dance",
            "answerC": "look for it",
            "label": "3",
        },
    ],
    "gpqa": [
        {
            "Question": "What is the spin of an electron?",
            "Correct Answer": "1/2",
            "Incorrect Answer 1": "1",
            "Incorrect Answer 2": "0",
            "Incorrect Answer 3": "3/2",
            "Record ID": "r1",
        },
        {
            "Question": "Which base pairs with adenine in DNA?",
            "Correct Answer": "thymine",
            "Incorrect Answer 1": "uracil",
            "Incorrect Answer 2": "guanine",
            "Incorrect Answer 3": "cytosine",
            "Record ID": "r2",
        },
        {
            "Question": "What is the charge of a neutron?",
            "Correct Answer": "zero",
            "Incorrect Answer 1": "+1",
            "Incorrect Answer 2": "-1",
            "Incorrect Answer 3": "+2",
            "Record ID": "r3",
        },
    ],
    "math500": [
        {
            "problem": "What is $1/2 + 1/4$?",
            "solution": "$\\boxed{\\frac{3}{4}}$",
            "answer": "\\frac{3}{4}",
            "subject": "Prealgebra",
            "level": 1,
            "unique_id": "test/prealgebra/1.json",
        },
        {
            "problem": "Solve $x + 3 = 5$.",
            "solution": "$x = \\boxed{2}$",
            "answer": "2",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/2.json",
        },
        {
            "problem": "Convert $(0,3)$ to polar coordinates.",
            "solution": "...",
            "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
            "subject": "Precalculus",
            "level": 2,
            "unique_id": "test/precalculus/3.json",
        },
    ],
    "aime24": [
        {"ID": "2024-I-1", "Problem": "Find $200 + 4$.", "Solution": "204", "Answer": 204},
        {"ID": "2024-I-2", "Problem": "Find $5 \\cdot 5$.", "Solution": "25", "Answer": 25},
        {"ID": "2024-I-3", "Problem": "Find $100 - 1$.", "Solution": "99", "Answer": 99},
    ],
    "aime25": [
        {"id": "0", "problem": "Find $7 \\cdot 10$.", "answer": "70"},
        {"id": "1", "problem": "Find $2^{10}$.", "answer": "1024"},
        {"id": "2", "problem": "Find $3 + 4$.", "answer": "7"},
    ],
    "olympiadbench": [
        {
            "id": 1606,
            "question": "Compute $\\sin(\\pi/6)$.",
            "solution": ["It is $\\frac{1}{2}$."],
            "final_answer": ["$\\frac{1}{2}$"],
            "context": None,
            "is_multiple_answer": False,
            "unit": None,
            "answer_type": "Numerical",
            "subfield": "Algebra",
            "language": "English",
        },
        {
            "id": 1607,
            "question": "Find all real $x$ with $x^2 = 4$.",
            "solution": ["$x = \\pm 2$."],
            "final_answer": ["$-2$", "$2$"],
            "context": None,
            "is_multiple_answer": True,
            "unit": None,
            "answer_type": "Numerical",
            "subfield": "Algebra",
            "language": "English",
        },
        {
            "id": 1608,
            "question": "Find $3^3$.",
            "solution": ["27"],
            "final_answer": ["$27$"],
            "context": None,
            "is_multiple_answer": False,
            "unit": None,
            "answer_type": "Numerical",
            "subfield": "Algebra",
            "language": "English",
        },
    ],
}

MC_TASKS = {  # dataset -> task base name
    "openbookqa": "pr_openbookqa",
    "commonsense_qa": "pr_commonsense_qa",
    "headqa": "pr_headqa_en",
    "sciq": "pr_sciq",
    "arc": "pr_arc_challenge",
    "logiqa": "pr_logiqa",
    "piqa": "pr_piqa",
    "race": "ps_race_high",
    "social_iqa": "ps_social_iqa",
}
MATH_TASKS = {
    "math500": "pr_math500",
    "aime24": "pr_aime24",
    "aime25": "pr_aime25",
    "olympiadbench": "ps_olympiadbench",
}
REPEATS = {"pr_math500": 3, "pr_aime24": 10, "pr_aime25": 10, "ps_olympiadbench": 1, "ps_gpqa_diamond_gen": 3}
TASK_DATA = {
    **{f"{task}_{v}": data for data, task in MC_TASKS.items() for v in ("ll", "gen")},
    "ps_gpqa_diamond_gen": "gpqa",
    **{task: data for data, task in MATH_TASKS.items()},
}
"""Every suite task -> the dataset of its raw documents above."""

BUILTIN_MEMBERS = {"humaneval", "ifeval", "mc_taco"} | {
    f"acp_{t}_mcq" for t in ("app", "areach", "just", "land", "prog", "reach", "val")
}


def _suite_configs() -> dict[str, dict]:
    """File name -> the raw YAML of every task or group file of the suites folder (no templates)."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return {
        path.name: yaml.load(path.read_text(), Loader=_Loader)
        for path in sorted(SUITES_DIR.glob("*.yaml"))
        if not path.name.startswith("_")
    }


def _group_members(config: dict) -> list[str]:
    """The names a group YAML lists."""
    return [m if isinstance(m, str) else m["task"] for m in config["task"]]


# ---------------------------------------------------------------------------------------------
# fixtures: lm-eval task managers, local data files, models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_manager():
    """lm-eval's TaskManager over its built-in tasks and the shipped include path (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_include_paths(None))


@pytest.fixture(scope="module")
def suite_manager():
    """A TaskManager over the shipped include path only (fast; enough for the suite's own tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_include_paths(None), include_defaults=False)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Dataset -> a JSONL file of its raw documents."""
    folder = tmp_path_factory.mktemp("suite_data")
    files = {}
    for name, docs in RAW.items():
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return files


@pytest.fixture(scope="module")
def tiny_lm():
    """lm-eval's probe-hf model over a tiny random Qwen3 (no intervention)."""
    from posttrain_probe.eval.runner import load_probe_lm
    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    return load_probe_lm({"pretrained": tiny_model("qwen3"), "tokenizer": tiny_tokenizer()}, batch_size=8)


def _local(task: str, data_file: Path) -> dict:
    """Overrides that point a shipped task at a local JSONL copy of its dataset (split ``test``)."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "validation_split": None,
        "training_split": None,
        "fewshot_split": None,
    }


def _run(lm, manager, members: list[dict] | str) -> dict:
    """lm_eval.simple_evaluate of ``members`` (task overrides, run inside an ad-hoc group: lm-eval applies a group
    member's overrides to the task's own YAML config) or of a task or group name; generations cut to 6 tokens."""
    from lm_eval import simple_evaluate

    spec = members if isinstance(members, str) else {"group": "suite_check", "task": members}
    return simple_evaluate(
        model=lm,
        tasks=[spec],
        task_manager=manager,
        gen_kwargs={"max_gen_toks": 6},
        log_samples=True,
        bootstrap_iters=0,
    )


class ScriptedLM:
    """An lm-eval model that answers from the documents it is given (its lm-eval ``LM`` subclass is made
    by :func:`scripted_lm`): log-likelihood 0 for the right choice (text or letter), -5 otherwise;
    generations by ``respond(doc, doc_id, k)`` for the k-th request of a prompt (the repeats)."""

    def __init__(self, respond):
        self.respond = respond
        self.seen = Counter()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            doc, continuation = req.doc, req.args[1].strip()
            right = continuation in (doc["choices"][doc["label"]], utils.LETTERS[doc["label"]])
            out.append((0.0 if right else -5.0, right))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            k = self.seen[(req.task_name, req.args[0])]
            self.seen[(req.task_name, req.args[0])] += 1
            out.append(self.respond(req.doc, req.doc_id, k))
        return out


def scripted_lm(respond):
    """A :class:`ScriptedLM` that is an lm-eval ``LM``."""
    from lm_eval.api.model import LM

    class _Scripted(ScriptedLM, LM):
        def __init__(self, respond):
            LM.__init__(self)
            ScriptedLM.__init__(self, respond)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # lm-eval's LM requires it
            raise AssertionError("no suite task scores rolling log-likelihoods (perplexity)")

    return _Scripted(respond)


# ---------------------------------------------------------------------------------------------
# names: every task and group resolves; groups list only resolvable tasks
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # the full lm-eval index (seconds, once per module)
def test_every_suite_file_is_a_task_or_group_of_the_shipped_include_path(full_manager):
    configs = _suite_configs()
    tasks = {c["task"] for c in configs.values() if "task" in c and isinstance(c["task"], str)}
    groups = {c["group"] for c in configs.values() if "group" in c}
    assert tasks == set(TASK_DATA)
    assert groups == set(SUITES)
    assert tasks <= set(full_manager.all_subtasks) and groups <= set(full_manager.all_groups)
    for name in tasks | groups:  # ours, not shadowed by (or shadowing) a built-in of the same name
        assert Path(full_manager.task_index[name].yaml_path).parent == SUITES_DIR


@pytest.mark.slow  # the full lm-eval index (seconds, once per module)
def test_groups_list_only_resolvable_tasks(full_manager):
    from lm_eval.config.group import GroupConfig

    configs = {c["group"]: c for c in _suite_configs().values() if "group" in c}
    for group, config in configs.items():
        GroupConfig(**config)  # lm-eval's own schema check of a group file
        members = _group_members(config)
        assert members and len(set(members)) == len(members), group
        assert set(members) <= set(full_manager.all_tasks), (group, set(members) - set(full_manager.all_tasks))
    builtin = {m for c in configs.values() for m in _group_members(c) if m not in TASK_DATA and m not in configs}
    assert builtin == BUILTIN_MEMBERS


def test_suite_tasks_resolve_without_lm_eval_builtin_index():
    """The study's task manager indexes only the shipped folder when given suite tasks (not groups) alone."""
    from posttrain_probe.eval.runner import make_task_manager

    manager = make_task_manager(["pr_math500", "pr_openbookqa_gen", "ps_race_high_ll"])
    assert {"pr_math500", "pr_openbookqa_gen", "ps_race_high_ll"} <= set(manager.all_subtasks)
    assert "arc_challenge" not in manager.all_tasks


def _leaves(group: str, configs: dict[str, dict]) -> list[str]:
    """The leaf tasks of a group YAML (subgroups expanded)."""
    out = []
    for member in _group_members(configs[group]):
        out += _leaves(member, configs) if member in configs else [member]
    return out


def test_suite_membership_matches_the_papers():
    configs = {c["group"]: c for c in _suite_configs().values() if "group" in c}
    general = ["openbookqa", "commonsense_qa", "headqa_en", "sciq", "arc_challenge"]
    assert _leaves("paper_r", configs) == [
        "pr_math500",
        "pr_aime24",
        "pr_aime25",
        *[f"pr_{t}_gen" for t in general],
        "pr_logiqa_gen",
        "pr_piqa_gen",
    ]
    assert _leaves("paper_r_general_ll", configs) == [f"pr_{t}_ll" for t in general]
    assert _leaves("paper_r_held_out_ll", configs) == ["pr_logiqa_ll", "pr_piqa_ll"]
    assert len(_leaves("paper_s", configs)) == 4 + (3 + 7) + 7 + 2
    for category, members in utils.PAPER_S_CATEGORIES.items():
        assert _group_members(configs[category]) == [name for name, _ in members]
    with_mean = {g for g, c in configs.items() if c.get("aggregate_metric_list")}
    assert with_mean == set(SUITES) - {"paper_s", "paper_s_other_reasoning", "paper_s_non_reasoning"}
    for group in with_mean:
        (agg,) = configs[group]["aggregate_metric_list"]
        assert agg["weight_by_size"] is False and agg["aggregation"] == "mean"


def test_repeats_and_sampling_follow_the_papers(suite_manager):
    """MATH500 3 and AIME 10 samples at temperature 0.6 / top_p 0.95; GPQA-Diamond 3 samples; the rest greedy, once."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for task in TASK_DATA:
        config = load_yaml(suite_manager.task_index[task].yaml_path, resolve_func=False)
        repeats = config.get("repeats", 1)
        assert repeats == REPEATS.get(task, 1), task
        if config["output_type"] == "generate_until":
            gen = config["generation_kwargs"]
            assert gen["do_sample"] is (repeats > 1), task
            if repeats > 1:
                assert (gen["temperature"], gen["top_p"]) == (0.6, 0.95)
            assert gen["max_gen_toks"] >= 16384


# ---------------------------------------------------------------------------------------------
# end to end on local documents: exact scores with a scripted model
# ---------------------------------------------------------------------------------------------


def _mc_response(doc, doc_id, k):
    """Doc 0: a boxed right letter; doc 1: the right letter first; doc 2: a sentence (rejected) -> acc 2/3."""
    gold = utils.LETTERS[doc["label"]]
    return [f"Let me think.\n\\boxed{{{gold}}}", f"{gold}. It fits.", f"I think it's {gold}"][doc_id % 3]


@pytest.mark.parametrize("dataset", sorted(MC_TASKS))
def test_multiple_choice_variants_score_known_answers(dataset, suite_manager, data_files):
    base = MC_TASKS[dataset]
    lm = scripted_lm(_mc_response)
    result = _run(
        lm, suite_manager, [_local(f"{base}_ll", data_files[dataset]), _local(f"{base}_gen", data_files[dataset])]
    )
    assert result["results"][f"{base}_ll"]["acc,none"] == 1.0
    assert result["results"][f"{base}_gen"]["acc,none"] == pytest.approx(2 / 3)
    for variant, metric in (("ll", "acc"), ("gen", "acc")):
        records = result["samples"][f"{base}_{variant}"]
        assert [r["doc_id"] for r in records] == [0, 1, 2]
        assert all(metric in r for r in records)


def test_gpqa_keeps_every_sample(suite_manager, data_files):
    """3 samples per question: right, right, rejected -> 2/3 per question, all responses in the log."""
    lm = scripted_lm(lambda doc, doc_id, k: _mc_response(doc, k, k))
    result = _run(lm, suite_manager, [_local("ps_gpqa_diamond_gen", data_files["gpqa"])])
    assert result["results"]["ps_gpqa_diamond_gen"]["acc,none"] == pytest.approx(2 / 3)
    for record in result["samples"]["ps_gpqa_diamond_gen"]:
        assert record["acc"] == pytest.approx(2 / 3) and len(record["filtered_resps"][0]) == 3


def _math_response(doc, doc_id, k):
    """Doc 0: always right; doc 1: wrong on every third sample; doc 2: no \\boxed{} (wrong)."""
    right, wrong = f"So the answer is $\\boxed{{{doc['answer']}}}$.", "The answer is \\boxed{123456}."
    if doc_id == 0:
        return right
    if doc_id == 1:
        return wrong if k % 3 == 2 else right
    return f"The answer is {doc['answer']}."


@pytest.mark.parametrize("dataset", sorted(MATH_TASKS))
def test_math_tasks_average_math_verify_over_repeats(dataset, suite_manager, data_files):
    task = MATH_TASKS[dataset]
    repeats = REPEATS[task]
    result = _run(scripted_lm(_math_response), suite_manager, [_local(task, data_files[dataset])])
    doc1 = sum(k % 3 != 2 for k in range(repeats)) / repeats
    metrics = result["results"][task]
    assert metrics["acc,none"] == pytest.approx((1 + doc1 + 0) / 3)
    assert metrics["pass@1,none"] == metrics["acc,none"]
    records = result["samples"][task]
    assert [r["acc"] for r in records] == pytest.approx([1.0, doc1, 0.0])
    assert all(len(r["filtered_resps"][0]) == repeats for r in records)


def test_group_reports_the_unweighted_mean_of_its_tasks(data_files, tmp_path):
    """paper_r_held_out_gen's YAML (renamed), its members pointed at local LogiQA (3 docs) and PIQA (3 docs)."""
    from lm_eval.tasks import TaskManager

    config = yaml.safe_load((SUITES_DIR / "paper_r_held_out_gen.yaml").read_text())
    config["group"] = "held_out_check"
    config["task"] = [_local("pr_logiqa_gen", data_files["logiqa"]), _local("pr_piqa_gen", data_files["piqa"])]
    (tmp_path / "held_out_check.yaml").write_text(yaml.safe_dump(config))
    manager = TaskManager(include_path=task_include_paths(tmp_path), include_defaults=False)

    def respond(doc, doc_id, k):  # LogiQA all right (4 choices), PIQA right only on doc 0
        gold = utils.LETTERS[doc["label"]]
        return f"\\boxed{{{gold}}}" if len(doc["choices"]) == 4 or doc_id == 0 else "no idea"

    result = _run(scripted_lm(respond), manager, "held_out_check")
    assert result["results"]["pr_logiqa_gen"]["acc,none"] == 1.0
    assert result["results"]["pr_piqa_gen"]["acc,none"] == pytest.approx(1 / 3)
    assert result["results"]["held_out_check"]["acc,none"] == pytest.approx((1 + 1 / 3) / 2)


# ---------------------------------------------------------------------------------------------
# end to end on local documents: a tiny random model through probe-hf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(set(TASK_DATA.values())))
def test_tiny_model_scores_every_task_of_a_dataset(dataset, suite_manager, data_files, tiny_lm):
    tasks = [task for task, data in TASK_DATA.items() if data == dataset]
    result = _run(tiny_lm, suite_manager, [_local(task, data_files[dataset]) for task in tasks])
    n_docs = 3
    for task in tasks:
        metrics = result["results"][task]
        metric_names = (
            ["acc"]
            + (["acc_norm"] if task.endswith("_ll") else [])
            + (["pass@1"] if task in MATH_TASKS.values() else [])
        )
        for name in metric_names:
            assert 0.0 <= metrics[f"{name},none"] <= 1.0, (task, name)
        records = result["samples"][task]
        assert sorted(r["doc_id"] for r in records) == list(range(n_docs))
        assert all(0.0 <= r["acc"] <= 1.0 and r["metrics"][0] == "acc" for r in records)


# ---------------------------------------------------------------------------------------------
# scorers on known answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        ("204", "Adding gives \\boxed{204}.", True),
        ("204", "Adding gives \\boxed{205}.", False),
        ("204", "The answer is 204.", False),  # no \boxed{}: wrong
        ("204", "\\boxed{}", False),
        ("204", "First \\boxed{204}, then corrected: \\boxed{17}", False),  # the last box decides
        ("\\frac{1}{2}", "$\\boxed{0.5}$", True),
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("\\frac{1}{2}", "\\boxed{\\dfrac12}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
        ("-2, 2", "\\boxed{2, -2}", True),
        ("\\boxed{70}", "so \\boxed{70}", True),  # a gold already boxed is not boxed twice
        ("\\frac{3}{4}", "\\boxed{\\frac{3}{4} + \\frac{1}{4}}", False),
    ],
)
def test_math_correct(gold, response, expected):
    from posttrain_probe.math_answers import answer_correct

    assert answer_correct(response, gold) is expected


def test_math_results_average_the_repeats():
    doc = {"problem": "p", "answer": "\\frac{1}{2}"}
    responses = ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{2}"]
    assert utils.math_results(doc, [responses]) == {"acc": pytest.approx(2 / 3), "pass@1": pytest.approx(2 / 3)}
    assert utils.math_results(doc, ["\\boxed{0.5}"]) == {"acc": 1.0, "pass@1": 1.0}  # lm-eval's default filter shape
    assert utils.math_results(doc, [[]]) == {"acc": 0.0, "pass@1": 0.0}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", "B"),
        ("  (B)", "B"),
        ("B.", "B"),
        ("B. Paris is the capital.", "B"),
        ("B) Paris", "B"),
        ("B\nBecause Paris is the capital.", "B"),
        ("(B) because Paris is the capital", "B"),
        ("Answer: B", "B"),
        ("answer: (C)", "C"),
        ("The answer is D.", "D"),
        ("Reasoning first... so \\boxed{C}", "C"),
        ("\\boxed{(c)}", "C"),
        ("\\boxed{\\text{B}}", "B"),
        ("$\\boxed{\\textbf{(A)}}$", "A"),
        ("\\boxed{A} then changed my mind \\boxed{D}", "D"),
        # rejected
        ("I think it's B because Paris is the capital.", None),
        ("B because Paris is the capital", None),
        ("A bird in the hand", None),
        ("Paris", None),
        ("b", None),
        ("**B**", None),
        ("E", None),  # beyond the four choices
        ("\\boxed{E}", None),
        ("\\boxed{Paris}", None),
        ("\\boxed{B and C}", None),
        ("B\n\\boxed{Paris}", None),  # a \boxed{} decides, even when the output starts with a letter
        ("", None),
    ],
)
def test_choice_letter_is_strict(response, expected):
    assert utils.choice_letter(response, 4) == expected


def test_mc_gen_results_average_the_responses():
    doc = {"context": "", "question": "q", "choices": ["w", "x", "y"], "label": 1}
    assert utils.mc_gen_results(doc, [["\\boxed{B}", "B", "A"]]) == {"acc": pytest.approx(2 / 3)}
    assert utils.mc_gen_results(doc, ["(B)"]) == {"acc": 1.0}


def test_prompts():
    doc = {"context": "A passage.", "question": "Which?", "choices": ["red", "blue"], "label": 1}
    assert utils.mc_gen_prompt(doc) == (
        "A passage.\n\nWhich?\n\nA. red\nB. blue\n\n"
        "Please reason step by step, and put the letter of your final answer within \\boxed{}."
    )
    assert utils.mc_text_prompt(doc) == "Question: A passage.\n\nWhich?\nAnswer:"
    assert utils.mc_letter_prompt({**doc, "context": ""}) == "Question: Which?\nA. red\nB. blue\nAnswer:"
    assert utils.choice_letters(doc) == ["A", "B"] and utils.gold_letter(doc) == "B"
    assert utils.math_prompt({"problem": "Find $x$.", "answer": "1"}) == (
        "Find $x$.\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_one_math_prompt_for_the_suites_data_prepare_and_the_recipes():
    """The eval suites, data prepare's teacher and the recipes ask a math problem the same way."""
    from posttrain_probe.math_answers import MATH_INSTRUCTION, math_prompt
    from posttrain_probe.prepare.config import DataPrepareConfig

    assert utils.math_prompt({"problem": "Find $x$.", "answer": "1"}) == math_prompt("Find $x$.")
    assert math_prompt("Find $x$.", "Box it.") == "Find $x$.\n\nBox it."
    assert math_prompt("Find $x$.", None) == math_prompt("Find $x$.", "") == "Find $x$."
    assert DataPrepareConfig(problems="p.jsonl", teacher="t", out="o").instruction == MATH_INSTRUCTION


# ---------------------------------------------------------------------------------------------
# normalisers: raw documents -> {context, question, choices, label}
# ---------------------------------------------------------------------------------------------


def _mc(question, choices, label, context=""):
    return {"context": context, "question": question, "choices": choices, "label": label}


@pytest.mark.parametrize(
    "normaliser, raw, expected",
    [
        (
            utils.openbookqa_doc,
            RAW["openbookqa"][1],
            _mc("Which is a conductor?", ["wood", "rubber", "copper", "glass"], 2),
        ),
        (
            utils.commonsense_qa_doc,
            RAW["commonsense_qa"][2],
            _mc("What falls from clouds?", ["stones", "books", "shoes", "lamps", "rain"], 4),
        ),
        (
            utils.headqa_doc,
            RAW["headqa"][1],
            _mc("Insulin is produced by the", ["pancreas", "liver", "spleen", "kidney", "skin"], 0),
        ),
        (utils.headqa_doc, RAW["headqa"][2], _mc("The symbol of sodium is", ["S", "So", "Sd", "Na"], 3)),
        (
            utils.arc_doc,
            RAW["arc"][1],
            _mc("What causes day and night?", ["Earth's rotation", "the Moon", "wind", "tides"], 0),
        ),
        (utils.arc_doc, RAW["arc"][2], _mc("A magnet attracts", ["paper", "plastic", "iron"], 2)),
        (
            utils.logiqa_doc,
            RAW["logiqa"][0],
            _mc(
                "Which follows?",
                ["Tom is a dog", "Tom is a plant", "Tom is an animal", "Nothing follows"],
                2,
                "All cats are animals. Tom is a cat.",
            ),
        ),
        (utils.piqa_doc, RAW["piqa"][1], _mc("To dry wet hands,", ["use more water", "use a towel"], 1)),
        (
            utils.social_iqa_doc,
            RAW["social_iqa"][2],
            _mc("What will Jo do next?", ["sing", "dance", "look for it"], 2, "Jo lost a wallet."),
        ),
    ],
)
def test_normalisers(normaliser, raw, expected):
    assert normaliser(raw) == expected


@pytest.mark.parametrize("normaliser, name", [(utils.sciq_doc, "sciq"), (utils.gpqa_doc, "gpqa")])
def test_shuffled_normalisers_are_deterministic_and_keep_the_answer(normaliser, name):
    correct_key = "correct_answer" if name == "sciq" else "Correct Answer"
    for raw in RAW[name]:
        doc = normaliser(raw)
        assert doc == normaliser(dict(raw))  # the same order every time (CRC32 of the question, not hash())
        assert doc["choices"][doc["label"]] == raw[correct_key] and len(doc["choices"]) == 4
    assert utils.sciq_doc(RAW["sciq"][0])["context"] == "Plants take in carbon dioxide for photosynthesis."
    # pinned: the order depends only on the key, in every process and Python version
    assert utils.shuffled_choices("q", "right", ["a", "b", "c"]) == (["c", "right", "a", "b"], 1)


def test_race_flattens_articles_into_questions():
    docs = [doc for article in RAW["race"] for doc in utils.race_docs(article)]
    assert [d["question"] for d in docs] == ["Where did Tom go?", "How many apples?", "Anna plays the  _  ."]
    assert [d["label"] for d in docs] == [1, 2, 0]
    assert docs[0]["context"] == "Tom went to the market and bought three apples."


def test_math_normalisers():
    assert utils.math500_doc(RAW["math500"][0]) == {"problem": "What is $1/2 + 1/4$?", "answer": "\\frac{3}{4}"}
    assert utils.aime24_doc(RAW["aime24"][0]) == {"problem": "Find $200 + 4$.", "answer": "204"}
    assert utils.aime25_doc(RAW["aime25"][1]) == {"problem": "Find $2^{10}$.", "answer": "1024"}
    assert utils.olympiadbench_doc(RAW["olympiadbench"][0])["answer"] == "\\frac{1}{2}"
    assert utils.olympiadbench_doc(RAW["olympiadbench"][1])["answer"] == "-2, 2"
    with_context = {**RAW["olympiadbench"][2], "context": "Let $a = 3$."}
    assert utils.olympiadbench_doc(with_context)["problem"] == "Let $a = 3$.\n\nFind $3^3$."


def test_bad_label_is_refused():
    with pytest.raises(ValueError, match="not an index"):
        utils.mc_doc("q", ["a", "b"], 2)


# ---------------------------------------------------------------------------------------------
# paper S category scores
# ---------------------------------------------------------------------------------------------


def test_paper_s_scores_average_each_categorys_members():
    results = {name: {metric: 0.5} for members in utils.PAPER_S_CATEGORIES.values() for name, metric in members}
    results["humaneval"] = {"pass@1,create_test": 0.9}
    results["ifeval"] = {"inst_level_strict_acc,none": 0.7, "prompt_level_strict_acc,none": 0.1}
    scores = utils.paper_s_scores(results)
    assert scores["paper_s_math"] == 0.5 and scores["paper_s_general"] == 0.5
    assert scores["paper_s_other_reasoning"] == pytest.approx((0.9 + 0.5 * 3) / 4)
    assert scores["paper_s_non_reasoning"] == pytest.approx((0.7 + 0.5) / 2)
    del results["mc_taco"]
    assert "paper_s_non_reasoning" not in utils.paper_s_scores(results)
