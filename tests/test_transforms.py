"""Primitives against torch's own utilities or their rule written out."""

from __future__ import annotations

import pytest
import torch

import pureopt


def _run(tx, params, grads):
    return tx.update(grads, tx.init(params), params)[0]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_by_global_norm_matches_torch(max_norm, norm_type):
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(4, generator=gen), "c": None}
    params = {k: torch.zeros(5, 3) if k == "a" else torch.zeros(4) for k in grads}
    ref = [torch.zeros_like(grads["a"], requires_grad=True), torch.zeros_like(grads["b"], requires_grad=True)]
    ref[0].grad, ref[1].grad = grads["a"].clone(), grads["b"].clone()
    torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    out = _run(pureopt.clip_by_global_norm(max_norm, norm_type), params, grads)
    torch.testing.assert_close(out["a"], ref[0].grad)
    torch.testing.assert_close(out["b"], ref[1].grad)
    assert out["c"] is None


def test_clip_by_value_matches_torch():
    g = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    ref = torch.zeros_like(g, requires_grad=True)
    ref.grad = g.clone()
    torch.nn.utils.clip_grad_value_([ref], 0.3)
    out = _run(pureopt.clip(0.3), (g,), (g,))
    torch.testing.assert_close(out[0], ref.grad)


def test_clip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Invalid max_norm value: 0"):
        pureopt.clip_by_global_norm(0)
    with pytest.raises(ValueError, match="Invalid max_delta value: -1"):
        pureopt.clip(-1)


def test_add_decayed_weights_with_mask_function():
    params = {"w": torch.randn(3), "bias": torch.randn(3)}
    grads = {"w": torch.ones(3), "bias": torch.ones(3)}
    tx = pureopt.add_decayed_weights(0.1, mask=lambda p: {k: not k.endswith("bias") for k in p})
    out = _run(tx, params, grads)
    torch.testing.assert_close(out["w"], grads["w"] + 0.1 * params["w"])
    torch.testing.assert_close(out["bias"], grads["bias"])


def test_add_decayed_weights_mask_tree_mismatch_is_named():
    tx = pureopt.add_decayed_weights(0.1, mask={"w": True})
    with pytest.raises(ValueError, match=r"mask do not match the parameters.*\['bias'\]"):
        _run(tx, {"w": torch.ones(1), "bias": torch.ones(1)}, {"w": torch.ones(1), "bias": torch.ones(1)})


def test_add_decayed_weights_needs_params():
    tx = pureopt.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))


def test_scale_by_adam_chain_equals_torch_adam():
    gen = torch.Generator().manual_seed(0)
    params = (torch.randn(6, generator=gen, dtype=torch.float64),)
    tp = params[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([tp], lr=0.02, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)
    tx = pureopt.chain(pureopt.scale_by_adam((0.8, 0.99), 1e-6, amsgrad=True), pureopt.scale_by_learning_rate(0.02))
    state = tx.init(params)
    for _ in range(20):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        tp.grad = g.clone()
        opt.step()
        u, state = tx.update((g,), state, params)
        params = pureopt.apply_updates(params, u)
        torch.testing.assert_close(params[0], tp.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_trace_chain_equals_torch_sgd(nesterov, dampening):
    gen = torch.Generator().manual_seed(0)
    params = (torch.randn(6, generator=gen, dtype=torch.float64),)
    tp = params[0].clone().requires_grad_(True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=nesterov, dampening=dampening)
    tx = pureopt.chain(pureopt.trace(0.9, dampening, nesterov), pureopt.scale_by_learning_rate(0.1))
    state = tx.init(params)
    for _ in range(20):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        tp.grad = g.clone()
        opt.step()
        u, state = tx.update((g,), state, params)
        params = pureopt.apply_updates(params, u)
        torch.testing.assert_close(params[0], tp.detach(), rtol=1e-12, atol=1e-14)


def test_scale_by_learning_rate_forms():
    g = {"a": torch.ones(2)}
    out = _run(pureopt.scale_by_learning_rate(0.5), g, g)
    torch.testing.assert_close(out["a"], torch.full((2,), -0.5))
    out = _run(pureopt.scale_by_learning_rate(torch.tensor(0.25), flip_sign=False), g, g)
    torch.testing.assert_close(out["a"], torch.full((2,), 0.25))
    tx = pureopt.scale_by_learning_rate(lambda n: 1.0 / (1 + torch.as_tensor(n, dtype=torch.float64)))
    state = tx.init(g)
    seen = []
    for _ in range(3):
        u, state = tx.update(g, state)
        seen.append(float(u["a"][0]))
    assert seen == pytest.approx([-1.0, -0.5, -1.0 / 3.0], rel=1e-6)  # fp32 updates
