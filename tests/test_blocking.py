"""Gradient blocking (docs/methods.md sec. 9): GradientBlocker, feature sets, BlockingArguments and the Trainer callback.

The references here are computed independently of ``posttrain_probe.interventions.blocking``:
x_S comes from the crosscoder's own public ``encode_source`` / ``decode`` (codes outside S zeroed,
decoder bias removed), its Jacobian J_S from ``torch.autograd.functional.jacobian`` token by token,
orthonormal bases of span{d_k : k in S} from ``torch.linalg.qr`` / ``svd`` of the decoder rows.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch.autograd.functional import jacobian, vjp

from posttrain_probe.analysis.feature_sets import load_feature_set, resolve_features, write_feature_set
from posttrain_probe.callbacks.blocking import (
    BlockingArguments,
    GradientBlockingCallback,
    blocking_callback,
    build_blocker,
)
from posttrain_probe.crosscoder.config import CrosscoderConfig
from posttrain_probe.crosscoder.model import Crosscoder
from posttrain_probe.errors import ProbeError
from posttrain_probe.interventions.blocking import GradientBlocker
from posttrain_probe.layers import decoder_blocks
from posttrain_probe.synthetic import arithmetic_dataset
from posttrain_probe.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def random_crosscoder(
    names=("base",), d=16, n_features=24, *, layer=2, seed=0, activation="relu", scales=None, dtype=torch.float64
) -> Crosscoder:
    """A crosscoder with random, non-orthogonal, untied weights; b_enc centred so that about half
    of the pre-activations are positive; non-trivial scales s_m."""
    cc = Crosscoder(
        CrosscoderConfig(
            model_names=list(names), d_model=d, n_features=n_features, layer=layer, activation=activation, k=4
        )
    )
    gen = torch.Generator().manual_seed(seed)
    n = len(names)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(n, d, n_features, generator=gen) / d**0.5)
        cc.W_dec.copy_(torch.randn(n_features, n, d, generator=gen) * 0.3)
        cc.b_enc.copy_(torch.randn(n_features, generator=gen) * 0.3)
        cc.b_dec.copy_(torch.randn(n, d, generator=gen))  # must NOT enter x_S (docs/methods.md: no decoder bias)
        # powers of two by default: W_enc * s and W_dec / s are then exact in the blocker's float32
        # copies, so float64 references can be compared to ~1e-12
        cc.scales.copy_(torch.tensor(scales if scales is not None else [0.5, 2.0, 4.0][:n]))
    return cc.to(dtype)


def reference_xs(cc: Crosscoder, model, features, x: torch.Tensor) -> torch.Tensor:
    """x_S in raw units from the crosscoder's public API: f^m(x) with codes outside S zeroed,
    decoded for model m, minus the decoder bias (docs/methods.md sec. 9). ``x`` is [..., d]."""
    slot = cc.model_index(model)
    flat = x.reshape(-1, x.shape[-1])
    codes = cc.encode_source(flat, model)
    mask = torch.zeros(cc.config.n_features, dtype=codes.dtype)
    mask[list(features)] = 1
    recon = cc.decode(codes * mask)[:, slot] - cc.b_dec[slot] / cc.scales[slot]
    return recon.reshape(x.shape)


def per_token_jacobians(fn, x: torch.Tensor) -> torch.Tensor:
    """[n_tokens, d, d] Jacobians of a per-token map fn: [d] -> [d]."""
    return torch.stack([jacobian(fn, token) for token in x.reshape(-1, x.shape[-1])])


def blocked_grad(blocker: GradientBlocker, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    blocker.apply(x).backward(g)
    return x.grad


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """[d, rank] orthonormal basis of the row span of ``vectors`` [k, d] (SVD, numerical rank)."""
    u, sigma, _ = torch.linalg.svd(vectors.T.double(), full_matrices=False)
    return u[:, sigma > sigma.max() * 1e-6]


# ---------------------------------------------------------------------------------------------
# the operation
# ---------------------------------------------------------------------------------------------


def tied_orthonormal_sae() -> Crosscoder:
    """docs/methods.md sec. 9 worked value: N=1, d=4, F=2, decoder rows e0, e1, W_enc = W_dec^T, scales 1."""
    cc = Crosscoder(CrosscoderConfig(model_names=["base"], d_model=4, n_features=2, layer=1))
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0
        cc.W_dec[1, 0, 1] = 1.0
        cc.W_enc.copy_(cc.W_dec.permute(1, 2, 0))
        cc.b_enc.zero_()
        cc.b_dec.fill_(5.0)  # the decoder bias plays no part
        cc.scales.fill_(1.0)
    return cc


@pytest.mark.parametrize("mode", ["sae", "subspace"])
def test_spec_worked_value(mode):
    cc = tied_orthonormal_sae()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.ones(4)
    blocker = GradientBlocker(cc, [0, 1], model="base", mode=mode)
    assert blocker.layer == 1 and blocker.features == [0, 1]
    torch.testing.assert_close(blocker.protected_component(x), torch.tensor([1.0, 2.0, 0.0, 0.0]))
    xx = x.clone().requires_grad_(True)
    out = blocker.apply(xx)
    torch.testing.assert_close(out, x)
    out.backward(g)
    torch.testing.assert_close(xx.grad, torch.tensor([0.0, 0.0, 1.0, 1.0]), rtol=0, atol=0)
    # S = {}: nothing is protected, the gradient passes unchanged
    empty = GradientBlocker(cc, [], model="base", mode=mode)
    torch.testing.assert_close(blocked_grad(empty, x, g), g, rtol=0, atol=0)
    torch.testing.assert_close(empty.apply(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("names, model", [(("base",), "base"), (("base", "ft"), "ft"), (("base", "ft", "rl"), 2)])
def test_forward_unchanged_in_sae_and_subspace_and_ablate_removes_the_subspace(names, model):
    cc = random_crosscoder(names, d=16, n_features=24, seed=1)
    features = [0, 3, 7, 8, 20]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    for mode in ("sae", "subspace"):
        out = GradientBlocker(cc, features, model=model, mode=mode).apply(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    slot = cc.model_index(model)
    basis = orthonormal_basis(cc.W_dec[features, slot].detach())  # span is scale-free: raw = normalised / s
    ablated = GradientBlocker(cc, features, model=model, mode="ablate").apply(x)
    # (the blocker keeps its orthonormal basis in float32: ~1e-7 relative)
    torch.testing.assert_close(ablated, x - (x @ basis) @ basis.T, rtol=0, atol=1e-5)
    assert (ablated - x).abs().max() > 0.1
    torch.testing.assert_close(ablated @ basis, torch.zeros(3, 5, basis.shape[1], dtype=x.dtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize("names, model", [(("base",), "base"), (("base", "ft"), "ft"), (("base", "ft"), "base")])
def test_sae_mode_gradient_is_identity_minus_jacobian_of_the_protected_component(names, model):
    cc = random_crosscoder(names, d=12, n_features=20, seed=3)
    features = [7, 1, 4, 4, 11, 15, 19]  # unsorted, with a duplicate
    blocker = GradientBlocker(cc, features, model=model, mode="sae")
    assert blocker.features == [1, 4, 7, 11, 15, 19] and blocker.model_name == (
        model if isinstance(model, str) else names[model]
    )
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64) * 1.5
    g = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64)

    # the protected component is the crosscoder's own per-source reconstruction of S (no b_dec)
    want_xs = reference_xs(cc, model, blocker.features, x)
    torch.testing.assert_close(blocker.protected_component(x), want_xs, rtol=1e-10, atol=1e-12)
    pre_active = cc.encode_source(x.reshape(-1, 12), model)[:, blocker.features] > 0
    assert pre_active.any() and not pre_active.all(), "the test needs active and inactive protected features"

    jac_ref = per_token_jacobians(lambda t: reference_xs(cc, model, blocker.features, t), x)  # [6, d, d]
    jac_blk = per_token_jacobians(blocker.protected_component, x)
    torch.testing.assert_close(jac_blk, jac_ref, rtol=1e-10, atol=1e-12)
    assert jac_ref.abs().max() > 0.05
    want = g.reshape(-1, 12) - torch.einsum("nij,ni->nj", jac_ref, g.reshape(-1, 12))  # (I - J_S)^T g per token
    got = blocked_grad(blocker, x, g)
    torch.testing.assert_close(got, want.reshape(g.shape), rtol=1e-10, atol=1e-12)
    assert (got - g).abs().max() > 0.05  # something was blocked


def test_sae_mode_in_float32_matches_float64_reference():
    cc = random_crosscoder(("base", "ft"), d=12, n_features=20, seed=5, scales=[0.7, 1.9])
    blocker = GradientBlocker(cc, [2, 5, 9], model="ft")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    _, jtg = vjp(lambda t: reference_xs(cc, "ft", [2, 5, 9], t), x, g)
    got = blocked_grad(blocker, x.float(), g.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), g - jtg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sae", "subspace"])
def test_under_autocast_the_gradient_is_autograds_through_the_protected_component(mode):
    """Under bf16 autocast on a float32 residual stream (a mixed-precision SFT step), the blocked gradient is
    autograd's through x + (sg(x_S) - x_S), bit for bit; the forward keeps only the firing indicator [T, |S|] for
    the backward (sae) or nothing (subspace)."""
    cc = random_crosscoder(("base", "ft"), d=64, n_features=128, seed=13, dtype=torch.float32, scales=[0.8, 1.3])
    blocker = GradientBlocker(cc, range(0, 128, 4), model="ft", mode=mode)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(3, 10, 64, generator=gen).requires_grad_()
    g = torch.randn(3, 10, 64, generator=gen)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blocker.apply(x)
    (got,) = torch.autograd.grad(out, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_s = blocker.protected_component(x)
        reference = x + (x_s.detach() - x_s)
    (want,) = torch.autograd.grad(reference, x, g)
    assert out.dtype == torch.float32 and torch.equal(out, x)
    assert saved == ([(torch.bool, (30, 32))] if mode == "sae" else [])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - g).abs().max() > 0.05  # something was blocked


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("mode", ["sae", "subspace"])
def test_forward_mode_and_torch_func_give_the_blocked_derivatives(mode):
    """Forward-mode AD (a dual input) gets (I - J_S) t, and torch.func.grad / vmap the blocked gradient, as
    differentiating x + (sg(x_S) - x_S) does."""
    from torch.autograd import forward_ad

    cc = random_crosscoder(("base", "ft"), d=12, n_features=20, seed=16, activation="batchtopk")
    with torch.no_grad():
        cc.threshold.fill_(0.05)
    blocker = GradientBlocker(cc, [1, 4, 7, 11, 15], model="ft", mode=mode)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 12, generator=gen, dtype=torch.float64)

    def reference(v):
        x_s = blocker.protected_component(v)
        return v + (x_s.detach() - x_s)

    tangents = {}
    for name, fn in (("blocked", blocker.apply), ("reference", reference)):
        with forward_ad.dual_level():
            tangents[name] = forward_ad.unpack_dual(fn(forward_ad.make_dual(x, t))).tangent
    torch.testing.assert_close(tangents["blocked"], tangents["reference"], rtol=1e-12, atol=1e-12)
    assert (tangents["blocked"] - t).abs().max() > 0.05  # something was blocked

    blocker.apply(x.clone().requires_grad_())  # the weights' copies for this device and dtype, made outside torch.func
    loss = lambda fn: lambda v: (fn(v) ** 2 * torch.arange(12, dtype=v.dtype)).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(blocker.apply))(x), torch.func.grad(loss(reference))(x))
    per_row = torch.func.vmap(torch.func.grad(loss(blocker.apply)))(x)
    torch.testing.assert_close(per_row, torch.func.vmap(torch.func.grad(loss(reference)))(x))


def test_input_without_gradient_is_returned_as_is():
    """Nothing upstream of the site trains (x needs no gradient): there is nothing to block, and no work."""
    cc = random_crosscoder(("base",), d=12, n_features=20, seed=15)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    for mode in ("sae", "subspace"):
        assert GradientBlocker(cc, [1, 4], model="base", mode=mode).apply(x) is x


@pytest.mark.parametrize("names, model", [(("base",), "base"), (("base", "ft"), "ft")])
def test_subspace_mode_removes_the_gradient_component_in_the_decoder_span(names, model):
    d = 16
    cc = random_crosscoder(names, d=d, n_features=40, seed=7)
    slot = cc.model_index(model)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, d, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 5, d, generator=gen, dtype=torch.float64)
    features = [1, 6, 9, 30, 33]
    q, _ = torch.linalg.qr(cc.W_dec[features, slot].detach().T)  # [d, 5] orthonormal basis of span{d_k}
    got = blocked_grad(GradientBlocker(cc, features, model=model, mode="subspace"), x, g)
    # (the blocker keeps its orthonormal basis in float32: ~1e-7 relative)
    torch.testing.assert_close(got @ q, torch.zeros(2, 5, 5, dtype=x.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, g - (g @ q) @ q.T, rtol=1e-6, atol=1e-6)
    assert (got - g).norm() > 0.3 * g.norm() * (5 / d) ** 0.5

    # a rank-deficient protected set (two features along the same direction): the span counts once
    with torch.no_grad():
        cc.W_dec[2, slot] = -3 * cc.W_dec[1, slot]
    got = blocked_grad(GradientBlocker(cc, [1, 2, 6], model=model, mode="subspace"), x, g)
    q, _ = torch.linalg.qr(cc.W_dec[[1, 6], slot].detach().T)
    torch.testing.assert_close(got, g - (g @ q) @ q.T, rtol=1e-6, atol=1e-6)

    # |S| >= d: the decoder vectors span the whole space, no gradient reaches x
    got = blocked_grad(GradientBlocker(cc, range(20), model=model, mode="subspace"), x, g)
    torch.testing.assert_close(got, torch.zeros_like(g), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        GradientBlocker(cc, range(20), model=model, mode="subspace").apply(x), x, rtol=0, atol=1e-10
    )


def test_batchtopk_branch_uses_the_inference_threshold():
    cc = random_crosscoder(("base", "ft"), d=12, n_features=20, seed=9, activation="batchtopk")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(30, 12, generator=gen, dtype=torch.float64) * 1.5
    g = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    relu_codes = torch.relu((x * cc.scales[0]) @ cc.W_enc[0] + cc.b_enc).detach()
    scores = relu_codes * cc.decoder_norm_sum().detach()
    ordered = scores[scores > 0].sort().values
    middle = len(ordered) // 2
    threshold = (ordered[middle] + ordered[middle + 1]) / 2  # between two scores: no ties at the edge
    with torch.no_grad():
        cc.threshold.fill_(threshold)
    features = list(range(0, 20, 2))
    blocker = GradientBlocker(cc, features, model="base")
    # the threshold really splits the active protected codes
    kept = (scores[:, features] > threshold).sum()
    assert 0 < kept < (relu_codes[:, features] > 0).sum()
    want_xs = reference_xs(cc, "base", features, x)  # encode_source applies the threshold
    torch.testing.assert_close(blocker.protected_component(x), want_xs, rtol=1e-10, atol=1e-12)
    relu_only = relu_codes[:, features] @ cc.W_dec[features, 0].detach() / cc.scales[0]
    assert (relu_only - want_xs).abs().max() > 1e-3  # a threshold-free blocker would differ
    _, jtg = vjp(lambda t: reference_xs(cc, "base", features, t), x, g)
    torch.testing.assert_close(blocked_grad(blocker, x, g), g - jtg, rtol=1e-10, atol=1e-12)


def test_batchtopk_without_a_threshold_is_refused():
    """A BatchTopK crosscoder that was never trained has no inference threshold (-1): its own
    encode()/encode_source() refuse it; the blocker must not silently treat it as a ReLU SAE."""
    cc = random_crosscoder(("base",), d=8, n_features=10, activation="batchtopk")
    assert float(cc.threshold) < 0
    with pytest.raises(ProbeError, match="threshold"):
        cc.encode_source(torch.randn(2, 8, dtype=torch.float64), "base")
    with pytest.raises(ProbeError, match="threshold"):
        GradientBlocker(cc, [0, 1], model="base", mode="sae")


def test_forward_value_is_exactly_unchanged_in_bfloat16():
    """docs/methods.md sec. 9: 'Forward values are unchanged'. sg(x_S) + (x - x_S) rounds twice in bf16
    (x - x_S, then + x_S); x + (sg(x_S) - x_S) is the same gradient and adds an exact 0."""
    cc = random_crosscoder(("base",), d=64, n_features=128, seed=11, dtype=torch.float32)
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16).requires_grad_()
    for mode in ("sae", "subspace"):
        out = GradientBlocker(cc, range(0, 128, 3), model="base", mode=mode).apply(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, x), f"{mode}: max change {(out.float() - x.float()).abs().max():.3g}"


# ---------------------------------------------------------------------------------------------
# attached to a model
# ---------------------------------------------------------------------------------------------

LAYER = 2


@pytest.fixture(scope="module")
def batch():
    tok = tiny_tokenizer()
    enc = tok(
        ["What is 3 + 4 * 2? First multiply.", "Compute 12 * 3 - 5.", "The quick brown fox"],
        return_tensors="pt",
        padding=True,
    )
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def site_crosscoder(model, layer: int, batch, *, n_features: int = 96, seed: int = 0, names=("base",)) -> Crosscoder:
    """A random float32 crosscoder for the model's residual stream at ``layer``: scales from the
    model's activations there, about half of the features active on a token."""
    d = model.config.hidden_size
    cc = random_crosscoder(names, d=d, n_features=n_features, layer=layer, seed=seed, dtype=torch.float32)
    with torch.no_grad():
        h = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[layer]
        h = h[batch["attention_mask"].bool()].float()
        cc.set_scales_from([h[:, None, :].expand(-1, len(names), -1)])
    return cc


