"""ADOPT, LaProp, MADGRAD and MARS against independent implementations installed by the test extras.

Oracles: pytorch-optimizer's ``ADOPT``, ``LaProp``, ``MARS`` (their per-parameter paths, ``foreach=False``: the
foreach paths round LaProp's step sizes to float32) and ``MADGRAD``; the authors' ``madgrad`` package.
Tolerance: fp64, rtol 1e-10 / atol 1e-12 over 25 steps on params and state (pureopt's ops round differently by an
ulp in places: lerp vs mul+add, ``(lam * g) * g`` vs ``g * g * lam``; nothing here is bitwise).

The references keep one step count per param group (MADGRAD: per optimizer) where pureopt keeps one per parameter,
so the trajectories are compared where every parameter has a gradient at every step; a parameter whose gradient is
always ``None`` is checked to stay untouched, with the others still equal to the reference run without it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import find_state_field, loss_fn, make_data, make_params

import pureopt

pto = pytest.importorskip("pytorch_optimizer")
madgrad_pkg = pytest.importorskip("madgrad")

TOL = {"rtol": 1e-10, "atol": 1e-12}
STEPS = 25
LR = 0.01


def _grads(params: dict[str, torch.Tensor], data: Any, sign: float, skip: tuple[str, ...]) -> dict[str, Any]:
    g = torch.func.grad(lambda p, x, y: sign * loss_fn(p, x, y))(params, *data)
    return {k: (None if k in skip else v) for k, v in g.items()}


def _compare(
    make_ref: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    tx: pureopt.GradientTransformation,
    state_keys: tuple[str, ...],
    *,
    maximize: bool = False,
    skip: tuple[str, ...] = (),
    set_lr: Callable[[int], float] | None = None,
    steps: int = STEPS,
) -> None:
    """``steps`` pure updates against the reference's steps (fp64); params and state after every step. Parameters in
    ``skip`` never get a gradient: the reference does not see them, pureopt must leave them and their state alone."""
    sign = -1.0 if maximize else 1.0
    data = make_data(torch.float64)
    init = make_params(torch.float64)
    names = [k for k in init if k not in skip]
    theirs = {k: init[k].clone().requires_grad_(True) for k in names}
    ref = make_ref(list(theirs.values()))
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    untouched = snapshot([params[k] for k in skip])
    for step in range(steps):
        if set_lr is not None:
            for group in ref.param_groups:
                group["lr"] = set_lr(step)
        tg = _grads({**init, **{k: t.detach() for k, t in theirs.items()}}, data, sign, ())  # (skipped: at init)
        for k, t in theirs.items():
            t.grad = tg[k].clone()
        ref.step()
        updates, state = tx.update(_grads(params, data, sign, skip), state, params)
        params = pureopt.apply_updates(params, updates)
        for k, t in theirs.items():
            torch.testing.assert_close(params[k], t.detach(), **TOL, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
            for key in state_keys:
                value = ref.state[t].get(key)
                if value is None:
                    continue
                mine = find_state_field(state, key)[k]
                value = torch.as_tensor(value, dtype=mine.dtype)
                torch.testing.assert_close(
                    mine, value, **TOL, msg=lambda m, k=k, s=step, key=key: f"{key}/{k}@{s}: {m}"
                )
    assert_unchanged([params[k] for k in skip], untouched, "a parameter without gradients")
    fresh = tx.init(make_params(torch.float64))
    for key in state_keys:
        field = find_state_field(state, key)
        if field is not None and not isinstance(field, tuple):
            for k in skip:
                assert torch.equal(field[k], find_state_field(fresh, key)[k]), f"{key} of {k} changed"


# --- ADOPT ------------------------------------------------------------------------------------------------------

ADOPT_FLAGS = [
    ({}, {}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"weight_decay": 0.1, "decoupled_weight_decay": True}, {"weight_decay": 0.1, "weight_decouple": True}),
    ({"clip_exponent": None}, {"clip_lambda": None}),
    (
        {"clip_exponent": 0.1, "betas": (0.5, 0.9), "eps": 1e-3},
        {"clip_lambda": lambda t: t**0.1, "betas": (0.5, 0.9), "eps": 1e-3},
    ),
    ({"maximize": True}, {"maximize": True}),
]


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("flags,ref_flags", ADOPT_FLAGS, ids=[str(f) for f, _ in ADOPT_FLAGS])
def test_adopt_matches_pytorch_optimizer(flags, ref_flags, impl):
    _compare(
        lambda ps: pto.ADOPT(ps, lr=LR, foreach=False, **ref_flags),
        pureopt.adopt(lr=LR, impl=impl, **flags),
        ("exp_avg", "exp_avg_sq"),
        maximize=flags.get("maximize", False),
    )


# --- LaProp -----------------------------------------------------------------------------------------------------

LAPROP_FLAGS = [
    ({}, {}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"centered": True, "steps_before_using_centered": 3}, {"centered": True, "steps_before_using_centered": 3}),
    ({"amsgrad": True, "eps": 1e-8}, {"ams_bound": True, "eps": 1e-8}),
    (
        {"betas": (0.5, 0.8), "centered": True, "amsgrad": True},
        {"betas": (0.5, 0.8), "centered": True, "ams_bound": True},
    ),
    ({"maximize": True, "weight_decay": 0.1}, {"maximize": True, "weight_decay": 0.1}),
]
LAPROP_KEYS = ("exp_avg", "exp_avg_sq", "exp_mean_avg_beta2", "max_exp_avg_sq", "exp_avg_lr_1", "exp_avg_lr_2")


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("flags,ref_flags", LAPROP_FLAGS, ids=[str(f) for f, _ in LAPROP_FLAGS])
def test_laprop_matches_pytorch_optimizer(flags, ref_flags, impl):
    _compare(
        lambda ps: pto.LaProp(ps, lr=LR, foreach=False, **ref_flags),
        pureopt.laprop(lr=LR, impl=impl, **flags),
        LAPROP_KEYS,
        maximize=flags.get("maximize", False),
    )


# --- MADGRAD ----------------------------------------------------------------------------------------------------

MADGRAD_FLAGS = [
    ({}, {}),
    ({"momentum": 0.0}, {"momentum": 0.0}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"weight_decay": 0.1, "decoupled_weight_decay": True}, {"weight_decay": 0.1, "decouple_decay": True}),
    (
        {"momentum": 0.0, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"momentum": 0.0, "weight_decay": 0.1, "decouple_decay": True},
    ),
    ({"eps": 0.0}, {"eps": 0.0}),
]


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("flags,ref_flags", MADGRAD_FLAGS, ids=[str(f) for f, _ in MADGRAD_FLAGS])
def test_madgrad_matches_the_authors_package(flags, ref_flags, impl):
    _compare(
        lambda ps: madgrad_pkg.MADGRAD(ps, lr=LR, **ref_flags),
        pureopt.madgrad(lr=LR, impl=impl, **flags),
        ("grad_sum_sq", "s", "x0"),
    )


@pytest.mark.parametrize(
    "flags", [{"maximize": True}, {"momentum": 0.0, "eps": 0.0}, {"momentum": 0.0, "maximize": True}], ids=str
)
def test_madgrad_matches_pytorch_optimizer(flags):
    """maximize (the package has none) and eps == 0 without momentum (the package gives NaN there)."""
    _compare(
        lambda ps: pto.MADGRAD(ps, lr=LR, foreach=False, **flags),
        pureopt.madgrad(lr=LR, **flags),
        ("grad_sum_sq", "s"),
        maximize=flags.get("maximize", False),
    )


def test_madgrad_needs_the_parameters():
    params = make_params(torch.float64)
    tx = pureopt.madgrad()
    with pytest.raises(ValueError, match="madgrad needs the parameters"):
        tx.update(_grads(params, make_data(torch.float64), 1.0, ()), tx.init(params))


# --- MARS -------------------------------------------------------------------------------------------------------

MARS_FLAGS = [
    ({}, {}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"mars_type": "lion", "weight_decay": 0.1}, {"mars_type": "lion", "weight_decay": 0.1}),
    ({"mars_type": "lion", "optimize_1d": True}, {"mars_type": "lion", "optimize_1d": True}),
    ({"optimize_1d": True, "amsgrad": True}, {"optimize_1d": True, "ams_bound": True}),
    (
        {"gamma": 0.5, "lr_1d": 1e-3, "betas_1d": (0.8, 0.9), "weight_decay_1d": 0.0},
        {"gamma": 0.5, "lr_1d": 1e-3, "betas_1d": (0.8, 0.9), "weight_decay_1d": 0.0},
    ),
    (
        {"maximize": True, "amsgrad": True, "mars_type": "lion"},
        {"maximize": True, "ams_bound": True, "mars_type": "lion"},
    ),
]


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("flags,ref_flags", MARS_FLAGS, ids=[str(f) for f, _ in MARS_FLAGS])
def test_mars_matches_pytorch_optimizer(flags, ref_flags, impl):
    _compare(
        lambda ps: pto.MARS(ps, lr=LR, foreach=False, **ref_flags),
        pureopt.mars(lr=LR, impl=impl, **flags),
        ("exp_avg", "exp_avg_sq", "last_grad", "max_exp_avg_sq"),
        maximize=flags.get("maximize", False),
    )


# --- across the four --------------------------------------------------------------------------------------------

CASES: list[tuple[str, Callable[..., pureopt.GradientTransformation], Callable[..., Any], dict[str, Any]]] = [
    ("adopt", pureopt.adopt, lambda ps, **kw: pto.ADOPT(ps, foreach=False, **kw), {}),
    ("laprop", pureopt.laprop, lambda ps, **kw: pto.LaProp(ps, foreach=False, **kw), {}),
    ("madgrad", pureopt.madgrad, lambda ps, **kw: madgrad_pkg.MADGRAD(ps, **kw), {}),
    ("mars", pureopt.mars, lambda ps, **kw: pto.MARS(ps, foreach=False, **kw), {}),
]
KEYS = {
    "adopt": ("exp_avg", "exp_avg_sq"),
    "laprop": LAPROP_KEYS,
    "madgrad": ("grad_sum_sq", "s", "x0"),
    "mars": ("exp_avg", "exp_avg_sq", "last_grad"),
}


@pytest.mark.parametrize("name,factory,ref,kw", CASES, ids=[c[0] for c in CASES])
def test_parameter_without_gradients_is_left_alone(name, factory, ref, kw):
    """``b2`` and ``gain`` never get a gradient: they and their state stay; the rest follow the reference run
    without them."""
    _compare(lambda ps: ref(ps, lr=LR), factory(lr=LR), KEYS[name], skip=("b2", "gain"), steps=10)


@pytest.mark.parametrize("name,factory,ref,kw", CASES, ids=[c[0] for c in CASES])
def test_a_changing_lr_follows_the_reference(name, factory, ref, kw):
    """A schedule on pureopt's side, ``param_groups[0]['lr']`` set before every step on the reference's: LaProp's
    learning rate inside its momentum, MARS's 1-d learning rate proportional to ``lr`` (``lr_1d / lr_0``)."""

    def schedule(count):
        return 0.02 / (1 + 0.3 * count.to(torch.float64))

    _compare(
        lambda ps: ref(ps, lr=0.02),
        factory(lr=schedule),
        KEYS[name],
        set_lr=lambda step: 0.02 / (1 + 0.3 * step),
        steps=12,
    )


