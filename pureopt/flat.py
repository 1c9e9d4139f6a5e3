"""Flat layout: one contiguous vector per (device, dtype) group instead of one tensor per parameter.

A step of an optimizer costs a fixed amount per tensor (torch's CPU fused Adam spends ~26 µs on each), so a model
with thousands of small parameters runs far from the memory-bandwidth bound. For an *elementwise* transformation
(:func:`pureopt.base.is_elementwise`: Adam, SGD, Lion, ...) the same numbers come out when it runs on the
concatenation of the parameters, which is one kernel call per (device, dtype) group:

* :class:`FlatLayout` maps a list of tensors onto such vectors (``gather``: one copy; ``views``: the per-tensor
  views of a vector);
* :func:`flatten` wraps a transformation so that it runs on those vectors, for ``torch.func`` users;
* the adapters' ``flat=True`` (``TorchOptimizer``, ``FunctionalOptimizer``) go further: the parameters become
  views of flat buffers that the adapter owns, so a step needs no copy at all.

DTensors (FSDP2, HSDP, TP) are laid out by their *local shards*: one vector per (device, dtype, mesh,
placements) group holds this rank's shard of each tensor of the group, never a gathered (replicated) copy.
``views`` gives the local shards back; ``dtensor_views`` wraps them as DTensors placed like the originals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import (
    GradientTransformation,
    LeafList,
    OptState,
    UpdateContext,
    as_leaf_update,
    is_elementwise,
    is_segmentwise,
    leaf_transformation,
)
from pureopt.kernels.dtensor import dtensor_type, is_split
from pureopt.tree import PyTreeSpec

__all__ = ["FlatLayout", "FlatGroup", "flatten"]


@dataclass(frozen=True)
class FlatGroup:
    """The tensors of one (device, dtype) group and where each sits in the group's vector.

    Attributes:
      device, dtype: what the tensors of the group share.
      indices: their positions in the list the layout was made from, in order.
      offsets, numels, shapes: where each starts in the vector, how many elements it has, its shape (for
        DTensors: of its local shard).
      numel: the length of the vector.
      mesh, placements: for a group of DTensors, their device mesh and placements (``None`` for plain tensors).
      global_shapes, global_strides: for a group of DTensors, each DTensor's global shape and stride.
    """

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    numel: int
    mesh: Any = None
    placements: tuple[Any, ...] | None = None
    global_shapes: tuple[torch.Size, ...] = ()
    global_strides: tuple[tuple[int, ...], ...] = ()

    @property
    def sharded(self) -> bool:
        """Whether the group's tensors are DTensors split over some mesh dimension (a ``Shard`` placement)."""
        return self.placements is not None and any(is_split(p) for p in self.placements)


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (its own storage), or ``t`` itself."""
    dtensor = dtensor_type()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


def _key(t: Tensor, i: int) -> tuple[Any, ...]:
    """The group key of a tensor: (device, dtype) and, for a DTensor, its mesh and placements."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        placements = tuple(t.placements)
        if any(p.is_partial() for p in placements):
            raise ValueError(
                f"a flat layout of DTensors needs Shard/Replicate placements; entry {i} is placed {placements} "
                "(a Partial DTensor is a pending reduction, not data to lay out)"
            )
        local = t._local_tensor
        return (local.device, t.dtype, t.device_mesh, placements)
    return (t.device, t.dtype, None, None)


