"""LAMB: Adam's direction plus decoupled weight decay, scaled per layer by the trust ratio ||p|| / ||u||.

Update rule (You et al. 2020, Algorithm 2, with phi the identity), per parameter tensor ``p`` with gradient ``g``
and its own step count ``t``::

    g <- -g                                            if maximize
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    r = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    u = r + weight_decay * p
    ratio = ||p|| / ||u||                              (1 where ||p|| == 0 or ||u|| == 0)
    update = -lr * ratio * u

``r`` is Adam's bias-corrected direction, computed by :func:`pureopt.kernels.adam.adam` (torch's eps placement),
so the moments, step counts and complex handling are Adam's. ``lr=None`` returns ``ratio * u``.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from pureopt.kernels.adam import adam
from pureopt.kernels.common import (
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    join_segments,
    segment_views,
)
from pureopt.kernels.lars import map_scalars, norms, require_params, trust_ratio
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["LambResult", "lamb"]


class LambResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def lamb(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
    segments: Sequence[Sequence[int]] | None = None,
) -> LambResult:
    """One LAMB step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate``): add the updates to the parameters
    in place too (``p += ratio * u`` in one rounding) and return ``updates=None``; on CPU the step then runs over
    chunks of whole tensors (the trust ratio needs each tensor's norms), so that each chunk stays in cache.
    ``segments`` (``UpdateContext.segments``): the tensors are flat buffers of parameters of these sizes; the
    trust ratios are then per segment.
    """
    given = require_params(params, "lamb")
    path = choose_impl(impl, [*grads, *exp_avgs])  # before any work: an illegal explicit impl raises here
    ops = ops_for(path)
    apply = can_apply(ops, apply and donate, given, cast_like(as_real(given), as_real(exp_avgs)))
    sign = 1.0 if lr is None else -1.0
    step_lr = 1.0 if lr is None else lr

    def body(
        ops: ListOps,
        p: list[Tensor],
        g: list[Tensor],
        m: list[Tensor],
        v: list[Tensor],
        steps: list[Tensor],
        segs: list[Sequence[int]] | None,
    ) -> tuple[list[Tensor] | None, ...]:
        direction = adam(
            None,
            g,
            m,
            v,
            None,
            steps,
            lr=None,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=0.0,
            decoupled_weight_decay=False,
            amsgrad=False,
            maximize=maximize,
            impl=path,
            donate=donate,
        )
        assert direction.updates is not None
        # fresh tensors owned by this kernel; in the state dtype (adam's 0-d results may come back promoted)
        u = cast_like(as_real(direction.updates), as_real(direction.exp_avg))
        rp = cast_like(as_real(p), u)
        if weight_decay != 0:
            u = ops.add(u, rp, alpha=weight_decay, inplace=True)
        rp_parts, u_parts = segment_views(rp, segs), segment_views(u, segs)  # per parameter
        scales = map_scalars(
            lambda pn, un: sign * step_lr * trust_ratio(pn, un, 1.0, 0.0),
            norms(ops, rp_parts),
            norms(ops, u_parts),
            like=u_parts,
        )
        if apply:  # p + ratio * u with one rounding (can_apply: in place, into the parameters)
            ops.addcmul(rp_parts, u_parts, scales, inplace=True)
            updates = None
        else:
            scaled = ops.mul(u_parts, scales, inplace=True)
            updates = as_complex_like(join_segments(scaled, u_parts, u, segs), g)
        return updates, direction.step, direction.exp_avg, direction.exp_avg_sq

    # the segments ride along as a column: chunks of whole tensors keep each tensor's segments with it
    columns = (given, grads, exp_avgs, exp_avg_sqs, steps, None if segments is None else list(segments))
    updates, new_steps, new_m, new_v = elementwise(
        body, ops, columns, writes=(None, 4, 2, 3), in_place=apply, split=False
    )
    assert new_steps is not None and new_m is not None and new_v is not None
    return LambResult(updates, new_steps, new_m, new_v)
