"""LARS and the layer-wise trust ratio, plus the per-tensor scalar helpers the layer-wise kernels share.

LARS update rule (You, Gitman & Ginsburg 2017, Algorithm 1), per parameter tensor ("layer") ``w`` with gradient
``g``, global learning rate ``lr``, trust coefficient ``eta`` and weight decay ``beta``::

    g <- -g                                                     if maximize
    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)       (1 where ||w|| == 0 or ||g|| == 0)
    d = g + beta * w
    v <- momentum * v + lr * local_lr * d                       (v = lr * local_lr * d without momentum)
    update = -(d_step + momentum * v)  if nesterov  else  -v    (d_step = lr * local_lr * d)

A tensor excluded by the mask (``adapt[i] == False``, e.g. biases and norm weights) gets ``local_lr = 1`` and no
weight decay: plain momentum SGD with the learning rate inside the buffer, as in the paper.

The trust ratio of :func:`trust_ratio_scale` (the ``scale_by_trust_ratio`` primitive, also LAMB's)::

    ratio = trust_coefficient * ||p|| / (||u|| + eps)           (1 where ||p|| == 0 or ||u|| == 0)
    u <- ratio * u

Norms are per tensor; the ratios are evaluated for all tensors at once on stacked vectors with ``torch.where``
(no host sync, no Python branching on values). Complex tensors are viewed as real pairs (the complex 2-norm).

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_scaled,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    cast_values,
    join_segments,
    map_scalars_n,
    scalar_for,
    segment_views,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = [
    "LarsResult",
    "add_scaled",
    "cast_values",
    "lars",
    "map_scalars",
    "map_scalars_n",
    "norms",
    "require_params",
    "scalar_for",
    "trust_ratio",
    "trust_ratio_scale",
]


# --- helpers shared by the kernels of this family ------------------------------------------------------------


def norms(ops: ListOps, xs: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor as a 0-d tensor (0 for an empty tensor); one foreach call on that backend."""
    if not xs:
        return []
    if ops.foreach:
        return list(torch._foreach_norm(list(xs)))
    return [torch.linalg.vector_norm(x) for x in xs]


def map_scalars(
    fn: Callable[..., Tensor], *columns: Sequence[Tensor], like: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """:func:`map_scalars_n` for a function with one output vector."""
    return map_scalars_n(lambda *vs: (fn(*vs),), *columns, outputs=1, like=like)[0]


def require_params(params: list[Tensor] | None, what: str) -> list[Tensor]:
    """``params``, or a clear error when ``update`` was called without them."""
    if params is None:
        raise ValueError(f"{what} needs the parameters: call update(grads, state, params)")
    return params


def trust_ratio(param_norm: Tensor, update_norm: Tensor, trust_coefficient: float, eps: float) -> Tensor:
    """``trust_coefficient * ||p|| / (||u|| + eps)`` elementwise, 1 where either norm is 0 (stacked vectors)."""
    ok = (param_norm > 0) & (update_norm > 0)
    denom = torch.where(ok, update_norm + eps, torch.ones_like(update_norm))
    return torch.where(ok, trust_coefficient * param_norm / denom, torch.ones_like(param_norm))


# --- scale_by_trust_ratio -----------------------------------------------------------------------------------------


def trust_ratio_scale(
    params: list[Tensor],
    updates: list[Tensor],
    *,
    trust_coefficient: float,
    eps: float,
    impl: str = "auto",
    segments: Sequence[Sequence[int]] | None = None,
) -> list[Tensor]:
    """Scale each update by its layer-wise trust ratio (see module docstring); returns new tensors.

    ``segments`` (``UpdateContext.segments``): the tensors are flat buffers of parameters of these sizes; the
    ratios are then per segment."""
    path = choose_impl(impl, updates)
    ops = ops_for(path)
    u = as_real(updates)
    p = cast_like(as_real(params), u)
    if segments is not None:
        u = ops.clone(u)  # scaled in place, segment by segment
    u_parts, p_parts = segment_views(u, segments), segment_views(p, segments)
    ratios = map_scalars(
        lambda pn, un: trust_ratio(pn, un, trust_coefficient, eps),
        norms(ops, p_parts),
        norms(ops, u_parts),
        like=u_parts,
    )
    scaled = ops.mul(u_parts, ratios, inplace=segments is not None)
    return as_complex_like(join_segments(scaled, u_parts, u, segments), updates)


# --- LARS ---------------------------------------------------------------------------------------------------------


class LarsResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys); ``None`` for what is not kept."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    momentum_buffer: list[Tensor] | None


