"""Pytree helpers over optree.

pureopt flattens trees with ``none_is_leaf=True`` so that a ``None`` gradient keeps its place: a grads tree
``{"w": g, "b": None}`` has the same structure as the params tree ``{"w": w, "b": b}``. Every container that
``torch.func`` produces or consumes is a pytree here: dicts (``dict(model.named_parameters())``), OrderedDicts,
lists, tuples and NamedTuples.

Structure mismatches raise a :class:`ValueError` that names the first differing path, e.g.::

    ValueError: grads do not match the optimizer state: at ['layer.bias'] grads has no entry ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from optree import PyTreeSpec

__all__ = [
    "PyTreeSpec",
    "flatten",
    "leaves",
    "tree_map",
    "tree_paths",
    "unflatten",
    "check_same_structure",
    "flatten_like",
    "tree_zeros_like",
    "tree_full_like",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_vdot",
    "tree_l2_norm",
    "tree_cast",
    "tree_clone",
    "format_path",
]


def flatten(tree: Any) -> tuple[list[Any], PyTreeSpec]:
    """Flatten ``tree`` into ``(leaves, spec)``; ``None`` counts as a leaf."""
    return optree.tree_flatten(tree, none_is_leaf=True)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in flattening order; ``None`` counts as a leaf."""
    return optree.tree_leaves(tree, none_is_leaf=True)


def unflatten(spec: PyTreeSpec, leaves_: Sequence[Any]) -> Any:
    """Rebuild a tree of structure ``spec`` from ``leaves_``."""
    return spec.unflatten(leaves_)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Map ``fn`` over the leaves of ``tree`` (and the matching leaves of ``rest``); ``None`` is a leaf."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=True)


def tree_paths(tree: Any) -> list[tuple[Any, ...]]:
    """The path of every leaf of ``tree``, in flattening order."""
    return optree.tree_paths(tree, none_is_leaf=True)


def format_path(path: Sequence[Any]) -> str:
    """Render a path as ``['layer.weight'][0]``; the root is ``<root>``."""
    if not path:
        return "<root>"
    return "".join(f"[{entry!r}]" for entry in path)


