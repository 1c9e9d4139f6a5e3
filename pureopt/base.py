"""The pure core: gradient transformations, state records and ``apply_updates``.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = apply_updates(params, updates)

``update`` never mutates its inputs. Updates are *added* to the parameters (as in optax), so a descent step
returns ``-lr * direction``. A ``None`` gradient leaf produces a ``None`` update leaf and leaves that
parameter's state untouched (torch.optim's semantics for parameters whose ``.grad`` is ``None``).

Internally every transformation pureopt builds also exposes a *leaf-level* update over flat lists
(:class:`LeafUpdate`), so that :func:`pureopt.chain` flattens the gradient and parameter trees once per step
instead of once per transform. Transformations written by users with plain functions work everywhere too;
they are simply called with trees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeAlias

import torch

from pureopt import tree as _tree
from pureopt.tree import PyTreeSpec

__all__ = [
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "EmptyState",
    "UpdateContext",
    "LeafInit",
    "LeafUpdate",
    "leaf_transformation",
    "is_elementwise",
    "is_segmentwise",
    "as_leaf_update",
    "scaled_by",
    "takes_grad_factor",
    "mark_takes_grad_factor",
    "identity",
    "stateless",
    "set_to_zero",
    "apply_updates",
    "inplace_step",
]

Params: TypeAlias = Any
"""A pytree of tensors (a dict from ``named_parameters()``, a tuple, a NamedTuple, ...)."""
Updates: TypeAlias = Any
"""A pytree shaped like the parameters whose leaves are tensors or ``None``."""
OptState: TypeAlias = Any
"""An optimizer state: a NamedTuple (or a tuple / dict of NamedTuples) of tensors."""
Schedule: TypeAlias = Callable[[torch.Tensor | int], torch.Tensor | float]
"""A pure function from the step count (a 0-d tensor) to a value."""
ScalarOrSchedule: TypeAlias = float | torch.Tensor | Schedule
"""A hyperparameter given as a Python number, a 0-d tensor, or a schedule of the step count."""


class TransformInitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None, **extra_args) -> (updates, new_state)``."""

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer or building block: an ``(init, update)`` pair.

    Attributes:
      init: ``init(params) -> state``; builds the initial state from the parameters.
      update: ``update(updates, state, params=None, **extra_args) -> (updates, new_state)``; transforms the
        incoming updates (gradients for the first transform of a chain). Pure: inputs are never mutated.

    Example::

        tx = pureopt.adam(lr=1e-3)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


