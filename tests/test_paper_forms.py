"""The papers' exact forms as options (docs/methods.md sec. 4, 9): NormRatio's denominator over all model slots
or over the compared pair, and gradient blocking's protected code with or without the encoder bias.

Expected values are computed by hand in the comments, not by the code under test.
"""

from __future__ import annotations

import pytest
import torch

from posttrain_probe.analysis.attribution import categorize, norm_ratio
from posttrain_probe.analysis.feature_sets import resolve_features
from posttrain_probe.analysis.leakage_crosscoder import crosscoder_leakage
from posttrain_probe.callbacks.blocking import BlockingArguments, build_blocker
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.blocking import GradientBlocker

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# (a) NormRatio: max over all slots ("all", docs/methods.md default) or over the compared pair ("pair", paper S)
# ---------------------------------------------------------------------------------------------

# decoder L2 norms per feature (base, sft, rl); the largest norm of all is rl's 5, of base/sft 3
NORMS = [(3.0, 1.0, 5.0), (1.0, 2.0, 0.0), (0.0, 3.0, 0.0)]
# all:  ((n_b - n_s) / 5 + 1) / 2 -> 0.7, 0.4, 0.2      -> base-only, shared, finetune-only
# pair: ((n_b - n_s) / 3 + 1) / 2 -> 5/6, 1/3, 0.0      -> base-only, finetune-only, finetune-only
WANT_ALL = [0.7, 0.4, 0.2]
WANT_PAIR = [5 / 6, 1 / 3, 0.0]


def three_model_crosscoder(layer: int = 2, d: int = 4) -> Crosscoder:
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "sft", "rl"], d_model=d, n_features=len(NORMS), layer=layer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, norms in enumerate(NORMS):
            for slot, norm in enumerate(norms):
                v = torch.randn(d, generator=gen)
                cc.W_dec[i, slot] = v / v.norm() * norm
    return cc.double()


def test_norm_ratio_scale_worked_values():
    W = three_model_crosscoder().W_dec.detach()
    torch.testing.assert_close(norm_ratio(W, 0, 1), torch.tensor(WANT_ALL, dtype=W.dtype))
    torch.testing.assert_close(norm_ratio(W, 0, 1, scale="all"), torch.tensor(WANT_ALL, dtype=W.dtype))
    torch.testing.assert_close(norm_ratio(W, 0, 1, scale="pair"), torch.tensor(WANT_PAIR, dtype=W.dtype))
    assert categorize(norm_ratio(W, 0, 1)).tolist() == ["base-only", "shared", "finetune-only"]
    assert categorize(norm_ratio(W, 0, 1, scale="pair")).tolist() == ["base-only", "finetune-only", "finetune-only"]
    # two models: both forms are the same numbers, bit for bit
    two = W[:, :2]
    assert torch.equal(norm_ratio(two, 0, 1, scale="pair"), norm_ratio(two, 0, 1, scale="all"))
    # dead features stay NaN under "pair"
    dead = torch.cat([W, torch.zeros(1, 3, W.shape[-1], dtype=W.dtype)])
    assert torch.isnan(norm_ratio(dead, 0, 1, scale="pair")[-1])


@pytest.mark.parametrize("bad", ["global", "ALL", None, 1])
def test_norm_ratio_refuses_unknown_scales(bad):
    W = three_model_crosscoder().W_dec.detach()
    with pytest.raises(ProbeError, match=rf"{bad!r}.*'all', 'pair'"):
        norm_ratio(W, 0, 1, scale=bad)
    with pytest.raises(ProbeError, match=rf"norm_ratio_scale {bad!r}.*'all', 'pair'"):
        resolve_features(three_model_crosscoder(), "1,2", norm_ratio_scale=bad)  # checked for every spec


def test_categories_with_either_scale_in_feature_sets_blocking_and_leakage(tmp_path):
    cc = three_model_crosscoder()
    assert resolve_features(cc, "finetune-only", base="base", finetuned="sft") == [2]
    assert resolve_features(cc, "finetune-only", base="base", finetuned="sft", norm_ratio_scale="pair") == [1, 2]
    assert resolve_features(cc, "shared", base="base", finetuned="sft") == [1]
    with pytest.raises(ProbeError, match="empty"):  # under "pair" no feature is shared
        resolve_features(cc, "shared", base="base", finetuned="sft", norm_ratio_scale="pair")

    cc.float().save_pretrained(tmp_path / "cc")
    args = dict(block_crosscoder=str(tmp_path / "cc"), block_features="finetune-only", block_finetuned="sft")
    assert build_blocker(BlockingArguments(**args)).features == [2]
    assert build_blocker(BlockingArguments(**args, block_norm_ratio_scale="pair")).features == [1, 2]
    with pytest.raises(ProbeError, match=r"block_norm_ratio_scale 'both'.*'all', 'pair'"):
        BlockingArguments(**args, block_norm_ratio_scale="both")

    # leakage: the bands of a (here: three-model) base-vs-blocked crosscoder use the chosen scale
    for scale, want in (("all", WANT_ALL), ("pair", WANT_PAIR)):
        part = crosscoder_leakage(
            cc, cc, [0, 1, 2], model="base", new_base="base", new_blocked="sft", norm_ratio_scale=scale
        )
        torch.testing.assert_close(part.norm_ratio, torch.tensor(want, dtype=part.norm_ratio.dtype))
    with pytest.raises(ProbeError, match="'both'"):
        crosscoder_leakage(cc, cc, [0], model="base", new_base="base", new_blocked="sft", norm_ratio_scale="both")


