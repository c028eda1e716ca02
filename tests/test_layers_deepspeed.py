"""layers.py through a real DeepSpeed engine (ZeRO-2 and ZeRO-3, CPU, gloo, one process).

Each case runs in a subprocess: deepspeed.init_distributed installs a global process group.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _distributed import one_process_env

SCRIPT = r"""
import os, sys
import torch
import deepspeed
from posttrain_probe.layers import decoder_blocks, hidden_size, truncated_forward, unwrap_model
from posttrain_probe.testing import tiny_model, tiny_tokenizer

stage = int(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
model, reference = tiny_model("qwen3", seed=3), tiny_model("qwen3", seed=3)
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
assert type(engine).__name__ == "DeepSpeedEngine"
assert unwrap_model(engine) is model and decoder_blocks(engine) is decoder_blocks(model) and hidden_size(engine) == 64

batch = tiny_tokenizer()(["12 + 7 = 19", "What is 3 * 4? It is 12"], return_tensors="pt", padding=True)
with torch.no_grad():
    want = reference(**batch, output_hidden_states=True).hidden_states
engine.eval()
got = truncated_forward(engine, batch.input_ids, batch.attention_mask, [1, 2])
for layer in (1, 2):
    torch.testing.assert_close(got[layer], want[layer])
if stage == 3:
    # partitioned parameters of the block where the forward stopped were never gathered
    assert all(p.ds_status.name == "NOT_AVAILABLE" for p in decoder_blocks(engine)[2].parameters())
# training goes on after a truncated forward
engine.train()
losses = []
for _ in range(3):
    loss = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
print("OK", losses)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_truncated_forward_through_deepspeed_engine(stage):
    env = one_process_env()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(stage)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout
