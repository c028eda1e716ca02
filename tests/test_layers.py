"""Tests of posttrain_probe.layers: finding decoder blocks through wrappers, and truncated forwards.

Site convention: layer L = residual stream entering decoder block L = ``hidden_states[L]`` of a HF
forward with ``output_hidden_states=True``; valid sites are ``0 <= L < n_layers``.
"""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel

from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import (
    decoder_blocks,
    default_layer,
    hidden_size,
    num_layers,
    residual_hooks,
    truncated_forward,
    unwrap_model,
    validate_layer,
)
from posttrain_probe.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

N_LAYERS = 4  # tiny_model's default

# LoRA targets per architecture: the attention projections (phi3 fuses q/k/v, gpt2 has c_attn).
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "phi3": ["qkv_proj", "o_proj"],
}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

TEXTS = [
    "What is 17 + 12 * 3? First multiply: 12 * 3 = 36. Then add: 17 + 36 = 53.",
    "Which colour is fresh grass?",
    "hi",
]


# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    """A right-padded batch of three texts of different lengths (the attention mask has zeros)."""
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A single-process gloo process group (FileStore in a temp dir), destroyed afterwards."""
    created = False
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    assert dist.get_world_size() == 1
    yield
    if created:
        dist.destroy_process_group()


def full_hidden_states(model: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` of a normal full forward (n_layers + 1 entries)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    return out.hidden_states


def logits(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def final_norm(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    return inner.transformer.ln_f if hasattr(inner, "transformer") else inner.model.norm


def no_pre_hooks(module: nn.Module) -> bool:
    """No forward pre-hook anywhere in ``module`` (residual_hooks registers pre-hooks; HF's own
    output-capturing hooks, installed by ``output_hidden_states=True``, are post-forward hooks)."""
    return all(not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs for m in module.modules())


def hook_snapshot(module: nn.Module) -> dict[str, tuple]:
    """Ids of every forward (pre-)hook on every submodule, to check that nothing was left behind
    where wrappers (FSDP2) or HF (output capturing) keep hooks of their own."""
    return {
        name: (tuple(m._forward_pre_hooks), tuple(m._forward_pre_hooks_with_kwargs), tuple(m._forward_hooks))
        for name, m in module.named_modules()
    }


def lora_model(arch: str, seed: int = 0) -> peft.PeftModel:
    """A PEFT LoRA model on the attention projections, with non-zero LoRA weights (so the adapter
    really changes the residual stream and the comparison below is not trivially the base model)."""
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS.get(arch, DEFAULT_LORA_TARGETS),
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2's Conv1D fan_in_fan_out notice
        return peft.get_peft_model(tiny_model(arch, seed=seed), config)


class DeepSpeedEngine(nn.Module):
    """Structural stand-in for ``deepspeed.DeepSpeedEngine`` to test wrapper *stacking* cheaply.

    Mimics the attribute layout unwrap_model relies on (a module named ``DeepSpeedEngine`` holding
    the model as ``.module``). The real engine, ZeRO-3 included, is tested in
    tests/test_layers_deepspeed.py.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# 1. Every architecture: blocks, sizes, default layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_introspection(arch):
    model = tiny_model(arch)
    assert unwrap_model(model) is model  # a bare HF model is not unwrapped any further
    blocks = decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == N_LAYERS
    assert len({type(b) for b in blocks}) == 1
    assert type(blocks[0]).__name__.endswith(("DecoderLayer", "Block"))
    # It is the model's own block list, not a copy.
    inner = model.transformer.h if arch == "gpt2" else model.model.layers
    assert blocks is inner
    expected_width = model.config.n_embd if arch == "gpt2" else model.config.hidden_size
    assert hidden_size(model) == expected_width == 64
    assert num_layers(model) == N_LAYERS == model.config.num_hidden_layers
    assert default_layer(model) == N_LAYERS // 2 == 2


@pytest.mark.parametrize("n_layers, expected", [(1, 0), (2, 1), (3, 1), (5, 2)])
def test_default_layer_is_half_depth(n_layers, expected):
    model = tiny_model("qwen3", num_layers=n_layers, hidden_size=32)
    assert num_layers(model) == n_layers
    assert default_layer(model) == expected


def test_bare_decoder_model_is_found():
    """A bare base model (Qwen3Model, GPT2Model) has its blocks at ``layers`` / ``h``."""
    model = tiny_model("qwen3")
    assert decoder_blocks(model.model) is model.model.layers
    gpt2 = tiny_model("gpt2")
    assert decoder_blocks(gpt2.transformer) is gpt2.transformer.h
    assert hidden_size(gpt2.transformer) == 64


# --------------------------------------------------------------------------------------------
# 2. Through training wrappers
# --------------------------------------------------------------------------------------------


