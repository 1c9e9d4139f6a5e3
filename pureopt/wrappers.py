"""Wrappers that change *when* or *with what* an inner transformation runs.

* :func:`inject_hyperparams`: hyperparameters kept in the state as 0-d tensors (readable, replaceable, scheduled).
* :class:`MultiSteps`: gradient accumulation over ``every_k`` calls.
* :func:`apply_if_finite`: skip steps whose gradients hold NaN or infinity.
* :func:`lookahead`: Lookahead's slow weights around a fast optimizer.
* :func:`ema`: an exponential moving average of the updates.
* :func:`ema_params` / :func:`polyak_average`: averages of the parameters for evaluation
  (``torch.optim.swa_utils.AveragedModel``).

All of them are pure and keep their counters as 0-d tensors. Where a wrapper chooses between two outcomes
depending on tensor values (the k-th call of :class:`MultiSteps`, a non-finite step, a Lookahead sync), it
computes both and selects with ``torch.where`` on a 0-d bool tensor: there is no Python branch on tensor values
and no host sync, so every wrapper works under ``torch.func.vmap`` (one decision per model of an ensemble) and
traces under ``torch.compile(fullgraph=True)``. The price is that the inner update is evaluated on every call.
Selecting with ``torch.where`` returns the old values bitwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import (
    GradientTransformation,
    LeafInit,
    LeafList,
    LeafUpdate,
    OptState,
    Params,
    UpdateContext,
    as_leaf_update,
    is_elementwise,
    is_segmentwise,
    leaf_transformation,
)
from pureopt.combine import inner_context, returned
from pureopt.hyperparams import is_schedule
from pureopt.kernels.fused import is_amp_native
from pureopt.transforms._util import count_device, new_count
from pureopt.tree import PyTreeSpec

__all__ = [
    "InjectHyperparamsState",
    "inject_hyperparams",
    "MultiStepsState",
    "MultiSteps",
    "ApplyIfFiniteState",
    "apply_if_finite",
    "LookaheadState",
    "lookahead",
    "EmaState",
    "ema",
    "ParamAverageState",
    "ParamAverager",
    "ema_params",
    "polyak_average",
]


def _select(cond: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` (a 0-d bool tensor) else ``old``, leaf by leaf over two trees of one structure."""

    def pick(n: Any, o: Any) -> Any:
        if isinstance(n, Tensor) and isinstance(o, Tensor):
            return torch.where(cond.to(n.device), n, o)
        return n

    return _tree.tree_map(pick, new, old)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (an int >= {minimum} is required)")
    return value


