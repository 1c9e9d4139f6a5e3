"""Kernel paths and buffer donation: every impl and the donated path give torch's numbers; selection rules."""

from __future__ import annotations

import pytest
import torch
from _parity import grads_at, make_data, make_params
from _registry import OPTIMIZERS, fused_available

import pureopt
from pureopt.kernels import choose_impl

IDS = [opt_id for opt_id, _ in OPTIMIZERS]
FACTORIES = [f for _, f in OPTIMIZERS]


def _impls(opt_id):
    return ["loop", "foreach", "fused"] if fused_available(opt_id) else ["loop", "foreach"]


CASES = [pytest.param(f, impl, id=f"{i}-{impl}") for i, f in zip(IDS, FACTORIES) for impl in _impls(i)]


@pytest.mark.parametrize("factory,impl", CASES)
def test_donated_step_equals_pure_update(factory, impl):
    """inplace_step (in-place fused / foreach, params updated in the kernel) == update + apply_updates."""
    dtype = torch.float64
    data = make_data(dtype)
    tx = factory(impl)
    pure_params = make_params(dtype)
    pure_state = tx.init(pure_params)
    own_params = {k: v.clone() for k, v in pure_params.items()}
    own_state = pureopt.tree.tree_clone(tx.init(own_params))
    for step in range(8):
        g = grads_at(pure_params, step, data)
        updates, pure_state = tx.update(g, pure_state, pure_params)
        pure_params = pureopt.apply_updates(pure_params, updates)
        before = {k: v for k, v in own_params.items()}
        own_grads = grads_at(own_params, step, data)
        grads_copy = {k: None if v is None else v.clone() for k, v in own_grads.items()}
        own_state = pureopt.inplace_step(tx, own_grads, own_state, own_params)
        for k, v in own_grads.items():  # gradients are read-only even when the state is donated
            assert v is None or torch.equal(v, grads_copy[k]), k
        for k in own_params:
            assert own_params[k] is before[k]  # updated in place, same tensor objects
            torch.testing.assert_close(own_params[k], pure_params[k], rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(pureopt.tree.leaves(own_state), pureopt.tree.leaves(pure_state)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.bitwise
@pytest.mark.parametrize("impl", ["loop", "foreach", "fused"])
def test_donated_step_matches_torch_fused_adamw_bitwise(impl):
    """The donated fused path is torch's own kernel call: identical bits to torch.optim.AdamW(fused=True)."""
    params = make_params(torch.float32)
    data = make_data(torch.float32)
    torch_params = [v.clone().requires_grad_(True) for v in params.values()]
    opt = torch.optim.AdamW(torch_params, lr=0.01, weight_decay=0.1, fused=True)
    tx = pureopt.adamw(lr=0.01, weight_decay=0.1, impl=impl)
    state = tx.init(params)
    for step in range(10):
        g = grads_at({k: t.detach() for k, t in zip(params, torch_params)}, step, data)
        for k, t in zip(params, torch_params):
            t.grad = None if g[k] is None else g[k].clone()
        opt.step()
        state = pureopt.inplace_step(tx, grads_at(params, step, data), state, params)
    for k, t in zip(params, torch_params):
        if impl == "fused":
            assert torch.equal(params[k], t.detach()), k
        else:
            torch.testing.assert_close(params[k], t.detach(), rtol=1e-5, atol=1e-6)


def test_inplace_step_works_on_nn_parameters_and_mixed_dtypes():
    model = torch.nn.Linear(4, 3)
    model.bias.data = model.bias.data.to(torch.bfloat16)
    params = dict(model.named_parameters())
    tx = pureopt.adam(lr=0.1, state_dtype=torch.float32)
    state = tx.init({k: v.detach() for k, v in params.items()})
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    expected = {k: (v.detach().float() - 0.1).to(v.dtype) for k, v in params.items()}  # first Adam step: -lr*sign
    pureopt.inplace_step(tx, grads, state, params)
    for k in params:
        torch.testing.assert_close(params[k].detach(), expected[k], rtol=1e-2, atol=1e-2)
        assert params[k].dtype == expected[k].dtype


def test_auto_picks_fused_then_foreach_then_loop():
    from pureopt.kernels.fused import fused_plan

    plain = [torch.zeros(3), torch.zeros(2)]
    assert fused_plan(plain, plain) == [[0, 1]]
    assert choose_impl("auto", plain, fused_available=True) == "fused"
    assert choose_impl("auto", plain, fused_available=False) == "foreach"
    assert fused_plan(plain, [torch.zeros(3, dtype=torch.complex64)]) is None  # complex state: no fused kernel
    needs_grad = [torch.zeros(3, requires_grad=True)]
    assert fused_plan(needs_grad, needs_grad) is None
    assert choose_impl("auto", needs_grad) == "loop"
    with torch.no_grad():
        assert fused_plan(needs_grad, needs_grad) == [[0]]
        assert choose_impl("auto", needs_grad) == "foreach"
    assert fused_plan([torch.zeros(3).to_sparse()], plain[:1]) is None
    mixed = [torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    assert sorted(fused_plan(mixed, mixed)) == [[0, 2], [1]]  # one kernel call per (device, dtype)
    seen = []

    def probe(x):
        seen.append((fused_plan([x], [x]), choose_impl("auto", [x])))
        return x

    torch.func.vmap(probe)(torch.zeros(2, 3))
    assert seen == [(None, "loop")]


def test_explicit_fused_on_complex_is_a_clear_error():
    tx = pureopt.adam(impl="fused")
    p = {"z": torch.zeros(3, dtype=torch.complex64)}
    with pytest.raises(RuntimeError, match="impl='fused' is not available"):
        tx.update(p, tx.init(p), p)


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_update_traces_without_graph_breaks(factory):
    """Every optimizer's update traces with torch.compile(fullgraph=True) (backend='eager': no codegen)."""
    torch._dynamo.reset()
    tx = factory("auto")
    params = make_params(torch.float32)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)

    @torch.compile(fullgraph=True, backend="eager")
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return pureopt.apply_updates(params, updates), state

    new_params, _ = step(grads, state, params)
    expected, _ = tx.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(new_params[k], params[k] + expected[k])


COMBINED = {
    "chain(clip, adamw)": lambda: pureopt.chain(pureopt.clip_by_global_norm(0.5), pureopt.adamw(lr=0.01)),
    "chain(adam, scale)": lambda: pureopt.chain(pureopt.adam(lr=0.01, amsgrad=True), pureopt.scale(0.5)),
    "chain(sgd, adam)": lambda: pureopt.chain(pureopt.trace(0.9), pureopt.adam(lr=0.01)),
    "partition": lambda: pureopt.partition(
        {"decay": pureopt.adamw(lr=0.01, weight_decay=0.1), "plain": pureopt.sgd(lr=0.05, momentum=0.9)},
        lambda p: {k: "decay" if k.startswith("w") else "plain" for k in p},
    ),
}


@pytest.mark.parametrize("make", COMBINED.values(), ids=COMBINED.keys())
def test_donated_step_through_combinators_equals_pure_update(make):
    """Only the last transform of a chain may apply in place; the result equals the pure path."""
    dtype = torch.float64
    data = make_data(dtype)
    tx = make()
    pure_params = make_params(dtype)
    pure_state = tx.init(pure_params)
    own_params = {k: v.clone() for k, v in pure_params.items()}
    own_state = tx.init(own_params)
    for step in range(6):
        updates, pure_state = tx.update(grads_at(pure_params, step, data), pure_state, pure_params)
        pure_params = pureopt.apply_updates(pure_params, updates)
        own_state = pureopt.inplace_step(tx, grads_at(own_params, step, data), own_state, own_params)
        for k in own_params:
            torch.testing.assert_close(own_params[k], pure_params[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
@pytest.mark.parametrize("impl", ["loop", "foreach", "auto"])
@pytest.mark.parametrize("lr_kind", ["float", "schedule"])
def test_updates_and_state_keep_their_dtypes(factory, impl, lr_kind):
    """A 0-d float32 parameter must not get float64 updates or state from float64 per-tensor scalars."""
    tx = factory(impl)
    if lr_kind == "schedule":
        tx = pureopt.chain(tx, pureopt.scale_by_learning_rate(pureopt.schedules.exponential_decay(1.0, 10, 0.5)))
    params = make_params(torch.float32)
    state = tx.init(params)
    dtypes = [t.dtype for t in pureopt.tree.leaves(state)]
    for _ in range(2):
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        for k, u in updates.items():
            assert u.dtype == params[k].dtype, k
        assert [t.dtype for t in pureopt.tree.leaves(state)] == dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kwargs", [dict(lr=0.05), dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, maximize=True)], ids=["plain", "flags"]
)
def test_fused_adagrad_matches_torch(kwargs, dtype):
    """The pure fused Adagrad path (zero update buffer) against torch.optim.Adagrad."""
    from _parity import run_parity

    run_parity(
        lambda p: torch.optim.Adagrad(p, **kwargs),
        pureopt.adagrad(impl="fused", **kwargs),
        dtype,
        state_keys=["step", "sum"],
        maximize=kwargs.get("maximize", False),
    )


@pytest.mark.bitwise
def test_donated_adagrad_is_torch_fused_adagrad_bitwise():
    params = make_params(torch.float32)
    data = make_data(torch.float32)
    torch_params = [v.clone().requires_grad_(True) for v in params.values()]
    opt = torch.optim.Adagrad(torch_params, lr=0.05, lr_decay=0.01, weight_decay=0.1, fused=True)
    tx = pureopt.adagrad(lr=0.05, lr_decay=0.01, weight_decay=0.1)
    state = tx.init(params)
    for step in range(10):
        g = grads_at({k: t.detach() for k, t in zip(params, torch_params)}, step, data)
        for k, t in zip(params, torch_params):
            t.grad = None if g[k] is None else g[k].clone()
        opt.step()
        state = pureopt.inplace_step(tx, grads_at(params, step, data), state, params)
    for k, t in zip(params, torch_params):
        assert torch.equal(params[k], t.detach()), k
