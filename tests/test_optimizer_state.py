"""crosscoder/state.py: optimizer state saved by one Adam implementation restores into another exactly."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain_probe.crosscoder.state import load_optimizer_tensors, optimizer_tensors


def _trained(fused):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(params, lr=1e-2, fused=fused)
    for _ in range(3):
        opt.zero_grad()
        (params[0].sum() ** 2 + params[1].square().sum()).backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize(("saved", "loaded"), [(None, True), (True, None)])
def test_state_of_another_adam_implementation_restores_and_steps_alike(saved, loaded):
    params, opt = _trained(saved)
    tensors, meta = optimizer_tensors(opt)
    meta = json.loads(json.dumps(meta))  # as written to disk

    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = torch.optim.Adam(twin, lr=1e-2, fused=loaded)
    load_optimizer_tensors(restored, tensors, meta)
    assert restored.param_groups[0]["fused"] is loaded  # this optimizer's implementation, not the saved one
    for a, b in zip(opt.state.values(), restored.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])
    for o, p in ((opt, params), (restored, twin)):  # one more step of each: the same update
        o.zero_grad()
        (p[0].sum() ** 2 + p[1].square().sum()).backward()
        o.step()
    for a, b in zip(params, twin):  # fused and for-each Adam round differently: ~1e-5 here, on updates of ~1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
