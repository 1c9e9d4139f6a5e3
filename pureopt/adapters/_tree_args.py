"""``TorchOptimizer.step``'s per-parameter keyword arguments (Sophia-G's ``hessian=``): which a group takes, and
reading and checking them before a step.

A pure transformation takes trees like the gradients as keyword arguments of ``update`` when its algorithm
declares them (``Algorithm(leaf_args=("hessian",))``, :mod:`pureopt.algorithms.define`); the math reads them from
``UpdateContext.extra_args``. Which ones a param group's transformation takes is read from its state: the state
records of the algorithms it is made of (inside chains and wrappers too) name their algorithms, whose
``leaf_args`` are the answer. Nothing is special-cased by algorithm name. Inside ``pureopt.partition`` /
``pureopt.masked`` the argument is cut to each inner transformation's parameters
(:func:`pureopt.combine.restricted_context`), so records there count like any other.

A ``TorchOptimizer`` user gives such an argument per parameter, as a dict ``{param: tensor}`` or as a list
aligned with ``[p for g in opt.param_groups for p in g["params"]]``; :func:`read_tree_args` checks it whole
(kinds, length, shapes, devices, whether each group takes it) and :func:`check_complete` checks, once the
gradients are known, that a group gets an entry for every parameter with a gradient or none at all (its update
uses the tree as a whole). Both raise before anything is changed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from pureopt.adapters._groups import _Group
from pureopt.algorithms.define import Algorithm

__all__ = ["accepted_tree_args", "check_complete", "read_tree_args"]

LISTING = 'the list [p for g in opt.param_groups for p in g["params"]]'


@functools.cache
def _declared_by(record: type) -> tuple[str, ...]:
    """The tree keyword arguments the algorithm whose state record is ``record`` declares (``()`` for a record
    that is not an algorithm's)."""
    module = sys.modules.get(record.__module__)
    for value in vars(module).values() if module is not None else ():
        if isinstance(value, Algorithm) and value.state is record:
            return value.leaf_args
    return ()


def _records(node: Any, out: set[type]) -> None:
    """Collect the state record types in ``node``."""
    if isinstance(node, Tensor):
        return
    if isinstance(node, tuple):
        if hasattr(type(node), "_fields"):  # a NamedTuple state record
            out.add(type(node))
        children: Any = node
    elif isinstance(node, list):
        children = node
    elif isinstance(node, Mapping):
        children = node.values()
    else:
        return
    for child in children:
        _records(child, out)


def accepted_tree_args(state: Any) -> frozenset[str]:
    """The tree keyword arguments of ``update`` that the transformation keeping ``state`` takes: those declared by
    the algorithms whose state records ``state`` holds (``{"hessian"}`` for Sophia-G, alone, in a chain or inside
    ``pureopt.partition`` / ``pureopt.masked``)."""
    records: set[type] = set()
    _records(state, records)
    return frozenset(name for record in records for name in _declared_by(record))


def read_tree_args(
    groups: Sequence[_Group], given: Mapping[str, Any], kind: str, flat: bool
) -> list[dict[str, list[Tensor | None]]]:
    """Each group's per-parameter values of the keyword arguments ``given`` to ``step`` (``None`` values dropped):
    for group ``i``, ``{name: [value or None per distinct parameter]}``, only for names it has an entry for.

    Raises TypeError for a keyword no group's transformation takes and for a value that is neither a dict nor a
    list/tuple; ValueError for ``flat=True``, a dict key that is not one
    of the optimizer's parameters, a list of the wrong length or listing a repeated parameter with two values, an entry
    that is not a floating-point tensor of its parameter's shape on its device, and an entry for a group whose
    transformation does not take it.
    """
    out: list[dict[str, list[Tensor | None]]] = [{} for _ in groups]
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return out
    accepted = [accepted_tree_args(g.state) for g in groups]
    position: dict[int, tuple[int, int]] = {}  # id(param) -> (group, distinct index)
    listed: list[tuple[int, int]] = []  # (group, distinct index) of each entry of LISTING
    first: dict[tuple[int, int], int] = {}  # (group, distinct index) -> its first position in LISTING
    for gi, g in enumerate(groups):
        index = {id(p): li for li, p in enumerate(g.params)}
        for p in g.listed:
            place = (gi, index[id(p)])
            position[id(p)] = place
            first.setdefault(place, len(listed))
            listed.append(place)
    for name, value in given.items():
        takers = [gi for gi, names in enumerate(accepted) if name in names]
        if not takers:
            raise TypeError(
                f"step() got an unexpected keyword argument {name!r}: the transformation of this {kind} optimizer "
                "takes no such tree argument (per-parameter keywords are passed to algorithms that declare them, "
                "e.g. hessian= for pureopt.sophia_g)"
            )
        if flat:
            raise ValueError(
                f"flat=True: step({name}=...) is not supported (the estimate would have to be gathered into the "
                "flat buffers, and pureopt.flatten refuses such trees); build the optimizer with flat=False"
            )
        entries: dict[tuple[int, int], Any] = {}
        if isinstance(value, Mapping):
            for key, entry in value.items():
                if not isinstance(key, Tensor) or id(key) not in position:
                    what = f"a tensor of shape {tuple(key.shape)}" if isinstance(key, Tensor) else repr(key)
                    raise ValueError(f"{name}: the dict's key {what} is not a parameter of this optimizer")
                entries[position[id(key)]] = entry
        elif isinstance(value, (list, tuple)):
            if len(value) != len(listed):
                raise ValueError(
                    f"{name}: a list of {len(value)} entries, but {LISTING} has {len(listed)}: give one entry per "
                    "parameter in that order (None for a parameter without one), or a dict {param: tensor}"
                )
            for k, (place, entry) in enumerate(zip(listed, value)):
                if place in entries and entries[place] is not entry:
                    raise ValueError(
                        f"{name}: entries {first[place]} and {k} are for the same parameter (listed twice) but differ"
                    )
                entries[place] = entry
        else:
            raise TypeError(
                f"{name} must be a dict {{param: tensor}} or a list aligned with {LISTING}, "
                f"got a {type(value).__name__}"
            )
        for (gi, li), entry in entries.items():
            if entry is None:
                continue
            p = groups[gi].params[li]
            where = f"{name} for param_groups[{gi}]['params'][{first[(gi, li)] - first[(gi, 0)]}]"
            if not isinstance(entry, Tensor):
                raise TypeError(f"{where}: expected a tensor, got a {type(entry).__name__}")
            if entry.shape != p.shape:
                raise ValueError(f"{where}: shape {tuple(entry.shape)} does not match the parameter's {tuple(p.shape)}")
            if entry.device != p.device:
                raise ValueError(f"{where}: on {entry.device}, the parameter is on {p.device}")
            if not (entry.is_floating_point() or entry.is_complex()):
                raise ValueError(f"{where}: expected a floating-point tensor, got {entry.dtype}")
            if gi not in takers:
                raise ValueError(f"{where}: the transformation of param group {gi} takes no {name!r}")
            values = out[gi].setdefault(name, [None] * len(groups[gi].params))
            values[li] = entry
    return out


def check_complete(groups: Sequence[_Group], args: Sequence[Mapping[str, Sequence[Tensor | None]]]) -> None:
    """Refuse a group that got a keyword's entries for some but not all of its parameters that have a gradient
    (ValueError naming the first one without): the update reads the tree as a whole. Entries of parameters without
    a gradient are skipped, as their gradients are."""
    for gi, (g, named) in enumerate(zip(groups, args)):
        for name, values in named.items():
            given = [v is not None for v, p in zip(values, g.params) if p.grad is not None]
            if any(given) and not all(given):
                li = next(i for i, (v, p) in enumerate(zip(values, g.params)) if p.grad is not None and v is None)
                pos = next(k for k, p in enumerate(g.listed) if p is g.params[li])
                raise ValueError(
                    f"{name} was given for some parameters of param group {gi} but not for param_groups[{gi}]"
                    f"['params'][{pos}], which has a gradient: give an entry for every parameter of the group that "
                    "has a gradient this step, or none"
                )
