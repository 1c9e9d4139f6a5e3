"""Adamax (with weight decay and maximize): torch.optim.Adamax's math on tensor lists.

Update rule (torch.optim.Adamax), per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                          if maximize
    t <- t + 1
    g <- g + weight_decay * p                        if weight_decay != 0
    m <- m + (1 - beta1) * (g - m)                   (lerp; torch's exp_avg)
    u <- max(beta2 * u, |g| + eps)                   (torch's exp_inf)
    update = -(lr / (1 - beta1**t)) * m / u

``lr=None`` returns the positive direction ``m / (1 - beta1**t) / u`` (used by :func:`scale_by_adamax`).
Complex tensors are viewed as real pairs, as torch.optim does. Sparse gradients are rejected with torch.optim's
message.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1 (AdaMax).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import as_complex_like, as_real, cast_like, over, per_tensor, scalars_for
from pureopt.kernels.listops import ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdamaxResult", "adamax"]


class AdamaxResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor]
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_inf: list[Tensor]


def adamax(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
) -> AdamaxResult:
    """One Adamax step over tensor lists; returns the updates and the new state lists (see module docstring)."""
    if any(g.is_sparse for g in grads):
        raise RuntimeError("Adamax does not support sparse gradients")
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    like = grads
    ms, us = as_real(exp_avgs), as_real(exp_infs)
    g = cast_like(as_real(grads), ms)  # state may be kept in another dtype (state_dtype=)
    owned = False
    if maximize:
        g, owned = ops.neg(g), True
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    if weight_decay != 0:
        rparams = cast_like(as_real(params), ms)  # type: ignore[arg-type]
        g, owned = ops.add(g, rparams, alpha=weight_decay, inplace=owned), True
    new_ms = ops.lerp(ms, g, 1 - beta1, inplace=donate)
    abs_eps = ops.add_scalar(ops.abs(g, inplace=owned), eps, inplace=True)
    new_us = ops.maximum(ops.mul(us, beta2, inplace=donate), abs_eps, inplace=True)
    sign = 1.0 if lr is None else -1.0
    step_lr = 1.0 if lr is None else lr
    # torch: clr = lr / (1 - beta1**t) on Python floats; here per tensor in float64
    step_size = per_tensor(new_steps, lambda t: over(sign * step_lr, 1 - torch.pow(beta1, t)))
    # (step_size * m) / u: torch's addcdiv order, so that p + update is bitwise torch's p.addcdiv_(m, u, -clr)
    updates = ops.div_list(ops.mul(new_ms, scalars_for(step_size, new_ms)), new_us, inplace=True)
    return AdamaxResult(
        as_complex_like(updates, like),
        new_steps,
        as_complex_like(new_ms, like),
        as_complex_like(new_us, like),
    )
