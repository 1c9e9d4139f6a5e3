"""Extra primitives: clip_by_block_rms, adaptive_grad_clip, zero_nans, centralize, add_noise, keep_params_nonnegative.

Each is compared with its rule written out in the test with plain torch ops (loops over output units where the rule
is unit-wise), with torch.optim where the primitive feeds an optimizer, and (add_noise) with the closed-form
distribution of the noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from _checks import assert_unchanged, snapshot
from torch._dynamo.utils import counters

import pureopt
from pureopt import tree
from pureopt.transforms.adaptive_clip import adaptive_grad_clip
from pureopt.transforms.block_rms import clip_by_block_rms
from pureopt.transforms.centralize import centralize
from pureopt.transforms.constraints import keep_params_nonnegative
from pureopt.transforms.nans import ZeroNansState, zero_nans
from pureopt.transforms.noise import AddNoiseState, add_noise

F64 = torch.float64
SHAPES = {"linear": (4, 3), "conv": (3, 2, 3, 3), "bias": (4,), "gain": (), "empty": (0, 3), "row": (1, 5)}


def tensors(seed, scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, dtype=dtype, generator=gen) * scale for k, s in SHAPES.items()}


def run(tx, grads, params=None, state=None):
    state = tx.init(params if params is not None else grads) if state is None else state
    return tx.update(grads, state, params)


# --- clip_by_block_rms -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.1, 0.8, 10.0])
def test_clip_by_block_rms_matches_the_rule(threshold):
    g = tensors(0, scale=1.0)
    g["big"] = torch.full((2, 2), 3.0, dtype=F64)
    g["none"] = None
    u, _ = run(clip_by_block_rms(threshold), g)
    for k, x in g.items():
        if x is None:
            assert u[k] is None
            continue
        if x.numel() == 0:
            assert u[k].shape == x.shape
            continue
        rms = math.sqrt(sum(float(v) ** 2 for v in x.flatten()) / x.numel())
        want = x * (threshold / rms) if rms > threshold else x
        torch.testing.assert_close(u[k], want, rtol=1e-13, atol=1e-15)
        if rms <= threshold:
            assert torch.equal(u[k], x)


def test_clip_by_block_rms_validation():
    with pytest.raises(ValueError, match="Invalid threshold value: 0"):
        clip_by_block_rms(0)


# --- adaptive_grad_clip ----------------------------------------------------------------------------------------


def _agc_reference(g, p, clipping, eps):
    """Brock et al. 2021, unit-wise: output unit i of a weight is the slice [i]; vectors and scalars are one unit."""
    if g.ndim <= 1:
        units = [(...,)]
    else:
        units = [(i,) for i in range(g.shape[0])]
    out = g.clone()
    for unit in units:
        gi, pi = g[unit], p[unit]
        g_norm = math.sqrt(float((gi**2).sum()))
        w_norm = max(math.sqrt(float((pi**2).sum())), eps)
        if g_norm > clipping * w_norm:
            out[unit] = gi * (clipping * w_norm / max(g_norm, 1e-6))
    return out


@pytest.mark.parametrize("clipping", [0.01, 0.3, 5.0])
def test_adaptive_grad_clip_matches_the_unitwise_rule(clipping):
    params = tensors(1)
    params["linear"][2] = 0.0  # a unit at zero: eps floors its norm
    grads = tensors(2, scale=0.5)
    u, _ = run(adaptive_grad_clip(clipping, eps=1e-3), grads, params)
    clipped_some = False
    for k in grads:
        want = _agc_reference(grads[k], params[k], clipping, 1e-3)
        torch.testing.assert_close(u[k], want, rtol=1e-13, atol=1e-15)
        clipped_some |= not torch.equal(u[k], grads[k])
    assert clipped_some or clipping == 5.0


def test_adaptive_grad_clip_then_sgd_matches_torch_sgd_on_clipped_grads():
    params = tensors(3)
    tp = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(tp.values(), lr=0.1, momentum=0.9)
    tx = pureopt.chain(adaptive_grad_clip(0.05), pureopt.sgd(lr=0.1, momentum=0.9))
    state = tx.init(params)
    for step in range(10):
        g = tensors(10 + step)
        for k, t in tp.items():
            t.grad = _agc_reference(g[k], t.detach(), 0.05, 1e-3)
        opt.step()
        u, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, u)
        for k in params:
            torch.testing.assert_close(params[k], tp[k].detach(), rtol=1e-10, atol=1e-12)


def test_adaptive_grad_clip_needs_params_and_validates():
    with pytest.raises(ValueError, match="needs the parameters"):
        run(adaptive_grad_clip(0.1), {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="Invalid clipping value"):
        adaptive_grad_clip(0.0)


# --- zero_nans -----------------------------------------------------------------------------------------------------


def test_zero_nans_replaces_nans_keeps_infs_and_records():
    g = {"a": torch.tensor([1.0, float("nan"), float("inf")]), "b": torch.ones(2), "c": None}
    tx = zero_nans()
    state = tx.init({"a": torch.zeros(3), "b": torch.zeros(2), "c": torch.zeros(1)})
    assert isinstance(state, ZeroNansState) and not bool(state.found_nan["a"])
    u, state = tx.update(g, state)
    assert torch.equal(u["a"], torch.tensor([1.0, 0.0, float("inf")]))
    assert u["b"] is not None and torch.equal(u["b"], g["b"]) and u["c"] is None
    assert bool(state.found_nan["a"]) and not bool(state.found_nan["b"]) and not bool(state.found_nan["c"])
    u, state = tx.update({"a": torch.ones(3), "b": torch.ones(2), "c": None}, state)
    assert not bool(state.found_nan["a"])


# --- centralize ------------------------------------------------------------------------------------------------------


def _centralize_reference(g):
    if g.ndim <= 1:
        return g
    out = g.clone()
    for i in range(g.shape[0]):
        out[i] = g[i] - g[i].sum() / g[i].numel() if g[i].numel() else g[i]
    return out


def test_centralize_matches_the_rule():
    g = tensors(4)
    u, _ = run(centralize(), g)
    for k in g:
        torch.testing.assert_close(u[k], _centralize_reference(g[k]), rtol=1e-12, atol=1e-14)
        if g[k].ndim > 1 and g[k].numel():
            torch.testing.assert_close(
                u[k].flatten(1).mean(1), torch.zeros(g[k].shape[0], dtype=F64), atol=1e-14, rtol=0
            )
    assert u["bias"] is g["bias"]


def test_centralize_then_sgd_matches_torch_sgd_with_centralized_grads():
    params = tensors(5)
    tp = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(tp.values(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tx = pureopt.chain(centralize(), pureopt.sgd(lr=0.05, momentum=0.9, weight_decay=1e-3))
    state = tx.init(params)
    for step in range(10):
        g = tensors(20 + step)
        for k, t in tp.items():
            t.grad = _centralize_reference(g[k])
        opt.step()
        u, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, u)
        for k in params:
            torch.testing.assert_close(params[k], tp[k].detach(), rtol=1e-10, atol=1e-12)


# --- keep_params_nonnegative -----------------------------------------------------------------------------------


def test_keep_params_nonnegative_matches_the_rule_and_lands_on_zero():
    p = {"a": torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=F64)}
    u0 = {"a": torch.tensor([-1.0, -0.5, 0.3, -2.0], dtype=F64)}
    u, _ = run(keep_params_nonnegative(), u0, p)
    want = torch.where(p["a"] + u0["a"] < 0, -p["a"], u0["a"])
    torch.testing.assert_close(u["a"], want, rtol=0, atol=0)
    assert torch.equal(pureopt.apply_updates(p, u)["a"], torch.tensor([0.0, 0.5, 0.3, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="needs the parameters"):
        run(keep_params_nonnegative(), u0)


def test_keep_params_nonnegative_after_sgd_stays_in_the_orthant():
    params = {"w": torch.rand(50, dtype=F64)}
    tx = pureopt.chain(pureopt.sgd(lr=0.5), keep_params_nonnegative())
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = {"w": torch.randn(50, dtype=F64, generator=gen)}
        u, state = tx.update(g, state, params)
        want = torch.clamp(params["w"] - 0.5 * g["w"], min=0.0)  # the projection onto p >= 0
        params = pureopt.apply_updates(params, u)
        torch.testing.assert_close(params["w"], want, rtol=1e-15, atol=1e-15)


# --- add_noise -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_add_noise_has_the_annealed_gaussian_distribution(dtype):
    eta, gamma = 0.3, 0.55
    tx = add_noise(eta, gamma, seed=7)
    zeros = {"big": torch.zeros(300, 400, dtype=dtype), "small": torch.zeros(50, dtype=dtype)}
    state = tx.init(zeros)
    assert isinstance(state, AddNoiseState)
    previous = None
    for t in range(1, 4):
        u, state = tx.update(zeros, state)
        z = u["big"].flatten().to(F64)
        sigma = math.sqrt(eta / t**gamma)
        n = z.numel()
        # mean ~ N(0, sigma^2/n); std within a few standard errors; P(|z| < sigma) = erf(1/sqrt 2)
        assert abs(float(z.mean())) < 5 * sigma / math.sqrt(n)
        assert abs(float(z.std()) / sigma - 1) < 5 / math.sqrt(2 * n)
        inside = float((z.abs() < sigma).to(F64).mean())
        assert abs(inside - math.erf(1 / math.sqrt(2))) < 5 * math.sqrt(0.68 * 0.32 / n)
        # fourth moment of a normal: 3 sigma^4
        assert abs(float((z**4).mean()) / sigma**4 - 3) < 0.1
        if previous is not None:  # a fresh draw every step
            assert abs(float(torch.corrcoef(torch.stack([z, previous]))[0, 1])) < 0.02
        previous = z
        assert u["big"].dtype == dtype


def test_add_noise_is_reproducible_and_depends_on_the_seed_and_the_leaf():
    params = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    tx = add_noise(1.0, 0.0, seed=1)
    s1 = tx.init(params)
    u1, _ = tx.update(params, s1)
    u1_again, _ = tx.update(params, s1)
    assert torch.equal(u1["a"], u1_again["a"])  # the same state gives the same noise
    u2, _ = add_noise(1.0, 0.0, seed=2).update(params, add_noise(1.0, 0.0, seed=2).init(params))
    assert abs(float(torch.corrcoef(torch.stack([u1["a"], u2["a"]]))[0, 1])) < 0.15
    assert abs(float(torch.corrcoef(torch.stack([u1["a"], u1["b"]]))[0, 1])) < 0.15
    # changing the seed in the state is the same as building the transform with that seed
    u3, _ = tx.update(params, s1._replace(seed=torch.tensor(2)))
    assert torch.equal(u3["a"], u2["a"])


def test_add_noise_keeps_complex_and_none():
    tx = add_noise(1.0, 0.0, seed=0)
    g = {"c": torch.zeros(2000, dtype=torch.complex64), "n": None}
    u, _ = tx.update(g, tx.init({"c": g["c"], "n": torch.zeros(1)}))
    assert u["n"] is None and u["c"].dtype == torch.complex64
    assert abs(float(u["c"].real.std()) - 1) < 0.1 and abs(float(u["c"].imag.std()) - 1) < 0.1
    assert abs(float(torch.corrcoef(torch.stack([u["c"].real, u["c"].imag]))[0, 1])) < 0.1


def test_add_noise_validation():
    with pytest.raises(ValueError, match="Invalid eta value"):
        add_noise(-1.0)
    with pytest.raises(ValueError, match="Invalid seed value"):
        add_noise(1.0, 0.5, seed=1.5)


# --- purity, vmap, compile -------------------------------------------------------------------------------------------


def _all():
    return {
        "block_rms": clip_by_block_rms(0.5),
        "agc": adaptive_grad_clip(0.1),
        "zero_nans": zero_nans(),
        "centralize": centralize(),
        "noise": add_noise(0.1, 0.55, seed=3),
        "nonneg": keep_params_nonnegative(),
    }


@pytest.mark.parametrize("name", list(_all()))
def test_primitives_are_pure(name):
    tx = _all()[name]
    params = tensors(0, dtype=torch.float32)
    state = tx.init(params)
    for step in range(3):
        g = tensors(1 + step, dtype=torch.float32)
        g["linear"][0, 0] = float("nan") if step == 1 else g["linear"][0, 0]
        snaps = snapshot(params), snapshot(g), snapshot(state)
        u, new_state = tx.update(g, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(g, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, u), new_state


@pytest.mark.parametrize("name", list(_all()))
def test_primitives_under_vmap_match_each_model_alone(name):
    tx = _all()[name]
    batch = 3
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(batch, *s, generator=gen) for k, s in SHAPES.items()}
    grads = {k: torch.randn(batch, *s, generator=gen) for k, s in SHAPES.items()}
    state = torch.func.vmap(tx.init)(params)
    if name == "noise":  # one seed per model
        state = state._replace(seed=torch.tensor([5, 6, 7]))
    u, new_state = torch.func.vmap(tx.update)(grads, state, params)
    for i in range(batch):
        pick = lambda t, i=i: tree.tree_map(lambda x: x[i], t)
        want_u, want_s = tx.update(pick(grads), pick(state), pick(params))
        for a, b in zip(tree.leaves(pick(u)), tree.leaves(want_u)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(tree.leaves(pick(new_state)), tree.leaves(want_s)):
            torch.testing.assert_close(a, b)
    if name == "noise":
        assert not torch.equal(u["linear"][0], u["linear"][1])


@pytest.mark.parametrize("name", list(_all()))
def test_primitives_compile_without_graph_breaks(name):
    tx = _all()[name]
    params, grads = tensors(0), tensors(1)
    state = tx.init(params)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    got_u, got_s = compiled(grads, state, params)
    want_u, want_s = tx.update(grads, state, params)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(tree.leaves((got_u, got_s)), tree.leaves((want_u, want_s))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
