"""blocking.py through really sharded FSDP: 2 processes on CPU (gloo), FSDP2 and FSDP1.

Each case is a ``torch.distributed.run --nproc_per_node 2`` run of the inline script below (the
launch pattern of tests/test_layers_fsdp.py). In each rank a GradientBlocker ("sae" mode, features
0..7 of a random N=1 crosscoder at layer 2) is attached to an FSDP-wrapped tiny model and another
one to a plain reference copy; one forward + backward of a causal-LM loss must give the same logits
and the same (gathered) gradients on both, and those gradients must differ from an unblocked
reference's (the block really acts through FSDP).
"""

from __future__ import annotations

import pytest
from _distributed import torchrun

SCRIPT = r"""
import functools, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.interventions.blocking import GradientBlocker
from posttrain_probe.testing import tiny_model, tiny_tokenizer

mode = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, world
SEED, LAYER, FEATURES = 0, 2, list(range(8))

texts = [["12 + 7 = 19", "What is 3 * 4? It is 12", "hi"], ["Which colour is fresh grass?", "hi there"]][rank]
batch = tiny_tokenizer()(texts, return_tensors="pt", padding=True)
ids, mask = batch.input_ids, batch.attention_mask
labels = ids.masked_fill(mask == 0, -100)

# the same random SAE on both ranks; unit-norm decoder (W_enc = W_dec^T) so the block is strong
torch.manual_seed(1234)
crosscoder = Crosscoder(CrosscoderConfig(model_names=["base"], d_model=64, n_features=32, layer=LAYER))
with torch.no_grad():
    crosscoder.W_dec.copy_(torch.nn.functional.normalize(crosscoder.W_dec, dim=-1))
    crosscoder.W_enc.copy_(crosscoder.W_dec.permute(1, 2, 0))


def wrap(model):
    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(model.model.layers[0])})
    # use_orig_params=True: summon_full_params(with_grads=True) refuses flat parameters
    return FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)


def step(model):
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.logits.detach()


def plain_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


reference = tiny_model("qwen3", seed=SEED)
ref_blocker = GradientBlocker(crosscoder, FEATURES, model="base", layer=LAYER, mode="sae").attach(reference)
want_logits = step(reference)
want = plain_grads(reference)

unblocked = tiny_model("qwen3", seed=SEED)
step(unblocked)
free = plain_grads(unblocked)

wrapped = wrap(tiny_model("qwen3", seed=SEED))
blocker = GradientBlocker(crosscoder, FEATURES, model="base", layer=LAYER, mode="sae").attach(wrapped)
assert blocker.is_attached
got_logits = step(wrapped)
torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)

if mode == "fsdp2":
    got = {}
    for n, p in wrapped.named_parameters():
        assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
        got[n] = p.grad.full_tensor()
else:
    with FSDP.summon_full_params(wrapped, with_grads=True):
        got = {n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone() for n, p in wrapped.named_parameters()}
# FSDP averages the gradients over the ranks: the reference gradient is the mean over both batches
assert sorted(got) == sorted(want), (sorted(got)[:5], sorted(want)[:5])
for n in want:
    dist.all_reduce(want[n]); want[n] /= world
    dist.all_reduce(free[n]); free[n] /= world
for n in want:
    torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")

# blocking was active: the blocked gradients of everything below the site differ from unblocked ones
below = [n for n in want if "embed_tokens" in n or any(f"layers.{i}." in n for i in range(LAYER))]
assert below, sorted(want)
diff = max((want[n] - free[n]).abs().max().item() for n in below)
assert diff > 1e-3, diff
assert not torch.allclose(got["model.embed_tokens.weight"], free["model.embed_tokens.weight"], atol=1e-5)

blocker.detach()
ref_blocker.detach()
print(f"FSDP_BLOCKING_OK mode={mode} rank={rank} diff={diff:.3g}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_gradient_blocking_through_sharded_fsdp(mode, tmp_path):
    script = tmp_path / "fsdp_blocking_script.py"
    script.write_text(SCRIPT)
    result = torchrun(script, mode)
    output = result.stdout[-4000:] + result.stderr[-6000:]
    assert result.returncode == 0, output
    for rank in (0, 1):
        assert f"FSDP_BLOCKING_OK mode={mode} rank={rank}" in result.stdout, output
