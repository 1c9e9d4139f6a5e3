"""``TorchOptimizer``: a pureopt optimizer as a real ``torch.optim.Optimizer``.

``TorchOptimizer(model.parameters(), pureopt.adamw, lr=1e-3, weight_decay=0.01)`` behaves like
``torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)``: ``param_groups`` with per-group options,
``add_param_group``, ``step(closure)``, ``zero_grad``, step and state-dict hooks, ``torch.optim.lr_scheduler``,
``torch.amp.GradScaler``, and ``state_dict`` / ``load_state_dict`` in torch's format (checkpoints of the torch.optim
counterpart load into it and back).

How it works: each param group has its own transformation, built by the factory (``pureopt.adamw``) from the
group's hyperparameters, and its own pure state over the tuple of the group's parameters. The learning rate is
given to the factory as a 0-d tensor that ``step`` refills from ``param_groups[i]["lr"]``, so schedulers that edit
``lr`` take effect without rebuilding anything; a change to any other hyperparameter rebuilds that group's
transformation at the next ``step``, keeping its state. Steps are donated (``UpdateContext(donate=True,
apply=True)``): parameters and state are updated in place, with torch's fused kernels where they apply. The
gradients (``p.grad``) are only read.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Number
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from pureopt import tree as _tree
from pureopt.adapters._amp import donated_step
from pureopt.adapters._flat import FlatParams, FlatState
from pureopt.adapters._state import (
    FORMAT_VERSION,
    PUREOPT_KEY,
    StateLayout,
    check_group_record,
    checkpoint_entries,
    group_record,
    load_entries,
    migrate,
)
from pureopt.base import GradientTransformation, OptState, UpdateContext, as_leaf_update
from pureopt.hyperparams import check_lr

__all__ = ["TorchOptimizer", "TORCH_COUNTERPARTS"]

TORCH_COUNTERPARTS: dict[str, str] = {
    "pureopt.optimizers.sgd.sgd": "SGD",
    "pureopt.optimizers.adam.adam": "Adam",
    "pureopt.optimizers.adam.adamw": "AdamW",
    "pureopt.optimizers.adagrad.adagrad": "Adagrad",
    "pureopt.optimizers.adadelta.adadelta": "Adadelta",
    "pureopt.optimizers.adafactor.adafactor": "Adafactor",
    "pureopt.optimizers.adamax.adamax": "Adamax",
    "pureopt.optimizers.asgd.asgd": "ASGD",
    "pureopt.optimizers.nadam.nadam": "NAdam",
    "pureopt.optimizers.radam.radam": "RAdam",
    "pureopt.optimizers.rmsprop.rmsprop": "RMSprop",
    "pureopt.optimizers.rprop.rprop": "Rprop",
    "pureopt.optimizers.muon.muon": "Muon",
    "pureopt.optimizers.sparse_adam.sparse_adam": "SparseAdam",
}
"""pureopt factory (``module.name``) -> the torch.optim class whose checkpoints it reads and writes.

Used to check torch checkpoints (a hyperparameter of the torch class missing from a saved group means the
checkpoint is from another optimizer) and to add the torch class's fixed options to the param groups (AdamW's
``decoupled_weight_decay=True``), so that torch.optim loads pureopt's checkpoints with the right algorithm."""

# torch.optim's implementation switches: they do not change the numbers, so they are neither passed to the factory
# nor required to match
_TORCH_IMPL_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})
_RESERVED_KEYS = frozenset({"params", "param_names"})


