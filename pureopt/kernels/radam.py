"""RAdam (rectified Adam, with coupled or decoupled weight decay, maximize): torch.optim.RAdam's math on lists.

Update rule (torch.optim.RAdam), per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                             if maximize
    t <- t + 1
    g <- g + weight_decay * p                           if weight_decay != 0 and not decoupled
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
    if rho_t > 5:   (the variance is tractable)
        r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        update = -lr * m_hat * sqrt(1 - beta2**t) / (sqrt(v) + eps) * r
    else:
        update = -lr * m_hat
    update <- update - lr * weight_decay * p            if weight_decay != 0 and decoupled

The branch on ``rho_t`` is a ``torch.where`` on per-tensor 0-d values (no host synchronisation): each
parameter takes its own branch from its own step count. ``lr=None`` gives the positive direction (used by
:func:`pureopt.transforms.radam.scale_by_radam`). Complex tensors are viewed as real pairs, as torch does.

Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_scaled,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_for,
    scalars_for,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.nadam import autograd_recording
from pureopt.kernels.select import choose_impl

__all__ = ["RAdamResult", "radam", "reciprocal"]


class RAdamResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def reciprocal(ops: ListOps, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
    """``1 / x`` for every tensor (``torch.reciprocal``; :meth:`ListOps.reciprocal`)."""
    return ops.reciprocal(xs, inplace=inplace)


def radam(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> RAdamResult:
    """One RAdam step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (torch's ops: decay, then ``p.add_(direction, alpha=-1)``) and return
    ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    # in place on the kernel's own temporaries, unless autograd records through the update
    tmp = not autograd_recording(params, grads, exp_avgs, exp_avg_sqs)
    donate = donate and tmp
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    like = grads
    ms, vs = as_real(exp_avgs), as_real(exp_avg_sqs)
    g = cast_like(as_real(grads), ms)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), ms) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    rho_inf = 2 / (1 - beta2) - 1

    def rho(t: Tensor) -> Tensor:
        return rho_inf - 2 * t * torch.pow(beta2, t) / (1 - torch.pow(beta2, t))

    def rect(t: Tensor) -> Tensor:
        rho_t = rho(t)
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        # only taken where rho_t > 5; elsewhere 1 so that no NaN is ever formed (even for autograd)
        return torch.sqrt(torch.where(rho_t > 5.0, ratio, torch.ones_like(ratio)))

    sign = -1.0 if lr is not None else 1.0
    step_lr = 1.0 if lr is None else lr

    def scalars(t: Tensor) -> tuple[Tensor, ...]:
        bc1, bc2_sqrt, ok, r = 1 - torch.pow(beta1, t), torch.sqrt(1 - torch.pow(beta2, t)), rho(t) > 5.0, rect(t)
        # torch's foreach scalars: the rectified step with sqrt(1 - beta2**t) and the plain step, 0 when not taken
        rect_step = bc2_sqrt * (step_lr * torch.where(ok, r, torch.zeros_like(r)) / bc1) * sign
        plain_step = (step_lr * (~ok).to(bc1.dtype) / bc1) * sign
        return bc1, bc2_sqrt, ok, r, rect_step, plain_step

    # on the applied CPU path: Python numbers and torch's foreach formula (torch.optim.RAdam(foreach=True)),
    # 9 passes instead of 12: direction = m * (rect_step / (sqrt(v) + eps) + plain_step)
    host = on_host(apply, ms)
    bias_correction1, bc2_sqrt, rectified, rects, rect_step, plain_step = map_scalars_n(
        scalars, new_steps, outputs=6, host=(4, 5) if host else ()
    )
    bias_correction1, bc2_sqrt, rects = (scalars_for(x, ms) for x in (bias_correction1, bc2_sqrt, rects))
    decoupled = weight_decay != 0 and decoupled_weight_decay and lr is not None

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        ms: list[Tensor],
        vs: list[Tensor],
        bias_correction1: list[Tensor],
        bc2_sqrt: list[Tensor],
        rectified: list[Tensor],
        rects: list[Tensor],
        rect_step: list[float],
        plain_step: list[float],
    ) -> tuple[list[Tensor] | None, ...]:
        coupled = 0.0 if decoupled_weight_decay else weight_decay
        g, _ = torch_grad(ops, g, p, maximize=maximize, weight_decay=coupled, own=tmp)
        m = ops.lerp(ms, g, 1 - beta1, inplace=donate)
        v = ema_of_squares(ops, vs, g, beta2, donate=donate, own=tmp)
        if host:  # torch (foreach): p.mul_(1 - lr * wd); p.addcmul_(m, 1 / ((sqrt(v) + eps) / rect_step) + plain_step)
            assert p is not None
            factor = ops.add_scalar(ops.sqrt(v), eps, inplace=True)
            factor = ops.add_scalar(
                ops.reciprocal(ops.div(factor, rect_step, inplace=True), inplace=True), plain_step, True
            )
            if decoupled:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            ops.addcmul(p, m, factor, inplace=True)
            return None, m, v
        # torch (for-loop): m_hat = m / bc1; m_hat * lr * (sqrt(bc2) / (sqrt(v) + eps)) * r, the middle factor
        # formed as reciprocal(sqrt(v) + eps) * sqrt(bc2) (Python's float / Tensor)
        plain = ops.div(m, bias_correction1)
        if lr is not None:
            plain = ops.mul(plain, lr, inplace=tmp)
        denom = ops.add_scalar(ops.sqrt(v), eps, inplace=tmp)
        adaptive = ops.mul(ops.reciprocal(denom, inplace=tmp), bc2_sqrt, tmp)
        scaled = ops.mul(ops.mul_list(adaptive, plain, inplace=tmp), rects, inplace=tmp)
        if tmp and ops.inplace_ok:  # into the temporary it replaces (not under vmap: no batching rule)
            direction = [torch.where(c, s, x, out=s) for c, s, x in zip(rectified, scaled, plain)]
        else:
            direction = [torch.where(c, s, x) for c, s, x in zip(rectified, scaled, plain)]
        if apply:  # torch: p.mul_(1 - lr * wd); p.add_(direction, alpha=-1)
            assert p is not None
            if decoupled:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            (ops.sub if lr is not None else ops.add)(p, direction, inplace=True)
            return None, m, v
        updates = ops.neg(direction, inplace=tmp) if lr is not None else direction
        if decoupled:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=tmp)  # type: ignore[arg-type, operator]
        return updates, m, v

    columns = (rparams, g, ms, vs, bias_correction1, bc2_sqrt, rectified, rects, rect_step, plain_step)
    updates, m, v = elementwise(body, ops, columns, writes=(None, 2, 3), in_place=apply)
    assert m is not None and v is not None
    return RAdamResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        as_complex_like(m, like),
        as_complex_like(v, like),
    )
