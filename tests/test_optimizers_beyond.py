"""Optimizers torch.optim lacks, each against its paper's update rule written out here as a per-parameter loop.

The references below use plain torch ops on one tensor at a time (and Python floats for the scalars), in the
papers' notation; they never call pureopt. Each run takes 25 steps on tests/_parity.py's small model (a 0-d and an
empty parameter, and steps where some gradients are None) and compares the parameters after every step, plus the
state fields named like the reference's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import NONE_GRADS, grads_at, loss_fn, make_data, make_params, tolerances

import pureopt
from pureopt.algorithms.adabelief import adabelief, scale_by_belief
from pureopt.algorithms.adan import adan, scale_by_adan
from pureopt.algorithms.ademamix import ademamix, scale_by_ademamix
from pureopt.algorithms.lamb import lamb
from pureopt.algorithms.lars import lars
from pureopt.algorithms.lion import lion, scale_by_lion
from pureopt.algorithms.novograd import novograd, scale_by_novograd
from pureopt.algorithms.schedule_free import schedule_free_adamw, schedule_free_eval_params, schedule_free_sgd
from pureopt.algorithms.sign_sgd import scale_by_sign, scale_by_signum, sign_sgd, signum
from pureopt.algorithms.yogi import scale_by_yogi, yogi
from pureopt.base import inplace_step
from pureopt.transforms.trust_ratio import scale_by_trust_ratio

DTYPES = [torch.float64, torch.float32]
IMPLS = ["loop", "foreach"]


# ================================================================================================================
# References: the papers' rules, one parameter at a time
# ================================================================================================================


class Ref:
    """A reference optimizer: ``begin(k)`` once per update, then ``step(name, p, g, st)`` per parameter with a
    gradient (``st`` is that parameter's state dict). ``g`` is always the gradient of the minimised objective."""

    def __init__(self, lr: float | Callable[[int], float], **hp: Any) -> None:
        self._lr = lr
        self.hp = hp
        self.k = 0

    @property
    def lr(self) -> float:
        return float(self._lr(self.k)) if callable(self._lr) else float(self._lr)

    def begin(self, k: int) -> None:
        self.k = k

    def step(self, name: str, p: torch.Tensor, g: torch.Tensor, st: dict) -> torch.Tensor:
        raise NotImplementedError


def _norm(x: torch.Tensor) -> float:
    return float(torch.sqrt((x * x).sum()))


class LionRef(Ref):
    """Chen et al. 2023, Algorithm 2."""

    def step(self, name, p, g, st):
        b1, b2 = self.hp.get("betas", (0.9, 0.99))
        wd = self.hp.get("weight_decay", 0.0)
        m = st.get("exp_avg", torch.zeros_like(p))
        c = b1 * m + (1 - b1) * g
        new_p = p - self.lr * (torch.sign(c) + wd * p)
        st["exp_avg"] = b2 * m + (1 - b2) * g
        return new_p


class LambRef(Ref):
    """You et al. 2020, Algorithm 2 (phi = identity)."""

    def step(self, name, p, g, st):
        b1, b2 = self.hp.get("betas", (0.9, 0.999))
        eps, wd = self.hp.get("eps", 1e-6), self.hp.get("weight_decay", 0.0)
        t = st["step"] = st.get("step", 0) + 1
        m = st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        u = r + wd * p
        pn, un = _norm(p), _norm(u)
        ratio = pn / un if pn > 0 and un > 0 else 1.0
        return p - self.lr * ratio * u


class LarsRef(Ref):
    """You, Gitman & Ginsburg 2017, Algorithm 1 (with Nesterov and an exclusion set as options)."""

    def step(self, name, p, g, st):
        mom, wd = self.hp.get("momentum", 0.9), self.hp.get("weight_decay", 0.0)
        eta, eps = self.hp.get("trust_coefficient", 1e-3), self.hp.get("eps", 0.0)
        if name in self.hp.get("excluded", ()):
            local, d = 1.0, g
        else:
            wn, gn = _norm(p), _norm(g)
            local = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
            d = g + wd * p
        step = self.lr * local * d
        if mom == 0:
            return p - step
        v = st["momentum_buffer"] = mom * st.get("momentum_buffer", torch.zeros_like(p)) + step
        return p - (step + mom * v if self.hp.get("nesterov", False) else v)


class AdaBeliefRef(Ref):
    """Zhuang et al. 2020, Algorithm 2."""

    def step(self, name, p, g, st):
        b1, b2 = self.hp.get("betas", (0.9, 0.999))
        eps, wd = self.hp.get("eps", 1e-16), self.hp.get("weight_decay", 0.0)
        decoupled = self.hp.get("decoupled_weight_decay", True)
        if not decoupled:
            g = g + wd * p
        t = st["step"] = st.get("step", 0) + 1
        m = st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        s = st["exp_avg_var"] = b2 * st.get("exp_avg_var", torch.zeros_like(p)) + (1 - b2) * (g - m) ** 2 + eps
        if self.hp.get("amsgrad", False):
            s = st["max_exp_avg_var"] = torch.maximum(st.get("max_exp_avg_var", torch.zeros_like(p)), s)
        new_p = p - self.lr * (m / (1 - b1**t)) / (torch.sqrt(s / (1 - b2**t)) + eps)
        return new_p - self.lr * wd * p if decoupled else new_p


class YogiRef(Ref):
    """Zaheer et al. 2018, Algorithm 2 (+ Adam's debiasing when bias_correction)."""

    def step(self, name, p, g, st):
        b1, b2 = self.hp.get("betas", (0.9, 0.999))
        eps, wd = self.hp.get("eps", 1e-3), self.hp.get("weight_decay", 0.0)
        g = g + wd * p
        t = st["step"] = st.get("step", 0) + 1
        m = st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
        v0 = st.get("exp_avg_sq", torch.full_like(p, self.hp.get("initial_accumulator_value", 1e-6)))
        v = st["exp_avg_sq"] = v0 - (1 - b2) * torch.sign(v0 - g * g) * g * g
        if self.hp.get("bias_correction", True):
            return p - self.lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        return p - self.lr * m / (torch.sqrt(v) + eps)


class NovoGradRef(Ref):
    """Ginsburg et al. 2019, Algorithm 1."""

    def step(self, name, p, g, st):
        b1, b2 = self.hp.get("betas", (0.95, 0.98))
        eps, wd = self.hp.get("eps", 1e-8), self.hp.get("weight_decay", 0.0)
        n2 = (g * g).sum()
        v = st["exp_avg_sq"] = n2 if "exp_avg_sq" not in st else b2 * st["exp_avg_sq"] + (1 - b2) * n2
        d = g / (torch.sqrt(v) + eps) + wd * p
        if self.hp.get("grad_averaging", False):
            d = (1 - b1) * d
        m = st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(p)) + d
        return p - self.lr * m


