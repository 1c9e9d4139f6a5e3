"""``adan``: adaptive Nesterov momentum (three moments), restart-free, with proximal weight decay."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.adan import adan_transform, check_betas3

__all__ = ["adan"]


def adan(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    no_prox: bool = False,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adan: moments of the gradient, of the gradient difference, and of the squared Nesterov gradient.

    Update rule, per parameter with its own step count ``t`` (``diff = g - g_prev``, 0 on the first step)::

        g <- -g if maximize
        m <- beta1 * m + (1 - beta1) * g
        d <- beta2 * d + (1 - beta2) * diff
        n <- beta3 * n + (1 - beta3) * (g + beta2 * diff)**2
        u = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / (sqrt(n) / sqrt(1 - beta3**t) + eps)
        p <- (p - lr * u) / (1 + lr * weight_decay)           (proximal decay, the paper's)
        p <- p * (1 - lr * weight_decay) - lr * u             (no_prox=True)

    The betas follow the authors' released code, ``1 -`` the paper's: the paper's ``(0.02, 0.08, 0.01)`` is
    ``betas=(0.98, 0.92, 0.99)``. This is the restart-free algorithm (no restart condition).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: the three EMA coefficients (gradient, gradient difference, squared Nesterov gradient).
      eps: added to the denominator.
      weight_decay: weight decay coefficient.
      no_prox: decay multiplicatively (AdamW-style) instead of with the proximal step.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.adan(lr=1e-3, weight_decay=0.02)

    Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
    2022 (arXiv:2208.06677; IEEE TPAMI 2024).
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas3(betas)
    check_nonneg(weight_decay, "weight_decay")
    b1, b2, b3 = (float(b) for b in betas)
    return adan_transform(lr, (b1, b2, b3), eps, weight_decay, no_prox, maximize, impl, state_dtype)
