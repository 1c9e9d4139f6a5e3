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

from pureopt.kernels.common import (
    addcdiv_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    on_host,
    over,
    per_tensor,
    scalars_for,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdamaxResult", "adamax"]


class AdamaxResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
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
    apply: bool = False,
) -> AdamaxResult:
    """One Adamax step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (torch's last op) and return ``updates=None``.
    """
    if any(g.is_sparse for g in grads):
        raise RuntimeError("Adamax does not support sparse gradients")
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    like = grads
    ms, us = as_real(exp_avgs), as_real(exp_infs)
    g = cast_like(as_real(grads), ms)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), ms) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    sign = 1.0 if lr is None else -1.0
    step_lr = 1.0 if lr is None else lr
    # torch: clr = lr / (1 - beta1**t) on Python floats; here per tensor in float64 (Python floats on CPU, applied)
    clr = per_tensor(new_steps, lambda t: over(sign * step_lr, 1 - torch.pow(beta1, t)), host=on_host(apply, ms))
    step_size = scalars_for(clr, ms)

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        ms: list[Tensor],
        us: list[Tensor],
        step_size: list[Tensor],
    ) -> tuple[list[Tensor] | None, ...]:
        g, owned = torch_grad(ops, g, p, maximize=maximize, weight_decay=weight_decay)
        new_ms = ops.lerp(ms, g, 1 - beta1, inplace=donate)
        abs_eps = ops.add_scalar(ops.abs(g, inplace=owned), eps, inplace=True)
        new_us = ops.maximum(ops.mul(us, beta2, inplace=donate), abs_eps, inplace=True)
        # (step_size * m) / u: torch's addcdiv order, so that p + update is bitwise torch's p.addcdiv_(m, u, -clr)
        updates = addcdiv_update(ops, p if apply else None, new_ms, new_us, step_size, owned=False)
        return updates, new_ms, new_us

    updates, new_ms, new_us = elementwise(
        body, ops, (rparams, g, ms, us, step_size), writes=(None, 2, 3), in_place=apply
    )
    assert new_ms is not None and new_us is not None
    return AdamaxResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        as_complex_like(new_ms, like),
        as_complex_like(new_us, like),
    )
