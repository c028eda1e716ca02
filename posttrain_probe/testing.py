"""Offline tiny-model kit: a tiny tokenizer, tiny models of real architectures, synthetic data.

Everything here is built locally and deterministically, with no hub or network access, so the
tests, the demo and the docs can exercise the real code paths (real ``transformers`` model
classes, a real byte-level BPE tokenizer with a chat template, real optimizer steps) in seconds
on a CPU.

* :func:`tiny_tokenizer` -- a byte-level BPE tokenizer (vocabulary :data:`TOKENIZER_VOCAB_SIZE`)
  trained on the synthetic corpus, with fixed special-token ids, a Llama-style BOS
  post-processor and a ChatML chat template.
* :func:`tiny_config` / :func:`tiny_model` -- a small config / randomly initialised model for
  every architecture in :data:`ARCHITECTURES`.
* :func:`arithmetic_dataset` / :func:`multiple_choice_dataset` / :func:`synthetic_dataset` --
  deterministic synthetic data sets with ``messages``, ``prompt`` and ``text`` columns.
* :func:`tuned_copy` -- a copy of a model after a few real AdamW steps (a stand-in for a
  post-trained checkpoint).
* :func:`save_tiny_pair` -- a base/tuned pair of checkpoints on disk.
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import transformers

from posttrain_probe.errors import ProbeError

if TYPE_CHECKING:  # ``datasets`` is imported lazily: it costs about a second at import time
    import datasets

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "OPENTHOUGHTS_SYSTEM_PROMPT",
    "PAD_TOKEN",
    "SPECIAL_TOKEN_IDS",
    "SYNTHETIC_DATASETS",
    "TOKENIZER_VOCAB_SIZE",
    "UNK_TOKEN",
    "arithmetic_dataset",
    "multiple_choice_dataset",
    "openthoughts_dataset",
    "save_tiny_pair",
    "synthetic_dataset",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
    "tuned_copy",
]

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
"""Architectures :func:`tiny_config` and :func:`tiny_model` can build."""

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE: int = 512
"""Vocabulary size of :func:`tiny_tokenizer` (special tokens included); the default model vocab."""

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"

SPECIAL_TOKEN_IDS: dict[str, int] = {
    PAD_TOKEN: 0,
    BOS_TOKEN: 1,
    EOS_TOKEN: 2,
    IM_START_TOKEN: 3,
    IM_END_TOKEN: 4,
    UNK_TOKEN: 5,
}
"""Fixed ids of the special tokens of :func:`tiny_tokenizer` (ids 0-5, in this order)."""

CHAT_TEMPLATE: str = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML template (as Qwen's): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n`` with ``add_generation_prompt``. Assistant turns are wrapped in
``{% generation %}`` so ``return_assistant_tokens_mask`` (TRL ``assistant_only_loss``) works; the
rendered text is the same as plain ChatML. The template adds no BOS: the post-processor does
when ``add_special_tokens=True``."""

_ENGLISH_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns to add and to multiply "
    "numbers, to answer questions about colours, animals and countries, and to follow a chat "
    "format. Let us think step by step: first we read the question, then we work out each part, "
    "and finally we write the answer. The training data is synthetic, so every run is the same. "
    "Which of these is true? Please choose one option and explain your reasoning briefly. "
    "You are a helpful assistant. The user asks a question and the assistant answers it."
)


