"""The crosscoder model (docs/methods.md sec. 2-3): loss by hand, normalisation folding, per-source codes,
BatchTopK, metrics, save/load, bad input, and the lr / λ schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain_probe.crosscoder import Crosscoder, CrosscoderConfig
from posttrain_probe.crosscoder.schedules import l1_factor, lr_factor
from posttrain_probe.errors import ProbeError


def _random_crosscoder(n_models=2, d=4, n_features=6, activation="relu", seed=0, **kw) -> Crosscoder:
    names = ["base", "ft", "rl"][:n_models]
    cc = Crosscoder(CrosscoderConfig(model_names=names, d_model=d, n_features=n_features, activation=activation, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=g))
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=g))
        cc.b_enc.copy_(torch.randn(cc.b_enc.shape, generator=g))
        cc.b_dec.copy_(torch.randn(cc.b_dec.shape, generator=g))
    return cc


def _raw_batch(batch=32, n_models=2, d=4, norms=(1.0, 10.0), seed=1) -> torch.Tensor:
    """[B, N, d] raw activations whose models have very different typical norms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_models, d, generator=g)
    return x * torch.tensor(norms[:n_models])[None, :, None]


# -- the loss, by hand ----------------------------------------------------------------------------
def test_two_model_loss_by_hand():
    cc = Crosscoder(CrosscoderConfig(model_names=["base", "ft"], d_model=2, n_features=2, activation="relu"))
    assert torch.equal(cc.scales, torch.ones(2))  # normalised units = raw units
    with torch.no_grad():
        # W_enc[m, j, i]: weight from dimension j of model m to feature i.
        cc.W_enc.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, -1.0], [0.0, 0.0]]]))
        cc.b_enc.copy_(torch.tensor([-1.0, 0.0]))
        # W_dec[i, m]: decoder vector d_i^m.
        cc.W_dec.copy_(torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]]]))
        cc.b_dec.copy_(torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # one token: a^base = [1, 2], a^ft = [3, 0]
    # pre_0 = 1*1 + 2*0 + 3*1 + 0*0 - 1 = 3          -> f_0 = 3
    # pre_1 = 1*0 + 2*1 + 3*(-1) + 0*0 + 0 = -1      -> f_1 = ReLU(-1) = 0
    # â^base = 3*[0, 1] + 0*[3, 4] + [1, 0] = [1, 3]  -> error [0, -1],  squared 1
    # â^ft   = 3*[1, 0] + 0*[0, 0] + [2, 4] = [5, 4]  -> error [-2, -4], squared 4 + 16 = 20
    # mse = 1 + 20 = 21 (summed over d and models, one token)
    # l1  = f_0 (||d_0^base|| + ||d_0^ft||) + f_1 (||d_1^base|| + ||d_1^ft||) = 3 (1 + 1) + 0 (5 + 0) = 6
    # loss = mse + λ l1 = 21 + 2 * 6 = 33
    out = cc(x, l1_coefficient=2.0)
    assert out.loss.item() == 33.0
    assert out.mse.item() == 21.0
    assert out.sparsity.item() == 6.0
    assert torch.equal(out.codes, torch.tensor([[3.0, 0.0]]))
    assert torch.equal(out.reconstruction, torch.tensor([[[1.0, 3.0], [5.0, 4.0]]]))
    assert out.l0.item() == 1.0
    # the same numbers through the public encode / decode
    assert torch.equal(cc.encode(x), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(cc.decode(cc.encode(x)), out.reconstruction)
    assert torch.equal(cc.decoder_norm_sum(), torch.tensor([2.0, 5.0]))
    # λ enters linearly: λ = 0 leaves the mse, λ = 1 gives 21 + 6
    assert cc(x, l1_coefficient=0.0).loss.item() == 21.0
    assert cc(x, l1_coefficient=1.0).loss.item() == 27.0


# -- normalisation (docs/methods.md sec. 2) -----------------------------------------------------------------
def test_scales_are_sqrt_d_over_mean_norm():
    cc = _random_crosscoder()
    x = _raw_batch(batch=300)
    batches = list(x.split(64))
    scales = cc.set_scales_from(iter(batches))
    mean_norm = x.double().norm(dim=-1).mean(0)
    expected = (math.sqrt(4) / mean_norm).float()
    torch.testing.assert_close(scales, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(cc.scales, expected, rtol=1e-6, atol=0)
    assert scales[0] / scales[1] > 5  # the large-norm model gets the small scale
    # max_tokens: only the first 100 tokens count (cut inside a batch)
    cc.set_scales_from(iter(batches), max_tokens=100)
    expected_100 = (2.0 / x[:100].double().norm(dim=-1).mean(0)).float()
    torch.testing.assert_close(cc.scales, expected_100, rtol=1e-6, atol=0)
    # after normalisation the mean norm per model is sqrt(d)
    cc.set_scales_from(iter(batches))
    torch.testing.assert_close(cc.normalize(x).norm(dim=-1).mean(0), torch.full((2,), 2.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(cc.denormalize(cc.normalize(x)), x, rtol=1e-6, atol=1e-6)


def test_scales_refuse_empty_or_nonfinite_data():
    cc = _random_crosscoder()
    with pytest.raises(ProbeError, match="empty"):
        cc.set_scales_from(iter([]))
    bad = _raw_batch()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ProbeError, match="finite"):
        cc.set_scales_from(iter([bad]))


def test_encode_decode_forward_fold_the_scales():
    cc = _random_crosscoder()
    x = _raw_batch()
    s = cc.set_scales_from(iter([x]))
    xn = x * s[None, :, None]  # ã^m = s_m a^m
    # f = ReLU(sum_m W_enc^m ã^m + b_enc)
    pre = sum(xn[:, m] @ cc.W_enc[m] for m in range(2)) + cc.b_enc
    codes = torch.relu(pre)
    assert (codes > 0).any() and (codes == 0).any()
    torch.testing.assert_close(cc.encode(x), codes, rtol=1e-5, atol=1e-5)
    # â^m = W_dec^m f + b_dec^m in normalised units; decode returns raw units: â^m / s_m
    recon_n = torch.stack([codes @ cc.W_dec[:, m] + cc.b_dec[m] for m in range(2)], dim=1)
    recon_raw = recon_n / s[None, :, None]
    torch.testing.assert_close(cc.decode(codes), recon_raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.decode(cc.encode(x)), recon_raw, rtol=1e-5, atol=1e-5)
    out = cc(x, l1_coefficient=2.0)
    torch.testing.assert_close(out.reconstruction, recon_raw, rtol=1e-5, atol=1e-5)
    # the loss is in normalised units
    mse = (xn - recon_n).pow(2).sum(dim=(1, 2)).mean()
    l1 = (codes * cc.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
    torch.testing.assert_close(out.mse, mse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sparsity, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, mse + 2.0 * l1, rtol=1e-5, atol=1e-5)
    # changing a scale changes the codes (the scales really are used)
    with torch.no_grad():
        cc.scales.mul_(2)
    assert not torch.allclose(cc.encode(x), codes)


def test_encode_source_is_the_encoder_with_other_slots_zeroed():
    cc = _random_crosscoder(n_models=3)
    x = _raw_batch(n_models=3, norms=(1.0, 5.0, 0.2))
    cc.set_scales_from(iter([x]))
    for m, name in enumerate(["base", "ft", "rl"]):
        only_m = torch.zeros_like(x)
        only_m[:, m] = x[:, m]
        expected = cc.encode(only_m)
        assert (expected > 0).any()
        torch.testing.assert_close(cc.encode_source(x[:, m], name), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cc.encode_source(x[:, m], m), expected, rtol=1e-5, atol=1e-5)
        # and by the docs/methods.md formula: ReLU(W_enc^m s_m a^m + b_enc)
        by_hand = torch.relu((x[:, m] * cc.scales[m]) @ cc.W_enc[m] + cc.b_enc)
        torch.testing.assert_close(cc.encode_source(x[:, m], name), by_hand, rtol=1e-5, atol=1e-5)


# -- BatchTopK -----------------------------------------------------------------------------------
def _batchtopk(k=2, n_features=16, seed=0) -> Crosscoder:
    cc = _random_crosscoder(activation="batchtopk", n_features=n_features, k=k, seed=seed)
    with torch.no_grad():
        cc.b_enc.fill_(10.0)  # every pre-activation positive: exactly k*B can be chosen
    return cc


def test_batchtopk_training_forward_keeps_k_times_batch():
    cc = _batchtopk(k=2)
    x = _raw_batch(batch=8)
    cc.set_scales_from(iter([x]))
    assert cc.threshold.item() < 0  # unset
    cc.train()
    out = cc(x, threshold_decay=0.99)
    assert out.codes.is_sparse  # k·B entries, no dense [B, F] code matrix in training
    codes = out.codes.to_dense()
    assert int((codes > 0).sum()) == 2 * 8
    assert out.l0.item() == 2.0
    # the kept entries are the top k*B of f_i * sum_m ||d_i^m|| over the whole batch
    pre = cc.normalize(x).flatten(1) @ cc.W_enc.flatten(0, 1) + cc.b_enc
    scores = torch.relu(pre) * cc.decoder_norm_sum()
    cutoff = scores.flatten().topk(16).values.min()
    torch.testing.assert_close(codes, torch.relu(pre) * (scores >= cutoff), rtol=1e-6, atol=1e-6)
    # sparse-gather reconstruction == dense codes @ W_dec + b_dec (then raw units)
    dense = (codes @ cc.W_dec.flatten(1) + cc.b_dec.flatten()).view(8, 2, 4)
    torch.testing.assert_close(out.reconstruction, cc.denormalize(dense), rtol=1e-5, atol=1e-5)
    # the threshold is set: the smallest selected score on the first step
    assert cc.threshold.item() >= 0
    torch.testing.assert_close(cc.threshold, cutoff.detach(), rtol=1e-6, atol=1e-6)
    # EMA on the next step
    before = cc.threshold.clone()
    x2 = _raw_batch(batch=8, seed=5)
    cc(x2, threshold_decay=0.5)
    pre2 = cc.normalize(x2).flatten(1) @ cc.W_enc.flatten(0, 1) + cc.b_enc
    cutoff2 = (torch.relu(pre2) * cc.decoder_norm_sum()).flatten().topk(16).values.min()
    torch.testing.assert_close(cc.threshold, 0.5 * before + 0.5 * cutoff2.detach(), rtol=1e-6, atol=1e-6)
    # threshold_decay=None leaves it alone
    now = cc.threshold.clone()
    cc(_raw_batch(batch=8, seed=6), threshold_decay=None)
    assert torch.equal(cc.threshold, now)


def test_batchtopk_with_few_positives_keeps_only_positives():
    cc = _batchtopk(k=4)
    with torch.no_grad():
        cc.b_enc.fill_(-1e4)
        cc.b_enc[:3] = 1e4  # only 3 features can fire
    x = _raw_batch(batch=8)
    cc.train()
    out = cc(x)
    codes = out.codes.to_dense()
    assert int((codes > 0).sum()) == 3 * 8  # < k*B = 32 entries, none of them zero-valued
    assert (codes[:, 3:] == 0).all()
    assert out.fired.tolist() == [True] * 3 + [False] * 13


def test_batchtopk_eval_encode_uses_the_threshold():
    cc = _batchtopk(k=2)
    x = _raw_batch(batch=8)
    cc.eval()
    with pytest.raises(ProbeError, match="threshold"):
        cc.encode(x)
    cc.train()
    cc(x)
    cc.eval()
    pre = cc.normalize(x).flatten(1) @ cc.W_enc.flatten(0, 1) + cc.b_enc
    acts = torch.relu(pre)
    expected = acts * (acts * cc.decoder_norm_sum() > cc.threshold)
    torch.testing.assert_close(cc.encode(x), expected, rtol=1e-6, atol=1e-6)
    # a hand-set threshold: features whose score exceeds it pass, the others are zeroed
    with torch.no_grad():
        cc.threshold.fill_(float((acts * cc.decoder_norm_sum()).median()))
    got = cc.encode(x)
    scores = acts * cc.decoder_norm_sum()
    assert torch.equal(got > 0, scores > cc.threshold)
    assert 0 < int((got > 0).sum()) < got.numel()
    # eval-mode forward uses the same codes and reports no AuxK term
    out = cc(x, dead_mask=torch.ones(16, dtype=torch.bool))
    torch.testing.assert_close(out.codes, got)
    assert out.sparsity.item() == 0.0
    # encode_source too
    src = cc.encode_source(x[:, 1], "ft")
    pre_ft = (x[:, 1] * cc.scales[1]) @ cc.W_enc[1] + cc.b_enc
    a = torch.relu(pre_ft)
    torch.testing.assert_close(src, a * (a * cc.decoder_norm_sum() > cc.threshold))


def test_batchtopk_auxk_and_gradients():
    cc = _batchtopk(k=2)
    x = _raw_batch(batch=8)
    cc.set_scales_from(iter([x]))
    cc.train()
    none_dead = cc(x, dead_mask=torch.zeros(16, dtype=torch.bool), aux_k=4)
    assert none_dead.sparsity.item() == 0.0
    assert none_dead.loss.item() == none_dead.mse.item()
    no_mask = cc(x, dead_mask=None)
    assert no_mask.sparsity.item() == 0.0
    dead = torch.zeros(16, dtype=torch.bool)
    dead[8:] = True
    out = cc(x, dead_mask=dead, aux_k=4, aux_coefficient=0.5)
    assert out.sparsity.item() > 0
    torch.testing.assert_close(out.loss, out.mse + 0.5 * out.sparsity)
    # AuxK by hand: the top 4 dead features per token reconstruct the residual error (normalised units)
    xn = cc.normalize(x)
    pre = xn.flatten(1) @ cc.W_enc.flatten(0, 1) + cc.b_enc
    error = xn.flatten(1) - (out.codes.to_dense() @ cc.W_dec.flatten(1) + cc.b_dec.flatten())
    dead_acts = torch.relu(pre) * dead
    top = dead_acts.topk(4, dim=-1)
    aux_codes = torch.zeros_like(dead_acts).scatter(1, top.indices, top.values)
    aux = (error - aux_codes @ cc.W_dec.flatten(1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.sparsity, aux, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        grad = getattr(cc, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the AuxK loss alone reaches the dead features' encoder columns
    cc.zero_grad()
    cc(x, dead_mask=dead, aux_k=4).sparsity.backward()
    assert cc.W_enc.grad[:, :, 8:].abs().sum() > 0


def test_relu_gradients_reach_every_parameter():
    cc = _random_crosscoder()
    x = _raw_batch()
    cc.set_scales_from(iter([x]))
    cc(x).loss.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        grad = getattr(cc, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert cc.scales.grad is None and not cc.scales.requires_grad


# -- metrics -------------------------------------------------------------------------------------
def test_fvu_and_l0_match_direct_computation():
    cc = _random_crosscoder(n_models=3, n_features=12)
    x = _raw_batch(batch=64, n_models=3, norms=(1.0, 3.0, 0.5))
    s = cc.set_scales_from(iter([x]))
    out = cc(x)
    xn = x * s[None, :, None]
    recon_n = out.reconstruction * s[None, :, None]
    for m in range(3):
        num = (xn[:, m] - recon_n[:, m]).pow(2).sum()
        den = (xn[:, m] - xn[:, m].mean(0)).pow(2).sum()
        torch.testing.assert_close(out.fvu[m], num / den, rtol=1e-4, atol=1e-6)
    assert out.fvu.shape == (3,)
    expected_l0 = (out.codes > 0).sum(-1).float().mean()
    assert out.l0.item() == expected_l0.item()
    assert 0 < out.l0.item() < 12
    # a perfect reconstruction has FVU 0
    perfect = _random_crosscoder(n_models=2, d=4, n_features=8)
    with torch.no_grad():
        eye = torch.eye(8).view(8, 2, 4)
        perfect.W_dec.copy_(eye)
        perfect.W_enc.copy_(eye.permute(1, 2, 0))
        perfect.b_enc.fill_(100.0)
        perfect.b_dec.copy_(-100.0 * eye.sum(0))
    y = _raw_batch(batch=16)
    o = perfect(y)
    torch.testing.assert_close(o.reconstruction, y, rtol=1e-4, atol=1e-4)
    assert (o.fvu < 1e-6).all()
    assert o.l0.item() == 8.0


# -- save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_save_and_load_round_trip(tmp_path, activation):
    cc = _random_crosscoder(n_models=3, activation=activation, n_features=10, k=3, layer=5)
    x = _raw_batch(batch=16, n_models=3, norms=(1.0, 2.0, 7.0))
    cc.set_scales_from(iter([x]))
    if activation == "batchtopk":
        cc.train()
        cc(x)
    cc.eval()
    cc.save_pretrained(tmp_path / "cc")
    assert (tmp_path / "cc" / "config.json").exists() and (tmp_path / "cc" / "model.safetensors").exists()
    loaded = Crosscoder.from_pretrained(tmp_path / "cc")
    assert isinstance(loaded.config, CrosscoderConfig)
    assert loaded.config == cc.config
    assert loaded.model_names == ["base", "ft", "rl"] and loaded.config.activation == activation
    assert loaded.config.k == 3 and loaded.config.layer == 5
    for name, tensor in cc.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not torch.equal(loaded.scales, torch.ones(3))
    if activation == "batchtopk":
        assert loaded.threshold.item() >= 0
    loaded.eval()
    assert torch.equal(loaded.encode(x), cc.encode(x))
    assert torch.equal(loaded.encode_source(x[:, 2], "rl"), cc.encode_source(x[:, 2], "rl"))


def test_loading_and_restricting_skip_the_paper_init(tmp_path, monkeypatch):
    """Every tensor of a loaded (or restricted) crosscoder comes from the file (or the full one), so the random init
    is not run: it costs seconds and a decoder copy at real shapes. A file missing a tensor is still refused."""
    from safetensors.torch import load_file, save_file

    cc = _random_crosscoder(n_models=2, n_features=10, layer=5)
    cc.save_pretrained(tmp_path / "cc")

    def no_init(self, generator=None):
        raise AssertionError("reset_parameters ran on load")

    monkeypatch.setattr(Crosscoder, "reset_parameters", no_init)
    loaded = Crosscoder.from_pretrained(tmp_path / "cc")
    for name, tensor in cc.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    sub = cc.restrict([7, 2])
    assert torch.equal(sub.W_enc, cc.W_enc[:, :, [7, 2]]) and torch.equal(sub.W_dec, cc.W_dec[[7, 2]])
    tensors = load_file(tmp_path / "cc" / "model.safetensors")
    del tensors["b_enc"]
    save_file(tensors, tmp_path / "cc" / "model.safetensors")
    with pytest.raises(RuntimeError, match="b_enc"):
        Crosscoder.from_pretrained(tmp_path / "cc")


def test_load_refuses_a_newer_format(tmp_path):
    cc = _random_crosscoder()
    cc.save_pretrained(tmp_path / "cc")
    config_file = tmp_path / "cc" / "config.json"
    data = json.loads(config_file.read_text())
    assert data["format_version"] == 1
    data["format_version"] = 2
    config_file.write_text(json.dumps(data))
    with pytest.raises(ProbeError, match="format version 2"):
        Crosscoder.from_pretrained(tmp_path / "cc")


# -- bad input -----------------------------------------------------------------------------------
def test_wrong_input_shapes_name_the_expected_shape():
    cc = _random_crosscoder()  # 2 models, d = 4
    for bad in (torch.zeros(5, 3, 4), torch.zeros(5, 2, 5), torch.zeros(2, 4), torch.zeros(1, 5, 2, 4)):
        for call in (cc.encode, cc, lambda t: cc.set_scales_from(iter([t]))):
            with pytest.raises(ProbeError, match=r"\[batch, 2, 4\]") as info:
                call(bad)
            assert str(tuple(bad.shape)) in str(info.value)
    with pytest.raises(ProbeError, match=r"\[batch, 4\]"):
        cc.encode_source(torch.zeros(5, 5), "base")
    with pytest.raises(ProbeError, match=r"\[batch, 4\]"):
        cc.encode_source(torch.zeros(5, 2, 4), "base")


def test_unknown_model_names_list_the_known_ones():
    cc = _random_crosscoder()
    with pytest.raises(ProbeError) as info:
        cc.encode_source(torch.zeros(3, 4), "rl")
    assert "'rl'" in str(info.value) and "['base', 'ft']" in str(info.value)
    with pytest.raises(ProbeError, match="out of range"):
        cc.encode_source(torch.zeros(3, 4), 2)
    with pytest.raises(ProbeError):
        cc.model_index(-1)


def test_bad_configs_are_refused():
    with pytest.raises(ProbeError, match="distinct"):
        CrosscoderConfig(model_names=["base", "base"], d_model=4)
    with pytest.raises(ProbeError, match="distinct"):
        CrosscoderConfig(model_names=["base", ""], d_model=4)
    with pytest.raises(ProbeError, match="'topk'"):
        CrosscoderConfig(model_names=["base"], d_model=4, activation="topk")
    with pytest.raises(ProbeError, match="n_features"):
        CrosscoderConfig(model_names=["base"], d_model=4, n_features=0)
    with pytest.raises(ProbeError, match="k >= 1"):
        CrosscoderConfig(model_names=["base"], d_model=4, k=0)
    with pytest.raises(ProbeError, match="newer"):
        CrosscoderConfig(model_names=["base"], d_model=4, format_version=2)
    # a config without width or names cannot build a model
    with pytest.raises(ProbeError, match="d_model"):
        Crosscoder(CrosscoderConfig(model_names=["base"], d_model=0))
    with pytest.raises(ProbeError, match="model names"):
        Crosscoder(CrosscoderConfig(d_model=4))


def test_single_model_is_a_plain_sae():
    cc = _random_crosscoder(n_models=1)
    x = _raw_batch(n_models=1, norms=(3.0,))
    cc.set_scales_from(iter([x]))
    torch.testing.assert_close(cc.encode(x), cc.encode_source(x[:, 0], "base"))
    assert cc(x).reconstruction.shape == x.shape


def test_paper_init():
    cc = Crosscoder(CrosscoderConfig(model_names=["a", "b", "c"], d_model=8, n_features=20))
    norms = cc.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((20, 3), 0.08))
    assert torch.equal(cc.W_enc, cc.W_dec.permute(1, 2, 0))
    assert (cc.b_enc == 0).all() and (cc.b_dec == 0).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cc.reset_parameters(g1)
    first = cc.W_dec.clone()
    cc.reset_parameters(g2)
    assert torch.equal(cc.W_dec, first)


# -- schedules -----------------------------------------------------------------------------------
def test_lr_and_l1_schedules():
    total = 100
    # lr: 1 for the first 80%, then linear to 0 over the last 20%
    assert [lr_factor(s, total, 0.2) for s in (0, 50, 79, 80, 90, 95, 99, 100)] == pytest.approx(
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.05, 0.0]
    )
    assert lr_factor(99, total, 0.0) == 1.0
    assert lr_factor(0, total, 1.0) == 1.0 and lr_factor(50, total, 1.0) == pytest.approx(0.5)
    # λ: linear from 0 to 1 over the first 5%
    assert [l1_factor(s, total, 0.05) for s in (0, 1, 2, 4, 5, 6, 99)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    )
    assert l1_factor(0, total, 0.0) == 1.0
    # non-round totals: monotone and in [0, 1]
    lrs = [lr_factor(s, 37, 0.2) for s in range(37)]
    l1s = [l1_factor(s, 37, 0.05) for s in range(37)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and all(0 < v <= 1 for v in lrs)
    assert all(a <= b for a, b in zip(l1s, l1s[1:])) and l1s[0] == 0 and l1s[-1] == 1
