"""How a pure optimizer state maps to torch.optim's per-parameter state format (internal to the adapters).

A pure state is a tree (NamedTuples, tuples, dicts) over the tuple of an adapter's parameters. Its leaves are
of two kinds:

* **per-parameter** leaves sit in a *per-parameter node*: a plain tuple with one entry per parameter whose
  entries are tensors, ``()`` (nothing kept for that parameter) or :class:`~pureopt.combine.MaskedNode` (the
  parameter belongs to another transformation of a ``partition`` / ``masked``). The state records of pureopt
  keep such a node in each per-parameter field (``exp_avg``, ``step``, ...). In torch's format the leaf of
  parameter ``i`` is ``state[i][key]``, where ``key`` is the field name (torch's key name), or the dotted path
  of the field when two fields of the same name hold a tensor for the same parameter (e.g. a chain of two
  Adams: ``"0.exp_avg"`` and ``"1.exp_avg"``);
* **global** leaves (the ``num_updates`` counters, injected hyperparameters, ...) are everything else; torch's
  format has no place for them, so the adapters save them under their own key, by dotted path.

:class:`StateLayout` is computed once from a state (e.g. the one ``tx.init`` returned); a state tree keeps its
structure across updates, so the layout stays valid for the optimizer's lifetime.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import optree
import torch
from torch import Tensor

from pureopt.combine import MaskedNode

__all__ = [
    "StateLayout",
    "as_state_tensor",
    "load_entries",
    "migrate",
    "migrate_entries",
    "checkpoint_entries",
    "group_record",
    "check_group_record",
    "PUREOPT_KEY",
    "FORMAT_VERSION",
]

PARAM = "param"
GLOBAL = "global"
STATIC = "static"  # a non-tensor leaf (None, a Python number): not saved, taken from a fresh state on load


@dataclass(frozen=True)
class _Slot:
    kind: str
    index: int  # parameter index of a per-parameter leaf; -1 otherwise
    path: tuple[str, ...]
    at: tuple[int, ...] = ()  # the child positions that lead to the leaf (optree's one-level flattening)


def _is_empty_tuple(x: Any) -> bool:
    return type(x) is tuple and len(x) == 0


def _is_encoded(entry: Any) -> bool:
    """A per-parameter entry stored as a record of tensors (an encoded field: ``codes`` and ``scale``)."""
    return isinstance(entry, tuple) and hasattr(type(entry), "_fields") and all(isinstance(t, Tensor) for t in entry)


def _is_per_param_node(node: Any, num_params: int) -> bool:
    if type(node) is not tuple or len(node) != num_params:
        return False
    has_tensor = False
    for entry in node:
        if isinstance(entry, Tensor) or _is_encoded(entry):
            has_tensor = True
        elif not (_is_empty_tuple(entry) or isinstance(entry, MaskedNode)):
            return False
    return has_tensor


def _walk(
    node: Any, path: tuple[str, ...], num_params: int, slots: list[_Slot], types: list[str], at: tuple[int, ...] = ()
) -> None:
    """Append a slot for every leaf of ``node``, in optree's flattening order."""
    if _is_per_param_node(node, num_params):
        for i, entry in enumerate(node):
            if isinstance(entry, Tensor):  # () and MaskedNode have no leaves
                slots.append(_Slot(PARAM, i, path))
            elif _is_encoded(entry):  # an encoded field: one torch key per part ("exp_avg.codes", "exp_avg.scale")
                slots.extend(_Slot(PARAM, i, (*path[:-1], f"{path[-1]}.{name}")) for name in type(entry)._fields)
        return
    if node is None or isinstance(node, Tensor) or optree.tree_is_leaf(node, none_is_leaf=True):
        slots.append(_Slot(GLOBAL if isinstance(node, Tensor) else STATIC, -1, path, at))
        return
    children, _, entries = optree.tree_flatten_one_level(node, none_is_leaf=True)[:3]
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a state record
        types.append(type(node).__name__)
        names: Sequence[Any] = type(node)._fields  # type: ignore[attr-defined]
    else:
        names = entries
    for k, (child, name) in enumerate(zip(children, names)):
        _walk(child, (*path, str(name)), num_params, slots, types, (*at, k))


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<root>"


