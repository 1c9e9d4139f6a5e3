"""``TorchOptimizer.state``: torch's per-parameter state dict, live over the pure state (internal to the adapters).

torch.optim's ``opt.state`` is a ``defaultdict(dict)`` from parameter to ``{key: value}``; clients read it, write
tensors into it, re-assign entries (Lightning moves state to a device with ``opt.state[p] = {...}``) and add keys
of their own (a Lookahead wrapper keeps slow weights there). Here:

* :class:`LiveState` is that ``defaultdict``; it holds one :class:`ParamState` per parameter of the optimizer,
  created once and kept for the optimizer's lifetime (so references clients keep stay valid);
* a :class:`ParamState` is a ``dict`` whose *pure keys* (torch's key names of the pure state: ``exp_avg``,
  ``step``, ...) are the pure state's own tensors, refreshed lazily after a step (the dict is marked stale and
  synced on the next access), and whose other keys (*extras*) are the client's, kept as given;
* writing a pure key (``ps["exp_avg"] = t``, ``ps.update(...)``, ``opt.state[p] = {...}``) goes to the owner,
  which checks it (shape, kind of dtype, dense) and writes it into the pure state before anything is stored;
  deleting a pure key is refused (the algorithm needs it).

The owner (``TorchOptimizer``) provides ``_live_sync()`` (refresh every ParamState's pure keys) and
``_live_write(ps, values)`` (check and write pure values, returning the live tensors to store).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from torch import Tensor

__all__ = ["LiveState", "ParamState"]


class _Owner(Protocol):
    def _live_sync(self) -> None: ...

    def _live_write(self, ps: ParamState, values: Mapping[str, Any]) -> dict[str, Any]: ...


class _Guarded:
    """The dict behaviour both live mappings share: reads refresh the optimizer's entries first (``_sync``), and
    removal through ``del`` and ``pop`` asks ``_refuse(key)`` first (it raises for entries that must stay)."""

    def _sync(self) -> None:
        raise NotImplementedError

    def _refuse(self, key: Any) -> None:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> Any:
        self._sync()
        return super().__getitem__(key)  # type: ignore[misc]

    def get(self, key: Any, default: Any = None) -> Any:
        self._sync()
        return super().get(key, default)  # type: ignore[misc]

    def __delitem__(self, key: Any) -> None:
        self._refuse(key)
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, key: Any, *default: Any) -> Any:
        self._refuse(key)
        return super().pop(key, *default)  # type: ignore[misc]


class ParamState(_Guarded, dict):
    """One parameter's state: the pure state's tensors under torch's key names, plus the client's own keys.

    Built without an owner (``ParamState(mapping)``, as ``lightning_utilities.apply_to_collection`` rebuilds a
    mapping of the same type) it is a plain dict.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: LiveState | None = None
        self.group = -1  # the param group's index and the parameter's (unique) index in it
        self.index = -1
        self.pure_keys: frozenset[str] = frozenset()

    # --- reads: refresh the pure keys first ------------------------------------------------------------------

    def _sync(self) -> None:
        if self._live is not None and self._live.stale:
            self._live.sync()

    def __iter__(self) -> Iterator[Any]:
        self._sync()
        return super().__iter__()

    def __len__(self) -> int:
        self._sync()
        return super().__len__()

    def __contains__(self, key: object) -> bool:
        self._sync()
        return super().__contains__(key)

    def items(self) -> Any:
        self._sync()
        return super().items()

    def keys(self) -> Any:
        self._sync()
        return super().keys()

    def values(self) -> Any:
        self._sync()
        return super().values()

    def copy(self) -> dict[Any, Any]:
        """A plain dict with the same entries (the live tensors themselves)."""
        self._sync()
        return dict(super().items())

    def __repr__(self) -> str:
        self._sync()
        return super().__repr__()

    def __reduce__(self) -> Any:
        """Copies and pickles of one entry are plain dicts."""
        return (dict, (self.copy(),))

    def extras(self) -> dict[Any, Any]:
        """The client's own entries (every key that is not a pure key)."""
        return {k: v for k, v in super().items() if k not in self.pure_keys}

    # --- writes: pure keys go to the pure state ----------------------------------------------------------------

    def _write(self, values: Mapping[Any, Any]) -> None:
        pure = {k: v for k, v in values.items() if k in self.pure_keys}
        if pure and self._live is not None:
            pure = self._live.owner._live_write(self, pure)  # checks everything before anything is written
        for key, value in values.items():
            super().__setitem__(key, pure.get(key, value))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._write({key: value})

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._write(dict(*args, **kwargs))

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def __ior__(self, other: Any) -> ParamState:  # type: ignore[misc]
        self.update(other)
        return self

    def _refuse(self, key: Any) -> None:
        if key in self.pure_keys:
            raise ValueError(
                f"cannot remove {key!r} from a TorchOptimizer parameter's state: it is part of the optimizer's own "
                "state (assign a new tensor to it instead)"
            )

    def popitem(self) -> tuple[Any, Any]:
        extras = list(self.extras())
        if not extras:
            raise KeyError("popitem(): no entries but the optimizer's own state, which cannot be removed")
        key = extras[-1]
        return key, super().pop(key)

    def clear(self) -> None:
        if self.pure_keys & set(super().keys()):
            raise ValueError(
                "cannot clear a TorchOptimizer parameter's state: it holds the optimizer's own state "
                f"({', '.join(sorted(self.pure_keys))})"
            )
        super().clear()

    def assign(self, mapping: Mapping[Any, Any]) -> None:
        """Replace the whole entry (``opt.state[p] = mapping``): every pure key must be given; extras are replaced."""
        if not isinstance(mapping, Mapping):
            raise TypeError(f"the state of a parameter must be a dict, got a {type(mapping).__name__}")
        missing = sorted(k for k in self.pure_keys if k not in mapping)
        if missing:
            raise ValueError(
                f"the new state of this parameter lacks {', '.join(repr(k) for k in missing)}, which the "
                "optimizer keeps; assign a dict with every key of opt.state[p] (torch's key names)"
            )
        self._write(mapping)
        for key in [k for k in super().keys() if k not in self.pure_keys and k not in mapping]:
            super().__delitem__(key)

    def set_pure(self, values: Mapping[str, Any]) -> None:
        """Refresh the pure keys with the owner's live tensors (keys no longer kept are removed)."""
        for key in self.pure_keys - values.keys():
            dict.pop(self, key, None)  # (past the guard: the optimizer no longer keeps it)
        self.pure_keys = frozenset(values)
        for key, value in values.items():
            super().__setitem__(key, value)

    def set_extras(self, extras: Mapping[Any, Any]) -> None:
        """Replace the extras (a loaded checkpoint's)."""
        for key in [k for k in super().keys() if k not in self.pure_keys]:
            super().__delitem__(key)
        for key, value in extras.items():
            super().__setitem__(key, value)