def check_wrapper(wrapped: nn.Module, inner: nn.Module, batch, layers=(0, 2, 3)) -> None:
    """decoder_blocks through the wrapper is the inner model's list, and truncated_forward through
    the wrapper equals the inner model's ``hidden_states[L]``."""
    input_ids, mask = batch
    assert unwrap_model(wrapped) is inner
    assert decoder_blocks(wrapped) is decoder_blocks(inner)
    assert num_layers(wrapped) == num_layers(inner)
    assert hidden_size(wrapped) == hidden_size(inner)
    assert default_layer(wrapped) == default_layer(inner)
    expected = full_hidden_states(inner, input_ids, mask)
    hooks_before = hook_snapshot(wrapped)
    got = truncated_forward(wrapped, input_ids, mask, list(layers))
    assert sorted(got) == sorted(layers)
    for layer in layers:
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)
    assert hook_snapshot(wrapped) == hooks_before


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "phi3"])
def test_peft_lora(arch, batch):
    wrapped = lora_model(arch)
    assert type(wrapped).__name__ == "PeftModelForCausalLM"
    inner = wrapped.get_base_model()
    assert type(inner).__name__ == type(tiny_model(arch)).__name__
    # The adapter is live inside the blocks (its Linear layers sit in the block list we return).
    assert any("lora" in name for name, _ in decoder_blocks(wrapped).named_modules())
    check_wrapper(wrapped, inner, batch)
    # Through the wrapper the captured stream includes the LoRA update: it differs from the
    # same-seed model without the adapter after the first block.
    input_ids, mask = batch
    plain = full_hidden_states(tiny_model(arch), input_ids, mask)
    got = truncated_forward(wrapped, input_ids, mask, [0, 2])
    torch.testing.assert_close(got[0], plain[0])  # embeddings are not adapted
    assert not torch.allclose(got[2], plain[2])


def test_ddp(process_group, batch):
    inner = tiny_model("qwen3")
    wrapped = DistributedDataParallel(inner)
    assert type(wrapped).__name__ == "DistributedDataParallel"
    check_wrapper(wrapped, inner, batch)
    # The aborted forward leaves DDP usable: a normal forward through it is still the full model.
    torch.testing.assert_close(logits(wrapped, *batch), logits(tiny_model("qwen3"), *batch))


def test_fsdp1_whole_model(process_group, batch):
    inner = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "switching to NO_SHARD since the world size is 1"
        wrapped = FullyShardedDataParallel(inner, device_id=torch.device("cpu"))
    assert type(wrapped).__name__ == "FullyShardedDataParallel"
    assert wrapped.module is inner
    check_wrapper(wrapped, inner, batch)
    torch.testing.assert_close(logits(wrapped, *batch), logits(tiny_model("llama"), *batch))


def test_fsdp1_per_block_auto_wrap(process_group, batch):
    """The usual FSDP1 setup: every decoder block is its own FSDP unit (transformer auto-wrap)."""
    inner = tiny_model("qwen3")
    block_cls = type(inner.model.layers[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = FullyShardedDataParallel(
            inner, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({block_cls})
        )
    blocks = decoder_blocks(wrapped)
    assert blocks is inner.model.layers
    assert all(isinstance(b, FullyShardedDataParallel) for b in blocks)
    expected = full_hidden_states(tiny_model("qwen3"), *batch)
    got = truncated_forward(wrapped, *batch, [1, 3])
    for layer in (1, 3):
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)
    assert no_pre_hooks(inner)
    torch.testing.assert_close(logits(wrapped, *batch), logits(tiny_model("qwen3"), *batch))


def test_fsdp2_fully_shard(process_group, batch):
    """FSDP2 keeps the module (its class becomes a subclass FSDP<Cls>); nothing to unwrap."""
    inner = tiny_model("llama")
    mesh = init_device_mesh("cpu", (1,))
    for block in inner.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    assert type(inner).__name__ == "FSDPLlamaForCausalLM"
    check_wrapper(inner, inner, batch)
    expected = full_hidden_states(tiny_model("llama"), *batch)
    got = truncated_forward(inner, *batch, [2])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    torch.testing.assert_close(logits(inner, *batch), logits(tiny_model("llama"), *batch))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile import
def test_torch_compile_wrapper_unwraps():
    """torch.compile only wraps (compiles lazily on the first call): check the unwrap, no call."""
    inner = tiny_model("qwen3")
    compiled = torch.compile(inner)
    assert type(compiled).__name__ == "OptimizedModule"
    assert unwrap_model(compiled) is inner
    assert decoder_blocks(compiled) is decoder_blocks(inner)
    assert num_layers(compiled) == N_LAYERS
    assert hidden_size(compiled) == 64
    assert default_layer(compiled) == 2


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile import
def test_nested_wrappers(process_group, batch):
    """Wrappers stack (e.g. a DeepSpeed engine around a PEFT model, compiled): all are peeled."""
    peft_model = lora_model("qwen3")
    inner = peft_model.get_base_model()
    wrapped = DeepSpeedEngine(DistributedDataParallel(peft_model))
    check_wrapper(wrapped, inner, batch)
    assert unwrap_model(torch.compile(wrapped)) is inner


# --------------------------------------------------------------------------------------------
# 3. Captured activations equal hidden_states[L] on a padded batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_truncated_forward_matches_hidden_states(arch, batch):
    model = tiny_model(arch)
    input_ids, mask = batch
    expected = full_hidden_states(model, input_ids, mask)
    assert len(expected) == N_LAYERS + 1
    sites = [0, 1, N_LAYERS // 2, N_LAYERS - 1]
    got = truncated_forward(model, input_ids, mask, sites)  # all layers in one call
    assert list(got) == sorted(set(sites))
    for layer in sites:
        assert got[layer].shape == (input_ids.shape[0], input_ids.shape[1], 64)
        assert got[layer].dtype == torch.float32
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)
        # Each single-layer call gives the same.
        single = truncated_forward(model, input_ids, mask, [layer])
        assert list(single) == [layer]
        torch.testing.assert_close(single[layer], expected[layer], rtol=0, atol=0)
    # Different sites are different streams (the hook did not capture one tensor for all).
    assert not torch.allclose(got[0], got[N_LAYERS - 1])


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gpt2"])
def test_left_padding_and_bfloat16(arch, tok):
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    assert (enc["attention_mask"][:, 0] == 0).any()
    model = tiny_model(arch, dtype=torch.bfloat16)
    expected = full_hidden_states(model, enc["input_ids"], enc["attention_mask"])
    got = truncated_forward(model, enc["input_ids"], enc["attention_mask"], [3, 1])
    assert list(got) == [1, 3]
    for layer in (1, 3):
        assert got[layer].dtype == torch.bfloat16
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)