def _describe(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        return f"a tensor of shape {tuple(node.shape)}"
    if node is None:
        return "None"
    return f"a {type(node).__name__}"


def _children(node: Any) -> tuple[list[Any], list[Any], Any] | None:
    """``(entries, children, node_type)`` for a container node, ``None`` for a leaf."""
    if node is None or isinstance(node, torch.Tensor):
        return None
    if optree.treespec_is_leaf(optree.tree_structure(node, none_is_leaf=True)):
        return None
    children, _, entries = optree.tree_flatten_one_level(node, none_is_leaf=True)[:3]
    return list(entries), list(children), type(node)


def first_difference(reference: Any, other: Any) -> tuple[tuple[Any, ...], str] | None:
    """The first path at which ``other``'s structure differs from ``reference``'s, with a description.

    Leaves compare equal whatever they are (a ``None`` gradient matches a tensor parameter).
    """
    stack: list[tuple[tuple[Any, ...], Any, Any]] = [((), reference, other)]
    while stack:
        path, ref, oth = stack.pop(0)
        ref_c, oth_c = _children(ref), _children(oth)
        if ref_c is None and oth_c is None:
            continue
        if ref_c is None or oth_c is None:
            return path, f"expected {_describe(ref)} but got {_describe(oth)}"
        ref_entries, ref_children, ref_type = ref_c
        oth_entries, oth_children, oth_type = oth_c
        if ref_type is not oth_type and not (issubclass(ref_type, dict) and issubclass(oth_type, dict)):
            return path, f"expected a {ref_type.__name__} but got a {oth_type.__name__}"
        if ref_entries != oth_entries:
            missing = [e for e in ref_entries if e not in oth_entries]
            extra = [e for e in oth_entries if e not in ref_entries]
            if missing:
                return (*path, missing[0]), "is missing"
            if extra:
                return (*path, extra[0]), "is unexpected"
            return path, f"has {len(oth_entries)} entries where {len(ref_entries)} were expected"
        for entry, rc, oc in zip(ref_entries, ref_children, oth_children):
            stack.append(((*path, entry), rc, oc))
    return None


def check_same_structure(reference: Any, other: Any, what: str, against: str) -> None:
    """Raise a ValueError naming the first differing path if ``other`` is not shaped like ``reference``."""
    ref_spec = optree.tree_structure(reference, none_is_leaf=True)
    oth_spec = optree.tree_structure(other, none_is_leaf=True)
    if ref_spec == oth_spec:
        return
    raise structure_error(reference, other, what, against)


def structure_error(reference: Any, other: Any, what: str, against: str) -> ValueError:
    """The ValueError for a structure mismatch, naming the first differing path."""
    diff = first_difference(reference, other)
    if diff is None:  # same nesting but a different node type somewhere optree sees (e.g. dict vs OrderedDict)
        ref_spec = optree.tree_structure(reference, none_is_leaf=True)
        oth_spec = optree.tree_structure(other, none_is_leaf=True)
        return ValueError(f"{what} do not match {against}: expected structure {ref_spec}, got {oth_spec}")
    path, message = diff
    return ValueError(f"{what} do not match {against}: at {format_path(path)} {what} {message}")


def flatten_like(spec: PyTreeSpec, tree: Any, what: str = "tree", against: str = "the parameters") -> list[Any]:
    """Flatten ``tree`` up to ``spec`` (its leaves may be subtrees); a mismatch names the first differing path."""
    try:
        return spec.flatten_up_to(tree)
    except (ValueError, TypeError):
        raise structure_error(spec.unflatten([0] * spec.num_leaves), tree, what, against) from None


def tree_zeros_like(tree: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped like every tensor leaf of ``tree`` (``None`` leaves stay ``None``)."""
    return tree_map(lambda t: None if t is None else torch.zeros_like(t, dtype=dtype), tree)


def tree_full_like(tree: Any, value: float, dtype: torch.dtype | None = None) -> Any:
    """Tensors filled with ``value`` shaped like every tensor leaf of ``tree``."""
    return tree_map(lambda t: None if t is None else torch.full_like(t, value, dtype=dtype), tree)


def tree_add(a: Any, b: Any) -> Any:
    """Leafwise ``a + b``; a ``None`` on either side gives the other side."""
    return tree_map(lambda x, y: y if x is None else (x if y is None else x + y), a, b)


def tree_sub(a: Any, b: Any) -> Any:
    """Leafwise ``a - b``."""
    return tree_map(lambda x, y: None if x is None or y is None else x - y, a, b)


def tree_scale(scalar: float | torch.Tensor, tree: Any) -> Any:
    """Leafwise ``scalar * x``."""
    return tree_map(lambda x: None if x is None else x * scalar, tree)


def tree_vdot(a: Any, b: Any) -> torch.Tensor:
    """Sum over leaves of the real inner products ``<a, b>``."""
    terms = [
        torch.sum(torch.real(x.conj() * y)) for x, y in zip(leaves(a), leaves(b)) if x is not None and y is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def tree_l2_norm(tree: Any, squared: bool = False) -> torch.Tensor:
    """Global L2 norm over all tensor leaves (``torch.nn.utils.clip_grad_norm_``'s definition)."""
    norms = [torch.linalg.vector_norm(x) for x in leaves(tree) if x is not None and x.numel() > 0]
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total * total if squared else total


def tree_cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """Cast every floating tensor leaf to ``dtype`` (no-op for ``None``)."""
    if dtype is None:
        return tree
    return tree_map(lambda x: x if x is None or not x.is_floating_point() else x.to(dtype), tree)


def tree_clone(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors share no memory with the original."""
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)