def site_input_grad(model, layer: int, batch, blocker: GradientBlocker | None = None):
    """(loss, residual stream entering block ``layer`` before any blocker, its gradient)."""
    captured = {}

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        captured["x"] = hidden

    handle = decoder_blocks(model)[layer].register_forward_pre_hook(
        capture, with_kwargs=True
    )  # runs before the blocker's
    try:
        if blocker is not None:
            blocker.attach(model)
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
    finally:
        handle.remove()
        if blocker is not None:
            blocker.detach()
    return out, captured["x"].detach(), captured["x"].grad.detach()


@pytest.mark.parametrize("mode", ["sae", "subspace"])
def test_attached_model_same_logits_and_blocked_site_gradient(batch, mode):
    model = tiny_model("qwen3", seed=0).train()
    cc = site_crosscoder(model, LAYER, batch)
    features = list(range(0, 96, 4))
    blocker = GradientBlocker(cc, features, model="base", mode=mode)
    plain, x_plain, g = site_input_grad(model, LAYER, batch)
    blocked, x_blocked, got = site_input_grad(model, LAYER, batch, blocker)
    torch.testing.assert_close(x_blocked, x_plain, rtol=0, atol=0)
    torch.testing.assert_close(blocked.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    if mode == "sae":
        _, jtg = vjp(lambda t: reference_xs(cc, "base", features, t), x_plain, g)
        want = g - jtg
        active = cc.encode_source(x_plain.flatten(0, 1), "base")[:, features] > 0
        assert 0.1 < active.float().mean() < 0.9
    else:
        q = orthonormal_basis(cc.W_dec[features, 0].detach()).float()
        want = g - (g @ q) @ q.T
        torch.testing.assert_close(got @ q, torch.zeros_like(got @ q), rtol=0, atol=1e-6 * g.abs().max())
    scale = g.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    assert (got - g).abs().max() > 0.05 * scale


def test_detach_restores_the_model_exactly_and_double_attach_is_refused(batch):
    model = tiny_model("qwen3", seed=0)
    block = decoder_blocks(model)[LAYER]
    hooks_before = dict(block._forward_pre_hooks)
    with torch.no_grad():
        before = model(**batch).logits
    cc = site_crosscoder(model, LAYER, batch)
    blocker = GradientBlocker(cc, range(0, 96, 2), mode="ablate")  # ablate: the forward changes while attached
    assert not blocker.is_attached
    assert blocker.attach(model) is blocker and blocker.is_attached
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, before, atol=1e-3)
    with pytest.raises(ProbeError, match="already attached"):
        blocker.attach(model)
    other = GradientBlocker(cc, [1, 2], mode="sae")
    with pytest.raises(ProbeError, match="already has a gradient blocker"):
        other.attach(model)
    assert not other.is_attached
    blocker.detach()
    assert not blocker.is_attached and dict(block._forward_pre_hooks) == hooks_before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    blocker.detach()  # no-op
    # attachable again after detach, by this blocker or another one; the context manager detaches on errors
    with other.attached(model):
        assert other.is_attached
    assert not other.is_attached
    with pytest.raises(RuntimeError, match="boom"):
        with blocker.attached(model):
            raise RuntimeError("boom")
    assert not blocker.is_attached and dict(block._forward_pre_hooks) == hooks_before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "phi3"])