def test_duplicate_and_numpy_layers(batch):
    model = tiny_model("llama")
    expected = full_hidden_states(model, *batch)
    got = truncated_forward(model, *batch, [3, 1, 1, np.int64(3)])
    assert list(got) == [1, 3]
    assert all(type(k) is int for k in got)
    torch.testing.assert_close(got[3], expected[3], rtol=0, atol=0)


def test_truncated_forward_does_not_track_gradients(batch):
    model = tiny_model("qwen3")
    got = truncated_forward(model, *batch, [2])
    assert not got[2].requires_grad


def test_residual_hooks_without_stop_capture_during_full_forward(batch):
    model = tiny_model("mistral")
    input_ids, mask = batch
    with residual_hooks(model, [0, 3], stop=False) as captured:
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    assert sorted(captured) == [0, 3]
    torch.testing.assert_close(captured[0], out.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(captured[3], out.hidden_states[3], rtol=0, atol=0)
    assert out.logits.shape == (*input_ids.shape, model.config.vocab_size)
    assert no_pre_hooks(model)


# --------------------------------------------------------------------------------------------
# 4. The truncated forward skips later blocks and leaves no hooks behind
# --------------------------------------------------------------------------------------------


def _count_calls(model: nn.Module):
    """Forward-hook counters on every block, every submodule of every block, the final norm and
    the lm_head. Forward (post) hooks only fire when a module's forward has completed."""
    blocks = decoder_blocks(model)
    counts: dict[str, int] = {}
    handles = []

    def counter(name):
        counts[name] = 0

        def hook(module, args, output):
            counts[name] += 1

        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(counter(f"block{i}")))
        for sub_name, sub in block.named_modules():
            if sub_name:
                handles.append(sub.register_forward_hook(counter(f"block{i}.{sub_name}")))
    handles.append(final_norm(model).register_forward_hook(counter("norm")))
    handles.append(model.get_output_embeddings().register_forward_hook(counter("lm_head")))
    handles.append(model.get_input_embeddings().register_forward_hook(counter("embed")))
    return counts, handles


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@pytest.mark.parametrize("layers", [[2], [0], [1, 3], [3]])
def test_truncated_forward_skips_later_blocks(arch, layers, batch):
    model = tiny_model(arch)
    blocks = decoder_blocks(model)
    before = logits(model, *batch)
    assert no_pre_hooks(model)
    counts, handles = _count_calls(model)
    hooks_before = hook_snapshot(model)
    try:
        truncated_forward(model, *batch, layers)
        assert hook_snapshot(model) == hooks_before
        last = max(layers)
        assert counts["embed"] == 1
        for i in range(N_LAYERS):
            assert counts[f"block{i}"] == (1 if i < last else 0), (i, counts)
            subs = {k: v for k, v in counts.items() if k.startswith(f"block{i}.")}
            assert subs, "every block has submodules"
            if i >= last:  # nothing inside a skipped block ran either
                assert set(subs.values()) == {0}, subs
            else:
                assert max(subs.values()) >= 1
        assert counts["norm"] == 0
        assert counts["lm_head"] == 0
        # A normal forward, for contrast, runs everything once.
        for key in counts:
            counts[key] = 0
        logits(model, *batch)
        assert all(counts[f"block{i}"] == 1 for i in range(N_LAYERS))
        assert counts["norm"] == counts["lm_head"] == 1
    finally:
        for handle in handles:
            handle.remove()
    # residual_hooks removed its pre-hooks; nothing is left on any block or submodule.
    for block in blocks:
        assert not block._forward_pre_hooks
        assert not block._forward_pre_hooks_with_kwargs
    assert no_pre_hooks(model)
    # A normal forward afterwards gives exactly the same output as before.
    torch.testing.assert_close(logits(model, *batch), before, rtol=0, atol=0)
    out = model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True)
    assert len(out.hidden_states) == N_LAYERS + 1