class StateLayout:
    """Where every leaf of a state lives: a per-parameter entry under a torch key, or a global under a path.

    Attributes:
      num_params: the number of parameters the state is over.
      spec: the state's tree structure.
      param_keys: for each parameter, its torch keys mapped to leaf positions.
      global_keys: the global tensors' dotted paths mapped to leaf positions.
      types: the state records' type names in flattening order (what a checkpoint is checked against).
    """

    def __init__(self, state: Any, num_params: int) -> None:
        self.num_params = num_params
        leaves, self.spec = optree.tree_flatten(state, none_is_leaf=True)
        slots: list[_Slot] = []
        types: list[str] = []
        _walk(state, (), num_params, slots, types)
        if len(slots) != len(leaves):  # the walk and optree disagree: a custom node type we cannot read
            raise TypeError("cannot map this optimizer state to torch's state format (unsupported pytree node)")
        self.types: tuple[str, ...] = tuple(types)
        self.param_keys: list[dict[str, int]] = [{} for _ in range(num_params)]
        self.global_keys: dict[str, int] = {}
        self._global_at: dict[str, tuple[int, ...]] = {}
        per_param: list[list[tuple[tuple[str, ...], int]]] = [[] for _ in range(num_params)]
        for pos, slot in enumerate(slots):
            if slot.kind == PARAM:
                per_param[slot.index].append((slot.path, pos))
            elif slot.kind == GLOBAL:
                self.global_keys[_dotted(slot.path)] = pos
                self._global_at[_dotted(slot.path)] = slot.at
        for i, entries in enumerate(per_param):
            short = [path[-1] if path else "<root>" for path, _ in entries]
            for (path, pos), name in zip(entries, short):
                key = name if short.count(name) == 1 else _dotted(path)
                self.param_keys[i][key] = pos

    def leaves(self, state: Any) -> list[Any]:
        """The leaves of ``state``, after checking that it still has the layout's structure."""
        leaves, spec = optree.tree_flatten(state, none_is_leaf=True)
        if spec != self.spec:
            raise RuntimeError(
                "the optimizer state changed structure since the optimizer was built; a transformation must "
                "return a state shaped like the one its init returned"
            )
        return leaves

    def export(self, state: Any) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``(per_param, globals)``: each parameter's ``{torch_key: tensor}`` and ``{path: tensor}``.

        The tensors are the state's own (not copies), as ``torch.optim.Optimizer.state_dict`` returns them.
        """
        leaves = self.leaves(state)
        per_param = [{key: leaves[pos] for key, pos in keys.items()} for keys in self.param_keys]
        return per_param, {key: leaves[pos] for key, pos in self.global_keys.items()}

    def globals_of(self, state: Any) -> dict[str, Tensor]:
        """The global tensors of ``state`` (a state of this layout) by path, reached without flattening the
        per-parameter fields (cheap enough to run after every step)."""
        out = {}
        for key, at in self._global_at.items():
            node = state
            for k in at:
                node = optree.tree_flatten_one_level(node, none_is_leaf=True)[0][k]
            out[key] = node
        return out

    def with_globals(self, state: Any, values: Mapping[str, Tensor]) -> Any:
        """``state`` with its global tensors replaced by ``values`` (by path); per-parameter leaves kept."""
        leaves = self.leaves(state)
        for key, pos in self.global_keys.items():
            leaves[pos] = values[key]
        return self.spec.unflatten(leaves)


# --- loading ---------------------------------------------------------------------------------------------------

_KIND_NAMES = {"f": "floating point", "c": "complex", "i": "integer", "b": "bool"}


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "b"
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "i"


def as_state_tensor(value: Any, like: Tensor, what: str) -> Tensor:
    """``value`` as a tensor compatible with ``like`` (same shape, same kind of dtype, dense), or a ValueError
    naming ``what``. A Python number is taken for a 0-d ``like`` (old checkpoints keep step counts so)."""
    if isinstance(value, Number) and not isinstance(value, bool) and like.dim() == 0:
        # old checkpoints, and torch.optim.SparseAdam's, keep step counts as Python numbers (ints): a count
        value = torch.tensor(value, dtype=like.dtype if isinstance(value, int) else None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} should be a tensor, got a {type(value).__name__}")
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    if _dtype_kind(value.dtype) != _dtype_kind(like.dtype):
        raise ValueError(
            f"{what} has dtype {value.dtype}, expected a {_KIND_NAMES[_dtype_kind(like.dtype)]} tensor "
            f"(the optimizer keeps {like.dtype})"
        )
    if value.is_sparse or value.layout != torch.strided:
        raise ValueError(f"{what} has layout {value.layout}, expected a dense (strided) tensor")
    return value


STEP_KEY = "step"


def load_entries(
    layout: StateLayout,
    fresh: Any,
    entries: Mapping[int, Mapping[str, Any]],
    globals_: Mapping[str, Any] | None,
    where: str,
    param_label: Sequence[Any] | None = None,
    extra_key: Callable[[int, Any], bool] | None = None,
) -> tuple[Any, dict[int, dict[Any, Any]]]:
    """A state shaped like ``fresh`` (a newly initialised state, which is written to) holding the given values,
    and the entries' other keys (a client's own, by parameter index).

    Args:
      layout: ``StateLayout(fresh, n)``.
      fresh: a state from ``tx.init``; its tensors are overwritten with the loaded values (cast to their dtype
        and device) and it is returned. The caller must own it.
      entries: per-parameter values by parameter index (0..n-1) in torch's ``{key: tensor}`` form. A missing
        parameter keeps its initial state (torch saves no state for parameters that were never stepped), and so
        does one whose entry has none of the optimizer's keys (only a client's).
      globals_: the global tensors by path, or ``None`` for a checkpoint written by torch.optim (which has
        none): the ``num_updates`` counters are then set to the largest per-parameter ``step`` (0 without one),
        and any other global state is an error.
      where: names the group in error messages (e.g. ``"param group 0"``).
      param_label: the checkpoint's id of each parameter, for error messages (defaults to the index).
      extra_key: ``(index, key) -> bool``: whether a key the optimizer does not keep is a client's entry (kept
        and returned) rather than a sign of another optimizer (an error). ``None``: every such key is an error.

    Everything is checked before anything is written; a mismatch raises a ValueError naming the parameter and
    key. Nothing but ``fresh`` is modified.
    """
    labels = list(param_label) if param_label is not None else list(range(layout.num_params))
    leaves = layout.leaves(fresh)
    writes: list[tuple[int, Tensor]] = []
    extras: dict[int, dict[Any, Any]] = {}
    pure_entries: dict[int, Mapping[str, Any]] = {}
    for i, entry in entries.items():
        if not 0 <= i < layout.num_params:
            raise ValueError(f"{where}: state for parameter {labels[i] if i < len(labels) else i} out of range")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: the state of parameter {labels[i]} is a {type(entry).__name__}, not a dict")
        expected = layout.param_keys[i]
        given = {k: v for k, v in entry.items() if v is not None and k in expected}
        others = {k: v for k, v in entry.items() if k not in expected}
        unknown = sorted(str(k) for k, v in others.items() if v is not None and not (extra_key and extra_key(i, k)))
        if unknown:
            raise ValueError(
                f"{where}: the state of parameter {labels[i]} has {', '.join(repr(k) for k in unknown)}, which this "
                f"optimizer does not keep (it keeps {', '.join(repr(k) for k in expected) or 'nothing'}): the "
                "checkpoint was saved by a different optimizer or with different options"
            )
        if others and extra_key is not None:
            extras[i] = dict(others)
        if not given:
            continue
        pure_entries[i] = given
        missing = [k for k in expected if k not in given]
        if missing == [STEP_KEY]:
            # torch.optim.SGD keeps no step count; a parameter with a momentum buffer has taken a step, which is
            # all pureopt's SGD uses its step count for (telling the first, undampened step apart)
            writes.append((expected[STEP_KEY], torch.ones(())))
            missing = []
        if missing:
            raise ValueError(
                f"{where}: the state of parameter {labels[i]} lacks {', '.join(repr(k) for k in missing)}: the "
                "checkpoint was saved by a different optimizer or with different options"
            )
        for key, value in given.items():
            pos = expected[key]
            writes.append((pos, as_state_tensor(value, leaves[pos], f"{where}: state[{labels[i]}][{key!r}]")))
    if globals_ is None:
        steps = [e[STEP_KEY] for e in pure_entries.values() if e.get(STEP_KEY) is not None]
        for key, pos in layout.global_keys.items():
            if key.split(".")[-1] != "num_updates":
                raise ValueError(
                    f"{where}: the checkpoint has no pureopt section (saved by torch.optim?), but this optimizer "
                    f"keeps global state {key!r} that torch.optim does not save"
                )
            count = max((float(torch.as_tensor(s).max()) for s in steps), default=0.0)
            writes.append((pos, torch.tensor(round(count))))
    else:
        unknown = sorted(k for k in globals_ if k not in layout.global_keys)
        missing = sorted(k for k in layout.global_keys if k not in globals_)
        if unknown or missing:
            detail = f"unexpected {unknown}" if unknown else f"missing {missing}"
            raise ValueError(
                f"{where}: the checkpoint's global state does not match this optimizer ({detail}): it was saved "
                "by a different optimizer or with different options"
            )
        for key, pos in layout.global_keys.items():
            writes.append((pos, as_state_tensor(globals_[key], leaves[pos], f"{where}: global state {key!r}")))
    _write(leaves, writes)  # all checked: only now is anything written (into the fresh buffers)
    return layout.spec.unflatten(leaves), extras


def migrate(old_layout: StateLayout, old_state: Any, new_layout: StateLayout, fresh: Any) -> Any:
    """Carry ``old_state`` over to a new state layout (hyperparameters changed the fields an algorithm keeps).

    Every per-parameter entry and global of ``fresh`` (a newly initialised state, written to) that ``old_state``
    has under the same name, shape and kind of dtype takes its value; the others keep their initial values
    (e.g. ``max_exp_avg_sq`` starts at zero when ``amsgrad`` is switched on). ``old_state`` is not modified.
    """
    old_params, old_globals = old_layout.export(old_state)
    return migrate_entries(old_params, old_globals, new_layout, fresh)


def migrate_entries(
    old_params: Sequence[Mapping[str, Tensor]], old_globals: Mapping[str, Tensor], new_layout: StateLayout, fresh: Any
) -> Any:
    """:func:`migrate` from exported values: each parameter's ``{torch_key: tensor}`` and the globals by path."""
    leaves = new_layout.leaves(fresh)
    writes: list[tuple[int, Tensor]] = []
    for i, keys in enumerate(new_layout.param_keys):
        for key, pos in keys.items():
            writes.append((pos, old_params[i].get(key)))  # type: ignore[arg-type]
    for key, pos in new_layout.global_keys.items():
        writes.append((pos, old_globals.get(key)))  # type: ignore[arg-type]
    _write(leaves, [(pos, v) for pos, v in writes if isinstance(v, Tensor) and _compatible(v, leaves[pos])])
    return new_layout.spec.unflatten(leaves)


