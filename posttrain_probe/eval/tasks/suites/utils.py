"""Functions the suite YAMLs name (``!function utils.NAME``): dataset normalisers, prompts and scorers.

lm-eval loads this file by path (as the ``utils.py`` next to the YAMLs); it is also importable as
``posttrain_probe.eval.tasks.suites.utils``. It imports only the standard library (and the stdlib-only :mod:`posttrain_probe.math_answers`) at module level
(``math_verify`` inside the math scorer), so indexing tasks stays cheap.

* Multiple choice. ``<dataset>_doc`` turns one raw document of a dataset, in that dataset's own
  schema, into ``{"context", "question", "choices", "label"}`` (``context`` a passage or ``""``,
  ``label`` the index of the right choice); ``process_<dataset>`` maps a whole split through it
  (the YAMLs' ``process_docs``). Both scorings of a dataset share these documents: the
  log-likelihood variant scores the choice texts (or the letters, for CommonsenseQA, as lm-eval's
  own tasks do); the generative variant prompts with the lettered choices (:func:`mc_gen_prompt`)
  and reads the answer with :func:`choice_letter`.
* Math. ``<dataset>_doc`` turns a problem into ``{"problem", "answer"}``; :func:`math_results`
  scores every sampled response by math-verify on its last ``\\boxed{}`` (:func:`posttrain_probe.math_answers.answer_correct`).
* Repeats. The generative YAMLs keep every sampled response (:func:`all_responses`, their filter
  named ``none``); a document's score is the mean correctness of its responses
  (:func:`mean_correct`).
"""

from __future__ import annotations

import ast
import random
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from posttrain_probe.math_answers import MATH_INSTRUCTION, answer_correct, last_boxed
from posttrain_probe.math_answers import math_prompt as _math_prompt

LETTERS = "ABCDEFGHIJ"
"""Choice letters, in order (up to ten choices)."""

MC_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."
"""Appended to the lettered choices of the generative multiple-choice variants."""


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def mc_doc(question: str, choices: Sequence[str], label: int, context: str = "") -> dict[str, Any]:
    """The normalised multiple-choice document: stripped texts, ``label`` the index of the right choice."""
    choices = [str(c).strip() for c in choices]
    if not 0 <= int(label) < len(choices):
        raise ValueError(f"label {label} is not an index of {len(choices)} choices")
    return {
        "context": str(context or "").strip(),
        "question": str(question).strip(),
        "choices": choices,
        "label": int(label),
    }


def shuffled_choices(key: str, correct: str, wrong: Sequence[str]) -> tuple[list[str], int]:
    """``[correct, *wrong]`` in an order fixed by ``key`` (a document's text; CRC32-seeded, the same in
    every process and run); returns the choices and the index of ``correct``."""
    order = list(range(1 + len(wrong)))
    random.Random(zlib.crc32(key.encode("utf-8"))).shuffle(order)
    options = [correct, *wrong]
    return [options[i] for i in order], order.index(0)


