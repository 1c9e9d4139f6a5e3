"""Distributed training with pureopt: DDP optimizer overlap, optimizer-in-backward and periodic model averaging.

Three ways to step a pureopt transformation in a data-parallel job, from the most to the least coupled to DDP:

* :func:`register_optimizer_hook` — a DDP communication hook that reduces a gradient bucket and then, as soon as
  that bucket's reduction is done, steps the bucket's parameters with a :class:`FunctionalOptimizer` (one kernel
  call per bucket). The optimizer overlaps with the rest of the backward pass; there is no ``optimizer.step()``.
* :func:`optimizer_in_backward` — no DDP: each parameter is stepped as soon as its gradient has been accumulated
  (``Tensor.register_post_accumulate_grad_hook``) and its gradient is freed right away, so at most one
  parameter's gradient is alive at a time.
* :func:`periodic_average` — post-local SGD: every rank steps its own optimizer on its own gradients and the
  parameters are averaged across ranks every ``period`` steps (``PeriodicModelAverager``'s schedule). torch's own
  ``PostLocalSGDOptimizer`` also works around a :class:`~pureopt.adapters.TorchOptimizer`.

Checkpoints: the optimizers returned here have ``state_dict`` / ``load_state_dict`` in torch.optim's format; with
DDP every rank holds the same parameters and optimizer state, so rank 0 saves and every rank loads.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from pureopt import tree as _tree
from pureopt.adapters.functional import FunctionalOptimizer
from pureopt.base import GradientTransformation

__all__ = [
    "register_optimizer_hook",
    "optimizer_in_backward",
    "OptimizerInBackward",
    "periodic_average",
    "PeriodicAverager",
]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future[Tensor]]


def _queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current backward pass has finished (after the callbacks queued before it)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _current_backward() -> int:
    """The id of the backward pass running on this thread (-1 outside one)."""
    return int(torch._C._current_graph_task_id())


def _check_tx(tx: Any) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"tx must be a GradientTransformation (e.g. pureopt.adamw(lr=1e-3)), got a {type(tx).__name__}")


# --- DDP: the optimizer in the communication hook -------------------------------------------------------------


def _reducer_params(ddp_model: DistributedDataParallel) -> list[Tensor]:
    """The parameters DDP puts in its gradient buckets, in the module's ``named_parameters`` order."""
    ignored = set(getattr(ddp_model, "parameters_to_ignore", ()))
    out: list[Tensor] = []
    seen: set[int] = set()
    for name, p in ddp_model.module.named_parameters():
        if p.requires_grad and name not in ignored and id(p) not in seen and not hasattr(p, "_ddp_ignored"):
            seen.add(id(p))
            out.append(p)
    return out


def _bucket_grads(bucket: dist.GradBucket, params: list[Tensor], result: Any) -> list[Tensor]:
    """Each parameter's reduced gradient: views into the tensor the communication hook's future returned.

    DDP lays a dense bucket out as the parameters' flattened gradients one after the other, in
    ``bucket.parameters()`` order (``bucket.gradients()`` are the same views into ``bucket.buffer()``). Reading
    them from the hook's result rather than from the buffer also covers hooks that return a new tensor; a result
    of another dtype (a compression wrapper) is cast to each parameter's dtype, as DDP does when it copies the
    result into ``.grad``.
    """
    if isinstance(result, (list, tuple)):
        result = result[0]
    if not isinstance(result, Tensor):
        raise TypeError(f"the communication hook's future returned a {type(result).__name__}, expected a tensor")
    if result.is_sparse:
        if len(params) != 1:
            raise ValueError(f"a sparse gradient bucket holds {len(params)} parameters, expected one")
        return [result]
    flat = result.reshape(-1)
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(
            f"the communication hook returned {flat.numel()} gradient values for a bucket of {total}: a hook used "
            "with register_optimizer_hook must return the reduced bucket (as torch's hooks do)"
        )
    grads: list[Tensor] = []
    offset = 0
    for p in params:
        g = flat.narrow(0, offset, p.numel()).view(p.shape)
        grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
        offset += p.numel()
    return grads


