"""AdEMAMix: Adam plus a second, slow EMA of the gradient added to the numerator with weight ``alpha``.

Update rule (Pagliardini, Ablin & Grangier 2024, Algorithm 1), per parameter ``p`` with gradient ``g`` and its
own step count ``t``::

    g <- -g                                                   if maximize
    t <- t + 1
    m1 <- beta1 * m1 + (1 - beta1) * g                        (fast EMA, bias-corrected)
    m2 <- beta3_t * m2 + (1 - beta3_t) * g                    (slow EMA, not bias-corrected)
    v <- beta2 * v + (1 - beta2) * g**2
    update = -lr * ((m1 / (1 - beta1**t) + alpha_t * m2) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
                    + weight_decay * p)

with the optional warmup schedulers of the paper (constant ``alpha`` / ``beta3`` when not given)::

    alpha_t = min(t * alpha / alpha_warmup, alpha)
    beta3_t = min(exp(ln(beta1) * ln(beta3) / ((1 - a) * ln(beta3) + a * ln(beta1))), beta3),  a = min(t / T, 1)

where ``T = beta3_warmup``: the half-life ``ln(0.5) / ln(beta)`` grows linearly from beta1's to beta3's. (``a`` is
capped at 1, which only matters when ``beta1 > beta3``, where the uncapped formula leaves its domain.) Scheduled
values use the per-parameter step count. ``lr=None`` returns the positive direction (used by
``scale_by_ademamix``). Complex tensors are viewed as real pairs.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024 (arXiv:2409.03137;
ICLR 2025).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_scaled,
    add_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_for,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdEMAMixResult", "ademamix", "alpha_schedule", "beta3_schedule"]


class AdEMAMixResult(NamedTuple):
    """Updates and new state lists (named like the reference implementation's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg_fast: list[Tensor]
    exp_avg_slow: list[Tensor]
    exp_avg_sq: list[Tensor]


def alpha_schedule(t: Tensor, alpha: float, warmup: int) -> Tensor:
    """The paper's linear alpha warmup ``min(t * alpha / warmup, alpha)`` for step counts ``t`` (float tensor)."""
    return torch.clamp(t * alpha / warmup, max=alpha)


def beta3_schedule(t: Tensor, beta1: float, beta3: float, warmup: int) -> Tensor:
    """The paper's beta3 warmup (linear in half-life from ``beta1`` to ``beta3``) for step counts ``t``."""
    a = torch.clamp(t / warmup, max=1.0)
    log1, log3 = math.log(beta1), math.log(beta3)
    return torch.clamp(torch.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), max=beta3)


def ademamix(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avg_fasts: list[Tensor],
    exp_avg_slows: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    alpha_warmup: int | None,
    beta3_warmup: int | None,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> AdEMAMixResult:
    """One AdEMAMix step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): update the parameters
    in place too (``p.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avg_fasts])
    ops = ops_for(path)
    m1, m2, v = as_real(exp_avg_fasts), as_real(exp_avg_slows), as_real(exp_avg_sqs)
    g = cast_like(as_real(grads), m1)  # state may be kept in another dtype (state_dtype=)
    decay = weight_decay != 0 and lr is not None
    if decay:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m1) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)

    def scalars(t: Tensor) -> tuple[Tensor, ...]:
        t = t + 1
        out = [1 / (1 - torch.pow(beta1, t)), torch.sqrt(1 - torch.pow(beta2, t))]
        if alpha_warmup is not None:
            out.append(alpha_schedule(t, alpha, alpha_warmup))
        if beta3_warmup is not None:
            out.append(1 - beta3_schedule(t, beta1, beta3, beta3_warmup))
        return tuple(out)

    n_out = 2 + (alpha_warmup is not None) + (beta3_warmup is not None)
    inv_bc1, bc2_sqrt, *scheduled = map_scalars_n(scalars, steps, outputs=n_out, like=m1, host=on_host(apply, m1))
    alpha_t = scheduled[0] if alpha_warmup is not None else None
    beta3_weight = scheduled[-1] if beta3_warmup is not None else None
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        m1: list[Tensor],
        m2: list[Tensor],
        v: list[Tensor],
        inv_bc1: list[Tensor],
        bc2_sqrt: list[Tensor],
        alpha_t: list[Tensor] | None,
        beta3_weight: list[Tensor] | None,
    ) -> tuple[list[Tensor] | None, ...]:
        if maximize:
            g = ops.neg(g)
        new_m1 = ops.lerp(m1, g, 1 - beta1, inplace=donate)
        if beta3_weight is None:
            new_m2 = ops.lerp(m2, g, 1 - beta3, inplace=donate)
        else:
            new_m2 = ops.add(m2, ops.mul(ops.sub(g, m2), beta3_weight, inplace=True), inplace=donate)
        new_v = ema_of_squares(ops, v, g, beta2, donate=donate)

        slow_weight: float | list[Tensor] = alpha if alpha_t is None else alpha_t
        denom = ops.add_scalar(ops.div(ops.sqrt(new_v), bc2_sqrt, inplace=True), eps, inplace=True)
        numer = ops.add(ops.mul(new_m1, inv_bc1), ops.mul(new_m2, slow_weight), inplace=True)
        direction = ops.div_list(numer, denom, inplace=True)
        if apply:
            assert p is not None
            if decay:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            add_update(ops, p, direction, 1.0 if lr is None else -lr, owned=True)
            return None, new_m1, new_m2, new_v
        if lr is None:
            return direction, new_m1, new_m2, new_v
        updates = ops.mul(direction, -lr, inplace=True)
        if decay:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)  # type: ignore[arg-type]
        return updates, new_m1, new_m2, new_v

    columns = (rparams, g, m1, m2, v, inv_bc1, bc2_sqrt, alpha_t, beta3_weight)
    updates, new_m1, new_m2, new_v = elementwise(body, ops, columns, writes=(None, 2, 3, 4), in_place=apply)
    assert new_m1 is not None and new_m2 is not None and new_v is not None
    return AdEMAMixResult(
        None if updates is None else as_complex_like(updates, grads),
        new_steps,
        as_complex_like(new_m1, grads),
        as_complex_like(new_m2, grads),
        as_complex_like(new_v, grads),
    )