PURE = [
    ("adopt", lambda impl: pureopt.adopt(lr=LR, weight_decay=0.1, decoupled_weight_decay=True, impl=impl)),
    ("laprop", lambda impl: pureopt.laprop(lr=LR, weight_decay=0.1, centered=True, amsgrad=True, impl=impl)),
    ("madgrad", lambda impl: pureopt.madgrad(lr=LR, weight_decay=0.1, impl=impl)),
    ("madgrad-0", lambda impl: pureopt.madgrad(lr=LR, momentum=0.0, eps=0.0, maximize=True, impl=impl)),
    ("mars", lambda impl: pureopt.mars(lr=LR, weight_decay=0.1, amsgrad=True, impl=impl)),
    ("mars-lion", lambda impl: pureopt.mars(lr=LR, mars_type="lion", maximize=True, impl=impl)),
    ("scale_by_adopt", lambda impl: pureopt.scale_by_adopt(impl=impl)),
    ("scale_by_laprop", lambda impl: pureopt.scale_by_laprop(impl=impl)),
    ("scale_by_mars", lambda impl: pureopt.scale_by_mars(mars_type="lion", impl=impl)),
]


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("make", [m for _, m in PURE], ids=[i for i, _ in PURE])
def test_update_leaves_its_inputs_bitwise_unchanged(make, impl):
    tx = make(impl)
    params = make_params(torch.float64)
    data = make_data(torch.float64)
    state = tx.init(params)
    for step in range(3):
        grads = _grads(params, data, 1.0, ("b2",) if step == 1 else ())
        before = (snapshot(params), snapshot(grads), snapshot(state))
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, before[0], "params")
        assert_unchanged(grads, before[1], "grads")
        assert_unchanged(state, before[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


SCALE_BY = [
    ("adopt", lambda: pureopt.scale_by_adopt(betas=(0.8, 0.99)), lambda: pureopt.adopt(lr=LR, betas=(0.8, 0.99))),
    ("laprop", lambda: pureopt.scale_by_laprop(centered=True), lambda: pureopt.laprop(lr=LR, centered=True)),
    ("mars", lambda: pureopt.scale_by_mars(), lambda: pureopt.mars(lr=LR, optimize_1d=True)),
    (
        "mars-lion",
        lambda: pureopt.scale_by_mars(mars_type="lion"),
        lambda: pureopt.mars(lr=LR, mars_type="lion", optimize_1d=True),
    ),
]


@pytest.mark.parametrize("primitive,full", [s[1:] for s in SCALE_BY], ids=[s[0] for s in SCALE_BY])
def test_scale_by_form_chained_with_a_learning_rate_is_the_optimizer(primitive, full):
    """With a constant lr (LaProp: lr inside the momentum and in the bias correction cancel; rtol for rounding)."""
    chained = pureopt.chain(primitive(), pureopt.scale_by_learning_rate(LR))
    data = make_data(torch.float64)
    a = make_params(torch.float64)
    b = {k: v.clone() for k, v in a.items()}
    sa, sb = chained.init(a), full().init(b)
    tx = full()
    for _ in range(10):
        ua, sa = chained.update(_grads(a, data, 1.0, ()), sa, a)
        ub, sb = tx.update(_grads(b, data, 1.0, ()), sb, b)
        a, b = pureopt.apply_updates(a, ua), pureopt.apply_updates(b, ub)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: pureopt.adopt(lr=-1.0), "Invalid learning rate: -1.0"),
        (lambda: pureopt.adopt(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        (lambda: pureopt.adopt(clip_exponent=-0.25), "Invalid clip_exponent value: -0.25"),
        (lambda: pureopt.laprop(eps=-1.0), "Invalid epsilon value: -1.0"),
        (lambda: pureopt.laprop(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (lambda: pureopt.madgrad(momentum=1.0), "Invalid momentum value: 1.0"),
        (lambda: pureopt.mars(mars_type="shampoo"), "Invalid mars_type: 'shampoo'"),
        (lambda: pureopt.mars(gamma=-1.0), "Invalid gamma value: -1.0"),
        (lambda: pureopt.mars(betas_1d=(1.5, 0.9)), "Invalid beta parameter at index 0: 1.5"),
    ],
)
def test_bad_hyperparameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


# --- TorchOptimizer: the reference's trajectory, and a torch-format checkpoint -------------------------------------

TORCH_OPT = [
    ("adopt", pureopt.adopt, dict(weight_decay=0.1), lambda ps: pto.ADOPT(ps, lr=LR, weight_decay=0.1, foreach=False)),
    (
        "laprop",
        pureopt.laprop,
        dict(centered=True, steps_before_using_centered=2),
        lambda ps: pto.LaProp(ps, lr=LR, centered=True, steps_before_using_centered=2, foreach=False),
    ),
    ("madgrad", pureopt.madgrad, dict(momentum=0.5), lambda ps: madgrad_pkg.MADGRAD(ps, lr=LR, momentum=0.5)),
    (
        "mars",
        pureopt.mars,
        dict(mars_type="lion", weight_decay=0.1),
        lambda ps: pto.MARS(ps, lr=LR, mars_type="lion", weight_decay=0.1, foreach=False),
    ),
]


def _model_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(v) for v in make_params(torch.float64).values()]


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], step: int) -> None:
    data = make_data(torch.float64)
    names = list(make_params(torch.float64))
    grads = _grads({k: p.detach() for k, p in zip(names, params)}, data, 1.0, ())
    for k, p in zip(names, params):
        p.grad = grads[k].clone()
    opt.step()


