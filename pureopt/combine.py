"""Combining transformations: ``chain``, ``named_chain``, ``partition``, ``masked`` and ``freeze``.

Every combinator here is built on the leaf-level protocol (:func:`pureopt.base.leaf_transformation`): the
gradient and parameter trees are flattened once per step, however deeply combinators are nested, and the
children are called through :func:`pureopt.base.as_leaf_update`.

**Sub-trees.** :func:`partition` and :func:`masked` hand each inner transformation only some of the leaves.
The inner transformation sees the original tree in which every largest sub-tree of leaves it does not own is
replaced by one :class:`MaskedNode` (an empty node: it has no leaves, so no state is allocated for it and nothing
is computed for it). Paths are kept: the inner state of ``partition({"decay": adamw(...), "no_decay":
adam(...)}, labels)`` has ``exp_avg["layer.weight"]`` exactly where a plain ``adamw`` would, and
``MaskedNode()`` where a parameter (or a whole sub-tree of parameters) belongs to another label.

**Apply and donate.** When the caller allows in-place application (``ctx.apply``), only the last transformation
of a chain may use it; inner transformations of ``partition`` and ``masked`` always return their updates.
Buffer donation (``ctx.donate``) is passed on.

**Labels and masks** are given as a tree (shaped like the parameters, or a prefix of that shape: one label for a
whole sub-tree) or as a function of the parameters returning such a tree. They are resolved from the
structure, with Python values (strings, bools), never from tensor values, so the combinators trace under
``torch.compile(fullgraph=True)`` and work under ``torch.func.vmap``. A function is called with the
parameters (with the updates when ``update`` is called without parameters) at ``init`` and at every ``update``;
it must give the same answer each time, i.e. depend only on names, shapes and structure.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from pureopt import tree as _tree
from pureopt.base import (
    EmptyState,
    GradientTransformation,
    LeafList,
    OptState,
    UpdateContext,
    as_leaf_update,
    is_elementwise,
    is_segmentwise,
    leaf_transformation,
    mark_takes_grad_factor,
    scaled_by,
    set_to_zero,
    takes_grad_factor,
)
from pureopt.tree import PyTreeSpec

__all__ = [
    "chain",
    "named_chain",
    "MaskedNode",
    "MaskedState",
    "PartitionState",
    "partition",
    "masked",
    "freeze",
    "set_to_none",
    "inner_context",
    "returned",
    "sub_spec",
    "restrict",
]

LeafUpdateFn = Callable[[LeafList, OptState, LeafList | None, UpdateContext], tuple[Any, OptState]]


def inner_context(
    ctx: UpdateContext, spec: PyTreeSpec | None = None, *, allow_apply: bool = False, allow_donate: bool = True
) -> UpdateContext:
    """The context handed to an inner transformation.

    Args:
      ctx: the combinator's own context.
      spec: the inner tree structure (default: the same as ``ctx.spec``).
      allow_apply: let the inner transformation add its updates to the parameters in place when the caller
        allows it (``ctx.apply``); only the last transformation of a chain may.
      allow_donate: pass ``ctx.donate`` on; a wrapper that may still need the old state or gradients (to
        select between two outcomes) passes ``False``.
    """
    changes: dict[str, Any] = {}
    if ctx.grad_factor is not None:  # (handed on only where the inner takes it: see _run_chain, _with_factor)
        changes["grad_factor"] = None
    if spec is not None and spec is not ctx.spec:
        changes["spec"] = spec
        if ctx.segments is not None:  # other leaves: the flat segments no longer describe them
            changes["segments"] = None
    if not allow_apply and getattr(ctx, "apply", False):
        changes["apply"] = False
    if not allow_donate and ctx.donate:
        changes["donate"] = False
    return dataclasses.replace(ctx, **changes) if changes else ctx


def _check_transform(tx: Any, where: str) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{where} is a {type(tx).__name__}, not a GradientTransformation")


def _own_updates(updates: LeafList | None, n: int, ctx: UpdateContext) -> LeafList:
    """An inner transformation's updates of its ``n`` leaves; ``None`` each where it stepped its parameters in
    place (allowed where ``ctx.apply``: nothing is left for the caller to add for them)."""
    if updates is None and getattr(ctx, "apply", False):
        return [None] * n
    return returned(updates)


def returned(updates: LeafList | None) -> LeafList:
    """The updates an inner transformation returned (it was not allowed to apply them in place)."""
    if updates is None:
        raise RuntimeError("an inner transformation applied its updates in place although it was not allowed to")
    return updates


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is the tuple of their states.

    The gradient and parameter trees are flattened once per step for the whole chain. A scaling step followed by
    an optimizer (``chain(clip_by_global_norm(1.0), adamw(...))``) is folded into the optimizer's step, which
    scales each chunk of gradients as it reads it (no whole copy of the clipped gradients; the same numbers).

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
        updates: LeafList | None, state: tuple[OptState, ...], params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, tuple[OptState, ...]]:
        if not isinstance(state, tuple) or len(state) != len(updates_fns):
            got = f"a tuple of {len(state)} states" if isinstance(state, tuple) else f"a {type(state).__name__}"
            raise ValueError(f"chain of {len(updates_fns)} transformations got {got}")
        updates, new_states = _run_chain(transforms, updates_fns, list(state), updates, params, ctx)
        return updates, tuple(new_states)

    return _sequence(init_leaves, update_leaves, transforms)


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with each transformation named; the state is a dict from name to state.

    Names make a state easy to read and edit (``state["adam"].exp_avg``) and stable when steps are added.

    Args:
      *transforms: ``(name, transformation)`` pairs, in the order they are applied; names are unique strings.

    Example::

        tx = named_chain(("clip", pureopt.clip_by_global_norm(1.0)), ("adam", pureopt.adam(lr=1e-3)))
        state = tx.init(params)
        state["adam"].exp_avg  # the first moments
    """
    names: list[str] = []
    fns: list[LeafUpdateFn] = []
    txs: list[GradientTransformation] = []
    for i, item in enumerate(transforms):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"named_chain: argument {i} must be a (name, transformation) pair with a str name")
        name, tx = item
        _check_transform(tx, f"named_chain: transformation {name!r}")
        if name in names:
            raise ValueError(f"named_chain: the name {name!r} is used twice")
        names.append(name)
        txs.append(tx)
        fns.append(as_leaf_update(tx))

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> dict[str, OptState]:
        params = spec.unflatten(leaves)
        return {name: tx.init(params) for name, tx in zip(names, txs)}

    def update_leaves(
        updates: LeafList | None, state: dict[str, OptState], params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, dict[str, OptState]]:
        _check_keys(state, names, "named_chain")
        updates, new_states = _run_chain(txs, fns, [state[name] for name in names], updates, params, ctx)
        return updates, dict(zip(names, new_states))

    return _sequence(init_leaves, update_leaves, txs)