def _normalise(dataset: Any, doc_fn: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Any:
    """``dataset`` (a ``datasets.Dataset``) mapped through ``doc_fn``, keeping only its output columns."""
    return dataset.map(doc_fn, remove_columns=dataset.column_names)


def _letter_index(letters: Sequence[str], key: str) -> int:
    """Index of answer key ``key`` among the choice labels ``letters`` (spaces ignored)."""
    return [str(x).strip() for x in letters].index(str(key).strip())


# ---------------------------------------------------------------------------------------------
# multiple choice: one normaliser per dataset (same dataset_path / splits as lm-eval's own tasks)
# ---------------------------------------------------------------------------------------------


def openbookqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """allenai/openbookqa (main): ``question_stem``, ``choices.text`` / ``choices.label``, ``answerKey``."""
    choices = doc["choices"]
    return mc_doc(doc["question_stem"], choices["text"], _letter_index(choices["label"], doc["answerKey"]))


def commonsense_qa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """tau/commonsense_qa: ``question``, ``choices.text`` / ``choices.label``, ``answerKey``."""
    choices = doc["choices"]
    return mc_doc(doc["question"], choices["text"], _letter_index(choices["label"], doc["answerKey"]))


def headqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """EleutherAI/headqa (en): ``qtext``, ``answers`` = ``[{aid, atext}]``, ``ra`` the aid of the right answer."""
    answers = list(doc["answers"])
    label = [int(a["aid"]) for a in answers].index(int(doc["ra"]))
    return mc_doc(doc["qtext"], [a["atext"] for a in answers], label)


def sciq_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """allenai/sciq: ``question``, ``correct_answer``, ``distractor1``-``3``, ``support`` (the passage, often
    empty). The four options are shuffled per document (:func:`shuffled_choices`)."""
    wrong = [doc["distractor1"], doc["distractor2"], doc["distractor3"]]
    choices, label = shuffled_choices(doc["question"], doc["correct_answer"], wrong)
    return mc_doc(doc["question"], choices, label, context=doc.get("support") or "")


def arc_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """allenai/ai2_arc: ``question``, ``choices.text`` / ``choices.label`` (letters or digits), ``answerKey``."""
    choices = doc["choices"]
    return mc_doc(doc["question"], choices["text"], _letter_index(choices["label"], doc["answerKey"]))


def logiqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """EleutherAI/logiqa: ``context`` (the passage), ``question``, ``options``, ``label`` a letter ``a``-``d``."""
    return mc_doc(doc["question"], doc["options"], "abcd".index(doc["label"].strip().lower()), context=doc["context"])


def piqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """baber/piqa: ``goal``, ``sol1``, ``sol2``, ``label`` 0 or 1."""
    return mc_doc(doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"]))


def social_iqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """lighteval/siqa: ``context``, ``question``, ``answerA``-``C``, ``label`` ``"1"``-``"3"``."""
    choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
    return mc_doc(doc["question"], choices, int(doc["label"]) - 1, context=doc["context"])


def gpqa_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Idavidrein/gpqa (gpqa_diamond): ``Question``, ``Correct Answer``, ``Incorrect Answer 1``-``3``; the
    options are shuffled per document (:func:`shuffled_choices`)."""
    wrong = [doc[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    choices, label = shuffled_choices(doc["Question"], doc["Correct Answer"], wrong)
    return mc_doc(doc["Question"], choices, label)


def race_docs(article: Mapping[str, Any]) -> list[dict[str, Any]]:
    """EleutherAI/race (high): one row per article, ``article`` and ``problems`` (a Python literal list of
    ``{question, options, answer}``, ``answer`` a letter) -> one document per question, the article as context."""
    problems = ast.literal_eval(article["problems"]) if isinstance(article["problems"], str) else article["problems"]
    return [
        mc_doc(p["question"], p["options"], LETTERS.index(p["answer"].strip()), context=article["article"])
        for p in problems
    ]


def process_openbookqa(dataset: Any) -> Any:
    """``process_docs`` of the OpenBookQA tasks (:func:`openbookqa_doc`)."""
    return _normalise(dataset, openbookqa_doc)


def process_commonsense_qa(dataset: Any) -> Any:
    """``process_docs`` of the CommonsenseQA tasks (:func:`commonsense_qa_doc`)."""
    return _normalise(dataset, commonsense_qa_doc)


def process_headqa(dataset: Any) -> Any:
    """``process_docs`` of the HeadQA tasks (:func:`headqa_doc`)."""
    return _normalise(dataset, headqa_doc)


def process_sciq(dataset: Any) -> Any:
    """``process_docs`` of the SciQ tasks (:func:`sciq_doc`)."""
    return _normalise(dataset, sciq_doc)


def process_arc(dataset: Any) -> Any:
    """``process_docs`` of the ARC tasks (:func:`arc_doc`)."""
    return _normalise(dataset, arc_doc)


def process_logiqa(dataset: Any) -> Any:
    """``process_docs`` of the LogiQA tasks (:func:`logiqa_doc`)."""
    return _normalise(dataset, logiqa_doc)


def process_piqa(dataset: Any) -> Any:
    """``process_docs`` of the PIQA tasks (:func:`piqa_doc`)."""
    return _normalise(dataset, piqa_doc)


def process_social_iqa(dataset: Any) -> Any:
    """``process_docs`` of the SocialIQa tasks (:func:`social_iqa_doc`)."""
    return _normalise(dataset, social_iqa_doc)


def process_gpqa(dataset: Any) -> Any:
    """``process_docs`` of the GPQA task (:func:`gpqa_doc`)."""
    return _normalise(dataset, gpqa_doc)


def process_race(dataset: Any) -> Any:
    """``process_docs`` of the RACE tasks: articles flattened into one document per question (:func:`race_docs`)."""

    def flatten(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        docs = [doc for row in rows for doc in race_docs(row)]
        return {key: [doc[key] for doc in docs] for key in ("context", "question", "choices", "label")}

    return dataset.map(flatten, batched=True, remove_columns=dataset.column_names)


# ---------------------------------------------------------------------------------------------
# multiple choice: prompts and the strict letter scorer
# ---------------------------------------------------------------------------------------------


def doc_choices(doc: Mapping[str, Any]) -> list[str]:
    """``doc_to_choice`` of the log-likelihood variants that score the choice texts."""
    return list(doc["choices"])


def choice_letters(doc: Mapping[str, Any]) -> list[str]:
    """``doc_to_choice`` of the log-likelihood variants that score the letters: ``A``, ``B``, ... one per choice."""
    return list(LETTERS[: len(doc["choices"])])


def _stem(doc: Mapping[str, Any]) -> str:
    """The passage (if any) and the question."""
    return f"{doc['context']}\n\n{doc['question']}" if doc["context"] else doc["question"]


def _lettered(doc: Mapping[str, Any]) -> str:
    """The choices as ``A. text`` lines."""
    return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(doc["choices"]))


def mc_text_prompt(doc: Mapping[str, Any]) -> str:
    """``doc_to_text`` of the log-likelihood variants over choice texts: ``Question: ...\\nAnswer:``."""
    return f"Question: {_stem(doc)}\nAnswer:"


def mc_letter_prompt(doc: Mapping[str, Any]) -> str:
    """``doc_to_text`` of the log-likelihood variants over letters: the question, the lettered choices, ``Answer:``."""
    return f"Question: {_stem(doc)}\n{_lettered(doc)}\nAnswer:"


def mc_gen_prompt(doc: Mapping[str, Any]) -> str:
    """``doc_to_text`` of the generative variants: the question, the lettered choices and :data:`MC_INSTRUCTION`."""
    return f"{_stem(doc)}\n\n{_lettered(doc)}\n\n{MC_INSTRUCTION}"


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_BOXED_LETTER = re.compile(r"\(?([A-Za-z])\)?\.?")
_LEADING_LETTER = re.compile(r"(?i:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?(?:\(([A-Z])\)|([A-Z])(?=$|\n|[.):]))")


def choice_letter(response: str, n_choices: int) -> str | None:
    """The choice letter a generation answers, read strictly; None when there is none.

    1. If the response contains ``\\boxed{...}``, the content of the LAST one decides: after removing
       ``\\text{}`` / ``\\textbf{}`` / ``\\mathrm{}`` wrappers and ``$``, it must be a single letter, optionally
       in parentheses or followed by a period (``B``, ``(B)``, ``B.``, ``b``); anything else is no answer.
    2. Otherwise the response (leading whitespace ignored), after an optional ``Answer:`` /
       ``The answer is`` (any case), must begin with an upper-case letter in parentheses (``(B) ...``) or
       a letter that ends the response or is followed by a newline, ``.``, ``)`` or ``:`` (``B``, ``B.``,
       ``B) Paris``, ``Answer: B``). ``B because ...``, ``A bird ...``, ``I think it's B`` give None.

    A letter beyond the ``n_choices`` choices is no answer. No fuzzy matching of choice texts.
    """
    boxed = last_boxed(response)
    if boxed is not None:
        content = boxed
        while _TEXT_WRAPPER.search(content):
            content = _TEXT_WRAPPER.sub(r"\1", content)
        match = _BOXED_LETTER.fullmatch(content.replace("$", "").strip())
        letter = match.group(1).upper() if match else None
    else:
        match = _LEADING_LETTER.match(response.lstrip())
        letter = (match.group(1) or match.group(2)) if match else None
    return letter if letter is not None and letter in LETTERS[:n_choices] else None


def gold_letter(doc: Mapping[str, Any]) -> str:
    """``doc_to_target`` of the generative variants: the letter of the right choice."""
    return LETTERS[int(doc["label"])]


def mc_gen_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``process_results`` of the generative multiple-choice variants: ``acc`` = the share of the document's
    responses whose :func:`choice_letter` is the right one (0 or 1 with one response)."""
    gold = gold_letter(doc)
    n_choices = len(doc["choices"])
    return {"acc": mean_correct(results, lambda response: choice_letter(response, n_choices) == gold)}


