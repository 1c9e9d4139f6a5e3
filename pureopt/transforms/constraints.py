"""Constraints on the parameters enforced through the updates."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import EmptyState, GradientTransformation, LeafList, UpdateContext, leaf_transformation

__all__ = ["keep_params_nonnegative"]


def keep_params_nonnegative() -> GradientTransformation:
    """Change the updates so that no parameter becomes negative (a projection onto ``p >= 0``).

    Rule: ``u <- -p where p + u < 0, else u``, so the parameter lands on exactly 0 instead of going below.
    Put it last in the chain (it sees the final updates). It assumes the parameters start non-negative.
    ``update`` needs the parameters; ``None`` updates pass through.

    Example::

        tx = pureopt.chain(pureopt.adam(lr=1e-2), keep_params_nonnegative())
    """

    def project(u: Tensor, p: Tensor) -> Tensor:
        return torch.where(p + u < 0, -p.to(u.dtype), u)

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del ctx
        if params is None:
            raise ValueError("keep_params_nonnegative needs the parameters: call update(updates, state, params)")
        return [None if u is None else project(u, p) for u, p in zip(updates, params)], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)
