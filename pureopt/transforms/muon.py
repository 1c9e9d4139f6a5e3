"""``orthogonalize``: each 2-D update replaced by its Newton-Schulz orthogonalisation (Muon's iteration, stateless).

The Muon optimizer (momentum, this iteration, shape scaling) is :mod:`pureopt.algorithms.muon`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import EmptyState, GradientTransformation, LeafList, OptState, UpdateContext, leaf_transformation
from pureopt.kernels import muon as ns_kernels  # (the iteration, called through its module: tests count the calls)
from pureopt.kernels.dtensor import is_dtensor
from pureopt.kernels.muon import (
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    check_ns_coefficients,
    check_ns_steps,
    check_sharded,
)
from pureopt.kernels.owner import map_whole_dtensors

__all__ = ["orthogonalize"]


def orthogonalize(
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    ns_steps: int = DEFAULT_NS_STEPS,
    *,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: str = "owner",
) -> GradientTransformation:
    """Replace each 2-D update by its Newton-Schulz orthogonalisation (stateless).

    Update rule, per 2-D update ``U`` (``X`` is ``U``, or ``U^T`` if ``U`` is taller than wide)::

        X <- X / max(||X||_F, eps)
        repeat ns_steps times:  S = X X^T;  X <- a X + (b S + c S S) X

    The result approximates the polar factor ``U V^T`` of ``U = U S V^T`` and is cast back to the update's dtype.
    Updates that are not 2-D raise a ValueError; ``None`` stays ``None``.

    Args:
      ns_coefficients: ``(a, b, c)``; ``(1.5, -0.5, 0.0)`` is the classic cubic iteration, which converges to
        ``U V^T`` exactly; the default quintic is faster but only lands the singular values near one.
      eps: lower bound of the norm the update is divided by.
      ns_steps: number of iterations (< 100).
      ns_dtype: dtype of the iteration (bfloat16, as torch.optim.Muon).
      sharded: DTensor (FSDP2) updates: ``"owner"`` orthogonalises each on one rank, ``"all"`` on every rank.

    Example::

        tx = pureopt.chain(pureopt.trace(0.95), orthogonalize(), pureopt.scale_by_learning_rate(0.02))
    """
    check_ns_steps(ns_steps)
    coefficients = check_ns_coefficients(ns_coefficients)
    check_sharded(sharded)
    ns = (coefficients, ns_steps, eps, ns_dtype)

    def ns_batch(x: Tensor) -> Tensor:
        return ns_kernels.newton_schulz_batch(x, *ns)

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        del params, ctx
        for u in updates:
            if u is not None and u.ndim != 2:
                raise ValueError(f"orthogonalize only supports 2D updates, got one of size: {u.size()}")
        out = [None if u is None or is_dtensor(u) else ns_kernels.newton_schulz(u, *ns).to(u.dtype) for u in updates]
        sharded_idx = [i for i, u in enumerate(updates) if is_dtensor(u)]
        if sharded_idx:  # FSDP2: each whole matrix on one rank (a collective: the same updates on every rank)
            results = map_whole_dtensors([updates[i] for i in sharded_idx], ns_batch, ns_dtype, sharded)
            for i, r in zip(sharded_idx, results):
                out[i] = r.to(updates[i].dtype)
        return out, state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves)
