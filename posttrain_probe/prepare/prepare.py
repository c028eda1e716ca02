"""The step ``data prepare``: rejection-sampled teacher traces on a math problem set, as an SFT and an RL dataset
over the same problems.

:func:`data_prepare` (a :class:`~posttrain_probe.prepare.config.DataPrepareConfig`) -> :class:`PreparedData`.
For every problem the teacher samples ``n_tries`` traces; a trace is kept when math-verify accepts the answer in its
last ``\\boxed{}`` against the gold answer (:func:`accepted`), the first ``traces_per_problem`` of them per problem.
Problems with at least one kept trace make both datasets, so SFT and RL train on exactly the same problems:

- ``sft.jsonl``: one row per kept trace: ``problem_id``, ``question``, ``answer`` (the trace), ``final_answer``,
  ``source``, ``attempt`` (the try it came from, 0-based);
- ``rl.jsonl``: one row per kept problem: ``problem_id``, ``question``, ``final_answer``, ``source``;
- ``provenance.json``: teacher, sampling parameters, seed, counts and acceptance overall and per source.

``question`` is the problem without the instruction (the recipes append their ``instruction``: give them the one
``provenance.json`` records); ``final_answer`` is the gold answer in the form math-verify parsed (:func:`gold_text`: the
column's text or the last ``\\boxed{}`` of a worked solution, in ``$...$``), so GRPO's reward parses the gold the way
acceptance did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from posttrain_probe.config_io import config_to_mapping
from posttrain_probe.errors import ProbeError
from posttrain_probe.math_answers import answer_correct as accepted
from posttrain_probe.math_answers import gold_text, last_boxed, math_prompt, parse_gold
from posttrain_probe.prepare.config import DataPrepareConfig
from posttrain_probe.prepare.generate import Generate, choose_backend, load_teacher

SFT, RL, PROVENANCE = "sft.jsonl", "rl.jsonl", "provenance.json"
"""The files of a prepared dataset; ``provenance.json`` is written last (a directory without it is incomplete)."""
FORMAT, FORMAT_VERSION = "posttrain-probe/data-prepare", 1
ALL_SOURCES = "all"
"""The source of every problem when ``source_column`` is unset."""


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    """One problem of the set, as the teacher sees it."""

    problem_id: Any
    """The ``id_column`` value, or the row index."""
    question: str
    """The problem statement (without the instruction)."""
    final_answer: str
    """The gold answer as :func:`gold_text` reads it."""
    source: str
    """The ``source_column`` value, or ``all``."""


class ProblemSet(NamedTuple):
    """The problems a run samples for, and what was left out before sampling."""

    problems: list[Problem]
    """Problems whose gold answer parses."""
    n_rows: int
    """Rows read (after ``limit``)."""
    gold_unparseable: list[Any]
    """Ids of the rows whose gold answer math-verify cannot parse (not sampled)."""
    unparseable_by_source: dict[str, int]
    """Their count per source."""
    sha256: str
    """sha256 of the rows' (id, problem, gold answer, source), as read."""