# ---------------------------------------------------------------------------------------------
# math: normalisers and the math-verify scorer
# ---------------------------------------------------------------------------------------------


def _math_doc(problem: Any, answer: Any) -> dict[str, str]:
    """The normalised math document."""
    return {"problem": str(problem).strip(), "answer": str(answer).strip()}


def math500_doc(doc: Mapping[str, Any]) -> dict[str, str]:
    """HuggingFaceH4/MATH-500: ``problem``, ``answer`` (LaTeX without ``\\boxed``)."""
    return _math_doc(doc["problem"], doc["answer"])


def aime24_doc(doc: Mapping[str, Any]) -> dict[str, str]:
    """Maxwell-Jia/AIME_2024: ``Problem``, ``Answer`` (an integer)."""
    return _math_doc(doc["Problem"], doc["Answer"])


def aime25_doc(doc: Mapping[str, Any]) -> dict[str, str]:
    """math-ai/aime25: ``problem``, ``answer`` (an integer as text)."""
    return _math_doc(doc["problem"], doc["answer"])


def olympiadbench_doc(doc: Mapping[str, Any]) -> dict[str, str]:
    """Hothan/OlympiadBench (OE_TO_maths_en_COMP): ``question`` (after ``context`` when there is one),
    ``final_answer`` a list of ``$...$`` answers, joined with ``", "`` when there are several."""
    problem = f"{doc['context']}\n\n{doc['question']}" if doc.get("context") else doc["question"]
    answers = doc["final_answer"]
    answers = [answers] if isinstance(answers, str) else list(answers)
    return _math_doc(problem, ", ".join(str(a).strip().strip("$").strip() for a in answers))