def _tokenizer_corpus() -> list[str]:
    """Training texts of the tokenizer: synthetic rows, their ChatML renderings, some English."""
    texts: list[str] = [_ENGLISH_TEXT]
    rows = _arithmetic_rows(400, seed=10_000) + _mcq_rows(400, seed=10_001)
    for row in rows:
        texts.append(row["text"])
        texts.append(
            "".join(f"{IM_START_TOKEN}{m['role']}\n{m['content']}{IM_END_TOKEN}\n" for m in row["messages"])
        )
    return texts


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return the ``tokenizers`` JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Digits are split one by one (as Llama 3 / Qwen do), so numbers are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKEN_IDS),  # ids 0..5 in dict order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKEN_IDS[BOS_TOKEN])],
    )
    for token, expected in SPECIAL_TOKEN_IDS.items():
        got = tok.token_to_id(token)
        if got != expected:  # pragma: no cover - guards the construction above
            raise RuntimeError(f"special token {token!r} got id {got}, expected {expected}")
    if tok.get_vocab_size() != TOKENIZER_VOCAB_SIZE:  # pragma: no cover
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, expected {TOKENIZER_VOCAB_SIZE}")
    return tok.to_str()


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer of :data:`TOKENIZER_VOCAB_SIZE` (512) tokens.

    Trained once per process on the synthetic corpus (deterministic: the same vocabulary every
    call and in every process); each call returns a NEW tokenizer object, so callers may mutate
    it (padding side, added tokens) freely.

    Special tokens (ids fixed): ``<|pad|>``=0 (pad), ``<|bos|>``=1 (bos), ``<|endoftext|>``=2
    (eos), ``<|im_start|>``=3, ``<|im_end|>``=4, ``<unk>``=5 (unk; byte-level BPE never needs it).
    Encoding with ``add_special_tokens=True`` prepends ``<|bos|>`` (Llama style); digits are
    tokenized one per token. ``padding_side="right"``, ``model_max_length=2048``,
    ``chat_template`` = :data:`CHAT_TEMPLATE` (ChatML).
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_tokenizer_json())
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        padding_side="right",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------

_NUM_HEADS = 4
_NUM_KV_HEADS = 2
_DEFAULT_ATTN = "sdpa"


def _check_arch(arch: str) -> str:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ProbeError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    return arch


def tiny_config(
    arch: str = "qwen3",
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int | None = None,
    **overrides: Any,
) -> transformers.PretrainedConfig:
    """A small config of the given architecture (one of :data:`ARCHITECTURES`).

    ``hidden_size`` (default 64) must be divisible by the number of attention heads (4, or
    ``num_attention_heads`` / ``n_head`` in ``overrides``); ``head_dim = hidden_size / heads``;
    2 key/value heads where the architecture has GQA (all but gpt2); intermediate (MLP) size
    ``2 * hidden_size``; ``num_layers`` (default 4) decoder layers; ``vocab_size`` defaults to
    :data:`TOKENIZER_VOCAB_SIZE`; 2048 positions; ``pad_token_id=0``, ``bos_token_id=1``,
    ``eos_token_id=2``; ``tie_word_embeddings=False``; no dropout; attention implementation
    ``"sdpa"``. Rope theta and norm epsilons follow the real model families (e.g. Qwen3: rope
    theta 1e6, RMSNorm eps 1e-6, QK-norm). Gemma2/Gemma3 alternate sliding-window (window 256)
    and full attention layers.

    ``overrides`` are passed to the config class last and win (e.g. ``tie_word_embeddings=True``,
    ``intermediate_size=96``); ``attn_implementation="eager"`` selects the attention kernel.
    """
    _check_arch(arch)
    overrides = dict(overrides)
    attn_implementation = overrides.pop("attn_implementation", _DEFAULT_ATTN)
    if vocab_size is None:
        vocab_size = TOKENIZER_VOCAB_SIZE
    if not isinstance(vocab_size, int) or vocab_size <= max(SPECIAL_TOKEN_IDS.values()):
        raise ProbeError(
            f"vocab_size={vocab_size!r}: expected an int > {max(SPECIAL_TOKEN_IDS.values())} "
            "(the special-token ids 0-5 must be in the vocabulary)"
        )
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ProbeError(f"num_layers={num_layers!r}: expected a positive int (tiny models use 2-4)")
    heads = overrides.get("num_attention_heads", overrides.get("n_head", _NUM_HEADS))
    if not isinstance(hidden_size, int) or hidden_size < 1 or hidden_size % heads:
        raise ProbeError(
            f"hidden_size={hidden_size!r}: expected a positive int divisible by the number of "
            f"attention heads ({heads}), e.g. 32, 64 or 128"
        )
    kv_heads = _NUM_KV_HEADS if heads % _NUM_KV_HEADS == 0 else heads
    head_dim = hidden_size // heads
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

    if arch == "gpt2":
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab_size,
            n_positions=2048,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_inner=2 * hidden_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
        cls: type[transformers.PretrainedConfig] = transformers.GPT2Config
    else:
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            attention_dropout=0.0,
            **ids,
        )
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        if arch == "llama":
            cls = transformers.LlamaConfig
            kwargs.update(rope_parameters={"rope_type": "default", "rope_theta": 500_000.0}, rms_norm_eps=1e-5)
        elif arch == "mistral":
            cls = transformers.MistralConfig
            kwargs.update(
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                rms_norm_eps=1e-5,
                sliding_window=None,
            )
        elif arch == "qwen2":
            cls = transformers.Qwen2Config
            kwargs.pop("head_dim")  # Qwen2 derives it
            kwargs.update(
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                max_window_layers=num_layers,
            )
        elif arch == "qwen3":
            cls = transformers.Qwen3Config
            kwargs.update(
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                rms_norm_eps=1e-6,
                hidden_act="silu",
                attention_bias=False,
                use_sliding_window=False,
                max_window_layers=num_layers,
            )
        elif arch == "gemma2":
            cls = transformers.Gemma2Config
            kwargs.update(
                query_pre_attn_scalar=head_dim,
                sliding_window=256,
                layer_types=alternating,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
            )
        elif arch == "gemma3":
            cls = transformers.Gemma3TextConfig
            kwargs.update(
                query_pre_attn_scalar=head_dim,
                sliding_window=256,
                layer_types=alternating,
            )
        elif arch == "phi3":
            cls = transformers.Phi3Config
            kwargs.pop("head_dim")  # Phi3 derives it
            kwargs.update(
                original_max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                sliding_window=None,
            )
        else:  # pragma: no cover - _check_arch guards
            raise AssertionError(arch)
    kwargs.update(overrides)
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ProbeError(f"cannot build a tiny {arch} config with {overrides!r}: {exc}") from exc
    config._attn_implementation = attn_implementation
    return config


