"""Final answers of math text, checked with math-verify: one implementation for everything that scores them (the
teacher-trace filter of ``data prepare``, the generative math and multiple-choice tasks of the eval suites), and the
one math prompt they and the recipes ask with.

* :data:`MATH_INSTRUCTION` / :func:`math_prompt` -- the prompt of a math problem: the question, a blank line, the
  instruction (eval suites, ``data prepare``'s teacher, the TRL recipes);
* :func:`last_boxed` -- the content of the last ``\\boxed{...}`` of a text (the answer a model commits to);
* :func:`gold_text` / :func:`parse_gold` -- a gold answer (plain, ``$...$``, or a worked solution ending in a boxed
  answer) in the form math-verify parses;
* :func:`answer_correct` -- whether math-verify accepts a response's last boxed answer against a gold answer.

Needs ``math-verify`` (the ``eval``, ``prepare`` and ``trl`` extras) only when :func:`parse_gold` or
:func:`answer_correct` run.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math problem (paper S, appendix C.3; the Qwen math prompt)."""


def math_prompt(question: str, instruction: str | None = MATH_INSTRUCTION) -> str:
    """The user prompt of a math problem: ``question``, a blank line, ``instruction``; just ``question`` when
    ``instruction`` is None or empty."""
    return f"{question}\n\n{instruction}" if instruction else question


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (braces balanced), or None when there is none or the
    last one is cut off."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def gold_text(answer: Any) -> str:
    """The gold answer as math-verify reads it, in ``$...$``: the last ``\\boxed{}`` of a worked solution (MATH's
    ``solution``), else the text without its own ``$`` delimiters; ``""`` when there is none. (A plain ``x^2+1`` or
    ``(1,2)`` does not parse without the delimiters; ``\\$18.90`` is not a delimiter.)"""
    text = "" if answer is None else str(answer).strip()
    if "\\boxed" in text:
        text = (last_boxed(text) or "").strip()
    elif len(text) >= 2 and text.startswith("$") and text.endswith("$") and not text.endswith("\\$"):
        text = text.strip("$").strip()
    return f"${text}$" if text else ""


def math_verify_timeout(seconds: int) -> int | None:
    """math-verify's timeouts use signal.alarm, which works only in the main thread: none elsewhere."""
    return seconds if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's parse of a gold answer as :func:`gold_text` reads it (cached; ``()`` when it does not parse)."""
    from math_verify import parse

    text = gold_text(gold)
    return tuple(parse(text, parsing_timeout=math_verify_timeout(5))) if text else ()


def answer_correct(trace: str, gold: str) -> bool:
    """Whether math-verify accepts the answer in the last ``\\boxed{}`` of ``trace`` against ``gold`` (the gold answer,
    as :func:`gold_text` reads it). A trace without a complete boxed answer, or a gold that does not parse, is
    not accepted."""
    from math_verify import parse, verify

    answer = last_boxed(trace)
    gold_parsed = parse_gold(gold)
    if answer is None or not gold_parsed:
        return False
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=math_verify_timeout(5))
    return bool(predicted) and verify(list(gold_parsed), predicted, timeout_seconds=math_verify_timeout(5))