def test_hooks_removed_when_the_forward_fails(batch):
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with residual_hooks(model, [1, 2]):
            raise RuntimeError("boom")
    assert no_pre_hooks(model)
    # An invalid layer is rejected before any hook is registered.
    with pytest.raises(ProbeError):
        truncated_forward(model, *batch, [1, N_LAYERS])
    assert no_pre_hooks(model)


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, N_LAYERS, 2.5, True, "1", None])
def test_validate_layer_errors(bad):
    model = tiny_model("qwen3")
    with pytest.raises(ProbeError) as info:
        validate_layer(model, bad)
    message = str(info.value)
    assert repr(bad) in message or str(bad) in message
    assert f"0 <= layer <= {N_LAYERS - 1}" in message


@pytest.mark.parametrize("bad", [-1, N_LAYERS, 2.5, True])
def test_truncated_forward_rejects_bad_layers(bad, batch):
    """No silent rounding: 2.5 is not layer 2 and True is not layer 1."""
    model = tiny_model("qwen3")
    with pytest.raises(ProbeError, match=r"0 <= layer <= 3"):
        truncated_forward(model, *batch, [bad])
    assert no_pre_hooks(model)


def test_validate_layer_accepts_valid_sites():
    model = tiny_model("gpt2")
    for layer in range(N_LAYERS):
        assert validate_layer(model, layer) == layer
    value = validate_layer(model, np.int64(2))
    assert value == 2 and type(value) is int


def test_no_layers_is_an_error(batch):
    model = tiny_model("qwen3")
    with pytest.raises(ProbeError, match="no layers"):
        truncated_forward(model, *batch, [])


def test_decoder_blocks_on_a_non_lm_names_the_class():
    with pytest.raises(ProbeError, match="Linear"):
        decoder_blocks(nn.Linear(4, 4))
    with pytest.raises(ProbeError, match="Linear"):
        num_layers(DeepSpeedEngine(nn.Linear(4, 4)))  # named after the unwrapped class
    with pytest.raises(ProbeError, match="Linear"):
        hidden_size(nn.Linear(4, 4))  # no config


# --------------------------------------------------------------------------------------------
# 6. Gradient checkpointing, train mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gpt2"])
def test_gradient_checkpointing_train_mode(arch, batch):
    reference = tiny_model(arch)  # eval mode, full forward; tiny configs have no dropout
    expected = full_hidden_states(reference, *batch)

    model = tiny_model(arch)
    model.gradient_checkpointing_enable()
    model.train()
    blocks = decoder_blocks(model)
    assert model.training and all(b.training for b in blocks)
    assert all(getattr(b, "gradient_checkpointing", False) for b in blocks)
    # Count that the checkpoint function is really taken (it is bypassed in eval mode).
    calls = []
    for block in blocks:
        original = block._gradient_checkpointing_func

        def spy(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        block._gradient_checkpointing_func = spy

    counts, handles = _count_calls(model)
    try:
        got = truncated_forward(model, *batch, [0, 1, 3])
    finally:
        for handle in handles:
            handle.remove()
    # Every block call goes through the checkpoint function, and the capture pre-hook fires inside
    # it (checkpoint wraps Module.__call__): so block 3 is entered (4 calls) but its body is not.
    assert len(calls) == N_LAYERS
    assert [counts[f"block{i}"] for i in range(N_LAYERS)] == [1, 1, 1, 0]
    assert {v for k, v in counts.items() if k.startswith("block3.")} == {0}
    assert counts["norm"] == counts["lm_head"] == 0
    for layer in (0, 1, 3):
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)
    assert model.training  # the mode is left as the caller set it
    assert no_pre_hooks(model)