def _compatible(value: Tensor, like: Tensor) -> bool:
    return tuple(value.shape) == tuple(like.shape) and _dtype_kind(value.dtype) == _dtype_kind(like.dtype)


def _write(leaves: list[Any], writes: Sequence[tuple[int, Tensor]]) -> None:
    """Copy each value into the fresh leaf at its position (cast to its dtype and device).

    A buffer that ``init`` shared between two leaves is split first, so that each leaf gets its own value.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for pos, value in writes:
            target = leaves[pos]
            if id(target) in seen:
                target = leaves[pos] = target.clone()
            seen.add(id(target))
            target.copy_(value)


# --- checkpoints ---------------------------------------------------------------------------------------------

PUREOPT_KEY = "pureopt"
"""The state-dict key under which the adapters save what torch's format has no place for: a top-level entry in
``FunctionalOptimizer``'s state dicts (and ``TorchOptimizer``'s of format 1), a key of each saved param group in
``TorchOptimizer``'s (format 2; see :mod:`pureopt.adapters._checkpoint`)."""
FORMAT_VERSION = 1


def checkpoint_entries(
    layout: StateLayout, state: Any, never: Collection[int] = ()
) -> tuple[dict[int, dict[str, Tensor]], dict[str, Tensor]]:
    """The per-parameter entries (by local index) and globals of ``state`` as saved in a state dict.

    As in torch.optim, a parameter that never took a step has no entry: one whose ``step`` count is 0 (its state
    is still the initial one), one listed in ``never`` (the caller knows it never stepped, e.g. with no step count
    to tell), or one without any per-parameter state.
    """
    per_param, globals_ = layout.export(state)
    steps = [(i, e[STEP_KEY]) for i, e in enumerate(per_param) if STEP_KEY in e]
    skipped = set(never)
    if steps:
        values = torch.stack([s.detach().reshape(()).to("cpu", torch.float64) for _, s in steps]).tolist()
        skipped |= {i for (i, _), v in zip(steps, values) if v == 0}
    entries = {i: dict(e) for i, e in enumerate(per_param) if e and i not in skipped}
    return entries, globals_


