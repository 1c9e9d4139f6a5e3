"""Small helpers shared by the primitive transforms (internal)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, LeafList, UpdateContext, leaf_transformation
from pureopt.kernels.dtensor import run_on_local_shards
from pureopt.kernels.select import autograd_recording, differentiating
from pureopt.tree import PyTreeSpec, flatten_like

__all__ = [
    "present",
    "gather",
    "scatter",
    "new_count",
    "step_counts",
    "count_device",
    "kernel_transform",
    "zeros",
    "full",
    "copy_of",
    "state_dtype_for",
    "step_init",
]


def present(updates: Sequence[Any]) -> list[int]:
    """Indices of the leaves that have an update (``None`` gradients are skipped, torch-style)."""
    return [i for i, u in enumerate(updates) if u is not None]


def gather(xs: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    """``[xs[i] for i in idx]``."""
    return [xs[i] for i in idx]


def scatter(base: Sequence[Any], idx: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """A copy of ``base`` with ``values`` written at ``idx``."""
    out = list(base)
    for i, v in zip(idx, values):
        out[i] = v
    return out


def count_device(leaves: Sequence[Any]) -> torch.device:
    """Where a transform keeps its global counter: the device of the first tensor leaf (CPU if none)."""
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")


def new_count(leaves: Sequence[Any]) -> Tensor:
    """A fresh global update counter: a 0-d int64 tensor holding 0."""
    return torch.zeros((), dtype=torch.int64, device=count_device(leaves))


def step_dtype() -> torch.dtype:
    """The dtype of per-parameter step counts: torch.optim's (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_counts(leaves: Sequence[Any]) -> list[Tensor | None]:
    """One 0-d step counter per parameter (torch.optim's ``state['step']``), on the parameter's device."""
    return [None if p is None else torch.zeros((), dtype=step_dtype(), device=p.device) for p in leaves]


# --- the common shape of an algorithm transform ------------------------------------------------------------------

LeafInitFn = Callable[[Tensor], Tensor]
"""Builds one per-parameter state tensor from the parameter (e.g. ``torch.zeros_like``)."""

StepFn = Callable[
    [list[Tensor] | None, list[Tensor], dict[str, list[Tensor]], Tensor, UpdateContext],
    tuple[list[Tensor] | None, dict[str, list[Tensor]]],
]
"""``(params, grads, state_lists, num_updates, ctx) -> (updates, new_state_lists)`` over the present leaves.

With ``ctx.apply`` the step may add its updates to the parameters in place and return ``None`` updates."""


_COMPLEX_OF = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}


