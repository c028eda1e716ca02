"""Tests of the offline tiny-model kit (posttrain_probe.testing) and its synthetic data (posttrain_probe.synthetic)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from posttrain_probe.errors import ProbeError
from posttrain_probe.synthetic import (
    _CAPITALS,
    _COLOURS,
    _FLYERS,
    _LEGS,
    _SEA,
    SYNTHETIC_DATASETS,
    arithmetic_dataset,
    multiple_choice_dataset,
    openthoughts_dataset,
    synthetic_dataset,
)
from posttrain_probe.testing import (
    ARCHITECTURES,
    TOKENIZER_VOCAB_SIZE,
    save_tiny_pair,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    tuned_copy,
)

ARITH_COLUMNS = {"question", "answer", "final_answer", "messages", "prompt", "text"}
MCQ_COLUMNS = {"question", "choices", "label", "answer", "messages", "prompt", "text"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _batch(tok, texts, seq_len=64):
    """Right-padded ``<bos> text <eos>`` batch with labels -100 on padding (as tuned_copy trains)."""
    enc = [(ids + [tok.eos_token_id])[:seq_len] for ids in tok(list(texts))["input_ids"]]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_forwards_and_trains(arch, tok):
    model = tiny_model(arch)
    assert isinstance(model, PreTrainedModel)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 4 and cfg.num_attention_heads == 4
    assert cfg.vocab_size == len(tok) == TOKENIZER_VOCAB_SIZE
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (0, 1, 2)
    assert cfg.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    if arch != "gpt2":
        assert cfg.num_key_value_heads == 2
        assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) == 16

    enc = tok(["What is 2 + 3 * 4?", "Hi"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][1, -1] == 0  # really padded (right)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert len(out.hidden_states) == 4 + 1
    for h in out.hidden_states:
        assert h.shape == (2, enc["input_ids"].shape[1], 64)
        assert torch.isfinite(h).all()
    assert out.logits.shape == (2, enc["input_ids"].shape[1], TOKENIZER_VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()

    # one real optimizer step works (backward through the architecture) and changes the copy only
    before = _state(model)
    tuned = tuned_copy(model, tok, steps=1, batch_size=2, seq_len=16)
    assert type(tuned) is type(model) and not tuned.training
    assert _same_state(_state(model), before)
    assert not _same_state(_state(tuned), before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_variant_with_overrides(arch, tok):
    model = tiny_model(arch, hidden_size=32, num_layers=2, tie_word_embeddings=True)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings is True
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tok("12 + 7 = 19", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert out.hidden_states[0].shape == (1, ids.shape[1], 32)


def test_tiny_config_defaults_and_overrides():
    cfg = tiny_config("qwen3")
    assert cfg.model_type == "qwen3"
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 2048
    assert cfg._attn_implementation == "sdpa"
    assert tiny_config("gpt2").n_positions == 2048
    assert tiny_config("gemma3").model_type == "gemma3_text"
    cfg = tiny_config("llama", hidden_size=128, num_layers=3, vocab_size=600, intermediate_size=96)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size) == (128, 3, 600, 96)
    assert cfg.head_dim == 32
    eager = tiny_model("gemma2", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_tiny_model_deterministic_dtype_and_global_rng_untouched():
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_state(_state(a), _state(b))
    assert not _same_state(_state(a), _state(c))
    half = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    w, w16 = a.get_input_embeddings().weight, half.get_input_embeddings().weight
    assert torch.equal(w.to(torch.bfloat16), w16)
    with torch.no_grad():
        assert torch.isfinite(half(torch.tensor([[1, 20, 30]])).logits.float()).all()


def test_bad_model_arguments_raise_probe_error():
    with pytest.raises(ProbeError, match="'bert'") as info:
        tiny_model("bert")
    assert isinstance(info.value, ValueError)
    for arch in ARCHITECTURES:
        assert arch in str(info.value)
    with pytest.raises(ProbeError, match="'bert'"):
        tiny_config("bert")
    with pytest.raises(ProbeError, match="hidden_size=30"):
        tiny_config("llama", hidden_size=30)
    with pytest.raises(ProbeError, match="num_layers=0"):
        tiny_config("llama", num_layers=0)
    with pytest.raises(ProbeError, match="vocab_size=3"):
        tiny_config("llama", vocab_size=3)
    with pytest.raises(ProbeError, match="torch.int64"):
        tiny_model("llama", dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_tokens_and_settings(tok):
    assert len(tok) == TOKENIZER_VOCAB_SIZE == 512
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<|bos|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 5)
    assert tok.padding_side == "right"
    assert tok.model_max_length == 2048


def test_tokenizer_round_trip_and_bos(tok):
    text = "12 + 7 = 19"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    # digits are tokenized one by one
    assert [t for t in tok.convert_ids_to_tokens(ids) if any(ch.isdigit() for ch in t)] == list("12719")
    for text in ["What colour is a lemon?\nA. red", "The answer is \\boxed{42}.", "héllo wörld ✓"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    padded = tok(["a", "a longer text"], padding=True)["input_ids"]
    assert padded[0][-1] == tok.pad_token_id and padded[0][0] == tok.bos_token_id


def test_tokenizer_is_deterministic_and_a_new_object_per_call():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    a.padding_side = "left"
    a.add_tokens(["<extra_token>"])
    assert b.padding_side == "right" and len(b) == TOKENIZER_VOCAB_SIZE
    assert len(tiny_tokenizer()) == TOKENIZER_VOCAB_SIZE


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids[0] == 3 and ids.count(3) == 2 and ids.count(4) == 1
    assert tok.decode(ids) == prompt
    # assistant turns are marked for assistant-only loss
    out = tok.apply_chat_template(messages[1:], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "5<|im_end|>"


def test_tokenizer_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Compute (3 + 4) * 5.\nFirst add: 3 + 4 = 7."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text)[0] == 1
    assert loaded.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 5)
    assert loaded.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert loaded.padding_side == "right" and loaded.model_max_length == 2048
    assert len(loaded) == TOKENIZER_VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# datasets

_EXPR = re.compile(r"[\d(][\d\s+\-*()]*[\d)]")
_STEP = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)\.")


def test_arithmetic_dataset_columns_and_correctness():
    ds = arithmetic_dataset(n=200, seed=3)
    assert len(ds) == 200 and set(ds.column_names) == ARITH_COLUMNS
    assert len(set(ds["question"])) == 200
    for row in ds:
        expr = _EXPR.search(row["question"]).group()
        value = eval(expr, {"__builtins__": {}})  # only digits, + - * ( ) and spaces
        assert row["final_answer"] == str(value) and value >= 0
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", row["answer"])
        assert boxed == [str(value)]
        assert row["answer"].rstrip().endswith(f"\\boxed{{{value}}}.")
        lines = row["answer"].split("\n")
        assert len(lines) >= 3
        steps = [_STEP.search(line) for line in lines[:-1]]
        assert all(steps)
        for m in steps:
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            assert {"+": x + y, "-": x - y, "*": x * y}[op] == z
        assert int(steps[-1][4]) == value
        assert row["messages"] == [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["text"] == row["question"] + "\n" + row["answer"]


def test_multiple_choice_dataset_columns_and_correctness():
    ds = multiple_choice_dataset(n=200, seed=5)
    assert len(ds) == 200 and set(ds.column_names) == MCQ_COLUMNS
    kinds = set()
    for row in ds:
        choices, label = row["choices"], row["label"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert 0 <= label < 4 and row["answer"] == "ABCD"[label]
        right, q = choices[label], row["question"]
        if q.startswith("What colour is "):
            kinds.add("colour")
            assert _COLOURS[q[len("What colour is ") : -1]] == right
        elif q.startswith("What is the capital of "):
            kinds.add("capital")
            assert _CAPITALS[q[len("What is the capital of ") : -1]] == right
        elif q.startswith("How many legs does a "):
            kinds.add("legs")
            assert str(_LEGS[q[len("How many legs does a ") : -len(" have?")]]) == right
        elif q == "Which of these animals can fly?":
            kinds.add("fly")
            assert right in _FLYERS and not (set(choices) - {right}) & set(_FLYERS)
        elif q == "Which of these animals lives in the sea?":
            kinds.add("sea")
            assert right in _SEA and not (set(choices) - {right}) & set(_SEA)
        else:
            kinds.add("number")
            numbers = [int(c) for c in choices]
            assert int(right) == (max(numbers) if "largest" in q else min(numbers))
        body = q + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
        assert row["text"] == body + f"\nAnswer: {row['answer']}"
        assert row["messages"] == [
            {"role": "user", "content": body},
            {"role": "assistant", "content": f"Answer: {row['answer']}"},
        ]
        assert row["prompt"] == row["messages"][:1]
    assert kinds == {"colour", "capital", "legs", "fly", "sea", "number"}
    assert len(set(ds["label"])) == 4


@pytest.mark.parametrize("name", sorted(SYNTHETIC_DATASETS))
def test_datasets_are_deterministic_for_a_seed(name):
    a, b, c = (
        synthetic_dataset(name, n=32, seed=7),
        synthetic_dataset(name, n=32, seed=7),
        synthetic_dataset(name, n=32, seed=8),
    )
    assert a.to_list() == b.to_list()
    assert a.to_list() != c.to_list()
    assert a.to_list() == SYNTHETIC_DATASETS[name](n=32, seed=7).to_list()
    assert len(synthetic_dataset(name)) == 64
    assert len(synthetic_dataset(name, n=0)) == 0


def test_synthetic_dataset_names():
    assert SYNTHETIC_DATASETS == {
        "arithmetic": arithmetic_dataset,
        "mcq": multiple_choice_dataset,
        "openthoughts": openthoughts_dataset,
    }
    with pytest.raises(ProbeError, match="'gsm8k'") as info:
        synthetic_dataset("gsm8k")
    assert "arithmetic" in str(info.value) and "mcq" in str(info.value)
    with pytest.raises(ProbeError, match="n=-1"):
        arithmetic_dataset(n=-1)


def test_tokenizer_covers_the_datasets(tok):
    texts = list(arithmetic_dataset(16, seed=99)["text"]) + list(multiple_choice_dataset(16, seed=99)["text"])
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # BPE merges really compress the synthetic text (well below one token per byte)
    assert sum(len(tok.encode(t)) for t in texts) < 0.6 * sum(len(t.encode()) for t in texts)


# ---------------------------------------------------------------------------------------------
# tuned_copy and save_tiny_pair


@pytest.fixture(scope="module")
def base_and_tuned(tok):
    base = tiny_model("qwen3", seed=0)
    before = _state(base)
    torch.manual_seed(99)
    rng_before = torch.get_rng_state()
    tuned = tuned_copy(base, tok, seed=0)
    rng_after = torch.get_rng_state()
    return base, before, tuned, rng_before, rng_after


def test_tuned_copy_differs_lowers_loss_and_leaves_original(base_and_tuned, tok):
    base, before, tuned, rng_before, rng_after = base_and_tuned
    assert torch.equal(rng_before, rng_after)
    assert _same_state(_state(base), before)
    assert tuned is not base and not tuned.training and not base.training
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(base.parameters(), tuned.parameters()))

    texts = arithmetic_dataset(n=128, seed=1)["text"]  # the default training data for seed 0
    ids, mask, labels = _batch(tok, texts)
    with torch.no_grad():
        out_base = base(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        out_tuned = tuned(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    mid = base.config.num_hidden_layers // 2
    h_base, h_tuned = out_base.hidden_states[mid], out_tuned.hidden_states[mid]
    keep = mask.bool()
    rel = (h_tuned[keep] - h_base[keep]).norm() / h_base[keep].norm()
    assert rel > 1e-3
    assert out_tuned.loss < out_base.loss - 0.5, (out_base.loss, out_tuned.loss)

    # held-out arithmetic also improves: it learned the format, not only the rows
    ids, mask, labels = _batch(tok, arithmetic_dataset(n=32, seed=1234)["text"])
    with torch.no_grad():
        assert (
            tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
            < base(input_ids=ids, attention_mask=mask, labels=labels).loss
        )


def test_tuned_copy_is_deterministic_for_a_seed(base_and_tuned, tok):
    base, _, tuned, _, _ = base_and_tuned
    again = tuned_copy(base, tok, seed=0, steps=3)
    again2 = tuned_copy(base, tok, seed=0, steps=3)
    other = tuned_copy(base, tok, seed=1, steps=3)
    assert _same_state(_state(again), _state(again2))
    assert not _same_state(_state(again), _state(other))
    assert not _same_state(_state(again), _state(tuned))  # 3 steps != 20 steps
    assert _same_state(_state(tuned_copy(base, tok, steps=0)), _state(base))


def test_tuned_copy_on_mcq_and_bad_input(tok):
    base = tiny_model("gpt2", num_layers=2)
    mcq = multiple_choice_dataset(16)
    torch.set_num_threads(2)
    try:
        tuned = tuned_copy(base, tok, mcq, steps=2, batch_size=4, seq_len=32)
        assert torch.get_num_threads() == 2  # restored after single-threaded training
    finally:
        torch.set_num_threads(1)
    assert not _same_state(_state(tuned), _state(base))
    with pytest.raises(ProbeError, match="'text'"):
        tuned_copy(base, tok, mcq.remove_columns("text"), steps=1)
    with pytest.raises(ProbeError, match="steps=-1"):
        tuned_copy(base, tok, steps=-1)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_save_tiny_pair_round_trip(arch, tok, tmp_path):
    paths = save_tiny_pair(tmp_path / "pair", arch, seed=0, steps=3)
    assert set(paths) == {"base", "tuned"}
    assert paths["base"] == tmp_path / "pair" / "base" and paths["tuned"] == tmp_path / "pair" / "tuned"
    base = tiny_model(arch, seed=0)
    in_memory = {"base": base, "tuned": tuned_copy(base, tok, steps=3, seed=0)}
    ids = tok(["What is 3 + 4 * 5?", "Which number is the largest?"], padding=True, return_tensors="pt")
    for key, path in paths.items():
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        assert (path / "tokenizer.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        loaded_tok = AutoTokenizer.from_pretrained(path)
        assert type(model) is type(in_memory[key])
        assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
        assert loaded_tok.encode("12 + 7 = 19") == tok.encode("12 + 7 = 19")
        assert loaded_tok.chat_template == tok.chat_template
        model.eval()
        with torch.no_grad():
            expected = in_memory[key](**ids).logits
            got = model(**ids).logits
        assert torch.equal(got, expected)
    with torch.no_grad():
        assert not torch.allclose(in_memory["base"](**ids).logits, in_memory["tuned"](**ids).logits)
