"""Controls for causal claims (docs/methods.md sec. 11): frequency bins, the frequency-matched sampler on planted firing
rates, the fallback to fewer bins, the controls' spread and the outside flag on hand examples, and the
firing rates of source_activation_stats against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posttrain_probe.analysis.controls import (
    ControlSpread,
    control_feature_sets,
    control_spread,
    frequency_bins,
    frequency_matched_controls,
)
from posttrain_probe.errors import ProbeError

pytestmark = pytest.mark.usefixtures("one_thread")


def planted() -> np.ndarray:
    """F = 40: features 0-7 never fire; features 8-39 fire at 32 distinct rates, increasing with the
    index, so with 4 bins: bin 1 = 8-15, bin 2 = 16-23, bin 3 = 24-31, bin 4 = 32-39."""
    rates = np.zeros(40)
    rates[8:] = np.linspace(0.001, 0.5, 32)
    return rates


def test_frequency_bins_equal_count_dead_apart_ties_together():
    bins = frequency_bins(planted(), 4)
    assert bins.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8
    assert frequency_bins([0.0, 0.1, 0.2, 0.3, 0.4], 2).tolist() == [0, 1, 1, 2, 2]
    # equal rates share a bin: 3 of the 4 live features tie at 0.5 and all land in the lowest bin
    assert frequency_bins([0.0, 0.5, 0.5, 0.5, 0.1], 2).tolist() == [0, 1, 1, 1, 1]
    assert frequency_bins(torch.tensor([0.2, 0.0, 0.1], dtype=torch.float64), 1).tolist() == [1, 0, 1]
    with pytest.raises(ProbeError, match="n_bins=0"):
        frequency_bins(planted(), 0)
    with pytest.raises(ProbeError, match="outside \\[0, 1\\]"):
        frequency_bins([0.2, 1.5], 2)
    with pytest.raises(ProbeError, match="non-empty"):
        frequency_bins(np.zeros((2, 2)), 2)


def test_sampler_on_planted_frequencies():
    rates = planted()
    bins = frequency_bins(rates, 4)
    selected = [3, 9, 12, 20, 31, 33, 38, 39]  # one dead, two in bin 1, one in bin 2, one in bin 3, three in bin 4
    draws = {seed: frequency_matched_controls(rates, selected, seed, n_bins=4) for seed in range(6)}
    for seed, controls in draws.items():
        assert len(controls) == len(selected)
        assert [bins[c] for c in controls] == [bins[s] for s in selected]  # entry j matches selected[j]'s bin
        assert not set(controls) & set(selected)  # never one of S
        assert len(set(controls)) == len(controls)  # distinct
        assert controls == frequency_matched_controls(rates, selected, seed, n_bins=4)  # deterministic per seed
    assert len({tuple(c) for c in draws.values()}) > 1  # other seeds, other sets
    # a tensor of rates and a tuple of indices give the same draw
    assert frequency_matched_controls(torch.tensor(rates), tuple(selected), 3, n_bins=4) == draws[3]


def test_sampler_too_few_candidates_and_fallback():
    rates = planted()
    whole_bin = list(range(8, 16))  # all of bin 1 (4 bins): no other feature is left in it
    with pytest.raises(ProbeError, match=r"frequency bin 1 of 4 .* holds 8 selected .* only 0 other"):
        frequency_matched_controls(rates, whole_bin, 0, n_bins=4)
    drawn = control_feature_sets(rates, whole_bin, [0, 1], n_bins=4)
    assert drawn.n_bins == 2 and drawn.requested_bins == 4 and "2 bin(s) instead of 4" in drawn.note
    for controls in drawn.sets:
        assert set(controls) == set(range(16, 24))  # bins 1+2 of 4 are bin 1 of 2: the only candidates left
    assert control_feature_sets(rates, [9, 30], [5], n_bins=4).note is None
    with pytest.raises(ProbeError, match="frequency bin 1 of 1 .* holds 17 selected"):
        control_feature_sets(rates, list(range(8, 25)), [0], n_bins=4)  # 17 of 32 live: 15 others even in one bin
    with pytest.raises(ProbeError, match="frequency bin 0 of .*never fire"):
        control_feature_sets(rates, list(range(8)), [0], n_bins=4)  # every dead feature selected


def test_sampler_bad_input():
    rates = planted()
    with pytest.raises(ProbeError, match="repeated"):
        frequency_matched_controls(rates, [9, 9], 0)
    with pytest.raises(ProbeError, match="out of range.*\\[0, 40\\)"):
        frequency_matched_controls(rates, [9, 40], 0)
    with pytest.raises(ProbeError, match="empty"):
        frequency_matched_controls(rates, [], 0)
    with pytest.raises(ProbeError, match="seed=-1"):
        frequency_matched_controls(rates, [9], -1)


def test_control_spread_and_outside_flag_hand_examples():
    spread = control_spread(-50.0, [-10.0, -20.0, 0.0])
    assert spread == ControlSpread(n=3, mean=-10.0, std=10.0, min=-20.0, max=0.0, outside=True)
    assert not control_spread(-20.0, [-10.0, -20.0, 0.0]).outside  # on the edge of the range: inside
    assert not control_spread(-5.0, [-10.0, -20.0, 0.0]).outside
    assert control_spread(12.5, [0.0, 12.5, 10.0]).outside is False
    assert control_spread(25.0, [0.0, 12.5, 10.0]).outside is True  # above the largest
    single = control_spread(5.0, [0.0])
    assert single.std is None and single.outside and single.mean == 0.0
    with pytest.raises(ProbeError, match="at least one control"):
        control_spread(1.0, [])


def test_source_activation_stats_frequency(tmp_path):
    """Firing rates and maxima in one pass, against encode_source over every kept token; cached together."""
    from posttrain_probe.crosscoder.config import CrosscoderConfig
    from posttrain_probe.crosscoder.model import Crosscoder
    from posttrain_probe.interventions import ReferenceReading, max_activations, source_activation_stats
    from posttrain_probe.layers import truncated_forward
    from posttrain_probe.testing import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("qwen3", seed=0), tiny_tokenizer()
    cc = Crosscoder(
        CrosscoderConfig(model_names=["base", "rl"], d_model=model.config.hidden_size, n_features=24, layer=2)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=gen) / 8)
        cc.b_enc.copy_(torch.randn(24, generator=gen) * 0.5)
    cc.save_pretrained(tmp_path / "cc")
    texts = ["The quick brown fox jumps over", "Let us think", "A small model learns to add numbers"]
    stats = source_activation_stats(
        tmp_path / "cc", "rl", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=2, seq_len=16)
    )
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    acts = truncated_forward(model, batch["input_ids"], batch["attention_mask"], [2])[2]
    keep = (
        batch["attention_mask"].bool()
        & (batch["attention_mask"].cumsum(-1) > 1)
        & (batch["input_ids"] != tokenizer.bos_token_id)
    )
    codes = cc.encode_source(acts[keep], "rl").detach()
    assert stats.n_tokens == codes.shape[0] and stats.frequency.dtype == torch.float64
    torch.testing.assert_close(stats.frequency, (codes > 0).double().mean(0))
    torch.testing.assert_close(stats.max_activation, codes.amax(0), rtol=1e-5, atol=1e-6)
    assert (stats.frequency > 0).any() and (stats.frequency < 1).any()
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 1
    again = max_activations(
        tmp_path / "cc", "rl", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=2, seq_len=16)
    )  # same cache entry
    assert torch.equal(again, stats.max_activation)
    assert len(list((tmp_path / "cc" / "max_activations").glob("*.safetensors"))) == 1
    cached = source_activation_stats(
        tmp_path / "cc", "rl", model, texts, tokenizer=tokenizer, reading=ReferenceReading(batch_size=2, seq_len=16)
    )
    assert torch.equal(cached.frequency, stats.frequency) and cached.n_tokens == stats.n_tokens
