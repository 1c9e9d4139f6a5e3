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

Sparse (COO) gradients are accepted where torch.optim.SGD accepts them: without momentum the update is sparse
(per-tensor path); with momentum the gradient is made dense (torch's sparse buffer holds the same values as the
dense one kept here). ``weight_decay`` with a sparse gradient raises, as in torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.base import add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import cast_like, per_tensor, scalars_for
from pureopt.kernels.listops import FOREACH, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["SGDResult", "sgd"]

SPARSE_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"


class SGDResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys); ``None`` for what is not kept."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
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
    apply: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> SGDResult:
    """One SGD step over tensor lists; returns the updates and the new state lists.

    Args:
      params: the parameters (needed when ``weight_decay != 0``).
      grads: the gradients, one per parameter (none of them ``None``).
      momentum_buffers: one buffer per parameter when ``momentum != 0``, else ``None``.
      steps: per-parameter step counts when ``dampening != 0`` (to tell the first step apart), else ``None``.
      lr: the learning rate; ``None`` returns the unscaled direction (used by :func:`pureopt.trace`).
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers (and gradients): they are updated in place.
      apply: with ``donate`` and ``params``, also add the updates to the parameters and return ``updates=None``.
      grad_scale, found_inf: GradScaler's (see :class:`pureopt.base.UpdateContext`); passed to torch's fused
        kernel when it runs on the parameters, else gradients are unscaled out of place and a set ``found_inf``
        skips the step (host sync).

    The fused path (``torch._fused_sgd_``) is available when the first step needs no special case
    (``dampening == 0``: a zero buffer then reproduces torch's copy of the first gradient exactly).
    """
    if any(g.is_sparse for g in grads):
        if weight_decay != 0:
            raise RuntimeError(SPARSE_WEIGHT_DECAY_ERROR)  # torch.optim.SGD fails here too
        if momentum != 0:
            # torch keeps a sparse momentum buffer holding the same values as this dense one
            grads = [g.to_dense() if g.is_sparse else g for g in grads]
        else:
            unscaled = _fused.amp_unscale(grads, grad_scale, found_inf)
            if unscaled is None:  # skipped by GradScaler
                return SGDResult(_fused.skipped_updates(grads, apply and donate and params is not None), None, None)
            return _sgd_split_sparse(unscaled, lr=lr, maximize=maximize, impl=impl)
    apply = apply and donate and params is not None
    plan = None
    ref = momentum_buffers if momentum_buffers is not None and momentum != 0 else grads
    if impl in ("auto", "fused") and (momentum == 0 or dampening == 0):
        plan = _fused.fused_plan([*grads, *(params or [])], ref, impl=impl)
    path = choose_impl(impl, grads, fused_available=plan is not None)
    amp = grad_scale is not None or found_inf is not None
    if amp and not (path == "fused" and apply and _fused.same_dtypes(params, ref)):  # not torch's own call
        unscaled = _fused.amp_unscale(grads, grad_scale, found_inf)
        if unscaled is None:  # skipped: nothing changes (a field returned as None stays as it was)
            return SGDResult(_fused.skipped_updates(grads, apply), None, None)
        grads, grad_scale, found_inf = unscaled, None, None
    if path == "fused":
        assert plan is not None
        return _sgd_fused(
            plan,
            params,
            grads,
            momentum_buffers,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            donate=donate,
            apply=apply,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
    ops = ops_for(path)
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
            new_bufs = ops.add(bufs, ops.mul(g, scalars_for(scale, g)), inplace=True)
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
        updates = ops.mul(g, scalars_for([-lr] * len(g), g), inplace=owned)
    else:
        updates = ops.mul(g, -lr, inplace=owned)
    if apply:
        add_inplace(params, updates)  # type: ignore[arg-type]
        return SGDResult(None, new_bufs, new_steps)
    return SGDResult(updates, new_bufs, new_steps)


def _sgd_fused(
    plan: _fused.Plan,
    params: list[Tensor] | None,
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor | None,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    donate: bool,
    apply: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> SGDResult:
    """The same step through ``torch._fused_sgd_`` (see :mod:`pureopt.kernels.fused`); ``dampening == 0``.

    ``grad_scale`` / ``found_inf`` only when every group runs torch's own call on the parameters. A skipped
    first step leaves the zero momentum buffers as they are, so the next step is a proper first step."""
    bufs: list[Tensor] = []
    if momentum != 0:
        assert momentum_buffers is not None
        bufs = momentum_buffers if donate else _fused.clone_all(momentum_buffers)
    kernel_lr: float | Tensor = -1.0 if lr is None else lr  # lr=None (trace): +direction into the zero buffer
    if (weight_decay != 0 or apply) and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    like = bufs if bufs else grads

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        g = take(grads, idx)
        b = take(bufs, idx) if bufs else []
        ref = take(like, idx)
        p = take(params, idx) if params is not None else None
        device = ref[0].device
        g = cast_like(g, ref)
        if apply and p is not None and all(x.dtype == y.dtype for x, y in zip(p, ref)):
            torch._fused_sgd_(p, g, b, weight_decay=weight_decay, momentum=momentum,
                              lr=_fused.fused_lr(kernel_lr, device), dampening=0.0, nesterov=nesterov,
                              maximize=maximize, is_first_step=False,
                              **_fused.amp_kwargs(grad_scale, found_inf, device))  # fmt: skip
            return None
        assert grad_scale is None and found_inf is None
        if maximize:
            g = FOREACH.neg(g)
        if weight_decay != 0:
            g = FOREACH.add(g, cast_like(p, ref), alpha=weight_decay, inplace=maximize)  # type: ignore[arg-type]
        updates = _fused.zeros_like_all(ref)
        torch._fused_sgd_(updates, g, b, weight_decay=0.0, momentum=momentum, lr=_fused.fused_lr(kernel_lr, device),
                          dampening=0.0, nesterov=nesterov, maximize=False, is_first_step=False)  # fmt: skip
        if apply:
            add_inplace(p, updates)  # type: ignore[arg-type]
            return None
        return updates

    updates = _fused.run_grouped(len(grads), plan, body)
    return SGDResult(updates, bufs if momentum != 0 else None, None)


def _sgd_split_sparse(grads: list[Tensor], *, lr: float | Tensor | None, maximize: bool, impl: str) -> SGDResult:
    """Plain SGD (no momentum, no weight decay) when some gradients are sparse: those take the per-tensor path."""
    dense = [i for i, g in enumerate(grads) if not g.is_sparse]
    updates: list[Tensor] = []
    for g in grads:  # sparse: u = -lr * g (sign flipped if maximize), itself sparse over g's entries
        if g.is_sparse:
            g = -g if maximize else g
            updates.append(g.clone() if lr is None else g * -lr)
        else:
            updates.append(g)  # replaced below
    if dense:
        res = sgd(
            None, [grads[i] for i in dense], None, None, lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
            nesterov=False, maximize=maximize, impl=impl,
        )  # fmt: skip
        assert res.updates is not None
        for i, u in zip(dense, res.updates):
            updates[i] = u
    return SGDResult(updates, None, None)
