"""``radam``: torch.optim.RAdam with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.radam import radam_transform

__all__ = ["radam"]


def radam(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """RAdam (rectified Adam), as ``torch.optim.RAdam``.

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize;   g <- g + weight_decay * p                 (coupled decay)
        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
        if rho_t > 5:
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            p <- p - lr * m_hat * sqrt(1 - beta2**t) / (sqrt(v) + eps) * r_t
        else:
            p <- p - lr * m_hat                                          (SGD with momentum while warming up)
        p <- p - lr * weight_decay * p_old                                 (decoupled decay)

    The branch on ``rho_t`` is taken per parameter with ``torch.where`` (no host synchronisation).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator.
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly (RAdamW) instead of adding an L2 term to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's, as torch); e.g. ``torch.float32`` for bf16
        parameters.

    Example::

        tx = pureopt.radam(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return radam_transform(
        lr,
        (float(betas[0]), float(betas[1])),
        float(eps),
        float(weight_decay),
        decoupled_weight_decay,
        maximize,
        impl,
        state_dtype,
    )
