"""``pureopt.step(..., donate=...)``: the caller hands its parameters and/or state over to be reused.

References: torch.optim with ``fused=True`` (bitwise: a donated step is torch's own fused call on the caller's
tensors, or on copies of the part not donated), the ``update`` + ``apply_updates`` path (checked against
torch.optim by the parity suites) for every registry configuration, and the inputs' own bits for what must stay
untouched (non-donated trees; everything when a donation is refused or cannot be honoured).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import grads_at, make_data, make_params
from _registry import OPTIMIZERS

import pureopt

SHAPES = [(4, 16), (64,), (2, 32)]  # multiples of 64 elements: no scalar tail (bitwise on AVX2 and AVX-512)


def _init(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(SHAPES)}


def _grads(t: int) -> dict[str, torch.Tensor]:
    return _init(100 + t)


def _moment_ptrs(state: Any) -> list[int]:
    """Where the per-parameter moments live (0-d counters may be new tensors even in place)."""
    return [x.data_ptr() for x in pureopt.tree.leaves(state) if x.dim() > 0]


@pytest.mark.bitwise
@pytest.mark.parametrize("donate", [("params", "state"), ("state",), ("params",), "state"], ids=str)
def test_donated_step_is_torch_fused_and_reuses_what_was_donated(donate: Any) -> None:
    donated = {donate} if isinstance(donate, str) else set(donate)
    tx = pureopt.adamw(lr=0.01, weight_decay=0.1)
    params = _init()
    state = tx.init(params)
    ref = [p.clone().requires_grad_(True) for p in params.values()]
    opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, fused=True)
    for t in range(4):
        grads = _grads(t)
        p_ptrs = [p.data_ptr() for p in params.values()]
        s_ptrs = _moment_ptrs(state)
        before = (snapshot(grads), snapshot(params), snapshot(state))
        new_params, new_state = pureopt.step(tx, grads, state, params, donate=donate)
        assert_unchanged(grads, before[0], "grads")
        if "params" not in donated:
            assert_unchanged(params, before[1], "params")
        if "state" not in donated:
            assert_unchanged(state, before[2], "state")
        assert ([p.data_ptr() for p in new_params.values()] == p_ptrs) == ("params" in donated)
        assert (_moment_ptrs(new_state) == s_ptrs) == ("state" in donated)
        for p, g in zip(ref, grads.values()):
            p.grad = g
        opt.step()
        for k, p in zip(new_params, ref):
            assert torch.equal(new_params[k].view(torch.int32), p.detach().view(torch.int32)), f"{k} @ {t}"
        params, state = new_params, new_state


@pytest.mark.parametrize("opt_id,factory", OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_donating_the_state_equals_update_then_apply(opt_id: str, factory: Any) -> None:
    """fp64; the parameters (not donated) stay bitwise unchanged; rtol 1e-12 against the two-line pure step (the
    donated path runs torch's in-place kernels, whose op order can differ from the out-of-place one in the last
    bits)."""
    dtype = torch.float64
    data = make_data(dtype)
    tx = factory("auto")
    ref_params = make_params(dtype)
    ref_state = tx.init(ref_params)
    params = {k: v.clone() for k, v in ref_params.items()}
    state = tx.init(params)
    for t in range(4):
        g = grads_at(ref_params, t, data)
        updates, ref_state = tx.update(g, ref_state, ref_params)
        ref_params = pureopt.apply_updates(ref_params, updates)
        g = grads_at(params, t, data)
        before = snapshot(params)
        new_params, state = pureopt.step(tx, g, state, params, donate="state")
        assert_unchanged(params, before, "params")
        for k in params:
            torch.testing.assert_close(new_params[k], ref_params[k], rtol=1e-12, atol=1e-14, msg=f"{k} @ {t}")
        params = new_params


def test_refused_donations_change_nothing() -> None:
    tx = pureopt.adam(lr=0.01)
    params = _init()
    state = tx.init(params)
    grads = _grads(0)
    before = snapshot((grads, state, params))
    with pytest.raises(ValueError, match="cannot donate 'grads'"):
        pureopt.step(tx, grads, state, params, donate=("grads",))
    shared = state._replace(step={k: state.step["p0"] for k in state.step})  # one step tensor for three params
    with pytest.raises(ValueError, match=r"donated state.*is the same memory as state"):
        pureopt.step(tx, grads, shared, params, donate="state")
    with pytest.raises(ValueError, match=r"the gradient at \['p1'\] is the same memory as donated params\['p1'\]"):
        pureopt.step(tx, {**grads, "p1": params["p1"]}, state, params, donate="params")
    assert_unchanged((grads, state, params), before, "inputs")


def test_donation_is_not_honoured_where_the_step_cannot_run_in_place() -> None:
    """Inside vmap, and while autograd records through a parameter, the donated trees stay as they were and the
    result is the two-line pure step's."""
    tx = pureopt.adam(lr=0.01)
    params = _init()
    state = tx.init(params)
    grads = _grads(0)
    updates, _ = tx.update(grads, state, params)
    ref_params = pureopt.apply_updates(params, updates)
    before = snapshot((state, params))
    stacked = lambda tree: pureopt.tree.tree_map(lambda x: torch.stack([x, x]), tree)
    step = lambda g, s, p: pureopt.step(tx, g, s, p, donate=("params", "state"))
    new_params, _ = torch.func.vmap(step)(stacked(grads), stacked(state), stacked(params))
    for k in params:  # per-tensor ops under vmap, fused ones in the reference: a few ulps apart
        torch.testing.assert_close(new_params[k][1], ref_params[k], rtol=1e-6, atol=1e-7)
    recorded = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    new_params, _ = step(grads, state, recorded)
    assert all(v.grad_fn is not None for v in new_params.values())
    for k in params:
        torch.testing.assert_close(new_params[k].detach(), ref_params[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(recorded[k].detach(), params[k])
    assert_unchanged((state, params), before, "inputs")


def test_a_donated_step_with_a_hyperparameter_that_requires_grad_raises() -> None:
    lr = torch.tensor(0.01, requires_grad=True)
    tx = pureopt.sgd(lr=lr, momentum=0.9)
    params = _init()
    state = tx.init(params)
    with pytest.raises(RuntimeError, match=r"requires grad.*donated"):
        pureopt.step(tx, _grads(0), state, params, donate="state")
    new_params, _ = pureopt.step(tx, _grads(0), tx.init(params), params)  # not donated: differentiable
    assert new_params["p0"].grad_fn is not None
