"""The LARS algorithm transform: momentum SGD with a layer-wise trust ratio, and an exclusion mask."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, LeafList, LeafUpdate, ScalarOrSchedule, UpdateContext, as_leaf_update
from pureopt.hyperparams import resolve
from pureopt.kernels.lars import lars as lars_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import gather, kernel_transform, present, zeros
from pureopt.transforms.trust_ratio import MaskOrFn, leaf_mask, with_extra

__all__ = ["LarsState", "lars_transform"]

_ADAPT = "_pureopt_lars_adapt"


class LarsState(NamedTuple):
    """State of :func:`pureopt.optimizers.lars.lars`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      momentum_buffer: per-parameter momentum buffers (they include the learning rate, as in the paper);
        ``()`` when ``momentum == 0``.
    """

    num_updates: Tensor
    momentum_buffer: Any


def lars_transform(
    lr: ScalarOrSchedule,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    maximize: bool,
    mask: MaskOrFn,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The LARS step (see :mod:`pureopt.kernels.lars`) as a transformation.

    ``mask`` (a tree of booleans or a function of the params) selects the tensors that get the layer-wise rate
    and weight decay; the others take plain momentum SGD steps.
    """
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = lars_kernel(
            params,
            grads,
            s.get("momentum_buffer"),
            lr=resolve(lr, num_updates),
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            maximize=maximize,
            adapt=ctx.extra_args.get(_ADAPT),
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
            segments=ctx.segments,
        )
        return res.updates, {} if res.momentum_buffer is None else {"momentum_buffer": res.momentum_buffer}

    fields = {"momentum_buffer": zeros(state_dtype) if momentum != 0 else None}
    inner = kernel_transform(LarsState, fields, step, segmentwise=mask is None)
    if mask is None:
        return inner
    inner_update = as_leaf_update(inner)

    def update_leaves(
        updates: LeafList, state: LarsState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, LarsState]:
        adapt = gather(leaf_mask(mask, ctx, params), present(updates))
        new_updates, new_state = inner_update(updates, state, params, with_extra(ctx, _ADAPT, adapt))
        return new_updates, new_state

    return GradientTransformation(inner.init, LeafUpdate(update_leaves))