def lars(
    params: list[Tensor] | None,
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    maximize: bool,
    adapt: Sequence[bool] | None = None,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
    segments: Sequence[Sequence[int]] | None = None,
) -> LarsResult:
    """One LARS step over tensor lists (see module docstring).

    Args:
      params: the parameters (always needed: the trust ratio uses their norms).
      grads: the gradients, one per parameter (none of them ``None``).
      momentum_buffers: one buffer per parameter when ``momentum != 0``, else ``None``.
      adapt: per tensor, whether the layer-wise rate and weight decay apply (``None``: everywhere).
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: they are updated in place.
      apply: with ``donate``, subtract the step from the parameters in place too and return ``updates=None``.
      segments: ``UpdateContext.segments``: the tensors are flat buffers of parameters of these sizes, and the
        layer-wise rates are per segment (with ``adapt=None`` only).
    """
    path = choose_impl(impl, [*grads, *(momentum_buffers or [])])
    ops = ops_for(path)
    like = grads
    g = as_real(grads)
    p = as_real(require_params(params, "lars"))
    bufs = as_real(momentum_buffers) if momentum_buffers is not None else None
    if bufs is not None:  # state may be kept in another dtype (state_dtype=)
        g, p = cast_like(g, bufs), cast_like(p, bufs)
    apply = can_apply(ops, apply and donate, params, p)
    if maximize:
        g = ops.neg(g)
    n = len(g)
    keep = [True] * n if adapt is None else [bool(a) for a in adapt]
    on = [i for i in range(n) if keep[i]]
    off = [i for i in range(n) if not keep[i]]
    steps: list[Tensor] = [g[0]] * n if n else []
    if segments is not None and adapt is not None:
        raise ValueError("lars: segments (flat buffers) and a per-tensor adapt mask cannot be combined")
    if on:
        g_on, p_on = [g[i] for i in on], [p[i] for i in on]
        segs_on = None if segments is None else [segments[i] for i in on]

        def rate(w_norm: Tensor, g_norm: Tensor) -> Tensor:
            ok = (w_norm > 0) & (g_norm > 0)
            denom = torch.where(ok, g_norm + weight_decay * w_norm + eps, torch.ones_like(g_norm))
            local = torch.where(ok, trust_coefficient * w_norm / denom, torch.ones_like(w_norm))
            return local * lr

        g_parts = segment_views(g_on, segs_on)
        scales = map_scalars(rate, norms(ops, segment_views(p_on, segs_on)), norms(ops, g_parts), like=g_parts)
        d_on = ops.add(g_on, p_on, alpha=weight_decay) if weight_decay != 0 else g_on
        fresh = weight_decay != 0
        if segs_on is not None and not fresh:  # scaled in place, segment by segment
            d_on, fresh = ops.clone(g_on), True
        d_parts = segment_views(d_on, segs_on)
        for i, s in zip(on, join_segments(ops.mul(d_parts, scales, inplace=fresh), d_parts, d_on, segs_on)):
            steps[i] = s
    if off:
        g_off = [g[i] for i in off]
        for i, s in zip(off, ops.mul(g_off, scalar_for(lr, g_off))):
            steps[i] = s
    new_bufs = None
    if momentum != 0:
        assert bufs is not None
        new_bufs = ops.add(ops.mul(bufs, momentum, inplace=donate), steps, inplace=True)
        if nesterov:
            direction = ops.add(steps, new_bufs, alpha=momentum, inplace=True)
        else:
            direction = new_bufs if apply else ops.clone(new_bufs)
    else:
        direction = steps
    if apply:  # p - direction, into the parameters
        ops.sub(p, direction, inplace=True)
        updates = None
    else:
        updates = as_complex_like(ops.neg(direction, inplace=True), like)
    return LarsResult(updates, as_complex_like(new_bufs, like) if new_bufs is not None else None)
