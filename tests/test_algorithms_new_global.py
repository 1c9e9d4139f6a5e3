"""AdamP, SGDP, CAME, Sophia-G, Prodigy, D-Adapt Adam / SGD and DoG against their authors' packages (issue 15).

Oracles (the ``test`` extra): ``adamp`` (AdamP, SGDP), ``came-pytorch``, ``sophia-opt``, ``prodigyopt``,
``dadaptation``, ``dog-optimizer``. Each run is fp64 over 25 steps; both sides compute their own gradients of the
same loss at their own parameters (a drifting trajectory is caught), with the same pattern of ``None`` gradients;
the pureopt side alternates the pure update and the donated in-place step. Tolerance: rtol 1e-10 (atol 1e-12) on
the parameters and the state after every step. The two sides agree to a few ulps per step; the slack covers the
order of summation (per-tensor sums added in one float64 reduction here, one by one in Python floats there), ops
that round differently (``p.add_(x, alpha=c)`` vs ``p + c * x``) and their growth through the learning-rate
estimates (d enters every later step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, same_bits, snapshot

import pureopt

TOL = {"rtol": 1e-10, "atol": 1e-12}
STEPS = 25

# name -> shape: a conv-like 3-d weight (AdamP's channel view), matrices (CAME's factored moments), a vector, a 0-d
SHAPES: dict[str, tuple[int, ...]] = {"conv": (4, 3, 2), "w": (6, 4), "v": (3, 8), "b": (5,), "gain": ()}
NONE_GRADS: dict[int, tuple[str, ...]] = {3: ("b",), 7: ("w", "gain"), 12: ("conv",), 13: ("conv",)}


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


_COEFS = {k: torch.randn(s, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for k, s in SHAPES.items()}


def grads_at(params: dict[str, torch.Tensor], step: int, nones: bool = True) -> dict[str, torch.Tensor | None]:
    """The gradient of ``sum(c * tanh(p) + 0.05 * p**2 + 0.1 * sin(step) * p)`` (a smooth loss that keeps
    pulling), ``None`` for the names in ``NONE_GRADS[step]``."""
    out: dict[str, torch.Tensor | None] = {}
    for k, p in params.items():
        p = p.detach()
        out[k] = _COEFS[k] * (1 - torch.tanh(p) ** 2) + 0.1 * p + 0.1 * math.sin(step + 1)
    for k in NONE_GRADS.get(step, ()) if nones else ():
        out[k] = None
    return out


def run_parity(
    make_ref: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    tx: pureopt.GradientTransformation,
    *,
    nones: bool = True,
    keys: dict[str, Any] | None = None,
    globals_: dict[str, str] | None = None,
    hessian_every: int = 0,
    batch: float = 1.0,
    first_zero: bool = False,
) -> Any:
    """Step both sides and compare params (and state entries ``keys``: pureopt field -> reference key; global
    fields ``globals_``: pureopt field -> reference group key; a key may be ``(key, scale)``: pureopt's entry is
    ``scale`` times the reference's) after every step; returns the pureopt state."""
    params = make_params()
    names = list(params)
    ref_params = [params[k].clone().requires_grad_(True) for k in names]
    opt = make_ref(ref_params)
    mine = {k: v.clone() for k, v in params.items()}
    state = tx.init(mine)
    for t in range(STEPS):
        extra: dict[str, Any] = {}
        if hessian_every and t % hessian_every == 1:  # Sophia: an estimate from "sampled labels"
            g_hat = {k: 0.3 * torch.cos(v.detach() + t) for k, v in zip(names, ref_params)}
            for k, p in zip(names, ref_params):
                p.grad = g_hat[k].clone()
            opt.update_hessian()  # type: ignore[attr-defined]
            g_hat_mine = {k: 0.3 * torch.cos(mine[k] + t) for k in names}
            extra["hessian"] = {k: batch * g * g for k, g in g_hat_mine.items()}
        ref_grads = grads_at(dict(zip(names, ref_params)), t, nones)
        my_grads = grads_at(mine, t, nones)
        if first_zero and t == 0:
            ref_grads = {k: None if g is None else torch.zeros_like(g) for k, g in ref_grads.items()}
            my_grads = {k: None if g is None else torch.zeros_like(g) for k, g in my_grads.items()}
        for k, p in zip(names, ref_params):
            p.grad = None if ref_grads[k] is None else ref_grads[k].clone()
        if hessian_every:
            opt.step(bs=batch)  # type: ignore[call-arg]
        else:
            opt.step()
        if t % 3 == 0:
            state = pureopt.inplace_step(tx, my_grads, state, mine, **extra)
        else:
            updates, state = tx.update(my_grads, state, mine, **extra)
            mine = pureopt.apply_updates(mine, updates)
        for k, p in zip(names, ref_params):
            torch.testing.assert_close(mine[k], p.detach(), **TOL, msg=lambda m, k=k, t=t: f"{k} at step {t}: {m}")
        for field, key in (keys or {}).items():
            key, scale = key if isinstance(key, tuple) else (key, 1.0)
            for k, p in zip(names, ref_params):
                if key in opt.state[p]:
                    got = getattr(state, field)[k]
                    want = scale * torch.as_tensor(opt.state[p][key], dtype=got.dtype).reshape(got.shape)  # (Prodigy
                    # keeps s and p0 flattened)
                    torch.testing.assert_close(got, want, **TOL, msg=lambda m, f=field, k=k: f"{f}[{k}]: {m}")
        for field, key in (globals_ or {}).items():
            want = torch.as_tensor(opt.param_groups[0][key], dtype=torch.float64)
            torch.testing.assert_close(getattr(state, field), want, **TOL, msg=lambda m, f=field: f"{f}: {m}")
    return state


# --- AdamP / SGDP ----------------------------------------------------------------------------------------------

ADAMP_FLAGS = [
    {},
    {"weight_decay": 0.1, "nesterov": True},
    {"delta": 1.0, "wd_ratio": 0.5, "weight_decay": 0.1},  # projects most steps (the default delta rarely does here)
    {"delta": 0.0, "weight_decay": 0.1},
]


@pytest.mark.parametrize("kw", ADAMP_FLAGS, ids=str)
def test_adamp_matches_the_adamp_package(kw):
    ref = pytest.importorskip("adamp")
    run_parity(
        lambda ps: ref.AdamP(ps, lr=0.01, **kw),
        pureopt.adamp(lr=0.01, **kw),
        keys={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    )


SGDP_FLAGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "delta": 1.0},
    {"momentum": 0.9, "dampening": 0.1, "delta": 1.0, "wd_ratio": 0.5, "weight_decay": 0.1},
    {"weight_decay": 0.1, "delta": 1.0},
]