def test_attach_other_architectures(arch, batch):
    model = tiny_model(arch, seed=1).train()
    cc = site_crosscoder(model, 1, batch, n_features=64)
    features = list(range(0, 64, 3))
    blocker = GradientBlocker(cc, features, mode="subspace")
    plain, x_plain, g = site_input_grad(model, 1, batch)
    blocked, _, got = site_input_grad(model, 1, batch, blocker)
    torch.testing.assert_close(blocked.logits, plain.logits, rtol=1e-5, atol=1e-5)
    q = orthonormal_basis(cc.W_dec[features, 0].detach()).float()
    torch.testing.assert_close(got, g - (g @ q) @ q.T, rtol=1e-4, atol=1e-5 * g.abs().max())


def param_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


def block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def check_blocking_pattern(blocked: dict, plain: dict, layer: int) -> None:
    """Parameters of blocks >= layer and the head see the same forward, so the same gradient;
    parameters upstream of the site (blocks < layer) get a different one."""
    assert blocked.keys() == plain.keys()
    changed = []
    for name in plain:
        index = block_index(name)
        upstream = (index is not None and index < layer) or "embed_tokens" in name
        if upstream:
            if not torch.allclose(blocked[name], plain[name], rtol=1e-3, atol=1e-6):
                changed.append(name)
        else:
            torch.testing.assert_close(
                blocked[name], plain[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert changed, "no upstream parameter gradient changed: the blocker had no effect"


def test_gradient_checkpointing_gives_the_same_parameter_gradients(batch):
    model = tiny_model("qwen3", seed=0).train()
    cc = site_crosscoder(model, LAYER, batch)
    blocker = GradientBlocker(cc, range(0, 96, 3), mode="sae")
    plain = param_grads(model, batch)
    with blocker.attached(model):
        want = param_grads(model, batch)
    check_blocking_pattern(want, plain, LAYER)
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert decoder_blocks(model)[LAYER].gradient_checkpointing
        with blocker.attached(model):
            got = param_grads(model, batch)
        model.gradient_checkpointing_disable()
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(
                got[name],
                want[name],
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, n=name, r=reentrant: f"reentrant={r} {n}: {m}",
            )


def test_attach_through_peft_with_and_without_gradient_checkpointing(batch):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen3", seed=0)
    cc = site_crosscoder(base, LAYER, batch)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    peft = get_peft_model(base, config)
    peft.train()
    blocker = GradientBlocker(cc, range(0, 96, 3), mode="subspace")
    plain = param_grads(peft, batch)
    assert plain and all("lora_" in name for name in plain)
    with blocker.attached(peft):
        assert blocker.is_attached and blocker._model is peft.get_base_model()
        want = param_grads(peft, batch)
    check_blocking_pattern(want, plain, LAYER)
    for reentrant in (True, False):
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            peft.enable_input_require_grads()  # frozen embeddings: reentrant checkpoints need an input that requires grad
        with blocker.attached(peft):
            got = param_grads(peft, batch)
        peft.gradient_checkpointing_disable()
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(
                got[name],
                want[name],
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, n=name, r=reentrant: f"reentrant={r} {n}: {m}",
            )


def test_bf16_model_gets_the_weights_in_its_dtype(batch):
    model32 = tiny_model("qwen3", seed=0)
    model = tiny_model("qwen3", seed=0, dtype=torch.bfloat16).train()
    cc = site_crosscoder(model32, LAYER, batch)  # float32 crosscoder
    blocker = GradientBlocker(cc, range(0, 96, 3), mode="sae")
    with torch.no_grad():
        plain = model(**batch).logits
    seen = {}
    handle = decoder_blocks(model)[LAYER].register_forward_pre_hook(
        lambda m, a, k: seen.update(dtype=a[0].dtype), with_kwargs=True
    )
    with blocker.attached(model):
        out = model(**batch)
        out.loss.backward()
    handle.remove()
    assert seen["dtype"] == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    assert list(blocker._cache) == [(torch.device("cpu"), torch.bfloat16)]
    assert all(t is None or t.dtype == torch.bfloat16 for t in blocker._cache[(torch.device("cpu"), torch.bfloat16)])
    torch.testing.assert_close(out.logits.float(), plain.float(), rtol=0.02, atol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_refuses_a_model_of_another_width_layer_or_mode(batch):
    model = tiny_model("qwen3", seed=0)
    cc = site_crosscoder(model, LAYER, batch, names=("base", "sft"))
    narrow = tiny_model("qwen3", seed=0, hidden_size=32)
    blocker = GradientBlocker(cc, [1, 2], model="sft")
    with pytest.raises(ProbeError, match=r"d_model 64.*hidden size is 32"):
        blocker.attach(narrow)
    assert not blocker.is_attached and getattr(narrow, "_posttrain_probe_blocker", None) is None
    with pytest.raises(ProbeError, match="width 64"):
        blocker.apply(torch.randn(2, 32))
    with pytest.raises(ProbeError, match="trained at layer 2"):
        GradientBlocker(cc, [1], model="sft", layer=1)
    assert GradientBlocker(cc, [1], model="sft", layer=LAYER).layer == LAYER
    shallow = tiny_model("qwen3", seed=0, num_layers=2)
    with pytest.raises(ProbeError, match="out of range"):
        GradientBlocker(cc, [1], model="base").attach(shallow)
    with pytest.raises(ProbeError, match=r"'rl'.*\['base', 'sft'\]"):
        GradientBlocker(cc, [1], model="rl")
    with pytest.raises(ProbeError, match="out of range"):
        GradientBlocker(cc, [1], model=2)
    with pytest.raises(ProbeError, match="mode"):
        GradientBlocker(cc, [1], model="base", mode="zero")
    with pytest.raises(ProbeError, match="out of range"):
        GradientBlocker(cc, [0, 96], model="base")
    unplaced = Crosscoder(CrosscoderConfig(model_names=["base"], d_model=64, n_features=8))
    with pytest.raises(ProbeError, match="layer"):
        GradientBlocker(unplaced, [1])
    assert GradientBlocker(unplaced, [1], layer=3).layer == 3


# ---------------------------------------------------------------------------------------------
# feature sets and BlockingArguments
# ---------------------------------------------------------------------------------------------

# decoder norms (base, sft) per feature -> NormRatio ((n_b - n_f) / max + 1) / 2 with max = 1
NORMS = [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (1.0, 0.9), (0.5, 0.2), (0.3, 0.6), (0.0, 0.0), (0.45, 0.55), (0.9, 0.05)]
SHARED, BASE_ONLY, FT_ONLY = [0, 3, 7], [1, 4, 8], [2, 5]  # feature 6 is dead


def categorised_crosscoder(names=("base", "sft"), layer=2, d=8) -> Crosscoder:
    cc = Crosscoder(CrosscoderConfig(model_names=list(names), d_model=d, n_features=len(NORMS), layer=layer))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, norms in enumerate(NORMS):
            for slot, norm in enumerate(norms):
                v = torch.randn(d, generator=gen)
                cc.W_dec[i, slot] = v / v.norm() * norm
        for slot in range(2, len(names)):
            cc.W_dec[:, slot] = 0.1
    return cc


def test_resolve_feature_categories():
    cc = categorised_crosscoder()
    assert resolve_features(cc, "shared") == SHARED
    assert resolve_features(cc, "base-only") == BASE_ONLY
    assert resolve_features(cc, "finetune-only") == FT_ONLY
    assert resolve_features(cc, "base-only", base="base", finetuned="sft") == BASE_ONLY
    assert resolve_features(cc, "base-only", base=0, finetuned=1) == BASE_ONLY
    # the other model as "base": the directions swap
    assert resolve_features(cc, "base-only", base="sft") == FT_ONLY
    assert resolve_features(cc, "finetune-only", base="sft") == BASE_ONLY
    three = categorised_crosscoder(("base", "sft", "rl"))
    with pytest.raises(ProbeError, match="name the fine-tuned one"):
        resolve_features(three, "shared")
    # max over all slots is still 1; the rl slot (norm 0.1 * sqrt(8)) is not the pair's
    assert resolve_features(three, "base-only", base="base", finetuned="sft") == BASE_ONLY
    with pytest.raises(ProbeError, match=r"'dpo'.*\['base', 'sft'\]"):
        resolve_features(cc, "shared", base="dpo")
    with pytest.raises(ProbeError, match=r"'dpo'"):
        resolve_features(cc, "shared", finetuned="dpo")
    with pytest.raises(ProbeError):
        resolve_features(cc, "shared", base="sft", finetuned="sft")


def test_resolve_feature_lists_strings_and_json(tmp_path):
    cc = categorised_crosscoder()
    assert resolve_features(cc, [3, 1, 3]) == [1, 3]
    assert resolve_features(cc, torch.tensor([8, 0])) == [0, 8]
    assert resolve_features(cc, "3,1") == [1, 3]
    assert resolve_features(cc, " 3, 1 ,, 5 ") == [1, 3, 5]
    assert resolve_features(cc, "4") == [4]

    path = write_feature_set(
        tmp_path / "sets" / "mine.json", [8, 2, 2, 5], crosscoder="runs/cc", category="custom", base="base"
    )
    data = json.loads(path.read_text())
    assert data["format"] == "posttrain-probe/feature-set" and data["format_version"] == 1
    assert data["features"] == [2, 2, 5, 8] and data["crosscoder"] == "runs/cc"
    assert data["provenance"] == {"category": "custom", "base": "base"}
    assert load_feature_set(path).features == [2, 2, 5, 8]
    assert resolve_features(cc, path) == [2, 5, 8]
    assert resolve_features(cc, str(path)) == [2, 5, 8]
    # written from a category, read back the same
    written = write_feature_set(tmp_path / "shared.json", resolve_features(cc, "shared"), category="shared")
    assert resolve_features(cc, written) == SHARED
    plain = write_feature_set(tmp_path / "plain.json", [4, 1])  # no crosscoder recorded: accepted as it is
    assert resolve_features(cc, plain) == [1, 4]
    no_suffix = tmp_path / "features.txt"
    no_suffix.write_text(json.dumps({"format": "posttrain-probe/feature-set", "format_version": 1, "features": [7]}))
    assert resolve_features(cc, no_suffix) == [7]


def test_resolve_features_refuses_bad_input(tmp_path):
    cc = categorised_crosscoder()
    with pytest.raises(ProbeError, match=r"shared, base-only, finetune-only"):
        resolve_features(cc, "base_only")
    with pytest.raises(ProbeError, match="empty"):
        resolve_features(cc, [])
    with pytest.raises(ProbeError, match="empty"):
        resolve_features(cc, " , ")
    with pytest.raises(ProbeError):  # "" is Path("") == "." (a directory): "cannot read feature set"
        resolve_features(cc, "")
    with pytest.raises(ProbeError, match=r"out of range.*9 features"):
        resolve_features(cc, [0, 9])
    with pytest.raises(ProbeError, match=r"\[-1\].*out of range"):
        resolve_features(cc, "-1,2")
    with pytest.raises(ProbeError, match="cannot read"):
        resolve_features(cc, tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ProbeError, match="cannot read"):
        resolve_features(cc, broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"features": [1]}))
    with pytest.raises(ProbeError, match="not a feature-set JSON"):
        resolve_features(cc, other)
    empty = write_feature_set(tmp_path / "empty.json", [])
    with pytest.raises(ProbeError, match="empty"):
        resolve_features(cc, empty)
    # a category that selects nothing is an empty set, not a silent no-op
    all_shared = Crosscoder(CrosscoderConfig(model_names=["base", "sft"], d_model=4, n_features=4))
    with pytest.raises(ProbeError, match="empty"):
        resolve_features(all_shared, "base-only")


def test_feature_set_without_features_is_a_probe_error(tmp_path):
    """A feature-set JSON of the right format but without "features" is broken data: ProbeError, not KeyError."""
    path = tmp_path / "fs.json"
    path.write_text(json.dumps({"format": "posttrain-probe/feature-set", "format_version": 1}))
    with pytest.raises(ProbeError, match="features"):
        load_feature_set(path)


def test_blocking_arguments_and_build_blocker(tmp_path):
    cc = categorised_crosscoder(layer=3)
    cc.save_pretrained(tmp_path / "cc")
    blocker = build_blocker(
        BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="base-only", block_mode="subspace")
    )
    assert isinstance(blocker, GradientBlocker)
    assert (
        blocker.features == BASE_ONLY
        and blocker.layer == 3
        and blocker.mode == "subspace"
        and blocker.model_name == "base"
    )
    fs = write_feature_set(tmp_path / "fs.json", [5, 0])
    blocker = build_blocker(
        BlockingArguments(
            block_crosscoder=str(tmp_path / "cc"), block_features=str(fs), block_model="sft", block_layer=3
        )
    )
    assert blocker.features == [0, 5] and blocker.model_name == "sft" and blocker.mode == "sae"
    assert build_blocker(BlockingArguments()) is None and blocking_callback(BlockingArguments()) is None
    callback = blocking_callback(BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="1,2"))
    assert isinstance(callback, GradientBlockingCallback) and callback.blocker.features == [1, 2]

    with pytest.raises(ProbeError, match="block_mode"):
        BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="shared", block_mode="zero")
    with pytest.raises(ProbeError, match="both"):
        BlockingArguments(block_crosscoder=str(tmp_path / "cc"))
    with pytest.raises(ProbeError, match="both"):
        BlockingArguments(block_features="shared")
    with pytest.raises(ProbeError, match="holds no crosscoder"):
        build_blocker(BlockingArguments(block_crosscoder=str(tmp_path / "nothing"), block_features="shared"))
    with pytest.raises(ProbeError, match="trained at layer 3"):
        build_blocker(BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="shared", block_layer=1))
    with pytest.raises(ProbeError, match="'rl'"):
        build_blocker(BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="1", block_model="rl"))
    with pytest.raises(ProbeError, match="shared, base-only, finetune-only"):
        build_blocker(BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="sharde"))
    with pytest.raises(ProbeError, match="out of range"):
        build_blocker(BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="3,17"))

    # a crosscoder of another base model: attaching names the recipe's override flag, and the flag lets it through
    from posttrain_probe.model_identity import model_fingerprint

    prints = [model_fingerprint(tiny_model("qwen3", seed=1)), None]
    Crosscoder(
        CrosscoderConfig(model_names=["base", "sft"], d_model=64, n_features=8, layer=2, model_fingerprints=prints)
    ).save_pretrained(tmp_path / "other")
    args = {"block_crosscoder": str(tmp_path / "other"), "block_features": "1,2"}
    with pytest.raises(ProbeError, match=r"weights differ.*; pass --block_allow_model_mismatch to override$"):
        build_blocker(BlockingArguments(**args)).attach(tiny_model("qwen3", seed=0))
    blocker = build_blocker(BlockingArguments(**args, block_allow_model_mismatch=True))
    with blocker.attached(tiny_model("qwen3", seed=0)):
        assert "weights differ" in blocker.model_mismatch
    with blocker.attached(tiny_model("qwen3", seed=1)):  # the branch's own model: no mismatch left from before
        assert blocker.model_mismatch is None


