"""Adan (adaptive Nesterov momentum), the restart-free version, with proximal or decoupled weight decay.

Update rule (Xie et al. 2022, Algorithm 1, with bias correction), per parameter ``p`` with gradient ``g``, the
previous gradient ``g_prev`` and its own step count ``t``. The betas follow the authors' released code: ``beta``
here is ``1 - beta`` of the paper (the paper's ``(0.02, 0.08, 0.01)`` are ``betas=(0.98, 0.92, 0.99)``)::

    g <- -g                                                   if maximize
    diff = g - g_prev                                         (0 on the tensor's first step)
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g                          (gradient moment)
    d <- beta2 * d + (1 - beta2) * diff                       (gradient-difference moment)
    n <- beta3 * n + (1 - beta3) * (g + beta2 * diff)**2      (second moment of the Nesterov gradient)
    u = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / (sqrt(n) / sqrt(1 - beta3**t) + eps)
    p_new = (p - lr * u) / (1 + lr * weight_decay)            proximal weight decay (default)
    p_new = p * (1 - lr * weight_decay) - lr * u              no_prox=True (decoupled, as AdamW)
    update = p_new - p;   g_prev <- g

The ``scale_by_adan`` form returns ``u``. Complex tensors are viewed as real pairs.

Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022
(arXiv:2208.06677; IEEE TPAMI 2024).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Check, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.hyperparams import check_beta
from pureopt.kernels.common import (
    add_decay,
    add_update,
    decay_params,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_for,
    torch_grad,
)

__all__ = ["ADAN", "AdanState", "Betas3", "adan", "check_betas3", "scale_by_adan"]


def check_betas3(betas: Any) -> None:
    """Check three betas with torch.optim's wording (``Invalid beta parameter at index i: ...``)."""
    if len(betas) != 3:
        raise ValueError(f"Invalid betas: expected 3 values, got {len(betas)}")
    for i, beta in enumerate(betas):
        check_beta(beta, i)


def _betas3(betas: Any, name: str) -> tuple[float, float, float]:
    check_betas3(betas)
    b1, b2, b3 = (float(b) for b in betas)
    return b1, b2, b3


Betas3 = Annotated[tuple[float, float, float], Check(_betas3)]
"""Three decay rates in ``[0, 1)`` (torch.optim's wording, ``Invalid beta parameter at index i: ...``); passed on
as Python floats."""


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    beta1, beta2, beta3 = k.h.betas

    def fn(t1: Tensor) -> tuple[Tensor, ...]:  # (the advanced count)
        seen = (t1 > 1).to(t1.dtype)  # 0 on a tensor's first step: there is no previous gradient
        inv_bc1 = 1 / (1 - torch.pow(beta1, t1))
        diff_scale = beta2 / (1 - torch.pow(beta2, t1))
        return seen, inv_bc1, diff_scale, torch.sqrt(1 - torch.pow(beta3, t1))

    host = on_host(k.apply, k.exp_avg)
    seen, inv_bc1, diff_scale, bc3_sqrt = map_scalars_n(fn, steps, outputs=4, like=k.exp_avg, host=host)
    return {"seen": seen, "inv_bc1": inv_bc1, "diff_scale": diff_scale, "bc3_sqrt": bc3_sqrt}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, p, donate = k.ops, k.h, k.p, k.donate
    beta1, beta2, beta3 = h.betas
    decay = h.weight_decay != 0 and h.lr is not None
    g, owned = torch_grad(ops, k.g, None, maximize=h.maximize, weight_decay=0.0)
    diff = ops.mul(ops.sub(g, k.pre_grad), k.seen, inplace=True)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=donate)
    d = ops.lerp(k.exp_avg_diff, diff, 1 - beta2, inplace=donate)
    nesterov_g = ops.add(ops.mul(diff, beta2, inplace=True), g, inplace=True)  # g + beta2 * diff
    n = ema_of_squares(ops, k.exp_avg_sq, nesterov_g, beta3, donate=donate)
    prev = ops.copy_(k.pre_grad, g) if donate else (g if owned else ops.clone(g))
    new = {"exp_avg": m, "exp_avg_diff": d, "exp_avg_sq": n, "pre_grad": prev}

    denom = ops.add_scalar(ops.div(ops.sqrt(n), k.bc3_sqrt, inplace=True), h.eps, inplace=True)
    numer = ops.add(ops.mul(m, k.inv_bc1), ops.mul(d, k.diff_scale), inplace=True)
    direction = ops.div_list(numer, denom, inplace=True)
    if k.apply:  # the authors' order: decay, step, or step then the proximal division
        if decay and h.no_prox:
            decay_params(ops, p, h.lr, h.weight_decay)
        add_update(ops, p, direction, k.coef, owned=True)
        if decay and not h.no_prox:
            ops.mul(p, scalar_for(1 / (1 + h.lr * h.weight_decay), p), inplace=True)
        return None, new
    if h.lr is None:
        return direction, new
    updates = ops.mul(direction, -h.lr, inplace=True)
    if decay:
        updates = add_decay(ops, updates, p, h.lr, h.weight_decay, inplace=True)
        if not h.no_prox:
            updates = ops.mul(updates, scalar_for(1 / (1 + h.lr * h.weight_decay), updates), inplace=True)
    return updates, new


ADAN = Algorithm(
    "Adan",
    record="AdanState",
    fields={
        "step": step_count(),
        "exp_avg": state("EMAs of the gradient."),
        "exp_avg_diff": state("EMAs of the gradient difference ``g - g_prev``."),
        "exp_avg_sq": state("EMAs of the squared Nesterov gradient ``(g + beta2 * (g - g_prev))**2``.", nonneg=True),
        "pre_grad": state("the previous gradient of each parameter."),
    },
    math=_math,
    scalars=_scalars,
    neutral={"no_prox": False},
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`adan` and :func:`scale_by_adan`.",
)
AdanState = ADAN.state


@ADAN.public
def adan(
    lr: LR = 1e-3,
    betas: Betas3 = (0.98, 0.92, 0.99),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    *,
    no_prox: bool = False,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adan: moments of the gradient, of the gradient difference, and of the squared Nesterov gradient (the rule
    is in the module docstring). This is the restart-free algorithm (no restart condition).

    Args:
      betas: the three EMA coefficients (gradient, gradient difference, squared Nesterov gradient), in the
        authors' code convention (``1 -`` the paper's).
      eps: added to the denominator.
      weight_decay: weight decay coefficient.
      no_prox: decay multiplicatively (AdamW-style) instead of with the proximal step.

    Example::

        tx = pureopt.adan(lr=1e-3, weight_decay=0.02)

    Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022.
    """
    return ADAN.build(locals())


@ADAN.public
def scale_by_adan(
    betas: Betas3 = (0.98, 0.92, 0.99), eps: Eps = 1e-8, *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Replace updates by Adan's direction (its three bias-corrected moments, no weight decay):
    ``(m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / (sqrt(n) / sqrt(1 - beta3**t) + eps)``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_adan(), pureopt.scale_by_learning_rate(1e-3))

    Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022.
    """
    return ADAN.build(locals())