def state_dtype_for(p: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a per-parameter state buffer: the parameter's, or ``state_dtype`` (its complex counterpart of
    the same precision for a complex parameter)."""
    if state_dtype is None:
        return p.dtype
    if p.is_complex() and not state_dtype.is_complex:
        return _COMPLEX_OF.get(state_dtype, p.dtype)
    return state_dtype


def zeros(dtype: torch.dtype | None = None) -> LeafInitFn:
    """A state initialiser: zeros like the parameter, in ``dtype`` if given (see :func:`state_dtype_for`)."""
    return lambda p: torch.zeros_like(p, dtype=state_dtype_for(p, dtype))


def full(value: float, dtype: torch.dtype | None = None) -> LeafInitFn:
    """A state initialiser: ``value`` everywhere (real part for complex parameters), shaped like the parameter."""
    return lambda p: torch.full_like(p, value, dtype=state_dtype_for(p, dtype))


def copy_of(dtype: torch.dtype | None = None) -> LeafInitFn:
    """A state initialiser: a copy of the parameter (never an alias), in ``dtype`` if given."""
    return lambda p: p.to(dtype=state_dtype_for(p, dtype), copy=True)


def step_init(p: Tensor) -> Tensor:
    """A state initialiser: a 0-d step counter (torch.optim's ``state['step']``) on the parameter's device."""
    return torch.zeros((), dtype=step_dtype(), device=p.device)


def _leaf_args(ctx: UpdateContext, names: Sequence[str], idx: list[int], grads: list[Tensor]) -> dict[str, Any]:
    """``update``'s tree arguments ``names`` as lists over the leaves at ``idx`` (``None`` where not given), each
    checked to hold a tensor shaped like the gradient there."""
    out: dict[str, Any] = {}
    for name in names:
        tree = ctx.extra_args.get(name)
        if tree is None:
            out[name] = None
            continue
        values = gather(flatten_like(ctx.spec, tree, name, "the gradients"), idx)
        for i, value, g in zip(idx, values, grads):
            if not isinstance(value, Tensor) or value.shape != g.shape:
                got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                want = tuple(g.shape)
                raise ValueError(f"{name}: leaf {i} should be a tensor of the gradient's shape {want}, got {got}")
        out[name] = values
    return out


def kernel_transform(
    state_type: Callable[..., Any],
    fields: dict[str, LeafInitFn | None],
    step: StepFn,
    *,
    elementwise: bool = False,
    segmentwise: bool = False,
    global_fields: dict[str, Callable[[torch.device], Tensor]] | None = None,
    leaf_args: Sequence[str] = (),
) -> GradientTransformation:
    """An algorithm transform: per-parameter state fields plus a ``num_updates`` counter, stepped by a kernel.

    Args:
      state_type: the state NamedTuple; its fields are ``num_updates`` followed by ``fields``' keys.
      fields: per-parameter state fields and how to initialise each from its parameter; ``None`` means the
        field is not kept for these hyperparameters (stored as ``()``).
      step: runs the kernel on the leaves that have a gradient. It receives those parameters (or ``None``
        when ``update`` was called without params), gradients, the kept state fields as lists, the
        ``num_updates`` counter and the update context, and returns the updates and the new state lists (a
        field it does not return stays as it was).
      elementwise: the algorithm's math is elementwise (see :func:`pureopt.base.is_elementwise`).
      segmentwise: the step honours ``ctx.segments`` (see :func:`pureopt.base.is_segmentwise`); the context it
        receives then holds the segments of the leaves it is given (those with a gradient).
      global_fields: state kept once for the whole transformation (0-d tensors such as Prodigy's ``d``), made by
        ``init(device)`` on the counter's device; the step receives each as a tensor (not a list) among the state
        fields and may return a new value for it.
      leaf_args: keyword arguments of ``update`` that are trees like the gradients (Sophia's ``hessian``): the step
        finds each in ``ctx.extra_args`` as the list of its leaves at the leaves that have a gradient (``None``
        when not given); a tree of another structure raises a ValueError naming the argument.

    ``None`` gradients produce ``None`` updates and leave that parameter's state untouched.
    """
    kept = [name for name, init in fields.items() if init is not None]
    shared = dict(global_fields or {})

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> Any:
        values: dict[str, Any] = {name: init(count_device(leaves)) for name, init in shared.items()}
        for name, init in fields.items():
            if init is None:
                values[name] = ()
            else:
                values[name] = spec.unflatten([None if p is None else init(p) for p in leaves])
        return state_type(num_updates=new_count(leaves), **values)

    def update_leaves(
        updates: LeafList, state: Any, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, Any]:
        full_lists = {name: ctx.state_leaves(getattr(state, name)) for name in kept}
        idx = present(updates)
        sub = {name: gather(values, idx) for name, values in full_lists.items()}
        sub_params = gather(params, idx) if params is not None else None
        sub_grads = gather(updates, idx)
        diff = torch.is_grad_enabled() and autograd_recording(
            [*(sub_params or []), *sub_grads, *(t for values in sub.values() for t in values)]
        )
        step_ctx = ctx.but(streams=[ctx.streams[i] for i in idx] if ctx.streams is not None else idx)
        step_ctx = step_ctx if ctx.segments is None else step_ctx.but(segments=ctx.segments_of(idx))
        if leaf_args:
            step_ctx = step_ctx.but(extra_args={**ctx.extra_args, **_leaf_args(ctx, leaf_args, idx, sub_grads)})
        with differentiating(diff):
            args = (
                sub_params,
                sub_grads,
                {**sub, **{name: getattr(state, name) for name in shared}},
                state.num_updates,
                step_ctx,
            )
            # DTensors: an elementwise algorithm's math runs on their local shards
            new_updates, new_sub = run_on_local_shards(step, *args) if elementwise else step(*args)
        new_fields = {
            name: values if name in shared else ctx.spec.unflatten(scatter(full_lists[name], idx, values))
            for name, values in new_sub.items()
        }
        num_updates = state.num_updates + 1
        if ctx.found_inf is not None:  # a step skipped by GradScaler does not count (no host sync)
            num_updates = num_updates - ctx.found_inf.to(num_updates.device, torch.int64)
        new_state = state._replace(num_updates=num_updates, **new_fields)
        if new_updates is None:  # applied to the parameters in place
            return None, new_state
        return scatter([None] * len(updates), idx, new_updates), new_state

    return leaf_transformation(init_leaves, update_leaves, elementwise=elementwise, segmentwise=segmentwise)
