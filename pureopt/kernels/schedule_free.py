"""Schedule-Free SGD / AdamW: three interleaved sequences instead of a learning-rate schedule.

The method keeps a base sequence ``z`` (plain SGD or Adam-normalised steps), an average ``x`` of the ``z``'s
(what one evaluates), and the point ``y`` between them where gradients are taken (the training parameters)::

    y_t     = (1 - beta) * z_t + beta * x_t
    z_{t+1} = z_t - lr_t * d_t                            d_t: the (normalised) gradient at y_t, below
    x_{t+1} = (1 - c_{t+1}) * x_t + c_{t+1} * z_{t+1}

Only ``y`` (the parameters) and ``z`` (state) are stored; ``x = (y - (1 - beta) * z) / beta`` is recovered on demand.
Eliminating ``x`` gives the step actually applied to the parameters::

    y_{t+1} - y_t = c_{t+1} * (z_t - y_t) + lr_t * (beta * (1 - c_{t+1}) - 1) * d_t

The global scalars follow the reference algorithm, with ``k`` the number of updates so far (0 on the first)::

    lr_t    = lr * min(1, (k + 1) / warmup_steps)            (lr when warmup_steps == 0)
    lr_max  = max(lr_max, lr_t)
    weight  = (k + 1)**r * lr_max**weight_lr_power
    c_{t+1} = weight / (sum of all weights so far)           (0 while that sum is 0)

and the per-parameter direction (``g`` the gradient at ``y``, negated if maximize; ``t`` its own step count)::

    SGD:    d = g + weight_decay * y
    AdamW:  v <- beta2 * v + (1 - beta2) * g**2;   d = g / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay * y

Complex tensors are viewed as real pairs.

Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024.
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
    ema_of_squares,
    map_scalars_n,
    scalar_for,
    torch_grad,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["ScheduleFreeResult", "ScheduleFreeScalars", "schedule_free", "schedule_free_scalars"]


class ScheduleFreeScalars(NamedTuple):
    """The global (not per-parameter) quantities of one schedule-free update, as 0-d tensors."""

    lr: Tensor
    """the warmed-up learning rate ``lr_t``"""
    ckp1: Tensor
    """the averaging weight ``c_{t+1}``"""
    weight_sum: Tensor
    """the new sum of averaging weights"""
    lr_max: Tensor
    """the new largest learning rate so far"""


def schedule_free_scalars(
    num_updates: Tensor,
    lr: float | Tensor,
    weight_sum: Tensor,
    lr_max: Tensor,
    *,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
) -> ScheduleFreeScalars:
    """The warmed-up learning rate, the averaging weight and the new running sums (see module docstring).

    Computed in ``weight_sum``'s dtype on its device, without a host sync.
    """
    dtype, device = weight_sum.dtype, weight_sum.device
    k1 = num_updates.to(dtype=dtype, device=device) + 1
    lr_t = torch.as_tensor(lr, dtype=dtype, device=device)
    if warmup_steps > 0:
        lr_t = lr_t * torch.clamp(k1 / warmup_steps, max=1.0)
    new_lr_max = torch.maximum(lr_max, lr_t)
    weight = torch.pow(k1, r) * torch.pow(new_lr_max, weight_lr_power)
    new_sum = weight_sum + weight
    positive = new_sum > 0
    ckp1 = torch.where(positive, weight / torch.where(positive, new_sum, torch.ones_like(new_sum)), 0.0)
    return ScheduleFreeScalars(lr_t, ckp1, new_sum, new_lr_max)


class ScheduleFreeResult(NamedTuple):
    """Updates (``y_{t+1} - y_t``) and new state lists; ``None`` for what SGD does not keep."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor] | None
    z: list[Tensor]
    exp_avg_sq: list[Tensor] | None


def schedule_free(
    params: list[Tensor] | None,
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor] | None,
    steps: list[Tensor] | None,
    *,
    lr: Tensor,
    ckp1: Tensor,
    beta: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> ScheduleFreeResult:
    """One schedule-free step (AdamW when ``exp_avg_sqs`` is given, else SGD) over tensor lists.

    Args:
      params: the training parameters ``y`` (required).
      grads: the gradients at ``y``.
      zs: the base sequence ``z``.
      exp_avg_sqs, steps: Adam's second moments and per-parameter step counts (``None`` for SGD).
      lr, ckp1: the global scalars from :func:`schedule_free_scalars` (computed once per update, by the caller).
      beta: the interpolation ``y = (1 - beta) z + beta x`` (SGD's momentum, AdamW's beta1).
      donate: the state lists may be overwritten.
      apply: with ``donate``, update ``y`` in place too (the reference implementation's ops:
        ``y.lerp_(z, ckp1); y.add_(d, alpha=lr * (beta * (1 - ckp1) - 1))``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *zs])
    ops = ops_for(path)
    z = as_real(zs)
    y = cast_like(as_real(require_params(params, "schedule-free")), z)
    g = cast_like(as_real(grads), z)  # state may be kept in another dtype (state_dtype=)
    apply = can_apply(ops, apply and donate, params, y)
    new_steps = v = bc2 = None
    if exp_avg_sqs is not None:
        assert steps is not None
        v = as_real(exp_avg_sqs)
        new_steps = ops.add_scalar(steps, 1, inplace=donate)
        (bc2,) = map_scalars_n(lambda t: (1 - torch.pow(beta2, t),), new_steps, outputs=1, like=v)
    coef = lr * (beta * (1 - ckp1) - 1)

    def body(
        ops: ListOps,
        y: list[Tensor],
        g: list[Tensor],
        z: list[Tensor],
        v: list[Tensor] | None,
        bc2: list[Tensor] | None,
    ) -> tuple[list[Tensor] | None, ...]:
        g, owned = torch_grad(ops, g, None, maximize=maximize, weight_decay=0.0)
        new_v = None
        if v is not None:
            assert bc2 is not None
            new_v = ema_of_squares(ops, v, g, beta2, donate=donate)
            denom = ops.add_scalar(ops.sqrt(ops.div(new_v, bc2), inplace=True), eps, inplace=True)
            g, owned = ops.div_list(g, denom, inplace=owned), True
        if weight_decay != 0:
            g, owned = ops.add(g, y, alpha=weight_decay, inplace=owned), True
        if apply:
            ops.lerp(y, z, scalar_for(ckp1, y), inplace=True)
            add_update(ops, y, g, coef, owned=owned)
            updates = None
        else:
            updates = ops.mul(ops.sub(z, y), scalar_for(ckp1, z), inplace=True)
            updates = add_scaled(ops, updates, g, coef, inplace=True)
        # z - lr * d with one rounding (the reference's z.sub_(d, alpha=lr))
        new_z = ops.addcmul(z, g, scalar_for(-lr, z), inplace=donate)  # type: ignore[arg-type]
        return updates, new_z, new_v

    updates, new_z, new_v = elementwise(body, ops, (y, g, z, v, bc2), writes=(None, 2, 3), in_place=apply)
    assert new_z is not None
    return ScheduleFreeResult(
        None if updates is None else as_complex_like(updates, grads),
        new_steps,
        as_complex_like(new_z, grads),
        as_complex_like(new_v, grads) if new_v is not None else None,
    )
