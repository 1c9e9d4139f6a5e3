"""Gradient clipping: by global norm (``torch.nn.utils.clip_grad_norm_``) and by value."""

from __future__ import annotations

import torch

from pureopt.base import (
    EmptyState,
    GradientTransformation,
    LeafList,
    LeafUpdate,
    UpdateContext,
    leaf_transformation,
    scaled_by,
)
from pureopt.kernels.common import segment_views
from pureopt.kernels.select import choose_impl

__all__ = ["clip_by_global_norm", "clip", "global_norm"]


def global_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type``-norm of all tensors together (as if concatenated); 0 for an empty list."""
    if not tensors:
        return torch.zeros(())
    if choose_impl("auto", tensors) == "foreach":
        norms = list(torch._foreach_norm(tensors, norm_type))
    else:
        norms = [torch.linalg.vector_norm(t, norm_type) for t in tensors]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def clip_by_global_norm(max_norm: float, norm_type: float = 2.0, eps: float = 1e-6) -> GradientTransformation:
    """Scale all updates together so that their global norm is at most ``max_norm``.

    Same rule as ``torch.nn.utils.clip_grad_norm_``::

        total = ||(u_1, ..., u_n)||_norm_type
        u_i <- u_i * min(1, max_norm / (total + eps))

    Computed without a host sync (the factor is a tensor, clamped at 1). ``None`` updates are ignored. On flat
    buffers (``UpdateContext.segments``) the norms are taken per parameter, as on the parameters themselves.
    Followed by an optimizer in a :func:`~pureopt.chain`, the factor is folded into its step, which multiplies
    each chunk of gradients as it reads it: the clipped gradients are never made whole (same numbers).

    Args:
      max_norm: the largest allowed global norm (> 0).
      norm_type: the p of the p-norm (``float('inf')`` for the max norm).
      eps: added to the norm before dividing (torch uses 1e-6).

    Example::

        tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=3e-4))
    """
    if not max_norm > 0:
        raise ValueError(f"Invalid max_norm value: {max_norm}")

    def factor_of(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> torch.Tensor | None:
        idx = [i for i, u in enumerate(updates) if u is not None]
        if not idx:
            return None
        total = global_norm(segment_views([updates[i] for i in idx], ctx.segments_of(idx)), norm_type)
        return torch.clamp(max_norm / (total + eps), max=1.0)

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        factor = factor_of(updates, state, params, ctx)
        if factor is None:
            return updates, state
        return scaled_by(updates, factor), state

    tx = leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, segmentwise=True)
    assert isinstance(tx.update, LeafUpdate)
    tx.update.grad_factor = factor_of  # (chain folds it into the next step: see pureopt.combine.chain)
    return tx


def clip(max_delta: float) -> GradientTransformation:
    """Clip every update elementwise to ``[-max_delta, max_delta]`` (``torch.nn.utils.clip_grad_value_``).

    Example::

        tx = pureopt.chain(pureopt.clip(0.5), pureopt.sgd(lr=0.1))
    """
    if not max_delta >= 0:
        raise ValueError(f"Invalid max_delta value: {max_delta}")

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del params, ctx
        return [None if u is None else torch.clamp(u, -max_delta, max_delta) for u in updates], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)
