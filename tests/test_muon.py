"""muon against torch.optim.Muon itself (25 steps, fp64 and fp32, loop and foreach), plus the Newton-Schulz
iteration against the SVD's polar factor, an independent bf16/fp32 reference, purity, validation and convergence.

Muon only takes 2-D parameters, so this file has its own harness (a small tanh network of a tall, a square and a
wide weight matrix) instead of ``tests/_parity.py``'s default shapes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot

import pureopt
from pureopt.algorithms.muon import MuonState, muon, scale_by_muon
from pureopt.base import apply_updates
from pureopt.combine import chain
from pureopt.kernels.muon import newton_schulz
from pureopt.transforms.muon import orthogonalize
from pureopt.transforms.scale import scale_by_learning_rate
from pureopt.transforms.weight_decay import add_decayed_weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: intra-op threads only add contention on a shared machine (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = {"w_in": (8, 4), "w_mid": (8, 8), "w_out": (3, 8)}  # tall, square, wide
NONE_GRADS = {0: ("w_out",), 3: ("w_mid",), 9: ("w_in", "w_out"), 17: ("w_mid",)}
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def make_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for k, s in SHAPES.items()}


def make_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w_in"].T)
    h = torch.tanh(h @ params["w_mid"].T)
    return ((h @ params["w_out"].T - y) ** 2).mean()


def grads_at(params: dict[str, torch.Tensor], step: int, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    g: dict[str, Any] = torch.func.grad(loss_fn)(params, *data)
    for name in NONE_GRADS.get(step, ()):
        g[name] = None
    return g


def momentum_buffers(state: Any) -> Any:
    """The ``momentum_buffer`` tree of a Muon state, also inside a chain's tuple of states."""
    if isinstance(state, MuonState):
        return state.momentum_buffer
    return next(momentum_buffers(s) for s in state if isinstance(s, MuonState))


