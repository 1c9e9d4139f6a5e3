"""The pure step compiled with inductor (torch.compile's default backend), not only ``backend="eager"``.

Reference: torch.optim's own classes (for-loop implementation) on the same gradients, with the learning rate
changed before every step; fp32 parity tolerance (rtol 1e-5: inductor fuses and reorders the elementwise math).
Recompiles are counted: a changing lr (a 0-d tensor) and advancing step counts must reuse the first graph.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import pureopt
from pureopt.kernels.materialize import materialize

STEPS = 5
LRS = [0.01 * (1.0 - 0.15 * i) for i in range(STEPS)]
SHAPES = [(16, 8), (8,), (4, 16)]


def _init() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(SHAPES)}


def _grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(SHAPES)}


CASES = [
    ("AdamW", pureopt.adamw, {"weight_decay": 0.1}),
    ("Adam", pureopt.adam, {"amsgrad": True}),
    ("NAdam", pureopt.nadam, {}),
    ("RAdam", pureopt.radam, {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(("cls_name", "factory", "kw"), CASES, ids=[c[0] for c in CASES])
def test_inductor_pure_step_matches_torch_with_a_changing_lr(cls_name: str, factory: Any, kw: dict) -> None:
    torch._dynamo.reset()
    counters.clear()
    lr = torch.tensor(LRS[0], dtype=torch.float64)
    tx = factory(lr=lr, **kw)

    def step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return pureopt.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    params = _init()
    state = tx.init(params)
    ref_params = [v.clone().requires_grad_(True) for v in _init().values()]
    ref = getattr(torch.optim, cls_name)(ref_params, lr=LRS[0], foreach=False, **kw)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(STEPS):
            lr.fill_(LRS[i])
            params, state = compiled(_grads(i), state, params)
            ref.param_groups[0]["lr"] = LRS[i]
            for p, g in zip(ref_params, _grads(i).values()):
                p.grad = g
            ref.step()
            for k, p in zip(params, ref_params):
                torch.testing.assert_close(params[k], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_per_tensor_scalars_are_computed_once_per_step_when_compiled() -> None:
    """The bias corrections reach the elementwise math through ``pureopt::materialize`` (so inductor computes them
    in one small kernel instead of once per vector of every tensor); eager code never calls it."""
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    tx = pureopt.adam(lr=0.01)
    params = _init()
    state = tx.init(params)
    torch.compile(tx.update, fullgraph=True, backend=backend)(_grads(0), state, params)
    assert sum("pureopt.materialize" in s for s in seen) == 2  # step size and sqrt(1 - beta2**t), all tensors at once


def test_materialize_is_an_identity_for_autograd_and_vmap() -> None:
    """Its gradient is the identity (hypergradients through a tensor lr); under vmap it maps per sample."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((materialize(x * 2.0) ** 2).sum(), x)
    torch.testing.assert_close(g, 8.0 * x.detach(), rtol=0, atol=0)
    batched = torch.func.vmap(lambda v: materialize(v.sin()))(x.detach())
    torch.testing.assert_close(batched, x.detach().sin(), rtol=0, atol=0)