CODES_VERSION = 2
"""Which code tables a group record's encoded fields were written with (its ``"codes"``; absent: 1). Version 2
(2026-12-08): the fields in :data:`_UNSIGNED_SINCE_2` were declared non-negative, so ``"q8"`` / ``"q4"`` store them
in unsigned zero-free codes, which read signed codes as other values."""

_UNSIGNED_SINCE_2 = {
    "ScaleByAdagradState": ("sum",), "ScaleByAdadeltaState": ("square_avg", "acc_delta"),
    "ScaleByRAdamState": ("exp_avg_sq",), "ScaleByRpropState": ("step_size",), "LambState": ("exp_avg_sq",),
    "ScaleByBeliefState": ("exp_avg_var", "max_exp_avg_var"), "ScaleByYogiState": ("exp_avg_sq",),
    "AdanState": ("exp_avg_sq",), "ScheduleFreeState": ("exp_avg_sq",), "AdEMAMixState": ("exp_avg_sq",),
    "ScaleByAdoptState": ("exp_avg_sq",), "ScaleByLaPropState": ("exp_avg_sq", "max_exp_avg_sq"),
    "MadgradState": ("grad_sum_sq",), "ScaleByMarsState": ("exp_avg_sq", "max_exp_avg_sq"),
    "ScaleByAdamPState": ("exp_avg_sq",), "ProdigyState": ("exp_avg_sq",), "DAdaptAdamState": ("exp_avg_sq",),
    "SparseAdamState": ("exp_avg_sq",),
}  # fmt: skip


