"""``load_causal_lm(keep_layers=k)`` builds a text LM with its first k+1 blocks and never reads the others' weights.

Checked on saved tiny models of four architectures against a whole load: the same weights for every kept tensor,
the same residual stream entering block k, the same model identity (``config.num_hidden_layers`` keeps the
checkpoint's value), no load report on the log, and fewer tensors read. A checkpoint that lacks a kept block's
weight is refused (transformers alone would initialise it at random with a warning).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain_probe.errors import ProbeError
from posttrain_probe.layers import truncated_forward
from posttrain_probe.model_identity import model_fingerprint
from posttrain_probe.models import load_causal_lm
from posttrain_probe.testing import tiny_model


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "gemma3"])
def test_first_blocks_equal_a_whole_load(arch, tmp_path, caplog):
    tiny_model(arch, seed=0).save_pretrained(tmp_path / arch)
    full = load_causal_lm(tmp_path / arch, device="cpu")
    whole = full.state_dict()
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    for keep in (0, 2, 3, 9):
        with caplog.at_level(logging.WARNING):
            part = load_causal_lm(tmp_path / arch, device="cpu", keep_layers=keep)
        assert "LOAD REPORT" not in caplog.text and "UNEXPECTED" not in caplog.text
        assert len(part.model.layers) == min(keep + 1, 4) and part.config.num_hidden_layers == 4
        weights = part.state_dict()
        assert all(torch.equal(tensor, whole[name]) for name, tensor in weights.items())
        assert len(weights) < len(whole) if keep < 3 else len(weights) == len(whole)
        assert model_fingerprint(part) == model_fingerprint(full)
        site = min(keep, 3)
        want = truncated_forward(full, ids, torch.ones_like(ids), [site])[site]
        assert torch.equal(truncated_forward(part, ids, torch.ones_like(ids), [site])[site], want)


def test_a_missing_weight_of_a_kept_block_is_refused(tmp_path):
    tiny_model("qwen3", seed=0).save_pretrained(tmp_path / "m")
    (shard,) = tmp_path.glob("m/*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        ProbeError, match=r"first 2 of 4 blocks does not match its checkpoint: missing \['model.layers.1"
    ):
        load_causal_lm(tmp_path / "m", device="cpu", keep_layers=1)
    assert len(load_causal_lm(tmp_path / "m", device="cpu", keep_layers=0).model.layers) == 1  # block 1 not needed
