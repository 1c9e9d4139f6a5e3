"""Clipping each update tensor (block) by its root mean square."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import EmptyState, GradientTransformation, LeafList, UpdateContext, leaf_transformation
from pureopt.kernels.common import join_segments, segment_views

__all__ = ["clip_by_block_rms", "block_rms"]


def block_rms(x: Tensor) -> Tensor:
    """The root mean square of the entries of ``x`` (a 0-d tensor; moduli for complex ``x``)."""
    return torch.sqrt(torch.mean(torch.abs(x) ** 2))


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    """Scale down every update tensor whose root mean square exceeds ``threshold``.

    Each tensor ("block") is clipped on its own, unlike :func:`pureopt.clip_by_global_norm`::

        rms(u) = sqrt(mean(|u|**2))
        u <- u * threshold / max(threshold, rms(u))

    A tensor whose RMS is at most ``threshold`` is returned unchanged (bitwise: the factor is exactly 1);
    empty tensors and ``None`` pass through. The factor is a tensor: no host sync. On flat buffers
    (``UpdateContext.segments``) each parameter in the buffer is its own block.

    Args:
      threshold: the largest allowed RMS of a tensor (> 0).

    Example::

        tx = pureopt.chain(clip_by_block_rms(1.0), pureopt.sgd(lr=0.1))
    """
    if not threshold > 0:
        raise ValueError(f"Invalid threshold value: {threshold} (> 0 is required)")

    def clip_one(u: Tensor) -> Tensor:
        if u.numel() == 0:
            return u
        rms = block_rms(u)
        return u * (threshold / torch.clamp(rms, min=threshold)).to(u.dtype if not u.is_complex() else rms.dtype)

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del params
        if ctx.segments is None:
            return [None if u is None else clip_one(u) for u in updates], state
        out: LeafList = []
        for u, sizes in zip(updates, ctx.segments):
            if u is None:
                out.append(None)
                continue
            views = segment_views([u], [sizes])
            out.extend(join_segments([clip_one(v) for v in views], views, [u], [sizes]))
        return out, state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, segmentwise=True)