def load_problems(config: DataPrepareConfig) -> ProblemSet:
    """The problem set of ``config``, checked: the columns exist (ProbeError listing the columns it has), ids are
    unique, and at least one gold answer parses with math-verify."""
    from posttrain_probe.data import load_dataset_spec

    try:
        import math_verify  # noqa: F401
    except ImportError as err:
        raise ProbeError(
            "data prepare verifies answers with math-verify, which is not installed: expected "
            "`pip install 'posttrain-probe[prepare]'`"
        ) from err
    dataset = load_dataset_spec(
        config.problems, split=config.split, config_name=config.problems_config, n_docs=config.limit
    )
    columns = list(dataset.column_names)
    for option in ("problem_column", "answer_column", "source_column", "id_column"):
        name = getattr(config, option)
        if name is not None and name not in columns:
            raise ProbeError(
                f"{option} {name!r} is not a column of {config.problems}: it has {', '.join(columns)}; expected --{option.replace('_', '-')} to name one"
            )
    texts = [str(q) for q in dataset[config.problem_column]]
    golds = dataset[config.answer_column]
    ids = dataset[config.id_column] if config.id_column else list(range(len(dataset)))
    sources = [str(s) for s in dataset[config.source_column]] if config.source_column else [ALL_SOURCES] * len(texts)
    if len(set(ids)) != len(ids):
        seen: set = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise ProbeError(f"id_column {config.id_column!r} holds {duplicate!r} twice: expected unique problem ids")
    digest = hashlib.sha256()
    problems, unparseable, by_source = [], [], {}
    for pid, text, gold, source in zip(ids, texts, golds, sources):
        digest.update(json.dumps([pid, text, gold, source], default=str).encode())
        if parse_gold(str(gold) if gold is not None else ""):
            problems.append(Problem(pid, text, gold_text(gold), source))
        else:
            unparseable.append(pid)
            by_source[source] = by_source.get(source, 0) + 1
    if not problems:
        raise ProbeError(
            f"no gold answer in column {config.answer_column!r} of {config.problems} parses with math-verify "
            f"(row {ids[0]!r}: {golds[0]!r}): expected final answers such as 42 or \\frac{{1}}{{3}}"
        )
    return ProblemSet(problems, len(dataset), unparseable, by_source, digest.hexdigest())


# --------------------------------------------------------------------------------------------
# Rejection sampling
# --------------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """The tries of one problem."""

    problem: Problem
    verdicts: list[bool]
    """Acceptance of each try, in sampling order."""
    without_boxed: int
    """Tries without a complete ``\\boxed{}`` answer."""
    kept: list[tuple[int, str]]
    """(try index, trace) of the first ``traces_per_problem`` accepted tries."""


def rejection_sample(
    problems: Sequence[Problem],
    generate: Generate,
    *,
    instruction: str,
    n_tries: int,
    traces_per_problem: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[Outcome]:
    """``n_tries`` traces of ``generate`` for every problem (prompt: :func:`~posttrain_probe.math_answers.math_prompt`,
    the problem, a blank line, ``instruction``), each judged by :func:`accepted`; ``batch_size`` problems per
    ``generate`` call (None: all at once)."""
    from tqdm.auto import tqdm

    step = batch_size or max(len(problems), 1)
    outcomes: list[Outcome] = []
    with tqdm(total=len(problems), desc="teacher traces", unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), step):
            batch = problems[start : start + step]
            completions = generate([math_prompt(p.question, instruction) for p in batch], n_tries)
            if len(completions) != len(batch) or any(len(c) != n_tries for c in completions):
                got = sorted({len(c) for c in completions})
                raise ProbeError(
                    f"the teacher returned {len(completions)} prompts x {got} samples for {len(batch)} prompts: expected {n_tries} samples each"
                )
            for problem, traces in zip(batch, completions):
                verdicts = [accepted(trace, problem.final_answer) for trace in traces]
                kept = [(i, t) for i, (t, ok) in enumerate(zip(traces, verdicts)) if ok][:traces_per_problem]
                unboxed = sum(last_boxed(t) is None for t in traces)
                outcomes.append(Outcome(problem, verdicts, unboxed, kept))
            bar.update(len(batch))
    return outcomes


def _counts(outcomes: Sequence[Outcome], gold_unparseable: int) -> dict[str, Any]:
    generated = sum(len(o.verdicts) for o in outcomes)
    accepted_ = sum(sum(o.verdicts) for o in outcomes)
    kept = sum(bool(o.kept) for o in outcomes)
    return {
        "problems": len(outcomes),
        "gold_unparseable": gold_unparseable,
        "generated": generated,
        "accepted": accepted_,
        "without_boxed": sum(o.without_boxed for o in outcomes),
        "acceptance": accepted_ / generated if generated else None,
        "problems_kept": kept,
        "problems_kept_rate": kept / len(outcomes) if outcomes else None,
        "traces_kept": sum(len(o.kept) for o in outcomes),
    }


