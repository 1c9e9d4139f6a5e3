"""``yogi``: Adam with an additive second-moment update that controls the growth of the effective step."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.yogi import yogi_transform

__all__ = ["yogi"]


def yogi(
    lr: ScalarOrSchedule = 1e-2,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-3,
    initial_accumulator_value: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    bias_correction: bool = True,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Yogi: Adam with ``v <- v - (1 - beta2) * sign(v - g**2) * g**2`` (additive, sign-controlled).

    Update rule, per parameter (``m`` starts at 0, ``v`` at ``initial_accumulator_value``)::

        g <- -g if maximize;   g <- g + weight_decay * p
        m <- beta1 * m + (1 - beta1) * g
        v <- v - (1 - beta2) * sign(v - g**2) * g**2
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)   (bias_correction=True)
        p <- p - lr * m / (sqrt(v) + eps)                                         (bias_correction=False)

    Args:
      lr: learning rate (float, 0-d tensor or schedule); the paper's default is 1e-2.
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (the paper uses 1e-3).
      initial_accumulator_value: the starting value of ``v``.
      weight_decay: L2 penalty added to the gradient.
      bias_correction: Adam's debiasing with the per-parameter step count ``t`` (the paper's pseudo-code omits
        it for clarity; ``False`` is that pseudo-code exactly).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.yogi(lr=1e-2)

    Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(initial_accumulator_value, "initial_accumulator_value")
    check_nonneg(weight_decay, "weight_decay")
    return yogi_transform(
        lr,
        (float(betas[0]), float(betas[1])),
        eps,
        initial_accumulator_value,
        weight_decay,
        bias_correction,
        maximize,
        impl,
        state_dtype,
    )
