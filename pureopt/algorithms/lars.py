"""LARS: momentum SGD where each tensor's step is scaled by a layer-wise trust ratio, with an exclusion mask.

Update rule (You, Gitman & Ginsburg 2017, Algorithm 1), per parameter tensor ("layer") ``w`` with gradient ``g``,
global learning rate ``lr``, trust coefficient ``eta`` and weight decay ``beta`` (``v`` starts at zero)::

    g <- -g                                                     if maximize
    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)       (1 where ||w|| == 0 or ||g|| == 0)
    d = g + beta * w
    v <- momentum * v + lr * local_lr * d                       (v = lr * local_lr * d without momentum)
    update = -(d_step + momentum * v)  if nesterov  else  -v    (d_step = lr * local_lr * d)

A tensor excluded by the mask (customarily biases and normalisation weights) gets ``local_lr = 1`` and no weight
decay: plain momentum SGD with the learning rate inside the buffer, as in the paper. Norms are per tensor (per
parameter on flat buffers); the rates are evaluated for all tensors at once with ``torch.where`` (no host sync).
Complex tensors are viewed as real pairs (the complex 2-norm). Because ``eta`` is small (1e-3), LARS's global
learning rate is large (order 1-10).

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Eps, Impl, Kernel, NonNeg, StateDtype, state
from pureopt.base import GradientTransformation, LeafList, LeafUpdate, UpdateContext, as_leaf_update
from pureopt.kernels.common import join_segments, scalar_for, segment_views
from pureopt.kernels.lars import map_scalars, norms
from pureopt.transforms._util import gather, present
from pureopt.transforms.trust_ratio import MaskOrFn, leaf_mask, with_extra

__all__ = ["LARS", "LarsState", "lars"]

_ADAPT = "_pureopt_lars_adapt"


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, Any]:
    # the per-tensor mask rides along with the columns, so that chunks of whole tensors take their part of it
    adapt = k.extra.get(_ADAPT)
    return {} if adapt is None else {"adapt": adapt}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, g, p, segments = k.ops, k.h, k.g, k.p, k.segments
    lr, weight_decay = h.lr, h.weight_decay
    if h.maximize:
        g = ops.neg(g)
    n = len(g)
    adapt = getattr(k, "adapt", None)  # (none without a mask)
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
            denom = torch.where(ok, g_norm + weight_decay * w_norm + h.eps, torch.ones_like(g_norm))
            local = torch.where(ok, h.trust_coefficient * w_norm / denom, torch.ones_like(w_norm))
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
    new = {}
    if h.momentum != 0:
        bufs = new["momentum_buffer"] = ops.add(ops.mul(k.momentum_buffer, h.momentum, inplace=k.donate), steps,
                                                inplace=True)  # fmt: skip
        if h.nesterov:
            direction = ops.add(steps, bufs, alpha=h.momentum, inplace=True)
        else:
            direction = bufs if k.apply else ops.clone(bufs)
    else:
        direction = steps
    if k.apply:  # p - direction, into the parameters
        ops.sub(p, direction, inplace=True)
        return None, new
    return ops.neg(direction, inplace=True), new


LARS = Algorithm(
    "LARS",
    record="LarsState",
    fields={
        "momentum_buffer": state(
            "per-parameter momentum buffers (they include the learning rate, as in the paper).",
            when=lambda h: h.momentum != 0,
        )
    },
    math=_math,
    scalars=_scalars,
    elementwise=False,
    tensorwise=True,
    segmentwise=True,
    params_required="lars",
    doc="State of :func:`lars`.",
)
LarsState = LARS.state


def _masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """``inner`` told, per update, which tensors get the layer-wise rate and weight decay (``mask``)."""
    inner_update = as_leaf_update(inner)

    def update_leaves(
        updates: LeafList, state: Any, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, Any]:
        adapt = gather(leaf_mask(mask, ctx, params), present(updates))
        new_updates, new_state = inner_update(updates, state, params, with_extra(ctx, _ADAPT, adapt))
        return new_updates, new_state

    return GradientTransformation(inner.init, LeafUpdate(update_leaves))


@LARS.public
def lars(
    lr: LR = 1.0,
    momentum: NonNeg = 0.9,
    weight_decay: NonNeg = 0.0,
    trust_coefficient: NonNeg = 1e-3,
    eps: Eps = 0.0,
    nesterov: bool = False,
    *,
    mask: MaskOrFn = None,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """LARS: momentum SGD where each tensor's step is scaled by ``eta * ||w|| / (||g|| + weight_decay * ||w||)``
    (the rule is in the module docstring).

    Args:
      lr: global learning rate (float, 0-d tensor or schedule).
      momentum: momentum factor (>= 0; 0 keeps no buffer).
      weight_decay: L2 weight decay, in the direction and in the trust ratio's denominator.
      trust_coefficient: ``eta``, the trust coefficient (>= 0).
      eps: added to the trust ratio's denominator (>= 0).
      nesterov: Nesterov momentum.
      mask: a tree of booleans shaped like the parameters, or a function ``params -> that tree``: ``True`` where
        LARS's adaptation and weight decay apply. ``None``: everywhere.

    Example::

        no_bias = lambda p: {k: v.ndim > 1 for k, v in p.items()}
        tx = pureopt.lars(lr=5.0, momentum=0.9, weight_decay=1e-6, mask=no_bias)

    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888).
    """
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum")
    tx = LARS.build(locals())
    return tx if mask is None else _masked(tx, mask)
