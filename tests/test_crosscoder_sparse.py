"""The sparse BatchTopK training path (``_BatchTopKEncode`` + gather decode + AuxK over the dead features only)
gives the same loss, codes and gradients as the dense formulation of docs/methods.md sec. 3, written out here
independently (dense [B, F] codes, dense matmuls), in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig


def _crosscoder(n_models: int, d: int, n_features: int, k: int, seed: int = 0) -> Crosscoder:
    names = [f"m{i}" for i in range(n_models)]
    cc = Crosscoder(CrosscoderConfig(model_names=names, d_model=d, n_features=n_features, activation="batchtopk", k=k))
    g = torch.Generator().manual_seed(seed)
    cc.reset_parameters(g)
    with torch.no_grad():
        cc.W_enc.add_(0.05 * torch.randn(cc.W_enc.shape, generator=g))  # untied, as after training
        cc.b_enc.copy_(0.1 * torch.randn(n_features, generator=g))
        cc.b_dec.copy_(0.1 * torch.randn(cc.b_dec.shape, generator=g))
        cc.scales.copy_(0.5 + torch.rand(n_models, generator=g))
    return cc.double().train()


def _dense_reference(cc: Crosscoder, x: torch.Tensor, dead: torch.Tensor | None, aux_k: int, aux_coefficient: float):
    """Loss, codes [B, F] of the dense formulation (same parameters, autograd through dense matmuls)."""
    xn = (x * cc.scales[:, None]).flatten(1)
    W_enc, W_dec = cc.W_enc.flatten(0, 1), cc.W_dec.flatten(1)
    acts = F.relu(xn @ W_enc + cc.b_enc)
    scores = acts * cc.W_dec.norm(dim=-1).sum(-1).detach()
    kept = torch.zeros_like(scores).view(-1)
    kept[scores.view(-1).topk(cc.config.k * x.shape[0]).indices] = 1.0
    codes = acts * kept.view_as(acts)
    error = xn - (codes @ W_dec + cc.b_dec.flatten())
    mse = error.pow(2).sum(-1).mean()
    aux = torch.zeros((), dtype=x.dtype)
    if dead is not None and dead.any():
        dead_acts = acts * dead
        top = dead_acts.topk(min(aux_k, int(dead.sum())), dim=-1)
        aux_codes = torch.zeros_like(dead_acts).scatter(1, top.indices, top.values)
        aux = (error.detach() - aux_codes @ W_dec).pow(2).sum(-1).mean()
    return mse + aux_coefficient * aux, mse, aux, codes


def _grads(cc: Crosscoder) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in cc.named_parameters()}
    cc.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("dead_form", [None, "mask", "indices"])
def test_sparse_batchtopk_matches_the_dense_formulation(n_models, dead_form):
    cc = _crosscoder(n_models, d=6, n_features=40, k=3)
    x = torch.randn(16, n_models, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dead_mask = torch.zeros(40, dtype=torch.bool)
    dead_mask[[1, 5, 7, 20, 33, 39]] = True
    dead = {None: None, "mask": dead_mask, "indices": dead_mask.nonzero().squeeze(1)}[dead_form]
    out = cc(x, dead_mask=dead, aux_k=4, aux_coefficient=0.25, threshold_decay=None)
    out.loss.backward()
    got = _grads(cc)
    loss, mse, aux, codes = _dense_reference(cc, x, dead_mask if dead is not None else None, 4, 0.25)
    loss.backward()
    want = _grads(cc)
    # the model sums squared errors in float32 (as in training): float32 tolerance from here on
    close = {"rtol": 1e-5, "atol": 1e-6, "check_dtype": False}
    torch.testing.assert_close(out.loss, loss, **close)
    torch.testing.assert_close(out.mse, mse, **close)
    torch.testing.assert_close(out.sparsity, aux, **close)
    assert out.codes.is_sparse and out.codes._nnz() == 3 * 16
    torch.testing.assert_close(out.codes.to_dense(), codes.detach())
    assert torch.equal(out.fired, (codes > 0).any(0))
    assert out.l0.item() == pytest.approx(float((codes > 0).sum()) / 16)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **close, msg=name)
    if dead is not None:
        assert aux.item() > 0 and got["W_enc"][:, :, dead_mask].abs().sum() > 0


def test_sparse_encoder_backward_passes_input_gradients():
    """dx of the sparse encoder equals the dense one (used when the input itself is optimised)."""
    cc = _crosscoder(2, d=5, n_features=24, k=2)
    x = torch.randn(8, 2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    cc(x, threshold_decay=None).loss.backward()
    got = x.grad.clone()
    x.grad = None
    _dense_reference(cc, x, None, 4, 0.0)[0].backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_empty_dead_set_skips_auxk():
    cc = _crosscoder(2, d=4, n_features=16, k=2)
    x = torch.randn(8, 2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = cc(x, dead_mask=torch.zeros(0, dtype=torch.long))
    assert out.sparsity.item() == 0.0 and out.loss.item() == out.mse.item()
