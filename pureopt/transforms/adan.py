"""Adan's Nesterov-momentum direction (``scale_by_adan``) and the Adan algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_beta, check_nonneg, resolve
from pureopt.kernels.adan import adan as adan_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros

__all__ = ["AdanState", "adan_transform", "check_betas3", "scale_by_adan"]


class AdanState(NamedTuple):
    """State of :func:`scale_by_adan` and :func:`pureopt.optimizers.adan.adan`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      exp_avg: EMAs of the gradient.
      exp_avg_diff: EMAs of the gradient difference ``g - g_prev``.
      exp_avg_sq: EMAs of the squared Nesterov gradient ``(g + beta2 * (g - g_prev))**2``.
      pre_grad: the previous gradient of each parameter.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_diff: Any
    exp_avg_sq: Any
    pre_grad: Any


def adan_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float, float],
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adan step (see :mod:`pureopt.kernels.adan`) as a transformation; ``lr=None`` is ``scale_by_adan``."""
    check_impl(impl)
    beta1, beta2, beta3 = (float(b) for b in betas)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = adan_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_diff"],
            s["exp_avg_sq"],
            s["pre_grad"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            no_prox=no_prox,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    zero_init = zeros(state_dtype)
    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "exp_avg": zero_init,
        "exp_avg_diff": zero_init,
        "exp_avg_sq": zero_init,
        "pre_grad": zero_init,
    }
    return kernel_transform(AdanState, fields, step, elementwise=True)


def check_betas3(betas: tuple[float, ...]) -> None:
    """Check three betas with torch.optim's wording (``Invalid beta parameter at index i: ...``)."""
    if len(betas) != 3:
        raise ValueError(f"Invalid betas: expected 3 values, got {len(betas)}")
    for i, beta in enumerate(betas):
        check_beta(beta, i)


def scale_by_adan(
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    eps: float = 1e-8,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace updates by Adan's direction (its three bias-corrected moments, no weight decay).

    Update rule, per parameter (``diff = g - g_prev``, 0 on the first step; ``t`` its own step count)::

        m <- beta1 * m + (1 - beta1) * g
        d <- beta2 * d + (1 - beta2) * diff
        n <- beta3 * n + (1 - beta3) * (g + beta2 * diff)**2
        u = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / (sqrt(n) / sqrt(1 - beta3**t) + eps)

    Args:
      betas: the three EMA coefficients, in the authors' code convention (``1 -`` the paper's).
      eps: added to the denominator.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adan(), pureopt.scale_by_learning_rate(1e-3))

    Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022.
    """
    check_nonneg(eps, "epsilon")
    check_betas3(betas)
    b1, b2, b3 = (float(b) for b in betas)
    return adan_transform(None, (b1, b2, b3), eps, 0.0, False, False, impl, state_dtype)
