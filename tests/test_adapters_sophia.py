"""Sophia-G through ``TorchOptimizer``: ``step(hessian=...)`` against the ``sophia-opt`` package, the refusals, and
checkpoint resume.

Oracle: ``sophia_opt.SophiaG`` (the ``test`` extra), fp64, two param groups with different hyperparameters, 14
steps, the Hessian estimate every 3 steps and some ``None`` gradients (also on steps that get an estimate). Both
sides compute their own gradients at their own parameters. The reference's loop: ``step(bs=B)``, then every k
steps a backward on sampled labels and ``update_hessian()``; pureopt's: the same estimate, ``B * g_hat**2``, given
to the next ``step(hessian=...)`` (see pureopt/algorithms/sophia.py). B = 64 is a power of two, so pureopt's
running average is exactly B times the reference's and ``rho * h`` exactly its ``rho * bs * h``; what remains is
``addcmul_`` (one rounding of ``g * g`` fused or not, by CPU) against pureopt's ``g * g`` then ``add``: an ulp in
the average now and then, which moves the parameters by far less. Tolerance: rtol 1e-12, atol 1e-15 (measured:
at most 2.4e-16 relative, i.e. one ulp, over parameters and state on a 2-core x86 CPU, torch 2.13.0+cpu; a
missed, doubled or misplaced average update changes the average by percents).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, same_bits, snapshot

import pureopt

TOL = {"rtol": 1e-12, "atol": 1e-15}
B = 64.0
K = 3  # an estimate after every K-th step, used by the next one
STEPS = 14
SHAPES = {"w": (6, 4), "b": (5,), "v": (3, 8), "gain": ()}
GROUPS = (("w", "b"), ("v", "gain"))
OPTIONS = ({}, {"weight_decay": 0.2, "rho": 0.1, "betas": (0.9, 0.95)})
NONE_GRADS = {4: ("b",), 6: ("v", "gain"), 9: ("w",), 10: ("w",)}
_COEFS = {k: torch.randn(s, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for k, s in SHAPES.items()}


def make_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for k, s in SHAPES.items()}


def grad_of(name: str, p: torch.Tensor, t: int) -> torch.Tensor | None:
    """The gradient of ``sum(c * tanh(p) + 0.05 * p**2 + 0.1 * sin(t + 1) * p)``; ``None`` per NONE_GRADS."""
    if name in NONE_GRADS.get(t, ()):
        return None
    p = p.detach()
    return _COEFS[name] * (1 - torch.tanh(p) ** 2) + 0.1 * p + 0.1 * math.sin(t + 1)


def sampled_grad(p: torch.Tensor, t: int) -> torch.Tensor:
    """Stands in for the gradient of the loss on labels sampled from the model (``g_hat``)."""
    return 2.0 * torch.cos(p.detach() + t)


def groups_of(params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": [params[k] for k in names], **opts} for names, opts in zip(GROUPS, OPTIONS)]


def listing(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def estimate(opt: torch.optim.Optimizer, t: int, form: str, skip: set[int]) -> Any:
    """``B * g_hat**2``: a dict over every parameter, or a list aligned with the param groups' listing with ``None``
    for the parameters in ``skip`` (ids; both forms then skip them, the dict because they have no gradient)."""
    if form == "dict":
        return {p: B * sampled_grad(p, t) ** 2 for p in listing(opt)}
    return [None if id(p) in skip else B * sampled_grad(p, t) ** 2 for p in listing(opt)]


def set_grads(params: dict[str, torch.Tensor], t: int) -> None:
    for k, p in params.items():
        p.grad = grad_of(k, p, t)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_sophia_step_with_hessian_matches_sophia_opt(form):
    ref_mod = pytest.importorskip("sophia_opt")
    ref_params, mine = make_params(), make_params()
    ref = ref_mod.SophiaG(groups_of(ref_params), lr=0.01)
    opt = pureopt.TorchOptimizer(groups_of(mine), pureopt.sophia_g, lr=0.01)
    pending = None  # the estimate made after the previous step
    preconditioned = 0  # elements where the ratio was not clipped to 1
    for t in range(STEPS):
        set_grads(ref_params, t)
        ref.step(bs=B)

        def closure(t: int = t) -> None:
            set_grads(mine, t)  # (the gradients exist only once the closure ran: the group check comes after it)

        opt.step(closure, hessian=pending)
        pending = None
        for k, r in ref_params.items():
            p = mine[k]
            torch.testing.assert_close(p, r, **TOL, msg=lambda m, k=k, t=t: f"{k} at step {t}: {m}")
            if not ref.state[r]:
                continue
            for key, scale in (("exp_avg", 1.0), ("hessian", B)):
                want = scale * ref.state[r][key]
                torch.testing.assert_close(
                    opt.state[p][key], want, **TOL, msg=lambda m, k=k, key=key: f"{key}[{k}]: {m}"
                )
            assert int(opt.state[p]["step"]) == int(ref.state[r]["step"])
            rho = next(g["rho"] for g in ref.param_groups if any(q is r for q in g["params"]))
            ratio = ref.state[r]["exp_avg"].abs() / (rho * B * ref.state[r]["hessian"] + 1e-15)
            preconditioned += int((ratio < 1).sum())
        if t % K == K - 1:
            # the reference folds the estimate in now; pureopt at the next step, where a parameter without a
            # gradient is skipped: the reference's update_hessian is given the same parameters' estimates
            for k, p in ref_params.items():
                p.grad = None if grad_of(k, p, t + 1) is None else sampled_grad(p, t)
            ref.update_hessian()
            pending = estimate(opt, t, form, {id(mine[k]) for k in NONE_GRADS.get(t + 1, ())})
    assert preconditioned > 100  # the preconditioner is in play (not only clipped sign steps)


def test_sophia_hessian_through_a_chain_matches_sophia_opt():
    """A ready transformation that takes ``hessian`` inside a chain (found from its state records, not its name)."""
    ref_mod = pytest.importorskip("sophia_opt")
    ref_params, mine = make_params(), make_params()
    ref = ref_mod.SophiaG(list(ref_params.values()), lr=0.01, weight_decay=0.0)
    tx = pureopt.chain(pureopt.scale_by_sophia(), pureopt.scale_by_learning_rate(0.01))
    opt = pureopt.TorchOptimizer(list(mine.values()), tx)
    pending = None
    for t in range(8):
        set_grads(ref_params, t)
        ref.step(bs=B)
        set_grads(mine, t)
        opt.step(hessian=pending)
        pending = None
        if t % 2 == 1:
            for k, p in ref_params.items():
                p.grad = None if grad_of(k, p, t + 1) is None else sampled_grad(p, t)
            ref.update_hessian()
            pending = {p: B * sampled_grad(p, t) ** 2 for p in mine.values()}
        for k, r in ref_params.items():
            torch.testing.assert_close(mine[k], r, **TOL, msg=lambda m, k=k, t=t: f"{k} at step {t}: {m}")


def test_a_parameter_without_gradient_skips_its_estimate():
    """Closed form of one step from zero state: ``h = (1 - beta2) * hessian`` where there is a gradient, and the
    parameter without one keeps its state and value."""
    params = make_params()
    opt = pureopt.TorchOptimizer(list(params.values()), pureopt.sophia_g, lr=0.01)
    for k, p in params.items():
        p.grad = None if k == "b" else torch.ones_like(p)
    before = params["b"].detach().clone()
    est = {p: torch.full_like(p, 2.0) for p in params.values()}
    opt.step(hessian=est)
    beta2 = opt.param_groups[0]["betas"][1]
    for k, p in params.items():
        if k == "b":
            assert same_bits(p.detach(), before)
            assert same_bits(opt.state[p]["hessian"], torch.zeros_like(p))
        else:
            torch.testing.assert_close(opt.state[p]["hessian"], torch.full_like(p, (1 - beta2) * 2.0), rtol=0, atol=0)


# --- refusals ----------------------------------------------------------------------------------------------------


def _fresh(factory: Any = pureopt.sophia_g, **kw: Any) -> tuple[pureopt.TorchOptimizer, dict[str, torch.Tensor]]:
    params = make_params()
    opt = pureopt.TorchOptimizer(groups_of(params), factory, lr=0.01, **kw)
    set_grads(params, 0)
    opt.step()  # some state to protect
    set_grads(params, 1)
    return opt, params


def _assert_refused(opt, params, error, match, **kwargs):
    snap_p, snap_s = snapshot(list(params.values())), snapshot(opt.opt_states)
    calls = []
    with pytest.raises(error, match=match):
        opt.step(lambda: calls.append(1), **kwargs)
    assert_unchanged(list(params.values()), snap_p, "params")
    assert_unchanged(opt.opt_states, snap_s, "state")
    return calls


def _full(opt):
    return {p: torch.ones_like(p) for p in listing(opt)}


def test_refuses_a_hessian_for_an_algorithm_without_one():
    opt, params = _fresh(pureopt.adamw)
    calls = _assert_refused(opt, params, TypeError, "unexpected keyword argument 'hessian'.*adamw", hessian=_full(opt))
    assert not calls  # refused before the closure ran
    opt, params = _fresh()
    _assert_refused(opt, params, TypeError, "unexpected keyword argument 'curvature'", curvature=_full(opt))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda opt: torch.ones(3), TypeError, "hessian must be a dict .*or a list aligned with"),
        (lambda opt: (x for x in _full(opt).values()), TypeError, "got a generator"),
        (lambda opt: list(_full(opt).values())[:-1], ValueError, "a list of 3 entries, but .* has 4"),
        (
            lambda opt: {**_full(opt), torch.zeros(2): torch.ones(2)},
            ValueError,
            "key a tensor of shape \\(2,\\) is not",
        ),
        (lambda opt: {**_full(opt), "w": torch.ones(6, 4)}, ValueError, "key 'w' is not a parameter"),
        (
            lambda opt: {**_full(opt), listing(opt)[1]: torch.ones(4)},
            ValueError,
            r"hessian for param_groups\[0\]\['params'\]\[1\]: shape \(4,\) does not match the parameter's \(5,\)",
        ),
        (
            lambda opt: [*list(_full(opt).values())[:3], 1.0],
            TypeError,
            r"param_groups\[1\]\['params'\]\[1\]: expected a tensor, got a float",
        ),
        (
            lambda opt: {p: torch.ones_like(p, dtype=torch.int64) for p in listing(opt)},
            ValueError,
            "expected a floating-point tensor",
        ),
        (
            lambda opt: {p: torch.ones_like(p, device="meta") for p in listing(opt)},
            ValueError,
            "on meta, the parameter is on cpu",
        ),
    ],
    ids=["tensor", "generator", "short-list", "stray-tensor", "stray-key", "shape", "not-tensor", "int", "device"],
)
def test_refuses_malformed_hessians_before_the_closure(bad, error, match):
    opt, params = _fresh()
    calls = _assert_refused(opt, params, error, match, hessian=bad(opt))
    assert not calls


def test_refuses_an_estimate_for_only_part_of_a_group():
    opt, params = _fresh()
    partial = {params["w"]: torch.ones(6, 4), params["v"]: torch.ones(3, 8), params["gain"]: torch.ones(())}
    msg = r"hessian was given for some parameters of param group 0 but not for param_groups\[0\]\['params'\]\[1\]"
    _assert_refused(opt, params, ValueError, msg, hessian=partial)
    # without a gradient, the missing one is fine (skipped as its gradient is), and so is a group without any
    params["b"].grad = None
    opt.step(hessian={params["w"]: torch.ones(6, 4)})


def test_refuses_a_hessian_with_flat_buffers():
    opt, params = _fresh(flat=True)
    _assert_refused(opt, params, ValueError, r"flat=True: step\(hessian=...\) is not supported", hessian=_full(opt))


@pytest.mark.parametrize("combinator", ["partition", "masked"])
def test_sophia_inside_partition_or_masked_gets_its_part_of_the_hessian(combinator):
    """partition / masked cut ``hessian`` to the parameters of the Sophia-G inside them: the ``"s"`` parameters step
    as torch.optim.SGD (momentum), the ``"h"`` ones as the ``sophia-opt`` reference (same loop as above)."""
    ref_mod = pytest.importorskip("sophia_opt")
    labels = ("s", "h", "h", "s")  # w, b, v, gain
    ref_params, mine = make_params(), make_params()
    names = list(SHAPES)
    pick = lambda ps, lab: [ps[k] for k, lb in zip(names, labels) if lb == lab]
    ref_sgd = torch.optim.SGD(pick(ref_params, "s"), lr=0.1, momentum=0.9)
    ref_sophia = ref_mod.SophiaG(pick(ref_params, "h"), lr=0.01)
    if combinator == "partition":
        tx = pureopt.partition({"s": pureopt.sgd(lr=0.1, momentum=0.9), "h": pureopt.sophia_g(lr=0.01)}, labels)
    else:
        is_h = tuple(lb == "h" for lb in labels)
        tx = pureopt.chain(
            pureopt.masked(pureopt.sgd(lr=0.1, momentum=0.9), tuple(not h for h in is_h)),
            pureopt.masked(pureopt.sophia_g(lr=0.01), is_h),
        )
    opt = pureopt.TorchOptimizer([mine[k] for k in names], tx)
    pending = None
    for t in range(STEPS):
        set_grads(ref_params, t)
        ref_sgd.step()
        ref_sophia.step(bs=B)
        set_grads(mine, t)
        opt.step(hessian=pending)
        pending = None
        for k, r in ref_params.items():
            torch.testing.assert_close(mine[k], r, **TOL, msg=lambda m, k=k, t=t: f"{k} at step {t}: {m}")
        if t % K == K - 1:
            for k, p in ref_params.items():
                p.grad = None if grad_of(k, p, t + 1) is None else sampled_grad(p, t)
            ref_sophia.update_hessian()
            skip = {id(mine[k]) for k in NONE_GRADS.get(t + 1, ())}
            pending = estimate(opt, t, "list", skip)


def test_refuses_a_repeated_parameter_with_two_estimates():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning):
        opt = pureopt.TorchOptimizer([p, p], pureopt.sophia_g, lr=0.01)
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="entries 0 and 1 are for the same parameter"):
        opt.step(hessian=[torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)])
    assert same_bits(p.detach(), torch.zeros(3, dtype=torch.float64))


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _run(opt: pureopt.TorchOptimizer, params: dict[str, torch.Tensor], steps: range) -> None:
    for t in steps:
        set_grads(params, t)
        est = {p: B * sampled_grad(p, t) ** 2 for p in params.values()} if t % K == 1 else None
        opt.step(hessian=est)


@pytest.mark.bitwise
def test_state_dict_resume_is_bitwise_an_uninterrupted_run():
    whole = make_params()
    opt = pureopt.TorchOptimizer(groups_of(whole), pureopt.sophia_g, lr=0.01)
    _run(opt, whole, range(STEPS))

    first = make_params()
    opt1 = pureopt.TorchOptimizer(groups_of(first), pureopt.sophia_g, lr=0.01)
    _run(opt1, first, range(STEPS // 2))
    buf = io.BytesIO()
    torch.save({"params": {k: p.detach() for k, p in first.items()}, "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = {k: v.clone().requires_grad_(True) for k, v in saved["params"].items()}
    opt2 = pureopt.TorchOptimizer(groups_of(resumed), pureopt.sophia_g, lr=0.01)
    opt2.load_state_dict(saved["opt"])
    _run(opt2, resumed, range(STEPS // 2, STEPS))

    for k in whole:
        assert same_bits(resumed[k].detach(), whole[k].detach()), k
        for key in ("step", "exp_avg", "hessian"):
            assert same_bits(opt2.state[resumed[k]][key], opt.state[whole[k]][key]), (k, key)