def run_parity(
    torch_factory: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer],
    tx: Any,
    dtype: torch.dtype,
    steps: int = 25,
    tol: dict[str, float] | None = None,
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Both sides from the same start, each with gradients at its own parameters; params and momentum buffers
    compared after every step."""
    tol = tol or TOL[dtype]
    data = make_data(dtype)
    init = make_params(dtype)
    names = list(init)
    torch_params = [t.clone().requires_grad_(True) for t in init.values()]
    opt = torch_factory(torch_params)
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    for step in range(steps):
        tg = grads_at({k: t.detach() for k, t in zip(names, torch_params)}, step, data)
        for k, t in zip(names, torch_params):
            t.grad = None if tg[k] is None else tg[k].clone()
        if before_step is not None:
            before_step(step, opt)
        opt.step()
        updates, state = tx.update(grads_at(params, step, data), state, params)
        params = apply_updates(params, updates)
        for k, t in zip(names, torch_params):
            assert params[k].dtype == dtype
            torch.testing.assert_close(params[k], t.detach(), **tol, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
            theirs = opt.state.get(t, {}).get("momentum_buffer")
            mine = momentum_buffers(state)[k]
            if theirs is None:  # never had a gradient: the state is still at its initial zeros
                assert torch.equal(mine, torch.zeros_like(mine)), f"{k} @ {step}"
            else:
                torch.testing.assert_close(mine, theirs, **tol, msg=lambda m, k=k, s=step: f"buf {k} @ {s}: {m}")
    return params


def _id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items())


GRID = [
    dict(nesterov=n, weight_decay=wd, adjust_lr_fn=a)
    for n, wd, a in itertools.product([True, False], [0.0, 0.1], [None, "original", "match_rms_adamw"])
]


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", GRID, ids=_id)
def test_muon_matches_torch(flags, dtype, impl):
    run_parity(lambda p: torch.optim.Muon(p, lr=0.02, **flags), muon(lr=0.02, impl=impl, **flags), dtype)


EXTRA = [
    dict(momentum=0.0, nesterov=False),
    dict(momentum=0.0, nesterov=True),
    dict(momentum=0.5, weight_decay=0.3),
    dict(ns_coefficients=(1.5, -0.5, 0.0), ns_steps=8, eps=1e-4),
    dict(ns_steps=0),
    dict(ns_steps=2, adjust_lr_fn="match_rms_adamw", momentum=0.9),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", EXTRA, ids=_id)
def test_muon_other_hyperparameters_match_torch(flags, dtype):
    run_parity(lambda p: torch.optim.Muon(p, lr=0.05, **flags), muon(lr=0.05, **flags), dtype)


def test_defaults_match_torch():
    run_parity(torch.optim.Muon, muon(), torch.float64)


def test_tensor_lr_matches_torch_and_is_read_at_each_update():
    lr = torch.tensor(0.02, dtype=torch.float64)
    torch_lr = torch.tensor(0.02, dtype=torch.float64)

    def before(step, opt):
        if step == 10:
            lr.fill_(0.005)
            torch_lr.fill_(0.005)

    run_parity(lambda p: torch.optim.Muon(p, lr=torch_lr), muon(lr=lr), torch.float64, before_step=before)


def test_schedule_lr_matches_torch_with_manual_lr():
    def schedule(count):
        return 0.05 * 0.9 ** torch.as_tensor(count, dtype=torch.float64)

    def before(step, opt):
        opt.param_groups[0]["lr"] = 0.05 * 0.9**step

    run_parity(lambda p: torch.optim.Muon(p, lr=0.05), muon(lr=schedule), torch.float64, before_step=before)


def test_bf16_params_match_torch():
    """bf16 parameters and buffers, as torch keeps them (nesterov: see the next test for nesterov=False).

    Tolerance: one bf16 ulp, over 12 steps. The pure API returns ``p_new - p`` rounded to bf16 and
    ``apply_updates`` rounds ``p + (p_new - p)``, where torch rounds ``p_new`` once: near a sign change the two can
    differ by an ulp, which then feeds the next (bf16) gradients and grows slowly.
    """
    run_parity(
        lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1),
        muon(lr=0.02, weight_decay=0.1),
        torch.bfloat16,
        steps=12,
        tol={"rtol": 8e-3, "atol": 1e-3},
    )


def test_bf16_without_nesterov_keeps_its_buffer_unlike_torch():
    """torch 2.13 normalises a bf16 momentum buffer in place when nesterov=False (its bf16 cast is a no-op, so
    the Newton-Schulz iterate aliases the buffer); pureopt's buffer is the plain running average."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=gen).bfloat16()
    g = torch.randn(4, 3, generator=gen).bfloat16()
    tx = muon(lr=0.1, momentum=0.9, nesterov=False)
    _, state = tx.update((g,), tx.init((p,)), (p,))
    torch.testing.assert_close(state.momentum_buffer[0], torch.lerp(torch.zeros_like(g), g, 0.1), rtol=0, atol=0)


# --- an independent reference: the update rule written out with plain torch ops -----------------------------------


def reference_newton_schulz(g: torch.Tensor, coeffs: tuple[float, float, float], steps: int, eps: float, dtype):
    """X <- a X + b (X X^T) X + c (X X^T)^2 X on the wide orientation, after scaling to unit Frobenius norm."""
    a, b, c = coeffs
    wide = g.shape[0] <= g.shape[1]
    x = (g if wide else g.mT).to(dtype)
    x = x / torch.clamp(torch.linalg.matrix_norm(x), min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * torch.linalg.matrix_power(gram, 2)) @ x
    return x if wide else x.mT


