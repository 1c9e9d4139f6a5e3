"""The layer-wise trust ratio, plus the per-tensor scalar helpers the layer-wise kernels share (LARS itself is
:mod:`pureopt.algorithms.lars`).

The trust ratio of :func:`trust_ratio_scale` (the ``scale_by_trust_ratio`` primitive, also LAMB's)::

    ratio = trust_coefficient * ||p|| / (||u|| + eps)           (1 where ||p|| == 0 or ||u|| == 0)
    u <- ratio * u

Norms are per tensor; the ratios are evaluated for all tensors at once on stacked vectors with ``torch.where``
(no host sync, no Python branching on values). Complex tensors are viewed as real pairs (the complex 2-norm).

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_scaled,
    as_complex_like,
    as_real,
    cast_like,
    cast_values,
    join_segments,
    map_scalars_n,
    scalar_for,
    segment_views,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = [
    "add_scaled",
    "cast_values",
    "map_scalars",
    "map_scalars_n",
    "norms",
    "require_params",
    "scalar_for",
    "trust_ratio",
    "trust_ratio_scale",
]


# --- helpers shared by the kernels of this family ------------------------------------------------------------


def norms(ops: ListOps, xs: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor as a 0-d tensor (0 for an empty tensor); one foreach call on that backend."""
    if not xs:
        return []
    if ops.foreach:
        return list(torch._foreach_norm(list(xs)))
    return [torch.linalg.vector_norm(x) for x in xs]


def map_scalars(
    fn: Callable[..., Tensor], *columns: Sequence[Tensor], like: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """:func:`map_scalars_n` for a function with one output vector."""
    return map_scalars_n(lambda *vs: (fn(*vs),), *columns, outputs=1, like=like)[0]


def require_params(params: list[Tensor] | None, what: str) -> list[Tensor]:
    """``params``, or a clear error when ``update`` was called without them."""
    if params is None:
        raise ValueError(f"{what} needs the parameters: call update(grads, state, params)")
    return params


def trust_ratio(param_norm: Tensor, update_norm: Tensor, trust_coefficient: float, eps: float) -> Tensor:
    """``trust_coefficient * ||p|| / (||u|| + eps)`` elementwise, 1 where either norm is 0 (stacked vectors)."""
    ok = (param_norm > 0) & (update_norm > 0)
    denom = torch.where(ok, update_norm + eps, torch.ones_like(update_norm))
    return torch.where(ok, trust_coefficient * param_norm / denom, torch.ones_like(param_norm))


# --- scale_by_trust_ratio -----------------------------------------------------------------------------------------


def trust_ratio_scale(
    params: list[Tensor],
    updates: list[Tensor],
    *,
    trust_coefficient: float,
    eps: float,
    impl: str = "auto",
    segments: Sequence[Sequence[int]] | None = None,
) -> list[Tensor]:
    """Scale each update by its layer-wise trust ratio (see module docstring); returns new tensors.

    ``segments`` (``UpdateContext.segments``): the tensors are flat buffers of parameters of these sizes; the
    ratios are then per segment."""
    path = choose_impl(impl, updates)
    ops = ops_for(path)
    u = as_real(updates)
    p = cast_like(as_real(params), u)
    if segments is not None:
        u = ops.clone(u)  # scaled in place, segment by segment
    u_parts, p_parts = segment_views(u, segments), segment_views(p, segments)
    ratios = map_scalars(
        lambda pn, un: trust_ratio(pn, un, trust_coefficient, eps),
        norms(ops, p_parts),
        norms(ops, u_parts),
        like=u_parts,
    )
    scaled = ops.mul(u_parts, ratios, inplace=segments is not None)
    return as_complex_like(join_segments(scaled, u_parts, u, segments), updates)