@dataclass(frozen=True)
class UpdateContext:
    """What a leaf-level update knows besides its flat inputs.

    Attributes:
      spec: the tree structure of the updates / parameters (``None`` leaves included).
      extra_args: keyword arguments passed to ``update`` (e.g. ``value_fn`` for L-BFGS).
      donate: the caller owns the state buffers and allows them to be overwritten in place (set by
        :func:`inplace_step` and the stateful adapters; the pure API never sets it). Gradients stay read-only
        even then: the adapters hand ``p.grad`` over without copying it.
      apply: the caller also allows the transformation to add its updates to the parameters in place (a
        fused kernel does it in the same pass). A transformation that did so returns ``None`` instead of the
        list of updates; one that did not returns its updates as usual and the caller adds them.
      grad_scale: ``torch.amp.GradScaler``'s loss scale (0-d float32 tensor): the gradients are *scaled* by it
        and the transformation must divide them by it. ``None``: the gradients are unscaled. torch's fused
        kernels write the unscaled gradients back (the one exception to read-only gradients, as in torch.optim
        with ``fused=True``, where ``p.grad`` is unscaled after ``scaler.step``).
      found_inf: 0-d float32 flag, ``1.0`` when some gradient holds an inf/NaN: the whole step must then be a
        no-op (parameters, per-parameter state and global counters unchanged), decided without a host sync
        where possible. ``None``: no check.
      segments: set when each leaf is a flat buffer holding several parameters one after the other (the
        flat-buffer layout): ``segments[i]`` are the element counts of the parameters in leaf ``i``, in order.
        A transformation with per-tensor math (norms, trust ratios) computes it per segment; only those that
        declare it (:func:`is_segmentwise`) are run this way. ``None``: every leaf is one parameter.
      streams: set on the lists a kernel gets (the leaves that have a gradient): each one's position among all
        the transformation's leaves, a per-tensor identity that does not depend on which leaves a call steps (a
        DDP bucket, one parameter in backward, a parameter without a gradient): stochastic rounding keys its
        random bits by it. ``None``: the lists' own positions.

      grad_factor: a 0-d tensor the gradients are to be multiplied by before anything reads them: a :func:`chain`
        folds a scaling transformation (``clip_by_global_norm``) into the next one this way, which multiplies
        each chunk of gradients as it reads it, so that the scaled gradients never exist whole. ``None``: none.

    ``grad_scale`` and ``found_inf`` are set only with ``donate=True``, by an adapter driven by GradScaler
    (:func:`pureopt.adapters._amp.donated_step`), and only for transformations registered as handling them
    (:func:`pureopt.kernels.fused.mark_amp_native`); any other transformation never sees them. ``grad_factor`` is
    set only for transformations that declare they take it (``LeafUpdate.takes_grad_factor``).
    """

    spec: PyTreeSpec
    extra_args: dict[str, Any] = field(default_factory=dict)
    donate: bool = False
    apply: bool = False
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    segments: Sequence[Sequence[int]] | None = None
    streams: Sequence[int] | None = None
    grad_factor: torch.Tensor | None = None

    def segments_of(self, indices: Sequence[int]) -> list[Sequence[int]] | None:
        """The segments of the leaves at ``indices`` (``None`` when the leaves are not flat buffers)."""
        return None if self.segments is None else [self.segments[i] for i in indices]

    def but(self, **changes: Any) -> UpdateContext:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def state_leaves(self, state_tree: Any) -> list[Any]:
        """Flatten a per-parameter state tree up to the update structure, naming the first mismatch."""
        return _tree.flatten_like(self.spec, state_tree, what="grads", against="the optimizer state")


LeafList: TypeAlias = list[Any]
LeafUpdateFn: TypeAlias = Callable[
    [LeafList, OptState, LeafList | None, UpdateContext], tuple[LeafList | None, OptState]
]
"""``update_leaves(updates, state, params, ctx) -> (new_updates, new_state)``; ``None`` updates: already applied."""


class LeafInit:
    """``init`` over a tree, implemented by a function of the flat leaves and the tree structure."""

    def __init__(self, init_leaves: Callable[[list[Any], PyTreeSpec], OptState]) -> None:
        self.init_leaves = init_leaves

    def __call__(self, params: Params) -> OptState:
        leaves, spec = _tree.flatten(params)
        return self.init_leaves(leaves, spec)


class LeafUpdate:
    """``update`` over trees, implemented by ``update_leaves(updates, state, params, ctx)`` over flat lists.

    ``updates`` is the list of update leaves (tensors or ``None``), ``params`` the list of parameter leaves or
    ``None``; the function returns ``(new_update_leaves, new_state)``.

    ``elementwise`` declares that each element's update depends only on that element's gradient, parameter and
    per-parameter state (plus global state and hyperparameters): then running the transformation on the
    concatenation of several leaves gives the same numbers as running it on the leaves (see :func:`is_elementwise`).
    ``segmentwise`` declares the weaker property that is enough when the runner says where the parameters sit in
    each leaf (``UpdateContext.segments``): the update is elementwise except for per-tensor reductions, which it
    then computes per segment (see :func:`is_segmentwise`). Elementwise implies segmentwise.

    Two optional declarations let :func:`pureopt.chain` fold a scaling step into the next one (no whole copy of
    the scaled gradients): ``grad_factor``, set on a transformation whose updates are its input times one 0-d
    factor, is ``grad_factor(updates, state, params, ctx) -> factor or None`` (its state must not change);
    ``takes_grad_factor`` declares that ``update_leaves`` honours ``UpdateContext.grad_factor`` on every path.
    """

    def __init__(self, update_leaves: LeafUpdateFn, *, elementwise: bool = False, segmentwise: bool = False) -> None:
        self.update_leaves = update_leaves
        self.elementwise = elementwise
        self.segmentwise = segmentwise or elementwise
        self.grad_factor: Callable[[LeafList, OptState, LeafList | None, UpdateContext], Any] | None = None
        self.takes_grad_factor = False

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        leaves, spec = _tree.flatten(updates)
        param_leaves = flatten_params_like(spec, updates, params)
        new_leaves, new_state = self.update_leaves(leaves, state, param_leaves, UpdateContext(spec, extra_args))
        assert new_leaves is not None  # only a context with apply=True may return None
        return spec.unflatten(new_leaves), new_state