def reference_muon_step(
    param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, wd: float, mom: float, ns_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Muon step (Nesterov, default coefficients, "original" scaling) in the buffer's dtype, from the paper."""
    buf = mom * buf + (1 - mom) * grad
    direction = (1 - mom) * grad + mom * buf
    o = reference_newton_schulz(direction, (3.4445, -4.7750, 2.0315), 5, 1e-7, ns_dtype).to(buf.dtype)
    rows, cols = o.shape
    return param * (1 - lr * wd) - lr * math.sqrt(max(1, rows / cols)) * o, buf


def test_bf16_params_with_fp32_state_match_the_update_rule():
    """bf16 weights, fp32 buffers and an fp32 iteration: the fp32 step rounded to bf16 once per step."""
    lr, wd, mom = 0.02, 0.1, 0.95
    data = make_data(torch.float32)
    params = {k: v.bfloat16() for k, v in make_params(torch.float32).items()}
    ref_params = {k: v.clone() for k, v in params.items()}
    ref_bufs = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in params.items()}
    tx = muon(lr=lr, weight_decay=wd, momentum=mom, state_dtype=torch.float32, ns_dtype=torch.float32)
    state = tx.init(params)
    assert all(b.dtype == torch.float32 for b in state.momentum_buffer.values())
    for step in range(10):
        g = torch.func.grad(loss_fn)({k: v.float() for k, v in ref_params.items()}, *data)
        for k in ref_params:
            new, ref_bufs[k] = reference_muon_step(ref_params[k].float(), g[k], ref_bufs[k], lr, wd, mom, torch.float32)
            ref_params[k] = new.bfloat16()
        grads = torch.func.grad(loss_fn)({k: v.float() for k, v in params.items()}, *data)  # fp32 grads
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
        for k in params:
            assert params[k].dtype == torch.bfloat16 and state.momentum_buffer[k].dtype == torch.float32
            # at most one bf16 ulp apart, where an fp32 rounding difference tips the bf16 rounding
            torch.testing.assert_close(params[k], ref_params[k], rtol=8e-3, atol=1e-4, msg=f"{k} @ {step}")
            torch.testing.assert_close(state.momentum_buffer[k], ref_bufs[k], rtol=1e-4, atol=1e-6)


def test_bf16_params_with_fp32_state_match_torch_on_rounded_fp32_weights():
    """torch.optim.Muon on fp32 weights that are rounded to bf16 after every step is exactly bf16 storage with
    fp32 buffers (torch's iteration runs in bf16 either way)."""
    lr, wd = 0.02, 0.1
    data = make_data(torch.float32)
    params = {k: v.bfloat16() for k, v in make_params(torch.float32).items()}
    names = list(params)
    torch_params = [v.float().requires_grad_(True) for v in params.values()]
    opt = torch.optim.Muon(torch_params, lr=lr, weight_decay=wd)
    tx = muon(lr=lr, weight_decay=wd, state_dtype=torch.float32)
    state = tx.init(params)
    for step in range(25):
        g = torch.func.grad(loss_fn)({k: t.detach() for k, t in zip(names, torch_params)}, *data)
        for k, t in zip(names, torch_params):
            t.grad = g[k]
        opt.step()
        with torch.no_grad():
            for t in torch_params:
                t.copy_(t.bfloat16().float())
        grads = torch.func.grad(loss_fn)({k: v.float() for k, v in params.items()}, *data)
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
        for k, t in zip(names, torch_params):
            torch.testing.assert_close(params[k].float(), t.detach(), rtol=0, atol=0, msg=f"{k} @ {step}")
            torch.testing.assert_close(state.momentum_buffer[k], opt.state[t]["momentum_buffer"], rtol=0, atol=0)


# --- Newton-Schulz against closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_cubic_newton_schulz_converges_to_the_polar_factor(shape):
    gen = torch.Generator().manual_seed(2)
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=gen, dtype=torch.float64), full_matrices=False)
    g = u @ torch.diag(torch.linspace(1.0, 0.2, min(shape), dtype=torch.float64)) @ vh  # condition number 5
    tx = orthogonalize((1.5, -0.5, 0.0), ns_steps=40, ns_dtype=torch.float64)
    out, _ = tx.update({"g": g}, tx.init({"g": g}))
    torch.testing.assert_close(out["g"], u @ vh, rtol=1e-12, atol=1e-12)
    assert out["g"].dtype == torch.float64


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (12, 12)])
def test_quintic_newton_schulz_matches_its_polynomial_and_lands_near_one(shape):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    coeffs = (3.4445, -4.7750, 2.0315)
    exact = newton_schulz(g, coeffs, 5, 1e-7, torch.float64)
    torch.testing.assert_close(
        exact, reference_newton_schulz(g, coeffs, 5, 1e-7, torch.float64), rtol=1e-10, atol=1e-12
    )
    # the bf16 iteration torch uses: singular values roughly in [0.5, 1.5] (Jordan, 2024), not exactly 1
    svals = torch.linalg.svdvals(newton_schulz(g).double())
    assert svals.min() > 0.4 and svals.max() < 1.4, svals
    assert newton_schulz(g).dtype == torch.bfloat16 and newton_schulz(g).shape == shape