def _sequence(
    init_leaves: Callable[[list[Any], PyTreeSpec], OptState], update_leaves: Any, txs: Sequence[GradientTransformation]
) -> GradientTransformation:
    """A chain's transformation: elementwise / segmentwise where all of ``txs`` are; takes a gradient factor."""
    return mark_takes_grad_factor(
        leaf_transformation(
            init_leaves,
            update_leaves,
            elementwise=all(is_elementwise(t) for t in txs),
            segmentwise=all(is_segmentwise(t) for t in txs),
        )
    )


def _run_chain(
    txs: Sequence[GradientTransformation],
    fns: Sequence[LeafUpdateFn],
    states: list[OptState],
    updates: LeafList | None,
    params: LeafList | None,
    ctx: UpdateContext,
) -> tuple[LeafList | None, list[OptState]]:
    """The transformations one after the other (only the last may apply in place). A scaling transformation
    (``LeafUpdate.grad_factor``: ``clip_by_global_norm``) followed by one that takes a gradient factor
    (``LeafUpdate.takes_grad_factor``: the algorithms) is folded into it: the next step multiplies each chunk of
    the gradients as it reads it, so that the scaled gradients are never made whole (4 bytes/param for float32);
    the numbers are the same (the same products, read where they are needed)."""
    new_states: list[OptState] = []
    last = len(fns) - 1
    factor: torch.Tensor | None = None
    if ctx.grad_factor is not None:  # (this chain is itself folded into: its first step takes the factor, or not)
        if txs and takes_grad_factor(txs[0]):
            factor = ctx.grad_factor
        else:
            updates = scaled_by(returned(updates), ctx.grad_factor)
    for i, (tx, fn, sub_state) in enumerate(zip(txs, fns, states)):
        inner = inner_context(ctx, allow_apply=i == last)
        scaling = getattr(tx.update, "grad_factor", None)
        following = txs[i + 1] if i < last else None
        if scaling is not None and factor is None and following is not None and takes_grad_factor(following):
            factor = scaling(returned(updates), sub_state, params, inner)
            new_states.append(sub_state)  # (a scaling transformation's state does not change)
            continue
        if factor is not None:
            inner = inner.but(grad_factor=factor)
            factor = None
        updates, new_sub = fn(returned(updates), sub_state, params, inner)
        new_states.append(new_sub)
    return updates, new_states


