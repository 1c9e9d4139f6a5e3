"""``pureopt.step``: one pure step returning new parameters and state.

References: torch.optim (its fused kernels bitwise, since the fast path is torch's own call on copies), the
``update`` + ``apply_updates`` path that tests/test_kernels.py and the parity suites check against torch.optim, and
closed forms for the gradients through a step (SGD: ``p' = p - lr * A^T (A p - b)``).
"""

from __future__ import annotations

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import SHAPES, grads_at, make_data, make_params
from _registry import OPTIMIZERS

import pureopt

IDS = [opt_id for opt_id, _ in OPTIMIZERS]
FACTORIES = [f for _, f in OPTIMIZERS]


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_step_equals_update_then_apply_and_leaves_its_inputs_alone(factory):
    dtype = torch.float64
    data = make_data(dtype)
    tx = factory("auto")
    ref_params = make_params(dtype)
    ref_state = tx.init(ref_params)
    params = {k: v.clone() for k, v in ref_params.items()}
    state = tx.init(params)
    for t in range(6):
        g = grads_at(ref_params, t, data)
        updates, ref_state = tx.update(g, ref_state, ref_params)
        ref_params = pureopt.apply_updates(ref_params, updates)

        g = grads_at(params, t, data)
        before = (snapshot(g), snapshot(state), snapshot(params))
        new_params, new_state = pureopt.step(tx, g, state, params)
        assert_unchanged(g, before[0], "grads")
        assert_unchanged(state, before[1], "state")
        assert_unchanged(params, before[2], "params")
        for k in params:
            shares = params[k].numel() and new_params[k].data_ptr() == params[k].data_ptr()
            assert new_params[k] is not params[k] and not shares, k
            assert new_params[k].dtype == dtype
            torch.testing.assert_close(new_params[k], ref_params[k], rtol=1e-12, atol=1e-14, msg=k)
        params, state = new_params, new_state
    for mine, theirs in zip(pureopt.tree.leaves(state), pureopt.tree.leaves(ref_state)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


def sgd_torch(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)


TORCH_FUSED = [
    ("adam", lambda: pureopt.adam(lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True)),
    (
        "adamw",
        lambda: pureopt.adamw(lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True),
    ),
    (
        "sgd",
        lambda: pureopt.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        sgd_torch,
    ),
    (
        "adagrad",
        lambda: pureopt.adagrad(lr=0.05, lr_decay=0.01),
        lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.01, fused=True),
    ),
]


@pytest.mark.bitwise
@pytest.mark.parametrize("make_tx,make_torch", [c[1:] for c in TORCH_FUSED], ids=[c[0] for c in TORCH_FUSED])
def test_step_is_torch_fused_bitwise(make_tx, make_torch):
    """Outside transforms the step is torch's own fused call on copies: the same bits as torch.optim(fused=True),
    AdamW's decoupled decay included, and with some gradients ``None`` on some steps (SGD: zeros instead, as
    torch's fused SGD fails on a parameter whose first gradient comes after the first step)."""
    nones = make_torch is not sgd_torch
    params = make_params(torch.float32)
    data = make_data(torch.float32)
    torch_params = [v.clone().requires_grad_(True) for v in params.values()]
    opt = make_torch(torch_params)
    tx = make_tx()
    state = tx.init(params)
    for t in range(10):
        g = fill(grads_at({k: p.detach() for k, p in zip(params, torch_params)}, t, data), nones)
        for k, p in zip(params, torch_params):
            p.grad = None if g[k] is None else g[k].clone()
        opt.step()
        params, state = pureopt.step(tx, fill(grads_at(params, t, data), nones), state, params)
        for k, p in zip(params, torch_params):
            assert torch.equal(params[k], p.detach()), f"{k} at step {t}"


def fill(grads: dict, nones: bool) -> dict:
    return grads if nones else {k: torch.zeros(SHAPES[k]) if v is None else v for k, v in grads.items()}


# --- traced and differentiated steps: the update + apply_updates path ----------------------------------------------


def _quadratic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    p = torch.randn(4, generator=g, dtype=torch.float64)
    return a, b, p


def _closed_form(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on ``0.5 |a p - b|^2`` and the gradient of ``|p'|^2`` with respect to ``p``."""
    new_p = p - lr * a.T @ (a @ p - b)
    eye = torch.eye(p.numel(), dtype=p.dtype)
    return new_p, 2 * (eye - lr * a.T @ a) @ new_p


def test_step_under_torch_func_grad_differentiates_through_the_update():
    a, b, p0 = _quadratic()
    tx = pureopt.sgd(lr=0.1)

    def after_one_step(p: torch.Tensor) -> torch.Tensor:
        grads = torch.func.grad(lambda q: 0.5 * ((a @ q["w"] - b) ** 2).sum())({"w": p})
        new, _ = pureopt.step(tx, grads, tx.init({"w": p}), {"w": p})
        return (new["w"] ** 2).sum()

    expected_p, expected_grad = _closed_form(a, b, p0, 0.1)
    torch.testing.assert_close(torch.func.grad(after_one_step)(p0), expected_grad, rtol=1e-12, atol=1e-12)
    new, _ = pureopt.step(tx, {"w": a.T @ (a @ p0 - b)}, tx.init({"w": p0}), {"w": p0})
    torch.testing.assert_close(new["w"], expected_p, rtol=1e-12, atol=1e-12)


def test_step_with_plain_autograd_keeps_the_graph():
    a, b, p0 = _quadratic(1)
    p = p0.clone().requires_grad_(True)
    loss = 0.5 * ((a @ p - b) ** 2).sum()
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    tx = pureopt.sgd(lr=0.1)
    new, _ = pureopt.step(tx, {"w": g}, tx.init({"w": p0}), {"w": p})
    assert new["w"].grad_fn is not None
    (new["w"] ** 2).sum().backward()
    _, expected_grad = _closed_form(a, b, p0, 0.1)
    torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "auto"])
