"""Adam's moment estimates (``scale_by_adam``) and the Adam/AdamW algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt import kernels
from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.fused import mark_amp_native
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform, step_init, zeros

__all__ = ["ScaleByAdamState", "scale_by_adam", "adam_transform"]


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`, :func:`pureopt.adam` and :func:`pureopt.adamw`.

    Field names follow torch.optim's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      exp_avg: first moments.
      exp_avg_sq: second moments.
      max_exp_avg_sq: running maxima of the second moments (amsgrad), else ``()``.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any


def adam_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adam step (see :mod:`pureopt.kernels.adam`) as a transformation; ``lr=None`` is ``scale_by_adam``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = kernels.adam(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s.get("max_exp_avg_sq"),
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
            grad_scale=ctx.grad_scale,
            found_inf=ctx.found_inf,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields = {
        "step": step_init,
        "exp_avg": zeros(state_dtype),
        "exp_avg_sq": zeros(state_dtype),
        "max_exp_avg_sq": zeros(state_dtype) if amsgrad else None,
    }
    return mark_amp_native(kernel_transform(ScaleByAdamState, fields, step, elementwise=True))


def scale_by_adam(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates (torch.optim's eps placement).

    Update rule, per parameter with its own step count ``t``::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g**2          (amsgrad: v_used = max over time of v)
        u = (m / (1 - beta1**t)) / (sqrt(v_used) / sqrt(1 - beta2**t) + eps)

    Args:
      betas: decay rates of the first and second moment estimates.
      eps: added to the denominator for numerical stability (after the bias correction, as torch does).
      amsgrad: use the running maximum of the second moments (Reddi et al., 2018).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adam(), pureopt.scale_by_learning_rate(1e-3))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    return adam_transform(None, betas, eps, 0.0, False, amsgrad, False, impl, state_dtype)