@pytest.mark.parametrize("kw", SGDP_FLAGS, ids=str)
def test_sgdp_matches_the_adamp_package(kw):
    ref = pytest.importorskip("adamp")
    run_parity(lambda ps: ref.SGDP(ps, lr=0.05, **kw), pureopt.sgdp(lr=0.05, **kw), keys={"momentum": "momentum"})


def test_sgdp_paper_rule_keeps_the_momentum_unprojected():
    """``project_momentum=False``: the paper's Algorithm 1 (the step is projected, the buffer is not), written out
    here with the cosine test and projection of the paper."""
    lr, mom, wd, delta, ratio, eps = 0.05, 0.9, 0.1, 1.0, 0.1, 1e-8
    tx = pureopt.sgdp(lr=lr, momentum=mom, weight_decay=wd, delta=delta, wd_ratio=ratio, project_momentum=False)
    params = make_params()
    mine = {k: v.clone() for k, v in params.items()}
    state = tx.init(mine)
    ref = {k: v.clone() for k, v in params.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(STEPS):
        grads = grads_at(ref, t, nones=False)
        for k, p in ref.items():
            g = grads[k]
            bufs[k] = mom * bufs[k] + g
            u, r = bufs[k].clone(), 1.0
            if p.dim() > 1:
                for rows in (p.shape[0], 1):  # channels first, then the whole tensor
                    pv, gv = p.reshape(rows, -1), g.reshape(rows, -1)
                    cos = (pv * gv).sum(1).abs() / (pv.norm(dim=1) * gv.norm(dim=1)).clamp(min=eps)
                    if cos.max() < delta / math.sqrt(pv.shape[1]):
                        unit = pv / (pv.norm(dim=1, keepdim=True) + eps)
                        u = u.reshape(rows, -1) - unit * (unit * u.reshape(rows, -1)).sum(1, keepdim=True)
                        u, r = u.reshape(p.shape), ratio
                        break
            ref[k] = p * (1 - lr * wd * r / (1 - mom)) - lr * u
        updates, state = tx.update(grads_at(mine, t, nones=False), state, mine)
        mine = pureopt.apply_updates(mine, updates)
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], **TOL)
            torch.testing.assert_close(state.momentum[k], bufs[k], **TOL)