def tiny_model(
    arch: str = "qwen3",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of :func:`tiny_config` ``(arch, hidden_size, num_layers,
    **overrides)``, in eval mode and the given ``dtype``, on the CPU.

    Deterministic for ``seed``: weights are drawn in float32 under ``torch.manual_seed(seed)``
    (the global RNG state is restored afterwards) and then cast, so models of the same seed and
    different dtypes hold the same weights up to rounding. About 0.21 M parameters by default
    (gpt2: 0.33 M, with 2048 learned positions). ``model(input_ids, output_hidden_states=True)`` returns
    ``num_layers + 1`` hidden states of shape ``[batch, seq, hidden_size]`` and logits of shape
    ``[batch, seq, vocab_size]``. ``config`` and ``generation_config`` both carry pad/bos/eos
    ids 0/1/2.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ProbeError(f"dtype={dtype!r}: expected a floating torch.dtype such as torch.float32 or torch.bfloat16")
    config = tiny_config(arch, hidden_size=hidden_size, num_layers=num_layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=config._attn_implementation, dtype=torch.float32
        )
    model = model.to(dtype)
    gen = model.generation_config
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(gen, name, getattr(model.config, name))
    return model.eval()


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

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


def _arithmetic_rows(n: int, seed: int) -> list[dict[str, Any]]:
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
    return _to_dataset(_arithmetic_rows(n, seed), "arithmetic")


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


def _mcq_problem(rng: random.Random) -> tuple[str, str, list[str]]:
    """One question: (question, correct choice, three distinct wrong choices)."""
    kind = rng.randrange(6)
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


def _mcq_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, right, wrong = _mcq_problem(rng)
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
    return _to_dataset(_mcq_rows(n, seed), "mcq")


OPENTHOUGHTS_SYSTEM_PROMPT: str = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking process "
    "before providing the final precise and accurate solutions. Please structure your response into two main "
    "sections: Thought and Solution. In the Thought section, detail your reasoning process using the specified "
    "format: <|begin_of_thought|> {thought with steps separated with '\\n\\n'} <|end_of_thought|> In the Solution "
    "section, present the final solution: <|begin_of_solution|> {final formatted, precise, and clear solution} "
    "<|end_of_solution|> Now, try to solve the following question through the above guidelines:"
)
"""A shortened OpenThoughts-114k system prompt; like the real one it contains the segment tags."""

_THOUGHT_OPENERS = ("Okay, let me work out {e}.", "Let me see, I need {e}.", "Hmm, the question asks for {e}.", "Alright, so we want {e}.")
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
            [rng.choice(_THOUGHT_OPENERS).format(e=expr), steps[0], *checks, steps[0], f"Therefore {steps[1][0].lower()}{steps[1][1:]}", f"So the result is {value}."]
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
        raise ProbeError(
            f"unknown synthetic dataset {name!r}: expected one of {', '.join(sorted(SYNTHETIC_DATASETS))}"
        )
    return SYNTHETIC_DATASETS[name](n=n, seed=seed)


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------