class SignumRef(Ref):
    """Bernstein et al. 2018: signSGD (momentum 0) and Signum."""

    def step(self, name, p, g, st):
        mom, wd = self.hp.get("momentum", 0.0), self.hp.get("weight_decay", 0.0)
        decoupled = self.hp.get("decoupled_weight_decay", False)
        if not decoupled:
            g = g + wd * p
        if mom != 0:
            g = st["momentum_buffer"] = mom * st.get("momentum_buffer", torch.zeros_like(p)) + (1 - mom) * g
        new_p = p - self.lr * torch.sign(g)
        return new_p - self.lr * wd * p if decoupled else new_p


class AdanRef(Ref):
    """Xie et al. 2022, Algorithm 1 in the paper's notation (beta_paper = 1 - beta_code), with debiasing."""

    def step(self, name, p, g, st):
        c1, c2, c3 = self.hp.get("betas", (0.98, 0.92, 0.99))
        b1, b2, b3 = 1 - c1, 1 - c2, 1 - c3  # the paper's betas
        eps, wd = self.hp.get("eps", 1e-8), self.hp.get("weight_decay", 0.0)
        t = st["step"] = st.get("step", 0) + 1
        g_prev = st.get("pre_grad", g)  # first step: no difference
        diff = g - g_prev
        m = st["exp_avg"] = (1 - b1) * st.get("exp_avg", torch.zeros_like(p)) + b1 * g
        v = st["exp_avg_diff"] = (1 - b2) * st.get("exp_avg_diff", torch.zeros_like(p)) + b2 * diff
        n = st["exp_avg_sq"] = (1 - b3) * st.get("exp_avg_sq", torch.zeros_like(p)) + b3 * (g + (1 - b2) * diff) ** 2
        st["pre_grad"] = g
        m_hat, v_hat, n_hat = m / (1 - (1 - b1) ** t), v / (1 - (1 - b2) ** t), n / (1 - (1 - b3) ** t)
        eta = self.lr / (torch.sqrt(n_hat) + eps)
        step = eta * (m_hat + (1 - b2) * v_hat)
        if self.hp.get("no_prox", False):
            return p * (1 - self.lr * wd) - step
        return (p - step) / (1 + self.lr * wd)


class ScheduleFreeRef(Ref):
    """Defazio et al. 2024 with x, y and z kept explicitly (the reference algorithm before eliminating x)."""

    def begin(self, k):
        super().begin(k)
        warm, r, power = self.hp.get("warmup_steps", 0), self.hp.get("r", 0.0), self.hp.get("weight_lr_power", 2.0)
        self.lr_k = self.lr * ((k + 1) / warm if k < warm else 1.0)
        self.lr_max = max(getattr(self, "lr_max", 0.0), self.lr_k)
        weight = (k + 1) ** r * self.lr_max**power
        self.weight_sum = getattr(self, "weight_sum", 0.0) + weight
        self.c = weight / self.weight_sum if self.weight_sum > 0 else 0.0

    def step(self, name, p, g, st):
        beta = self.hp["beta"]
        wd = self.hp.get("weight_decay", 0.0)
        z, x = st.get("z", p), st.get("x", p)
        if self.hp.get("adam", False):
            b2, eps = self.hp.get("beta2", 0.999), self.hp.get("eps", 1e-8)
            t = st["step"] = st.get("step", 0) + 1
            v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
            g = g / (torch.sqrt(v / (1 - b2**t)) + eps)
        d = g + wd * p  # p is y
        z = st["z"] = z - self.lr_k * d
        x = st["x"] = (1 - self.c) * x + self.c * z
        return (1 - beta) * z + beta * x


class AdEMAMixRef(Ref):
    """Pagliardini, Ablin & Grangier 2024, Algorithm 1 with the alpha and beta3 schedulers."""

    def step(self, name, p, g, st):
        b1, b2, b3 = self.hp.get("betas", (0.9, 0.999, 0.9999))
        alpha, eps, wd = self.hp.get("alpha", 2.0), self.hp.get("eps", 1e-8), self.hp.get("weight_decay", 0.0)
        t = st["step"] = st.get("step", 0) + 1
        if self.hp.get("alpha_warmup"):
            alpha = min(t * alpha / self.hp["alpha_warmup"], alpha)
        if self.hp.get("beta3_warmup"):
            a = t / self.hp["beta3_warmup"]
            lb1, lb3 = math.log(b1), math.log(b3)
            b3 = min(math.exp(lb1 * lb3 / ((1 - a) * lb3 + a * lb1)), b3)
        m1 = st["exp_avg_fast"] = b1 * st.get("exp_avg_fast", torch.zeros_like(p)) + (1 - b1) * g
        m2 = st["exp_avg_slow"] = b3 * st.get("exp_avg_slow", torch.zeros_like(p)) + (1 - b3) * g
        v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
        direction = (m1 / (1 - b1**t) + alpha * m2) / (torch.sqrt(v / (1 - b2**t)) + eps)
        return p - self.lr * (direction + wd * p)


# ================================================================================================================
# Harness
# ================================================================================================================


def find_field(state: Any, key: str) -> Any:
    if hasattr(state, "_fields"):
        if key in state._fields:
            return getattr(state, key)
        children = [getattr(state, f) for f in state._fields]
    elif isinstance(state, (tuple, list)):
        children = list(state)
    else:
        return None
    for child in children:
        found = find_field(child, key)
        if found is not None:
            return found
    return None