def test_newton_schulz_of_zero_is_zero():
    out = newton_schulz(torch.zeros(3, 5))
    assert torch.equal(out, torch.zeros(3, 5, dtype=torch.bfloat16))


def test_scale_by_muon_chain_matches_torch():
    """chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate) is Muon, up to rounding."""
    lr, wd = 0.02, 0.1
    tx = chain(scale_by_muon(adjust_lr_fn="match_rms_adamw"), add_decayed_weights(wd), scale_by_learning_rate(lr))
    run_parity(lambda p: torch.optim.Muon(p, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"), tx, torch.float64)


def test_vmap_over_an_ensemble_matches_the_update_rule_per_member():
    """An ensemble: one state per member, vmapped. vmap's batching rule for ``addmm`` rounds a bfloat16 iteration
    differently from the unbatched call (so torch's bf16 numerics cannot be reproduced under vmap); with an fp64
    iteration each member follows the update rule to fp64 precision."""
    members, lr, wd, mom = 3, 0.02, 0.1, 0.95
    data = make_data(torch.float64)
    inits = [make_params(torch.float64, seed=s) for s in range(members)]
    stacked = {k: torch.stack([p[k] for p in inits]) for k in SHAPES}
    tx = muon(lr=lr, weight_decay=wd, momentum=mom, ns_dtype=torch.float64)  # impl="auto": per-tensor path
    state = torch.func.vmap(tx.init)(stacked)
    refs = [{k: v.clone() for k, v in p.items()} for p in inits]
    ref_bufs = [{k: torch.zeros_like(v) for k, v in p.items()} for p in inits]
    for _ in range(5):
        for ref, bufs in zip(refs, ref_bufs):
            g = torch.func.grad(loss_fn)(ref, *data)
            for k in ref:
                ref[k], bufs[k] = reference_muon_step(ref[k], g[k], bufs[k], lr, wd, mom, torch.float64)
        grads = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(0, None, None))(stacked, *data)
        updates, state = torch.func.vmap(tx.update)(grads, state, stacked)
        stacked = apply_updates(stacked, updates)
        for i, ref in enumerate(refs):
            for k in SHAPES:
                torch.testing.assert_close(stacked[k][i], ref[k], **TOL[torch.float64])
                torch.testing.assert_close(state.momentum_buffer[k][i], ref_bufs[i][k], **TOL[torch.float64])


# --- convergence --------------------------------------------------------------------------------------------------


def test_converges_on_a_least_squares_matrix_problem():
    """min_W ||W X - Y||^2 with Y = W* X: Muon with a decaying learning rate reaches W*."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=gen)
    w_star = torch.randn(6, 4, generator=gen)
    y = w_star @ x
    steps = 300

    def lsq(p):
        return ((p["w"] @ x - y) ** 2).mean()

    tx = muon(lr=lambda c: 0.1 * (1 - c / steps), weight_decay=0.0)
    params = {"w": torch.zeros(6, 4)}
    state = tx.init(params)
    start = float(lsq(params))
    for _ in range(steps):
        updates, state = tx.update(torch.func.grad(lsq)(params), state, params)
        params = apply_updates(params, updates)
    assert float(lsq(params)) < 1e-4 * start
    torch.testing.assert_close(params["w"], w_star, rtol=0.0, atol=2e-2 * float(w_star.abs().max()))


# --- purity, state, errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_never_mutates_inputs(impl, nesterov, dtype):
    tx = muon(lr=0.1, weight_decay=0.1, nesterov=nesterov, impl=impl)
    params = {k: v.to(dtype) for k, v in make_params(torch.float32).items()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads: dict[str, Any] = {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in params.items()}
        if step == 1:
            grads["w_mid"] = None
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        for what, tree, snap in zip(("params", "grads", "state"), (params, grads, state), snaps):
            assert_unchanged(tree, snap, what)
        if step == 1:
            assert updates["w_mid"] is None and new_state.momentum_buffer["w_mid"] is state.momentum_buffer["w_mid"]
        params, state = apply_updates(params, updates), new_state


def test_state_record():
    state = muon().init(make_params(torch.float32))
    assert isinstance(state, MuonState) and state._fields == ("num_updates", "momentum_buffer")
    assert state.num_updates.dtype == torch.int64 and int(state.num_updates) == 0
    assert all(torch.equal(b, torch.zeros(SHAPES[k])) for k, b in state.momentum_buffer.items())


BAD_CONSTRUCTOR_ARGS = [
    dict(lr=-1.0),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(lr=torch.tensor(-0.5)),
    dict(momentum=-0.1),
    dict(weight_decay=-0.01),
    dict(adjust_lr_fn="sqrt"),
    dict(lr=-1.0, momentum=-0.1),  # the first failing check wins, in torch's order
]


@pytest.mark.parametrize("kwargs", BAD_CONSTRUCTOR_ARGS, ids=str)
def test_invalid_hyperparameters_use_torch_wording(kwargs):
    p = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([p], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        muon(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(ns_steps=100), dict(ns_coefficients=(3.0, -4.0))], ids=str)
def test_newton_schulz_arguments_are_checked_at_construction_with_torch_wording(kwargs):
    p = torch.zeros(2, 2, requires_grad=True)
    opt = torch.optim.Muon([p], **kwargs)
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError) as theirs:  # torch only notices when it steps
        opt.step()
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        muon(**kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        scale_by_muon(**kwargs)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()], ids=str)
def test_non_matrix_parameters_are_rejected_with_torch_wording(shape):
    p = torch.zeros(shape, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([torch.zeros(2, 2, requires_grad=True), p])
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        muon().init({"ok": torch.zeros(2, 2), "bad": torch.zeros(shape)})


def test_complex_parameters_are_rejected_with_torch_wording():
    p = torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)
    opt = torch.optim.Muon([p])
    p.grad = torch.ones(2, 2, dtype=torch.complex64)
    with pytest.raises(RuntimeError) as theirs:
        opt.step()
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        muon().init({"z": torch.zeros(2, 2, dtype=torch.complex64)})


def test_orthogonalize_rejects_non_matrix_updates():
    tx = orthogonalize()
    with pytest.raises(ValueError, match="only supports 2D updates"):
        tx.update({"b": torch.ones(3)}, tx.init({"b": torch.ones(3)}))


@pytest.mark.parametrize("nesterov", [True, False])
def test_applied_scale_by_muon_adds_the_orthogonalised_direction(nesterov):
    # inplace_step applies the step itself (a few matrices at a time on the CPU): for scale_by_muon, p + O * ratio,
    # O the Newton-Schulz iterate of the momentum written out here (the iteration in float64: no bfloat16 roundings
    # in other operation orders)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g) for s in [(64, 32), (32, 48), (16, 16)]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    applied = [p.clone() for p in params]
    tx = pureopt.scale_by_muon(nesterov=nesterov, ns_dtype=torch.float64)
    pureopt.inplace_step(tx, grads, tx.init(params), applied)
    for p, q, gr in zip(params, applied, grads):
        buf = torch.lerp(torch.zeros_like(gr), gr, 1 - 0.95)
        u = torch.lerp(gr, buf, 0.95) if nesterov else buf
        o = reference_newton_schulz(u, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float64)
        ratio = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        torch.testing.assert_close(q, p + o.float() * ratio, rtol=1e-5, atol=1e-6)