class _OptimizerHook:
    """The state of one :func:`register_optimizer_hook` registration; ``__call__`` is DDP's communication hook.

    For each bucket: run the user's communication hook, then (in the future's ``then``, when the reduced gradients
    are there) step the bucket's parameters. At the end of each backward pass the optimizer step is ended
    (``FunctionalOptimizer.end_step``), so schedules advance exactly once per iteration.

    Unused parameters (``find_unused_parameters=True`` or ``static_graph=True``): DDP puts every parameter in a
    bucket, a parameter no rank used with a zero gradient, and afterwards leaves its ``.grad`` as it was (``None``
    after ``zero_grad``), so torch.optim skips it. To keep that semantics, a parameter whose gradient was not
    accumulated on this rank in this backward is not stepped from the bucket; it is stepped after DDP has finished
    the backward pass, from the ``.grad`` DDP left (the reduced gradient if another rank used it; nothing if the
    gradient is ``None``). Local use is recorded by post-accumulate-grad hooks, which run before DDP's own hook.
    """

    def __init__(
        self,
        optimizer: FunctionalOptimizer,
        comm_hook: CommHook,
        track_unused: bool,
    ) -> None:
        self.optimizer = optimizer
        self.comm_hook = comm_hook
        self.track_unused = track_unused
        self._lock = threading.Lock()
        self._used: dict[int, int] = {}  # id(param) -> the backward pass in which its gradient was last accumulated
        self._backward = -2  # the backward pass whose end-of-backward callback is queued
        self._deferred: list[Tensor] = []
        self._handles: list[Any] = []
        self._buckets: dict[int, list[int]] = {}  # bucket index -> its parameters' indices (flat layouts only)

    def track(self, params: list[Tensor]) -> None:
        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._mark_used))

    def _mark_used(self, param: Tensor) -> None:
        self._used[id(param)] = _current_backward()

    def __call__(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        backward = _current_backward()
        if backward < 0:
            raise RuntimeError(
                "register_optimizer_hook: the communication hook ran outside a backward pass (DDP's join() "
                "shadowing a finished rank?); uneven inputs with Join are not supported by the optimizer hook"
            )
        params = list(bucket.parameters())
        if self.optimizer.flat_groups() is not None:
            self._buckets[bucket.index()] = [self.optimizer._position(p) for p in params]
        if self.track_unused:
            now = [self._used.get(id(p)) == backward for p in params]
            step_now = [p for p, used in zip(params, now) if used]
            later = [p for p, used in zip(params, now) if not used]
        else:
            step_now, later = params, []
        with self._lock:
            first = self._backward != backward
            if first:  # left over only if an earlier backward failed before its end-of-backward callback
                self._deferred = []
            self._deferred.extend(later)
            self._backward = backward
        if first:
            _queue_end_of_backward(self._after_reducer_callbacks)
        fut = self.comm_hook(state, bucket)
        optimizer = self.optimizer
        chosen = {id(p) for p in step_now}

        def step(done: torch.futures.Future[Any]) -> Any:
            result = done.value()
            grads = _bucket_grads(bucket, params, result)
            pairs = [(p, g) for p, g in zip(params, grads) if id(p) in chosen]
            if pairs:
                optimizer.step_params([p for p, _ in pairs], [g for _, g in pairs])
            return result

        return fut.then(step)

    def _after_reducer_callbacks(self) -> None:
        # queued from the first bucket's hook, i.e. before DDP queues its own finalisation: queue the real work
        # behind it, so that it runs once DDP has waited for every bucket and written the gradients
        _queue_end_of_backward(self._end_of_backward)

    def _end_of_backward(self) -> None:
        with self._lock:
            deferred, self._deferred = self._deferred, []
        if deferred:
            self.optimizer.step_params(deferred, [p.grad for p in deferred])
        self.optimizer.end_step()
        self._follow_buckets()

    def _follow_buckets(self) -> None:
        """With flat buffers: lay them out like DDP's buckets (DDP rebuilds its buckets after the first iteration),
        so that each bucket's step reads its reduced gradients in place."""
        current = self.optimizer.flat_groups()
        if current is None or not self._buckets:
            return
        groups = [self._buckets[index] for index in sorted(self._buckets)]
        listed = {i for group in groups for i in group}
        if len(listed) != len(self.optimizer.params) or sum(map(len, groups)) != len(listed):
            return  # not every parameter was in a bucket this time: keep the layout
        if groups != current:
            self.optimizer.regroup(groups)


def register_optimizer_hook(
    ddp_model: DistributedDataParallel,
    tx: GradientTransformation,
    comm_hook: CommHook | None = None,
    comm_state: Any = None,
    *,
    flat: bool = False,
) -> FunctionalOptimizer:
    """Step ``tx`` inside DDP's backward pass: each gradient bucket is reduced, then its parameters are stepped.

    Registers a DDP communication hook that runs ``comm_hook(comm_state, bucket)`` (default: torch's
    ``allreduce_hook``, averaging over the DDP model's process group) and, in the returned future's ``.then``
    callback, steps that bucket's parameters with their reduced gradients in one kernel call
    (``FunctionalOptimizer.step_params``). Buckets become ready in reverse order of the parameters while backward
    is still running, so the optimizer overlaps with the gradients of earlier layers and their communication.
    The result equals DDP followed by a torch.optim-style step of the same optimizer (tested against
    ``torch.optim.AdamW`` on the whole batch).

    Args:
      ddp_model: a ``DistributedDataParallel`` model without a communication hook yet (DDP allows one).
      tx: the transformation, e.g. ``pureopt.adamw(lr=1e-3, weight_decay=0.01)``. Schedules advance once per
        iteration (the optimizer step is ended at the end of each backward pass).
      comm_hook: a DDP communication hook ``hook(state, bucket) -> Future[Tensor]`` that returns the reduced
        bucket, e.g. ``default_hooks.fp16_compress_hook`` or ``post_localSGD_hook``.
      comm_state: the hook's state (``PostLocalSGDState``, a process group, ...). With the default hook: the
        process group to average over (default: the DDP model's).
      flat: keep the parameters and the state in flat buffers laid out like DDP's gradient buckets (see
        ``FunctionalOptimizer(flat=True)``): after the first iterations (DDP settles its buckets after the first
        one) a bucket's step is one kernel call on its reduced gradients in place, with no per-tensor cost.
        Same numbers as ``flat=False``.

    Returns:
      The :class:`FunctionalOptimizer` that owns the optimizer state, over the parameters DDP reduces (those that
      require grad and are not ignored by DDP, in ``module.named_parameters()`` order). Use its ``state_dict()``
      / ``load_state_dict()`` for checkpoints; do not call its ``step`` yourself. Parameters DDP ignores
      (``_ddp_params_and_buffers_to_ignore``) are not stepped: give them their own optimizer.

    Training loop (no ``optimizer.step()``; gradients are zeroed or set to ``None`` between iterations, because
    DDP accumulates into ``.grad`` as plain autograd does)::

        ddp = DistributedDataParallel(model)
        opt = register_optimizer_hook(ddp, pureopt.adamw(lr=1e-3))
        for x, y in loader:
            ddp.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()        # parameters are updated when backward returns
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)   # on rank 0

    After ``backward()`` the ``.grad`` fields hold the reduced gradients, as with plain DDP. Gradient accumulation
    with ``ddp.no_sync()`` works: no hook runs inside ``no_sync``, and the next synchronised backward steps with
    the accumulated gradients. Unused parameters (``find_unused_parameters=True``) keep torch.optim's semantics:
    a parameter no rank used and whose ``.grad`` is ``None`` is not stepped (torch's own
    ``_register_fused_optim`` steps it with a zero gradient). ``DDP.join()`` (uneven inputs) is not supported.

    Raises:
      TypeError: ``ddp_model`` is not a ``DistributedDataParallel``, ``tx`` not a transformation or ``comm_hook``
        not callable. Torch's RuntimeError if the model already has a communication hook. Nothing is registered
        when an error is raised.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"register_optimizer_hook expects a torch.nn.parallel.DistributedDataParallel model, got a "
            f"{type(ddp_model).__name__}"
        )
    _check_tx(tx)
    if comm_hook is not None and not callable(comm_hook):
        raise TypeError(f"comm_hook must be a DDP communication hook (a callable), got a {type(comm_hook).__name__}")
    if comm_hook is None:
        group = comm_state if comm_state is not None else ddp_model.process_group
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"with the default allreduce hook, comm_state is the process group to average over; got a "
                f"{type(group).__name__}"
            )
        comm_hook, comm_state = default_hooks.allreduce_hook, group
    params = _reducer_params(ddp_model)
    optimizer = FunctionalOptimizer(params, tx, flat=flat)
    track_unused = bool(
        getattr(ddp_model, "find_unused_parameters", False) or getattr(ddp_model, "static_graph", False)
    )
    hook = _OptimizerHook(optimizer, comm_hook, track_unused)

    def pureopt_optimizer_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        return hook(state, bucket)

    # DDP compares the annotations with the real classes; this module's are strings (postponed evaluation)
    pureopt_optimizer_hook.__annotations__ = {}
    ddp_model.register_comm_hook(comm_state, pureopt_optimizer_hook)  # raises if the model has a hook already
    if track_unused:
        hook.track(params)
    return optimizer


# --- optimizer in backward ------------------------------------------------------------------------------------


class OptimizerInBackward:
    """The handle :func:`optimizer_in_backward` returns: the hooks and the optimizer that owns the state.

    Attributes:
      optimizer: the :class:`FunctionalOptimizer` over the parameters (its state is the optimizer state).
      params: the parameters, in order (the order of the checkpoint's parameter ids).
    """

    def __init__(self, params: list[Tensor], tx: GradientTransformation) -> None:
        self.optimizer = FunctionalOptimizer(params, tx)
        self.params = params
        self._backward = -2
        self._lock = threading.Lock()
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def _step(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        backward = _current_backward()
        with self._lock:
            first = backward >= 0 and backward != self._backward
            self._backward = backward
        if first:
            _queue_end_of_backward(self.optimizer.end_step)
        self.optimizer.step_param(param, grad)
        param.grad = None

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` was called (the parameters are no longer stepped in backward)."""
        return not self._handles

    def remove(self) -> None:
        """Remove the hooks: later backward passes accumulate ``.grad`` as usual and step nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch.optim's format (see ``FunctionalOptimizer.state_dict``)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; checked first, nothing changes on error."""
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        status = "removed" if self.removed else "active"
        return f"{type(self).__name__}({len(self.params)} parameters, {status})"


def optimizer_in_backward(
    params_or_module: nn.Module | Iterable[Tensor], tx: GradientTransformation
) -> OptimizerInBackward:
    """Step each parameter as soon as its gradient is accumulated in backward, then free that gradient.

    A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) on every parameter calls
    ``FunctionalOptimizer.step_param(p, p.grad)`` and sets ``p.grad = None``: the gradients of the whole model are
    never alive at once, which saves the memory of one copy of the parameters. The numbers are those of a
    torch.optim step after backward (parameters are independent in element-wise optimizers). The optimizer step
    ends at the end of each backward pass, so a schedule advances once per ``backward()``.

    Args:
      params_or_module: an ``nn.Module`` (its parameters that require grad) or an iterable of leaf tensors that
        require grad.
      tx: the transformation, e.g. ``pureopt.adamw(lr=1e-3)``. Transformations that look at all gradients at once
        (``clip_by_global_norm``, L-BFGS) see one parameter at a time here.

    Returns:
      An :class:`OptimizerInBackward` handle: ``state_dict()`` / ``load_state_dict()`` for checkpoints,
      ``remove()`` to remove the hooks, ``optimizer`` for the :class:`FunctionalOptimizer`.

    Training loop (no ``step()`` and no ``zero_grad()``: gradients are consumed in backward)::

        handle = optimizer_in_backward(model, pureopt.adamw(lr=1e-3))
        for x, y in loader:
            loss_fn(model(x), y).backward()      # parameters are updated, .grad is None afterwards
        torch.save({"model": model.state_dict(), "optim": handle.state_dict()}, path)

    Every ``backward()`` is an optimizer step, so gradient accumulation over several backward passes is not
    possible. Not for DDP models (the hooks run before DDP reduces the gradients): use
    :func:`register_optimizer_hook` there. A parameter must not be saved for backward by a node that runs after
    its gradient is complete (e.g. through ``p.detach()``): it is modified in place when its gradient is ready.

    Raises:
      TypeError / ValueError: for a DDP model, an empty parameter list, a non-leaf tensor or one that does not
        require grad, or a parameter listed twice; nothing is registered.
    """
    if isinstance(params_or_module, DistributedDataParallel):
        raise TypeError(
            "optimizer_in_backward steps parameters before DDP reduces their gradients; use "
            "register_optimizer_hook(ddp_model, tx) with DistributedDataParallel"
        )
    _check_tx(tx)
    params: list[Tensor]
    if isinstance(params_or_module, nn.Module):
        params = [p for p in params_or_module.parameters() if p.requires_grad]
    elif isinstance(params_or_module, Tensor):
        params = [params_or_module]
    else:
        params = list(params_or_module)
    if not params:
        raise ValueError("optimizer_in_backward got no parameters that require grad")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) does not require grad: it would never be stepped")
        if not p.is_leaf:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not a leaf tensor: can't optimize it")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter appears more than once in the parameter list")
    return OptimizerInBackward(params, tx)


# --- periodic model averaging ---------------------------------------------------------------------------------


def _param_list(params: Any) -> list[Tensor]:
    """The tensors to average: a module's parameters, param groups (``[{"params": [...]}, ...]``) or a pytree."""
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, Tensor):
        return [params]
    if not isinstance(params, (list, tuple, dict)) and isinstance(params, Iterable):
        params = list(params)
    if isinstance(params, (list, tuple)) and params and all(isinstance(g, Mapping) for g in params):
        return [p for group in params for p in group["params"]]
    leaves = [x for x in _tree.leaves(params) if x is not None]
    for x in leaves:
        if not isinstance(x, Tensor):
            raise TypeError(f"periodic averaging got a {type(x).__name__} among the parameters, expected tensors")
    return leaves


