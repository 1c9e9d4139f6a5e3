"""AdEMAMix: Adam plus a second, slow EMA of the gradient added to the numerator with weight ``alpha``.

Update rule (Pagliardini, Ablin & Grangier 2024, Algorithm 1), per parameter ``p`` with gradient ``g`` and its
own step count ``t``::

    g <- -g                                                   if maximize
    t <- t + 1
    m1 <- beta1 * m1 + (1 - beta1) * g                        (fast EMA, bias-corrected)
    m2 <- beta3_t * m2 + (1 - beta3_t) * g                    (slow EMA, not bias-corrected)
    v <- beta2 * v + (1 - beta2) * g**2
    update = -lr * ((m1 / (1 - beta1**t) + alpha_t * m2) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
                    + weight_decay * p)                       (decoupled weight decay)

with the optional warmup schedulers of the paper (constant ``alpha`` / ``beta3`` when not given)::

    alpha_t = min(t * alpha / alpha_warmup, alpha)
    beta3_t = min(exp(ln(beta1) * ln(beta3) / ((1 - a) * ln(beta3) + a * ln(beta1))), beta3),  a = min(t / T, 1)

where ``T = beta3_warmup``: the half-life ``ln(0.5) / ln(beta)`` grows linearly from beta1's to beta3's. (``a`` is
capped at 1, which only matters when ``beta1 > beta3``, where the uncapped formula leaves its domain.) Scheduled
values use the per-parameter step count. Both warmups are advised for large ``beta3`` (the paper sets ``T`` to the
length of training). The ``scale_by_ademamix`` form returns the positive direction. Complex tensors are viewed as
real pairs.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024 (arXiv:2409.03137;
ICLR 2025).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.adan import check_betas3
from pureopt.algorithms.define import (
    AS_FLOAT,
    LR,
    Algorithm,
    Check,
    Eps,
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.hyperparams import check_nonneg
from pureopt.kernels.common import (
    add_decay,
    add_update,
    decay_params,
    ema_of_squares,
    map_scalars_n,
    on_host,
)

__all__ = ["ADEMAMIX", "AdEMAMixState", "ademamix", "alpha_schedule", "beta3_schedule", "scale_by_ademamix"]


def _warmup(value: Any, name: str) -> Any:
    if value is not None and not (isinstance(value, int) and value > 0):
        raise ValueError(f"Invalid {name} value: {value}")
    return value


def _betas(betas: Any, name: str) -> Any:
    check_betas3(betas)
    return betas


Betas3 = Annotated[tuple[float, float, float], Check(_betas)]
Warmup = Annotated[int | None, Check(_warmup)]
"""A number of warmup steps (a positive int) or ``None`` (off): ``Invalid alpha_warmup value: ...``."""
Alpha = Annotated[float, nonneg(), AS_FLOAT]


def _half_life_betas(betas: tuple[float, float, float], beta3_warmup: int | None) -> tuple[float, float, float]:
    """The last checks (the beta3 warmup takes logarithms of beta1 and beta3) and the betas as Python floats."""
    if beta3_warmup is not None:
        for i in (0, 2):
            if not betas[i] > 0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]} (beta3_warmup needs it > 0)")
    b1, b2, b3 = (float(b) for b in betas)
    return b1, b2, b3


def alpha_schedule(t: Tensor, alpha: float, warmup: int) -> Tensor:
    """The paper's linear alpha warmup ``min(t * alpha / warmup, alpha)`` for step counts ``t`` (float tensor)."""
    return torch.clamp(t * alpha / warmup, max=alpha)