def scaled_by(updates: LeafList, factor: torch.Tensor) -> LeafList:
    """The updates times a 0-d factor (``None`` leaves stay ``None``), each product in the update's dtype: what
    a scaling transformation makes, and what a step given ``UpdateContext.grad_factor`` reads."""
    return [None if u is None else u * factor.to(u.device, u.dtype) for u in updates]


def takes_grad_factor(tx: GradientTransformation) -> bool:
    """Whether ``tx`` honours ``UpdateContext.grad_factor`` (``LeafUpdate.takes_grad_factor``)."""
    return isinstance(tx.update, LeafUpdate) and tx.update.takes_grad_factor


def mark_takes_grad_factor(tx: GradientTransformation) -> GradientTransformation:
    """Declare that ``tx`` (a leaf-level transformation) honours ``UpdateContext.grad_factor``; returns ``tx``."""
    if not isinstance(tx.update, LeafUpdate):
        raise TypeError("only a leaf-level transformation (leaf_transformation) can take a gradient factor")
    tx.update.takes_grad_factor = True
    return tx


def flatten_params_like(spec: PyTreeSpec, updates: Updates, params: Params | None) -> LeafList | None:
    """The leaves of ``params``, after checking that they are structured like the updates."""
    if params is None:
        return None
    param_leaves, param_spec = _tree.flatten(params)
    if param_spec != spec:
        raise _tree.structure_error(params, updates, "grads", "the parameters")
    return param_leaves


def leaf_transformation(
    init_leaves: Callable[[list[Any], PyTreeSpec], OptState],
    update_leaves: LeafUpdateFn,
    *,
    elementwise: bool = False,
    segmentwise: bool = False,
) -> GradientTransformation:
    """Build a :class:`GradientTransformation` from functions over flat leaves.

    Args:
      init_leaves: ``(param_leaves, spec) -> state``.
      update_leaves: ``(update_leaves, state, param_leaves_or_None, ctx) -> (new_update_leaves, new_state)``.
      elementwise: whether the update is elementwise (see :class:`LeafUpdate`); ``False`` is always safe.
      segmentwise: whether it honours ``ctx.segments`` (see :class:`LeafUpdate`); ``False`` is always safe.
    """
    update = LeafUpdate(update_leaves, elementwise=elementwise, segmentwise=segmentwise)
    return GradientTransformation(LeafInit(init_leaves), update)


def is_elementwise(tx: GradientTransformation) -> bool:
    """Whether ``tx`` declares its update elementwise: each element of the update depends only on the same element
    of the gradient, the parameter and the per-parameter state (and on global state and hyperparameters).

    Such a transformation gives the same numbers on the concatenation of leaves as on the leaves themselves,
    which is what the flat-buffer layout (:func:`pureopt.flatten`, ``flat=True`` in the adapters) relies on.
    Per-parameter 0-d state (step counts) must then be the same for the concatenated leaves. Transformations
    written as plain functions, and those with per-tensor math (norms, trust ratios, factored moments,
    orthogonalisation, masks), are not elementwise.
    """
    return isinstance(tx.update, LeafUpdate) and tx.update.elementwise


def is_segmentwise(tx: GradientTransformation) -> bool:
    """Whether ``tx`` gives the same numbers on flat buffers as on the parameters when told the segments.

    That is, its update is elementwise except for per-tensor reductions (LAMB's and LARS's trust ratios,
    block-RMS clipping, global-norm clipping), which it computes per segment when ``UpdateContext.segments`` is
    set. The flat-buffer layout (``flat=True`` in the adapters, :func:`pureopt.flatten`) runs such a
    transformation on the flat buffers and passes the segments; every elementwise transformation is
    segmentwise too. Transformations whose math needs a tensor's shape (Adafactor's factored moments, Muon's
    orthogonalisation, row-wise clipping) or per-parameter masks are not.
    """
    return isinstance(tx.update, LeafUpdate) and tx.update.segmentwise