class LiveState(_Guarded, defaultdict):
    """``opt.state``: a ``defaultdict(dict)`` whose entries for the optimizer's parameters are :class:`ParamState`.

    Other keys (any tensor or object a client stores state under) behave as in a plain ``defaultdict(dict)``.
    """

    def __init__(self, owner: _Owner) -> None:
        super().__init__(dict)
        self.owner = owner
        self.stale = True

    def sync(self) -> None:
        self.stale = False
        self.owner._live_sync()

    def register(self, param: Tensor, group: int, index: int) -> ParamState:
        """The ParamState of ``param`` (created if new), placed at ``(group, index)``."""
        ps = super().get(param)
        if not isinstance(ps, ParamState) or ps._live is not self:
            extras = dict(ps) if isinstance(ps, Mapping) else {}
            ps = ParamState(extras)
            ps._live = self
            super().__setitem__(param, ps)
        ps.group, ps.index = group, index
        self.stale = True
        return ps

    def own(self, key: Any) -> ParamState | None:
        """The ParamState of an optimizer parameter, or None for any other key."""
        ps = super().get(key) if isinstance(key, Tensor) else None
        return ps if isinstance(ps, ParamState) and ps._live is self else None

    def _sync(self) -> None:
        if self.stale:
            self.sync()

    def __setitem__(self, key: Any, value: Any) -> None:
        ps = self.own(key)
        if ps is None:
            super().__setitem__(key, value)
            return
        if value is ps:
            return
        self._sync()
        ps.assign(value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def _refuse(self, key: Any) -> None:
        if self.own(key) is not None:
            raise ValueError(
                "cannot remove a parameter's entry from a TorchOptimizer's state: the optimizer keeps state for "
                "each of its parameters (assign new values to opt.state[p][key] instead)"
            )

    def popitem(self) -> tuple[Any, Any]:
        for key in reversed(list(super().keys())):
            if self.own(key) is None:
                return key, super().pop(key)
        raise KeyError("popitem(): only the optimizer's parameters' entries, which cannot be removed")

    def clear(self) -> None:
        if any(self.own(k) is not None for k in super().keys()):
            raise ValueError("cannot clear a TorchOptimizer's state: it keeps state for each of its parameters")
        super().clear()

    def others(self) -> dict[Any, Any]:
        """The entries that are not the optimizer's parameters'."""
        return {k: v for k, v in super().items() if self.own(k) is None}

    def clear_others(self) -> None:
        for key in [k for k in super().keys() if self.own(k) is None]:
            super().__delitem__(key)

    def assign_all(self, mapping: Iterable[tuple[Any, Any]]) -> None:
        """``opt.state = mapping``: each entry is assigned as ``opt.state[key] = value``."""
        for key, value in mapping:
            self[key] = value

    def __reduce__(self) -> Any:
        """Copies and pickles of the view are plain ``defaultdict(dict)`` snapshots (as torch's ``opt.state``)."""
        self._sync()
        items = [(k, dict(v.items()) if isinstance(v, ParamState) else v) for k, v in super().items()]
        return (defaultdict, (dict,), None, None, iter(items))
