"""Gradient centralization."""

from __future__ import annotations

from torch import Tensor

from pureopt.base import EmptyState, GradientTransformation, LeafList, UpdateContext, leaf_transformation

__all__ = ["centralize"]


def _centralize_one(u: Tensor) -> Tensor:
    if u.ndim <= 1:
        return u
    return u - u.mean(dim=tuple(range(1, u.ndim)), keepdim=True)


def centralize() -> GradientTransformation:
    """Gradient centralization: remove the mean of each output unit's gradient.

    Rule, for every update with more than one dimension (a weight stored output-unit first, as PyTorch does:
    ``nn.Linear`` ``(out, in)``, ``nn.Conv2d`` ``(out, in, kh, kw)``)::

        u[i] <- u[i] - mean(u[i])        for every output unit i (the mean over all other dimensions)

    Biases, gains and scalars (at most one dimension) are left unchanged, as in the paper. Apply it to the
    gradients, before the optimizer.

    Example::

        tx = pureopt.chain(centralize(), pureopt.sgd(lr=0.1, momentum=0.9))

    Yong, Huang, Hua & Zhang, "Gradient Centralization: A New Optimization Technique for Deep Neural
    Networks", ECCV 2020.
    """

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del params, ctx
        return [None if u is None else _centralize_one(u) for u in updates], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves)
