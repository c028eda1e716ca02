"""layers.py through really sharded FSDP: 2 processes on CPU (gloo), FSDP2 and FSDP1.

tests/test_layers.py covers FSDP in one process, where nothing is sharded. Here each case is a
``torch.distributed.run --nproc_per_node 2`` run of the inline script below, in which every
parameter is split between the two ranks. In each rank it checks that

* the parameters really are sharded (each rank holds part of every block's parameters);
* ``truncated_forward`` through the wrapped model gives the unwrapped reference model's
  ``hidden_states[L]`` for L in [1, 2] on a padded batch (a different batch on each rank), and
  gathers the parameters of the root and blocks 0-1 only -- never of block 2, where it stops, or 3;
* the aborted forward leaves no FSDP unit "in forward": every FSDP state is idle, every unit
  (the root too) is sharded again, and FSDP1's ``summon_full_params`` is allowed;
* training goes on exactly as if the truncated forward had never run: 3 AdamW steps (optimizer
  built after the truncated forward) give the same losses and parameters as the same steps on a
  freshly wrapped model, and so do 3 steps each preceded by a truncated forward (a probe in a
  training loop); a truncated forward after training matches the fresh model.
"""

from __future__ import annotations

import pytest
from _distributed import torchrun

SCRIPT = r'''
import functools, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor
from posttrain_probe.layers import architecture_name, decoder_blocks, truncated_forward, unwrap_model
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.testing import tiny_model, tiny_tokenizer

mode = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, world
SEED, STEPS = 3, 3

texts = [["12 + 7 = 19", "What is 3 * 4? It is 12", "hi"], ["Which colour is fresh grass?", "hi there"]][rank]
batch = tiny_tokenizer()(texts, return_tensors="pt", padding=True)
ids, mask = batch.input_ids, batch.attention_mask
assert (mask == 0).any(), "the batch must contain padding"
labels = ids.masked_fill(mask == 0, -100)


def wrap(model):
    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(model.model.layers[0])})
    return FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))


def units(wrapped):
    """[(name, FSDP unit)]: the root, then blocks 0..3 (FSDP2: the modules; FSDP1: the wrappers)."""
    return [("root", wrapped)] + [(f"block{i}", block) for i, block in enumerate(decoder_blocks(wrapped))]


def local_and_full(name, unit):
    """(elements this rank holds, elements in all) of the parameters the unit itself manages."""
    if mode == "fsdp2":
        params = [p for n, p in unit.named_parameters() if name != "root" or ".layers." not in n]
        assert params and all(isinstance(p, DTensor) for p in params), (name, {type(p).__name__ for p in params})
        return sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)
    flat = unit._handle.flat_param  # FSDP1: one FlatParameter per unit
    assert unit._handle.is_sharded(flat), name
    return flat.numel(), flat._unpadded_unsharded_size.numel()


def check_sharded(wrapped, names):
    """Each named unit's parameters are split between the ranks (every rank holds a part)."""
    for name, unit in units(wrapped):
        if name not in names:
            continue
        local, full = local_and_full(name, unit)
        total = torch.tensor([local])
        dist.all_reduce(total)
        assert 0 < local < full and total.item() >= full, (name, local, full, total.item())


def count_unshards(wrapped):
    """Count the all-gathers of each unit (FSDP2 param-group / FSDP1 handle ``unshard``)."""
    counts = {}
    for name, unit in units(wrapped):
        target = unit._get_fsdp_state()._fsdp_param_group if mode == "fsdp2" else unit._handle
        counts[name] = 0

        def counting(*args, _name=name, _orig=target.unshard, **kwargs):
            counts[_name] += 1
            return _orig(*args, **kwargs)

        target.unshard = counting
    return counts


def check_idle(wrapped):
    """No FSDP unit is left in forward."""
    if mode == "fsdp2":
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        for name, unit in units(wrapped):
            state = unit._get_fsdp_state()
            assert state._training_state == TrainingState.IDLE, (name, state._training_state)
            assert state._fsdp_param_group._training_state == TrainingState.IDLE, name
            assert state._state_ctx.iter_forward_root is None, name
    else:
        from torch.distributed.fsdp._common_utils import TrainingState
        from torch.distributed.fsdp._flat_param import HandleTrainingState
        for unit in FSDP.fsdp_modules(wrapped):
            assert unit.training_state == TrainingState.IDLE, unit.training_state
            assert unit._handle._training_state == HandleTrainingState.IDLE, unit._handle._training_state


def train(wrapped, probe_every_step=False):
    wrapped.train()
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        if probe_every_step:  # as a probe run from a training callback
            truncated_forward(wrapped, ids, mask, [2])
        loss = wrapped(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def local_params(wrapped):
    return [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in wrapped.parameters()]


reference = tiny_model("qwen3", seed=SEED)
with torch.no_grad():
    want = reference(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states

# ---- truncated forward through the sharded model
wrapped = wrap(tiny_model("qwen3", seed=SEED))
# FSDP2 swaps the class for a generated FSDPQwen3ForCausalLM; the recorded architecture must not change
assert architecture_name(wrapped) == "Qwen3ForCausalLM", (type(wrapped).__name__, architecture_name(wrapped))
assert model_fingerprint(wrapped)["architecture"] == "Qwen3ForCausalLM"
assert unwrap_model(wrapped) is (wrapped if mode == "fsdp2" else wrapped.module)
assert decoder_blocks(wrapped) is unwrap_model(wrapped).model.layers
ALL = {"root", "block0", "block1", "block2", "block3"}
check_sharded(wrapped, ALL)
counts = count_unshards(wrapped)
got = truncated_forward(wrapped, ids, mask, [1, 2])
assert sorted(got) == [1, 2], sorted(got)
for layer in (1, 2):
    assert got[layer].shape == (ids.shape[0], ids.shape[1], 64), got[layer].shape
    torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=0)
# the forward stopped on entering block 2: blocks 2 and 3 were never gathered
assert counts == {"root": 1, "block0": 1, "block1": 1, "block2": 0, "block3": 0}, counts

# ---- no unit left in forward; every unit sharded again (the root too); public API works
check_idle(wrapped)
check_sharded(wrapped, ALL)
if mode == "fsdp1":
    with FSDP.summon_full_params(wrapped):  # refused while a unit is in forward/backward
        torch.testing.assert_close(wrapped.module.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    check_sharded(wrapped, ALL)

# ---- training is unchanged by the truncated forward (the optimizer is built after it, as when
# a model is probed before training: it must get the sharded parameters)
losses = train(wrapped)
fresh = wrap(tiny_model("qwen3", seed=SEED))
fresh_losses = train(fresh)
assert torch.equal(losses, fresh_losses), (losses, fresh_losses)
probed_losses = train(wrap(tiny_model("qwen3", seed=SEED)), probe_every_step=True)
assert torch.equal(probed_losses, fresh_losses), (probed_losses, fresh_losses)
assert losses[-1] < losses[0], losses
for a, b in zip(local_params(wrapped), local_params(fresh), strict=True):
    assert torch.equal(a, b)
check_idle(wrapped)
# and a truncated forward after training still matches the (identically trained) fresh model
wrapped.eval()
fresh.eval()
after = truncated_forward(wrapped, ids, mask, [1])
with torch.no_grad():
    fresh_hidden = fresh(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states
torch.testing.assert_close(after[1], fresh_hidden[1], rtol=0, atol=0)
assert not torch.equal(after[1], want[1])  # training changed the model
check_idle(wrapped)

print(f"FSDP_TRUNCATED_OK mode={mode} rank={rank} losses={[round(x, 4) for x in losses.tolist()]}", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_truncated_forward_through_sharded_fsdp(mode, tmp_path):
    script = tmp_path / "fsdp_script.py"
    script.write_text(SCRIPT)
    result = torchrun(script, mode)
    output = result.stdout[-4000:] + result.stderr[-6000:]
    assert result.returncode == 0, output
    for rank in (0, 1):
        assert f"FSDP_TRUNCATED_OK mode={mode} rank={rank}" in result.stdout, output