# --- CAME -------------------------------------------------------------------------------------------------------

CAME_FLAGS = [
    {},
    {"weight_decay": 0.1, "clip_threshold": 0.5},
    {"betas": (0.8, 0.9, 0.95), "eps": (1e-20, 1e-12)},
]


@pytest.mark.parametrize("kw", CAME_FLAGS, ids=str)
def test_came_matches_came_pytorch(kw):
    ref = pytest.importorskip("came_pytorch")
    keys = {k: k for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")}
    keys.update(exp_avg_res_row="exp_avg_res_row", exp_avg_res_col="exp_avg_res_col")
    run_parity(lambda ps: ref.CAME(ps, lr=0.01, **kw), pureopt.came(lr=0.01, **kw), keys=keys)


def test_came_keeps_factored_state_for_matrices_only():
    state = pureopt.came(lr=0.01).init(make_params())
    assert state.exp_avg_sq_row["w"].shape == (6,) and state.exp_avg_sq_col["w"].shape == (4,)
    assert state.exp_avg_sq_row["conv"].shape == (4, 3) and state.exp_avg_sq_col["conv"].shape == (4, 2)
    assert state.exp_avg_sq["w"] == () and state.exp_avg_sq_row["b"] == () and state.exp_avg_sq["b"].shape == (5,)


# --- Sophia-G ---------------------------------------------------------------------------------------------------

SOPHIA_FLAGS = [{}, {"weight_decay": 0.2, "rho": 0.1}, {"maximize": True, "betas": (0.9, 0.95)}]


@pytest.mark.parametrize("kw", SOPHIA_FLAGS, ids=str)
def test_sophia_g_matches_sophia_opt(kw):
    """The Hessian estimate every 5 steps: the reference's ``update_hessian()`` on the sampled-label gradient
    ``g_hat`` and ``step(bs=B)``; pureopt's ``hessian=B * g_hat**2`` (see the module docstring)."""
    ref = pytest.importorskip("sophia_opt")
    run_parity(
        lambda ps: ref.SophiaG(ps, lr=0.01, **kw),
        pureopt.sophia_g(lr=0.01, **kw),
        keys={"exp_avg": "exp_avg", "hessian": ("hessian", 64.0)},  # (pureopt's average is of B * g_hat**2)
        hessian_every=5,
        batch=64.0,
    )


@pytest.mark.parametrize("combinator", ["partition", "masked"])
def test_sophia_inside_partition_and_masked_gets_its_own_part_of_the_hessian(combinator):
    """``partition`` / ``masked`` cut a tree argument shaped like the updates (``hessian=``) to each inner
    transformation's parameters: two Sophia-G halves over disjoint parameter sets step exactly as one Sophia-G over
    all of them, i.e. as the ``sophia-opt`` reference."""
    ref = pytest.importorskip("sophia_opt")
    names = list(SHAPES)
    half = {k: i % 2 == 0 for i, k in enumerate(names)}
    make = lambda: pureopt.sophia_g(lr=0.01, weight_decay=0.2, rho=0.1)
    if combinator == "partition":
        tx = pureopt.partition({"even": make(), "odd": make()}, {k: "even" if e else "odd" for k, e in half.items()})
    else:
        tx = pureopt.chain(pureopt.masked(make(), half), pureopt.masked(make(), {k: not e for k, e in half.items()}))
    run_parity(lambda ps: ref.SophiaG(ps, lr=0.01, weight_decay=0.2, rho=0.1), tx, hessian_every=5, batch=64.0)


def test_sophia_hessian_tree_is_checked_before_anything_changes():
    tx = pureopt.sophia_g(lr=0.01)
    params = make_params()
    state = tx.init(params)
    grads = grads_at(params, 0, nones=False)
    snap = snapshot(state)
    with pytest.raises(ValueError, match="hessian"):
        pureopt.inplace_step(tx, grads, state, params, hessian={"w": torch.ones(6, 4)})
    bad = {k: torch.ones(3) for k in params}
    with pytest.raises(ValueError, match="hessian: leaf 0 should be a tensor of the gradient's shape"):
        pureopt.inplace_step(tx, grads, state, params, hessian=bad)
    assert_unchanged(state, snap, "state")


# --- Prodigy ----------------------------------------------------------------------------------------------------

PRODIGY_FLAGS = [
    {},
    {"weight_decay": 0.1, "use_bias_correction": True},
    {"weight_decay": 0.1, "decouple": False, "safeguard_warmup": True, "betas": (0.0, 0.99)},
    {"d_coef": 2.0, "growth_rate": 1.02, "beta3": 0.9},
]
PRODIGY_KEYS = {"s": "s", "p0": "p0", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


@pytest.mark.parametrize("kw", PRODIGY_FLAGS, ids=str)
def test_prodigy_matches_prodigyopt(kw, capsys):
    ref = pytest.importorskip("prodigyopt")
    run_parity(
        lambda ps: ref.Prodigy(ps, lr=1.0, **kw),
        pureopt.prodigy(lr=1.0, **kw),
        keys=PRODIGY_KEYS,
        globals_={"d": "d", "d_max": "d_max", "d_numerator": "d_numerator", "k": "k"},
    )


def test_prodigy_zero_first_gradient_takes_no_step():
    """All-zero gradients: the reference returns before its step (d, k, params unchanged); so does pureopt."""
    ref = pytest.importorskip("prodigyopt")
    run_parity(lambda ps: ref.Prodigy(ps, lr=1.0), pureopt.prodigy(lr=1.0), first_zero=True, globals_={"d": "d"})


# --- D-Adaptation -----------------------------------------------------------------------------------------------

DADAPT_ADAM_FLAGS = [
    {},
    {"weight_decay": 0.1, "use_bias_correction": True},
    {"weight_decay": 0.1, "decouple": True, "growth_rate": 1.05},
]


@pytest.mark.parametrize("kw", DADAPT_ADAM_FLAGS, ids=str)
def test_dadapt_adam_matches_dadaptation(kw, capsys):
    ref = pytest.importorskip("dadaptation")
    run_parity(
        lambda ps: ref.DAdaptAdam(ps, lr=1.0, **kw),
        pureopt.dadapt_adam(lr=1.0, **kw),
        keys={"s": "s", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
        globals_={"d": "d", "numerator_weighted": "numerator_weighted", "k": "k"},
    )


def test_dadapt_adam_zero_first_gradient_takes_no_step():
    ref = pytest.importorskip("dadaptation")
    run_parity(lambda ps: ref.DAdaptAdam(ps, lr=1.0), pureopt.dadapt_adam(lr=1.0), first_zero=True, globals_={"d": "d"})


DADAPT_SGD_FLAGS = [{}, {"weight_decay": 0.1, "momentum": 0.9}, {"growth_rate": 1.05, "momentum": 0.5}]


@pytest.mark.parametrize("kw", DADAPT_SGD_FLAGS, ids=str)
def test_dadapt_sgd_matches_dadaptation(kw):
    ref = pytest.importorskip("dadaptation")
    run_parity(
        lambda ps: ref.DAdaptSGD(ps, lr=1.0, **kw),
        pureopt.dadapt_sgd(lr=1.0, **kw),
        keys={"z": "z", "s": "s", "x0": "x0"},
        globals_={"d": "d", "numerator_weighted": "numerator_weighted", "k": "k", "g0_norm": "g0_norm"},
    )


# --- DoG --------------------------------------------------------------------------------------------------------

DOG_FLAGS = [{}, {"weight_decay": 0.1, "reps_rel": 1e-4}, {"init_eta": 1e-3, "lr": 0.8}]


@pytest.mark.parametrize("kw", DOG_FLAGS, ids=str)
def test_dog_matches_dog_optimizer(kw):
    """Every parameter has a gradient (the reference fails on a ``None`` one)."""
    ref = pytest.importorskip("dog")
    run_parity(lambda ps: ref.DoG(ps, **kw), pureopt.dog(**kw), nones=False, globals_={"rbar": "rbar", "G": "G"})


def test_dog_leaves_parameters_without_gradient_out_of_its_sums():
    """The rule written out: norms over the parameters that have a gradient this step."""
    tx = pureopt.dog(reps_rel=1e-3)
    params = make_params()
    state = tx.init(params)
    x0 = {k: v.clone() for k, v in params.items()}
    rbar = total = None
    for t in range(6):
        grads = grads_at(params, t, nones=False)
        if t in (2, 3):
            grads["w"] = None
        live = [k for k, g in grads.items() if g is not None]
        gsq = sum(float((grads[k] ** 2).sum()) for k in live)
        if t == 0:
            rbar = 1e-3 * (1 + math.sqrt(sum(float((params[k] ** 2).sum()) for k in live)))
            total = gsq + 1e-8
        else:
            rbar = max(rbar, math.sqrt(sum(float(((params[k] - x0[k]) ** 2).sum()) for k in live)))
            total += gsq
        eta = rbar / math.sqrt(total)
        want = {k: params[k] - eta * grads[k] if grads[k] is not None else params[k] for k in params}
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        for k in params:
            torch.testing.assert_close(params[k], want[k], **TOL)


# --- every algorithm: None gradients, purity, TorchOptimizer checkpoints -------------------------------------------

ALL: list[tuple[str, Callable[..., pureopt.GradientTransformation], dict[str, Any]]] = [
    ("adamp", pureopt.adamp, {"lr": 0.01, "weight_decay": 0.1, "delta": 1.0}),
    ("sgdp", pureopt.sgdp, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, "delta": 1.0}),
    ("came", pureopt.came, {"lr": 0.01, "weight_decay": 0.1}),
    ("sophia_g", pureopt.sophia_g, {"lr": 0.01}),
    ("prodigy", pureopt.prodigy, {"lr": 1.0, "weight_decay": 0.1}),
    ("dadapt_adam", pureopt.dadapt_adam, {"lr": 1.0, "use_bias_correction": True}),
    ("dadapt_sgd", pureopt.dadapt_sgd, {"lr": 1.0, "momentum": 0.9}),
    ("dog", pureopt.dog, {"lr": 1.0}),
]
IDS = [a[0] for a in ALL]


def _per_param_fields(state: Any) -> list[str]:
    return [f for f in state._fields if isinstance(getattr(state, f), dict)]


@pytest.mark.parametrize(("name", "factory", "kw"), ALL, ids=IDS)
def test_none_gradients_leave_per_parameter_state_untouched(name, factory, kw):
    tx = factory(**kw)
    params = make_params()
    state = tx.init(params)
    for t in range(3):
        updates, state = tx.update(grads_at(params, t, nones=False), state, params)
        params = pureopt.apply_updates(params, updates)
    grads = grads_at(params, 3, nones=False)
    grads["w"] = grads["gain"] = None
    before = {f: {k: getattr(state, f)[k] for k in ("w", "gain")} for f in _per_param_fields(state)}
    updates, new = tx.update(grads, state, params)
    assert updates["w"] is None and updates["gain"] is None
    for f, entries in before.items():
        for k, old in entries.items():
            now = getattr(new, f)[k]
            assert now is old or (isinstance(old, torch.Tensor) and same_bits(now, old)), f"{f}[{k}] changed"


@pytest.mark.parametrize(("name", "factory", "kw"), ALL, ids=IDS)
def test_update_is_pure(name, factory, kw):
    tx = factory(**kw)
    params = make_params()
    state = tx.init(params)
    for t in range(3):
        grads = grads_at(params, t)
        snaps = [snapshot(x) for x in (grads, state, params)]
        updates, new_state = tx.update(grads, state, params)
        for x, snap, what in zip((grads, state, params), snaps, ("grads", "state", "params")):
            assert_unchanged(x, snap, what)
        params, state = pureopt.apply_updates(params, updates), new_state


@pytest.mark.parametrize(("name", "factory", "kw"), ALL, ids=IDS)
def test_torch_optimizer_state_dict_round_trip_continues_as_uninterrupted(name, factory, kw, capsys):
    """Save after 5 steps, load into a fresh TorchOptimizer, 5 more steps: the same bits as 10 uninterrupted steps
    (both sides run the same kernels on the same numbers)."""
    params = make_params()

    def steps(opt, ps, ts):
        for t in ts:
            grads = grads_at(dict(zip(SHAPES, ps)), t)
            for p, g in zip(ps, grads.values()):
                p.grad = g
            opt.step()

    whole = [v.clone().requires_grad_(True) for v in params.values()]
    opt = pureopt.TorchOptimizer(whole, factory, **kw)
    steps(opt, whole, range(10))
    first = [v.clone().requires_grad_(True) for v in params.values()]
    opt1 = pureopt.TorchOptimizer(first, factory, **kw)
    steps(opt1, first, range(5))
    saved = copy.deepcopy(opt1.state_dict())
    second = [p.detach().clone().requires_grad_(True) for p in first]
    opt2 = pureopt.TorchOptimizer(second, factory, **kw)
    opt2.load_state_dict(saved)
    steps(opt2, second, range(5, 10))
    for a, b in zip(second, whole):
        assert same_bits(a.detach(), b.detach())