def _check_step(step: Any) -> int:
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"step must be an integer or a 1-element integer tensor, got a tensor of {step.dtype}")
        step = int(step.item())
    if isinstance(step, bool):
        raise TypeError("step must be an integer, got a bool")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got a {type(step).__name__}") from None
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return step


@dataclass(frozen=True)
class PeriodicAverager:
    """Averages parameters across ranks on a fixed schedule; built by :func:`periodic_average`.

    Stateless: the caller passes the step, so nothing needs to be checkpointed beyond the training step itself.

    Attributes:
      period: steps between two averagings (>= 1).
      warmup_steps: steps before the first averaging.
      process_group: the group to average over (``None``: the default group, resolved at each call).
    """

    period: int
    warmup_steps: int = 0
    process_group: dist.ProcessGroup | None = None

    def is_due(self, step: int | Tensor) -> bool:
        """Whether parameters are averaged at ``step``: ``step >= warmup_steps`` and ``(step - warmup_steps) %
        period == 0`` (``PeriodicModelAverager``'s rule, its ``step`` counting calls from 0)."""
        s = _check_step(step)
        return s >= self.warmup_steps and (s - self.warmup_steps) % self.period == 0

    def __call__(self, params: Any, step: int | Tensor) -> bool:
        """Average ``params`` in place across the group if :meth:`is_due` at ``step``; return whether it did.

        Every rank of the group must call it with the same step and parameters of the same shapes (it is a
        collective). The arithmetic is torch's ``average_parameters``: the parameters are concatenated, divided by
        the group size and all-reduced; the results are copied back into the same tensors (torch instead rebinds
        ``p.data`` to views of the flat buffer), so references to the parameters stay valid. Unlike torch's
        averager, parameters whose ``.grad`` is ``None`` are averaged too: pass only the ones you mean.

        Args:
          params: an ``nn.Module``, an iterable of tensors, param groups (``optimizer.param_groups``) or any
            pytree of tensors (e.g. a dict from ``named_parameters()``).
          step: the index of the training iteration, counted from 0 (the number of optimizer steps taken before
            the one just done); an int or a 1-element integer tensor.
        """
        s = _check_step(step)
        tensors = _param_list(params)
        if not self.is_due(s) or not tensors:
            return False
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("periodic averaging needs an initialized process group (dist.init_process_group)")
        if group == dist.GroupMember.NON_GROUP_MEMBER:
            return False
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in tensors])
            flat /= dist.get_world_size(group)
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in tensors:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return True