# --- inject_hyperparams --------------------------------------------------------------------------------------


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor); schedules are evaluated at it.
      hyperparams: the injected hyperparameters as 0-d tensors, by argument name: the values used by the latest
        update (after ``init``: the values the first update will use). Replace one with
        ``state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(1e-4)})``; the next update uses
        it (a scheduled hyperparameter is recomputed from its schedule at every update instead).
      inner_state: the state of the wrapped transformation.
    """

    num_updates: Tensor
    hyperparams: dict[str, Tensor]
    inner_state: OptState


class _Constant:
    """A schedule that returns a fixed tensor: how a hyperparameter in ``schedule_args`` reaches the factory."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self, count: Any) -> Tensor:
        del count
        return self.value


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, Tensor) and value.numel() == 1


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: str | Sequence[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
    schedule_args: Sequence[str] = ("lr", "learning_rate"),
) -> Callable[..., GradientTransformation]:
    """Keep ``factory``'s numeric hyperparameters in the optimizer state, as 0-d tensors.

    ``inject_hyperparams(pureopt.adam)(lr=1e-3)`` behaves like ``pureopt.adam(lr=1e-3)``, and its state has
    ``state.hyperparams["lr"]``: read it (logging), replace it (``state._replace``) and the next update uses
    the new value — the pure counterpart of editing ``optimizer.param_groups[0]["lr"]``. Because the value is
    data, changing it never recompiles a ``torch.compile``-d step, and under ``torch.func.vmap`` every model
    of an ensemble can have its own value.

    Which arguments are injected: every argument given as a number (not a bool), a 1-element tensor or a
    schedule (a callable of the step count), unless named in ``static_args``. Other arguments (bools, tuples
    such as ``betas``, strings, dtypes) are passed to the factory unchanged. A schedule is evaluated at the
    wrapper's own update count at every update and its value is stored in ``state.hyperparams``.

    The inner transformation is rebuilt from the current values at every update: ``factory(**static,
    **injected)``; its state is carried over, so its structure must not depend on the injected values. The
    values reach the factory as follows:

    * names in ``schedule_args`` (default ``lr`` and ``learning_rate``) are passed as a schedule that returns
      the 0-d tensor. Every pureopt optimizer and ``scale_by_learning_rate`` accept a schedule for their
      learning rate and read it without a host sync, so **the learning rate is injectable for every optimizer,
      under vmap and torch.compile too**.
    * other names are passed as the 0-d tensor itself. That works where the factory computes with it as a
      tensor. pureopt's optimizers validate and read their other numeric hyperparameters (``eps``,
      ``weight_decay``, ``momentum``, ``dampening``; ``betas`` is a tuple, hence static) as Python numbers: with a
      tensor they run eagerly, with a host sync per update, but they break a ``torch.compile(fullgraph=True)``
      graph and fail under ``vmap`` when the value differs per model. Mark them ``static_args`` to keep them
      fixed Python numbers.

    Args:
      factory: a function returning a :class:`~pureopt.base.GradientTransformation`, e.g. ``pureopt.adam``.
      static_args: argument names never injected (passed to the factory as given).
      hyperparam_dtype: dtype of the stored hyperparameters. Default: a tensor keeps its dtype; a Python
        number or a schedule's value is stored in ``torch.get_default_dtype()`` (float32 unless changed),
        whatever the parameters' dtype (bf16 parameters still get a float32 learning rate).
      schedule_args: argument names that ``factory`` accepts as schedules (see above).

    Returns:
      A function with the factory's arguments that returns the wrapped transformation.

    Raises:
      The factory's own errors for invalid initial values (``Invalid learning rate: -1.0``), at construction.

    Example::

        tx = inject_hyperparams(pureopt.adamw)(lr=pureopt.schedules.cosine_decay(1e-3, 1000), weight_decay=0.1)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        state.hyperparams["lr"]                       # the learning rate this step used
        state = state._replace(hyperparams={**state.hyperparams, "weight_decay": torch.tensor(0.05)})
    """
    statics = {static_args} if isinstance(static_args, str) else set(static_args)
    as_schedule = set(schedule_args)
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            given = dict(bound.arguments)
            for name, param in signature.parameters.items():  # **kwargs of the factory are flattened
                if param.kind is inspect.Parameter.VAR_KEYWORD and name in given:
                    given.update(given.pop(name))
                elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in given:
                    raise TypeError("inject_hyperparams: factories taking *args are not supported")
        else:
            if args:
                raise TypeError("inject_hyperparams: pass hyperparameters by keyword for this factory")
            given = dict(kwargs)
        # validates the initial values with the factory's own checks and wording
        built = factory(**given)
        elementwise, segmentwise = is_elementwise(built), is_segmentwise(built)

        static = {}
        numeric: dict[str, Any] = {}
        schedules: dict[str, Callable[[Tensor], Any]] = {}
        for name, value in given.items():
            if name in statics:
                static[name] = value
            elif _is_numeric(value):
                numeric[name] = value
            elif is_schedule(value) and not isinstance(value, type):
                schedules[name] = value
            else:
                static[name] = value
        names = list(numeric) + list(schedules)

        def stored(value: Any, device: torch.device) -> Tensor:
            if isinstance(value, Tensor):
                dtype = hyperparam_dtype or (value.dtype if value.is_floating_point() else torch.get_default_dtype())
                return value.detach().reshape(()).to(device=device, dtype=dtype)
            return torch.as_tensor(value, dtype=hyperparam_dtype or torch.get_default_dtype(), device=device)

        def build(values: dict[str, Tensor]) -> GradientTransformation:
            injected = {name: _Constant(v) if name in as_schedule else v for name, v in values.items()}
            return factory(**static, **injected)

        def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> InjectHyperparamsState:
            count = new_count(leaves)
            device = count_device(leaves)
            values = {name: stored(v, device) for name, v in numeric.items()}
            values.update({name: stored(fn(count), device) for name, fn in schedules.items()})
            values = {name: values[name] for name in names}
            return InjectHyperparamsState(count, values, build(values).init(spec.unflatten(leaves)))

        def update_leaves(
            updates: LeafList, state: InjectHyperparamsState, params: LeafList | None, ctx: UpdateContext
        ) -> tuple[LeafList | None, InjectHyperparamsState]:
            if not isinstance(state, InjectHyperparamsState):
                raise ValueError(f"inject_hyperparams expects an InjectHyperparamsState, got a {type(state).__name__}")
            missing = [name for name in names if name not in state.hyperparams]
            if missing:
                raise ValueError(f"inject_hyperparams: state.hyperparams has no entry {missing[0]!r}")
            values = dict(state.hyperparams)
            for name, fn in schedules.items():
                old = values[name]
                values[name] = torch.as_tensor(fn(state.num_updates)).to(device=old.device, dtype=old.dtype)
            inner = build({name: values[name] for name in names})
            new_updates, new_inner = as_leaf_update(inner)(
                updates, state.inner_state, params, inner_context(ctx, allow_apply=True)
            )
            return new_updates, InjectHyperparamsState(state.num_updates + 1, values, new_inner)

        return leaf_transformation(init_leaves, update_leaves, elementwise=elementwise, segmentwise=segmentwise)

    wrapped.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    wrapped.__doc__ = factory.__doc__
    return wrapped