# ---------------------------------------------------------------------------------------------
# (b) gradient blocking: protected code with b_enc (docs/methods.md default) or without it (paper S)
# ---------------------------------------------------------------------------------------------


def biased_sae() -> Crosscoder:
    """N=1, d=2, F=2, tied identity encoder/decoder, s = 0.5, b_enc = [-1.5, 0.5]."""
    cc = Crosscoder(CrosscoderConfig(model_names=["base"], d_model=2, n_features=2, layer=1))
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0
        cc.W_dec[1, 0, 1] = 1.0
        cc.W_enc.copy_(cc.W_dec.permute(1, 2, 0))
        cc.b_enc.copy_(torch.tensor([-1.5, 0.5]))
        cc.b_dec.fill_(7.0)  # never enters x_S
        cc.scales.fill_(0.5)
    return cc


def grad_through(blocker: GradientBlocker, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = blocker.apply(x)
    out.backward(g)
    return out.detach(), x.grad


def test_encoder_bias_hand_computed():
    # x = [2, 4] raw -> ã = s x = [1, 2]; pre with b_enc = [1 - 1.5, 2 + 0.5] = [-0.5, 2.5], without = [1, 2]
    cc = biased_sae()
    x, g = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(
        cc.encode_source(x[None], "base")[0], torch.tensor([0.0, 2.5])
    )  # docs/methods.md's f^base

    # S = {0, 1}. With b_enc: f = [0, 2.5], x_S = W_dec f / s = [0, 5]; without: f = [1, 2], x_S = [2, 4]
    with_bias = GradientBlocker(cc, [0, 1], model="base")
    no_bias = GradientBlocker(cc, [0, 1], model="base", encoder_bias=False)
    assert with_bias.encoder_bias and not no_bias.encoder_bias
    torch.testing.assert_close(with_bias.protected_component(x), torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(no_bias.protected_component(x), torch.tensor([2.0, 4.0]))
    # gradient (I - J_S)^T g: with b_enc only feature 1 is on, J_S = e1 e1^T -> [1, 0]; without both are, J_S = I -> [0, 0]
    for blocker, want in ((with_bias, [1.0, 0.0]), (no_bias, [0.0, 0.0])):
        out, grad = grad_through(blocker, x, g)
        assert torch.equal(out, x)  # forward unchanged either way
        torch.testing.assert_close(grad, torch.tensor(want), rtol=0, atol=0)

    # S = {0}: feature 0 is off with b_enc (nothing blocked: grad = g) and on without it (grad = [0, 1])
    out, grad = grad_through(GradientBlocker(cc, [0], model="base"), x, g)
    torch.testing.assert_close(grad, g, rtol=0, atol=0)
    no_bias_0 = GradientBlocker(cc, [0], model="base", encoder_bias=False)
    torch.testing.assert_close(no_bias_0.protected_component(x), torch.tensor([2.0, 0.0]))
    out, grad = grad_through(no_bias_0, x, g)
    assert torch.equal(out, x)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0]), rtol=0, atol=0)
    assert "encoder_bias=False" in repr(no_bias_0) and "encoder_bias" not in repr(with_bias)


def test_encoder_bias_option_is_checked_and_threaded(tmp_path):
    cc = biased_sae()
    with pytest.raises(ProbeError, match="mode 'sae' only.*'subspace'"):
        GradientBlocker(cc, [0], model="base", mode="subspace", encoder_bias=False)
    with pytest.raises(ProbeError, match="encoder_bias must be True or False, got 'no'"):
        GradientBlocker(cc, [0], model="base", encoder_bias="no")
    cc.save_pretrained(tmp_path / "sae")
    args = dict(block_crosscoder=str(tmp_path / "sae"), block_features="0")
    assert build_blocker(BlockingArguments(**args)).encoder_bias is True
    blocker = build_blocker(BlockingArguments(**args, block_encoder_bias=False))
    assert blocker.encoder_bias is False
    torch.testing.assert_close(blocker.protected_component(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 0.0]))
    with pytest.raises(ProbeError, match="block_encoder_bias=false.*'ablate'"):
        BlockingArguments(**args, block_mode="ablate", block_encoder_bias=False)