class FlatLayout:
    """How a list of tensors maps onto one 1-D vector per (device, dtype), groups in first-seen order.

    ``groups`` (lists of indices; each tensor in exactly one, each group of one device and dtype) chooses the
    groups and the order of the tensors within each vector instead (e.g. the layout of DDP's gradient buckets).

    DTensors are grouped by (device, dtype, mesh, placements) as well, and laid out by their local shards (see the
    module docstring); ``Partial`` placements are refused.

    Example::

        layout = FlatLayout(list(model.parameters()))
        vectors = layout.gather([p.grad for p in model.parameters()])   # one vector per group
        grads_again = layout.views(vectors)                               # per-tensor views, original order
    """

    def __init__(self, tensors: Sequence[Tensor], groups: Sequence[Sequence[int]] | None = None) -> None:
        keyed: dict[Any, list[int]] = {}
        keys: list[tuple[Any, ...]] = []
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"a flat layout is made of tensors; entry {i} is a {type(t).__name__}")
            if t.layout != torch.strided:
                raise ValueError(f"a flat layout needs dense (strided) tensors; entry {i} has layout {t.layout}")
            keys.append(_key(t, i))
            if groups is None:
                keyed.setdefault(keys[-1], []).append(i)
        if groups is not None:
            keyed = {g: list(indices) for g, indices in enumerate(groups)}
            listed = sorted(i for indices in groups for i in indices)
            if listed != list(range(len(tensors))):
                raise ValueError("the groups of a flat layout must list every tensor exactly once")
            for g, indices in keyed.items():
                if not indices or len({keys[i][:2] for i in indices}) != 1:
                    raise ValueError(f"group {g} of a flat layout is empty or mixes devices or dtypes")
                if any(keys[i][2:] != keys[indices[0]][2:] for i in indices):
                    raise ValueError(f"group {g} of a flat layout mixes DTensor meshes or placements")
        self.num_tensors = len(tensors)
        self.groups: list[FlatGroup] = []
        self.group_of: list[int] = [0] * len(tensors)
        self.offset_of: list[int] = [0] * len(tensors)
        self.shape_of: list[torch.Size] = [torch.Size()] * len(tensors)
        for g, indices in enumerate(keyed.values()):
            device, dtype, mesh, placements = keys[indices[0]]
            offsets, numels, offset = [], [], 0
            for i in indices:
                local = local_tensor(tensors[i])
                n = local.numel()
                offsets.append(offset)
                numels.append(n)
                self.group_of[i], self.offset_of[i], self.shape_of[i] = g, offset, local.shape
                offset += n
            shapes = tuple(local_tensor(tensors[i]).shape for i in indices)
            extra: dict[str, Any] = {}
            if placements is not None:
                extra = {
                    "mesh": mesh,
                    "placements": placements,
                    "global_shapes": tuple(tensors[i].shape for i in indices),
                    "global_strides": tuple(tuple(tensors[i].stride()) for i in indices),
                }
            self.groups.append(
                FlatGroup(device, dtype, tuple(indices), tuple(offsets), tuple(numels), shapes, offset, **extra)
            )

    @property
    def sharded(self) -> bool:
        """Whether some group holds local shards of DTensors split over a mesh dimension."""
        return any(group.sharded for group in self.groups)

    def matches(self, tensors: Sequence[Any]) -> str | None:
        """``None`` if ``tensors`` have this layout's shapes, devices and dtypes; else what differs first."""
        if len(tensors) != self.num_tensors:
            return f"{len(tensors)} tensors, the layout has {self.num_tensors}"
        for group in self.groups:
            for i, shape in zip(group.indices, group.shapes):
                t = tensors[i]
                if not isinstance(t, Tensor):
                    return f"entry {i} is a {type(t).__name__}"
                if _key(t, i)[2:] != (group.mesh, group.placements):
                    return (
                        f"entry {i} is placed as {getattr(t, 'placements', 'a plain tensor')}, the layout has "
                        f"{group.placements or 'a plain tensor'}"
                    )
                local = local_tensor(t)
                if local.shape != shape or t.dtype != group.dtype or local.device != group.device:
                    return (
                        f"entry {i} is {t.dtype} {tuple(local.shape)} on {local.device}, the layout has {group.dtype} "
                        f"{tuple(shape)} on {group.device}"
                    )
        return None

    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """One new vector per group holding ``tensors`` (cast to the group's dtype), in one copy per group (of
        DTensors: their local shards)."""
        out = []
        for group in self.groups:
            parts = [local_tensor(tensors[i]).reshape(-1) for i in group.indices]
            if all(p.dtype == group.dtype for p in parts):
                out.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
            else:
                out.append(torch.cat([p.to(group.dtype) for p in parts]))
        return out

    def views(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """The per-tensor views of one vector per group, in the order of the tensors the layout was made from."""
        out: list[Tensor] = [vectors[0]] * self.num_tensors if vectors else []
        for group, vector in zip(self.groups, vectors):
            for i, offset, n, shape in zip(group.indices, group.offsets, group.numels, group.shapes):
                out[i] = vector[offset : offset + n].view(shape)
        return out

    def dtensor_views(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`views`, with the views of a DTensor group wrapped as DTensors placed like the layout's tensors
        (the same storage: in-place writes reach the vectors)."""
        out = self.views(vectors)
        for group in self.groups:
            if group.placements is None:
                continue
            from torch.distributed.tensor import DTensor

            for i, shape, stride in zip(group.indices, group.global_shapes, group.global_strides):
                out[i] = DTensor.from_local(
                    out[i], group.mesh, group.placements, run_check=False, shape=shape, stride=stride
                )
        return out


def flatten(inner: GradientTransformation) -> GradientTransformation:
    """Run an elementwise (or segmentwise) transformation on one vector per (device, dtype) group of the parameters.

    ``init`` concatenates the parameters of each group into a vector and returns ``inner``'s state over the
    tuple of those vectors; ``update`` concatenates the gradients (and parameters) the same way, runs ``inner``
    once and splits its updates back. A model with many small tensors then costs one kernel call per group
    instead of one per tensor, at the price of one gather copy of the gradients and parameters per step (the
    adapters' ``flat=True`` avoids even that by keeping the parameters in flat buffers).

    Only transformations that give the same numbers on the vectors are accepted: elementwise ones
    (:func:`pureopt.base.is_elementwise`) and those that compute their per-tensor reductions per segment when
    told where each parameter sits (:func:`pureopt.base.is_segmentwise`: LAMB, LARS, trust-ratio scaling,
    global-norm and block-RMS clipping), which ``flatten`` does. Other per-tensor math (factored moments,
    orthogonalisation, masks) would silently change, so it raises. Every parameter needs a gradient at every step (one
    step count is kept per group); a ``None`` gradient among others raises, all ``None`` is a no-op.

    Works under ``torch.func`` transforms (the concatenation is batched by ``vmap``).

    DTensor parameters (FSDP2) are flattened by their local shards, one vector per (mesh, placements, dtype)
    group, and the updates come back as DTensors placed like the parameters; the state is over this rank's local
    vectors (plain tensors). Gradients must be placed like their parameters. A segmentwise transformation that is
    not elementwise (its per-parameter norms would be taken over the local shard only) is refused for groups
    split over a mesh dimension (use it unflattened: DTensor reduces its norms across shards).

    Args:
      inner: an elementwise or segmentwise transformation, e.g. ``pureopt.adamw(1e-3)``.

    Example::

        tx = pureopt.flatten(pureopt.adamw(lr=1e-3, weight_decay=0.01))
        state = tx.init(params)            # AdamW's state over one vector per (device, dtype)
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)

    optax has the same wrapper (``optax.flatten``).
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"flatten: inner is a {type(inner).__name__}, not a GradientTransformation")
    if not is_segmentwise(inner):
        raise ValueError(
            "flatten needs an elementwise transformation (the update of each element depends only on that "
            "element) or one that computes its per-tensor reductions per segment: this one is neither, or does "
            "not say so (per-tensor math such as factored moments or orthogonalisation would change on a "
            "concatenated vector)"
        )
    inner_update = as_leaf_update(inner)

    def present(leaves: Sequence[Any]) -> list[int]:
        return [i for i, x in enumerate(leaves) if x is not None]

    def check_layout(layout: FlatLayout) -> None:
        if layout.sharded and not is_elementwise(inner):
            raise ValueError(
                "flatten: this transformation reduces over each parameter (segmentwise, e.g. norms), and the "
                "parameters are DTensors split across ranks: a flat vector of local shards would give per-shard "
                "norms. Use the transformation without flatten (DTensor reduces across shards)."
            )

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> OptState:
        tensors = [leaves[i] for i in present(leaves)]
        layout = FlatLayout(tensors)
        check_layout(layout)
        return inner.init(tuple(layout.gather(tensors)))

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        idx = present(updates)
        if not idx:
            return list(updates), state
        if params is not None and len(idx) != len(present(params)):
            missing = next(i for i in present(params) if updates[i] is None)
            raise ValueError(
                f"flatten: the gradient at {_tree.format_path(_tree.tree_paths(ctx.spec.unflatten(updates))[missing])} "
                "is None while others are not; a flattened transformation keeps one step count per group and "
                "needs every gradient (use the unflattened transformation to skip parameters)"
            )
        grads = [updates[i] for i in idx]
        layout = FlatLayout([params[i] for i in idx] if params is not None else grads)
        check_layout(layout)
        if params is not None and any(group.placements is not None for group in layout.groups):
            mismatch = layout.matches(grads)
            if mismatch is not None:
                raise ValueError(f"flatten: the gradients are not laid out like the parameters: {mismatch}")
        flat_params = layout.gather([params[i] for i in idx]) if params is not None else None
        flat_spec = _tree.flatten(tuple(range(len(layout.groups))))[1]
        segments = [group.numels for group in layout.groups]
        inner_ctx = UpdateContext(flat_spec, ctx.extra_args, donate=ctx.donate, apply=False, segments=segments)
        flat_updates, new_state = inner_update(layout.gather(grads), state, flat_params, inner_ctx)
        assert flat_updates is not None
        out: list[Any] = [None] * len(updates)
        for i, view in zip(idx, layout.dtensor_views(flat_updates)):
            out[i] = view
        return out, new_state

    return leaf_transformation(init_leaves, update_leaves, elementwise=is_elementwise(inner))