# --- MultiSteps ----------------------------------------------------------------------------------------------


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
      mini_step: calls since the last inner update, ``0 .. every_k - 1`` (0-d int64 tensor).
      gradient_step: number of inner updates so far (0-d int64 tensor).
      inner_opt_state: the inner transformation's state.
      acc_grads: the sum of the gradients of the current window, shaped like the parameters.
    """

    mini_step: Tensor
    gradient_step: Tensor
    inner_opt_state: OptState
    acc_grads: Any


class MultiSteps:
    """Gradient accumulation: the inner transformation steps once every ``every_k`` calls, on their mean.

    Rule, with ``g_1 .. g_k`` the gradients of one window of ``k`` calls::

        calls 1 .. k-1:  updates = 0                         (the gradients are summed into acc_grads)
        call k:          updates, inner_state = inner.update((g_1 + ... + g_k) / k, inner_state, params)

    so ``k`` micro-batches give exactly the step that their mean gradient would (torch's
    ``loss / k; loss.backward()`` accumulation loop). Memory: one accumulator shaped like the parameters.
    Every call evaluates the inner update and keeps it only on the k-th call (``torch.where``), so the
    wrapper has no data-dependent control flow; its cost is the inner update's on every call.

    A ``None`` gradient adds nothing to the sum; the inner transformation gets ``None`` for a parameter whose
    gradient is ``None`` on the k-th call (its state is then untouched, as torch does) and that parameter's
    sum for the window is dropped. A parameter without gradient on all calls is simply never updated.

    Args:
      opt: the inner transformation.
      every_k: the number of calls per inner update (an int >= 1), or a function of ``gradient_step`` (a 0-d
        tensor) returning it, for a window length that changes during training.
      acc_dtype: dtype of the accumulator (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        opt = MultiSteps(pureopt.adamw(lr=1e-3), every_k=4)
        state = opt.init(params)
        for micro_batch in micro_batches:
            updates, state = opt.update(grad_fn(params, micro_batch), state, params)
            params = pureopt.apply_updates(params, updates)   # moves only on every 4th call
        tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), opt.gradient_transformation())
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k: int | Callable[[Tensor], Tensor | int],
        acc_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(opt, GradientTransformation):
            raise TypeError(f"MultiSteps: opt is a {type(opt).__name__}, not a GradientTransformation")
        if not callable(every_k):
            _check_int(every_k, "every_k", 1)
        self.opt = opt
        self.every_k = every_k
        self.acc_dtype = acc_dtype
        self._inner = as_leaf_update(opt)
        self._tx = leaf_transformation(
            self._init_leaves, self._update_leaves, elementwise=is_elementwise(opt), segmentwise=is_segmentwise(opt)
        )

    @property
    def init(self) -> LeafInit:
        """``init(params) -> MultiStepsState``."""
        return self._tx.init  # type: ignore[return-value]

    @property
    def update(self) -> LeafUpdate:
        """``update(grads, state, params=None) -> (updates, new_state)``."""
        return self._tx.update  # type: ignore[return-value]

    def gradient_transformation(self) -> GradientTransformation:
        """This wrapper as a :class:`~pureopt.base.GradientTransformation` (to put it in a chain)."""
        return self._tx

    @staticmethod
    def has_updated(state: MultiStepsState) -> Tensor:
        """A 0-d bool tensor: whether the latest call ran the inner update (its updates are not zeros)."""
        return (state.mini_step == 0) & (state.gradient_step > 0)

    def _window(self, gradient_step: Tensor) -> Tensor | int:
        if callable(self.every_k):
            return self.every_k(gradient_step)
        return self.every_k

    def _init_leaves(self, leaves: list[Any], spec: PyTreeSpec) -> MultiStepsState:
        acc = [None if p is None else torch.zeros_like(p, dtype=self.acc_dtype) for p in leaves]
        return MultiStepsState(
            new_count(leaves), new_count(leaves), self.opt.init(spec.unflatten(leaves)), spec.unflatten(acc)
        )

    def _update_leaves(
        self, updates: LeafList, state: MultiStepsState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, MultiStepsState]:
        if not isinstance(state, MultiStepsState):
            raise ValueError(f"MultiSteps expects a MultiStepsState, got a {type(state).__name__}")
        acc = ctx.state_leaves(state.acc_grads)
        k = self._window(state.gradient_step)
        final = state.mini_step + 1 >= k
        sums = [a if u is None else a + u.to(a.dtype) for a, u in zip(acc, updates)]
        means = [None if u is None else s / k for s, u in zip(sums, updates)]
        inner_updates, new_inner = self._inner(
            means, state.inner_opt_state, params, inner_context(ctx, allow_donate=False)
        )
        out = [
            None if iu is None else torch.where(final.to(iu.device), iu, torch.zeros_like(iu))
            for iu in returned(inner_updates)
        ]
        new_acc = [None if s is None else torch.where(final.to(s.device), torch.zeros_like(s), s) for s in sums]
        new_state = MultiStepsState(
            mini_step=torch.where(final, torch.zeros_like(state.mini_step), state.mini_step + 1),
            gradient_step=state.gradient_step + final.to(state.gradient_step.dtype),
            inner_opt_state=_select(final, new_inner, state.inner_opt_state),
            acc_grads=ctx.spec.unflatten(new_acc),
        )
        return out, new_state


