"""Scaling updates by a constant or by a (scheduled) learning rate."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from pureopt.base import (
    EmptyState,
    GradientTransformation,
    LeafList,
    ScalarOrSchedule,
    UpdateContext,
    leaf_transformation,
)
from pureopt.hyperparams import is_schedule, resolve
from pureopt.transforms._util import new_count

__all__ = ["scale", "scale_by_learning_rate", "ScaleByScheduleState", "scale_by_schedule"]


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule` / a scheduled :func:`scale_by_learning_rate`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor); the schedule is evaluated at it.
    """

    num_updates: Tensor


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiply every update by ``step_size``.

    Update rule: ``u <- step_size * u``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_adam(), pureopt.scale(-1e-3))
    """

    def update_leaves(
        updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, EmptyState]:
        del params, ctx
        return [None if u is None else u * step_size for u in updates], state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)


def scale_by_schedule(step_size_fn: ScalarOrSchedule) -> GradientTransformation:
    """Multiply every update by ``step_size_fn(num_updates)``, the number of updates so far.

    Example::

        tx = pureopt.scale_by_schedule(pureopt.schedules.exponential_decay(1.0, 100, 0.5))
    """

    def init_leaves(leaves: list[Tensor], spec: object) -> ScaleByScheduleState:
        del spec
        return ScaleByScheduleState(new_count(leaves))

    def update_leaves(
        updates: LeafList, state: ScaleByScheduleState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, ScaleByScheduleState]:
        del params, ctx
        factor = resolve(step_size_fn, state.num_updates)
        out = [None if u is None else u * _cast_factor(factor, u) for u in updates]
        return out, ScaleByScheduleState(state.num_updates + 1)

    return leaf_transformation(init_leaves, update_leaves, elementwise=True)


def _cast_factor(factor: float | Tensor, like: Tensor) -> float | Tensor:
    """A tensor factor on ``like``'s device; in its dtype too when ``like`` is 0-d (else it would promote it)."""
    if isinstance(factor, Tensor):
        if like.dim() == 0 and like.is_floating_point() and factor.dtype != like.dtype:
            factor = factor.to(like.dtype)
        if factor.device != like.device:
            factor = factor.to(like.device)
    return factor


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (or ``+learning_rate`` with ``flip_sign=False``).

    ``learning_rate`` may be a float, a 0-d tensor (read at every update, so changing it in place takes
    effect), or a schedule of the update count.

    Example::

        tx = pureopt.chain(pureopt.scale_by_adam(), pureopt.scale_by_learning_rate(1e-3))
    """
    sign = -1.0 if flip_sign else 1.0
    if is_schedule(learning_rate):
        fn = learning_rate
        return scale_by_schedule(lambda count: sign * fn(count))  # type: ignore[operator]
    if isinstance(learning_rate, Tensor):
        lr_tensor = learning_rate

        def update_leaves(
            updates: LeafList, state: EmptyState, params: LeafList | None, ctx: UpdateContext
        ) -> tuple[LeafList, EmptyState]:
            del params, ctx
            factor = lr_tensor.reshape(()) * sign
            return [None if u is None else u * _cast_factor(factor, u) for u in updates], state

        return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves, elementwise=True)
    return scale(sign * float(learning_rate))  # type: ignore[arg-type]