def process_math500(dataset: Any) -> Any:
    """``process_docs`` of ``pr_math500`` (:func:`math500_doc`)."""
    return _normalise(dataset, math500_doc)


def process_aime24(dataset: Any) -> Any:
    """``process_docs`` of ``pr_aime24`` (:func:`aime24_doc`)."""
    return _normalise(dataset, aime24_doc)


def process_aime25(dataset: Any) -> Any:
    """``process_docs`` of ``pr_aime25`` (:func:`aime25_doc`)."""
    return _normalise(dataset, aime25_doc)


def process_olympiadbench(dataset: Any) -> Any:
    """``process_docs`` of ``ps_olympiadbench`` (:func:`olympiadbench_doc`)."""
    return _normalise(dataset, olympiadbench_doc)


def math_prompt(doc: Mapping[str, Any]) -> str:
    """``doc_to_text`` of the math tasks: the problem, a blank line and :data:`MATH_INSTRUCTION`
    (:func:`posttrain_probe.math_answers.math_prompt`, the prompt of ``data prepare`` and the recipes)."""
    return _math_prompt(doc["problem"], MATH_INSTRUCTION)


def math_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """``process_results`` of the math tasks: ``acc`` = ``pass@1`` = the share of the document's sampled
    responses that :func:`~posttrain_probe.math_answers.answer_correct` accepts (the papers' accuracy averaged over repeats)."""
    gold = str(doc["answer"])
    score = mean_correct(results, lambda response: answer_correct(response, gold))
    return {"acc": score, "pass@1": score}