# --- apply_if_finite -----------------------------------------------------------------------------------------


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
      notfinite_count: consecutive steps with a non-finite gradient so far (0-d int64; 0 after a finite step).
      last_finite: whether the latest step's gradients were all finite (0-d bool).
      total_notfinite: steps with a non-finite gradient since ``init`` (0-d int64).
      inner_state: the inner transformation's state.
    """

    notfinite_count: Tensor
    last_finite: Tensor
    total_notfinite: Tensor
    inner_state: OptState


def _all_finite(updates: LeafList, device: torch.device) -> Tensor:
    flags = [torch.isfinite(u).all().to(device) for u in updates if u is not None]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(flags).all()


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip the steps whose gradients contain NaN or infinity (as a dynamic loss scaler does).

    Rule: when every gradient is finite, run ``inner``. Otherwise return zero updates and keep ``inner``'s
    state exactly as it was (bitwise), and count the step; after ``max_consecutive_errors`` non-finite steps in
    a row, the next non-finite step is applied anyway (so that a run that only produces non-finite gradients
    fails visibly instead of silently stalling), and so is every one after it until a finite step resets the
    count.

    Args:
      inner: the transformation to protect.
      max_consecutive_errors: how many non-finite steps in a row are skipped (an int >= 0).

    Example::

        tx = apply_if_finite(pureopt.adam(lr=1e-3), max_consecutive_errors=5)
        updates, state = tx.update(grads, state, params)
        state.total_notfinite  # how many steps were rejected so far
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite: inner is a {type(inner).__name__}, not a GradientTransformation")
    max_errors = _check_int(max_consecutive_errors, "max_consecutive_errors", 0)
    fn = as_leaf_update(inner)

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> ApplyIfFiniteState:
        device = count_device(leaves)
        return ApplyIfFiniteState(
            new_count(leaves),
            torch.ones((), dtype=torch.bool, device=device),
            new_count(leaves),
            inner.init(spec.unflatten(leaves)),
        )

    def update_leaves(
        updates: LeafList, state: ApplyIfFiniteState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, ApplyIfFiniteState]:
        if not isinstance(state, ApplyIfFiniteState):
            raise ValueError(f"apply_if_finite expects an ApplyIfFiniteState, got a {type(state).__name__}")
        finite = _all_finite(updates, state.notfinite_count.device)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        apply = finite | (notfinite_count > max_errors)
        counts = {
            "notfinite_count": notfinite_count,
            "last_finite": finite,
            "total_notfinite": state.total_notfinite + (~finite).to(state.total_notfinite.dtype),
        }
        if _skips_itself(ctx):  # donated, and the inner kernel skips on found_inf: its buffers are reused
            skip = (~apply).to(torch.float32)
            out, new_inner = fn(
                updates, state.inner_state, params, inner_context(ctx, allow_apply=True).but(found_inf=skip)
            )
            return out, ApplyIfFiniteState(**counts, inner_state=new_inner)  # type: ignore[return-value]
        inner_updates, new_inner = fn(updates, state.inner_state, params, inner_context(ctx, allow_donate=False))
        out = [
            None if u is None else torch.where(apply.to(u.device), u, torch.zeros_like(u))
            for u in returned(inner_updates)
        ]
        return out, ApplyIfFiniteState(**counts, inner_state=_select(apply, new_inner, state.inner_state))

    def _skips_itself(ctx: UpdateContext) -> bool:
        """Whether the step may run donated with GradScaler's ``found_inf`` as the skip flag: ``inner`` honours it
        in its own kernel (torch's fused kernels skip without a host sync; its other paths read the flag), no
        GradScaler flag is already in flight, and not traced (the other paths' host read would break the graph).
        The inner's state then stays as it was on a skipped step without a copy of it to select from."""
        return (
            ctx.donate
            and is_amp_native(fn)
            and ctx.grad_scale is None
            and ctx.found_inf is None
            and not torch.compiler.is_compiling()
        )

    return leaf_transformation(
        init_leaves, update_leaves, elementwise=is_elementwise(inner), segmentwise=is_segmentwise(inner)
    )


# --- lookahead -----------------------------------------------------------------------------------------------


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
      fast_state: the fast optimizer's state.
      steps_since_sync: fast steps since the last synchronisation (0-d int64).
      slow_params: the slow weights, shaped like the parameters; use them for evaluation.
    """

    fast_state: OptState
    steps_since_sync: Tensor
    slow_params: Any


def lookahead(fast_tx: GradientTransformation, sync_period: int, alpha: float) -> GradientTransformation:
    """Lookahead: a fast optimizer explores, slow weights follow it every ``sync_period`` steps.

    How the parameters relate: **the parameters you train (pass to ``update``, compute gradients at, apply
    the updates to) are the fast weights.** The state holds the fast optimizer's state and the slow weights
    (``state.slow_params``, initialised to the parameters). Rule, with ``phi`` the slow and ``theta`` the fast
    weights::

        theta <- theta + fast_tx.update(g, ...)                    every step
        every sync_period-th step:  phi <- phi + alpha * (theta - phi);  theta <- phi

    On a synchronising step the returned update moves the parameters to the new slow weights
    (``params + updates`` equals ``state.slow_params`` bitwise when applied with
    :func:`pureopt.apply_updates`). Evaluate with ``state.slow_params``. The fast optimizer's state carries
    on across synchronisations. ``update`` needs the parameters.

    Unlike optax, where the parameter tree holds both weight sets (``LookaheadParams``), here the parameter
    tree is the model's own, so ``torch.func.functional_call`` and the rest of a training loop are unchanged.

    Args:
      fast_tx: the inner ("fast") optimizer.
      sync_period: fast steps per synchronisation ``k`` (an int >= 1).
      alpha: the slow weights' step size (``0 <= alpha <= 1``).

    Example::

        tx = lookahead(pureopt.adam(lr=1e-3), sync_period=5, alpha=0.5)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        eval_params = state.slow_params

    Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019.
    """
    if not isinstance(fast_tx, GradientTransformation):
        raise TypeError(f"lookahead: fast_tx is a {type(fast_tx).__name__}, not a GradientTransformation")
    period = _check_int(sync_period, "sync_period", 1)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid alpha value: {alpha} (0 <= alpha <= 1 is required)")
    fn = as_leaf_update(fast_tx)

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> LookaheadState:
        slow = [None if p is None else p.detach().clone() for p in leaves]
        return LookaheadState(fast_tx.init(spec.unflatten(leaves)), new_count(leaves), spec.unflatten(slow))

    def update_leaves(
        updates: LeafList, state: LookaheadState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, LookaheadState]:
        if params is None:
            raise ValueError("lookahead needs the parameters: call update(updates, state, params)")
        if not isinstance(state, LookaheadState):
            raise ValueError(f"lookahead expects a LookaheadState, got a {type(state).__name__}")
        slow = ctx.state_leaves(state.slow_params)
        fast_updates, new_fast_state = fn(updates, state.fast_state, params, inner_context(ctx))
        sync = state.steps_since_sync + 1 >= period
        out: list[Any] = []
        new_slow: list[Any] = []
        for p, u, s in zip(params, returned(fast_updates), slow):
            if p is None:
                out.append(u)
                new_slow.append(s)
                continue
            fast = p if u is None else _add(p, u)
            target = s + alpha * (fast - s)
            cond = sync.to(p.device)
            step = torch.where(cond, target - p, torch.zeros_like(p) if u is None else u)
            out.append(step)
            new_slow.append(torch.where(cond, _add(p, step), s))
        new_state = LookaheadState(
            fast_state=new_fast_state,
            steps_since_sync=torch.where(sync, torch.zeros_like(state.steps_since_sync), state.steps_since_sync + 1),
            slow_params=ctx.spec.unflatten(new_slow),
        )
        return out, new_state

    return leaf_transformation(
        init_leaves, update_leaves, elementwise=is_elementwise(fast_tx), segmentwise=is_segmentwise(fast_tx)
    )


def _add(p: Tensor, u: Tensor) -> Tensor:
    """``p + u`` cast to ``p``'s dtype: exactly what :func:`pureopt.apply_updates` computes."""
    new = p + u
    return new if new.dtype == p.dtype else new.to(p.dtype)


# --- ema of updates ------------------------------------------------------------------------------------------


class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
      num_updates: number of updates so far (0-d int64), for the bias correction.
      ema: the (not bias-corrected) moving averages, shaped like the parameters.
    """

    num_updates: Tensor
    ema: Any


def ema(decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """An exponential moving average of the updates (optax's ``ema``).

    Rule, with ``t`` the number of updates so far including this one::

        m <- decay * m + (1 - decay) * u              (m starts at 0)
        u <- m / (1 - decay**t)   if debias   else   m

    Args:
      decay: the averaging factor (``0 <= decay < 1`` ... ``1`` keeps ``m`` at 0).
      debias: divide by ``1 - decay**t`` (Adam's bias correction), so that early averages are not shrunk
        towards zero.
      accumulator_dtype: dtype of ``m`` (default: the parameter's).

    A ``None`` update leaves its average unchanged and stays ``None`` (the count still advances).

    Example::

        tx = pureopt.chain(ema(0.9), pureopt.scale_by_learning_rate(0.1))   # SGD with (debiased) momentum
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value: {decay} (0 <= decay <= 1 is required)")

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> EmaState:
        zeros = [None if p is None else torch.zeros_like(p, dtype=accumulator_dtype) for p in leaves]
        return EmaState(new_count(leaves), spec.unflatten(zeros))

    def update_leaves(
        updates: LeafList, state: EmaState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmaState]:
        del params
        count = state.num_updates + 1
        moments = ctx.state_leaves(state.ema)
        new_moments = [m if u is None else decay * m + (1.0 - decay) * u.to(m.dtype) for m, u in zip(moments, updates)]
        if debias:
            correction = 1.0 - torch.pow(torch.as_tensor(decay, dtype=torch.float64), count.to(torch.float64))
            out = [
                None if u is None else m / correction.to(device=m.device, dtype=_real_dtype(m))
                for m, u in zip(new_moments, updates)
            ]
        else:
            out = [None if u is None else m for m, u in zip(new_moments, updates)]
        return out, EmaState(count, ctx.spec.unflatten(new_moments))

    return leaf_transformation(init_leaves, update_leaves, elementwise=True)


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


# --- averages of the parameters ------------------------------------------------------------------------------


class ParamAverageState(NamedTuple):
    """State of :func:`ema_params` / :func:`polyak_average`.

    Attributes:
      n_averaged: number of parameter sets averaged so far (0-d int64; ``AveragedModel.n_averaged``).
      average: the averaged parameters, shaped like the parameters; evaluate the model with them.
    """

    n_averaged: Tensor
    average: Any


class ParamAverager(NamedTuple):
    """A pure average of the parameters: ``state = avg.init(params)``; ``state = avg.update(params, state)``.

    ``update`` takes the parameters after an optimizer step (call it after ``apply_updates``) and returns the
    new state; ``state.average`` holds the averaged parameters.
    """

    init: Callable[[Params], ParamAverageState]
    update: Callable[[Params, ParamAverageState], ParamAverageState]


def _averager(average_fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> ParamAverager:
    """An averager whose updates after the first are ``average <- average_fn(average, params, n_averaged)``."""

    def init(params: Params) -> ParamAverageState:
        leaves, spec = _tree.flatten(params)
        average = [None if p is None else p.detach().clone() for p in leaves]
        return ParamAverageState(new_count(leaves), spec.unflatten(average))

    def update(params: Params, state: ParamAverageState) -> ParamAverageState:
        if not isinstance(state, ParamAverageState):
            raise ValueError(f"expected a ParamAverageState, got a {type(state).__name__}")
        leaves, spec = _tree.flatten(params)
        average = _tree.flatten_like(spec, state.average, "params", "the average")
        first = state.n_averaged == 0
        new = []
        for p, a in zip(leaves, average):
            if p is None:
                new.append(a)
            elif p.is_floating_point() or p.is_complex():
                p = p.detach().to(a.dtype)
                n = state.n_averaged.to(p.device)
                new.append(torch.where(first.to(p.device), p, average_fn(a, p, n)))
            else:  # integer buffers (e.g. num_batches_tracked) are not averaged: the latest value is kept
                new.append(p)
        return ParamAverageState(state.n_averaged + 1, spec.unflatten(new))

    return ParamAverager(init, update)


def ema_params(decay: float) -> ParamAverager:
    """An exponential moving average of the parameters, for evaluation (EMA / Polyak-style averaging).

    Same rule as ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``::

        first update:  average <- params
        afterwards:    average <- decay * average + (1 - decay) * params       (torch.lerp, as torch)

    Integer leaves are not averaged: the average keeps their latest value.

    Args:
      decay: the weight of the old average (``0 <= decay <= 1``), e.g. 0.999.

    Example::

        avg = ema_params(0.999)
        avg_state = avg.init(params)
        for batch in data:
            ...
            params = pureopt.apply_updates(params, updates)
            avg_state = avg.update(params, avg_state)
        evaluate(avg_state.average)
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value: {decay} (0 <= decay <= 1 is required)")
    weight = 1.0 - decay
    return _averager(lambda average, p, n: torch.lerp(average, p, weight))


def polyak_average(decay: float | None = None) -> ParamAverager:
    """Polyak averaging of the parameters: the running mean of all iterates, or an EMA when ``decay`` is given.

    With ``decay=None`` (Polyak & Juditsky 1992; stochastic weight averaging, Izmailov et al. 2018), the
    rule of ``torch.optim.swa_utils.AveragedModel(model)`` with its default averaging::

        average <- average + (params - average) / (n + 1)       (n = sets averaged so far; the first copies)

    This is AveragedModel's computation on CPU, to the bit; on CUDA AveragedModel instead calls
    ``torch._foreach_lerp_`` with the weight ``1 / (n + 1)`` rounded to float32, which differs from the
    running mean by that rounding.

    With a float ``decay`` it is :func:`ema_params` ``(decay)``.

    Example::

        swa = polyak_average()
        swa_state = swa.init(params)
        swa_state = swa.update(params, swa_state)   # after each step (or each epoch) of the averaging phase
    """
    if decay is not None:
        return ema_params(decay)
    return _averager(lambda average, p, n: average + (p - average) / (n + 1))
