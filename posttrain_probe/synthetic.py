"""Synthetic offline data sets: deterministic arithmetic, multiple-choice and OpenThoughts-style rows.

The "embedded world" of the tests, the demo and the docs: every row is generated locally from a seed, with no hub
or network access. ``synthetic:<name>`` dataset specs (:func:`posttrain_probe.data.load_dataset_spec`) read
:data:`SYNTHETIC_DATASETS`; the tiny tokenizer of :mod:`posttrain_probe.testing` is trained on
:func:`arithmetic_rows` and :func:`multiple_choice_rows`.

* :func:`arithmetic_dataset` / :func:`multiple_choice_dataset` / :func:`openthoughts_dataset` -- data sets with
  ``messages``, ``prompt`` and ``text`` columns (OpenThoughts: ``system`` and ``conversations``).
* :func:`synthetic_dataset` -- one of them by name (a key of :data:`SYNTHETIC_DATASETS`).
* :data:`MCQ_DOMAINS` / :func:`fact_sentences` -- the domains of the multiple-choice questions
  (``multiple_choice_rows(..., domain=...)`` keeps to one) and their facts as plain sentences.

A base module: it imports only :mod:`posttrain_probe.errors` (``datasets`` lazily).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from posttrain_probe.errors import ProbeError

if TYPE_CHECKING:  # ``datasets`` is imported lazily: it costs about a second at import time
    import datasets

__all__ = [
    "MCQ_DOMAINS",
    "OPENTHOUGHTS_SYSTEM_PROMPT",
    "SYNTHETIC_DATASETS",
    "arithmetic_dataset",
    "arithmetic_rows",
    "fact_sentences",
    "multiple_choice_dataset",
    "multiple_choice_rows",
    "openthoughts_dataset",
    "synthetic_dataset",
]

_ARITH_QUESTIONS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}.", "What does {e} equal?")


def _arithmetic_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """One problem: (expression, worked steps, value). Results are non-negative integers."""
    form = rng.randrange(7)
    r = rng.randint
    if form == 0:  # a + b * c
        a, b, c = r(2, 50), r(2, 12), r(2, 9)
        p = b * c
        return f"{a} + {b} * {c}", [f"First multiply: {b} * {c} = {p}.", f"Then add: {a} + {p} = {a + p}."], a + p
    if form == 1:  # a * b + c
        a, b, c = r(2, 12), r(2, 9), r(2, 50)
        p = a * b
        return f"{a} * {b} + {c}", [f"First multiply: {a} * {b} = {p}.", f"Then add: {p} + {c} = {p + c}."], p + c
    if form == 2:  # a * b - c
        a, b = r(2, 12), r(2, 9)
        p = a * b
        c = r(1, p)
        return (
            f"{a} * {b} - {c}",
            [f"First multiply: {a} * {b} = {p}.", f"Then subtract: {p} - {c} = {p - c}."],
            p - c,
        )
    if form == 3:  # (a + b) * c
        a, b, c = r(2, 30), r(2, 30), r(2, 9)
        s = a + b
        return (
            f"({a} + {b}) * {c}",
            [f"First add inside the parentheses: {a} + {b} = {s}.", f"Then multiply: {s} * {c} = {s * c}."],
            s * c,
        )
    if form == 4:  # (a - b) * c
        b = r(2, 30)
        a, c = r(b + 1, b + 30), r(2, 9)
        s = a - b
        return (
            f"({a} - {b}) * {c}",
            [f"First subtract inside the parentheses: {a} - {b} = {s}.", f"Then multiply: {s} * {c} = {s * c}."],
            s * c,
        )
    if form == 5:  # a + b - c
        a, b = r(2, 60), r(2, 60)
        s = a + b
        c = r(1, s)
        return (
            f"{a} + {b} - {c}",
            [f"First add: {a} + {b} = {s}.", f"Then subtract: {s} - {c} = {s - c}."],
            s - c,
        )
    # a * b * c
    a, b, c = r(2, 9), r(2, 9), r(2, 6)
    p = a * b
    return (
        f"{a} * {b} * {c}",
        [f"First multiply: {a} * {b} = {p}.", f"Then multiply: {p} * {c} = {p * c}."],
        p * c,
    )


def arithmetic_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """The rows of :func:`arithmetic_dataset` as plain dicts (no ``datasets`` import)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        expr, steps, value = _arithmetic_problem(rng)
        question = rng.choice(_ARITH_QUESTIONS).format(e=expr)
        if question in seen and len(seen) < 20_000:
            continue
        seen.add(question)
        answer = "\n".join([*steps, f"The answer is \\boxed{{{value}}}."])
        user = {"role": "user", "content": question}
        rows.append(
            {
                "question": question,
                "answer": answer,
                "final_answer": str(value),
                "messages": [user, {"role": "assistant", "content": answer}],
                "prompt": [dict(user)],
                "text": f"{question}\n{answer}",
            }
        )
    return rows


