"""Replacing NaN entries of the updates by zeros."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, LeafList, UpdateContext, leaf_transformation
from pureopt.tree import PyTreeSpec

__all__ = ["ZeroNansState", "zero_nans"]


class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`.

    Attributes:
      found_nan: per parameter, whether the latest update had a NaN entry (0-d bool tensors; ``False`` for a
        ``None`` update).
    """

    found_nan: Any


def zero_nans() -> GradientTransformation:
    """Replace every NaN entry of the updates by zero and record, per parameter, whether there was one.

    Rule: ``u <- where(isnan(u), 0, u)``; ``state.found_nan[name] = any(isnan(u))``. Infinities are kept
    (clip them, or use :func:`pureopt.wrappers.apply_if_finite` to skip such steps altogether).

    Example::

        tx = pureopt.chain(zero_nans(), pureopt.adam(lr=1e-3))
        updates, state = tx.update(grads, state, params)
        state[0].found_nan  # which gradients had NaNs this step
    """

    def flag(p: Any) -> Tensor:
        device = p.device if isinstance(p, Tensor) else torch.device("cpu")
        return torch.zeros((), dtype=torch.bool, device=device)

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> ZeroNansState:
        return ZeroNansState(spec.unflatten([flag(p) for p in leaves]))

    def update_leaves(
        updates: LeafList, state: ZeroNansState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, ZeroNansState]:
        del params
        old = ctx.state_leaves(state.found_nan)
        out: list[Any] = []
        found: list[Tensor] = []
        for u, f in zip(updates, old):
            if u is None:
                out.append(None)
                found.append(torch.zeros_like(f))
                continue
            nan = torch.isnan(u)
            out.append(torch.where(nan, torch.zeros_like(u), u))
            found.append(nan.any().to(f.device))
        return out, ZeroNansState(ctx.spec.unflatten(found))

    return leaf_transformation(init_leaves, update_leaves)
