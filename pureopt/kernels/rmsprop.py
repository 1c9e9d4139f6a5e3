"""RMSprop (plain or centered, with momentum, weight decay, maximize): torch.optim.RMSprop's math on lists.

Update rule (torch.optim.RMSprop), per parameter ``p`` with gradient ``g``::

    g <- -g                                   if maximize
    t <- t + 1                                (kept for the state dict; not used by the math)
    g <- g + weight_decay * p                 if weight_decay != 0
    v <- alpha * v + (1 - alpha) * g * g      (square_avg)
    m <- m + (1 - alpha) * (g - m)            if centered (grad_avg, a lerp)
    avg = sqrt(v - m * m) + eps   if centered   else   sqrt(v) + eps
    b <- momentum * b + g / avg               if momentum > 0 (momentum_buffer)
    update = -lr * b      if momentum > 0     else   -lr * g / avg

``lr=None`` returns the positive direction (``b`` or ``g / avg``), which is what
:func:`pureopt.transforms.rmsprop.scale_by_rms` uses. Complex tensors are viewed as real pairs, as torch does
(the running averages are kept per component).

Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012); Graves, "Generating
Sequences With Recurrent Neural Networks" (centered variant), 2013.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from pureopt.kernels.common import (
    add_update,
    addcdiv_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.nadam import autograd_recording
from pureopt.kernels.select import choose_impl

__all__ = ["RMSpropResult", "rmsprop"]


class RMSpropResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys); ``None`` for what is not kept."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    square_avg: list[Tensor]
    momentum_buffer: list[Tensor] | None
    grad_avg: list[Tensor] | None


def rmsprop(
    params: list[Tensor] | None,
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None,
    momentum_buffers: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> RMSpropResult:
    """One RMSprop step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      params: the parameters (needed when ``weight_decay != 0``).
      grads: the gradients, one per parameter (none of them ``None``).
      square_avgs: running averages of the squared gradients.
      grad_avgs: running averages of the gradients when ``centered``, else ``None``.
      momentum_buffers: momentum buffers when ``momentum > 0``, else ``None``.
      steps: per-parameter step counts.
      lr: the learning rate; ``None`` returns the positive direction.
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: they are updated in place.
      apply: with ``donate`` and ``params``, add the updates to the parameters in place (torch's last op) and
        return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *square_avgs])
    ops = ops_for(path)
    # in place on the kernel's own temporaries, unless autograd records through the update
    tmp = not autograd_recording(params, grads, square_avgs, grad_avgs, momentum_buffers)
    donate = donate and tmp
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    like = grads
    sq = as_real(square_avgs)
    g = cast_like(as_real(grads), sq)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), sq) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    ga = as_real(grad_avgs) if centered and grad_avgs is not None else None
    bufs = as_real(momentum_buffers) if momentum > 0 and momentum_buffers is not None else None
    coef = 1.0 if lr is None else -lr

    def body(ops: ListOps, p: list[Tensor] | None, g: list[Tensor], sq: list[Tensor], ga: list[Tensor] | None,
             bufs: list[Tensor] | None) -> tuple[list[Tensor] | None, ...]:  # fmt: skip
        g, owned = torch_grad(ops, g, p, maximize=maximize, weight_decay=weight_decay, own=tmp)
        new_sq = ema_of_squares(ops, sq, g, alpha, donate=donate, own=tmp)
        new_ga = None
        if centered:
            assert ga is not None
            new_ga = ops.lerp(ga, g, 1 - alpha, inplace=donate)
            avg = ops.sqrt(ops.addcmul(new_sq, new_ga, new_ga, value=-1), inplace=tmp)
        else:
            avg = ops.sqrt(new_sq)
        avg = ops.add_scalar(avg, eps, inplace=tmp)
        target = p if apply else None
        new_bufs = None
        if momentum > 0:
            assert bufs is not None
            new_bufs = ops.addcdiv(ops.mul(bufs, momentum, inplace=donate), g, avg, inplace=tmp)
            # torch: p.add_(buf, alpha=-lr)
            updates = add_update(ops, target, new_bufs, coef, owned=False)
        else:
            # torch: p.addcdiv_(g, avg, value=-lr), i.e. p + ((-lr) * g) / avg
            updates = addcdiv_update(ops, target, g, avg, coef, owned=owned)
        return updates, new_sq, new_ga, new_bufs

    updates, new_sq, new_ga, new_bufs = elementwise(
        body, ops, (rparams, g, sq, ga, bufs), writes=(None, 2, 3, 4), in_place=apply
    )
    assert new_sq is not None
    return RMSpropResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        as_complex_like(new_sq, like),
        as_complex_like(new_bufs, like) if new_bufs is not None else None,
        as_complex_like(new_ga, like) if new_ga is not None else None,
    )
