"""Adaptive gradient clipping (AGC), unit-wise, from the NFNets paper."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import EmptyState, GradientTransformation, LeafList, UpdateContext, leaf_transformation

__all__ = ["adaptive_grad_clip", "unitwise_norm"]


def unitwise_norm(x: Tensor) -> Tensor:
    """The L2 norm of every output unit of ``x``, shaped for broadcasting against ``x``.

    PyTorch stores a layer's weight output-unit first (``nn.Linear``: ``(out, in)``, ``nn.Conv2d``: ``(out, in,
    kh, kw)``), so a unit is a slice ``x[i]`` and its norm is taken over every other dimension. A tensor with
    at most one dimension (a bias, a gain, a scalar) is one unit: its norm is over all of it.
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> GradientTransformation:
    """Adaptive gradient clipping: clip each unit's gradient relative to the norm of its weights.

    Rule, for every output unit ``i`` of every parameter (see :func:`unitwise_norm`)::

        W*_i = max(||W_i||, eps)
        G_i <- G_i * clipping * W*_i / ||G_i||     if ||G_i|| > clipping * W*_i     (||G_i|| floored at 1e-6)
        G_i <- G_i                                 otherwise

    so the ratio of gradient norm to weight norm of every unit is at most ``clipping``. The paper recommends
    not clipping the final classifier layer: combine with :func:`pureopt.combine.masked`.

    Args:
      clipping: the largest allowed ratio ``||G_i|| / max(||W_i||, eps)`` (> 0), e.g. 0.01 to 0.16.
      eps: floor on the weight norms, so that units initialised at zero can still move.

    ``update`` needs the parameters. ``None`` updates pass through.

    Example::

        tx = pureopt.chain(adaptive_grad_clip(0.01), pureopt.sgd(lr=0.1, momentum=0.9))

    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization",
    ICML 2021.
    """
    if not clipping > 0:
        raise ValueError(f"Invalid clipping value: {clipping} (> 0 is required)")
    if not eps >= 0:
        raise ValueError(f"Invalid eps value: {eps}")

    def clip_one(g: Tensor, p: Tensor) -> Tensor:
        g_norm = unitwise_norm(g)
        max_norm = clipping * torch.clamp(unitwise_norm(p), min=eps).to(g_norm.dtype)
        scaled = g * (max_norm / torch.clamp(g_norm, min=1e-6)).to(g.real.dtype if g.is_complex() else g.dtype)
        return torch.where(g_norm > max_norm, scaled, g)

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del ctx
        if params is None:
            raise ValueError("adaptive_grad_clip needs the parameters: call update(updates, state, params)")
        return [None if g is None else clip_one(g, p) for g, p in zip(updates, params)], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves)
