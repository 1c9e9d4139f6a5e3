"""SGD with momentum, dampening, Nesterov, weight decay and maximize: torch.optim.SGD's math on tensor lists.

Update rule (torch.optim.SGD), for each parameter ``p`` with gradient ``g``::

    g <- -g                              if maximize
    g <- g + weight_decay * p            if weight_decay != 0
    b <- g                               on the first step with momentum (b = 0 before)
    b <- momentum * b + (1 - dampening) * g   afterwards
    g <- g + momentum * b  if nesterov else  b
    update = -lr * g                     (lr=None: update = g, the bare direction)

The buffer starts at zero, which reproduces torch's "first step copies the gradient" exactly when
``dampening == 0``; with dampening the per-parameter step count tells the first step apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import cast_like, per_tensor
from pureopt.kernels.listops import FOREACH, LOOP
from pureopt.kernels.select import choose_impl

__all__ = ["SGDResult", "sgd"]


class SGDResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys); ``None`` for what is not kept."""

    updates: list[Tensor]
    momentum_buffer: list[Tensor] | None
    step: list[Tensor] | None


def sgd(
    params: list[Tensor] | None,
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    steps: list[Tensor] | None,
    *,
    lr: float | Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
) -> SGDResult:
    """One SGD step over tensor lists; returns the updates and the new state lists.

    Args:
      params: the parameters (needed when ``weight_decay != 0``).
      grads: the gradients, one per parameter (none of them ``None``).
      momentum_buffers: one buffer per parameter when ``momentum != 0``, else ``None``.
      steps: per-parameter step counts when ``dampening != 0`` (to tell the first step apart), else ``None``.
      lr: the learning rate; ``None`` returns the unscaled direction (used by :func:`pureopt.trace`).
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: they are updated in place.
    """
    path = choose_impl(impl, [*grads, *(momentum_buffers or [])])
    ops = FOREACH if path == "foreach" else LOOP
    if momentum_buffers is not None:  # state may be kept in another dtype (state_dtype=)
        grads = cast_like(grads, momentum_buffers)
        params = cast_like(params, momentum_buffers) if params is not None else None
    g = ops.neg(grads) if maximize else grads
    owned = maximize
    if weight_decay != 0:
        if params is None:
            raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
        g = ops.add(g, params, alpha=weight_decay, inplace=owned)
        owned = True
    new_bufs = None
    new_steps = None
    if momentum != 0:
        assert momentum_buffers is not None
        bufs = ops.mul(momentum_buffers, momentum, inplace=donate)
        if dampening != 0:
            assert steps is not None
            scale = per_tensor(
                steps, lambda s: torch.where(s == 0, torch.ones_like(s), torch.full_like(s, 1.0 - dampening))
            )
            new_bufs = ops.add(bufs, ops.mul(g, scale), inplace=True)
            new_steps = ops.add_scalar(steps, 1, inplace=donate)
        else:
            new_bufs = ops.add(bufs, g, inplace=True)
        if nesterov:
            g = ops.add(g, new_bufs, alpha=momentum, inplace=owned)
            owned = True
        else:
            g = new_bufs
            owned = False
    if lr is None:
        updates = g if owned else ops.clone(g)
    elif isinstance(lr, Tensor):
        updates = ops.mul(g, -lr, inplace=owned)
    else:
        updates = ops.mul(g, -lr, inplace=owned)
    return SGDResult(updates, new_bufs, new_steps)
