"""L2 weight decay added to the updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pureopt.base import EmptyState, GradientTransformation, LeafList, UpdateContext, leaf_transformation
from pureopt.hyperparams import check_nonneg
from pureopt.tree import flatten_like

__all__ = ["add_decayed_weights", "MaskOrFn"]

MaskOrFn = Any | Callable[[Any], Any] | None


def add_decayed_weights(weight_decay: float = 0.0, mask: MaskOrFn = None) -> GradientTransformation:
    """Add ``weight_decay * param`` to each update (coupled L2 regularisation, or decoupled after scaling).

    Update rule: ``u <- u + weight_decay * p`` for the leaves where ``mask`` is True.

    Args:
      weight_decay: the decay coefficient (>= 0).
      mask: a tree of booleans shaped like the parameters, or a function ``params -> that tree``; leaves with
        ``False`` are not decayed (e.g. biases and norm weights). ``None`` decays every leaf.

    Example::

        no_bias = lambda p: {k: not k.endswith("bias") for k in p}
        tx = pureopt.chain(pureopt.scale_by_adam(), pureopt.add_decayed_weights(0.01, no_bias),
                           pureopt.scale_by_learning_rate(1e-3))
    """
    check_nonneg(weight_decay, "weight_decay")

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: call update(updates, state, params)")
        if mask is None:
            keep = [True] * len(updates)
        else:
            tree_mask = mask(ctx.spec.unflatten(params)) if callable(mask) else mask
            keep = [bool(k) for k in flatten_like(ctx.spec, tree_mask, "mask", "the parameters")]
        out = [
            u if u is None or not k or weight_decay == 0 else u + weight_decay * p
            for u, p, k in zip(updates, params, keep)
        ]
        return out, state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=mask is None)
