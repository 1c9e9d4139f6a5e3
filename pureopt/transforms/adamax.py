"""Adamax's moment estimates (``scale_by_adamax``) and the Adamax algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.adamax import adamax as adamax_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros

__all__ = ["ScaleByAdamaxState", "scale_by_adamax", "adamax_transform"]


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax` and :func:`pureopt.optimizers.adamax.adamax`.

    Field names follow torch.optim.Adamax's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      exp_avg: first moments.
      exp_inf: exponentially weighted infinity norms of the gradients.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_inf: Any


def adamax_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adamax step (see :mod:`pureopt.kernels.adamax`) as a transformation; ``lr=None`` gives
    :func:`scale_by_adamax`."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = adamax_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_inf"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {"step": res.step, "exp_avg": res.exp_avg, "exp_inf": res.exp_inf}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "exp_avg": zeros(state_dtype),
        "exp_inf": zeros(state_dtype),
    }
    return kernel_transform(ScaleByAdamaxState, fields, step, elementwise=True)


def scale_by_adamax(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by Adamax's bias-corrected first moment over the infinity norm (torch's eps placement).

    Update rule, per parameter with its own step count ``t`` (``m`` and ``u`` start at zero)::

        m <- beta1 * m + (1 - beta1) * g
        u <- max(beta2 * u, |g| + eps)
        output (m / (1 - beta1**t)) / u

    Args:
      betas: decay rates of the first moment and of the infinity norm.
      eps: added to ``|g|`` before the maximum (as torch does).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        from pureopt.combine import chain
        from pureopt.transforms.scale import scale_by_learning_rate
        tx = chain(scale_by_adamax(), scale_by_learning_rate(2e-3))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    return adamax_transform(None, (float(betas[0]), float(betas[1])), eps, 0.0, False, impl, state_dtype)
