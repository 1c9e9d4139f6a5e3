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

``opt.state`` is live (:mod:`pureopt.adapters._live`): its tensors are the pure state's, writes to them reach the
pure state (checked first), and keys a client adds are kept and saved. Under ``torch.compile`` the learning rates
are refilled by one opaque custom op (``pureopt::refill_lrs``) that reads ``param_groups`` when the graph runs, so
that a changed lr neither recompiles nor is lost (see :mod:`pureopt.adapters._lr`).
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from pureopt import tree as _tree
from pureopt.adapters._amp import donated_step
from pureopt.adapters._checkpoint import (
    GROUP_KEY,
    asked_by_dcp,
    checked_globals,
    loaded_stepped,
    record_globals,
    saved_record,
    saved_records,
)
from pureopt.adapters._factory import (
    _RESERVED_KEYS,
    _TORCH_READ_WITH_DEFAULT,
    TORCH_COUNTERPARTS,
    _check_betas_kinds,
    _Factory,
    _same,
    _torch_filled_options,
)
from pureopt.adapters._flat import FlatParams
from pureopt.adapters._groups import _distinct, _extract_params, _Group
from pureopt.adapters._layouts import adopt_saved_layouts
from pureopt.adapters._live import LiveState, ParamState
from pureopt.adapters._lr import _KEYS, _LIVE_OPTIMIZERS, _fill_lr, _lr_tensor, _lr_value
from pureopt.adapters._options import loaded_option, saved_option
from pureopt.adapters._state import (
    PUREOPT_KEY,
    StateLayout,
    as_state_tensor,
    checkpoint_entries,
    load_entries,
    migrate_entries,
)
from pureopt.adapters._tree_args import check_complete, read_tree_args
from pureopt.base import GradientTransformation, OptState, UpdateContext, add_inplace
from pureopt.hyperparams import check_lr
from pureopt.kernels.fused import is_amp_native

