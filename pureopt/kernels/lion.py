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

from pureopt.kernels.common import (
    add_scaled,
    add_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    scalar_for,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["LionResult", "lion"]


class LionResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
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
    apply: bool = False,
) -> LionResult:
    """One Lion step over tensor lists; returns the updates and the new momentum (see module docstring).

    ``donate``: the momentum may be overwritten. ``apply`` (with ``donate`` and ``params``): update the parameters
    in place too (``p.mul_(1 - lr * weight_decay).add_(sign(c), alpha=-lr)``, the authors' order) and return
    ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m = as_real(exp_avgs)
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    decay = weight_decay != 0 and lr is not None
    if decay:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)

    def body(ops: ListOps, p: list[Tensor] | None, g: list[Tensor], m: list[Tensor]) -> tuple[list[Tensor] | None, ...]:
        if maximize:
            g = ops.neg(g)
        direction = ops.sign(ops.lerp(m, g, 1 - beta1), inplace=True)
        new_m = ops.lerp(m, g, 1 - beta2, inplace=donate)
        if apply:
            assert p is not None
            if decay:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            add_update(ops, p, direction, 1.0 if lr is None else -lr, owned=True)
            return None, new_m
        if lr is None:
            return direction, new_m
        updates = ops.mul(direction, -lr, inplace=True)
        if decay:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)  # type: ignore[arg-type]
        return updates, new_m

    updates, new_m = elementwise(body, ops, (rparams, g, m), writes=(None, 2), in_place=apply)
    assert new_m is not None
    return LionResult(None if updates is None else as_complex_like(updates, grads), as_complex_like(new_m, grads))
