"""Yogi's additive second-moment scaling (``scale_by_yogi``) and the Yogi algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.select import check_impl
from pureopt.kernels.yogi import yogi as yogi_kernel
from pureopt.transforms._util import full, kernel_transform, step_init, zeros

__all__ = ["ScaleByYogiState", "scale_by_yogi", "yogi_transform"]


class ScaleByYogiState(NamedTuple):
    """State of :func:`scale_by_yogi` and :func:`pureopt.optimizers.yogi.yogi`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts for the bias correction; ``()`` without it.
      exp_avg: first moments (start at 0).
      exp_avg_sq: Yogi's second moments (start at ``initial_accumulator_value``).
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def yogi_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    initial_accumulator_value: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Yogi step (see :mod:`pureopt.kernels.yogi`) as a transformation; ``lr=None`` is ``scale_by_yogi``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = yogi_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s.get("step"),
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields = {
        "step": step_init if bias_correction else None,
        "exp_avg": zeros(state_dtype),
        "exp_avg_sq": full(initial_accumulator_value, state_dtype),
    }
    return kernel_transform(ScaleByYogiState, fields, step, elementwise=True)


def scale_by_yogi(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-3,
    initial_accumulator_value: float = 1e-6,
    bias_correction: bool = True,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by Yogi's moment estimates.

    Update rule, per parameter (``t`` its own step count)::

        m <- beta1 * m + (1 - beta1) * g
        v <- v - (1 - beta2) * sign(v - g**2) * g**2
        u = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)     (u = m / (sqrt(v) + eps) without
                                                                             bias correction)

    Args:
      betas: decay rates of the first and second moment estimates.
      eps: added to the denominator.
      initial_accumulator_value: the starting value of ``v`` (>= 0).
      bias_correction: apply Adam's bias correction (the paper's pseudo-code leaves it out).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_yogi(), pureopt.scale_by_learning_rate(1e-2))

    Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(initial_accumulator_value, "initial_accumulator_value")
    return yogi_transform(None, betas, eps, initial_accumulator_value, 0.0, bias_correction, False, impl, state_dtype)