def acceptance_counts(outcomes: Sequence[Outcome], unparseable_by_source: dict[str, int]) -> dict[str, Any]:
    """``{"overall": counts, "by_source": {source: counts}}``; counts are problems, gold_unparseable, generated,
    accepted, without_boxed, acceptance (accepted / generated), problems_kept, problems_kept_rate, traces_kept."""
    sources = sorted({o.problem.source for o in outcomes} | set(unparseable_by_source))
    return {
        "overall": _counts(outcomes, sum(unparseable_by_source.values())),
        "by_source": {
            s: _counts([o for o in outcomes if o.problem.source == s], unparseable_by_source.get(s, 0)) for s in sources
        },
    }


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class PreparedData:
    """Result of :func:`data_prepare`: the SFT and RL rows over the same problems and their provenance;
    :meth:`write` puts them in a directory, :meth:`read` reads them back."""

    sft: list[dict[str, Any]]
    """One row per kept trace: problem_id, question, answer (the trace), final_answer, source, attempt."""
    rl: list[dict[str, Any]]
    """One row per kept problem: problem_id, question, final_answer, source."""
    provenance: dict[str, Any]
    """Teacher, sampling, seed, problem set, counts and acceptance (overall, by_source), versions."""

    @property
    def acceptance(self) -> dict[str, Any]:
        """``{"overall": counts, "by_source": {...}}`` (:func:`acceptance_counts`)."""
        return self.provenance["acceptance"]

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``sft.jsonl``, ``rl.jsonl`` and ``provenance.json`` (with each file's rows and sha256) into
        ``out_dir``; returns their paths. Atomic per file, and ``provenance.json`` goes last, after an old one is
        removed: a crash leaves either the old dataset or a directory without ``provenance.json``, never a mix
        that reads as complete."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ProbeError(f"output {out} is a file: expected a directory")
        out.mkdir(parents=True, exist_ok=True)
        payload = {SFT: _jsonl(self.sft), RL: _jsonl(self.rl)}
        files = {
            name: {"rows": len(rows), "sha256": hashlib.sha256(payload[name]).hexdigest()}
            for name, rows in ((SFT, self.sft), (RL, self.rl))
        }
        payload[PROVENANCE] = json.dumps({**self.provenance, "files": files}, indent=2, ensure_ascii=False).encode()
        tmp = Path(tempfile.mkdtemp(prefix=".data-prepare-", dir=out))
        try:
            for name, data in payload.items():
                with open(tmp / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            (out / PROVENANCE).unlink(missing_ok=True)
            for name in (SFT, RL, PROVENANCE):
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {name: str(out / name) for name in payload}

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> PreparedData:
        """The dataset :meth:`write` put in ``out_dir``; ProbeError when it is incomplete or its files do not match
        ``provenance.json``."""
        out = Path(out_dir)
        if not (out / PROVENANCE).is_file():
            raise ProbeError(f"{out} holds no {PROVENANCE}: expected the output of `posttrain-probe data prepare`")
        try:
            provenance = json.loads((out / PROVENANCE).read_text())
            sft, rl = _read_jsonl(out / SFT), _read_jsonl(out / RL)
        except (OSError, json.JSONDecodeError) as err:
            raise ProbeError(f"cannot read the prepared data in {out}: {err}") from err
        if provenance.get("format") != FORMAT or provenance.get("format_version") != FORMAT_VERSION:
            raise ProbeError(
                f"{out / PROVENANCE} is {provenance.get('format')!r} version {provenance.get('format_version')!r}: expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        files = provenance.pop("files", {})
        for name, rows in ((SFT, sft), (RL, rl)):
            if files.get(name, {}).get("rows") != len(rows):
                raise ProbeError(
                    f"{out / name} has {len(rows)} rows, {PROVENANCE} records {files.get(name, {}).get('rows')}: expected the files of one run"
                )
        return cls(sft, rl, provenance)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _versions(teacher: dict[str, Any]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["posttrain-probe", "math-verify", "datasets"] + (
        ["vllm"] if teacher.get("backend") == "vllm" else ["torch", "transformers"]
    )
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def build_datasets(
    config: DataPrepareConfig,
    problem_set: ProblemSet,
    generate: Generate,
    *,
    teacher: dict[str, Any],
    batch_size: int | None = None,
    progress: bool = False,
) -> PreparedData:
    """Rejection-sample ``generate`` (any :data:`~posttrain_probe.prepare.generate.Generate`, e.g. a loaded
    teacher's) on ``problem_set`` with the sampling settings of ``config`` and build the SFT/RL rows and provenance
    (``teacher``: what to record about the generator). ProbeError when no trace is accepted (nothing to write)."""
    started = time.time()
    outcomes = rejection_sample(
        problem_set.problems,
        generate,
        instruction=config.instruction,
        n_tries=config.n_tries,
        traces_per_problem=config.traces_per_problem,
        batch_size=batch_size,
        progress=progress,
    )
    acceptance = acceptance_counts(outcomes, problem_set.unparseable_by_source)
    overall = acceptance["overall"]
    if overall["accepted"] == 0:
        raise ProbeError(
            f"acceptance 0/{overall['generated']}: math-verify accepted no trace of teacher {config.teacher!r} on "
            f"{overall['problems']} problems ({overall['without_boxed']} traces without a \\boxed{{}} answer); no dataset "
            f"written to {config.out}. Expected a teacher that ends with \\boxed{{answer}} (check instruction, "
            "chat_template, max_new_tokens)"
        )
    sft, rl = [], []
    for outcome in outcomes:
        if not outcome.kept:
            continue
        p = outcome.problem
        row = {"problem_id": p.problem_id, "question": p.question, "final_answer": p.final_answer, "source": p.source}
        rl.append(row)
        sft += [
            {"problem_id": p.problem_id, "question": p.question, "answer": trace, "final_answer": p.final_answer,
             "source": p.source, "attempt": attempt}
            for attempt, trace in outcome.kept
        ]  # fmt: skip
    provenance = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        "teacher": teacher,
        "sampling": {
            "n_tries": config.n_tries,
            "traces_per_problem": config.traces_per_problem,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
        },
        "prompt": {
            "instruction": config.instruction,
            "form": "problem + blank line + instruction, as one user turn of the chat template when teacher.chat_template",
        },
        "verification": "math-verify: the last \\boxed{} of a trace against final_answer (the gold answer, or the last \\boxed{} of a worked solution, in $...$)",
        "problems": {
            "dataset": config.problems,
            "config": config.problems_config,
            "split": config.split,
            "rows": problem_set.n_rows,
            "sha256": problem_set.sha256,
            "gold_unparseable_ids": problem_set.gold_unparseable[:100],
        },
        "acceptance": acceptance,
        "config": config_to_mapping(config),
        "versions": _versions(teacher),
    }
    return PreparedData(sft, rl, provenance)


def data_prepare(config: DataPrepareConfig, *, progress: bool = False) -> PreparedData:
    """Teacher traces for the SFT-vs-RL study: sample ``config.n_tries`` traces per problem, keep the ones
    math-verify accepts (:func:`accepted`), write ``sft.jsonl`` (problem + trace), ``rl.jsonl`` (problem + gold
    answer) over the same problems and ``provenance.json`` into ``config.out`` (:meth:`PreparedData.write`).

    The backend, the problem set's columns and its gold answers are checked before the teacher loads; a run where
    no trace is accepted raises ProbeError (acceptance 0/N) and writes nothing.
    """
    backend = choose_backend(config.backend, tensor_parallel_size=config.tensor_parallel_size)
    problem_set = load_problems(config)
    teacher = load_teacher(config, backend, progress=progress)
    result = build_datasets(
        config,
        problem_set,
        teacher.generate,
        teacher=teacher.settings,
        batch_size=teacher.batch_size,
        progress=progress,
    )
    result.write(config.out)
    return result
