"""``FunctionalOptimizer``: a pure transformation behind torch.distributed.optim's functional-optimizer contract.

torch's functional optimizers (``_FunctionalSGD``, ``_FunctionalAdam``, ...) take gradients as arguments instead
of reading ``.grad``: ``step_param(param, grad)`` steps one parameter, ``step(gradients)`` all of them. DDP's
optimizer-overlap machinery (``_OptimizerHookState`` with ``_hook_then_optimizer``) calls ``step_param`` on each
parameter of a gradient bucket as soon as its all-reduce is done. :class:`FunctionalOptimizer` offers the same
contract for any pureopt transformation, plus ``step_params`` (a subset, e.g. one bucket, in one kernel call).

It owns its parameters and its state, so it steps them in place through the donated path (``UpdateContext(spec,
donate=True, apply=True)``), which is what lets the kernels run torch's fused in-place kernels
(``torch._fused_adam_`` & co.): a full ``step`` is one multi-tensor call. Gradients are only read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.adapters._flat import FlatParams, FlatState
from pureopt.adapters._layouts import adopt_saved_layouts
from pureopt.adapters._state import (
    FORMAT_VERSION,
    PUREOPT_KEY,
    StateLayout,
    check_group_record,
    checkpoint_entries,
    group_record,
    load_entries,
)
from pureopt.base import GradientTransformation, OptState, UpdateContext, add_inplace, as_leaf_update

__all__ = ["FunctionalOptimizer"]

_KIND = "transform"


def _check_params(params: Sequence[Any], allow_empty: bool) -> None:
    """torch.optim's checks on a parameter list (with its wording where it has one)."""
    if len(params) == 0 and not allow_empty:
        raise ValueError("optimizer got an empty parameter list")
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(p))
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter appears more than once in the parameter list")


