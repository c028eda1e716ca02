"""The study's world (:func:`build_world`): synthetic training data, lm-eval tasks over the same world, and a tiny
base model briefly pretrained on it, so that every post-training arm starts from a real, non-random model.

Layout of ``config.out`` (:class:`World` records it in ``world.json``)::

    train.jsonl             n_train arithmetic problems: question, answer (worked solution ending in \\boxed{N}),
                            final_answer (N) -- the training prompts of SFT and RL alike
    tasks/world_*.yaml      lm-eval tasks (multiple_choice, log-likelihood), data in tasks/world_*.jsonl
    base/                   the pretrained tiny model and its tokenizer (AutoModelForCausalLM / AutoTokenizer)
    world.json              the :class:`World` result

Tasks (``n_eval`` documents each, never a training problem):

* in-domain ``world_arithmetic`` -- an arithmetic question; the four choices are worked solutions that end in four
  different final answers (three with one wrong step, carried through), scored as the continuation of the question.
* general ``world_colours``, ``world_capitals``, ``world_animals`` and held-out ``world_numbers`` (largest/smallest
  of four numbers) -- lettered questions ``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` scoring ``A``..``D``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain_probe.errors import ProbeError
from posttrain_probe.study.world_config import GENERAL_TASKS, HELD_OUT_TASKS, IN_DOMAIN_TASKS, WorldConfig
from posttrain_probe.synthetic import MCQ_DOMAINS, arithmetic_rows, fact_sentences, multiple_choice_rows

__all__ = [
    "GENERAL_TASKS",
    "HELD_OUT_TASKS",
    "IN_DOMAIN_TASKS",
    "World",
    "build_world",
]

WORLD_FILE = "world.json"
TRAIN_FILE = "train.jsonl"
TASKS_DIR = "tasks"
BASE_DIR = "base"
WORLD_FORMAT = "posttrain-probe/world"
WORLD_FORMAT_VERSION = 1

_TASK_DOMAINS = {"world_colours": "colours", "world_capitals": "capitals", "world_animals": "animals"}
_TASK_DOMAINS["world_numbers"] = "numbers"

# Seed streams of the world: every kind of row is drawn from its own stream of `config.seed`.
_TRAIN, _EVAL_ARITH, _PRE_ARITH, _EVAL_MCQ, _PRE_MCQ, _SHUFFLE = 1, 2, 3, 10, 20, 30
_MIX = {"arith_text": 0.1, "arith_chat": 0.1, "mcq": 0.6, "facts": 0.2}
"""Shares of the pretraining documents: worked solutions as plain text and as ChatML, answered lettered questions
(split evenly over the four domains), plain fact sentences."""
_TOKENS_PER_DOC = 45
"""Rough tokens per pretraining document, to size the corpus to about one epoch of the pretraining steps."""


def _stream(seed: int, kind: int) -> int:
    """The seed of one stream of rows: distinct for every (seed, kind) with kind < 1000."""
    return seed * 1000 + kind


@dataclass
class World:
    """The result of :func:`build_world` (``world.json``): where the world's parts are and how pretraining went."""

    out: str
    """The world directory."""
    base_model: str
    """The pretrained base model (a ``save_pretrained`` directory with its tokenizer)."""
    train_file: str
    """The training problems (JSONL: ``question``, ``answer``, ``final_answer``)."""
    tasks_dir: str
    """lm-eval include path holding the world's task YAMLs and their JSONL data (absolute paths inside)."""
    in_domain_tasks: list[str]
    """lm-eval tasks of the training distribution: ``["world_arithmetic"]``."""
    general_tasks: list[str]
    """lm-eval tasks of the pretrained knowledge: ``["world_colours", "world_capitals", "world_animals"]``."""
    held_out_tasks: list[str]
    """lm-eval tasks of the held-out domain: ``["world_numbers"]``."""
    n_train: int
    """Rows of ``train_file``."""
    n_eval: int
    """Documents per task."""
    seed: int
    """The world's seed."""
    pretrain_steps: int
    """AdamW steps of pretraining."""
    pretrain_tokens: int
    """Tokens trained on (steps x batch size x sequence length)."""
    pretrain_loss_first: float | None
    """Mean cross-entropy (nats per token) of the first 10% of the steps (None without steps)."""
    pretrain_loss_last: float | None
    """Mean cross-entropy (nats per token) of the last 10% of the steps (None without steps)."""
    elapsed_s: float
    """Wall-clock seconds of :func:`build_world`."""
    config: dict[str, Any]
    """The :class:`~posttrain_probe.study.world_config.WorldConfig` as a mapping."""

    @property
    def tasks(self) -> list[str]:
        """Every task of the world: in-domain, general, held-out."""
        return [*self.in_domain_tasks, *self.general_tasks, *self.held_out_tasks]

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready result, as stored in ``world.json``."""
        return {"format": WORLD_FORMAT, "format_version": WORLD_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        """The result from the mapping of ``world.json``."""
        if data.get("format") != WORLD_FORMAT or data.get("format_version") != WORLD_FORMAT_VERSION:
            raise ProbeError(
                f"not a world file: format {data.get('format')!r} version {data.get('format_version')!r}, "
                f"expected {WORLD_FORMAT!r} version {WORLD_FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``world.json`` into ``out``; returns ``{"world": path}``."""
        path = Path(out) / WORLD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return {"world": path}

    @classmethod
    def read(cls, out: str | os.PathLike) -> World:
        """The world built into ``out``; ProbeError when it holds none."""
        path = Path(out) / WORLD_FILE
        if not path.is_file():
            raise ProbeError(f"{out} holds no {WORLD_FILE}: build the world first (build_world)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ProbeError(f"cannot read {path}: {err}") from err
        return cls.from_json(data)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

_STEP = re.compile(r"^(?P<head>.*: )(?P<x>\d+) (?P<op>[-+*]) (?P<y>\d+) = (?P<z>\d+)\.$")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
_DELTAS = (-10, -2, -1, 1, 2, 10)


def _solution(head0, x0, op0, y0, z0, head1, x1, op1, y1, z1) -> str:
    return f"{head0}{x0} {op0} {y0} = {z0}.\n{head1}{x1} {op1} {y1} = {z1}.\nThe answer is \\boxed{{{z1}}}."


def _wrong_solution(steps: list[re.Match], rng: random.Random) -> tuple[str, int] | None:
    """A worked solution with one wrong result (step 1 or step 2), the error carried to the end; None if the
    drawn error gives a negative number."""
    s0, s1 = steps
    x0, y0, z0 = int(s0["x"]), int(s0["y"]), int(s0["z"])
    x1, y1, z1 = int(s1["x"]), int(s1["y"]), int(s1["z"])
    delta = rng.choice(_DELTAS)
    if rng.random() < 0.5:  # the first step goes wrong; the second uses its result correctly
        z0w = z0 + delta
        if x1 == z0:
            x1 = z0w
        else:
            y1 = z0w
        z0, z1 = z0w, _OPS[s1["op"]](x1, y1)
    else:  # the second step goes wrong
        z1 += delta
    if min(z0, z1, x1, y1) < 0:
        return None
    return _solution(s0["head"], x0, s0["op"], y0, z0, s1["head"], x1, s1["op"], y1, z1), z1


def arithmetic_choice_row(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A 4-way document of ``world_arithmetic`` from an :func:`~posttrain_probe.synthetic.arithmetic_rows` row.

    ``choices`` are 4 worked solutions (the gold one at ``label``, 0..3) with 4 different final answers
    (``final_answers``, integers as text); each wrong one has one step result off by 1, 2 or 10, carried through.
    """
    lines = row["answer"].split("\n")
    steps = [_STEP.match(line) for line in lines[:2]]
    if len(lines) != 3 or not all(steps):
        raise ProbeError(f"arithmetic solution {row['answer']!r}: expected two 'x op y = z.' steps and a boxed answer")
    gold = int(row["final_answer"])
    wrong: dict[int, str] = {}
    while len(wrong) < 3:
        drawn = _wrong_solution(steps, rng)
        if drawn is not None and drawn[1] != gold:
            wrong.setdefault(drawn[1], drawn[0])
    options = [(row["answer"], gold), *((text, value) for value, text in wrong.items())]
    rng.shuffle(options)
    label = next(i for i, (text, _) in enumerate(options) if text == row["answer"])
    return {
        "question": row["question"],
        "choices": [text for text, _ in options],
        "label": label,
        "answer": row["answer"],
        "final_answer": row["final_answer"],
        "final_answers": [str(value) for _, value in options],
    }


def _fresh_arithmetic(n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """``n`` arithmetic rows of stream ``seed`` whose worked solution (hence expression) is not in ``exclude``."""
    want = n + len(exclude) + 16
    while True:
        rows = [r for r in arithmetic_rows(want, seed) if r["answer"] not in exclude]
        if len(rows) >= n or want > 50 * (n + len(exclude)) + 1000:
            break
        want *= 2
    if len(rows) < n:  # pragma: no cover - the expression space holds far more problems
        raise ProbeError(f"cannot draw {n} arithmetic problems distinct from {len(exclude)} others")
    return rows[:n]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _task_yaml(task: str, data_file: Path, *, lettered: bool) -> dict[str, Any]:
    """The lm-eval config of one world task (multiple_choice over ``data_file``, absolute path)."""
    if lettered:
        text = (
            "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
        )
        delimiter = " "
    else:
        text, delimiter = "{{question}}", "\n"
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": text,
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def _mcq_doc(row: dict[str, Any]) -> dict[str, Any]:
    """A document of a lettered task from a :func:`~posttrain_probe.synthetic.multiple_choice_rows` row: its
    ``text`` is the answered question as pretraining sees it and the task scores it (``...\nAnswer: <choice>``)."""
    right = row["choices"][row["label"]]
    body = row["messages"][0]["content"]
    return {
        "question": row["question"],
        "choices": row["choices"],
        "label": row["label"],
        "answer": right,
        "text": f"{body}\nAnswer: {right}",
    }


def _write_tasks(tasks_dir: Path, config: WorldConfig, train_rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Write the task YAMLs and JSONL data; returns the text of every evaluation document per task (to keep
    them out of pretraining)."""
    import yaml

    tasks_dir.mkdir(parents=True, exist_ok=True)
    seen = {row["answer"] for row in train_rows}
    eval_rows = _fresh_arithmetic(config.n_eval, _stream(config.seed, _EVAL_ARITH), seen)
    rng = random.Random(_stream(config.seed, _EVAL_ARITH) + 500)
    docs = {"world_arithmetic": [arithmetic_choice_row(row, rng) for row in eval_rows]}
    for i, (task, domain) in enumerate(_TASK_DOMAINS.items()):
        rows = multiple_choice_rows(config.n_eval, _stream(config.seed, _EVAL_MCQ + i), domain=domain)
        docs[task] = [_mcq_doc(row) for row in rows]
    texts: dict[str, list[str]] = {}
    for task, rows in docs.items():
        data_file = tasks_dir / f"{task}.jsonl"
        _write_jsonl(data_file, rows)
        spec = _task_yaml(task, data_file, lettered=task != "world_arithmetic")
        header = f"# lm-eval task of the posttrain-probe study world (seed {config.seed}); data: {data_file.name}\n"
        (tasks_dir / f"{task}.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        texts[task] = [row.get("text") or f"{row['question']}\n{row['answer']}" for row in rows]
    return texts


def _pretrain_texts(config: WorldConfig, tokenizer: Any, exclude: set[str], n_docs: int) -> list[str]:
    """About ``n_docs`` pretraining documents in the shares of :data:`_MIX`, none an evaluation document or a
    training problem (``exclude``: their texts and worked solutions), in a seeded order."""
    counts = {kind: max(1, round(share * n_docs)) for kind, share in _MIX.items()}
    n_arith = counts["arith_text"] + counts["arith_chat"]
    arith = _fresh_arithmetic(n_arith, _stream(config.seed, _PRE_ARITH), exclude)
    texts = [row["text"] for row in arith[: counts["arith_text"]]]
    chats = tokenizer.apply_chat_template([row["messages"] for row in arith[counts["arith_text"] :]], tokenize=False)
    texts += list(chats)
    per_domain = -(-counts["mcq"] // len(MCQ_DOMAINS))
    for i, domain in enumerate(MCQ_DOMAINS):
        rows = multiple_choice_rows(per_domain, _stream(config.seed, _PRE_MCQ + i), domain=domain)
        texts += [doc["text"] for doc in map(_mcq_doc, rows) if doc["text"] not in exclude]
    facts = [fact for domain in MCQ_DOMAINS for fact in fact_sentences(domain)]
    rng = random.Random(_stream(config.seed, _SHUFFLE))
    for _ in range(counts["facts"]):  # a few facts per document, in a random order
        texts.append(" ".join(rng.sample(facts, 4)))
    rng.shuffle(texts)
    return texts


def _pack(tokenizer: Any, texts: list[str], seq_len: int):
    """``<bos> text <eos>`` of every text, concatenated and cut into rows: a long tensor ``[n_rows, seq_len]``
    (the tail that fills no row is dropped; at least one row, repeating the stream if it is shorter)."""
    import torch

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [tok for doc in ids for tok in (bos, *doc, eos)]
    if len(stream) < seq_len:
        stream = stream * (seq_len // len(stream) + 1)
    n_rows = len(stream) // seq_len
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def _lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over the first 5% of the steps, then cosine decay to 0.1."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _pretrain(model: Any, data: Any, config: WorldConfig, device: Any) -> list[float]:
    """``config.pretrain_steps`` AdamW steps of causal-LM loss on batches of rows of ``data`` ``[n_rows, seq_len]``
    (a seeded shuffle per epoch, gradients clipped to norm 1); returns the loss of every step (nats per token)."""
    import torch
    from tqdm.auto import tqdm

    steps, batch = config.pretrain_steps, config.pretrain_batch_size
    generator = torch.Generator().manual_seed(_stream(config.seed, _SHUFFLE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(steps), desc="pretrain base", unit="step", leave=False, mininterval=2.0):
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        rows, order = order[:batch], order[batch:]
        input_ids = data[rows].to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    return losses


def build_world(config: WorldConfig) -> World:
    """Build the study's world into ``config.out`` (see the module docstring for the layout) and return it.

    1. ``train.jsonl``: ``config.n_train`` arithmetic problems (:func:`~posttrain_probe.synthetic.arithmetic_rows`
       of the training stream) with columns ``question``, ``answer`` (worked solution ending ``\\boxed{N}``),
       ``final_answer`` (``N``), ``messages``, ``prompt`` and ``text``.
    2. ``tasks/``: the lm-eval tasks of :data:`IN_DOMAIN_TASKS`, :data:`GENERAL_TASKS` and :data:`HELD_OUT_TASKS`,
       ``config.n_eval`` documents each, drawn from their own seed streams; no arithmetic document shares a worked
       solution (so an expression) with a training problem.
    3. ``base/``: ``tiny_model(config.arch, hidden_size, num_layers, seed)`` with the tiny tokenizer, pretrained for
       ``config.pretrain_steps`` AdamW steps (batches of ``pretrain_batch_size x seq_len`` packed tokens; peak
       ``pretrain_lr``, warm-up then cosine decay) on worked solutions (plain and ChatML), answered lettered
       questions of all four domains and fact sentences -- none of them a training problem or an evaluation
       document -- then saved with ``save_pretrained``.

    Deterministic for ``config.seed`` on one device (the same files and weights). On the CPU it trains on one
    thread (the fastest for tiny models), restoring the thread count afterwards. Writes ``world.json``.
    """
    import torch

    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    start = time.perf_counter()
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_rows = arithmetic_rows(config.n_train, _stream(config.seed, _TRAIN))
    train_file = out / TRAIN_FILE
    _write_jsonl(train_file, train_rows)
    eval_texts = _write_tasks(out / TASKS_DIR, config, train_rows)

    tokenizer = tiny_tokenizer()
    tokens = config.pretrain_steps * config.pretrain_batch_size * config.seq_len
    exclude = {row["answer"] for row in train_rows} | {t for texts in eval_texts.values() for t in texts}
    exclude |= {text.split("\n", 1)[1] for text in eval_texts["world_arithmetic"]}
    texts = _pretrain_texts(config, tokenizer, exclude, max(64, tokens // _TOKENS_PER_DOC))
    data = _pack(tokenizer, texts, config.seq_len)

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            model = tiny_model(
                config.arch, seed=config.seed, hidden_size=config.hidden_size, num_layers=config.num_layers
            ).to(device)
            losses = _pretrain(model, data, config, device)
    finally:
        torch.set_num_threads(threads)
    base = out / BASE_DIR
    model.eval().to("cpu").save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)

    tail = max(1, len(losses) // 10)
    world = World(
        out=str(out),
        base_model=str(base),
        train_file=str(train_file),
        tasks_dir=str(out / TASKS_DIR),
        in_domain_tasks=list(IN_DOMAIN_TASKS),
        general_tasks=list(GENERAL_TASKS),
        held_out_tasks=list(HELD_OUT_TASKS),
        n_train=config.n_train,
        n_eval=config.n_eval,
        seed=config.seed,
        pretrain_steps=config.pretrain_steps,
        pretrain_tokens=tokens,
        pretrain_loss_first=sum(losses[:tail]) / tail if losses else None,
        pretrain_loss_last=sum(losses[-tail:]) / tail if losses else None,
        elapsed_s=time.perf_counter() - start,
        config=dataclasses.asdict(config),
    )
    world.write(out)
    return world