def _with_factor(
    tx: GradientTransformation, updates: LeafList, sub_ctx: UpdateContext, factor: torch.Tensor | None
) -> tuple[LeafList, UpdateContext]:
    """An inner transformation's updates and context given a folded gradient factor: handed on where it takes
    it, else applied to its updates first."""
    if factor is None:
        return updates, sub_ctx
    if takes_grad_factor(tx):
        return updates, sub_ctx.but(grad_factor=factor)
    return scaled_by(updates, factor), sub_ctx


def _check_keys(state: Any, expected: list[Any], who: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{who} expects its state to be a dict of inner states, got a {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append("no state for " + ", ".join(repr(k) for k in missing))
        if extra:
            parts.append("unexpected state for " + ", ".join(repr(k) for k in extra))
        raise ValueError(f"{who}: the state does not match the transformations: {'; '.join(parts)}")


# --- sub-trees ------------------------------------------------------------------------------------------------


class MaskedNode(NamedTuple):
    """Stands for parameters that belong to another transformation (see :func:`partition`, :func:`masked`).

    It replaces a leaf, or a whole sub-tree whose leaves all belong elsewhere. It is an empty node, so it has no
    leaves: an inner transformation allocates no state for it and its tree functions skip it. It is a
    NamedTuple, hence a pytree for optree and for ``torch.utils._pytree``.
    """


class PartitionState(NamedTuple):
    """State of :func:`partition`.

    Attributes:
      inner_states: the state of each inner transformation, by label. Each is shaped like the parameters with
        :class:`MaskedNode` in place of the parameters that carry another label.
    """

    inner_states: dict[Any, OptState]


class MaskedState(NamedTuple):
    """State of :func:`masked`.

    Attributes:
      inner_state: the inner transformation's state, shaped like the parameters with :class:`MaskedNode` in
        place of the masked-out parameters.
    """

    inner_state: OptState


LabelTree = Any | Callable[[Any], Any]
"""A tree of labels shaped like the parameters (or a prefix of that shape), or a function ``params -> tree``."""


class _Slot:
    """A placeholder leaf carrying its index.

    Placeholders are objects, not Python constants: while tracing, dynamo (torch 2.13 with optree 0.20) fails to
    flatten or unflatten a dict whose children are all Python constants (it constant-folds optree's dict
    (un)flatten function and loses its ``DictMetaData``). For the same reason a sub-tree that is masked out as a
    whole becomes one :class:`MaskedNode` instead of a dict of them.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_KEEP = _Slot(-1)


def _resolve_leaves(value_or_fn: Any, spec: PyTreeSpec, source: LeafList, what: str) -> list[Any]:
    """One label (or mask bool) per leaf of ``spec``; ``value_or_fn`` may be a prefix tree or a function.

    The labels tree is walked against ``spec`` with plain Python (no flattening of the labels tree itself), so
    this also runs while dynamo traces an update.
    """
    value = value_or_fn(spec.unflatten(source)) if callable(value_or_fn) else value_or_fn
    out: list[Any] = []
    if not _broadcast(spec, value, out):
        raise _tree.structure_error(spec.unflatten(source), value, what, "the parameters")
    return out


def _is_container(value: Any, node_type: Any) -> bool:
    return isinstance(value, (dict, list, tuple)) or (node_type is not None and type(value) is node_type)


def _broadcast(spec: PyTreeSpec, value: Any, out: list[Any]) -> bool:
    """Append the label of every leaf under ``spec``; False if ``value`` does not fit (neither prefix nor equal)."""
    node_type = None if spec.is_leaf() else spec.type
    if not _is_container(value, node_type):
        out.extend([value] * spec.num_leaves)
        return True
    if node_type is None:
        return False
    entries = spec.entries()
    children = spec.children()
    if issubclass(node_type, dict):
        if not isinstance(value, Mapping) or len(value) != len(entries) or any(e not in value for e in entries):
            return False
        sub_values = [value[e] for e in entries]
    elif issubclass(node_type, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(entries):
            return False
        sub_values = [value[e] for e in entries]
    else:  # a custom pytree node: the labels must use the same node type
        if type(value) is not node_type:
            return False
        custom: Any = value
        sub_values = list(optree.tree_flatten_one_level(custom, none_is_leaf=True)[0])
        if len(sub_values) != len(children):
            return False
    return all(_broadcast(child, sub, out) for child, sub in zip(children, sub_values))


def restricted_context(ctx: UpdateContext, keep: list[bool], allow_apply: bool = False) -> UpdateContext:
    """The context of an inner transformation that owns the leaves where ``keep`` is True (:func:`partition`,
    :func:`masked`): its structure is :func:`sub_spec`, and every keyword argument of ``update`` that is a tree of
    tensors shaped like the updates (Sophia's ``hessian``) is cut to the same leaves (other arguments, such as
    L-BFGS's ``value_fn``, pass on whole). ``allow_apply``: as for :func:`inner_context` (the inner owns its
    parameters alone: it may step them in place where the caller allows)."""
    inner = inner_context(ctx, sub_spec(ctx.spec, keep), allow_apply=allow_apply)
    if all(keep) or not ctx.extra_args:
        return inner
    args = dict(ctx.extra_args)
    for name, value in ctx.extra_args.items():
        leaves, spec = _tree.flatten(value)
        if spec == ctx.spec and all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves):
            args[name] = restrict(ctx.spec, leaves, keep)
    return inner.but(extra_args=args)


def sub_spec(spec: PyTreeSpec, keep: list[bool]) -> PyTreeSpec:
    """The structure an inner transformation sees when it owns the leaves of ``spec`` where ``keep`` is True.

    Every maximal sub-tree whose leaves are all not kept is replaced by one :class:`MaskedNode`; the kept
    leaves keep their paths.
    """
    if all(keep):
        return spec
    return _tree.flatten(restrict(spec, [_KEEP] * spec.num_leaves, keep))[1]


def restrict(spec: PyTreeSpec, leaves: LeafList, keep: list[bool]) -> Any:
    """The tree ``spec.unflatten(leaves)`` with every maximal sub-tree of not-kept leaves replaced by a MaskedNode."""
    if all(keep):
        return spec.unflatten(leaves)
    return _restrict(spec, spec.unflatten(leaves), keep, 0)


def _restrict(spec: PyTreeSpec, node: Any, keep: list[bool], start: int) -> Any:
    flags = keep[start : start + spec.num_leaves]
    if not any(flags):
        return MaskedNode()
    if all(flags):
        return node
    # a container with kept and not-kept leaves below it (a leaf is either kept or not)
    node_type = spec.type
    children = spec.children()
    if node_type is not None and issubclass(node_type, (dict, list, tuple)):
        entries = spec.entries()
        new_children = []
        offset = start
        for child_spec, entry in zip(children, entries):
            new_children.append(_restrict(child_spec, node[entry], keep, offset))
            offset += child_spec.num_leaves
        rebuilt = _rebuild(node, entries, new_children)
        if rebuilt is not None:
            return rebuilt
    # another node type: mask leaf by leaf inside it
    return spec.unflatten([leaf if k else MaskedNode() for leaf, k in zip(spec.flatten_up_to(node), flags)])


def _rebuild(node: Any, entries: list[Any], children: list[Any]) -> Any:
    """A container like ``node`` holding ``children`` at ``entries``; ``None`` if the type is not handled here."""
    node_type = type(node)
    if node_type is dict:
        return dict(zip(entries, children))
    if node_type is collections.OrderedDict:
        return collections.OrderedDict(zip(entries, children))
    if node_type is collections.defaultdict:
        return collections.defaultdict(node.default_factory, zip(entries, children))
    if node_type is list:
        return children
    if node_type is tuple:
        return tuple(children)
    if isinstance(node, tuple) and hasattr(node_type, "_fields"):  # a NamedTuple
        return node_type(*children)
    return None


def _path_of(spec: PyTreeSpec, index: int) -> str:
    return _tree.format_path(spec.paths()[index])


def partition(transforms: Mapping[Hashable, GradientTransformation], labels: LabelTree) -> GradientTransformation:
    """Apply a different transformation to each group of parameters, chosen by a label per parameter.

    This is how per-parameter options are written: no weight decay on biases and norm weights, a smaller
    learning rate for a pretrained backbone, frozen layers (``set_to_zero()``). Each inner transformation sees
    only the parameters with its label (the others are :class:`MaskedNode`), so its state is allocated only
    for them; paths are kept, so its state is keyed like the parameters.

    Rule: for every parameter ``i``, ``u_i <- transforms[labels_i](u restricted to label labels_i)_i``.

    Args:
      transforms: a transformation per label.
      labels: a tree of labels shaped like the parameters (or a prefix of that shape: one label for a whole
        sub-tree), or a function ``params -> that tree``. Labels are Python values (e.g. strings), not tensors.

    Raises:
      ValueError: a label that has no transformation, or a transformation that no parameter is labelled for,
        naming it (at ``init`` and at ``update``).

    Example (torch.optim's param_groups ``[{"params": weights}, {"params": biases, "weight_decay": 0}]``)::

        labels = lambda params: {k: "no_decay" if k.endswith("bias") else "decay" for k in params}
        tx = partition({"decay": pureopt.adamw(1e-3, weight_decay=0.1),
                        "no_decay": pureopt.adamw(1e-3, weight_decay=0.0)}, labels)
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("partition: transforms must be a non-empty dict from label to GradientTransformation")
    keys = list(transforms)
    for key in keys:
        _check_transform(transforms[key], f"partition: transforms[{key!r}]")
    fns = {key: as_leaf_update(transforms[key]) for key in keys}

    def label_leaves(spec: PyTreeSpec, source: LeafList) -> list[Any]:
        leaf_labels = _resolve_leaves(labels, spec, source, "labels")
        for i, label in enumerate(leaf_labels):
            try:
                known = label in transforms
            except TypeError:
                raise TypeError(
                    f"partition: the label at {_path_of(spec, i)} is a {type(label).__name__}, which is not hashable"
                ) from None
            if not known:
                raise ValueError(
                    f"partition: no transformation for label {label!r} (parameter {_path_of(spec, i)}); "
                    f"transformations are given for {', '.join(repr(k) for k in keys)}"
                )
        unused = [key for key in keys if not any(label == key for label in leaf_labels)]
        if unused:
            raise ValueError(f"partition: no parameter is labelled {unused[0]!r}, but a transformation is given for it")
        return leaf_labels

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> PartitionState:
        leaf_labels = label_leaves(spec, leaves)
        inner = {}
        for key in keys:
            keep = [label == key for label in leaf_labels]
            inner[key] = transforms[key].init(restrict(spec, leaves, keep))
        return PartitionState(inner)

    def update_leaves(
        updates: LeafList, state: PartitionState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, PartitionState]:
        if not isinstance(state, PartitionState):
            raise ValueError(f"partition expects a PartitionState, got a {type(state).__name__}")
        _check_keys(state.inner_states, keys, "partition")
        leaf_labels = label_leaves(ctx.spec, params if params is not None else updates)
        out: list[Any] = list(updates)
        new_inner = {}
        for key in keys:
            idx = [i for i, label in enumerate(leaf_labels) if label == key]
            keep = [label == key for label in leaf_labels]
            sub_ctx = restricted_context(ctx, keep, allow_apply=True)
            mine, sub_ctx = _with_factor(transforms[key], [updates[i] for i in idx], sub_ctx, ctx.grad_factor)
            sub_updates, new_inner[key] = fns[key](
                mine, state.inner_states[key], None if params is None else [params[i] for i in idx], sub_ctx
            )
            for i, u in zip(idx, _own_updates(sub_updates, len(idx), ctx)):
                out[i] = u
        return out, PartitionState(new_inner)

    return mark_takes_grad_factor(leaf_transformation(init_leaves, update_leaves))


def _mask_leaves(mask: LabelTree, spec: PyTreeSpec, source: LeafList, who: str) -> list[bool]:
    leaves = _resolve_leaves(mask, spec, source, "mask")
    for i, m in enumerate(leaves):
        if not isinstance(m, bool):
            raise TypeError(
                f"{who}: mask leaves must be Python bools, got a {type(m).__name__} at {_path_of(spec, i)} "
                "(a mask is structural: it must not depend on tensor values)"
            )
    return leaves


def masked(inner: GradientTransformation, mask: LabelTree) -> GradientTransformation:
    """Apply ``inner`` to the parameters where ``mask`` is True; the other updates pass through unchanged.

    ``inner`` sees only the selected parameters (the others are :class:`MaskedNode`): no state is allocated
    for masked-out parameters and nothing is computed for them.

    Rule: ``u_i <- inner(u restricted to the mask)_i`` where ``mask_i``, else ``u_i`` as it came in.

    Args:
      inner: the transformation to apply to the selected parameters.
      mask: a tree of Python bools shaped like the parameters (or a prefix of that shape), or a function
        ``params -> that tree``.

    Example (weight decay on matrices only)::

        tx = pureopt.chain(
            pureopt.scale_by_adam(),
            masked(pureopt.add_decayed_weights(0.1), lambda p: {k: v.ndim > 1 for k, v in p.items()}),
            pureopt.scale_by_learning_rate(1e-3),
        )
    """
    _check_transform(inner, "masked: inner")
    fn = as_leaf_update(inner)

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> MaskedState:
        keep = _mask_leaves(mask, spec, leaves, "masked")
        return MaskedState(inner.init(restrict(spec, leaves, keep)))

    def update_leaves(
        updates: LeafList, state: MaskedState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, MaskedState]:
        if not isinstance(state, MaskedState):
            raise ValueError(f"masked expects a MaskedState, got a {type(state).__name__}")
        keep = _mask_leaves(mask, ctx.spec, params if params is not None else updates, "masked")
        idx = [i for i, k in enumerate(keep) if k]
        sub_ctx = restricted_context(ctx, keep, allow_apply=True)
        mine, sub_ctx = _with_factor(inner, [updates[i] for i in idx], sub_ctx, ctx.grad_factor)
        sub_updates, new_inner = fn(
            mine, state.inner_state, None if params is None else [params[i] for i in idx], sub_ctx
        )
        out = list(updates)  # (the others pass through as they came in: scaled, where a factor was folded in)
        if ctx.grad_factor is not None:
            rest = [i for i, k in enumerate(keep) if not k]
            for i, u in zip(rest, scaled_by([updates[i] for i in rest], ctx.grad_factor)):
                out[i] = u
        for i, u in zip(idx, _own_updates(sub_updates, len(idx), ctx)):
            out[i] = u
        return out, MaskedState(new_inner)

    return mark_takes_grad_factor(leaf_transformation(init_leaves, update_leaves))


def set_to_none() -> GradientTransformation:
    """Replace every update by ``None``: the parameters are treated as if they had no gradient.

    Transformations applied after it skip those parameters entirely (no state advance, no weight decay), as
    torch.optim does for a parameter whose ``.grad`` is ``None``, and :func:`pureopt.apply_updates` returns
    them as they are. ``None`` cannot be an output of ``torch.func.vmap``; use :func:`pureopt.set_to_zero`
    there.

    Example::

        tx = pureopt.chain(masked(set_to_none(), frozen_mask), pureopt.adamw(1e-3))
    """

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        del params, ctx
        return [None] * len(updates), state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)


def freeze(mask: LabelTree, *, use_none: bool = False) -> GradientTransformation:
    """Freeze the parameters where ``mask`` is True: their updates become zeros (or ``None``).

    ``freeze(mask)`` is ``masked(set_to_zero(), mask)``. Zeros are the default because they work everywhere:
    under ``torch.func.vmap`` (which cannot return ``None``), under ``torch.compile``, and at any position in
    a chain. Put it **last** in the chain, so that whatever the optimizer computed for a frozen parameter
    (momentum, decoupled weight decay) is replaced by zeros: ``chain(adamw(...), freeze(mask))``. Placed
    first, zero gradients would still be fed to the optimizer, whose weight decay and momentum would move
    the parameter.

    With ``use_none=True`` the updates become ``None`` instead: placed **first** in a chain, the optimizer then
    treats the frozen parameters as torch.optim treats parameters whose ``.grad`` is ``None`` (skipped: no
    state advance, no weight decay), and :func:`pureopt.apply_updates` returns them as the same tensor objects.
    This is cheaper but cannot run under ``vmap``.

    Either way the optimizer after or before ``freeze`` still allocates state for the frozen parameters; to
    allocate none, use :func:`partition` with ``set_to_zero()`` for the frozen label.

    Args:
      mask: a tree of Python bools (True = frozen) shaped like the parameters (or a prefix), or a function
        ``params -> that tree``.
      use_none: return ``None`` updates for frozen parameters instead of zeros.

    Example::

        tx = pureopt.chain(pureopt.adamw(1e-3), freeze({"backbone": True, "head": False}))
    """
    return masked(set_to_none() if use_none else set_to_zero(), mask)