def _lm_batches(
    tokenizer: Any, texts: list[str], seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding), each
    ``[len(texts), max_len <= seq_len]``; every text is ``BOS? text EOS`` truncated to ``seq_len``."""
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    seqs = [(ids + ([eos] if eos is not None else []))[:seq_len] for ids in enc]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids.to(device), mask.to(device), labels.to(device)


def tuned_copy(
    model: transformers.PreTrainedModel,
    tokenizer: Any,
    dataset: datasets.Dataset | None = None,
    *,
    steps: int = 20,
    lr: float = 3e-3,
    batch_size: int = 8,
    seq_len: int = 64,
    seed: int = 0,
) -> transformers.PreTrainedModel:
    """A deep copy of ``model`` after ``steps`` AdamW steps of causal-LM training; ``model`` is
    left untouched.

    Trains on the ``text`` column of ``dataset`` (default ``arithmetic_dataset(n=128,
    seed=seed + 1)``): each step takes the next ``batch_size`` texts of a seeded shuffle,
    tokenizes them as ``<bos> text <eos>`` truncated to ``seq_len`` tokens, right-pads them
    (labels ``-100`` on padding) and takes one optimizer step (learning rate ``lr``, no weight
    decay). Deterministic for ``seed``; the global RNG state is restored afterwards. On the CPU
    it trains on one thread (restoring ``torch.get_num_threads()`` afterwards). Returns the copy
    in eval mode, on the device and in the dtype of ``model``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ProbeError(f"steps={steps!r}: expected a non-negative int (optimizer steps)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size={batch_size!r}: expected a positive int")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ProbeError(f"seq_len={seq_len!r}: expected an int >= 2 (tokens per training text)")
    if not lr > 0:
        raise ProbeError(f"lr={lr!r}: expected a positive learning rate")
    if dataset is None:
        dataset = arithmetic_dataset(n=128, seed=seed + 1)
    if "text" not in dataset.column_names:
        raise ProbeError(f"dataset has columns {dataset.column_names}: expected a 'text' column to train on")
    if len(dataset) == 0:
        raise ProbeError("dataset has no rows: expected at least one 'text' to train on")
    texts: list[str] = list(dataset["text"])

    tuned = copy.deepcopy(model)
    params = [p for p in tuned.parameters() if p.requires_grad]
    if not params:
        raise ProbeError("model has no trainable parameters (requires_grad=False everywhere)")
    device = params[0].device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    # Tiny models train fastest on one CPU thread, and several threads collapse (10-20x slower)
    # when parallel test processes share the cores; the setting is restored afterwards.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            tuned.train()
            cursor = 0
            for _ in range(steps):
                batch = []
                while len(batch) < batch_size:
                    batch.append(texts[order[cursor % len(order)]])
                    cursor += 1
                input_ids, mask, labels = _lm_batches(tokenizer, batch, seq_len, device)
                loss = tuned(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return tuned.eval()


def save_tiny_pair(
    out_dir: str | os.PathLike,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    steps: int = 20,
    **model_kwargs: Any,
) -> dict[str, pathlib.Path]:
    """Write a base/tuned checkpoint pair: ``out_dir/base`` = ``tiny_model(arch, seed=seed,
    **model_kwargs)`` and ``out_dir/tuned`` = its :func:`tuned_copy` after ``steps`` steps
    (seed ``seed``), each with the :func:`tiny_tokenizer` (``save_pretrained``, safetensors).

    Both reload with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    and give the same logits as the in-memory models. Returns ``{"base": Path, "tuned": Path}``.
    """
    out = pathlib.Path(out_dir)
    tokenizer = tiny_tokenizer()
    base = tiny_model(arch, seed=seed, **model_kwargs)
    tuned = tuned_copy(base, tokenizer, steps=steps, seed=seed)
    paths = {"base": out / "base", "tuned": out / "tuned"}
    for key, model in (("base", base), ("tuned", tuned)):
        paths[key].mkdir(parents=True, exist_ok=True)
        model.save_pretrained(paths[key], safe_serialization=True)
        tokenizer.save_pretrained(paths[key])
    return paths