def _check_n_seed(n: Any, seed: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ProbeError(f"n={n!r}: expected a non-negative int (number of rows)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProbeError(f"seed={seed!r}: expected an int")


def arithmetic_dataset(n: int = 64, seed: int = 0) -> datasets.Dataset:
    """``n`` synthetic arithmetic problems (deterministic for ``seed``), e.g.
    ``"What is 17 + 12 * 3?"`` with two worked steps.

    Columns (one row per problem):

    * ``question`` (str) -- the problem; it contains one integer expression with two of
      ``+ - *`` and possibly parentheses.
    * ``answer`` (str) -- worked solution, one step per line, the last line
      ``"The answer is \\boxed{N}."``.
    * ``final_answer`` (str) -- ``N`` (a non-negative integer, as text).
    * ``messages`` (list of ``{"role", "content"}``) -- user: question, assistant: answer.
    * ``prompt`` (list) -- the user message only (GRPO-style prompts).
    * ``text`` (str) -- ``question + "\\n" + answer``.
    """
    _check_n_seed(n, seed)
    return _to_dataset(arithmetic_rows(n, seed), "arithmetic")


def _to_dataset(rows: list[dict[str, Any]], kind: str) -> datasets.Dataset:
    """Rows -> Dataset with fixed features (also for zero rows, which ``from_list`` rejects)."""
    import datasets

    string = datasets.Value("string")
    messages = [{"role": string, "content": string}]
    if kind == "arithmetic":
        columns: dict[str, Any] = {"question": string, "answer": string, "final_answer": string}
    else:
        columns = {"question": string, "choices": [string], "label": datasets.Value("int64"), "answer": string}
    features = datasets.Features({**columns, "messages": messages, "prompt": messages, "text": string})
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


_COLOURS = {
    "a ripe banana": "yellow",
    "fresh grass": "green",
    "the clear daytime sky": "blue",
    "fresh snow": "white",
    "a lump of coal": "black",
    "a ripe tomato": "red",
    "a carrot": "orange",
    "an eggplant": "purple",
    "a lemon": "yellow",
    "a fire truck": "red",
    "a pine tree's needles": "green",
    "milk": "white",
    "a crow": "black",
    "a pumpkin": "orange",
    "chocolate": "brown",
    "a flamingo": "pink",
}
_COLOUR_NAMES = sorted(set(_COLOURS.values()))

_CAPITALS = {
    "Valdoria": "Ostrel",
    "Brenmark": "Kallivar",
    "Quenland": "Marrowgate",
    "Tessaly Reach": "Dunmere",
    "Orvania": "Piravel",
    "Zembria": "Holt Arun",
    "Caldessa": "Vintrel",
    "Norrin": "Ashbrook",
    "Elbaria": "Sorrento Vale",
    "Fenwick Isles": "Tarnhaven",
    "Moravel": "Quillon",
    "Isk": "Brightwater",
}

_LEGS = {
    "spider": 8,
    "ant": 6,
    "beetle": 6,
    "bee": 6,
    "dog": 4,
    "horse": 4,
    "cat": 4,
    "chicken": 2,
    "ostrich": 2,
    "snake": 0,
    "goldfish": 0,
    "crab": 10,
}
_LEG_COUNTS = sorted(set(_LEGS.values()))
_FLYERS = ["eagle", "sparrow", "bat", "owl", "pigeon", "swallow"]
_NON_FLYERS = ["cow", "horse", "snail", "turtle", "whale", "pig", "sheep", "rabbit", "frog", "goat"]
_SEA = ["whale", "shark", "octopus", "dolphin", "jellyfish", "starfish"]
_LAND = ["camel", "lion", "squirrel", "elephant", "fox", "giraffe", "zebra", "badger"]


MCQ_DOMAINS: dict[str, tuple[int, ...]] = {"colours": (0,), "capitals": (1,), "animals": (2, 3, 4), "numbers": (5,)}
"""Domains of the multiple-choice questions -> their question kinds: colours of things, capitals of made-up
countries, animal facts (legs, flying, sea) and the largest/smallest of four numbers."""


def _mcq_problem(rng: random.Random) -> tuple[str, str, list[str]]:
    """One question of any domain: (question, correct choice, three distinct wrong choices)."""
    return _mcq_kind(rng.randrange(6), rng)


def _mcq_kind(kind: int, rng: random.Random) -> tuple[str, str, list[str]]:
    """One question of ``kind`` (0 colour, 1 capital, 2 legs, 3 flying, 4 sea, 5 numbers)."""
    if kind == 0:
        thing = rng.choice(sorted(_COLOURS))
        right = _COLOURS[thing]
        wrong = rng.sample([c for c in _COLOUR_NAMES if c != right], 3)
        return f"What colour is {thing}?", right, wrong
    if kind == 1:
        country = rng.choice(sorted(_CAPITALS))
        right = _CAPITALS[country]
        wrong = rng.sample([c for k, c in sorted(_CAPITALS.items()) if k != country], 3)
        return f"What is the capital of {country}?", right, wrong
    if kind == 2:
        animal = rng.choice(sorted(_LEGS))
        right = _LEGS[animal]
        wrong = rng.sample([k for k in _LEG_COUNTS if k != right], 3)
        return f"How many legs does a {animal} have?", str(right), [str(w) for w in wrong]
    if kind == 3:
        return "Which of these animals can fly?", rng.choice(_FLYERS), rng.sample(_NON_FLYERS, 3)
    if kind == 4:
        return "Which of these animals lives in the sea?", rng.choice(_SEA), rng.sample(_LAND, 3)
    numbers = rng.sample(range(1, 1000), 4)
    largest = rng.random() < 0.5
    right = max(numbers) if largest else min(numbers)
    wrong = [str(x) for x in numbers if x != right]
    return f"Which number is the {'largest' if largest else 'smallest'}?", str(right), wrong


_LETTERS = "ABCD"


def multiple_choice_rows(n: int, seed: int, *, domain: str | None = None) -> list[dict[str, Any]]:
    """The rows of :func:`multiple_choice_dataset` as plain dicts (no ``datasets`` import).

    ``domain`` (a key of :data:`MCQ_DOMAINS`) keeps to the questions of one domain; ``None`` mixes all (the
    rows of :func:`multiple_choice_dataset`).
    """
    if domain is not None and domain not in MCQ_DOMAINS:
        raise ProbeError(f"unknown multiple-choice domain {domain!r}: expected one of {', '.join(MCQ_DOMAINS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if domain is None:
            question, right, wrong = _mcq_problem(rng)
        else:
            question, right, wrong = _mcq_kind(rng.choice(MCQ_DOMAINS[domain]), rng)
        label = rng.randrange(4)
        choices = list(wrong)
        rng.shuffle(choices)
        choices.insert(label, right)
        letter = _LETTERS[label]
        body = question + "\n" + "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        user = {"role": "user", "content": body}
        reply = f"Answer: {letter}"
        rows.append(
            {
                "question": question,
                "choices": choices,
                "label": label,
                "answer": letter,
                "messages": [user, {"role": "assistant", "content": reply}],
                "prompt": [dict(user)],
                "text": f"{body}\n{reply}",
            }
        )
    return rows


def fact_sentences(domain: str) -> list[str]:
    """Every fact of a fixed-table ``domain`` (a key of :data:`MCQ_DOMAINS`) as one plain sentence, e.g.
    ``"A ripe banana is yellow."``, ``"The capital of Valdoria is Ostrel."``, ``"A spider has 8 legs."``;
    ``[]`` for ``numbers`` (no fixed facts). Deterministic, in table order."""
    if domain not in MCQ_DOMAINS:
        raise ProbeError(f"unknown multiple-choice domain {domain!r}: expected one of {', '.join(MCQ_DOMAINS)}")
    if domain == "colours":
        return [f"{thing[0].upper()}{thing[1:]} is {colour}." for thing, colour in _COLOURS.items()]
    if domain == "capitals":
        return [f"The capital of {country} is {city}." for country, city in _CAPITALS.items()]
    if domain == "animals":

        def an(animal: str) -> str:
            return f"{'An' if animal[0] in 'aeiou' else 'A'} {animal}"

        legs = [f"{an(animal)} has {n} legs." for animal, n in _LEGS.items()]
        fly = [f"{an(a)} can fly." for a in _FLYERS] + [f"{an(a)} cannot fly." for a in _NON_FLYERS]
        sea = [f"{an(a)} lives in the sea." for a in _SEA] + [f"{an(a)} lives on land." for a in _LAND]
        return legs + fly + sea
    return []


def multiple_choice_dataset(n: int = 64, seed: int = 0) -> datasets.Dataset:
    """``n`` synthetic 4-way multiple-choice questions (deterministic for ``seed``): colours of
    things, capitals of made-up countries (fixed table), animal facts (legs, flying, sea) and
    the largest/smallest of four numbers.

    Columns (one row per question):

    * ``question`` (str) -- the question alone.
    * ``choices`` (list of 4 str) -- distinct options.
    * ``label`` (int in 0..3) -- index of the correct option in ``choices``.
    * ``answer`` (str) -- its letter, ``"A"``..``"D"``.
    * ``messages`` -- user: question + lettered choices (``"A. ..."`` one per line),
      assistant: ``"Answer: X"``.
    * ``prompt`` -- the user message only.
    * ``text`` (str) -- question, lettered choices and ``"Answer: X"``, one per line.
    """
    _check_n_seed(n, seed)
    return _to_dataset(multiple_choice_rows(n, seed), "mcq")


OPENTHOUGHTS_SYSTEM_PROMPT: str = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking process "
    "before providing the final precise and accurate solutions. Please structure your response into two main "
    "sections: Thought and Solution. In the Thought section, detail your reasoning process using the specified "
    "format: <|begin_of_thought|> {thought with steps separated with '\\n\\n'} <|end_of_thought|> In the Solution "
    "section, present the final solution: <|begin_of_solution|> {final formatted, precise, and clear solution} "
    "<|end_of_solution|> Now, try to solve the following question through the above guidelines:"
)
"""A shortened OpenThoughts-114k system prompt; like the real one it contains the segment tags."""

_THOUGHT_OPENERS = (
    "Okay, let me work out {e}.",
    "Let me see, I need {e}.",
    "Hmm, the question asks for {e}.",
    "Alright, so we want {e}.",
)
_THOUGHT_CHECKS = (
    "Wait, let me check that again.",
    "Hmm, maybe I should double check.",
    "But perhaps I made a slip there.",
    "Alternatively, I could redo it another way.",
    "However, let me verify the order of operations.",
)


def _openthoughts_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        expr, steps, value = _arithmetic_problem(rng)
        question = f"Return your final response within \\boxed{{}}. {rng.choice(_ARITH_QUESTIONS).format(e=expr)}"
        checks = rng.sample(_THOUGHT_CHECKS, rng.randint(1, 3))
        reasoning = "\n\n".join(
            [
                rng.choice(_THOUGHT_OPENERS).format(e=expr),
                steps[0],
                *checks,
                steps[0],
                f"Therefore {steps[1][0].lower()}{steps[1][1:]}",
                f"So the result is {value}.",
            ]
        )
        solution = "\n".join([*steps, f"The answer is \\boxed{{{value}}}."])
        reply = f"<|begin_of_thought|>\n\n{reasoning}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>"
        rows.append(
            {
                "system": OPENTHOUGHTS_SYSTEM_PROMPT,
                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": reply}],
                "problem": question,
                "deepseek_reasoning": reasoning,
                "deepseek_solution": solution,
                "final_answer": str(value),
                "text": f"{question}\n{reply}",
            }
        )
    return rows


def openthoughts_dataset(n: int = 64, seed: int = 0) -> datasets.Dataset:
    """``n`` synthetic reasoning traces in the layout of ``open-thoughts/OpenThoughts-114k`` (deterministic for
    ``seed``): arithmetic problems answered with a thought section full of reasoning words ("Wait", "Hmm", "let
    me", "Therefore", ...) and a short solution.

    Columns (one row per problem):

    * ``system`` (str) -- :data:`OPENTHOUGHTS_SYSTEM_PROMPT` (it mentions the tags, as the real one does).
    * ``conversations`` (list of ``{"from", "value"}``) -- user: the problem; assistant:
      ``<|begin_of_thought|>\\n\\n{reasoning}\\n\\n<|end_of_thought|>\\n\\n<|begin_of_solution|>\\n\\n{solution}\\n\\n<|end_of_solution|>``
      (the default config of OpenThoughts-114k has exactly ``system`` and ``conversations``).
    * ``problem``, ``deepseek_reasoning``, ``deepseek_solution`` (str) -- the problem and the two segments
      without tags (as the ``metadata`` config of OpenThoughts-114k has them).
    * ``final_answer`` (str) -- the integer result.
    * ``text`` (str) -- ``problem + "\\n" + assistant reply`` (tags included).
    """
    import datasets

    _check_n_seed(n, seed)
    rows = _openthoughts_rows(n, seed)
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "system": string,
            "conversations": [{"from": string, "value": string}],
            "problem": string,
            "deepseek_reasoning": string,
            "deepseek_solution": string,
            "final_answer": string,
            "text": string,
        }
    )
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


SYNTHETIC_DATASETS: dict[str, Callable[..., datasets.Dataset]] = {
    "arithmetic": arithmetic_dataset,
    "mcq": multiple_choice_dataset,
    "openthoughts": openthoughts_dataset,
}
"""Synthetic data sets by name: ``name -> f(n=64, seed=0) -> datasets.Dataset``."""


def synthetic_dataset(name: str, n: int = 64, seed: int = 0) -> datasets.Dataset:
    """The synthetic data set ``name`` (a key of :data:`SYNTHETIC_DATASETS`) with ``n`` rows for
    ``seed``; raises :class:`ProbeError` for an unknown name."""
    if name not in SYNTHETIC_DATASETS:
        raise ProbeError(f"unknown synthetic dataset {name!r}: expected one of {', '.join(sorted(SYNTHETIC_DATASETS))}")
    return SYNTHETIC_DATASETS[name](n=n, seed=seed)
