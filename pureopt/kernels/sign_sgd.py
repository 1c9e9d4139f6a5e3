"""signSGD and Signum: steps of fixed size along the sign of the gradient (or of its running average).

Update rule (Bernstein et al. 2018, Algorithms 1 and 3), per parameter ``p`` with gradient ``g``::

    g <- -g                                   if maximize
    g <- g + weight_decay * p                 if weight_decay != 0 and not decoupled
    m <- momentum * m + (1 - momentum) * g    Signum (momentum != 0; m starts at 0), else d = g
    d = sign(m)
    update = -lr * d
    update <- update - lr * weight_decay * p  if weight_decay != 0 and decoupled

``lr=None`` returns ``sign(m)`` (or ``sign(g)``). Complex tensors are viewed as real pairs: the sign is taken per
real component, as torch.optim.Rprop does. ``sign(0) = 0``.

Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems",
ICML 2018.
"""

from __future__ import annotations

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
    scalar_for,
    torch_grad,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["SignumResult", "signum"]


class SignumResult(NamedTuple):
    """Updates and the new momentum buffers (``None`` for signSGD, which keeps none)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    momentum_buffer: list[Tensor] | None


def _to(xs: list[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    if dtype is None:
        return xs
    real = dtype.to_real()
    return [x if x.dtype == real else x.to(real) for x in xs]


def signum(
    params: list[Tensor] | None,
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor | None,
    momentum: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    compute_dtype: torch.dtype | None = None,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> SignumResult:
    """One signSGD (``momentum_buffers=None``) or Signum step over tensor lists (see module docstring).

    ``compute_dtype`` casts the gradients when no state fixes the dtype (signSGD with ``state_dtype=``).
    ``apply`` (with ``donate`` and ``params``): update the parameters in place too (decoupled decay first, then
    ``p.add_(d, alpha=-lr)``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *(momentum_buffers or [])])
    ops = ops_for(path)
    bufs = as_real(momentum_buffers) if momentum_buffers is not None else None
    g = as_real(grads)
    g = cast_like(g, bufs) if bufs is not None else _to(g, compute_dtype)
    uses_p = weight_decay != 0 and (lr is not None or not decoupled_weight_decay)
    if uses_p:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), g) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    decoupled = uses_p and decoupled_weight_decay

    def body(
        ops: ListOps, p: list[Tensor] | None, g: list[Tensor], bufs: list[Tensor] | None
    ) -> tuple[list[Tensor] | None, ...]:
        coupled = weight_decay if uses_p and not decoupled_weight_decay else 0.0
        g, owned = torch_grad(ops, g, p, maximize=maximize, weight_decay=coupled)
        new_bufs = None
        if bufs is not None:
            new_bufs = ops.lerp(bufs, g, 1 - momentum, inplace=donate)
            direction = ops.sign(new_bufs)
        else:
            direction = ops.sign(g, inplace=owned)
        if apply:
            assert p is not None
            if decoupled:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            add_update(ops, p, direction, 1.0 if lr is None else -lr, owned=True)
            return None, new_bufs
        if lr is None:
            return direction, new_bufs
        updates = ops.mul(direction, -lr, inplace=True)
        if decoupled:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)  # type: ignore[arg-type]
        return updates, new_bufs

    updates, new_bufs = elementwise(body, ops, (rparams, g, bufs), writes=(None, 2), in_place=apply)
    return SignumResult(
        None if updates is None else as_complex_like(updates, grads),
        as_complex_like(new_bufs, grads) if new_bufs is not None else None,
    )