@pytest.mark.parametrize("name,factory,kw,ref", TORCH_OPT, ids=[c[0] for c in TORCH_OPT])
def test_torch_optimizer_checkpoint_round_trip_continues_as_uninterrupted(name, factory, kw, ref):
    """TorchOptimizer: 12 steps equal the reference's; the torch-format state_dict saved after 5 and loaded into a
    fresh optimizer on a copy of the parameters continues exactly as the uninterrupted run."""
    whole = _model_params()
    opt = pureopt.TorchOptimizer(whole, factory, lr=LR, **kw)
    theirs = _model_params()
    ref_opt = ref(theirs)
    for step in range(5):
        _step(opt, whole, step)
        _step(ref_opt, theirs, step)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(saved["state"][0]) >= {"step", *KEYS[name][:2]}, sorted(saved["state"][0])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in whole]
    opt2 = pureopt.TorchOptimizer(resumed, factory, lr=LR, **kw)
    opt2.load_state_dict(saved)
    for step in range(5, 12):
        _step(opt, whole, step)
        _step(opt2, resumed, step)
        _step(ref_opt, theirs, step)
    for a, b, c in zip(whole, resumed, theirs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.detach(), c.detach(), **TOL)


COMPILED = [
    ("adopt", lambda: pureopt.adopt(lr=LR, weight_decay=0.1, decoupled_weight_decay=True)),
    ("laprop", lambda: pureopt.laprop(lr=LR, centered=True, steps_before_using_centered=1, amsgrad=True)),
    ("madgrad", lambda: pureopt.madgrad(lr=LR, weight_decay=0.1, eps=0.0)),
    ("mars", lambda: pureopt.mars(lr=LR, weight_decay=0.1)),
]


@pytest.mark.parametrize("make", [m for _, m in COMPILED], ids=[i for i, _ in COMPILED])
def test_compiled_update_is_one_graph_and_equals_eager(make):
    """``torch.compile(fullgraph=True)`` of update + apply_updates (aot_eager: the traced graph, no codegen): no graph
    break, no recompile across steps, the eager numbers (fp64, rtol 1e-12: same ops, traced)."""
    tx = make()
    data = make_data(torch.float64)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return pureopt.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_params = make_params(torch.float64)
    params = {k: v.clone() for k, v in eager_params.items()}
    state, eager_state = tx.init(params), tx.init(eager_params)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            params, state = compiled(params, state, _grads(params, data, 1.0, ()))
            eager_params, eager_state = step(eager_params, eager_state, _grads(eager_params, data, 1.0, ()))
    for k in params:
        torch.testing.assert_close(params[k], eager_params[k], rtol=1e-12, atol=1e-14)