def gradients(params: dict, step: int, data: tuple, sign: float = 1.0) -> dict:
    """``_parity.grads_at`` with plain autograd (15x cheaper than ``torch.func.grad`` on this tiny model)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        values = torch.autograd.grad(sign * loss_fn(leaves, *data), list(leaves.values()))
    out: dict = dict(zip(leaves, values))
    for name in NONE_GRADS.get(step, ()):
        out[name] = None
    return out


def test_fast_gradients_equal_parity_harness_gradients():
    params, data = make_params(torch.float64), make_data(torch.float64)
    for step in (0, 4):
        mine, theirs = gradients(params, step, data, -1.0), grads_at(params, step, data, -1.0)
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert (mine[k] is None) == (theirs[k] is None)
            if mine[k] is not None:
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-14, atol=1e-15)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    """``torch.testing.assert_close`` with a cheap fast path (this harness compares thousands of small tensors)."""
    if actual.shape == expected.shape and actual.dtype == expected.dtype:
        if torch.allclose(actual, expected, rtol=rtol, atol=atol):
            return
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


_TRAJECTORIES: dict[Any, list[tuple[dict, dict]]] = {}


def reference_trajectory(ref: Ref, dtype: torch.dtype, steps: int) -> list[tuple[dict, dict]]:
    """The reference's parameters and state after each step (cached: the loop and foreach runs share it)."""
    key = None
    if not callable(ref._lr):
        key = (type(ref).__name__, repr(sorted(ref.hp.items())), repr(ref._lr), dtype, steps)
    if key is not None and key in _TRAJECTORIES:
        return _TRAJECTORIES[key]
    data = make_data(dtype)
    params = make_params(dtype)
    state: dict[str, dict] = {k: {} for k in params}
    out = []
    for step in range(steps):
        ref.begin(step)
        for k, g in gradients(params, step, data).items():
            if g is not None:
                params[k] = ref.step(k, params[k], g, state[k])
        out.append((dict(params), {k: dict(v) for k, v in state.items()}))
    if key is not None:
        _TRAJECTORIES[key] = out
    return out


def run_reference(
    tx: pureopt.GradientTransformation,
    ref: Ref,
    dtype: torch.dtype,
    *,
    maximize: bool = False,
    steps: int = 25,
    state_keys: tuple[str, ...] = (),
    check: Callable[[Any, dict, dict], None] | None = None,
    before_update: Callable[[int], None] | None = None,
) -> None:
    """Run ``tx`` and ``ref`` side by side from the same start, each with gradients at its own parameters.

    With ``maximize`` the optimizer gets the gradients of ``-loss`` (and must negate them); the reference always
    gets those of ``loss``.
    """
    tol = tolerances(dtype)
    trajectory = reference_trajectory(ref, dtype, steps)
    data = make_data(dtype)
    params = make_params(dtype)
    state = tx.init(params)
    for step in range(steps):
        if before_update is not None:
            before_update(step)
        g = gradients(params, step, data, -1.0 if maximize else 1.0)
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        ref_params, ref_state = trajectory[step]
        for k in params:
            assert params[k].dtype == dtype
            assert_close(params[k], ref_params[k], f"{k} @ {step}", **tol)
            for key in state_keys:
                if key not in ref_state[k]:
                    continue
                field = find_field(state, key)
                assert field is not None, f"state has no field {key}"
                mine, theirs = field[k], torch.as_tensor(ref_state[k][key], dtype=dtype)
                # state: normwise absolute tolerance (sums such as momenta lose absolute, not relative, accuracy)
                scale = max(1.0, float(theirs.abs().max())) if theirs.numel() else 1.0
                assert_close(mine.to(dtype), theirs, f"{key}[{k}] @ {step}", tol["rtol"], tol["atol"] * scale)
        if check is not None:
            check(state, params, ref_state)


def _id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "defaults"


def _cases(name: str, grid: list[dict]) -> list[Any]:
    return [pytest.param(f, id=f"{name}:{_id(f)}") for f in grid]


# ================================================================================================================
# Trajectories against the references
# ================================================================================================================

LION_GRID = [{}, {"weight_decay": 0.1}, {"maximize": True}, {"betas": (0.95, 0.98), "weight_decay": 0.3}]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("lion", LION_GRID))
def test_lion_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        lion(lr=0.01, impl=impl, **flags),
        LionRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("exp_avg",),
    )


LAMB_GRID = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.01, "maximize": True},
    {"betas": (0.8, 0.99), "eps": 1e-3},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("lamb", LAMB_GRID))
def test_lamb_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        lamb(lr=0.02, impl=impl, **flags),
        LambRef(0.02, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("step", "exp_avg", "exp_avg_sq"),
    )


NOT_MATRICES = ("b1", "b2", "gain")
LARS_GRID = [
    {},
    {"weight_decay": 0.1},
    {"nesterov": True, "weight_decay": 0.01, "trust_coefficient": 0.02},
    {"momentum": 0.0, "weight_decay": 0.05},
    {"mask": "matrices", "weight_decay": 0.1, "trust_coefficient": 0.5, "lr": 0.05},
    {"maximize": True, "eps": 1e-3},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("lars", LARS_GRID))
def test_lars_matches_paper(flags, dtype, impl):
    flags = dict(flags)
    lr = flags.pop("lr", 2.0)
    hp = {k: v for k, v in flags.items() if k not in ("maximize", "mask")}
    if flags.get("mask") == "matrices":  # a mask function: exclude vectors and scalars
        flags["mask"] = lambda p: {k: v.ndim >= 2 for k, v in p.items()}
        hp["excluded"] = NOT_MATRICES
    run_reference(
        lars(lr=lr, impl=impl, **flags),
        LarsRef(lr, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("momentum_buffer",),
    )


def test_lars_mask_as_a_tree_of_bools():
    mask = {k: k not in NOT_MATRICES for k in make_params(torch.float64)}
    run_reference(
        lars(lr=0.05, trust_coefficient=0.5, weight_decay=0.1, mask=mask),
        LarsRef(0.05, trust_coefficient=0.5, weight_decay=0.1, excluded=NOT_MATRICES),
        torch.float64,
    )


ADABELIEF_GRID = [
    {},
    {"amsgrad": True, "eps": 1e-8},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": False, "amsgrad": True, "maximize": True},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("adabelief", ADABELIEF_GRID))
def test_adabelief_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        adabelief(lr=0.01, impl=impl, **flags),
        AdaBeliefRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("step", "exp_avg", "exp_avg_var", "max_exp_avg_var"),
    )


YOGI_GRID = [
    {},
    {"bias_correction": False},
    {"weight_decay": 0.1, "maximize": True},
    {"initial_accumulator_value": 0.1, "eps": 1e-6, "betas": (0.5, 0.9)},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("yogi", YOGI_GRID))
def test_yogi_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    keys = ("exp_avg", "exp_avg_sq") + (("step",) if flags.get("bias_correction", True) else ())
    run_reference(
        yogi(lr=0.01, impl=impl, **flags),
        YogiRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=keys,
    )


NOVOGRAD_GRID = [
    {},
    {"weight_decay": 0.1},
    {"grad_averaging": True},
    {"maximize": True, "weight_decay": 0.01, "grad_averaging": True, "betas": (0.9, 0.5)},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("novograd", NOVOGRAD_GRID))
def test_novograd_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        novograd(lr=0.01, impl=impl, **flags),
        NovoGradRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("exp_avg", "exp_avg_sq"),
    )


