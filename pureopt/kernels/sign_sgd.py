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

from pureopt.kernels.common import as_complex_like, as_real, cast_like
from pureopt.kernels.lars import add_scaled, require_params
from pureopt.kernels.listops import ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["SignumResult", "signum"]


class SignumResult(NamedTuple):
    """Updates and the new momentum buffers (``None`` for signSGD, which keeps none)."""

    updates: list[Tensor]
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
) -> SignumResult:
    """One signSGD (``momentum_buffers=None``) or Signum step over tensor lists (see module docstring).

    ``compute_dtype`` casts the gradients when no state fixes the dtype (signSGD with ``state_dtype=``).
    """
    path = choose_impl(impl, [*grads, *(momentum_buffers or [])])
    ops = ops_for(path)
    bufs = as_real(momentum_buffers) if momentum_buffers is not None else None
    g = as_real(grads)
    g = cast_like(g, bufs) if bufs is not None else _to(g, compute_dtype)
    p = None
    if weight_decay != 0 and (lr is not None or not decoupled_weight_decay):
        p = as_real(require_params(params, "weight_decay"))
        p = cast_like(p, g)
    owned = False
    if maximize:
        g, owned = ops.neg(g), True
    if p is not None and not decoupled_weight_decay:
        g, owned = ops.add(g, p, alpha=weight_decay, inplace=owned), True
    new_bufs = None
    if bufs is not None:
        new_bufs = ops.lerp(bufs, g, 1 - momentum, inplace=donate)
        direction = ops.sign(new_bufs)
    else:
        direction = ops.sign(g, inplace=owned)
    if lr is None:
        updates = direction
    else:
        updates = ops.mul(direction, -lr, inplace=True)
        if p is not None and decoupled_weight_decay:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)
    return SignumResult(
        as_complex_like(updates, grads),
        as_complex_like(new_bufs, grads) if new_bufs is not None else None,
    )
