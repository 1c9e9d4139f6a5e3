"""The layer-wise trust ratio (``scale_by_trust_ratio``); LAMB is :mod:`pureopt.algorithms.lamb`.

Also holds small helpers shared by the transforms of the optimizers torch.optim lacks (leaf masks, state
initialisers that respect complex parameters, passing per-update values to a kernel step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pureopt import tree as _tree
from pureopt.base import (
    EmptyState,
    GradientTransformation,
    LeafList,
    UpdateContext,
    leaf_transformation,
)
from pureopt.hyperparams import check_nonneg
from pureopt.kernels.lars import trust_ratio_scale
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import gather, present, scatter

__all__ = [
    "MaskOrFn",
    "leaf_mask",
    "scale_by_trust_ratio",
    "with_extra",
]

MaskOrFn = Any | Callable[[Any], Any] | None
"""A tree of booleans shaped like the parameters, a function ``params -> that tree``, or ``None`` (all True)."""


# --- helpers shared with the other transforms of this family ------------------------------------------------------


def leaf_mask(mask: MaskOrFn, ctx: UpdateContext, params: LeafList | None) -> list[bool]:
    """``mask`` resolved to one Python bool per leaf (a function of the params is called on the params tree)."""
    n = ctx.spec.num_leaves
    if mask is None:
        return [True] * n
    if callable(mask):
        if params is None:
            raise ValueError("a mask function needs the parameters: call update(grads, state, params)")
        mask = mask(ctx.spec.unflatten(params))
    return [bool(k) for k in _tree.flatten_like(ctx.spec, mask, "mask", "the parameters")]


def with_extra(ctx: UpdateContext, key: str, value: Any) -> UpdateContext:
    """``ctx`` with one more entry in ``extra_args`` (how a transform hands per-update values to its kernel step)."""
    return dataclasses.replace(ctx, extra_args={**ctx.extra_args, key: value})


# --- scale_by_trust_ratio -----------------------------------------------------------------------------------------


def scale_by_trust_ratio(
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    *,
    mask: MaskOrFn = None,
    impl: str = "auto",
) -> GradientTransformation:
    """Scale each update tensor by its layer-wise trust ratio (the LARS / LAMB idea, as a building block).

    Update rule, per parameter tensor ``p`` with incoming update ``u``::

        ratio = trust_coefficient * ||p|| / (||u|| + eps)      (1 where ||p|| == 0 or ||u|| == 0)
        u <- ratio * u

    The guard keeps zero-initialised tensors (``||p|| == 0``) and zero updates from freezing or dividing by zero;
    it is computed with ``torch.where`` for all tensors at once (no host sync). Norms are 2-norms over the whole
    tensor (the complex 2-norm for complex tensors). Stateless.

    Args:
      trust_coefficient: the ``eta`` multiplying the ratio (>= 0).
      eps: added to the update norm (>= 0).
      mask: a tree of booleans shaped like the parameters, or a function ``params -> that tree``; leaves with
        ``False`` pass through unscaled. ``None`` scales every leaf.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.

    Example::

        lamb_like = pureopt.chain(pureopt.scale_by_adam(eps=1e-6), pureopt.add_decayed_weights(0.01),
                                  pureopt.scale_by_trust_ratio(), pureopt.scale_by_learning_rate(1e-3))

    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017; You et al., "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020.
    """
    check_nonneg(trust_coefficient, "trust_coefficient")
    check_nonneg(eps, "epsilon")
    check_impl(impl)

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        if params is None:
            raise ValueError("scale_by_trust_ratio needs the parameters: call update(updates, state, params)")
        keep = leaf_mask(mask, ctx, params)
        idx = [i for i in present(updates) if keep[i]]
        scaled = trust_ratio_scale(
            gather(params, idx),
            gather(updates, idx),
            trust_coefficient=trust_coefficient,
            eps=eps,
            impl=impl,
            segments=ctx.segments_of(idx),
        )
        return scatter(updates, idx, scaled), state

    # with a mask the choice is per parameter, which flat buffers cannot express
    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, segmentwise=mask is None)