SIGN_SGD_GRID = [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}]
SIGNUM_GRID = [
    {},
    {"momentum": 0.5, "weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("sign_sgd", SIGN_SGD_GRID))
def test_sign_sgd_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        sign_sgd(lr=0.01, impl=impl, **flags), SignumRef(0.01, **hp), dtype, maximize=flags.get("maximize", False)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("signum", SIGNUM_GRID))
def test_signum_matches_paper(flags, dtype, impl):
    hp = {"momentum": 0.9, **{k: v for k, v in flags.items() if k != "maximize"}}
    run_reference(
        signum(lr=0.01, impl=impl, **flags),
        SignumRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("momentum_buffer",),
    )


ADAN_GRID = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "no_prox": True},
    {"maximize": True, "betas": (0.9, 0.8, 0.95), "eps": 1e-6},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("adan", ADAN_GRID))
def test_adan_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        adan(lr=0.01, impl=impl, **flags),
        AdanRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("step", "exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"),
    )


def _check_eval_params(state, params, ref_state):
    """The evaluation point x recovered from y and z equals the reference's explicit x sequence."""
    x = schedule_free_eval_params(state, params)
    for k, p in params.items():
        expected = ref_state[k].get("x", p)  # never stepped: x = y = z = the initial value
        tol = tolerances(p.dtype)
        torch.testing.assert_close(x[k], expected, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
        assert x[k].dtype == p.dtype


SF_SGD_GRID = [
    {},
    {"warmup_steps": 5},
    {"weight_decay": 0.1, "r": 1.0, "weight_lr_power": 1.0},
    {"maximize": True, "momentum": 0.5, "warmup_steps": 3},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("schedule_free_sgd", SF_SGD_GRID))
def test_schedule_free_sgd_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k not in ("maximize", "momentum")}
    run_reference(
        schedule_free_sgd(lr=0.1, impl=impl, **flags),
        ScheduleFreeRef(0.1, beta=flags.get("momentum", 0.9), **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("z",),
        check=_check_eval_params,
    )


SF_ADAMW_GRID = [
    {},
    {"warmup_steps": 5, "weight_decay": 0.1},
    {"r": 0.5, "eps": 1e-4},
    {"maximize": True, "betas": (0.5, 0.99)},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("schedule_free_adamw", SF_ADAMW_GRID))
def test_schedule_free_adamw_matches_paper(flags, dtype, impl):
    b1, b2 = flags.get("betas", (0.9, 0.999))
    hp = {k: v for k, v in flags.items() if k not in ("maximize", "betas")}
    run_reference(
        schedule_free_adamw(lr=0.01, impl=impl, **flags),
        ScheduleFreeRef(0.01, beta=b1, beta2=b2, adam=True, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("z", "exp_avg_sq", "step"),
        check=_check_eval_params,
    )


ADEMAMIX_GRID = [
    {},
    {"alpha_warmup": 10, "beta3_warmup": 10},
    {"weight_decay": 0.1, "alpha": 8.0},
    {"maximize": True, "beta3_warmup": 30, "betas": (0.9, 0.99, 0.999)},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", _cases("ademamix", ADEMAMIX_GRID))
def test_ademamix_matches_paper(flags, dtype, impl):
    hp = {k: v for k, v in flags.items() if k != "maximize"}
    run_reference(
        ademamix(lr=0.01, impl=impl, **flags),
        AdEMAMixRef(0.01, **hp),
        dtype,
        maximize=flags.get("maximize", False),
        state_keys=("step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"),
    )


# --- primitives: the bare directions, chained with a learning rate ----------------------------------------------

PRIMITIVES = [
    pytest.param(scale_by_lion(), LionRef(0.01), id="scale_by_lion"),
    pytest.param(scale_by_belief(), AdaBeliefRef(0.01), id="scale_by_belief"),
    pytest.param(scale_by_yogi(), YogiRef(0.01), id="scale_by_yogi"),
    pytest.param(scale_by_novograd(), NovoGradRef(0.01), id="scale_by_novograd"),
    pytest.param(scale_by_sign(), SignumRef(0.01), id="scale_by_sign"),
    pytest.param(scale_by_signum(0.9), SignumRef(0.01, momentum=0.9), id="scale_by_signum"),
    pytest.param(scale_by_adan(), AdanRef(0.01), id="scale_by_adan"),
    pytest.param(
        scale_by_ademamix(alpha_warmup=5, beta3_warmup=5),
        AdEMAMixRef(0.01, alpha_warmup=5, beta3_warmup=5),
        id="scale_by_ademamix",
    ),
]


@pytest.mark.parametrize("primitive,ref", PRIMITIVES)
def test_primitives_chained_with_a_learning_rate_match_paper(primitive, ref):
    tx = pureopt.chain(primitive, pureopt.scale_by_learning_rate(0.01))
    run_reference(tx, ref, torch.float64)


def test_scale_by_trust_ratio_chained_into_lamb_matches_paper():
    tx = pureopt.chain(
        pureopt.scale_by_adam(eps=1e-6),
        pureopt.add_decayed_weights(0.1),
        scale_by_trust_ratio(),
        pureopt.scale_by_learning_rate(0.02),
    )
    run_reference(tx, LambRef(0.02, weight_decay=0.1), torch.float64)


def test_scale_by_trust_ratio_closed_form_guards_and_mask():
    params = {"w": torch.tensor([3.0, 4.0]), "zero": torch.zeros(2), "b": torch.tensor([1.0, 1.0]), "e": torch.ones(0)}
    updates = {"w": torch.tensor([0.6, 0.8]), "zero": torch.ones(2), "b": torch.tensor([2.0, 0.0]), "e": torch.ones(0)}
    tx = scale_by_trust_ratio(trust_coefficient=0.5, eps=1.0, mask={"w": True, "zero": True, "b": False, "e": True})
    out, _ = tx.update(updates, tx.init(params), params)
    torch.testing.assert_close(out["w"], updates["w"] * (0.5 * 5.0 / (1.0 + 1.0)))  # ||p|| = 5, ||u|| = 1
    torch.testing.assert_close(out["zero"], updates["zero"])  # ||p|| = 0: ratio 1, not 0
    torch.testing.assert_close(out["b"], updates["b"])  # masked out
    assert out["e"].shape == (0,)
    zero_u, _ = tx.update({**updates, "w": torch.zeros(2)}, tx.init(params), params)
    torch.testing.assert_close(zero_u["w"], torch.zeros(2))  # ||u|| = 0: ratio 1, no NaN


# --- learning rate as a 0-d tensor or a schedule -----------------------------------------------------------------


def test_tensor_lr_is_read_at_every_update():
    lr = torch.tensor(0.01, dtype=torch.float64)

    def before_update(step):
        if step == 10:
            lr.fill_(0.003)  # changed in place: the next update must use it

    run_reference(
        adan(lr=lr, weight_decay=0.1),
        AdanRef(lambda k: 0.01 if k < 10 else 0.003, weight_decay=0.1),
        torch.float64,
        before_update=before_update,
    )


SCHEDULED = [
    ("lion", lambda lr: lion(lr=lr, weight_decay=0.1), lambda lr: LionRef(lr, weight_decay=0.1)),
    ("lamb", lambda lr: lamb(lr=lr), lambda lr: LambRef(lr)),
    ("lars", lambda lr: lars(lr=lr), lambda lr: LarsRef(lr)),
    ("adabelief", lambda lr: adabelief(lr=lr), lambda lr: AdaBeliefRef(lr)),
    ("yogi", lambda lr: yogi(lr=lr), lambda lr: YogiRef(lr)),
    ("novograd", lambda lr: novograd(lr=lr), lambda lr: NovoGradRef(lr)),
    ("signum", lambda lr: signum(lr=lr), lambda lr: SignumRef(lr, momentum=0.9)),
    ("ademamix", lambda lr: ademamix(lr=lr, weight_decay=0.1), lambda lr: AdEMAMixRef(lr, weight_decay=0.1)),
    ("sf_sgd", lambda lr: schedule_free_sgd(lr=lr), lambda lr: ScheduleFreeRef(lr, beta=0.9)),
]


@pytest.mark.parametrize("name,make,make_ref", SCHEDULED, ids=[s[0] for s in SCHEDULED])
def test_schedule_lr(name, make, make_ref):
    def schedule(count):
        return 0.02 * 0.9 ** torch.as_tensor(count, dtype=torch.float64)

    run_reference(make(schedule), make_ref(lambda k: 0.02 * 0.9**k), torch.float64)


# ================================================================================================================
# Purity, donation, dtypes
# ================================================================================================================

ALL = [
    ("lion", lambda impl, x=1.0, **kw: lion(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("lamb", lambda impl, x=1.0, **kw: lamb(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("lars", lambda impl, x=1.0, **kw: lars(lr=1.0 * x, weight_decay=0.1, nesterov=True, impl=impl, **kw)),
    (
        "lars_mask",
        lambda impl, x=1.0, **kw: lars(
            lr=0.02 * x, trust_coefficient=0.5, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}, impl=impl, **kw
        ),
    ),
    ("adabelief", lambda impl, x=1.0, **kw: adabelief(lr=0.01 * x, weight_decay=0.1, amsgrad=True, impl=impl, **kw)),
    ("yogi", lambda impl, x=1.0, **kw: yogi(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("novograd", lambda impl, x=1.0, **kw: novograd(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("sign_sgd", lambda impl, x=1.0, **kw: sign_sgd(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("signum", lambda impl, x=1.0, **kw: signum(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("adan", lambda impl, x=1.0, **kw: adan(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    (
        "sf_sgd",
        lambda impl, x=1.0, **kw: schedule_free_sgd(lr=0.1 * x, weight_decay=0.1, warmup_steps=2, impl=impl, **kw),
    ),
    ("sf_adamw", lambda impl, x=1.0, **kw: schedule_free_adamw(lr=0.01 * x, weight_decay=0.1, impl=impl, **kw)),
    ("ademamix", lambda impl, x=1.0, **kw: ademamix(lr=0.01 * x, weight_decay=0.1, beta3_warmup=5, impl=impl, **kw)),
]
ALL_IDS = [name for name, _ in ALL]
ALL_FACTORIES = [f for _, f in ALL]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("factory", ALL_FACTORIES, ids=ALL_IDS)
def test_update_never_mutates_inputs(factory, impl):
    tx = factory(impl)
    params = make_params(torch.float32)
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        grads["b1"] = None if step == 1 else grads["b1"]
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        assert updates["b1"] is not None or step == 1
        # no dtype leaks (a 0-d float32 tensor times a 0-d float64 scalar would be float64)
        for k, u in updates.items():
            assert u is None or u.dtype == params[k].dtype, k
        for old, new in zip(pureopt.tree.leaves(state), pureopt.tree.leaves(new_state)):
            assert old is None or new.dtype == old.dtype
        params, state = pureopt.apply_updates(params, updates), new_state


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("factory", ALL_FACTORIES, ids=ALL_IDS)
def test_donated_step_equals_pure_update(factory, impl):
    """inplace_step (state buffers donated, params updated in place) gives the pure path's numbers."""
    dtype = torch.float64
    data = make_data(dtype)
    tx = factory(impl)
    pure_params = make_params(dtype)
    pure_state = tx.init(pure_params)
    own_params = {k: v.clone() for k, v in pure_params.items()}
    own_state = pureopt.tree.tree_clone(tx.init(own_params))
    for step in range(6):
        updates, pure_state = tx.update(gradients(pure_params, step, data), pure_state, pure_params)
        pure_params = pureopt.apply_updates(pure_params, updates)
        before = dict(own_params)
        own_state = inplace_step(tx, gradients(own_params, step, data), own_state, own_params)
        for k in own_params:
            assert own_params[k] is before[k]
            torch.testing.assert_close(own_params[k], pure_params[k], rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(pureopt.tree.leaves(own_state), pureopt.tree.leaves(pure_state)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory", ALL_FACTORIES, ids=ALL_IDS)
def test_bf16_params_with_fp32_state(factory):
    data = make_data(torch.float32)
    start = {k: v.to(torch.bfloat16) for k, v in make_params(torch.float32).items()}
    # steps 5x the usual learning rate, so that a step is several bf16 ulps of an O(1) weight
    tx16 = factory("auto", 5.0, state_dtype=torch.float32)
    tx32 = factory("auto", 5.0)
    p16, p32 = dict(start), {k: v.float() for k, v in start.items()}
    s16, s32 = tx16.init(p16), tx32.init(p32)
    for leaf in pureopt.tree.leaves(s16):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.ndim > 0:
            assert leaf.dtype == torch.float32
    for step in range(10):
        # the model computes in fp32 from its bf16 weights; the gradients arrive in bf16, like the weights
        g32 = gradients({k: v.float() for k, v in p16.items()}, step, data)
        g16 = {k: None if g is None else g.to(torch.bfloat16) for k, g in g32.items()}
        u16, s16 = tx16.update(g16, s16, p16)
        p16 = pureopt.apply_updates(p16, u16)
        u32, s32 = tx32.update(gradients(p32, step, data), s32, p32)
        p32 = pureopt.apply_updates(p32, u32)
    for k in start:
        assert p16[k].dtype == torch.bfloat16
        assert torch.isfinite(p16[k].float()).all()
    # normwise: the bf16 run's displacement follows the fp32 run's (bf16 rounds each step to ~3 digits, and a sign
    # method may flip a few near-zero coordinates)
    moved32 = torch.cat([(p32[k] - start[k].float()).flatten() for k in start])
    moved16 = torch.cat([(p16[k].float() - start[k].float()).flatten() for k in start])
    assert float(moved32.norm()) > 0
    rel = float((moved16 - moved32).norm() / moved32.norm())
    assert rel < 0.15, rel


@pytest.mark.parametrize("factory", ALL_FACTORIES, ids=ALL_IDS)
def test_complex_params_with_a_real_state_dtype(factory):
    """complex64 params with state_dtype=float64 keep complex128 state (both parts at that precision) and follow
    the complex128 run; complex parameters are optimised as real pairs, as torch.optim does."""
    gen = torch.Generator().manual_seed(5)
    start = {"z": torch.randn(4, 3, dtype=torch.complex128, generator=gen), "s": torch.randn((), generator=gen) + 0j}
    target = {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in start.items()}
    tx64, tx128 = factory("auto", state_dtype=torch.float64), factory("auto")
    p64 = {k: v.to(torch.complex64) for k, v in start.items()}
    p128 = {k: v.to(torch.complex64).to(torch.complex128) for k, v in start.items()}
    s64, s128 = tx64.init(p64), tx128.init(p128)
    for leaf in pureopt.tree.leaves(s64):
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            assert leaf.dtype == torch.complex128
    for _ in range(5):  # gradient of sum |p - target|^2 (real-pair gradient, torch's convention)
        u64, s64 = tx64.update({k: 2 * (v - target[k].to(v.dtype)) for k, v in p64.items()}, s64, p64)
        u128, s128 = tx128.update({k: 2 * (v - target[k]) for k, v in p128.items()}, s128, p128)
        p64, p128 = pureopt.apply_updates(p64, u64), pureopt.apply_updates(p128, u128)
    for k in start:
        assert p64[k].dtype == torch.complex64
        torch.testing.assert_close(p64[k].to(torch.complex128), p128[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sf_adamw", "lars_mask", "ademamix"])
def test_update_compiles_without_graph_breaks(name):
    """torch.compile(fullgraph=True) traces a whole step (backend='eager': no codegen), lr a 0-d tensor."""
    torch._dynamo.reset()
    lr = torch.tensor(0.01)
    tx = {
        "sf_adamw": lambda: schedule_free_adamw(lr=lr, warmup_steps=2, weight_decay=0.1),
        "lars_mask": lambda: lars(lr=lr, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
        "ademamix": lambda: ademamix(lr=lr, alpha_warmup=3, beta3_warmup=3, weight_decay=0.1),
    }[name]()
    params = make_params(torch.float32)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)

    @torch.compile(fullgraph=True, backend="eager")
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return pureopt.apply_updates(params, updates), state

    compiled, _ = step(grads, state, params)
    expected, _ = tx.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(compiled[k], params[k] + expected[k])


@pytest.mark.parametrize("factory", ALL_FACTORIES, ids=ALL_IDS)
def test_vmapped_ensemble_matches_members(factory):
    """Under torch.func.vmap (impl='auto' takes the per-tensor path) each member follows its own run."""
    tx = factory("auto")
    members = [make_params(torch.float64, seed=s) for s in (0, 1, 2)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    data = make_data(torch.float64)
    state = torch.func.vmap(tx.init)(stacked)
    states = [tx.init(m) for m in members]
    grad_fn = torch.func.vmap(lambda p: grads_at(p, 1, data))  # step 1: no None gradients
    for _ in range(3):
        updates, state = torch.func.vmap(tx.update)(grad_fn(stacked), state, stacked)
        stacked = pureopt.apply_updates(stacked, updates)
        for i, m in enumerate(members):
            u, states[i] = tx.update(gradients(m, 1, data), states[i], m)
            members[i] = pureopt.apply_updates(m, u)
    for i, m in enumerate(members):
        for k in m:
            torch.testing.assert_close(stacked[k][i], m[k], rtol=1e-10, atol=1e-12)


def test_none_gradient_leaves_param_and_state_untouched():
    tx = adan(lr=0.1, weight_decay=0.1)
    params = make_params(torch.float64)
    state = tx.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    _, state = tx.update(grads, state, params)
    grads["w1"] = None
    updates, new_state = tx.update(grads, state, params)
    assert updates["w1"] is None
    assert new_state.exp_avg["w1"] is state.exp_avg["w1"]
    assert new_state.pre_grad["w1"] is state.pre_grad["w1"]
    assert float(new_state.step["w1"]) == 1.0 and float(new_state.step["w2"]) == 2.0
    assert int(new_state.num_updates) == 2


def test_state_fields_not_kept_are_empty_tuples():
    params = make_params(torch.float32)
    assert sign_sgd().init(params).momentum_buffer == ()
    assert lars(momentum=0.0).init(params).momentum_buffer == ()
    assert yogi(bias_correction=False).init(params).step == ()
    assert adabelief().init(params).max_exp_avg_var == ()
    sf = schedule_free_sgd().init(params)
    assert sf.step == () and sf.exp_avg_sq == ()
    assert sf.z["w1"] is not params["w1"] and torch.equal(sf.z["w1"], params["w1"])
    novo = novograd().init(params)
    assert novo.exp_avg_sq["w1"].shape == () and novo.exp_avg["w1"].shape == (5, 3)


def test_schedule_free_eval_params_closed_form_and_chain_state():
    tx = pureopt.chain(pureopt.clip_by_global_norm(10.0), schedule_free_sgd(lr=0.5, momentum=0.75))
    y = {"a": torch.tensor([1.0, 2.0]), "b": None}
    state = tx.init(y)
    z = {"a": torch.tensor([3.0, -2.0]), "b": None}
    sf = state[1]._replace(z=z)
    x = schedule_free_eval_params((state[0], sf), y)
    # y = (1 - beta) z + beta x  =>  x = (y - (1 - beta) z) / beta
    torch.testing.assert_close(x["a"], (y["a"] - 0.25 * z["a"]) / 0.75)
    assert x["b"] is None
    with pytest.raises(ValueError, match="no ScheduleFreeState"):
        schedule_free_eval_params(lion().init(y), y)


# ================================================================================================================
# Validation
# ================================================================================================================

# (factory, kwargs, torch.optim class whose message for the same kwargs must be identical, or an exact message)
BAD_ARGS = [
    (lion, {"lr": -1.0}, ("Adam", {"lr": -1.0})),
    (lion, {"betas": (1.0, 0.99)}, ("Adam", {"betas": (1.0, 0.99)})),
    (lion, {"weight_decay": -1}, ("Adam", {"weight_decay": -1})),
    (lamb, {"eps": -1e-6}, ("Adam", {"eps": -1e-6})),
    (lamb, {"betas": (0.9, 1.5)}, ("Adam", {"betas": (0.9, 1.5)})),
    (lamb, {"lr": torch.tensor([0.1, 0.2])}, ("Adam", {"lr": torch.tensor([0.1, 0.2])})),
    (lars, {"lr": -0.5}, ("SGD", {"lr": -0.5})),
    (lars, {"momentum": -0.1}, ("SGD", {"lr": 0.1, "momentum": -0.1})),
    (lars, {"weight_decay": -1}, ("SGD", {"lr": 0.1, "weight_decay": -1})),
    (lars, {"trust_coefficient": -1.0}, "Invalid trust_coefficient value: -1.0"),
    (lars, {"momentum": 0.0, "nesterov": True}, "Nesterov momentum requires a momentum"),
    (adabelief, {"eps": -1.0}, ("Adam", {"eps": -1.0})),
    (adabelief, {"betas": (0.9, -0.1)}, ("Adam", {"betas": (0.9, -0.1)})),
    (yogi, {"initial_accumulator_value": -1.0}, ("Adagrad", {"initial_accumulator_value": -1.0})),
    (yogi, {"weight_decay": -0.1}, ("Adam", {"weight_decay": -0.1})),
    (novograd, {"betas": (1.0, 0.98)}, ("Adam", {"betas": (1.0, 0.98)})),
    (sign_sgd, {"lr": -1e-3}, ("SGD", {"lr": -1e-3})),
    (signum, {"momentum": 1.0}, "Invalid momentum value: 1.0"),
    (adan, {"betas": (0.98, 0.92, 1.0)}, "Invalid beta parameter at index 2: 1.0"),
    (adan, {"betas": (0.98, 0.92)}, "Invalid betas: expected 3 values, got 2"),
    (adan, {"eps": -1e-8}, ("Adam", {"eps": -1e-8})),
    (ademamix, {"betas": (0.9, 0.999, -0.5)}, "Invalid beta parameter at index 2: -0.5"),
    (ademamix, {"alpha": -1.0}, "Invalid alpha value: -1.0"),
    (ademamix, {"alpha_warmup": 0}, "Invalid alpha_warmup value: 0"),
    (ademamix, {"beta3_warmup": 10, "betas": (0.0, 0.999, 0.9999)}, "Invalid beta parameter at index 0: 0.0"),
    (schedule_free_sgd, {"momentum": 0.0}, "Invalid momentum value: 0.0"),
    (schedule_free_sgd, {"lr": -1.0}, ("SGD", {"lr": -1.0})),
    (schedule_free_sgd, {"warmup_steps": -1}, "Invalid warmup_steps value: -1"),
    (schedule_free_adamw, {"betas": (0.0, 0.999)}, "Invalid beta parameter at index 0: 0.0"),
    (schedule_free_adamw, {"weight_lr_power": -2.0}, "Invalid weight_lr_power value: -2.0"),
    (schedule_free_adamw, {"weight_decay": -1}, ("AdamW", {"weight_decay": -1})),
]


@pytest.mark.parametrize("factory,kwargs,expected", BAD_ARGS, ids=[f"{f.__name__}:{_id(kw)}" for f, kw, _ in BAD_ARGS])
def test_invalid_hyperparameters_use_torch_wording(factory, kwargs, expected):
    if isinstance(expected, tuple):
        torch_name, torch_kwargs = expected
        with pytest.raises(ValueError) as theirs:
            getattr(torch.optim, torch_name)([torch.zeros(2, requires_grad=True)], **torch_kwargs)
        message = str(theirs.value)
    else:
        message = expected
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        factory(**kwargs)


@pytest.mark.parametrize("factory", [lion, lamb, lars, adabelief, yogi, novograd, sign_sgd, adan, ademamix])
def test_unknown_impl_is_rejected(factory):
    with pytest.raises(ValueError, match="Invalid impl: 'fast'"):
        factory(impl="fast")


@pytest.mark.parametrize(
    "tx",
    [lamb(), lars(), schedule_free_sgd(), lion(weight_decay=0.1), adan(weight_decay=0.1), scale_by_trust_ratio()],
    ids=["lamb", "lars", "schedule_free_sgd", "lion_wd", "adan_wd", "scale_by_trust_ratio"],
)
def test_update_without_params_is_a_clear_error(tx):
    params = make_params(torch.float32)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    state = tx.init(params)
    snap = snapshot(state)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads, state)
    assert_unchanged(state, snap, "state")


def test_mismatched_grads_tree_names_the_path():
    tx = lion()
    state = tx.init({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=re.escape("grads do not match the optimizer state: at ['c']")):
        tx.update({"a": torch.zeros(2), "c": torch.zeros(3)}, state, {"a": torch.zeros(2), "c": torch.zeros(3)})


def test_explicit_foreach_under_vmap_is_a_clear_error():
    tx = lion(impl="foreach")
    params = {"w": torch.zeros(3, 2)}
    state = torch.func.vmap(tx.init)(params)
    with pytest.raises(RuntimeError, match="impl='foreach' cannot run here"):
        torch.func.vmap(tx.update)({"w": torch.ones(3, 2)}, state, params)


# ================================================================================================================
# Convergence to closed-form optima
# ================================================================================================================


def _decay(lr0: float, rate: float) -> Callable[[Any], Any]:
    return lambda k: lr0 * rate ** torch.as_tensor(k, dtype=torch.float64)


def _run(tx, params, grad_fn, steps, eval_fn=None):
    """``steps`` updates with the closed-form gradient ``grad_fn(params)``; the final (or evaluation) params."""
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = pureopt.apply_updates(params, updates)
    return eval_fn(state, params) if eval_fn is not None else params


def _sf_eval(state, params):
    return schedule_free_eval_params(state, params)


# name -> (least squares: factory, steps), (Rosenbrock: factory, steps, curvature b)
CONVERGENCE: dict[str, tuple[Callable[[], Any], int, Callable[[], Any], int, float]] = {
    "lion": (lambda: lion(lr=_decay(0.05, 0.98)), 300, lambda: lion(lr=_decay(0.02, 0.995)), 1000, 100.0),
    "lamb": (lambda: lamb(lr=_decay(0.1, 0.99)), 300, lambda: lamb(lr=_decay(0.02, 0.995)), 1000, 100.0),
    "lars": (
        lambda: lars(lr=_decay(20.0, 0.98), trust_coefficient=0.01),
        300,
        lambda: lars(lr=_decay(5.0, 0.995), trust_coefficient=0.01),
        1000,
        100.0,
    ),
    "adabelief": (
        lambda: adabelief(lr=_decay(0.1, 0.99)),
        300,
        lambda: adabelief(lr=_decay(0.1, 0.998), betas=(0.9, 0.99)),
        1000,
        100.0,
    ),
    "yogi": (lambda: yogi(lr=_decay(0.1, 0.99)), 300, lambda: yogi(lr=_decay(1.0, 0.998)), 1500, 100.0),
    "novograd": (
        lambda: novograd(lr=_decay(0.1, 0.99), grad_averaging=True),
        300,
        lambda: novograd(lr=_decay(0.01, 0.995)),
        1000,
        100.0,
    ),
    # pure sign descent needs lr << (1 - x) / (2 b x) to follow the valley: b = 100 would take many thousand steps
    "sign_sgd": (lambda: sign_sgd(lr=_decay(0.05, 0.98)), 300, lambda: sign_sgd(lr=_decay(0.02, 0.995)), 1500, 10.0),
    "signum": (lambda: signum(lr=_decay(0.05, 0.98)), 300, lambda: signum(lr=_decay(0.02, 0.996)), 1500, 100.0),
    "adan": (lambda: adan(lr=_decay(0.2, 0.99)), 300, lambda: adan(lr=_decay(0.05, 0.998)), 1000, 100.0),
    "sf_sgd": (
        lambda: schedule_free_sgd(lr=0.2, r=2.0, warmup_steps=10),
        300,
        lambda: schedule_free_sgd(lr=4e-3, r=2.0, warmup_steps=10),
        1500,
        100.0,
    ),
    "sf_adamw": (
        lambda: schedule_free_adamw(lr=0.05, warmup_steps=10),
        300,
        lambda: schedule_free_adamw(lr=0.12, r=10.0, warmup_steps=10),
        1000,
        100.0,
    ),
    "ademamix": (
        lambda: ademamix(lr=_decay(0.1, 0.99), betas=(0.9, 0.999, 0.99)),
        300,
        lambda: ademamix(lr=_decay(0.1, 0.998), betas=(0.9, 0.999, 0.99)),
        1500,
        100.0,
    ),
}


def _least_squares(dtype: torch.dtype):
    """min ||A x - b||^2 / m: the problem, its gradient (torch's convention for complex x: the real-pair gradient,
    2/m A^H (A x - b)) and lstsq's solution in float64 / complex128."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 4, generator=gen, dtype=torch.complex128 if dtype.is_complex else torch.float64)
    b = torch.randn(12, generator=gen, dtype=a.dtype)
    x_star = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
    a, b = a.to(dtype), b.to(dtype)

    def loss(p):
        r = a @ p["x"] - b
        return (r.real**2 + r.imag**2).sum() / 12 if dtype.is_complex else (r**2).sum() / 12

    def grad(p):
        return {"x": (2 / 12) * (a.mH @ (a @ p["x"] - b))}

    return {"x": torch.zeros(4, dtype=dtype)}, loss, grad, x_star


ROSENBROCK_SHIFT = torch.tensor([-3.0, -3.0])


def _rosenbrock(b: float):
    """Rosenbrock's (1 - x)^2 + b (y - x^2)^2, translated by (-3, -3) (minimum at (-2, -2)), and its gradient."""

    def loss(p):
        x, y = p["xy"][0] - ROSENBROCK_SHIFT[0], p["xy"][1] - ROSENBROCK_SHIFT[1]
        return (1 - x) ** 2 + b * (y - x**2) ** 2

    def grad(p):
        x, y = p["xy"][0] - ROSENBROCK_SHIFT[0], p["xy"][1] - ROSENBROCK_SHIFT[1]
        return {"xy": torch.stack([-2 * (1 - x) - 4 * b * x * (y - x**2), 2 * b * (y - x**2)])}

    return loss, grad


@pytest.mark.parametrize("problem", ["ls-float32", "ls-complex64", "rosenbrock"])
def test_closed_form_gradients_equal_autograd(problem):
    if problem == "rosenbrock":
        loss, grad = _rosenbrock(100.0)
        params = {"xy": torch.tensor([-4.2, -2.0])}
    else:
        params, loss, grad, _ = _least_squares(torch.float32 if problem == "ls-float32" else torch.complex64)
        params = {"x": torch.linspace(-1, 1, 4).to(params["x"].dtype) * (1 + 1j if problem == "ls-complex64" else 1)}
    torch.testing.assert_close(grad(params)["xy" if problem == "rosenbrock" else "x"],
                               torch.func.grad(loss)(params)["xy" if problem == "rosenbrock" else "x"])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=str)
@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_least_squares_reaches_closed_form_optimum(name, dtype):
    """min ||A x - b||^2 / 12 from x = 0; the optimum is lstsq's. Complex parameters are optimised as real pairs
    (torch's convention), which is well defined for every optimizer here."""
    make, steps, _, _, _ = CONVERGENCE[name]
    params, _, grad, x_star = _least_squares(dtype)
    found = _run(make(), params, grad, steps, _sf_eval if name.startswith("sf_") else None)["x"]
    assert found.dtype == dtype
    err = float((found.to(x_star.dtype) - x_star).abs().max())
    assert err < 1e-2 * float(x_star.abs().max()), f"{name}: max error {err}"


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_rosenbrock_reaches_its_minimum(name):
    """From the classic start (-1.2, 1) (translated like the problem) to the minimum (1, 1) (idem).

    The translation keeps every coordinate away from 0 on the way: the trust-ratio methods scale their steps by
    ||p||, which would stall a path through the origin.
    """
    _, _, make, steps, b = CONVERGENCE[name]
    _, grad = _rosenbrock(b)
    start = {"xy": torch.tensor([-1.2, 1.0]) + ROSENBROCK_SHIFT}
    found = _run(make(), start, grad, steps, _sf_eval if name.startswith("sf_") else None)["xy"]
    err = float((found - ROSENBROCK_SHIFT - torch.tensor([1.0, 1.0])).abs().max())
    assert err < 2e-2, f"{name}: ended at {found.tolist()}"