def periodic_average(
    period: int, warmup_steps: int = 0, process_group: dist.ProcessGroup | None = None
) -> PeriodicAverager:
    """Average parameters across ranks every ``period`` steps after ``warmup_steps`` (post-local SGD).

    ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``'s semantics, as a stateless
    function of the step: ``average(params, step)`` averages when ``step >= warmup_steps`` and ``(step -
    warmup_steps) % period == 0``, where ``step`` counts training iterations from 0 (torch's averager counts its
    own calls). Pair it with DDP's ``post_localSGD_hook`` (global gradient averaging during warm-up, local
    afterwards) and any of pureopt's optimizers::

        state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=warmup)
        opt = register_optimizer_hook(ddp, pureopt.adamw(lr=1e-3), post_localSGD_hook, state)
        average = periodic_average(period=4, warmup_steps=warmup)
        for step, (x, y) in enumerate(loader):
            ddp.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()
            average(ddp.module, step)            # a collective: every rank calls it at every step

    The ranks hold identical parameters right after each averaging and drift apart in between. With
    :class:`~pureopt.adapters.TorchOptimizer`, torch's ``PostLocalSGDOptimizer(optimizer, averager)`` does the
    same with torch's averagers (``PeriodicModelAverager``, ``HierarchicalModelAverager``).

    Args:
      period: the number of steps between averagings; a positive integer.
      warmup_steps: the number of steps before averaging starts; non-negative.
      process_group: the group to average over (default: the default process group).

    Raises:
      ValueError: ``period < 1`` or ``warmup_steps < 0`` (torch's wording); TypeError for non-integers.
    """
    for name, value in (("period", period), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got a {type(value).__name__}")
    if warmup_steps < 0:
        raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
    if period < 1:
        raise ValueError("Arg ``period`` must be a positive value.")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a ProcessGroup or None, got a {type(process_group).__name__}")
    return PeriodicAverager(period, warmup_steps, process_group)
