"""Offline tiny-model kit: a tiny tokenizer, tiny models of real architectures, tuned pairs.

Everything here is built locally and deterministically, with no hub or network access, so the
tests, the demo and the docs can exercise the real code paths (real ``transformers`` model
classes, a real byte-level BPE tokenizer with a chat template, real optimizer steps) in seconds
on a CPU.

* :func:`tiny_tokenizer` -- a byte-level BPE tokenizer (vocabulary :data:`TOKENIZER_VOCAB_SIZE`)
  trained on the synthetic corpus of :mod:`posttrain_probe.synthetic`, with fixed special-token ids, a Llama-style BOS
  post-processor and a ChatML chat template.
* :func:`tiny_config` / :func:`tiny_model` -- a small config / randomly initialised model for
  every architecture in :data:`ARCHITECTURES`.
* :func:`tuned_copy` -- a copy of a model after a few real AdamW steps (a stand-in for a
  post-trained checkpoint).
* :func:`save_tiny_pair` -- a base/tuned pair of checkpoints on disk.
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch
import transformers

from posttrain_probe.errors import ProbeError
from posttrain_probe.synthetic import arithmetic_dataset, arithmetic_rows, multiple_choice_rows

if TYPE_CHECKING:  # ``datasets`` is imported lazily: it costs about a second at import time
    import datasets

__all__ = [
    "ARCHITECTURES",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKEN_IDS",
    "TOKENIZER_VOCAB_SIZE",
    "UNK_TOKEN",
    "save_tiny_pair",
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
    rows = arithmetic_rows(400, seed=10_000) + multiple_choice_rows(400, seed=10_001)
    for row in rows:
        texts.append(row["text"])
        texts.append("".join(f"{IM_START_TOKEN}{m['role']}\n{m['content']}{IM_END_TOKEN}\n" for m in row["messages"]))
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


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def _config_kwargs(
    arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, heads: int
) -> tuple[type[transformers.PretrainedConfig], dict[str, Any]]:
    """The config class of ``arch`` and its keyword arguments before the overrides of :func:`tiny_config`."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab_size,
            n_positions=2048,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_inner=2 * hidden_size,
            tie_word_embeddings=False,
            **no_dropout,
            **ids,
        )
        return transformers.GPT2Config, kwargs
    head_dim = hidden_size // heads
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=_NUM_KV_HEADS if heads % _NUM_KV_HEADS == 0 else heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **ids,
    )
    if arch in ("qwen2", "phi3"):
        kwargs.pop("head_dim")  # Qwen2 and Phi3 derive it
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    gemma = dict(query_pre_attn_scalar=head_dim, sliding_window=256, layer_types=alternating)
    qwen = dict(
        rope_parameters=_rope(1_000_000.0), rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=num_layers
    )
    family: dict[str, tuple[str, dict[str, Any]]] = {  # class names: transformers imports a config module on access
        "llama": ("LlamaConfig", dict(rope_parameters=_rope(500_000.0), rms_norm_eps=1e-5)),
        "mistral": (
            "MistralConfig",
            dict(rope_parameters=_rope(1_000_000.0), rms_norm_eps=1e-5, sliding_window=None),
        ),
        "qwen2": ("Qwen2Config", qwen),
        "qwen3": ("Qwen3Config", dict(qwen, hidden_act="silu", attention_bias=False)),
        "gemma2": ("Gemma2Config", dict(gemma, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
        "gemma3": ("Gemma3TextConfig", gemma),
        "phi3": (
            "Phi3Config",
            dict(
                original_max_position_embeddings=2048,
                rope_parameters=_rope(10_000.0),
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                sliding_window=None,
            ),
        ),
    }
    name, extra = family[arch]
    return getattr(transformers, name), {**kwargs, **extra}


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
    cls, kwargs = _config_kwargs(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, heads=heads
    )
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
