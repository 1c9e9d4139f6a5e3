"""Lion (EvoLved Sign Momentum): the sign of an interpolated momentum, with decoupled weight decay.

Update rule (Chen et al. 2023, Algorithm 2), per parameter ``p`` with gradient ``g``::

    g <- -g                                    if maximize
    c = beta1 * m + (1 - beta1) * g            (interpolation used for the step)
    update = -lr * (sign(c) + weight_decay * p)
    m <- beta2 * m + (1 - beta2) * g           (the momentum kept, with the slower beta2)

``lr=None`` returns ``sign(c)`` (used by ``scale_by_lion``). Complex tensors are viewed as real pairs, so the sign
is taken per real component. No step count is needed: there is no bias correction.

Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of Optimization
Algorithms", NeurIPS 2023.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from pureopt.kernels.common import as_complex_like, as_real, cast_like
from pureopt.kernels.lars import add_scaled, require_params
from pureopt.kernels.listops import ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["LionResult", "lion"]


class LionResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor]
    exp_avg: list[Tensor]


def lion(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
) -> LionResult:
    """One Lion step over tensor lists; returns the updates and the new momentum (see module docstring)."""
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m = as_real(exp_avgs)
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    p = None
    if weight_decay != 0 and lr is not None:
        p = cast_like(as_real(require_params(params, "weight_decay")), m)
    if maximize:
        g = ops.neg(g)
    direction = ops.sign(ops.lerp(m, g, 1 - beta1), inplace=True)
    new_m = ops.lerp(m, g, 1 - beta2, inplace=donate)
    if lr is None:
        updates = direction
    else:
        updates = ops.mul(direction, -lr, inplace=True)
        if p is not None:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)
    return LionResult(as_complex_like(updates, grads), as_complex_like(new_m, grads))