# ---------------------------------------------------------------------------------------------
# repeats
# ---------------------------------------------------------------------------------------------


def all_responses(resps: Iterable[Sequence[str]], docs: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The ``custom`` filter of the generative YAMLs: every document keeps all its responses (lm-eval's default
    filter keeps only the first of ``repeats``)."""
    return [list(r) for r in resps]


def responses_of(results: Sequence[Any]) -> list[str]:
    """The responses lm-eval hands ``process_results``: ``[[r1, ..., rN]]`` after :func:`all_responses`, or
    ``[r1]`` after lm-eval's default filter."""
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        return [str(r) for r in results[0]]
    return [str(r) for r in results]


def mean_correct(results: Sequence[Any], is_correct: Callable[[str], bool]) -> float:
    """Mean of ``is_correct`` over the responses of one document (:func:`responses_of`); 0.0 when there are none."""
    responses = responses_of(results)
    return sum(bool(is_correct(r)) for r in responses) / len(responses) if responses else 0.0


# ---------------------------------------------------------------------------------------------
# paper S category scores (lm-eval cannot average members that report different metrics)
# ---------------------------------------------------------------------------------------------

PAPER_S_CATEGORIES: dict[str, tuple[tuple[str, str], ...]] = {
    "paper_s_math": (
        ("pr_aime24", "acc,none"),
        ("pr_aime25", "acc,none"),
        ("pr_math500", "acc,none"),
        ("ps_olympiadbench", "acc,none"),
    ),
    "paper_s_other_reasoning": (
        ("humaneval", "pass@1,create_test"),
        ("ps_gpqa_diamond_gen", "acc,none"),
        ("ps_acpbench_mcq", "exact_match,mcq-extract"),
        ("pr_headqa_en_gen", "acc,none"),
    ),
    "paper_s_general": (
        ("pr_commonsense_qa_gen", "acc,none"),
        ("pr_logiqa_gen", "acc,none"),
        ("pr_openbookqa_gen", "acc,none"),
        ("pr_piqa_gen", "acc,none"),
        ("ps_race_high_gen", "acc,none"),
        ("pr_sciq_gen", "acc,none"),
        ("ps_social_iqa_gen", "acc,none"),
    ),
    "paper_s_non_reasoning": (("ifeval", "inst_level_strict_acc,none"), ("mc_taco", "acc,none")),
}
"""Paper S category -> its members (the direct children of the category group) and the metric each is scored
by: humaneval pass@1, ACPBench exact match (its group row), IFEval strict instruction-level accuracy, acc else."""


def paper_s_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Paper S's category scores from lm-eval's ``results`` (task or group -> metrics, as lm-eval returns and
    writes them): each category the unweighted mean of its members' scores (:data:`PAPER_S_CATEGORIES`).
    Categories with a member missing from ``results`` are left out."""
    scores = {}
    for category, members in PAPER_S_CATEGORIES.items():
        values = [results.get(name, {}).get(metric) for name, metric in members]
        if all(isinstance(v, (int, float)) for v in values):
            scores[category] = sum(values) / len(values)
    return scores
