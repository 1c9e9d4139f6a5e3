"""Adagrad's accumulator (``scale_by_adagrad``) and the Adagrad algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_nonneg, resolve
from pureopt.kernels.adagrad import adagrad as adagrad_kernel
from pureopt.kernels.fused import mark_amp_native
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init

__all__ = ["ScaleByAdagradState", "scale_by_adagrad", "adagrad_transform"]


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad` and :func:`pureopt.optimizers.adagrad.adagrad`.

    Field names follow torch.optim.Adagrad's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      sum: per-parameter sums of squared gradients (dense, shaped like the parameter).
    """

    num_updates: Tensor
    step: Any
    sum: Any


def _accumulator_init(value: float, dtype: torch.dtype | None) -> LeafInitFn:
    """``value`` everywhere; ``value + value*1j`` for complex parameters (torch sets both components)."""

    def init(p: Tensor) -> Tensor:
        fill = complex(value, value) if (dtype or p.dtype).is_complex else value
        return torch.full_like(p, fill, dtype=dtype)

    return init


def adagrad_transform(
    lr: ScalarOrSchedule | None,
    lr_decay: float,
    weight_decay: float,
    initial_accumulator_value: float,
    eps: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adagrad step (see :mod:`pureopt.kernels.adagrad`) as a transformation; ``lr=None`` gives
    :func:`scale_by_adagrad`."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = adagrad_kernel(
            params,
            grads,
            s["sum"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
            grad_scale=ctx.grad_scale,
            found_inf=ctx.found_inf,
        )
        return res.updates, {"step": res.step, "sum": res.sum}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "sum": _accumulator_init(float(initial_accumulator_value), state_dtype),
    }
    return mark_amp_native(kernel_transform(ScaleByAdagradState, fields, step, elementwise=True))


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by the root of the sum of all past squared gradients (Adagrad, torch's eps placement).

    Update rule, per parameter (``s`` starts at ``initial_accumulator_value``)::

        s <- s + g * g
        u = g / (sqrt(s) + eps)

    Sparse (COO) gradients are accepted: only their rows change, and the update is sparse over the same rows.

    Args:
      initial_accumulator_value: starting value of the accumulators (>= 0).
      eps: added to the denominator for numerical stability (after the square root, as torch does).
      impl: kernel path for dense gradients, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the accumulators (default: the parameter's).

    Example::

        from pureopt.combine import chain
        from pureopt.transforms.scale import scale_by_learning_rate
        tx = chain(scale_by_adagrad(), scale_by_learning_rate(0.1))

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
    JMLR 12, 2011.
    """
    check_nonneg(initial_accumulator_value, "initial_accumulator_value")
    check_nonneg(eps, "epsilon")
    return adagrad_transform(None, 0.0, 0.0, initial_accumulator_value, eps, False, impl, state_dtype)
