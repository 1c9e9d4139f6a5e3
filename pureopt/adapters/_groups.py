"""``TorchOptimizer``'s param groups: reading them as torch does, and each group's runtime.

``_extract_params`` reads a param group's tensors with torch's rules and wording, ``_distinct`` drops repeated
parameters, and :class:`_Group` holds one group's transformation and pure state (over flat buffers with
``flat=True``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.adapters._flat import FlatParams, FlatState
from pureopt.adapters._live import ParamState
from pureopt.adapters._state import StateLayout
from pureopt.base import GradientTransformation, OptState, as_leaf_update


def _extract_params(param_group: dict[str, Any]) -> list[Tensor]:
    """The tensors of a param group as ``add_param_group`` will store them (torch's rules and wording).

    As torch does, ``param_group["params"]`` is replaced by a list first, so that an iterator (``model.parameters()``,
    ``named_parameters()``) is consumed once, here, and torch's own ``add_param_group`` sees the same parameters.
    A parameter listed twice is allowed (torch warns when the group is added).
    """
    params = param_group["params"]
    if isinstance(params, Tensor):
        items: list[Any] = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but "
            "the ordering of tensors in sets will change between runs. Please use a list instead."
        )
    else:
        items = list(params)
    param_group["params"] = items
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(t))
        if not (t.is_leaf or t.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
    return tensors


class _Group:
    """A param group's transformation and pure state (over flat buffers with ``flat=True``).

    ``params`` are the group's distinct parameters (the pure state is over them); ``listed`` is the group's list as
    torch keeps it, where a parameter may appear more than once (torch warns, and its per-parameter loop then steps
    such a parameter once per listing, sharing its state: :meth:`passes` reproduces that).
    """

    def __init__(
        self,
        listed: Sequence[Tensor],
        tx: GradientTransformation,
        state: OptState,
        lr: Tensor | None,
        built_with: dict[str, Any],
    ) -> None:
        self.listed = tuple(listed)
        self.params = _distinct(listed)
        counts = Counter(id(p) for p in listed)
        self.multiplicity = [counts[id(p)] for p in self.params]
        self.tx = tx
        self.update: Any = as_leaf_update(tx)  # the leaf-level update function
        self._state = state
        self.layout = StateLayout(state, len(self.params))
        self.lr = lr  # the 0-d tensor the factory got as ``lr`` (None for a plain transformation)
        self.built_with = built_with  # the factory arguments other than lr the transformation was built from
        self.flat: FlatState | None = None
        self._export_of: Any = None  # the state object :meth:`entries` was computed from
        self._export: list[dict[str, Tensor]] = []
        # the group's live record in param_groups (``{"globals": {path: tensor}}``, pureopt.adapters._checkpoint)
        self.record: dict[str, Any] = {"globals": {}}
        self.views: list[ParamState] = []  # each parameter's entry of TorchOptimizer.state
        self.needs_closure = "LBFGSState" in self.layout.types  # re-evaluates the objective inside its update
        # the (local) indices of the parameters that never took a step: without a step count nothing else tells
        # that a zero momentum buffer is an initial one (state_dict() saves no entry for them, as torch)
        self.unstepped: set[int] = set(range(len(self.params)))

    @property
    def state(self) -> OptState:
        """The per-parameter pure state (with ``flat=True``: views of the flat buffers)."""
        return self.flat.per_param() if self.flat is not None else self._state

    def checkpoint_state(self) -> OptState:
        """The state to export: as :attr:`state`, with no 0-d tensor shared between parameters."""
        return self.flat.checkpoint_state() if self.flat is not None else self._state

    def entries(self) -> list[dict[str, Tensor]]:
        """Each parameter's ``{torch_key: tensor}`` of the current state (cached until the state changes)."""
        self._refresh_export()
        return self._export

    def globals(self) -> dict[str, Tensor]:
        """The current state's global tensors (``num_updates`` counters, ...) by dotted path."""
        return self.layout.globals_of(self.state)

    def _refresh_export(self) -> None:
        state = self.checkpoint_state()
        if state is not self._export_of:
            self._export = self.layout.export(state)[0]
            self._export_of = state

    def set_globals(self, values: dict[str, Tensor]) -> None:
        """Replace the global tensors by ``values`` (by dotted path, checked by the caller)."""
        if self.flat is not None:
            self.flat.set_globals(values)
        else:
            self._state = self.layout.with_globals(self._state, values)

    def set(self, tx: GradientTransformation, state: OptState, layout: StateLayout) -> None:
        """Switch to ``tx`` with a per-parameter ``state`` (copied into the flat buffers with ``flat=True``)."""
        self.tx, self.update, self.layout = tx, as_leaf_update(tx), layout
        if self.flat is not None:
            self.flat = FlatState(self.flat.flat, tx, state)
        else:
            self._state = state

    def make_flat(self, flat: FlatParams) -> None:
        """Move the state into flat buffers over ``flat`` (the group's parameters, already re-pointed)."""
        self.flat = FlatState(flat, self.tx, self._state)
        self._state = None

    def write(self, index: int, values: Mapping[str, Tensor]) -> None:
        """Put checked values into parameter ``index``'s state (``{torch_key: tensor}``, shapes and dtypes as the
        current leaves'). Without ``flat`` the tensors become the state's leaves; with ``flat``, parameter-shaped
        values are copied into the flat buffers and anything else rebuilds the flat state around them."""
        keys = self.layout.param_keys[index]
        if self.flat is None:
            leaves = self.layout.leaves(self._state)
            for key, value in values.items():
                leaves[keys[key]] = value
            self._state = self.layout.spec.unflatten(leaves)
            return
        current = self.layout.leaves(self.flat.per_param())
        rebuild = {}
        with torch.no_grad():
            for key, value in values.items():
                leaf = current[keys[key]]
                if leaf.dim() > 0 and leaf._is_view():  # a view of a flat buffer: write through it
                    leaf.copy_(value)
                else:
                    rebuild[key] = value
        if rebuild:
            leaves = self.layout.leaves(self.flat.checkpoint_state())
            for key, value in rebuild.items():
                leaves[keys[key]] = value
            self.flat = FlatState(self.flat.flat, self.tx, self.layout.spec.unflatten(leaves))

    def mark_stepped(self, grads: Sequence[Tensor | None]) -> None:
        """Record that the parameters with a gradient in ``grads`` took a step (cheap once all have)."""
        if self.unstepped:
            self.unstepped = {i for i in self.unstepped if grads[i] is None}

    def passes(self) -> list[list[Tensor | None]]:
        """The gradients of each pass of a step: one pass, or one per listing of the most-listed parameter."""
        grads = [p.grad for p in self.params]
        rounds = max(self.multiplicity, default=1)
        if rounds == 1:
            return [grads]
        return [[g if m > r else None for g, m in zip(grads, self.multiplicity)] for r in range(rounds)]


def _distinct(tensors: Iterable[Tensor]) -> tuple[Tensor, ...]:
    """``tensors`` without repeats, in first-seen order."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return tuple(out)
