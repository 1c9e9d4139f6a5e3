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

from pureopt.kernels.common import as_complex_like, as_real, cast_like, per_tensor, scalars_for
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.nadam import autograd_recording
from pureopt.kernels.select import choose_impl

__all__ = ["RAdamResult", "radam", "reciprocal"]


class RAdamResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor]
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def reciprocal(ops: ListOps, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
    """``1 / x`` for every tensor (``torch.reciprocal``)."""
    if ops.foreach:
        if inplace:
            torch._foreach_reciprocal_(xs)
            return xs
        return list(torch._foreach_reciprocal(xs))
    if inplace:
        return [x.reciprocal_() for x in xs]
    return [torch.reciprocal(x) for x in xs]


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
) -> RAdamResult:
    """One RAdam step over tensor lists; returns the updates and the new state lists (see module docstring)."""
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
    owned = False
    if maximize:
        g = ops.neg(g)
        owned = tmp
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    if weight_decay != 0 and not decoupled_weight_decay:
        g = ops.add(g, rparams, alpha=weight_decay, inplace=owned)  # type: ignore[arg-type]
    m = ops.lerp(ms, g, 1 - beta1, inplace=donate)
    v = ops.addcmul(ops.mul(vs, beta2, inplace=donate), g, g, value=1 - beta2, inplace=tmp)

    rho_inf = 2 / (1 - beta2) - 1

    def rho(t: Tensor) -> Tensor:
        return rho_inf - 2 * t * torch.pow(beta2, t) / (1 - torch.pow(beta2, t))

    def rect(t: Tensor) -> Tensor:
        rho_t = rho(t)
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        # only taken where rho_t > 5; elsewhere 1 so that no NaN is ever formed (even for autograd)
        return torch.sqrt(torch.where(rho_t > 5.0, ratio, torch.ones_like(ratio)))

    bias_correction1 = per_tensor(new_steps, lambda t: 1 - torch.pow(beta1, t))
    bc2_sqrt = per_tensor(new_steps, lambda t: torch.sqrt(1 - torch.pow(beta2, t)))
    rectified = per_tensor(new_steps, lambda t: rho(t) > 5.0)
    rects = per_tensor(new_steps, rect)
    bias_correction1, bc2_sqrt, rects = (scalars_for(x, m) for x in (bias_correction1, bc2_sqrt, rects))

    # torch: m_hat = m / bc1; m_hat * lr * (sqrt(bc2) / (sqrt(v) + eps)) * r, the middle factor formed as
    # reciprocal(sqrt(v) + eps) * sqrt(bc2) (Python's float / Tensor)
    plain = ops.div(m, bias_correction1)
    if lr is not None:
        plain = ops.mul(plain, lr, inplace=tmp)
    adaptive = ops.mul(reciprocal(ops, ops.add_scalar(ops.sqrt(v), eps, inplace=tmp), inplace=tmp), bc2_sqrt, tmp)
    scaled = ops.mul(ops.mul_list(adaptive, plain, inplace=tmp), rects, inplace=tmp)
    direction = [torch.where(c, s, p) for c, s, p in zip(rectified, scaled, plain)]
    updates = ops.neg(direction, inplace=tmp) if lr is not None else direction
    if weight_decay != 0 and decoupled_weight_decay and lr is not None:
        decay = -lr * weight_decay
        if isinstance(decay, Tensor):
            decays = scalars_for([decay] * len(updates), updates)
            updates = ops.add(updates, ops.mul(rparams, decays), inplace=tmp)  # type: ignore[arg-type]
        else:
            updates = ops.add(updates, rparams, alpha=decay, inplace=tmp)  # type: ignore[arg-type]
    return RAdamResult(as_complex_like(updates, like), new_steps, as_complex_like(m, like), as_complex_like(v, like))