def test_category_of_the_finetuned_branch_keeps_its_meaning(tmp_path):
    """Protecting the fine-tuned branch's fine-tune-only features: "finetune-only" must still mean
    the features whose decoder lives in the fine-tuned model (docs/methods.md sec. 4 NormRatio, base = the
    base model), not be recomputed with the protected branch as NormRatio's "base"."""
    cc = categorised_crosscoder(("base", "sft"))
    cc.save_pretrained(tmp_path / "cc")
    blocker = build_blocker(
        BlockingArguments(block_crosscoder=str(tmp_path / "cc"), block_features="finetune-only", block_model="sft")
    )
    assert blocker.model_name == "sft"
    assert blocker.features == FT_ONLY, f"got {blocker.features}: the base-only features {BASE_ONLY}?"
    # models named otherwise: the NormRatio base is named explicitly (block_base), the branch separately
    other = categorised_crosscoder(("pre", "post"))
    other.save_pretrained(tmp_path / "other")
    args = dict(block_crosscoder=str(tmp_path / "other"), block_model="post")
    assert (
        build_blocker(BlockingArguments(**args, block_features="finetune-only", block_base="pre")).features == FT_ONLY
    )
    assert (
        build_blocker(
            BlockingArguments(**args, block_features="base-only", block_base="pre", block_finetuned="post")
        ).features
        == BASE_ONLY
    )
    assert build_blocker(BlockingArguments(**args, block_features="1,2")).features == [
        1,
        2,
    ]  # no category: no base needed
    with pytest.raises(ProbeError, match=r"'base'.*\['pre', 'post'\]"):
        build_blocker(BlockingArguments(**args, block_features="shared"))


