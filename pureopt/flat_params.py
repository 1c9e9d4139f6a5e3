"""``FlatParams``: parameters kept as one contiguous buffer per (device, dtype), for ``torch.func`` training loops.

A pure optimizer step over a pytree of parameters is one kernel (or one compiled loop) per tensor, and
``torch.compile`` traces, optimises and code-generates every one of them: the compile time of a pure step grows
with the number of tensors (more than 240 s for 2000 small ones on 2 CPU cores). :func:`pureopt.flatten` does not
help under the compiler, because its gather and split are inside the graph.

``FlatParams`` moves the layout *out* of the step: the training loop carries the parameters as a tuple of flat
buffers (one per (device, dtype) group), the model sees per-layer views of them, taken outside the compiled
optimizer step, and the optimizer steps the buffers themselves. The compiled step then has a few large tensors as
inputs and outputs, whatever the number of layers: its compile time scales with the number of groups.

Gradients are flat too: differentiate the loss with respect to the buffers (``torch.func.grad`` of a function of
the buffers that calls :meth:`FlatParams.views`). The views are made by one ``split`` per buffer, whose backward
is one concatenation, so the flat gradient costs one copy of the gradients per step.

Which transformations run on the buffers: elementwise ones (:func:`pureopt.is_elementwise`: SGD, Adam(W),
Adagrad, RMSprop, Lion, ... and chains of them) give the per-tensor numbers on a concatenation; segmentwise ones
(:func:`pureopt.is_segmentwise`: LAMB, LARS, trust-ratio scaling, global-norm and block-RMS clipping) compute their
per-parameter reductions over the parameters' segments of each buffer, which :meth:`FlatParams.wrap` tells them.
Anything else (Adafactor, Muon, NovoGrad, masks, ``partition``, user functions) would silently change its
numbers, so ``wrap`` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import (
    GradientTransformation,
    LeafList,
    OptState,
    Params,
    UpdateContext,
    as_leaf_update,
    is_segmentwise,
    leaf_transformation,
)
from pureopt.flat import FlatLayout
from pureopt.tree import PyTreeSpec

__all__ = ["FlatParams", "AUTO_BUFFER_BYTES", "AUTO_MAX_BUFFERS"]

AUTO_BUFFER_BYTES = 16 << 20
"""``max_buffer_bytes="auto"``: CPU groups larger than this are cut into buffers of at most this size (glibc serves
such blocks from its heap once it has freed one: they are not mapped and faulted in again at every step)..."""
AUTO_MAX_BUFFERS = 16
"""...but into at most about this many buffers per group (bigger ones if the group needs more), because compile
time grows with the number of buffers (docs/benchmarks.md, "Buffer size")."""


class FlatParams:
    """A parameter pytree laid out as one contiguous 1-D buffer per (device, dtype) group.

    ``FlatParams(params)`` copies the tensors of ``params`` (any pytree of dense tensors) into new buffers,
    ``buffers``: a tuple with one vector per group, groups in first-seen order, tensors in tree order within a
    group. The object itself only holds the layout (and the initial buffers): in a pure training loop the buffers
    are the loop's values, replaced by new ones at every step, and :meth:`views` turns any such tuple back into the
    parameter tree.

    Ensembles: build the layout from one member's tree, stack the members' buffers on a leading dimension
    (``torch.func.vmap(flat.flatten)(stacked_tree)``) and ``torch.func.vmap`` the step written for one member;
    stacked buffers given to the step without ``vmap`` are refused (docs/torch_func.md).

    Args:
      params: a pytree of dense (strided) tensors; no ``None`` leaves. The tensors are copied (detached).
      max_buffer_bytes: an int cuts each group (between tensors) into buffers of at most this many bytes (a
        larger tensor gets a buffer of its own); ``None`` keeps one buffer per group. A step that is not donated
        allocates new buffers every step; glibc maps blocks above 32 MiB fresh (``mmap``) and the step faults them
        in page by page (a compiled step over one 40 MB buffer: 4-7x torch's fused AdamW), while buffers of at
        most 16 MiB come back from the heap (1.1-1.5x). Compile time grows with the number of buffers (one: 3-5 s,
        11-24: 11-15 s, 94: 77 s of CPU on 2 cores), and a donated step allocates nothing, so it gains nothing
        from cutting.
        ``"auto"`` (default): CPU groups larger than :data:`AUTO_BUFFER_BYTES` (16 MiB) are cut into buffers of
        at most ``max(16 MiB, group bytes / AUTO_MAX_BUFFERS)``, i.e. about 16 buffers at most; other groups (and
        every non-CPU group: the CUDA caching allocator reuses blocks) stay whole.

    Example::

        flat = pureopt.FlatParams(dict(model.named_parameters()))
        tx = flat.wrap(pureopt.adamw(lr=lr, weight_decay=0.1))  # lr: a 0-d tensor, changed in place
        buffers, state = flat.buffers, tx.init(flat.buffers)

        def loss_of(buffers, x, y):  # the model sees per-layer views of the buffers
            return loss_fn(torch.func.functional_call(model, flat.views(buffers), (x,)), y)

        @torch.compile(fullgraph=True)
        def opt_step(grads, state, buffers):  # a few big tensors, whatever the number of layers
            return pureopt.step(tx, grads, state, buffers)

        for x, y in batches:
            grads = torch.func.grad(loss_of)(buffers, x, y)  # a tuple of flat gradients, one per buffer
            buffers, state = opt_step(grads, state, buffers)
    """

    def __init__(self, params: Params, max_buffer_bytes: int | Literal["auto"] | None = "auto") -> None:
        leaves, spec = _tree.flatten(params)
        paths = _tree.tree_paths(params)
        for path, leaf in zip(paths, leaves):
            if not isinstance(leaf, Tensor):
                raise TypeError(
                    f"FlatParams: the leaf at {_tree.format_path(path)} is "
                    f"{'None' if leaf is None else 'a ' + type(leaf).__name__}; every leaf must be a tensor"
                )
            if leaf.layout != torch.strided or type(leaf) not in (Tensor, torch.nn.Parameter):
                raise ValueError(
                    f"FlatParams: the leaf at {_tree.format_path(path)} is not a plain dense tensor "
                    f"({type(leaf).__name__}, layout {leaf.layout}); a flat buffer can only hold dense tensors"
                )
        if not leaves:
            raise ValueError("FlatParams: the parameter tree has no tensors")
        limit: Callable[[torch.device, int], int | None]
        if max_buffer_bytes == "auto":
            limit = _auto_limit
        elif max_buffer_bytes is None:
            limit = lambda device, group_bytes: None
        elif isinstance(max_buffer_bytes, int) and not isinstance(max_buffer_bytes, bool) and max_buffer_bytes > 0:
            limit = lambda device, group_bytes, m=max_buffer_bytes: m  # type: ignore[misc]
        else:
            raise ValueError(
                f"FlatParams: max_buffer_bytes must be a positive int, None or 'auto', got {max_buffer_bytes!r}"
            )
        self.spec: PyTreeSpec = spec
        self.layout = FlatLayout(leaves, _chunks(leaves, limit))
        self.shapes: tuple[torch.Size, ...] = tuple(leaf.shape for leaf in leaves)
        with torch.no_grad():
            self.buffers: tuple[Tensor, ...] = tuple(self.layout.gather([leaf.detach() for leaf in leaves]))

    @property
    def num_groups(self) -> int:
        """How many buffers the layout has (one per (device, dtype) group, or more where groups are cut)."""
        return len(self.layout.groups)

    @property
    def segments(self) -> list[tuple[int, ...]]:
        """For each buffer, the element counts of the parameters in it, in order (``UpdateContext.segments``)."""
        return [group.numels for group in self.layout.groups]

    def check(self, buffers: Any, what: str = "buffers") -> None:
        """Raise a ``ValueError`` naming the first difference if ``buffers`` is not a tuple or list of vectors laid
        out like this object's buffers (count, length, dtype, device)."""
        if not isinstance(buffers, (tuple, list)):
            raise ValueError(
                f"FlatParams: {what} must be a tuple of {self.num_groups} flat buffer(s), "
                f"got a {type(buffers).__name__}"
            )
        if len(buffers) != self.num_groups:
            raise ValueError(
                f"FlatParams: {what} has {len(buffers)} entries, the layout has {self.num_groups} buffer(s)"
            )
        for g, (group, b) in enumerate(zip(self.layout.groups, buffers)):
            if not isinstance(b, Tensor):
                raise ValueError(f"FlatParams: {what}[{g}] is a {type(b).__name__}, not a tensor")
            if b.dim() != 1 or b.shape[0] != group.numel or b.dtype != group.dtype or b.device != group.device:
                stacked = b.dim() == 2 and b.shape[1] == group.numel
                raise ValueError(
                    f"FlatParams: {what}[{g}] is {b.dtype} {tuple(b.shape)} on {b.device}; the layout has "
                    f"{group.dtype} ({group.numel},) on {group.device}"
                    + (
                        " (a stacked ensemble of buffers? write the step for one member and map it over the "
                        "leading dimension with torch.func.vmap)"
                        if stacked
                        else ""
                    )
                )

    def views(self, buffers: Sequence[Tensor] | None = None) -> Params:
        """The parameter tree whose leaves are views of ``buffers`` (default: :attr:`buffers`).

        One ``split`` per buffer, so that differentiating through the views with respect to the buffers costs one
        concatenation of the gradients (not one full-size gradient per view). Works on any tuple laid out like the
        buffers: flat gradients, or a state field such as Adam's ``exp_avg`` over the buffers.
        """
        buffers = self.buffers if buffers is None else buffers
        self.check(buffers)
        leaves: list[Any] = [None] * len(self.shapes)
        for group, buffer in zip(self.layout.groups, buffers):
            for i, piece in zip(group.indices, torch.split(buffer, list(group.numels))):
                leaves[i] = piece.view(self.shapes[i])
        return self.spec.unflatten(leaves)

    def flatten(self, tree: Params) -> tuple[Tensor, ...]:
        """New flat buffers holding the leaves of ``tree`` (shaped like the parameters): one copy per group, e.g.
        for gradients computed with respect to the per-layer tensors."""
        leaves = _tree.flatten_like(self.spec, tree, what="tree", against="the flat parameters' tree")
        problem = self.layout.matches(leaves)
        if problem is not None:
            raise ValueError(f"FlatParams.flatten: the tree does not have the parameters' layout: {problem}")
        return tuple(self.layout.gather(leaves))

    def wrap(self, tx: GradientTransformation) -> GradientTransformation:
        """``tx`` stepping this layout's flat buffers: ``init`` and ``update`` take tuples of buffers.

        Elementwise transformations run on the buffers as they are; segmentwise ones (LAMB, LARS, trust-ratio
        scaling, global-norm and block-RMS clipping) get the segments, so their per-parameter norms are those of
        the per-tensor step. Every other transformation raises a ``ValueError``: its per-tensor math (factored
        moments, orthogonalisation, masks, shapes) would silently change on a concatenated vector.

        One step count is kept per buffer (every parameter has a gradient at every step: a flat gradient has no
        ``None`` parts). The update checks that the buffers have this layout (a clear error otherwise).

        Args:
          tx: an elementwise or segmentwise transformation.

        Example::

            tx = flat.wrap(pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=1e-3)))
            state = tx.init(flat.buffers)
            buffers, state = pureopt.step(tx, flat_grads, state, buffers)
        """
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"FlatParams.wrap: tx is a {type(tx).__name__}, not a GradientTransformation")
        if not is_segmentwise(tx):
            raise ValueError(
                "FlatParams.wrap needs an elementwise transformation (each element's update depends only on that "
                "element) or a segmentwise one (per-parameter reductions computed per segment); this one is "
                "neither, or does not say so: per-tensor math such as factored moments (Adafactor), "
                "orthogonalisation (Muon), per-layer moments (NovoGrad), masks or partition would give different "
                "numbers on a flat buffer. Step it per tensor (tx.update on flat.views(buffers))."
            )
        inner_update = as_leaf_update(tx)
        segments = self.segments

        def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> OptState:
            self.check(leaves, "the buffers given to init")
            return tx.init(spec.unflatten(leaves))

        def update_leaves(
            updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
        ) -> tuple[LeafList | None, OptState]:
            self.check(updates, "the flat gradients")
            if params is not None:
                self.check(params, "the flat parameters")
            return inner_update(updates, state, params, ctx.but(segments=segments))

        return leaf_transformation(init_leaves, update_leaves)


def _auto_limit(device: torch.device, group_bytes: int) -> int | None:
    """``max_buffer_bytes="auto"``: the most bytes per buffer for a (device, dtype) group of ``group_bytes``."""
    if device.type != "cpu" or group_bytes <= AUTO_BUFFER_BYTES:
        return None
    return max(AUTO_BUFFER_BYTES, math.ceil(group_bytes / AUTO_MAX_BUFFERS))


def _chunks(tensors: Sequence[Tensor], limit: Callable[[torch.device, int], int | None]) -> list[list[int]]:
    """Groups of tensor indices, one (device, dtype) each (first-seen order), cut so that a group holds at most
    ``limit(device, bytes of the whole group)`` bytes (``None``: not cut) unless a single tensor is larger."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    groups: list[list[int]] = []
    for (device, _), indices in by_kind.items():
        sizes = [tensors[i].numel() * tensors[i].element_size() for i in indices]
        max_bytes = limit(device, sum(sizes))
        current: list[int] = []
        size = 0
        for i, nbytes in zip(indices, sizes):
            if max_bytes is not None and current and size + nbytes > max_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        groups.append(current)
    return groups