def as_leaf_update(
    tx: GradientTransformation,
) -> LeafUpdateFn:
    """The leaf-level update of ``tx``; a tree-level update (user code) is wrapped to take flat lists."""
    if isinstance(tx.update, LeafUpdate):
        return tx.update.update_leaves

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        tree_params = None if params is None else ctx.spec.unflatten(params)
        new_updates, new_state = tx.update(ctx.spec.unflatten(updates), state, tree_params, **ctx.extra_args)
        return _tree.flatten_like(ctx.spec, new_updates, "updates", "the incoming updates"), new_state

    return update_leaves


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged.

    Example::

        tx = pureopt.identity()
        updates, state = tx.update(grads, tx.init(params))  # updates is grads
    """

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        del params, ctx
        return updates, state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)


def stateless(fn: Callable[[Updates, Params | None], Updates]) -> GradientTransformation:
    """A transformation without state from ``fn(updates, params) -> new_updates`` over trees.

    Example::

        negate = pureopt.stateless(lambda u, p: pureopt.tree.tree_map(lambda x: None if x is None else -x, u))
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        del extra_args
        return fn(updates, params), state

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (``None`` stays ``None``): parameters do not move.

    Used with :func:`pureopt.partition` to freeze part of a model.
    """

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        del params, ctx
        return [None if u is None else torch.zeros_like(u) for u in updates], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates``, each leaf cast back to its parameter's dtype.

    A ``None`` update leaves its parameter as it is (the same tensor object). Nothing is mutated.

    Args:
      params: a pytree of tensors.
      updates: a pytree of the same structure, tensors or ``None``.

    Example::

        params = pureopt.apply_updates(params, updates)
    """
    param_leaves, spec = _tree.flatten(params)
    update_leaves = _tree.flatten_like(spec, updates, what="updates", against="the parameters")
    return spec.unflatten(_add_leaves(param_leaves, update_leaves))


def _add_leaves(params: Sequence[Any], updates: Sequence[Any]) -> list[Any]:
    out = []
    for p, u in zip(params, updates):
        if u is None or p is None:
            out.append(p)
        else:
            new = p + u
            out.append(new if new.dtype == p.dtype else new.to(p.dtype))
    return out


def inplace_step(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params, **extra_args: Any
) -> OptState:
    """One optimizer step that *donates* its buffers: ``params`` are updated in place, the state is reused.

    Equivalent to ``updates, state = tx.update(grads, state, params); params += updates`` but allowed to
    overwrite the buffers of ``state`` and to run torch's fused in-place kernels (e.g.
    ``torch._fused_adam_`` updates parameters, moments and step counts in one pass). The returned state
    shares its tensors with ``state``: the old state must not be used afterwards. This is what the stateful
    adapters run; call it yourself only when you own all three trees.

    Args:
      tx: the transformation.
      grads: gradients shaped like ``params`` (``None`` leaves are skipped); read only.
      state: the current state; its buffers are overwritten.
      params: the parameters, updated in place (under ``torch.no_grad()``).
      **extra_args: passed on as ``update``'s (e.g. L-BFGS's ``value_fn``).

    Returns:
      The new state.

    Example::

        state = pureopt.inplace_step(tx, grads, state, params)
    """
    leaves, spec = _tree.flatten(grads)
    param_leaves = flatten_params_like(spec, grads, params)
    assert param_leaves is not None
    ctx = UpdateContext(spec, extra_args, donate=True, apply=True)
    with torch.no_grad():
        updates, new_state = as_leaf_update(tx)(leaves, state, param_leaves, ctx)
        if updates is not None:
            add_inplace(param_leaves, updates)
    return new_state


def add_inplace(params: Sequence[Any], updates: Sequence[Any]) -> None:
    """``p += u`` for every pair with an update (cast to the parameter's dtype), in one foreach call per dtype."""
    pairs = [(p, u) for p, u in zip(params, updates) if u is not None and p is not None]
    same = [(p, u) for p, u in pairs if p.dtype == u.dtype and p.device == u.device and not p.is_sparse]
    other = [(p, u) for p, u in pairs if not (p.dtype == u.dtype and p.device == u.device and not p.is_sparse)]
    if same:
        torch._foreach_add_([p for p, _ in same], [u for _, u in same])
    for p, u in other:
        p.add_(u.to(device=p.device, dtype=p.dtype))
