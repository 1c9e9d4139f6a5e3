"""sgd / adam / adamw against torch.optim itself, flag for flag, 25 steps, fp64 and fp32."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import make_params, run_parity
from hypothesis import given, settings
from hypothesis import strategies as st

import pureopt

DTYPES = [torch.float64, torch.float32]
IMPLS = ["loop", "foreach", "fused"]

SGD_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True])
    if not (n and (m == 0 or d != 0))
]
ADAM_GRID = [
    dict(amsgrad=a, weight_decay=wd, maximize=mx, decoupled_weight_decay=dw)
    for a, wd, mx, dw in itertools.product([False, True], [0.0, 0.1], [False, True], [False, True])
]
ADAMW_GRID = [
    dict(amsgrad=a, weight_decay=wd, maximize=mx)
    for a, wd, mx in itertools.product([False, True], [0.0, 0.1], [False, True])
]


def _init(params, flags):
    tx = pureopt.sgd(lr=0.05, **flags)
    return tx.init(params), params


def _id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SGD_GRID, ids=_id)
def test_sgd_matches_torch(flags, dtype, impl):
    if impl == "fused" and flags["momentum"] != 0 and flags["dampening"] != 0:
        with pytest.raises(RuntimeError, match="impl='fused' is not available"):
            pureopt.sgd(lr=0.05, impl=impl, **flags).update({"w": torch.ones(2)}, *_init({"w": torch.ones(2)}, flags))
        return
    run_parity(
        lambda p: torch.optim.SGD(p, lr=0.05, **flags),
        pureopt.sgd(lr=0.05, impl=impl, **flags),
        dtype,
        state_keys=["momentum_buffer"],
        maximize=flags["maximize"],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAM_GRID, ids=_id)
def test_adam_matches_torch(flags, dtype, impl):
    run_parity(
        lambda p: torch.optim.Adam(p, lr=0.01, **flags),
        pureopt.adam(lr=0.01, impl=impl, **flags),
        dtype,
        state_keys=["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        maximize=flags["maximize"],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAMW_GRID, ids=_id)
def test_adamw_matches_torch(flags, dtype, impl):
    run_parity(
        lambda p: torch.optim.AdamW(p, lr=0.01, **flags),
        pureopt.adamw(lr=0.01, impl=impl, **flags),
        dtype,
        state_keys=["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        maximize=flags["maximize"],
    )


def test_adamw_default_weight_decay_matches_torch():
    run_parity(torch.optim.AdamW, pureopt.adamw(), torch.float64, state_keys=["exp_avg", "exp_avg_sq"])


def test_sgd_defaults_match_torch():
    run_parity(torch.optim.SGD, pureopt.sgd(), torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 0.2),
    momentum=st.floats(0.0, 0.99),
    dampening=st.floats(0.0, 0.9),
    weight_decay=st.floats(0.0, 0.5),
    nesterov=st.booleans(),
    maximize=st.booleans(),
)
def test_sgd_hypothesis(lr, momentum, dampening, weight_decay, nesterov, maximize):
    if nesterov:
        dampening = 0.0
        momentum = max(momentum, 0.1)
    flags = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    run_parity(
        lambda p: torch.optim.SGD(p, lr=lr, maximize=maximize, **flags),
        pureopt.sgd(lr=lr, maximize=maximize, **flags),
        torch.float64,
        state_keys=["momentum_buffer"],
        maximize=maximize,
    )


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-2),
    weight_decay=st.floats(0.0, 0.5),
    amsgrad=st.booleans(),
    decoupled=st.booleans(),
    maximize=st.booleans(),
)
def test_adam_hypothesis(lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, maximize):
    flags = dict(
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled,
    )
    run_parity(
        lambda p: torch.optim.Adam(p, lr=lr, **flags),
        pureopt.adam(lr=lr, **flags),
        torch.float64,
        state_keys=["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        maximize=maximize,
    )


# --- learning rate as a tensor or a schedule


def test_tensor_lr_matches_torch_and_is_read_at_each_update():
    lr = torch.tensor(0.01, dtype=torch.float64)
    torch_lr = torch.tensor(0.01, dtype=torch.float64)

    def before(step, opt):
        if step == 10:
            torch_lr.fill_(0.003)
            lr.fill_(0.003)  # pureopt reads the tensor at every update

    run_parity(
        lambda p: torch.optim.Adam(p, lr=torch_lr),
        pureopt.adam(lr=lr),
        torch.float64,
        state_keys=["exp_avg"],
        before_step=before,
    )


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_schedule_lr_matches_torch_with_manual_lr(name):
    def schedule(count):
        return 0.05 * 0.9 ** torch.as_tensor(count, dtype=torch.float64)

    def before(step, opt):
        opt.param_groups[0]["lr"] = 0.05 * 0.9**step

    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    extra = {"momentum": 0.9} if name == "sgd" else {}
    run_parity(
        lambda p: torch_cls(p, lr=0.05, **extra),
        getattr(pureopt, name)(lr=schedule, **extra),
        torch.float64,
        before_step=before,
    )


# --- complex parameters


@pytest.mark.parametrize("name,kwargs", [("adam", {"amsgrad": True}), ("adamw", {}), ("sgd", {"momentum": 0.9})])
def test_complex_params_match_torch(name, kwargs):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    tp = p0.clone().requires_grad_(True)
    opt = getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[name])([tp], lr=0.01, **kwargs)
    tx = getattr(pureopt, name)(lr=0.01, **kwargs)
    params = (p0.clone(),)
    state = tx.init(params)
    for _ in range(25):
        g = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
        tp.grad = g.clone()
        opt.step()
        updates, state = tx.update((g,), state, params)
        params = pureopt.apply_updates(params, updates)
        torch.testing.assert_close(params[0], tp.detach(), rtol=1e-10, atol=1e-12)


# --- validation messages are torch.optim's

BAD_ARGS = [
    ("SGD", "sgd", dict(lr=-1.0)),
    ("SGD", "sgd", dict(lr=0.1, momentum=-0.5)),
    ("SGD", "sgd", dict(lr=0.1, weight_decay=-1e-3)),
    ("SGD", "sgd", dict(lr=0.1, nesterov=True)),
    ("SGD", "sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("SGD", "sgd", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", "adam", dict(lr=-0.5)),
    ("Adam", "adam", dict(eps=-1.0)),
    ("Adam", "adam", dict(betas=(1.0, 0.999))),
    ("Adam", "adam", dict(betas=(0.9, -0.1))),
    ("Adam", "adam", dict(weight_decay=-0.1)),
    ("AdamW", "adamw", dict(lr=-1e-3)),
    ("AdamW", "adamw", dict(betas=(0.9, 1.5))),
]


@pytest.mark.parametrize("torch_name,name,kwargs", BAD_ARGS, ids=lambda v: str(v))
def test_invalid_hyperparameters_use_torch_wording(torch_name, name, kwargs):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, torch_name)([p], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        getattr(pureopt, name)(**kwargs)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="Invalid impl: 'fast'"):
        pureopt.adam(impl="fast")


def test_foreach_impl_under_vmap_is_a_clear_error():
    tx = pureopt.sgd(lr=0.1, momentum=0.9, impl="foreach")
    params = {"w": torch.zeros(3, 2)}
    state = torch.func.vmap(tx.init)(params)
    with pytest.raises(RuntimeError, match="impl='foreach' cannot run here"):
        torch.func.vmap(tx.update)({"w": torch.ones(3, 2)}, state, params)


# --- purity: update never mutates its inputs

ALL_OPTIMIZERS = (
    [pytest.param(pureopt.sgd(lr=0.1, **f), id="sgd:" + _id(f)) for f in SGD_GRID]
    + [pytest.param(pureopt.adam(lr=0.1, **f), id="adam:" + _id(f)) for f in ADAM_GRID]
    + [pytest.param(pureopt.adamw(lr=0.1, **f), id="adamw:" + _id(f)) for f in ADAMW_GRID]
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tx", ALL_OPTIMIZERS)
def test_update_never_mutates_inputs(tx, impl):
    del impl  # the grid's optimizers use impl='auto' (foreach on CPU); the loop path is covered below
    params = make_params(torch.float32)
    state = tx.init(params)
    for step in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        grads["b1"] = None if step == 1 else grads["b1"]
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_loop_path_never_mutates_inputs(name):
    kwargs = {"momentum": 0.9, "dampening": 0.1} if name == "sgd" else {"amsgrad": True}
    tx = getattr(pureopt, name)(lr=0.1, weight_decay=0.1, impl="loop", **kwargs)
    params = make_params(torch.float32)
    state = tx.init(params)
    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


def test_none_gradient_leaves_param_and_state_untouched():
    tx = pureopt.adam(lr=0.1)
    params = make_params(torch.float64)
    state = tx.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    _, state = tx.update(grads, state, params)
    grads["w1"] = None
    updates, new_state = tx.update(grads, state, params)
    assert updates["w1"] is None
    assert pureopt.apply_updates(params, updates)["w1"] is params["w1"]
    assert new_state.exp_avg["w1"] is state.exp_avg["w1"]
    assert float(new_state.step["w1"]) == 1.0 and float(new_state.step["w2"]) == 2.0