def group_record(kind: str, layout: StateLayout, globals_: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the ``pureopt`` section of a state dict keeps about one group."""
    return {"kind": kind, "types": list(layout.types), "globals": dict(globals_), "codes": CODES_VERSION}


def check_code_tables(record: Mapping[str, Any], keys: Collection[str], where: str) -> None:
    """Refuse a checkpoint whose 8-/4-bit codes (entry keys ``"<field>.codes"``) of a field are read with another
    code table now (:data:`CODES_VERSION`): decoding them would give other values, silently."""
    if int(record.get("codes", 1)) >= CODES_VERSION:
        return
    for kind in record.get("types", ()):
        for field in _UNSIGNED_SINCE_2.get(str(kind), ()):
            if any(key == f"{field}.codes" or key.endswith(f".{field}.codes") for key in keys):
                raise ValueError(
                    f"{where}: the checkpoint stores {kind}'s {field} as signed 8-/4-bit codes (written before "
                    f"2026-12-08); this version stores that non-negative field in unsigned codes and would read "
                    "them as other values. Load it with the version that wrote it and save the state with a float "
                    "state_dtype, or start this optimizer's state afresh"
                )


def check_group_record(
    record: Any, kind: str | None, layout: StateLayout, where: str, entries: Mapping[Any, Any] | None = None
) -> Mapping[str, Any]:
    """Check a group's record from the ``pureopt`` section against this optimizer; returns its globals.

    ``kind`` (the factory's name) is compared when both sides have one; the state record types when the record
    has them; ``entries``: the loaded per-parameter entries, whose keys name their codes (see
    :func:`check_code_tables`).
    """
    if not isinstance(record, Mapping) or not isinstance(record.get("globals"), Mapping):
        raise ValueError(f"{where}: the checkpoint's {PUREOPT_KEY!r} section is malformed")
    keys = {str(k) for e in (entries or {}).values() if isinstance(e, Mapping) for k in e}
    check_code_tables(record, keys, where)
    saved_kind = record.get("kind")
    if kind is not None and saved_kind not in (None, "transform") and saved_kind != kind:
        raise ValueError(f"{where}: the checkpoint was saved by {saved_kind}, this optimizer is {kind}")
    saved_types = list(record.get("types", layout.types))  # a param group's live record has none
    if saved_types != list(layout.types):
        raise ValueError(
            f"{where}: the checkpoint's state has records {saved_types}, this optimizer keeps {list(layout.types)}: "
            "it was saved by a different optimizer or with different options"
        )
    return record["globals"]