__all__ = ["TorchOptimizer", "TORCH_COUNTERPARTS"]


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

    * ``params`` and a group's ``"params"`` may be any iterable (lists, generators, ``named_parameters()``); a
      parameter listed twice in a group warns as torch does and is stepped once per listing (torch's loop);
    * parameters whose ``.grad`` is ``None`` are skipped (state untouched); ``p.grad`` is never written (except
      by torch's fused kernels unscaling it under GradScaler with ``impl="fused"``, as torch's ``fused=True``);
    * ``param_groups[i]["lr"]`` is read at every step (lr schedulers work, under ``torch.compile`` too, without
      recompiling); changing another hyperparameter of a group rebuilds its transformation at the next step,
      keeping its state (a field the new options need and the old did not, e.g. ``max_exp_avg_sq`` when
      ``amsgrad`` is switched on, starts at its initial value, or at the tensor a client put under that key);
    * ``step(closure)`` calls the closure once, as torch does, and L-BFGS (``pureopt.lbfgs``) calls it again for
      each re-evaluation, as ``torch.optim.LBFGS``; it returns the first loss;
    * ``step(hessian=...)`` gives Sophia-G (``pureopt.sophia_g``) its Hessian-diagonal estimate, per parameter
      (see :meth:`step`; the reference's ``update_hessian()`` has no counterpart: pass its estimate to the next step);
    * ``state[p]`` holds each parameter's state under torch's key names: the live tensors (unlike torch.optim,
      whose state is created at a parameter's first step, it holds the initial state from the start). Assigning
      a tensor to one of those keys writes it into the optimizer's state (same shape and kind of dtype, else a
      ValueError); other keys are the client's and are kept, saved and loaded as in torch;
    * ``state_dict()`` is torch's format; per-parameter entries exist for parameters that took a step (or carry
      a client's keys; under ``torch.distributed.checkpoint.state_dict``, for every parameter that requires grad).
      What torch has no place for (the ``num_updates`` counters, the factory's name) is kept in each param group
      under ``"pureopt"``, where DCP and ZeroRedundancyOptimizer keep it and torch.optim ignores it.
      ``load_state_dict`` takes checkpoints of this class (older ones with a top-level ``"pureopt"`` entry
      included) and of the torch.optim counterpart (``TORCH_COUNTERPARTS``), older ones without options torch
      added later included (they get torch's values for them), checks everything first and changes nothing when
      it fails;
    * ``copy.deepcopy`` gives an independent optimizer over deep-copied parameters; ``pickle`` stores the factory
      by reference (a hand-built transformation made of closures cannot be pickled: a TypeError says so);
    * ``_step_supports_amp_scaling`` is True only where every group runs torch's fused kernel by request
      (``impl="fused"`` with SGD, Adam, AdamW or Adagrad), as only torch's ``fused=True`` optimizers advertise
      it; otherwise ``torch.amp.GradScaler`` unscales the gradients before ``step``.

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
        self._groups: list[_Group] = []
        self._records_stale = False  # the groups' live records (param_groups[i]["pureopt"]) need a refresh
        self._live: LiveState = LiveState(self)
        self._hyperparams = dict(hyperparams)
        self._key = next(_KEYS)
        _LIVE_OPTIMIZERS[self._key] = self
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
            self._check_defaults(defaults)
        else:
            raise TypeError(f"expected a GradientTransformation or a factory, got a {type(tx_or_factory).__name__}")
        super().__init__(params, defaults)

    def _check_defaults(self, defaults: Mapping[str, Any]) -> None:
        """Validate the hyperparameters before the parameters are looked at, as torch.optim's classes do (a bad
        ``lr`` is a ValueError even when ``params`` is bad too). Skipped while a required one is missing."""
        assert self._factory is not None
        if any(v is required for v in defaults.values()):
            return
        kwargs = self._factory.kwargs(defaults, "the optimizer's defaults")
        _check_betas_kinds(self._factory.torch_class, kwargs, "the optimizer's defaults")
        if "lr" in kwargs:
            value = _lr_value(kwargs["lr"], "the optimizer's defaults")
            check_lr(kwargs["lr"])  # the value as given: torch words its error so
            kwargs["lr"] = _lr_tensor(value, ())
        self._factory.fn(**kwargs)

    # --- param groups and torch's state view ----------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The param groups (torch's list of option dicts). Each holds, under ``"pureopt"``, the group's global
        state (``{"globals": {"num_updates": tensor, ...}}``): refreshed after a step; a record put there by a client
        (ZeroRedundancyOptimizer's ``load_state_dict`` copies the saved groups' in) is adopted at the next ``step``
        or ``state_dict``."""
        if self._records_stale:
            self._records_stale = False
            for g in self._groups:
                g.record["globals"] = dict(g.globals())
        return self._param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        # kept under another name so that step() can read it without ``self.param_groups``: under torch.compile,
        # dynamo treats that attribute of an optimizer specially and guards on every value of every group, the
        # learning rates included (a recompile when one changes)
        self._param_groups = value

    @property
    def state(self) -> LiveState:
        """Each parameter's state under torch's key names (the live tensors of the pure states) and the keys
        clients added (see :mod:`pureopt.adapters._live`)."""
        live = self._live
        if live.stale:
            live.sync()
        return live

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty defaultdict; any other mapping is written entry by entry
        if value is self._live:
            return
        self._live.assign_all(list(value.items()))

    def _adopt_records(self) -> None:
        """Take over the global state of records a client put in ``param_groups`` (every one checked before any is
        adopted); a removed record is put back."""
        adopted = []
        for i, (group, g) in enumerate(zip(self._param_groups, self._groups)):
            record = group.get(GROUP_KEY)
            if record is g.record:
                continue
            if record is not None:
                where = f"param_groups[{i}][{GROUP_KEY!r}]"
                adopted.append((g, checked_globals(record, g.layout, g.globals(), where)))
            group[GROUP_KEY] = g.record
        for g, values in adopted:
            g.set_globals(values)
        if adopted:
            self._records_stale = True
            self._live.stale = True

    def _check_flat_params(self) -> None:
        """With ``flat=True``, refuse to step parameters that no longer live in the group's flat buffer (their
        ``.data`` was re-pointed after the optimizer was built): the step would update the buffer, not them."""
        for gi, g in enumerate(self._groups):
            if g.flat is None:
                continue
            flat = g.flat.flat
            for b, group in enumerate(flat.layout.groups):
                if flat.detached[b] or not group.indices:
                    continue
                i = group.indices[0]
                p = flat.params[i]
                if p.untyped_storage().data_ptr() != flat.buffers[b].untyped_storage().data_ptr():
                    raise RuntimeError(
                        f"flat=True: parameter {i} of param group {gi} no longer lives in the optimizer's flat buffer: "
                        "its .data was re-pointed after the optimizer was built (ZeroRedundancyOptimizer does so with "
                        "parameters_as_bucket_view=True), and a step would leave it unchanged. Use flat=False, or "
                        "parameters_as_bucket_view=False"
                    )

    def _live_sync(self) -> None:
        """Refresh every parameter's pure keys in :attr:`state` with the current state's tensors."""
        for g in self._groups:
            for ps, entry in zip(g.views, g.entries()):
                ps.set_pure(entry)

    def _live_write(self, ps: ParamState, values: Mapping[str, Any]) -> dict[str, Any]:
        """Check and write a client's values for ``ps``'s pure keys; returns the live tensors now under them."""
        g = self._groups[ps.group]
        where = f"opt.state[p] of param_groups[{ps.group}]"
        current = g.entries()[ps.index]
        checked: dict[str, Tensor] = {}
        for key, value in values.items():
            like = current[key]
            if value is like:
                continue
            tensor = as_state_tensor(value, like, f"{where}[{key!r}]")
            if tensor.dtype != like.dtype or tensor.device != like.device or tensor.stride() != like.stride():
                tensor = torch.empty_like(like).copy_(tensor.detach())
            checked[key] = tensor
        if checked:
            g.write(ps.index, checked)
            g.unstepped.discard(ps.index)  # written state is no longer the initial one: saved from now on
            self._live.stale = True
        now = g.entries()[ps.index]
        return {key: now[key] for key in values}

    @property
    def opt_states(self) -> list[OptState]:
        """The pure state of each param group (buffers are updated in place by later steps)."""
        return [g.state for g in self._groups]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``torch.amp.GradScaler`` should hand this optimizer scaled gradients (``grad_scale`` /
        ``found_inf`` set around ``step``), as for torch's ``fused=True`` optimizers: only when every group runs
        torch's fused kernel by request (``impl="fused"``, an algorithm registered amp-native: SGD, Adam/AdamW,
        Adagrad). Anything else gets unscaled gradients from GradScaler (which then skips inf steps itself), so
        that gradient clipping and hooks between ``backward`` and ``step`` see true gradients, as with torch's
        default optimizers."""
        if self._factory is None or not self._groups:
            return False
        return all(
            group.get("impl") == "fused" and is_amp_native(g.update)
            for group, g in zip(self.param_groups, self._groups)
        )

    # --- groups -----------------------------------------------------------------------------------------------

    def _build(self, listed: Sequence[Tensor], options: Mapping[str, Any], where: str) -> _Group:
        """A group's transformation and initial state (nothing is registered)."""
        params = _distinct(listed)
        if self._factory is None:
            assert self._tx is not None
            tx, lr, built_with = self._tx, None, {}
        else:
            kwargs = self._factory.kwargs(options, where)
            _check_betas_kinds(self._factory.torch_class, kwargs, where)
            lr = None
            if "lr" in kwargs:
                value = _lr_value(kwargs["lr"], where)
                check_lr(kwargs["lr"])
                lr = _lr_tensor(value, params)
                kwargs["lr"] = lr
            tx = self._factory.fn(**kwargs)
            if not isinstance(tx, GradientTransformation):
                raise TypeError(f"{self._factory.name} returned a {type(tx).__name__}, not a GradientTransformation")
            built_with = copy.deepcopy({k: v for k, v in kwargs.items() if k != "lr"})
        with torch.no_grad():
            state = tx.init(params)
        return _Group(listed, tx, state, lr, built_with)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch's semantics); its transformation is built from its options first.

        ``param_group["params"]`` may be any iterable (it is replaced by a list, as torch does). A group that
        cannot be built (bad hyperparameters, a parameter already in another group, ...) raises and nothing is
        added.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if self._factory is None and self.param_groups:
            raise ValueError(
                "a TorchOptimizer built from a ready transformation has one param group; build it from a factory "
                "(e.g. TorchOptimizer(params, pureopt.adamw, lr=...)) to use several"
            )
        listed = _extract_params(param_group)
        param_group.pop(GROUP_KEY, None)  # a record copied from another optimizer's group: this group keeps its own
        existing = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in existing for p in listed):
            raise ValueError("some parameters appear in more than one parameter group")
        options = {**self.defaults, **{k: v for k, v in param_group.items() if k not in _RESERVED_KEYS}}
        group = self._build(listed, options, f"param group {len(self.param_groups)}")
        if self._flat:
            if len(group.params) != len(listed):
                raise ValueError("flat=True: a param group lists the same parameter more than once")
            if group.needs_closure:
                raise ValueError("flat=True does not apply to L-BFGS, which works on one flat vector already")
            FlatParams.check(listed)
        super().add_param_group(param_group)  # torch's checks and warnings; stores the group
        if self._flat:
            group.make_flat(FlatParams(group.params))
        index = len(self._groups)
        group.views = [self._live.register(p, index, i) for i, p in enumerate(group.params)]
        self._groups.append(group)
        param_group[GROUP_KEY] = group.record
        self._records_stale = True
        self._live.stale = True

    def _plan(self, index: int, group: Mapping[str, Any]) -> tuple[GradientTransformation, Any, Any, Any] | None:
        """The rebuild a group needs before stepping (``(tx, built_with, state, layout)``), or None.

        Computed for every group before any is stepped, so that a bad option raises with nothing changed.
        """
        g = self._groups[index]
        where = f"param_groups[{index}]"
        current = group["params"]
        if len(current) != len(g.listed) or any(a is not b for a, b in zip(current, g.listed)):
            raise ValueError(f"{where}['params'] was changed; add parameters with add_param_group instead")
        if self._factory is None:
            return None
        compiling = torch.compiler.is_compiling()  # then lr is read (and checked) by pureopt::refill_lrs
        kwargs = self._factory.kwargs(group, where, read_lr=not compiling)
        if "lr" in kwargs and not compiling:
            _lr_value(kwargs["lr"], where)
        options = {k: v for k, v in kwargs.items() if k != "lr"}
        if options.keys() == g.built_with.keys() and all(_same(options[k], g.built_with[k]) for k in options):
            return None
        _check_betas_kinds(self._factory.torch_class, options, where)
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
        """A group's transformation rebuilt from new options, and its state carried over (nothing is changed).

        A field the new state keeps and the old did not takes the tensor a client put under its key in
        ``opt.state[p]`` (torch's optimizers would use it), if one is there and fits; else its initial value.
        """
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
        per_param, globals_ = g.layout.export(g.checkpoint_state())
        fresh, layout = adopt_saved_layouts(
            StateLayout(fresh, len(g.params)), fresh, dict(enumerate(per_param)), g.params
        )
        for i, ps in enumerate(g.views):  # clients' tensors under keys only the new state keeps
            for key, value in ps.extras().items():
                if isinstance(value, Tensor) and key in layout.param_keys[i] and key not in per_param[i]:
                    per_param[i] = {**per_param[i], key: value}
        return tx, built_with, migrate_entries(per_param, globals_, layout, fresh), layout

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

    def _lr_values(self) -> list[float | Tensor]:
        """Each lr-taking group's ``param_groups[i]["lr"]``, checked (torch's wording)."""
        values: list[float | Tensor] = []
        for i, (group, g) in enumerate(zip(self.param_groups, self._groups)):
            if g.lr is not None:
                values.append(_lr_value(group["lr"], f"param_groups[{i}]"))
        return values

    def _refill_lrs(self) -> None:
        """Copy ``param_groups[i]["lr"]`` into the lr tensors the groups' transformations read."""
        lrs = [g.lr for g in self._groups if g.lr is not None]
        if not lrs:
            return
        if torch.compiler.is_compiling():
            torch.ops.pureopt.refill_lrs(lrs, self._key)
            return
        with torch.no_grad():
            for target, value in zip(lrs, self._lr_values()):
                _fill_lr(target, value)

    def step(self, closure: Callable[[], Any] | None = None, **per_param: Any) -> Any:
        """One optimization step over every group; ``closure`` (re-evaluates the loss) is called first.

        L-BFGS also calls the closure at every re-evaluation of its step (as ``torch.optim.LBFGS``); other
        algorithms call it once. Returns the closure's first loss (``None`` without a closure).

        Further keywords are per-parameter trees that the groups' algorithms declare as arguments of ``update``
        (:mod:`pureopt.adapters._tree_args`): Sophia-G's ``hessian=``, the estimate of each parameter's Hessian
        diagonal, used by this step (its running average moves only on steps that get one). Each is given as a dict
        ``{param: tensor}`` or as a list aligned with ``[p for g in opt.param_groups for p in g["params"]]`` (``None``
        for a parameter without one; ``hessian=None`` is a step without). A group gets an entry for every parameter that
        has a gradient this step, or none; entries of parameters without a gradient are skipped, as their gradients are.
        A keyword no group takes (``hessian=`` for AdamW), another kind of value, a wrong length, a tensor of another
        shape or device, ``flat=True`` and a Sophia inside ``pureopt.partition`` / ``masked`` raise before the closure
        runs; a group given entries for only some of its parameters with a gradient raises after it, before any group
        steps. Nothing is changed when one does.

        Example::

            opt = TorchOptimizer(model.parameters(), pureopt.sophia_g, lr=2e-4, rho=0.05)
            opt.step(hessian={p: bs * g_hat[p] ** 2 for p in model.parameters()})  # every k steps
        """
        tree_args = read_tree_args(self._groups, per_param, self._kind, self._flat)
        if closure is None and any(g.needs_closure for g in self._groups):
            raise ValueError(
                "L-BFGS re-evaluates the objective during its step: call step(closure), with a closure that clears "
                "the gradients, computes the loss, calls backward() and returns the loss (as for torch.optim.LBFGS)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(tree_args):
            check_complete(self._groups, tree_args)
        if self._flat:
            self._check_flat_params()
        if any(group.get(GROUP_KEY) is not g.record for group, g in zip(self._param_groups, self._groups)):
            self._adopt_records_outside_graph()
        plans = [self._plan(i, group) for i, group in enumerate(self._param_groups)]
        for g, plan in zip(self._groups, plans):
            if plan is not None:
                tx, g.built_with, state, layout = plan
                g.set(tx, state, layout)
        self._refill_lrs()
        # set by torch.amp.GradScaler around step() (see _step_supports_amp_scaling)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for g, extra in zip(self._groups, tree_args):
            for grads in g.passes():
                if all(x is None for x in grads):
                    continue
                g.mark_stepped(grads)
                if g.flat is not None:
                    g.flat.step(grads, {"grad_scale": grad_scale, "found_inf": found_inf})
                    continue
                # the structure is flattened here rather than cached: torch.compile traces optree's Python-level
                # flattening but cannot call methods of a PyTreeSpec built outside the traced region
                spec = _tree.flatten(g.params)[1]
                ctx = UpdateContext(
                    spec,
                    {k: tuple(v) for k, v in extra.items()},
                    donate=True,
                    apply=True,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
                if g.needs_closure and closure is not None:
                    args = {**ctx.extra_args, **_closure_args(g, closure, loss)}
                    g._state = _closure_step(g, grads, ctx.but(extra_args=args))
                else:
                    g._state = donated_step(g.update, grads, g._state, list(g.params), ctx)
        self._live.stale = True
        self._records_stale = True
        return loss

    def _adopt_records_outside_graph(self) -> None:
        """:meth:`_adopt_records`, kept out of torch.compile graphs (it is rare, as :meth:`_rebuild`)."""
        if torch.compiler.is_compiling():
            import importlib

            importlib.import_module("torch._dynamo").disable(self._adopt_records)()
            return
        self._adopt_records()

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
        """The state in torch.optim's format (``{"state": {id: {key: value}}, "param_groups": [...]}``).

        Per-parameter entries use torch's key names and exist for parameters that took a step, plus the entries
        clients added to ``opt.state[p]`` (any value, as torch saves them); state clients keep under other keys
        is saved under those keys, as torch does. When ``torch.distributed.checkpoint.state_dict`` asks
        (``get_state_dict`` & co.), every parameter that requires a gradient has an entry (its initial state if it
        has not stepped), so that DCP's template for a fresh optimizer asks for everything a checkpoint may hold.
        Parameter ids are torch's: a parameter listed twice in a group has one id. Each group's ``"pureopt"``
        record keeps the global state (``num_updates`` counters), the factory's name, the state's record types,
        which parameters have entries (and the sum of their step counts) and which keys are the clients' (see
        :mod:`pureopt.adapters._checkpoint`); torch.optim ignores it. The tensors are the live state's own
        (``torch.save`` copies them). State-dict hooks run as in torch.optim.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._adopt_records()
        complete = asked_by_dcp()
        self.state  # noqa: B018 - refreshes the live view
        packed_state: dict[Any, dict[str, Any]] = {}
        packed_groups: list[dict[str, Any]] = []
        start = 0
        for group, g in zip(self.param_groups, self._groups):
            # torch's numbering: positions in the list, a parameter listed twice gets its last position's
            id_of = {id(p): start + k for k, p in enumerate(g.listed)}
            ids = [id_of[id(p)] for p in g.params]
            packed = {k: saved_option(v) for k, v in group.items() if k not in ("params", GROUP_KEY)}
            entries, globals_ = checkpoint_entries(g.layout, g.checkpoint_state(), never=g.unstepped)
            stepped = list(entries)
            if complete:  # DCP's template must ask for every parameter that may have stepped by the time it loads
                current = g.entries()
                for i, p in enumerate(g.params):
                    if p.requires_grad and i not in entries and current[i]:
                        entries[i] = dict(current[i])
            record = saved_record(self._kind, g.layout, globals_, entries, stepped)
            extras: dict[str, list[str]] = {}
            for i, ps in enumerate(g.views):
                own = ps.extras()
                if own:
                    entries[i] = {**entries.get(i, {}), **own}
                    extras[str(i)] = [str(k) for k in own]
            packed_state.update({ids[i]: entries[i] for i in sorted(entries)})
            if extras:
                record["extras"] = extras
            packed[GROUP_KEY] = record
            packed["params"] = [id_of[id(p)] for p in g.listed]
            packed_groups.append(packed)
            start += len(g.listed)
        packed_state.update(self._live.others())
        state_dict: dict[str, Any] = {"state": packed_state, "param_groups": packed_groups}
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
        of dtype. A saved group without an option torch added later (``maximize``, ``foreach``, ...) gets
        torch's value for it. Entries a client had added to ``opt.state[p]`` are loaded back there (tensors cast
        as torch does), and state under keys that are not parameter ids is kept as is. On any mismatch a
        ValueError is raised and the optimizer is left exactly as it was. Loaded values are copied into new
        buffers on the parameters' devices. Load hooks run as in torch.optim.
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
        records = saved_records(state_dict, len(self.param_groups))
        owner: dict[Any, tuple[int, int]] = {}
        for gi, saved in enumerate(saved_groups):
            g = self._groups[gi]
            index_of = {id(p): i for i, p in enumerate(g.params)}
            for pid, p in zip(saved["params"], g.listed):
                place = (gi, index_of[id(p)])
                if owner.setdefault(pid, place) != place:
                    raise ValueError(f"loaded state dict lists parameter id {pid!r} for two different parameters")
        stray = [k for k in saved_state if k not in owner and isinstance(k, int)]
        if stray:
            raise ValueError(f"loaded state dict has state for parameter id {stray[0]!r}, which no group lists")
        others = {k: v for k, v in saved_state.items() if k not in owner}
        entries: list[dict[int, Any]] = [{} for _ in saved_groups]
        for pid, entry in saved_state.items():
            if pid in owner:
                gi, li = owner[pid]
                entries[gi][li] = entry

        new_groups: list[dict[str, Any]] = []
        new_runtime: list[_Group] = []
        new_extras: list[list[dict[str, Any]]] = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"param group {gi}"
            options = self._loaded_options(saved, group, where)
            try:
                g = self._build(self._groups[gi].listed, options, f"{where} of the checkpoint")
            except (TypeError, ValueError) as e:  # the factory rejects the saved options
                message = str(e) if str(e).startswith(where) else f"{where} of the checkpoint: {e}"
                raise ValueError(message) from e
            ids_of = _first_ids(saved["params"], g.listed, g.params)
            # (encoded fields saved in another layout, e.g. by rows from sharded parameters: loaded as saved)
            g._state, g.layout = adopt_saved_layouts(g.layout, g.state, entries[gi], g.params, where, ids_of)
            globals_ = None
            declared = None
            if records is not None:
                kind = self._factory.name if self._factory is not None else None
                record = records[gi]
                globals_ = record_globals(record, kind, g.layout, entries[gi], g.params, where, ids_of)
                if isinstance(record, Mapping) and "types" in record:  # a saved record (a live one has no extras)
                    declared = _declared_extras(record, where)
            g.unstepped = set(range(len(g.params))) - loaded_stepped(
                records[gi] if records else None, entries[gi], g.layout
            )
            g._state, extras = load_entries(
                g.layout,
                g.state,
                entries[gi],
                globals_,
                where,
                param_label=ids_of,
                extra_key=_extra_key_rule(declared, g.layout),
            )
            current = self._groups[gi].flat
            if current is not None:
                g.make_flat(current.flat)  # new flat state buffers over the same flat parameters
            new_group = dict(options)
            new_group[GROUP_KEY] = g.record
            new_group["params"] = group["params"]
            if "param_names" in saved:
                new_group["param_names"] = list(saved["param_names"])
            elif "param_names" in group:
                new_group["param_names"] = group["param_names"]
            new_groups.append(new_group)
            new_runtime.append(g)
            new_extras.append(
                [
                    {
                        k: torch.optim.Optimizer._process_value_according_to_param_policy(p, v, ids_of[i], [], k)
                        if isinstance(v, Tensor)
                        else copy.deepcopy(v)
                        for k, v in extras.get(i, {}).items()
                    }
                    for i, p in enumerate(g.params)
                ]
            )
        # everything checked and built: commit
        self.param_groups = new_groups
        for gi, (old, g) in enumerate(zip(self._groups, new_runtime)):
            g.views = old.views
            for ps, extras_ in zip(g.views, new_extras[gi]):
                ps.set_extras(extras_)
        self._groups = new_runtime
        self._live.clear_others()
        for key, value in others.items():
            self._live[key] = value
        self._live.stale = True
        self._records_stale = True
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_options(self, saved: Mapping[str, Any], group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """A group's options after loading ``saved`` over ``group``: torch's rule (saved options win), checked.

        A hyperparameter of the factory that the checkpoint lacks (pureopt's own, such as ``impl``, in a torch
        checkpoint) keeps its current value, unless it is one of the torch counterpart's options: then it gets
        the value torch's ``__setstate__`` gives it when torch added it later (``maximize``, ``foreach``,
        ``decoupled_weight_decay``, ...), and otherwise the checkpoint is from another optimizer. Other options
        only the current group has are dropped, as in torch.
        """
        options = {k: loaded_option(copy.deepcopy(v)) for k, v in saved.items() if k not in _RESERVED_KEYS}
        if self._factory is None:
            return options
        factory = self._factory
        filled = _torch_filled_options(factory.torch_class) if factory.torch_class is not None else {}
        filled = {**_TORCH_READ_WITH_DEFAULT.get(factory.torch_class or "", {}), **filled}
        for key, value in group.items():
            if key in _RESERVED_KEYS or key in options:
                continue
            if factory.torch_keys is not None and key in factory.torch_keys:
                if key in filled:
                    options[key] = copy.deepcopy(filled[key])
                    continue
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

    # --- copies -----------------------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """Everything a copy is rebuilt from (see :meth:`__setstate__`)."""
        self.state  # noqa: B018 - refreshes the live view
        return {
            "tx_or_factory": self._tx if self._factory is None else self._factory.fn,
            "flat": self._flat,
            "hyperparams": self._hyperparams,
            "param_groups": [dict(group) for group in self.param_groups],
            "states": [g.checkpoint_state() for g in self._groups],
            "extras": [[ps.extras() for ps in g.views] for g in self._groups],
            "unstepped": [sorted(g.unstepped) for g in self._groups],
            "others": self._live.others(),
        }

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` stores: the factory (by reference) or the transformation, the param groups, the pure
        states and the clients' entries. A transformation or factory that pickle cannot store (closures of a
        hand-built transformation, a lambda) is a TypeError saying so."""
        what = self._tx if self._factory is None else self._factory.fn
        try:
            pickle.dumps(what)
        except Exception as e:
            kind = "transformation" if self._factory is None else f"factory {self._factory.name!r}"
            raise TypeError(
                f"cannot pickle this TorchOptimizer: pickle stores functions by reference, and its {kind} cannot be "
                f"stored so ({type(e).__name__}: {e}). Build it from a module-level factory "
                "(TorchOptimizer(params, pureopt.adamw, lr=...)), or save its state_dict() instead"
            ) from None
        return self._snapshot()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`'s dict: the groups' transformations are built again from the factory,
        the pure states and clients' entries are put back. Hooks are not kept (as with torch.optim)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a group listing a parameter twice warned when it was first built
            TorchOptimizer.__init__(
                self,
                [dict(group) for group in state["param_groups"]],
                state["tx_or_factory"],
                flat=state["flat"],
                **state["hyperparams"],
            )
        unstepped = state.get("unstepped", [[] for _ in self._groups])  # pickles of older versions: all stepped
        for g, saved, extras, never in zip(self._groups, state["states"], state["extras"], unstepped):
            g.layout.leaves(saved)  # same structure as a fresh state (raises otherwise)
            g.set(g.tx, saved, g.layout)
            g.unstepped = set(never)
            for ps, own in zip(g.views, extras):
                ps.set_extras(own)
        for key, value in state["others"].items():
            self._live[key] = value
        self._live.stale = True
        self._records_stale = True

    def __deepcopy__(self, memo: dict[int, Any]) -> TorchOptimizer:
        """An independent optimizer over deep copies of the parameters, with a copy of the state (torch's
        optimizers deep-copy the same way). A hand-built transformation is shared: it holds no state."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._snapshot(), memo))
        return new

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__}[{self._kind}] (", 1)


# --- helpers for load_state_dict and step(closure) ---------------------------------------------------------------


def _first_ids(saved_ids: Sequence[Any], listed: Sequence[Tensor], params: Sequence[Tensor]) -> list[Any]:
    """The checkpoint's id of each distinct parameter (its first listing)."""
    first: dict[int, Any] = {}
    for pid, p in zip(saved_ids, listed):
        first.setdefault(id(p), pid)
    return [first[id(p)] for p in params]


def _declared_extras(record: Mapping[str, Any], where: str) -> dict[int, frozenset[str]]:
    """The clients' keys a pureopt checkpoint declares, by local parameter index."""
    raw = record.get("extras", {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: the checkpoint's {PUREOPT_KEY!r} section is malformed")
    return {int(i): frozenset(keys) for i, keys in raw.items()}


# torch state keys of torch.optim's classes: a torch checkpoint's per-parameter key among these that this optimizer
# does not keep means the checkpoint is from another optimizer; any other key is a client's entry, kept as such
_TORCH_STATE_KEYS = frozenset(
    {
        "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
        "exp_inf", "eta", "mu", "ax", "prev", "step_size", "mu_product", "grad_avg", "row_var", "col_var",
        "variance", "func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad",
        "prev_loss", "al",
    }
)  # fmt: skip


def _extra_key_rule(declared: Mapping[int, frozenset[str]] | None, layout: StateLayout) -> Callable[[int, Any], bool]:
    """Whether a key of a loaded per-parameter entry that this optimizer does not keep is a client's entry.

    A pureopt checkpoint says which keys are its clients'; for a torch checkpoint, any key that is not one of
    torch.optim's own state keys (nor a dotted path ending in one) is.
    """
    del layout
    if declared is not None:
        return lambda i, key: str(key) in declared.get(i, frozenset())
    return lambda i, key: not (isinstance(key, str) and key.split(".")[-1] in _TORCH_STATE_KEYS)


def _closure_args(g: _Group, closure: Callable[[], Any], loss: Any) -> dict[str, Any]:
    """``update``'s keyword arguments for a step with a closure: the first loss and a ``value_fn`` that evaluates
    the objective at trial parameters through the closure (L-BFGS's re-evaluations; other algorithms ignore it).
    """
    params = g.params

    def value_fn(trial: Any) -> tuple[Any, tuple[Tensor | None, ...]]:
        with torch.no_grad():
            for p, t in zip(params, _tree.leaves(trial)):
                if t is not p:
                    p.copy_(t)
        with torch.enable_grad():
            value = closure()
        return value, tuple(p.grad for p in params)

    return {"value_fn": value_fn, "loss": loss}


def _closure_step(g: _Group, grads: list[Tensor | None], ctx: UpdateContext) -> OptState:
    """A donated step whose update evaluates the closure at other points (L-BFGS): the update works on copies of
    the parameters (its ``value_fn`` moves the real ones to each trial point), then the parameters are set to
    the copies plus the updates."""
    params = list(g.params)
    with torch.no_grad():
        start = [p.detach().clone() for p in params]
        updates, new_state = g.update(grads, g._state, start, ctx.but(apply=False))
        for p, s in zip(params, start):
            p.copy_(s)
        if updates is not None:
            add_inplace(params, updates)
    return new_state
