"""torch 2.13's CPU ``_fused_sgd_`` leaves bf16 / fp16 tensors of 16 or more elements unchanged (its vectorised
path): ``torch.optim.SGD(fused=True)`` silently does not train them. pureopt must never take that kernel there: the
reference is torch.optim.SGD's foreach implementation, which computes right."""

from __future__ import annotations

import pytest
import torch

import pureopt


def _torch_sgd_run(p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], foreach=True, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_on_low_precision_cpu_tensors_trains_as_torch_foreach(dtype, momentum):
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, generator=g).to(dtype)
    grads = [torch.randn(64, generator=g).to(dtype) for _ in range(5)]
    want = _torch_sgd_run(p0, grads, lr=0.1, momentum=momentum)
    assert not torch.equal(want, p0)
    # the adapter (donated, applied) and the pure path, impl="auto"
    p = torch.nn.Parameter(p0.clone())
    opt = pureopt.TorchOptimizer([p], pureopt.sgd, lr=0.1, momentum=momentum)
    tx = pureopt.sgd(lr=0.1, momentum=momentum)
    q = {"p": p0.clone()}
    state = tx.init(q)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        updates, state = tx.update({"p": grad}, state, q)
        q = pureopt.apply_updates(q, updates)
    # pureopt rounds lr to the parameter's dtype where torch keeps it in float32 (a 1-ulp difference per step that
    # momentum compounds); a kernel that skipped the tensors would be off by the whole trajectory (|want - p0|)
    moved = (want.float() - p0.float()).abs().mean()
    for got in (p.detach(), q["p"]):
        assert (got.float() - want.float()).abs().mean() < 0.05 * moved
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.02)


def test_explicit_fused_sgd_on_bf16_cpu_is_refused_with_the_reason():
    tx = pureopt.sgd(lr=0.1, impl="fused")
    q = {"p": torch.ones(64, dtype=torch.bfloat16)}
    with pytest.raises(RuntimeError, match=r"torch.bfloat16 on cpu"):
        tx.update({"p": torch.ones(64, dtype=torch.bfloat16)}, tx.init(q), q)
