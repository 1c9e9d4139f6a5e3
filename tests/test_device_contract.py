"""Device-independent contracts checked on the CPU: what lets a step run on a GPU without host syncs.

A step on ``meta`` tensors (shapes and dtypes, no values) fails at the first read of a tensor's value
(``.item()``, ``bool(t)``, ``.tolist()``, a copy to the CPU): exactly the reads that synchronise a CUDA stream and
that a CUDA graph cannot capture. So every optimizer's pure update, donated step, ``pureopt.step`` and
``TorchOptimizer.step`` running on meta tensors — with a float lr and with a tensor lr on the parameters' device —
is the CPU-side check of tests/test_cuda.py's ``set_sync_debug_mode("error")`` test. (CPU tensors do read
per-tensor scalars to the host on purpose, see ``kernels.common.on_host``; meta and CUDA tensors never do.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _device import _TestDevice
from _registry import CONFIGS

import pureopt

META = torch.device("meta")
CASES = [*CONFIGS, ("muon", pureopt.muon, dict(lr=0.02))]


def _meta_params() -> dict[str, torch.Tensor]:
    return {"w": torch.empty(5, 3, device=META), "v": torch.empty(4, 6, device=META)}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize(("name", "factory", "kw"), CASES, ids=[c[0] for c in CASES])
def test_steps_read_no_tensor_values(name: str, factory: Callable[..., Any], kw: dict, tensor_lr: bool) -> None:
    lr = torch.full((), float(kw["lr"]), device=META) if tensor_lr else kw["lr"]
    tx = factory(**{**kw, "lr": lr})
    params = _meta_params()
    grads = {k: torch.empty_like(v) for k, v in params.items()}
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        params, state = pureopt.step(tx, grads, state, params)
        state = pureopt.inplace_step(tx, grads, state, params)
    assert all(p.device == META for p in params.values())
    ps = [torch.empty(5, 3, device=META, requires_grad=True), torch.empty(2, 4, device=META, requires_grad=True)]
    opt = pureopt.TorchOptimizer(ps, factory, **{**kw, "lr": lr})
    for p in ps:
        p.grad = torch.empty_like(p)
    for i in range(2):
        if not tensor_lr:
            opt.param_groups[0]["lr"] = float(kw["lr"]) * 0.5**i
        opt.step()
    assert all(v.device == META for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_test_device_mode_puts_factories_on_the_device() -> None:
    """tests/_device.py's mode (what ``PUREOPT_TEST_DEVICE`` enters for a whole run), tried with ``meta``: factories
    without a device land there (also one given a CPU generator, which is drawn on the CPU and moved; ``meta``
    has no values to compare, the numbers are those of the CPU draw by construction); an explicit device wins."""
    mode = _TestDevice(META)
    mode.__enter__()
    try:
        drawn = torch.randn(4, generator=torch.Generator().manual_seed(3))
        plain = torch.zeros(2)
        pinned = torch.ones(2, device="cpu")
    finally:
        mode.__exit__(None, None, None)
    assert drawn.device == META and plain.device == META and pinned.device.type == "cpu"
    assert torch.zeros(1).device.type == "cpu"  # the mode is gone again