def test_callback_needs_a_model_and_detaches_after_training(batch):
    cc = site_crosscoder(tiny_model("qwen3", seed=0), LAYER, batch)
    callback = GradientBlockingCallback(GradientBlocker(cc, [1, 2, 3]))
    with pytest.raises(ProbeError, match="no model"):
        callback.on_train_begin(None, None, None)
    model = tiny_model("qwen3", seed=0)
    callback.on_train_begin(None, None, None, model=model)
    assert callback.blocker.is_attached
    callback.on_train_begin(None, None, None, model=model)  # a second train() on the same model: no error
    callback.on_train_end(None, None, None, model=model)
    assert not callback.blocker.is_attached and not decoder_blocks(model)[LAYER]._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# blocked fine-tuning (TRL SFTTrainer)
# ---------------------------------------------------------------------------------------------

SFT_LAYER = 1
PROBE_TEXTS = list(arithmetic_dataset(16, seed=99)["text"])


def sft_run(
    base, out, *, blocker=None, steps=20, optim="adamw_torch", lr=1e-3, gradient_checkpointing=False, reentrant=True
):
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    model = copy.deepcopy(base)
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        optim=optim,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=64,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant} if gradient_checkpointing else None,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=arithmetic_dataset(64, seed=0).select_columns(["messages"]),
        processing_class=tiny_tokenizer(),
    )
    trainer.remove_callback(PrinterCallback)
    if blocker is not None:
        trainer.add_callback(GradientBlockingCallback(blocker))
    trainer.train()
    if blocker is not None:
        assert not blocker.is_attached
    assert not any(block._forward_pre_hooks for block in decoder_blocks(model))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    return model.eval(), losses