class FunctionalOptimizer:
    """Steps parameters in place with a pure transformation, given their gradients explicitly.

    The contract of torch.distributed.optim's functional optimizers: ``step_param(param, grad)`` and
    ``step(gradients)``; it can be the ``functional_optimizer`` of torch's ``_OptimizerHookState`` (DDP's
    optimizer overlap). One pure state is kept over the tuple of all parameters (``tx.init(tuple(params))``).

    Args:
      params: the parameters (tensors), in a fixed order; they are updated in place.
      tx: the transformation, e.g. ``pureopt.adamw(lr=1e-3)``.
      flat: lay the parameters and the state out in one flat buffer per (device, dtype) (the parameters become
        views of it, ``p.data`` is re-pointed): a full ``step`` of an elementwise (or segmentwise)
        transformation is then one kernel call per group, with one gather copy of the gradients. Same numbers
        as ``flat=False``; see ``TorchOptimizer`` and docs/flat.md for when the per-parameter path is taken.

    **Partial steps and the update counter.** Per-parameter state (``step``, moments, ...) advances for exactly
    the parameters that get a gradient, whichever method is used: a parameter's trajectory does not depend on
    how its steps were grouped. A transformation's *global* state (the ``num_updates`` counter at which
    learning-rate schedules are evaluated, and anything else not kept per parameter) advances once per
    optimizer step:

    * ``step(gradients)`` is one optimizer step;
    * ``step_param`` / ``step_params`` calls form one optimizer step until a parameter that was already stepped
      in it is stepped again (or :meth:`end_step` is called): then the next one begins. Every call within one
      step starts from the global state as it was at the start of that step, so a schedule gives all parameters
      the same value, and the counter ends one higher. With DDP's hook (each parameter stepped once per
      backward) this is one step per iteration. A parameter that gets a gradient only in some iterations can
      merge two iterations into one step if no other parameter is stepped twice; call :meth:`end_step` at the
      end of each iteration where that matters.

    Transformations that couple parameters (``clip_by_global_norm``, ``apply_if_finite``, L-BFGS, ...) see only
    the gradients of the call: a partial step gives them a partial view.

    Thread safety: every method holds one lock while it reads or writes the state, so trainer threads may step
    (disjoint or not) parameters concurrently; calls are serialised.

    Example::

        opt = FunctionalOptimizer(model.parameters(), pureopt.adamw(lr=1e-3))
        opt.step([p.grad for p in model.parameters()])
        opt.step_param(model.weight, grad)                     # one parameter
        opt.step_params(bucket_params, bucket_grads)           # a subset, one kernel call
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        tx: GradientTransformation,
        *,
        flat: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"tx must be a GradientTransformation, got a {type(tx).__name__}")
        if not isinstance(flat, bool):
            raise TypeError(f"flat must be a bool, got a {type(flat).__name__}")
        param_list = list(params)
        _check_params(param_list, _allow_empty_param_list)
        if flat:
            FlatParams.check(param_list)
        self.params: list[Tensor] = param_list
        self.param_group: dict[str, Any] = {"params": param_list}  # as torch's functional optimizers have
        self.tx = tx
        self._update = as_leaf_update(tx)
        self._spec = _tree.flatten(tuple(param_list))[1]
        self._index = {id(p): i for i, p in enumerate(param_list)}
        with torch.no_grad():
            self._state = tx.init(tuple(param_list))
        self._layout = StateLayout(self._state, len(param_list))
        self._flat: FlatState | None = None
        if flat and param_list:
            self._flat = FlatState(FlatParams(param_list), tx, self._state)
            self._state = None
        self._lock = threading.RLock()
        self._step_start: dict[str, Tensor] | None = None  # global state at the start of the current partial step
        self._stepped: set[int] = set()

    # --- state access -----------------------------------------------------------------------------------------

    @property
    def opt_state(self) -> OptState:
        """The pure state (a tree over ``tuple(self.params)``). Its buffers are updated in place by later steps."""
        with self._lock:
            return self._current()

    def _current(self, checkpoint: bool = False) -> OptState:
        """The per-parameter state (with ``flat=True``: views of the flat buffers; ``checkpoint``: no 0-d tensor
        shared between parameters)."""
        if self._flat is None:
            return self._state
        return self._flat.checkpoint_state() if checkpoint else self._flat.per_param()

    @property
    def state(self) -> dict[Tensor, dict[str, Tensor]]:
        """Per-parameter state in torch's form ``{param: {"exp_avg": ..., ...}}`` (the live tensors)."""
        with self._lock:
            per_param, _ = self._layout.export(self._current(checkpoint=True))
        return {p: entry for p, entry in zip(self.params, per_param) if entry}

    # --- stepping ---------------------------------------------------------------------------------------------

    def step_param(self, param: Tensor, grad: Tensor | None) -> None:
        """Step one parameter with its gradient; ``grad=None`` does nothing (torch's semantics)."""
        if grad is None:
            return
        self.step_params([param], [grad])

    def step_params(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Step a subset of the parameters (e.g. one DDP bucket) in one kernel call; ``None`` gradients are skipped.

        Part of the current optimizer step (see the class docstring for how the update counter advances).
        """
        if len(params) != len(grads):
            raise ValueError(
                f"step_params got {len(params)} parameters but {len(grads)} gradients; they must be aligned"
            )
        indices = [self._position(p) for p in params]
        if len(set(indices)) != len(indices):
            raise ValueError("step_params got the same parameter twice")
        chosen = [(i, g) for i, g in zip(indices, grads) if g is not None]
        if not chosen:
            return
        full: list[Tensor | None] = [None] * len(self.params)
        for i, g in chosen:
            full[i] = self._checked_grad(i, g)
        with self._lock:
            touched = {i for i, _ in chosen}
            if self._step_start is None or not self._stepped.isdisjoint(touched):
                _, globals_ = self._layout.export(self._current())  # a new optimizer step begins
                self._step_start = {k: v.clone() for k, v in globals_.items()}
                self._stepped = set()
            start_globals = {k: v.clone() for k, v in self._step_start.items()}
            if self._flat is not None:
                self._flat.set_globals(start_globals)
                self._flat.step(full)
            else:
                self._state = self._run(full, self._layout.with_globals(self._state, start_globals))
            self._stepped |= touched

    def step(self, gradients: Sequence[Tensor | None]) -> None:
        """One optimizer step over all parameters; ``gradients`` is aligned with ``params`` (``None``: skipped)."""
        if len(self.params) != len(gradients):
            raise ValueError(
                "the gradients passed in does not equal to the size of the parameters!"
                + f"Params length: {len(self.params)}. "
                + f"Gradients length: {len(gradients)}"
            )
        full = [None if g is None else self._checked_grad(i, g) for i, g in enumerate(gradients)]
        with self._lock:
            self._step_start = None
            if any(g is not None for g in full):
                if self._flat is not None:
                    self._flat.step(full)
                else:
                    self._state = self._run(full, self._state)

    def end_step(self) -> None:
        """End the current optimizer step made of ``step_param`` / ``step_params`` calls; the next call begins one."""
        with self._lock:
            self._step_start = None
            self._stepped = set()

    def _position(self, param: Tensor) -> int:
        index = self._index.get(id(param))
        if index is None or self.params[index] is not param:
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is not one of this optimizer's parameters"
                if isinstance(param, Tensor)
                else f"expected a parameter tensor, got a {type(param).__name__}"
            )
        return index

    def _checked_grad(self, index: int, grad: Any) -> Tensor:
        """The gradient of parameter ``index``, checked before anything is stepped."""
        param = self.params[index]
        if not isinstance(grad, Tensor):
            raise TypeError(f"the gradient of parameter {index} should be a tensor, got a {type(grad).__name__}")
        if grad.shape != param.shape:
            raise ValueError(
                f"the gradient of parameter {index} has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}"
            )
        if grad.device != param.device:
            raise ValueError(f"the gradient of parameter {index} is on {grad.device}, the parameter on {param.device}")
        return grad

    def _run(self, grads: list[Tensor | None], state: OptState) -> OptState:
        """One donated update over the full parameter list (``None`` gradients are skipped)."""
        ctx = UpdateContext(self._spec, donate=True, apply=True)
        with torch.no_grad():
            updates, new_state = self._update(grads, state, list(self.params), ctx)
            if updates is not None:
                add_inplace(self.params, updates)
        return new_state

    def flat_groups(self) -> list[list[int]] | None:
        """With ``flat=True``: the parameter indices of each flat buffer, in buffer order (else ``None``)."""
        if self._flat is None:
            return None
        return [list(group.indices) for group in self._flat.flat.layout.groups]

    def regroup(self, groups: Sequence[Sequence[int]]) -> None:
        """With ``flat=True``: lay the parameters out again, one flat buffer per group of parameter indices, in the
        given order (each index once; a group shares one device and dtype). Values and state are copied over.

        ``register_optimizer_hook(..., flat=True)`` lays the buffers out like DDP's gradient buckets, so that a
        bucket's reduced gradients are already the flat gradient of one buffer and its step copies nothing.
        """
        if self._flat is None:
            raise ValueError("regroup needs a FunctionalOptimizer built with flat=True")
        with self._lock:
            state = self._flat.checkpoint_state()
            flat_params = FlatParams(self.params, groups)  # checks the groups, then re-points the parameters
            self._flat = FlatState(flat_params, self.tx, state)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's format, plus what pureopt keeps beyond it.

        ``{"state": {i: {torch_key: tensor}}, "param_groups": [{"params": [0, ..., n-1]}], "pureopt": {...}}``:
        per-parameter entries by position in ``params`` (none for a parameter that never took a step, as in
        torch), and under ``"pureopt"`` the global state (the ``num_updates`` counter, ...) and the state's record
        types. The tensors are the live state's own; ``torch.save`` copies them.
        """
        with self._lock:
            entries, globals_ = checkpoint_entries(self._layout, self._current(checkpoint=True))
            return {
                "state": entries,
                "param_groups": [{"params": list(range(len(self.params)))}],
                PUREOPT_KEY: {"version": FORMAT_VERSION, "groups": [group_record(_KIND, self._layout, globals_)]},
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or a torch-format dict with the same per-parameter keys).

        Everything is checked first (number of parameters, state keys, shapes, kinds of dtype, the state's
        record types); a mismatch raises a ValueError and leaves the optimizer as it was. Values are copied into
        new buffers on the parameters' devices (cast to the state's dtypes): the optimizer never shares memory
        with the loaded dict. A partial optimizer step in progress is ended.
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("expected a state dict with 'state' and 'param_groups' entries")
        groups = state_dict["param_groups"]
        if not isinstance(groups, Sequence) or len(groups) != 1 or not isinstance(groups[0], Mapping):
            raise ValueError(
                f"loaded state dict has {len(groups) if isinstance(groups, Sequence) else 'no list of'} parameter "
                "groups; a FunctionalOptimizer has one"
            )
        ids = list(groups[0].get("params", []))
        if len(ids) != len(self.params):
            raise ValueError(
                f"loaded state dict has {len(ids)} parameters, this optimizer has {len(self.params)}: it was saved "
                "for a different set of parameters"
            )
        local = {pid: i for i, pid in enumerate(ids)}
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("the state dict's 'state' should be a dict from parameter id to that parameter's state")
        stray = [k for k in saved_state if k not in local]
        if stray:
            raise ValueError(f"loaded state dict has state for parameter id {stray[0]!r}, which no group lists")
        entries = {local[k]: v for k, v in saved_state.items()}
        with torch.no_grad():
            fresh = self.tx.init(tuple(self.params))
        fresh, layout = adopt_saved_layouts(
            StateLayout(fresh, len(self.params)), fresh, entries, self.params, labels=ids
        )
        section = state_dict.get(PUREOPT_KEY)
        globals_: Mapping[str, Any] | None = None
        if section is not None:
            records = section.get("groups") if isinstance(section, Mapping) else None
            if not isinstance(records, Sequence) or len(records) != 1:
                raise ValueError(f"the checkpoint's {PUREOPT_KEY!r} section is malformed")
            globals_ = check_group_record(records[0], None, layout, "the checkpoint", entries)
        new_state, _ = load_entries(layout, fresh, entries, globals_, "the checkpoint", param_label=ids)
        new_flat = None if self._flat is None else FlatState(self._flat.flat, self.tx, new_state)
        with self._lock:
            self._state = None if new_flat is not None else new_state
            self._flat = new_flat
            self._layout = layout
            self._step_start = None
            self._stepped = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} parameters, state records {list(self._layout.types)})"
