"""Combining transformations: ``chain``."""

from __future__ import annotations

from typing import Any

from pureopt.base import (
    GradientTransformation,
    LeafList,
    OptState,
    UpdateContext,
    as_leaf_update,
    leaf_transformation,
)
from pureopt.tree import PyTreeSpec

__all__ = ["chain"]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states.

    The gradient and parameter trees are flattened once per step for the whole chain.

    Args:
      *transforms: the transformations, in order.

    Example::

        tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=3e-4, weight_decay=0.1))
    """
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"chain: argument {i} is a {type(tx).__name__}, not a GradientTransformation")
    updates_fns = [as_leaf_update(tx) for tx in transforms]

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> tuple[OptState, ...]:
        params = spec.unflatten(leaves)
        return tuple(tx.init(params) for tx in transforms)

    def update_leaves(
        updates: LeafList, state: tuple[OptState, ...], params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, tuple[OptState, ...]]:
        if not isinstance(state, tuple) or len(state) != len(updates_fns):
            got = f"a tuple of {len(state)} states" if isinstance(state, tuple) else f"a {type(state).__name__}"
            raise ValueError(f"chain of {len(updates_fns)} transformations got {got}")
        new_states = []
        inner = ctx.but(apply=False) if ctx.apply else ctx
        last = len(updates_fns) - 1
        out: LeafList | None = updates
        for i, (fn, sub_state) in enumerate(zip(updates_fns, state)):
            # only the last transformation may apply its updates to the parameters in place
            assert out is not None
            out, new_sub = fn(out, sub_state, params, ctx if i == last else inner)
            new_states.append(new_sub)
        return out, tuple(new_states)

    return leaf_transformation(init_leaves, update_leaves)