def _qualname(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__name__', type(factory).__name__)}"


@functools.cache
def _torch_defaults(class_name: str) -> dict[str, Any] | None:
    """The default param-group options of ``torch.optim.<class_name>`` (None if it cannot be built here)."""
    cls = getattr(torch.optim, class_name, None)
    if cls is None:
        return None
    try:
        dummy = torch.zeros(1, 1, requires_grad=True)
        return dict(cls([dummy]).defaults)
    except Exception:  # a torch without this class's defaults, or one that needs other arguments
        return None


def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are equal (tensors by value, tuples and lists alike)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


class _Factory:
    """What TorchOptimizer knows about the transformation factory: its hyperparameters and torch counterpart."""

    def __init__(self, factory: Callable[..., GradientTransformation]) -> None:
        self.fn = factory
        self.name: str = getattr(factory, "__name__", type(factory).__name__)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            raise TypeError(f"cannot read the hyperparameters of {self.name}: pass a transformation instead") from None
        self.accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        self.defaults: dict[str, Any] = {}
        for name, p in signature.parameters.items():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            self.defaults[name] = required if p.default is inspect.Parameter.empty else p.default
        self.torch_class = TORCH_COUNTERPARTS.get(_qualname(factory))
        torch_defaults = _torch_defaults(self.torch_class) if self.torch_class is not None else None
        self.torch_keys: frozenset[str] | None = None
        self.implied: dict[str, Any] = {}
        if torch_defaults is not None:
            self.torch_keys = frozenset(k for k in torch_defaults if k not in _TORCH_IMPL_KEYS)
            self.implied = {k: v for k, v in torch_defaults.items() if k in self.torch_keys and k not in self.defaults}

    def accepts(self, key: str) -> bool:
        return key in self.defaults or (self.accepts_any and key not in _RESERVED_KEYS and key not in self.implied)

    def kwargs(self, group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The factory's keyword arguments from a group's options (``lr`` included, as given); checks fixed options."""
        for key, value in self.implied.items():
            if key in group and not _same(group[key], value):
                raise ValueError(
                    f"{where}: {self.name} is torch.optim.{self.torch_class} with {key}={value!r}, "
                    f"but the group has {key}={group[key]!r}"
                )
        kwargs = {k: v for k, v in group.items() if self.accepts(k) and k not in _RESERVED_KEYS}
        for key, default in self.defaults.items():
            if default is required and kwargs.get(key, required) is required:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {key}")
        return kwargs


class _Group:
    """A param group's transformation and pure state (over flat buffers with ``flat=True``)."""

    def __init__(
        self,
        params: tuple[Tensor, ...],
        tx: GradientTransformation,
        state: OptState,
        lr: Tensor | None,
        built_with: dict[str, Any],
    ) -> None:
        self.params = params
        self.tx = tx
        self.update: Any = as_leaf_update(tx)  # the leaf-level update function
        self._state = state
        self.layout = StateLayout(state, len(params))
        self.lr = lr  # the 0-d tensor the factory got as ``lr`` (None for a plain transformation)
        self.built_with = built_with  # the factory arguments other than lr the transformation was built from
        self.flat: FlatState | None = None

    @property
    def state(self) -> OptState:
        """The per-parameter pure state (with ``flat=True``: views of the flat buffers)."""
        return self.flat.per_param() if self.flat is not None else self._state

    def checkpoint_state(self) -> OptState:
        """The state to export: as :attr:`state`, with no 0-d tensor shared between parameters."""
        return self.flat.checkpoint_state() if self.flat is not None else self._state

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


def _lr_value(value: Any, where: str) -> float | Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return value
    if isinstance(value, Number) and not isinstance(value, bool):
        return float(value)  # type: ignore[arg-type]
    raise TypeError(
        f"{where}: lr must be a number or a 1-element tensor, got a {type(value).__name__} "
        "(use torch.optim.lr_scheduler to schedule it)"
    )


def _lr_tensor(value: float | Tensor, params: Sequence[Tensor]) -> Tensor:
    """The 0-d tensor a group's transformation reads its learning rate from, on the parameters' device.

    float64 on CPU (a Python float's precision: torch's CPU fused kernels then give the same bits as with a float
    lr); float32 elsewhere, the only dtype torch's CUDA fused kernels read a tensor lr in.
    """
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    out = torch.zeros((), dtype=dtype, device=device)
    with torch.no_grad():
        out.fill_(value.reshape(()) if isinstance(value, Tensor) else value)
    return out


def _extract_params(param_group: Mapping[str, Any]) -> list[Tensor]:
    """The tensors of a param group as ``add_param_group`` will store them (torch's rules and wording)."""
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
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " + torch.typename(t))
        if not (t.is_leaf or t.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError("a parameter group lists the same parameter twice")
    return tensors


class TorchOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running a pureopt transformation.

    Args:
      params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts (torch's forms).
      tx_or_factory: a factory such as ``pureopt.adamw`` (each group's transformation is built from it with the
        group's hyperparameters) or a ready ``GradientTransformation`` (one group, no hyperparameters: its
        ``state_dict`` then carries the transformation's state fields by name).
      flat: lay each group's parameters and state out in one flat buffer per (device, dtype) (see below).
      **hyperparams: the factory's arguments for all groups (a group dict overrides them), as for torch.optim.

    **Flat buffers** (``flat=True``). Each param group's parameters are copied into one contiguous buffer per
    (device, dtype) and re-pointed to views of it (``p.data``; the parameter objects stay the same), and the
    state of an elementwise transformation (SGD, Adam, AdamW, Adagrad, Lion, ...), or of a segmentwise one
    (:func:`pureopt.base.is_segmentwise`: LAMB, LARS, chains with global-norm clipping, ...) on small
    parameters, is kept in one buffer per kind per group. A step is then one kernel call per group instead of
    one per tensor — the per-tensor cost is what keeps torch's fused optimizers far from the memory-bandwidth
    bound on models with many small tensors. Gradients are gathered with one copy per group, or none when
    ``p.grad`` are views of the group's gradient buffer: ``zero_grad(set_to_none=False)`` makes them so.
    The numbers are exactly those of ``flat=False``: a step where some parameters of a group have no gradient,
    or whose per-parameter step counts differ, runs per tensor on views of the flat buffers (the step after
    which the counts agree again returns to the flat kernel, reading them once); a transformation that is
    neither (Muon, Adafactor, NovoGrad, masks, ...) always steps per tensor.
    ``state_dict`` is torch's per-parameter format, so checkpoints move freely between ``flat=True``,
    ``flat=False`` and torch.optim.

    Behaviour, as torch.optim:

    * parameters whose ``.grad`` is ``None`` are skipped (state untouched); ``p.grad`` is never written;
    * ``param_groups[i]["lr"]`` is read at every step (lr schedulers work); changing another hyperparameter of a
      group rebuilds its transformation at the next step, keeping its state (a field the new options need and
      the old did not, e.g. ``max_exp_avg_sq`` when ``amsgrad`` is switched on, starts at its initial value);
    * ``state[p]`` holds each parameter's state under torch's key names (the live tensors; unlike torch.optim,
      whose state is created at a parameter's first step, it holds the initial state from the start);
    * ``state_dict()`` is torch's format; per-parameter entries exist for parameters that took a step. What torch
      has no place for (the ``num_updates`` counters, the factory's name) is kept under ``"pureopt"``, which
      torch.optim ignores. ``load_state_dict`` takes checkpoints of this class and of the torch.optim
      counterpart (``TORCH_COUNTERPARTS``), checks everything first and changes nothing when it fails.

    Example::

        opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        tx_or_factory: GradientTransformation | Callable[..., GradientTransformation],
        *,
        flat: bool = False,
        **hyperparams: Any,
    ) -> None:
        if not isinstance(flat, bool):
            raise TypeError(f"flat must be a bool, got a {type(flat).__name__}")
        self._flat = flat
        # torch.amp.GradScaler then leaves the gradients scaled and sets self.grad_scale / self.found_inf around
        # step(): torch's fused kernels unscale and skip without a host sync (other transformations: donated_step)
        self._step_supports_amp_scaling = True
        self._groups: list[_Group] = []
        self._view: defaultdict[Tensor, Any] = defaultdict(dict)
        self._view_stale = True
        self._factory: _Factory | None
        self._tx: GradientTransformation | None
        if isinstance(tx_or_factory, GradientTransformation):
            if hyperparams:
                raise TypeError(
                    "hyperparameters were given with a ready transformation; pass a factory (e.g. pureopt.adamw) "
                    f"to set them: got {sorted(hyperparams)}"
                )
            self._factory, self._tx, defaults = None, tx_or_factory, {}
        elif callable(tx_or_factory):
            self._factory, self._tx = _Factory(tx_or_factory), None
            unknown = [k for k in hyperparams if not self._factory.accepts(k)]
            if unknown:
                raise TypeError(f"{self._factory.name} has no hyperparameter {unknown[0]!r}")
            defaults = {**self._factory.defaults, **self._factory.implied, **hyperparams}
        else:
            raise TypeError(f"expected a GradientTransformation or a factory, got a {type(tx_or_factory).__name__}")
        super().__init__(params, defaults)

    # --- torch's state view -----------------------------------------------------------------------------------

    @property
    def state(self) -> defaultdict[Tensor, Any]:
        """Each parameter's state under torch's key names (the live tensors of the pure states)."""
        if self._view_stale:
            self._view.clear()
            for g in self._groups:
                per_param, _ = g.layout.export(g.checkpoint_state())
                for p, entry in zip(g.params, per_param):
                    if entry:
                        self._view[p] = entry
            self._view_stale = False
        return self._view

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        self._view = value  # torch.optim.Optimizer.__init__ assigns an empty dict; the view is rebuilt on read
        self._view_stale = True

    @property
    def opt_states(self) -> list[OptState]:
        """The pure state of each param group (buffers are updated in place by later steps)."""
        return [g.state for g in self._groups]

    # --- groups -----------------------------------------------------------------------------------------------

    def _build(self, params: Sequence[Tensor], options: Mapping[str, Any], where: str) -> _Group:
        """A group's transformation and initial state (nothing is registered)."""
        if self._factory is None:
            assert self._tx is not None
            tx, lr, built_with = self._tx, None, {}
        else:
            kwargs = self._factory.kwargs(options, where)
            lr = None
            if "lr" in kwargs:
                value = _lr_value(kwargs["lr"], where)
                check_lr(value)
                lr = _lr_tensor(value, params)
                kwargs["lr"] = lr
            tx = self._factory.fn(**kwargs)
            if not isinstance(tx, GradientTransformation):
                raise TypeError(f"{self._factory.name} returned a {type(tx).__name__}, not a GradientTransformation")
            built_with = copy.deepcopy({k: v for k, v in kwargs.items() if k != "lr"})
        with torch.no_grad():
            state = tx.init(tuple(params))
        return _Group(tuple(params), tx, state, lr, built_with)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's semantics); its transformation is built from its options first.

        A group that cannot be built (bad hyperparameters, a parameter already in another group, ...) raises and
        nothing is added.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if self._factory is None and self.param_groups:
            raise ValueError(
                "a TorchOptimizer built from a ready transformation has one param group; build it from a factory "
                "(e.g. TorchOptimizer(params, pureopt.adamw, lr=...)) to use several"
            )
        params = _extract_params(param_group)
        existing = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in existing for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k not in _RESERVED_KEYS}}
        group = self._build(params, options, f"param group {len(self.param_groups)}")
        if self._flat:
            FlatParams.check(params)
        super().add_param_group(param_group)
        if self._flat:
            group.make_flat(FlatParams(params))
        self._groups.append(group)
        self._view_stale = True

    def _plan(self, index: int, group: Mapping[str, Any]) -> tuple[GradientTransformation, Any, Any, Any] | None:
        """The rebuild a group needs before stepping (``(tx, built_with, state, layout)``), or None.

        Computed for every group before any is stepped, so that a bad option raises with nothing changed.
        """
        g = self._groups[index]
        where = f"param_groups[{index}]"
        current = group["params"]
        if len(current) != len(g.params) or any(a is not b for a, b in zip(current, g.params)):
            raise ValueError(f"{where}['params'] was changed; add parameters with add_param_group instead")
        if self._factory is None:
            return None
        kwargs = self._factory.kwargs(group, where)
        if "lr" in kwargs:
            _lr_value(kwargs["lr"], where)
        options = {k: v for k, v in kwargs.items() if k != "lr"}
        if options.keys() == g.built_with.keys() and all(_same(options[k], g.built_with[k]) for k in options):
            return None
        return self._rebuild(g, kwargs, options)

    def _rebuild(
        self, g: _Group, kwargs: dict[str, Any], options: dict[str, Any]
    ) -> tuple[GradientTransformation, Any, Any, Any]:
        """:meth:`_rebuild_eager`, kept out of torch.compile graphs (it is rare, and its state checks call optree
        functions dynamo cannot trace). torch._dynamo is only imported when compiling: importing it costs seconds."""
        if torch.compiler.is_compiling():
            import importlib

            dynamo = importlib.import_module("torch._dynamo")
            return dynamo.disable(self._rebuild_eager)(g, kwargs, options)
        return self._rebuild_eager(g, kwargs, options)

    def _rebuild_eager(
        self, g: _Group, kwargs: dict[str, Any], options: dict[str, Any]
    ) -> tuple[GradientTransformation, Any, Any, Any]:
        """A group's transformation rebuilt from new options, and its state carried over (nothing is changed)."""
        assert self._factory is not None
        if "lr" in kwargs:
            assert g.lr is not None
            kwargs = {**kwargs, "lr": g.lr}
        tx = self._factory.fn(**kwargs)
        built_with = copy.deepcopy(options)
        if self._same_layout(tx, g):
            return tx, built_with, g.state, g.layout
        with torch.no_grad():
            fresh = tx.init(g.params)
        layout = StateLayout(fresh, len(g.params))
        return tx, built_with, migrate(g.layout, g.state, layout, fresh), layout

    @staticmethod
    def _same_layout(tx: GradientTransformation, g: _Group) -> bool:
        """Whether ``tx`` keeps a state of the same structure, shapes and dtypes (checked on the meta device)."""
        try:
            with torch.no_grad():
                meta = tx.init(tuple(torch.empty_like(p, device="meta") for p in g.params))
        except Exception:  # an init that cannot run on meta tensors: rebuild the state to be safe
            return False
        leaves, spec = _tree.flatten(meta)
        if spec != g.layout.spec:
            return False
        for new, old in zip(leaves, _tree.leaves(g.state)):
            if isinstance(new, Tensor) != isinstance(old, Tensor):
                return False
            if isinstance(new, Tensor) and (new.shape != old.shape or new.dtype != old.dtype):
                return False
        return True

    # --- stepping ---------------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step over every group; ``closure`` (re-evaluates the loss) is called first.

        Returns the closure's loss (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]
        for group, g, plan in zip(self.param_groups, self._groups, plans):
            if plan is not None:
                tx, g.built_with, state, layout = plan
                g.set(tx, state, layout)
            grads = [p.grad for p in g.params]
            if all(x is None for x in grads):
                continue
            if g.lr is not None:
                lr = group["lr"]
                g.lr.fill_(lr.reshape(()) if isinstance(lr, Tensor) else lr)
            # set by torch.amp.GradScaler around step() (see _step_supports_amp_scaling)
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            if g.flat is not None:
                g.flat.step(grads, {"grad_scale": grad_scale, "found_inf": found_inf})
                continue
            # the structure is flattened here rather than cached: torch.compile traces optree's Python-level
            # flattening but cannot call methods of a PyTreeSpec built outside the traced region
            spec = _tree.flatten(g.params)[1]
            ctx = UpdateContext(spec, donate=True, apply=True, grad_scale=grad_scale, found_inf=found_inf)
            g._state = donated_step(g.update, grads, g._state, list(g.params), ctx)
        self._view_stale = True
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (torch's semantics). With ``flat=True`` and ``set_to_none=False``, every ``p.grad``
        becomes a zeroed view of the group's flat gradient buffer, so that backward accumulates straight into it
        and the next step copies nothing."""
        if not self._flat or set_to_none:
            super().zero_grad(set_to_none)
            return
        for g in self._groups:
            assert g.flat is not None
            g.flat.flat.zero_grad_views()

    # --- checkpoints ------------------------------------------------------------------------------------------

    @property
    def _kind(self) -> str:
        return self._factory.name if self._factory is not None else "transform"

    def state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's format (``{"state": {id: {key: tensor}}, "param_groups": [...]}``).

        Per-parameter entries use torch's key names and exist for parameters that took a step; the ``"pureopt"``
        entry keeps the global state (``num_updates`` counters), the factory's name and the state's record
        types. The tensors are the live state's own (``torch.save`` copies them). State-dict hooks run as in
        torch.optim.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        packed_state: dict[int, dict[str, Tensor]] = {}
        packed_groups: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        start = 0
        for group, g in zip(self.param_groups, self._groups):
            ids = list(range(start, start + len(g.params)))
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = ids
            packed_groups.append(packed)
            entries, globals_ = checkpoint_entries(g.layout, g.checkpoint_state())
            packed_state.update({ids[i]: entry for i, entry in entries.items()})
            records.append(group_record(self._kind, g.layout, globals_))
            start += len(g.params)
        state_dict: dict[str, Any] = {
            "state": packed_state,
            "param_groups": packed_groups,
            PUREOPT_KEY: {"version": FORMAT_VERSION, "groups": records},
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint of this class or of the torch.optim counterpart; torch's semantics, checked first.

        As in torch.optim, the saved param groups' options replace the current ones (``params`` stay) and state
        is matched to parameters by position. Before anything changes, every group is rebuilt from its saved
        options and the state is checked: number of groups and parameters, the optimizer kind (the saved state
        keys, the ``"pureopt"`` record, and for torch checkpoints the torch class's options), shapes and kinds
        of dtype. On any mismatch a ValueError is raised and the optimizer is left exactly as it was. Loaded
        values are copied into new buffers on the parameters' devices. Load hooks run as in torch.optim.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("expected a state dict with 'state' and 'param_groups' entries")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, Sequence) or len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups):
            if not isinstance(saved, Mapping) or len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("the state dict's 'state' should be a dict from parameter id to that parameter's state")
        section = state_dict.get(PUREOPT_KEY)
        records: Sequence[Any] | None = None
        if section is not None:
            records = section.get("groups") if isinstance(section, Mapping) else None
            if not isinstance(records, Sequence) or len(records) != len(self.param_groups):
                raise ValueError(f"the checkpoint's {PUREOPT_KEY!r} section is malformed")
        owner: dict[Any, tuple[int, int]] = {}
        for gi, saved in enumerate(saved_groups):
            for li, pid in enumerate(saved["params"]):
                if pid in owner:
                    raise ValueError(f"loaded state dict lists parameter id {pid!r} in more than one place")
                owner[pid] = (gi, li)
        stray = [k for k in saved_state if k not in owner]
        if stray:
            raise ValueError(f"loaded state dict has state for parameter id {stray[0]!r}, which no group lists")
        entries: list[dict[int, Any]] = [{} for _ in saved_groups]
        for pid, entry in saved_state.items():
            gi, li = owner[pid]
            entries[gi][li] = entry

        new_groups: list[dict[str, Any]] = []
        new_runtime: list[_Group] = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"param group {gi}"
            options = self._loaded_options(saved, group, where)
            try:
                g = self._build(group["params"], options, f"{where} of the checkpoint")
            except (TypeError, ValueError) as e:  # the factory rejects the saved options
                message = str(e) if str(e).startswith(where) else f"{where} of the checkpoint: {e}"
                raise ValueError(message) from e
            globals_ = None
            if records is not None:
                kind = self._factory.name if self._factory is not None else None
                globals_ = check_group_record(records[gi], kind, g.layout, where)
            g._state = load_entries(g.layout, g.state, entries[gi], globals_, where, param_label=list(saved["params"]))
            current = self._groups[gi].flat
            if current is not None:
                g.make_flat(current.flat)  # new flat state buffers over the same flat parameters
            new_group = dict(options)
            new_group["params"] = group["params"]
            if "param_names" in saved:
                new_group["param_names"] = list(saved["param_names"])
            elif "param_names" in group:
                new_group["param_names"] = group["param_names"]
            new_groups.append(new_group)
            new_runtime.append(g)
        # everything checked and built: commit
        self.param_groups = new_groups
        self._groups = new_runtime
        self._view_stale = True
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_options(self, saved: Mapping[str, Any], group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """A group's options after loading ``saved`` over ``group``: torch's rule (saved options win), checked.

        A hyperparameter of the factory that the checkpoint lacks (pureopt's own, such as ``impl``, in a torch
        checkpoint) keeps its current value, unless it is one of the torch counterpart's options: then the
        checkpoint is from another optimizer. Other options only the current group has are dropped, as in torch.
        """
        options = {k: copy.deepcopy(v) for k, v in saved.items() if k not in _RESERVED_KEYS}
        if self._factory is None:
            return options
        factory = self._factory
        for key, value in group.items():
            if key in _RESERVED_KEYS or key in options:
                continue
            if factory.torch_keys is not None and key in factory.torch_keys:
                raise ValueError(
                    f"{where} of the checkpoint has no {key!r}, an option of torch.optim.{factory.torch_class}: "
                    f"it was saved by a different optimizer than {factory.name}"
                )
            if factory.accepts(key):
                options[key] = value
        for key, value in factory.implied.items():
            if key not in options:
                options[key] = value
        return options

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "a TorchOptimizer cannot be pickled or deep-copied (its transformations hold closures over its "
            "buffers); save and load its state_dict() instead"
        )

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__}[{self._kind}] (", 1)
