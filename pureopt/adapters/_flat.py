"""The adapters' flat-buffer mode (``flat=True``): parameters and state in one buffer per (device, dtype).

:class:`FlatParams` re-points a group's parameters into flat buffers (``p.data`` becomes a view of the group's
buffer, as FSDP's flat parameters do) and gathers gradients into flat gradient buffers — with no copy at all when
``p.grad`` already are its views (``zero_grad(set_to_none=False)`` makes them so).

:class:`FlatState` keeps the transformation's state in two forms that share memory:

* the *flat* state, ``tx.init(tuple(buffers))``: one state buffer per kind per group; a step on it is one kernel
  call per group. It is used when the transformation is elementwise, or segmentwise
  (:func:`pureopt.base.is_segmentwise`; the step passes the parameters' sizes as ``UpdateContext.segments``) on
  small parameters (:data:`SEGMENTWISE_MAX_MEAN_BYTES`), every
  parameter of the group has a gradient and the per-parameter 0-d state (step counts) is the same for all of
  them — exactly the case where it gives the numbers of the per-parameter step;
* the *per-parameter* state, the tree ``tx.init(tuple(params))`` would give, whose parameter-shaped leaves are
  views of the flat state buffers. It is what ``state_dict``, ``state[p]`` and any other step use (some
  gradients ``None``, step counts that differ): torch's semantics, per-tensor kernels on the views.

A transformation that is neither, or whose state cannot be laid out flat, keeps only the per-parameter
state: its steps are the ordinary ones (the parameters are still views of flat buffers).

DTensor parameters (FSDP2) are laid out by their local shards, one buffer per (device, dtype, mesh, placements)
group (:class:`pureopt.flat.FlatLayout`). They stay where they are: FSDP2 all-gathers each parameter from its own
(padded) shard storage, so a parameter re-pointed into another buffer would silently stop training. A flat step
copies the group's local shards into its parameter buffer (one ``cat``) and back after the step (one
``_foreach_copy_``). Gradients need no copy when they are views of the flat gradient buffer
(``zero_grad(set_to_none=False)``: FSDP2 then accumulates its reduce-scattered gradients into them). The
per-parameter state is DTensors over views of the flat state buffers, placed like the parameters (what DCP saves).
A segmentwise, not elementwise, transformation (per-parameter norms) steps per parameter on sharded groups, where
DTensor reduces the norms across shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.adapters._amp import donated_step
from pureopt.adapters._state import StateLayout
from pureopt.base import (
    GradientTransformation,
    OptState,
    UpdateContext,
    as_leaf_update,
    is_elementwise,
    is_segmentwise,
)
from pureopt.flat import FlatGroup, FlatLayout, local_tensor
from pureopt.kernels.dtensor import dtensor_type, is_dtensor

__all__ = ["FlatParams", "FlatState"]

_SLICE, _SCALAR, _GLOBAL, _STATIC = "slice", "scalar", "global", "static"

SEGMENTWISE_MAX_MEAN_BYTES = 64 << 10
"""A transformation that is segmentwise but not elementwise (LAMB, LARS, global-norm clipping, ...) runs flat
only in groups whose parameters average at most this many bytes. Its flat step makes whole-buffer passes and
temporaries where the per-tensor step works tensor by tensor in cache, so it wins only where the per-tensor cost
dominates: LAMB on 2000 tensors of 1-4k params took 0.56x-0.69x the per-tensor step, on 196 tensors of 5k-15k
params 0.72x-0.99x, of 30k-50k params 1.27x-1.29x (docs/benchmarks.md)."""


class FlatParams:
    """A list of parameters re-pointed into one flat buffer per (device, dtype) group.

    Construction copies each parameter's values into its group's buffer and sets ``p.data`` to the matching view;
    the parameter objects (and anything holding them: modules, hooks) stay the same. DTensor parameters are not
    re-pointed (see the module docstring): their groups' buffers are loaded before a flat step
    (:meth:`load_params`) and written back after it (:meth:`store_params`).
    """

    def __init__(self, params: Sequence[Tensor], groups: Sequence[Sequence[int]] | None = None) -> None:
        self.check(params)
        self.params = tuple(params)
        self.layout = FlatLayout(self.params, groups)
        # groups of DTensors: the parameters keep their own storage; the buffer is a working copy
        self.detached = [group.placements is not None for group in self.layout.groups]
        with torch.no_grad():
            self.buffers = self.layout.gather([p.detach() for p in self.params])
            views = self.layout.views(self.buffers)
            for p, view, g in zip(self.params, views, self.layout.group_of):
                if not self.detached[g]:
                    p.data = view
        self._param_views = views
        self._grad_buffers: list[Tensor] | None = None
        self._grad_views: list[Tensor] = []  # what p.grad is set to (DTensors over local views for DTensor groups)

    @staticmethod
    def check(params: Sequence[Tensor]) -> None:
        """Raise a ValueError if these parameters cannot be laid out flat (before anything is changed)."""
        for i, p in enumerate(params):
            if p.layout != torch.strided or p.is_sparse:
                raise ValueError(f"flat=True needs dense parameters; parameter {i} has layout {p.layout}")
            if is_dtensor(p):
                placements = tuple(p.placements)  # type: ignore[attr-defined]
                if any(pl.is_partial() for pl in placements):
                    raise ValueError(f"flat=True: parameter {i} is a DTensor with a Partial placement {placements}")
                local = local_tensor(p)
                if local.layout != torch.strided or type(local) is not Tensor:
                    raise ValueError(
                        f"flat=True needs DTensors with dense plain local shards; parameter {i}'s local shard is a "
                        f"{type(local).__name__} with layout {local.layout}"
                    )
                continue
            if type(p) not in (Tensor, torch.nn.Parameter):
                raise ValueError(f"flat=True needs plain tensors or DTensors; parameter {i} is a {type(p).__name__}")

    @property
    def any_detached(self) -> bool:
        """Whether some group's parameters live outside its buffer (DTensor groups)."""
        return any(self.detached)

    def load_params(self) -> None:
        """Copy the local shards of the DTensor groups' parameters into their buffers (one ``cat`` per group).

        Every step: a write to a DTensor parameter (``p.mul_``, ``p.data.copy_``) reaches its local shard inside
        DTensor's dispatch, which bumps no version counter of the local tensor, so a stale buffer could not be
        told from a current one. The local shards are looked up every step too: FSDP2 may give a parameter a new
        local tensor (``_apply``, ``load_state_dict(assign=True)``)."""
        for g, group in enumerate(self.layout.groups):
            if self.detached[g]:
                parts = [local_tensor(self.params[i]).reshape(-1) for i in group.indices]
                torch.cat(parts, out=self.buffers[g])

    def store_params(self) -> None:
        """Copy the DTensor groups' buffers back into the parameters' local shards (one foreach copy)."""
        dst: list[Tensor] = []
        src: list[Tensor] = []
        for g, group in enumerate(self.layout.groups):
            if self.detached[g]:
                dst += [local_tensor(self.params[i]) for i in group.indices]
                src += [self._param_views[i] for i in group.indices]
        if dst:
            torch._foreach_copy_(dst, src)

    def grad_views(self) -> list[Tensor]:
        """Per-parameter views of the flat gradient buffers (allocated, zero-filled, on first use)."""
        if self._grad_buffers is None:
            self._grad_buffers = [torch.zeros_like(b) for b in self.buffers]
            self._grad_views = self.layout.dtensor_views(self._grad_buffers)
        return self._grad_views

    def zero_grad_views(self) -> None:
        """Point every ``p.grad`` at its view of the flat gradient buffers, zero-filled (one fill per group)."""
        views = self.grad_views()
        assert self._grad_buffers is not None
        for b in self._grad_buffers:
            b.zero_()
        for p, v in zip(self.params, views):
            if p.grad is not v:
                p.grad = v

    def flat_grads(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The gradients as one flat tensor per group (``None`` for a group without any gradient).

        No copy when a group's gradients are its own gradient views, or are laid out like the group in one
        contiguous tensor (a DDP bucket, say): the flat tensor is then a view of theirs. Otherwise they are copied
        into the group's gradient buffer (one copy). A group must have every gradient or none.
        """
        views = self._grad_views
        out: list[Tensor | None] = []
        with torch.no_grad():
            for g, group in enumerate(self.layout.groups):
                present = [grads[i] for i in group.indices]
                if present[0] is None:
                    out.append(None)
                    continue
                if views and all(grads[i] is views[i] for i in group.indices):
                    assert self._grad_buffers is not None
                    out.append(self._grad_buffers[g])
                    continue
                if group.placements is not None:
                    present = [self._local_grad(grads[i], i) for i in group.indices]  # type: ignore[arg-type]
                    grads = list(grads)
                    for i, t in zip(group.indices, present):
                        grads[i] = t
                laid_out = _laid_out(present, group)  # type: ignore[arg-type]
                if laid_out is not None:
                    out.append(laid_out)
                    continue
                self.grad_views()
                assert self._grad_buffers is not None
                buffer = self._grad_buffers[g]
                views = self.layout.views(self._grad_buffers) if group.placements is not None else self._grad_views
                stale = [i for i in group.indices if grads[i] is not views[i]]
                if len(stale) == len(group.indices) and all(grads[i].dtype == group.dtype for i in stale):  # type: ignore[union-attr]
                    torch.cat([grads[i].reshape(-1) for i in stale], out=buffer)  # type: ignore[union-attr]
                    out.append(buffer)
                else:
                    torch._foreach_copy_([views[i] for i in stale], [grads[i] for i in stale])  # type: ignore[misc]
                    out.append(buffer)
        return out

    def _local_grad(self, grad: Tensor, i: int) -> Tensor:
        """The local shard of parameter ``i``'s DTensor gradient, checked to be placed like the parameter."""
        p = self.params[i]
        if not is_dtensor(grad):
            raise ValueError(f"flat=True: parameter {i} is a DTensor but its gradient a {type(grad).__name__}")
        if tuple(grad.placements) != tuple(p.placements) or grad.shape != p.shape:  # type: ignore[attr-defined]
            raise ValueError(
                f"flat=True: the gradient of parameter {i} is placed as {grad.placements} with shape "  # type: ignore[attr-defined]
                f"{tuple(grad.shape)}, the parameter as {p.placements} with shape {tuple(p.shape)}"  # type: ignore[attr-defined]
            )
        return local_tensor(grad)


def _laid_out(tensors: Sequence[Tensor], group: FlatGroup) -> Tensor | None:
    """A 1-D view covering ``tensors`` if they sit in one storage exactly as the group lays them out, else None."""
    first = tensors[0]
    if first.dtype != group.dtype or first.device != group.device:
        return None
    storage = first.untyped_storage().data_ptr()
    base, itemsize = first.data_ptr(), first.element_size()
    for t, offset in zip(tensors, group.offsets):
        if t.dtype != group.dtype or t.data_ptr() != base + offset * itemsize or not t.is_contiguous():
            return None
        if t.untyped_storage().data_ptr() != storage:
            return None
    return first.as_strided((group.numel,), (1,))


def _per_param_ok(value: Tensor, like: Tensor) -> bool:
    return value.shape == like.shape and value.device == like.device


class FlatState:
    """A group's state over flat buffers, with a per-parameter view of it (see the module docstring).

    Args:
      flat: the group's flat parameters.
      tx: the group's transformation.
      state: a per-parameter state of ``tx`` (``tx.init(tuple(params))``, or one loaded or migrated); its values
        are copied in (it is not kept).
    """

    def __init__(self, flat: FlatParams, tx: GradientTransformation, state: OptState) -> None:
        self.flat = flat
        self.update = as_leaf_update(tx)
        params = flat.params
        self.pp_layout = StateLayout(state, len(params))
        self.pp_spec = _tree.flatten(tuple(params))[1]
        self.flat_spec = _tree.flatten(tuple(flat.buffers))[1]
        pp_leaves = self.pp_layout.leaves(state)
        self._owner = {pos: i for i, keys in enumerate(self.pp_layout.param_keys) for pos in keys.values()}
        self.uniform = True
        self._statics: dict[int, Any] = {}
        self._scalars: dict[int, Tensor] = {}  # per-parameter 0-d leaves while they differ within a group
        self.flat_state: OptState | None = None
        self._kinds: list[tuple[str, int]] = []  # for each per-parameter leaf: (kind, flat leaf position)
        plan = self._plan(tx, pp_leaves) if self._runs_flat(tx) else None
        if plan is None:  # not flattenable: the per-parameter state is the state
            self._pp_state: OptState | None = self.pp_layout.spec.unflatten(list(pp_leaves))
            return
        flat_leaves = plan
        with torch.no_grad():
            for pos, (kind, fpos) in enumerate(self._kinds):
                if kind == _SLICE:
                    self._slice_view(pos, fpos, flat_leaves).copy_(pp_leaves[pos])
                elif kind == _GLOBAL:
                    flat_leaves[fpos] = pp_leaves[pos].clone()
                elif kind == _STATIC:
                    self._statics[pos] = pp_leaves[pos]
            self._slices = {pos: self._slice_view(pos, fpos, flat_leaves) for pos, fpos in self._by_kind(_SLICE)}
            self._slice_fpos = {fpos for _, fpos in self._by_kind(_SLICE)}
            self._scalars = {pos: pp_leaves[pos].detach().clone() for pos, _ in self._by_kind(_SCALAR)}
            self.uniform = False
            self._pp_state = None
            self._try_uniform(flat_leaves)  # a loaded state may have different step counts
        self.flat_state = self.flat_spec_state.unflatten(flat_leaves)

    # --- layout -----------------------------------------------------------------------------------------------

    def _runs_flat(self, tx: GradientTransformation) -> bool:
        """Whether ``tx`` steps on the flat buffers (see :data:`SEGMENTWISE_MAX_MEAN_BYTES`; a segmentwise
        transformation never on local shards of DTensors split across ranks: its norms would be per shard)."""
        if is_elementwise(tx):
            return True
        if not is_segmentwise(tx) or self.flat.layout.sharded:
            return False
        params = self.flat.params
        mean = sum(p.numel() * p.element_size() for p in params) / max(1, len(params))
        return mean <= SEGMENTWISE_MAX_MEAN_BYTES

    def _plan(self, tx: GradientTransformation, pp_leaves: list[Any]) -> list[Any] | None:
        """The flat state's leaves and, in ``self._kinds``, where each per-parameter leaf lives in it (None: the
        state does not lay out flat)."""
        flat = self.flat
        with torch.no_grad():
            flat_state = tx.init(tuple(flat.buffers))
        flat_layout = StateLayout(flat_state, len(flat.buffers))
        flat_leaves, self.flat_spec_state = optree.tree_flatten(flat_state, none_is_leaf=True)
        kinds: list[tuple[str, int]] = [(_STATIC, -1)] * len(pp_leaves)
        for i, keys in enumerate(self.pp_layout.param_keys):
            g = flat.layout.group_of[i]
            group = flat.layout.groups[g]
            for key, pos in keys.items():
                fpos = flat_layout.param_keys[g].get(key)
                if fpos is None:
                    return None
                leaf, fleaf = pp_leaves[pos], flat_leaves[fpos]
                if not (isinstance(leaf, Tensor) and isinstance(fleaf, Tensor)) or leaf.dtype != fleaf.dtype:
                    return None
                if leaf.dim() == 0 and fleaf.dim() == 0:
                    kinds[pos] = (_SCALAR, fpos)
                elif _per_param_ok(leaf, flat.params[i]) and fleaf.shape == (group.numel,):
                    kinds[pos] = (_SLICE, fpos)
                else:
                    return None
        for key, pos in self.pp_layout.global_keys.items():
            fpos = flat_layout.global_keys.get(key)
            if fpos is None or flat_leaves[fpos].shape != pp_leaves[pos].shape:
                return None
            kinds[pos] = (_GLOBAL, fpos)
        self._kinds = kinds
        return flat_leaves

    def _flat_leaves(self) -> list[Any]:
        assert self.flat_state is not None
        return optree.tree_leaves(self.flat_state, none_is_leaf=True)

    def _by_kind(self, kind: str) -> list[tuple[int, int]]:
        return [(pos, fpos) for pos, (k, fpos) in enumerate(self._kinds) if k == kind]

    def _slice_view(self, pos: int, fpos: int, flat_leaves: list[Any]) -> Tensor:
        """The per-parameter view of a flat state leaf (for a DTensor parameter: a DTensor placed like it)."""
        i = self._owner[pos]
        layout = self.flat.layout
        offset = layout.offset_of[i]
        shape = layout.shape_of[i]
        view = flat_leaves[fpos][offset : offset + shape.numel()].view(shape)
        p = self.flat.params[i]
        dtensor = dtensor_type()
        if dtensor is None or not isinstance(p, dtensor):
            return view
        return dtensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    # --- the per-parameter view -------------------------------------------------------------------------------

    @property
    def flattened(self) -> bool:
        """Whether the state lives in flat buffers (the transformation is segmentwise and its state lays out)."""
        return self.flat_state is not None

    def per_param(self) -> OptState:
        """The per-parameter state (parameter-shaped leaves are live views of the flat buffers; 0-d step counts
        shared by a whole group are that group's own tensor)."""
        if self._pp_state is None:
            assert self.flat_state is not None
            flat_leaves = self._flat_leaves()
            leaves: list[Any] = []
            for pos, (kind, fpos) in enumerate(self._kinds):
                if kind == _SLICE:
                    leaves.append(self._slices[pos])
                elif kind == _SCALAR:
                    leaves.append(flat_leaves[fpos] if self.uniform else self._scalars[pos])
                elif kind == _GLOBAL:
                    leaves.append(flat_leaves[fpos])
                else:
                    leaves.append(self._statics[pos])
            self._pp_state = self.pp_layout.spec.unflatten(leaves)
        return self._pp_state

    def checkpoint_state(self) -> OptState:
        """:meth:`per_param` with every per-parameter 0-d leaf its own tensor (no two parameters share one)."""
        state = self.per_param()
        if not self.flattened or not self.uniform:
            return state
        leaves = self.pp_layout.leaves(state)
        for pos, _ in self._by_kind(_SCALAR):
            leaves[pos] = leaves[pos].clone()
        return self.pp_layout.spec.unflatten(leaves)

    def set_globals(self, values: dict[str, Tensor]) -> None:
        """Replace the global leaves (``num_updates`` counters, ...) by ``values``, by dotted path."""
        if not self.flattened:
            self._pp_state = self.pp_layout.with_globals(self.per_param(), values)
            return
        assert self.flat_state is not None
        flat_leaves = self._flat_leaves()
        for key, pos in self.pp_layout.global_keys.items():
            flat_leaves[self._kinds[pos][1]] = values[key]
        self.flat_state = self.flat_spec_state.unflatten(flat_leaves)
        self._pp_state = None

    # --- stepping ---------------------------------------------------------------------------------------------

    def step(self, grads: Sequence[Tensor | None], ctx_fields: dict[str, Any] | None = None) -> None:
        """One donated step: parameters and state in place; ``None`` gradients skip their parameter.

        ``ctx_fields``: further :class:`~pureopt.base.UpdateContext` fields (GradScaler's ``grad_scale`` and
        ``found_inf``, handled by :func:`pureopt.adapters._amp.donated_step`)."""
        fields = ctx_fields or {}
        with torch.no_grad():
            if self.flattened and self._whole_groups(grads):
                flat_leaves = self._flat_leaves()
                if self.uniform or self._try_uniform(flat_leaves):
                    self._flat_step(grads, fields)
                    return
            self._per_param_step(list(grads), fields)

    def _whole_groups(self, grads: Sequence[Tensor | None]) -> bool:
        """Whether every flat group has all its gradients or none (then the flat step gives torch's semantics)."""
        if all(g is not None for g in grads):
            return True
        for group in self.flat.layout.groups:
            first = grads[group.indices[0]] is None
            if any((grads[i] is None) != first for i in group.indices):
                return False
        return True

    def _flat_step(self, grads: Sequence[Tensor | None], fields: dict[str, Any]) -> None:
        buffers = self.flat.buffers
        segments = [group.numels for group in self.flat.layout.groups]
        ctx = UpdateContext(self.flat_spec, donate=True, apply=True, segments=segments, **fields)
        flat_grads = self.flat.flat_grads(grads)
        if self.flat.any_detached:
            self.flat.load_params()
        new_state = donated_step(self.update, flat_grads, self.flat_state, list(buffers), ctx)
        if self.flat.any_detached:
            self.flat.store_params()
        old = self._flat_leaves()
        new = optree.tree_leaves(new_state, none_is_leaf=True)
        changed = False
        for fpos, (a, b) in enumerate(zip(old, new)):
            if a is b:
                continue
            if fpos in self._slice_fpos:
                a.copy_(b)  # keep the flat buffers the per-parameter views point at
                new[fpos] = a
            else:
                changed = True
        self.flat_state = self.flat_spec_state.unflatten(new)
        if changed:
            self._pp_state = None

    def _per_param_step(self, grads: list[Tensor | None], fields: dict[str, Any]) -> None:
        if self.flattened and self.uniform:
            self._split_scalars()
        state = self.per_param()
        params = list(self.flat.params)
        ctx = UpdateContext(self.pp_spec, donate=True, apply=True, **fields)
        new_state = donated_step(self.update, grads, state, params, ctx)
        if not self.flattened:
            self._pp_state = new_state
            return
        leaves = self.pp_layout.leaves(new_state)
        flat_leaves = self._flat_leaves()
        kept = True  # every parameter-shaped leaf is still its view (the donated kernels work in place)
        for pos, (kind, fpos) in enumerate(self._kinds):
            if kind == _SLICE and leaves[pos] is not self._slices[pos]:
                self._slices[pos].copy_(leaves[pos])
                kept = False
            elif kind == _SCALAR:
                self._scalars[pos] = leaves[pos]
            elif kind == _GLOBAL:
                flat_leaves[fpos] = leaves[pos]
        self.flat_state = self.flat_spec_state.unflatten(flat_leaves)
        self._pp_state = new_state if kept else None

    def _split_scalars(self) -> None:
        """Give every parameter its own 0-d leaves (a step is about to advance only some of them)."""
        flat_leaves = self._flat_leaves()
        self._scalars = {pos: flat_leaves[fpos].clone() for pos, fpos in self._by_kind(_SCALAR)}
        self.uniform = False
        self._pp_state = None

    def _try_uniform(self, flat_leaves: list[Any]) -> bool:
        """Share one 0-d leaf per group again if all parameters' are equal (reads them: one host sync).

        Writes the shared value into ``flat_leaves`` (the flat state's leaves, in place) and returns whether it did.
        """
        scalars = self._by_kind(_SCALAR)
        if scalars:
            by_flat: dict[int, list[int]] = {}
            for pos, fpos in scalars:
                by_flat.setdefault(fpos, []).append(pos)
            firsts = []
            same = []
            for fpos, positions in by_flat.items():
                values = torch.stack([self._scalars[pos].reshape(()) for pos in positions])
                same.append(torch.all(values == values[0]).reshape(1))
                firsts.append((fpos, positions[0]))
            if not bool(torch.cat(same).all()):
                return False
            for fpos, first in firsts:
                flat_leaves[fpos].copy_(self._scalars[first])
        self.uniform = True
        self._scalars = {}
        self._pp_state = None
        return True