def site_acts(model, layer: int) -> torch.Tensor:
    tok = tiny_tokenizer()
    enc = tok(PROBE_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
    keep = enc.attention_mask.bool()
    keep[:, 0] = False  # BOS
    return hidden[keep]


@pytest.fixture(scope="module")
def trained_sae(tmp_path_factory):
    """A ReLU SAE (N=1 crosscoder, branch "base") trained for 300 steps on the tiny base model's
    live activations at SFT_LAYER (FVU ~0.06)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain_probe.activations.live import LiveActivations
    from posttrain_probe.activations.live_config import LiveConfig
    from posttrain_probe.crosscoder import CrosscoderTrainingConfig, train_crosscoder

    base = tiny_model("qwen3", seed=0)
    source = LiveActivations(
        {"base": base},
        arithmetic_dataset(128, seed=5),
        layer=SFT_LAYER,
        tokenizer=tiny_tokenizer(),
        config=LiveConfig(seq_len=64, forward_batch_size=32),
    )
    config = CrosscoderTrainingConfig(
        n_tokens=256 * 300,
        batch_size=256,
        lr=3e-3,
        l1_coefficient=0.5,
        log_every=50,
        checkpoint_every=10_000,
        seed=0,
        mixed_precision="no",
    )
    out = tmp_path_factory.mktemp("sae")
    cc = train_crosscoder(source, CrosscoderConfig(n_features=128), config, out, progress=False)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["fvu"][0] < 0.15 and cc.config.layer == SFT_LAYER and cc.model_names == ["base"]
    return base, cc.eval()


def relative_change(cc, before: torch.Tensor, after: torch.Tensor, features) -> float:
    """Mean over features of ||f_k(after) - f_k(before)|| / ||f_k(before)|| over the probe tokens (per-source codes)."""
    with torch.no_grad():
        a0 = cc.encode_source(before, "base")[:, features]
        a1 = cc.encode_source(after, "base")[:, features]
    return float(((a1 - a0).norm(dim=0) / a0.norm(dim=0)).mean())


def test_blocked_sft_moves_protected_features_less(trained_sae, tmp_path):
    base, cc = trained_sae
    before = site_acts(base, SFT_LAYER)
    with torch.no_grad():
        codes = cc.encode_source(before, "base")
    # the 4 features that carry most of the reconstruction on the probe tokens: mean f_k * ||d_k||
    importance = codes.mean(0) * cc.W_dec[:, 0].detach().norm(dim=-1)
    features = importance.argsort(descending=True)[:4].tolist()
    assert (codes[:, features] > 0).float().mean() > 0.1

    runs = {}
    for name, blocker, gc in [
        ("none", None, False),
        ("sae", GradientBlocker(cc, features, model="base", mode="sae"), False),
        ("subspace", GradientBlocker(cc, features, model="base", mode="subspace"), False),
        ("sae+gc", GradientBlocker(cc, features, model="base", mode="sae"), True),
    ]:
        model, losses = sft_run(base, tmp_path / name, blocker=blocker, gradient_checkpointing=gc)
        runs[name] = (relative_change(cc, before, site_acts(model, SFT_LAYER), features), losses, model)

    moved = {name: run[0] for name, run in runs.items()}
    print("mean relative change of the protected features:", moved)
    for name, (_, losses, _) in runs.items():
        assert losses[-1] < losses[0] - 1.0, (name, losses)  # training still works (6.3 -> 5.0)
        assert losses[-1] < runs["none"][1][-1] + 0.05, (name, losses[-1])
    # Seen: none 0.334, sae 0.157 (2.1x less), subspace 0.075 (4.4x less). The blocker removes the
    # gradient through the site only; AdamW's per-coordinate scaling and the updates of the blocks
    # upstream of the site still move the features ("leakage", paper S E.1), so sae mode (whose J_S
    # has e_k.d_k ~ 0.5 for this L1 SAE) is held to 1.6x.
    assert moved["sae"] < moved["none"] / 1.6, moved
    assert moved["subspace"] < moved["none"] / 2.5, moved
    # gradient checkpointing: the same blocked training
    assert moved["sae+gc"] == pytest.approx(moved["sae"], rel=1e-3), moved
    torch.testing.assert_close(runs["sae+gc"][1], runs["sae"][1], rtol=1e-4, atol=1e-4)
    for (name, p_gc), (_, p) in zip(runs["sae+gc"][2].named_parameters(), runs["sae"][2].named_parameters()):
        torch.testing.assert_close(p_gc, p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_blocked_sft_with_sgd_keeps_the_protected_subspace_of_the_embeddings(tmp_path, gradient_checkpointing):
    """Site 0 = the embedding output: with plain SGD every embedding update is a sum of blocked
    gradients, so in subspace mode it has no component in span{d_k : k in S}, exactly."""
    base = tiny_model("qwen3", seed=0)
    cc = random_crosscoder(("base",), d=64, n_features=64, layer=0, seed=13, dtype=torch.float32)
    features = list(range(0, 64, 4))
    q = orthonormal_basis(cc.W_dec[features, 0].detach()).float()
    assert q.shape == (64, 16)
    embed0 = base.get_input_embeddings().weight.detach().clone()
    moved = {}
    for name, blocker in [("none", None), ("subspace", GradientBlocker(cc, features, model="base", mode="subspace"))]:
        model, losses = sft_run(
            base,
            tmp_path / name,
            blocker=blocker,
            optim="sgd",
            lr=0.1,
            steps=10,
            gradient_checkpointing=gradient_checkpointing,
            reentrant=False,
        )
        assert losses[-1] < losses[0] - 0.5, losses
        delta = model.get_input_embeddings().weight.detach() - embed0
        moved[name] = (float((delta @ q).norm()), float(delta.norm()))
    print("embedding update (in the protected span, total):", moved)
    assert moved["none"][0] > 0.2 * moved["none"][1]
    assert moved["subspace"][1] > 0.5 * moved["none"][1]  # the embeddings still train ...
    assert moved["subspace"][0] < 1e-5 * moved["subspace"][1], moved  # ... outside the protected subspace only
