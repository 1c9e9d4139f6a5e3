"""Adadelta (with weight decay and maximize): torch.optim.Adadelta's math on tensor lists.

Update rule (torch.optim.Adadelta), per parameter ``p`` with gradient ``g``, running averages ``v``
(``square_avg``) and ``u`` (``acc_delta``), both starting at zero::

    t <- t + 1                                       (kept for torch's state format; not used)
    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0
    v <- rho * v + (1 - rho) * g * g
    delta = sqrt(u + eps) / sqrt(v + eps) * g
    u <- rho * u + (1 - rho) * delta * delta
    update = -lr * delta

``lr=None`` returns ``delta`` itself (used by :func:`scale_by_adadelta`). Complex tensors are viewed as real
pairs, as torch.optim does. Sparse gradients are rejected with torch.optim's message.

Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from pureopt.kernels.common import (
    add_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdadeltaResult", "adadelta"]


class AdadeltaResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    square_avg: list[Tensor]
    acc_delta: list[Tensor]


def adadelta(
    params: list[Tensor] | None,
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> AdadeltaResult:
    """One Adadelta step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (torch's ``p.add_(delta, alpha=-lr)``) and return ``updates=None``.
    """
    if any(g.is_sparse for g in grads):
        raise RuntimeError("Adadelta does not support sparse gradients")
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    path = choose_impl(impl, [*grads, *square_avgs])
    ops = ops_for(path)
    like = grads
    vs, us = as_real(square_avgs), as_real(acc_deltas)
    g = cast_like(as_real(grads), vs)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), vs) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    def body(
        ops: ListOps, p: list[Tensor] | None, g: list[Tensor], vs: list[Tensor], us: list[Tensor]
    ) -> tuple[list[Tensor] | None, ...]:
        g, _ = torch_grad(ops, g, p, maximize=maximize, weight_decay=weight_decay)
        new_vs = ema_of_squares(ops, vs, g, rho, donate=donate)
        std = ops.sqrt(ops.add_scalar(new_vs, eps), inplace=True)
        delta = ops.sqrt(ops.add_scalar(us, eps), inplace=True)
        delta = ops.mul_list(ops.div_list(delta, std, inplace=True), g, inplace=True)
        new_us = ema_of_squares(ops, us, delta, rho, donate=donate)
        if apply:  # torch: p.add_(delta, alpha=-lr)
            add_update(ops, p, delta, 1.0 if lr is None else -lr, owned=True)
            return None, new_vs, new_us
        if lr is None:
            updates = delta
        elif p is not None and not isinstance(lr, Tensor):
            # p_new - p with p_new from torch's own op (p.add_(delta, alpha=-lr), a fused multiply-add), so that
            # p + update reproduces torch's parameter bit for bit whenever the subtraction is exact
            updates = ops.sub(ops.add(p, delta, alpha=-lr), p, inplace=True)
        else:
            updates = ops.mul(delta, -lr, inplace=True)
        return updates, new_vs, new_us

    updates, new_vs, new_us = elementwise(body, ops, (rparams, g, vs, us), writes=(None, 2, 3), in_place=apply)
    assert new_vs is not None and new_us is not None
    return AdadeltaResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        as_complex_like(new_vs, like),
        as_complex_like(new_us, like),
    )