def test_step_with_a_learning_rate_that_requires_grad_is_differentiable_in_it(impl):
    """Nothing but the captured ``lr`` requires grad: the fast path sees it resolved and redoes the step on the
    differentiable path. d p' / d lr = -g for SGD."""
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    tx = pureopt.sgd(lr=lr, impl=impl)
    p = {"w": torch.randn(5, dtype=torch.float64)}
    g = {"w": torch.randn(5, dtype=torch.float64)}
    new, _ = pureopt.step(tx, g, tx.init(p), p)
    torch.testing.assert_close(new["w"], p["w"] - 0.1 * g["w"], rtol=1e-12, atol=0)
    new["w"].sum().backward()
    torch.testing.assert_close(lr.grad, -g["w"].sum(), rtol=1e-12, atol=0)


def test_step_under_vmap_matches_torch_per_member():
    """An ensemble of 3 linear models, vmapped over params, grads and state, against torch.optim.Adam per member."""
    members, steps = 3, 4
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(members, 4, generator=gen)
    xs = torch.randn(steps, 8, 4, generator=gen)
    ys = torch.randn(steps, 8, generator=gen)
    tx = pureopt.adam(lr=0.05)

    def loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x @ w - y) ** 2).mean()

    def one(w, state, x, y):
        grads = {"w": torch.func.grad(loss)(w, x, y)}
        new, state = pureopt.step(tx, grads, state, {"w": w})
        return new["w"], state

    state = torch.func.vmap(lambda w: tx.init({"w": w}))(w0)
    w = w0
    for t in range(steps):
        w, state = torch.func.vmap(one, in_dims=(0, 0, None, None))(w, state, xs[t], ys[t])
    for m in range(members):
        p = w0[m].clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=0.05)
        for t in range(steps):
            opt.zero_grad()
            loss(p, xs[t], ys[t]).backward()
            opt.step()
        torch.testing.assert_close(w[m], p.detach(), rtol=1e-5, atol=1e-6)


def test_step_traces_under_compile_without_graph_breaks():
    torch._dynamo.reset()
    tx = pureopt.sgd(lr=0.1, momentum=0.9)
    p0 = {"w": torch.randn(6, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in p0.items()} for _ in range(3)]
    compiled = torch.compile(lambda g, s, p: pureopt.step(tx, g, s, p), fullgraph=True, backend="eager")
    params, state = p0, tx.init(p0)
    for g in grads:
        params, state = compiled(g, state, params)
    torch_params = [v.clone().requires_grad_(True) for v in p0.values()]
    opt = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9)
    for g in grads:
        for p, k in zip(torch_params, p0):
            p.grad = g[k].clone()
        opt.step()
    for p, k in zip(torch_params, p0):
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-14)


def test_step_with_a_bad_tree_raises_and_changes_nothing():
    tx = pureopt.adam(lr=0.1)
    params = {"w": torch.randn(3), "b": torch.randn(2)}
    state = tx.init(params)
    grads = {"w": torch.randn(3), "c": torch.randn(2)}
    before = (snapshot(state), snapshot(params))
    with pytest.raises(ValueError, match=r"at \['b'\] grads is missing"):
        pureopt.step(tx, grads, state, params)
    assert_unchanged(state, before[0], "state")
    assert_unchanged(params, before[1], "params")


def test_step_passes_extra_arguments_to_update():
    """L-BFGS takes ``value_fn`` through ``update``'s extra arguments; with a strong-Wolfe line search it solves a
    2-d quadratic in a few steps: the closed form is ``A^-1 b``."""
    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def value_fn(ps):
        w = ps["w"]
        return 0.5 * w @ a @ w - b @ w, {"w": a @ w - b}

    tx = pureopt.lbfgs(lr=1, line_search_fn="strong_wolfe", tolerance_grad=1e-14, tolerance_change=1e-16)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    state = tx.init(params)
    for _ in range(3):
        _, grads = value_fn(params)
        params, state = pureopt.step(tx, grads, state, params, value_fn=value_fn)
    # to the accuracy of the line search's interpolation
    torch.testing.assert_close(params["w"], torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