def beta3_schedule(t: Tensor, beta1: float, beta3: float, warmup: int) -> Tensor:
    """The paper's beta3 warmup (linear in half-life from ``beta1`` to ``beta3``) for step counts ``t``."""
    a = torch.clamp(t / warmup, max=1.0)
    log1, log3 = math.log(beta1), math.log(beta3)
    return torch.clamp(torch.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), max=beta3)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    h = k.h
    beta1, beta2, beta3 = h.betas

    def fn(t: Tensor) -> tuple[Tensor, ...]:  # (the advanced count)
        out = [1 / (1 - torch.pow(beta1, t)), torch.sqrt(1 - torch.pow(beta2, t))]
        if h.alpha_warmup is not None:
            out.append(alpha_schedule(t, h.alpha, h.alpha_warmup))
        if h.beta3_warmup is not None:
            out.append(1 - beta3_schedule(t, beta1, beta3, h.beta3_warmup))
        return tuple(out)

    n_out = 2 + (h.alpha_warmup is not None) + (h.beta3_warmup is not None)
    host = on_host(k.apply, k.exp_avg_fast)
    inv_bc1, bc2_sqrt, *scheduled = map_scalars_n(fn, steps, outputs=n_out, like=k.exp_avg_fast, host=host)
    out = {"inv_bc1": inv_bc1, "bc2_sqrt": bc2_sqrt}
    if h.alpha_warmup is not None:
        out["alpha_t"] = scheduled[0]
    if h.beta3_warmup is not None:
        out["beta3_weight"] = scheduled[-1]
    return out


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, p, donate = k.ops, k.h, k.p, k.donate
    beta1, beta2, beta3 = h.betas
    decay = h.weight_decay != 0 and h.lr is not None
    g = ops.neg(k.g) if h.maximize else k.g
    m1 = ops.lerp(k.exp_avg_fast, g, 1 - beta1, inplace=donate)
    m2 = k.exp_avg_slow
    if h.beta3_warmup is None:
        m2 = ops.lerp(m2, g, 1 - beta3, inplace=donate)
    else:
        m2 = ops.add(m2, ops.mul(ops.sub(g, m2), k.beta3_weight, inplace=True), inplace=donate)
    v = ema_of_squares(ops, k.exp_avg_sq, g, beta2, donate=donate)
    new = {"exp_avg_fast": m1, "exp_avg_slow": m2, "exp_avg_sq": v}

    slow_weight: float | list[Tensor] = h.alpha if h.alpha_warmup is None else k.alpha_t
    denom = ops.add_scalar(ops.div(ops.sqrt(v), k.bc2_sqrt, inplace=True), h.eps, inplace=True)
    numer = ops.add(ops.mul(m1, k.inv_bc1), ops.mul(m2, slow_weight), inplace=True)
    direction = ops.div_list(numer, denom, inplace=True)
    if k.apply:  # p.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)
        if decay:
            decay_params(ops, p, h.lr, h.weight_decay)
        add_update(ops, p, direction, k.coef, owned=True)
        return None, new
    if h.lr is None:
        return direction, new
    updates = ops.mul(direction, -h.lr, inplace=True)
    if decay:
        updates = add_decay(ops, updates, p, h.lr, h.weight_decay, inplace=True)
    return updates, new


ADEMAMIX = Algorithm(
    "AdEMAMix",
    record="AdEMAMixState",
    fields={
        "step": step_count("per-parameter step counts (bias corrections and the alpha / beta3 warmups use them)."),
        "exp_avg_fast": state("the fast EMA of the gradient (``beta1``)."),
        "exp_avg_slow": state("the slow EMA of the gradient (``beta3``)."),
        "exp_avg_sq": state("the EMA of the squared gradient (``beta2``).", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    check_order=("lr", "eps", "betas", "alpha", "alpha_warmup", "beta3_warmup"),
    doc="State of :func:`ademamix` and :func:`scale_by_ademamix`.",
)
AdEMAMixState = ADEMAMIX.state


@ADEMAMIX.public
def ademamix(
    lr: LR = 1e-3,
    betas: Betas3 = (0.9, 0.999, 0.9999),
    alpha: Alpha = 2.0,
    eps: Eps = 1e-8,
    weight_decay: float = 0.0,
    *,
    alpha_warmup: Warmup = None,
    beta3_warmup: Warmup = None,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """AdEMAMix: Adam plus ``alpha`` times a slow EMA of the gradient (``beta3`` close to 1) in the numerator (the
    rule is in the module docstring).

    Args:
      betas: ``(beta1, beta2, beta3)``: fast EMA, second moment, slow EMA.
      alpha: weight of the slow EMA (the reference default is 2; the paper uses 5-10 for language models).
      eps: added to the denominator.
      weight_decay: decoupled weight decay coefficient (multiplied by ``lr``).
      alpha_warmup: number of steps of the alpha warmup (``None``: off).
      beta3_warmup: number of steps of the beta3 warmup (``None``: off).

    Example::

        tx = pureopt.ademamix(lr=1e-3, alpha=8.0, alpha_warmup=10_000, beta3_warmup=10_000, weight_decay=0.1)

    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024 (arXiv:2409.03137).
    """
    betas = _half_life_betas(betas, beta3_warmup)
    check_nonneg(weight_decay, "weight_decay")  # (after the betas' last check, as before)
    return ADEMAMIX.build(locals())


@ADEMAMIX.public
def scale_by_ademamix(
    betas: Betas3 = (0.9, 0.999, 0.9999),
    alpha: Alpha = 2.0,
    eps: Eps = 1e-8,
    *,
    alpha_warmup: Warmup = None,
    beta3_warmup: Warmup = None,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by AdEMAMix's direction, ``(m1 / (1 - beta1**t) + alpha * m2) / (sqrt(v) / sqrt(1 -
    beta2**t) + eps)`` (``alpha_warmup`` / ``beta3_warmup``: the paper's warmup schedulers, see the module
    docstring).

    Example::

        tx = pureopt.chain(pureopt.scale_by_ademamix(alpha=8.0), pureopt.scale_by_learning_rate(1e-3))

    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024.
    """
    return ADEMAMIX.build(locals(), betas=_half_life_betas(betas, beta3_warmup))
