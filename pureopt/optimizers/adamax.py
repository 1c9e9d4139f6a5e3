"""``adamax``: torch.optim.Adamax with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.adamax import adamax_transform

__all__ = ["adamax"]


def adamax(
    lr: ScalarOrSchedule = 2e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adamax, as ``torch.optim.Adamax``: Adam with the infinity norm in place of the second moment.

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize;   g <- g + weight_decay * p
        m <- beta1 * m + (1 - beta1) * g
        u <- max(beta2 * u, |g| + eps)
        p <- p - lr / (1 - beta1**t) * m / u

    Complex parameters are treated as pairs of reals, as torch does. Sparse gradients raise (as torch).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running average of the gradient and of the infinity norm.
      eps: term added to ``|g|`` before the maximum.
      weight_decay: L2 penalty added to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's, as torch).

    Example::

        tx = adamax(lr=2e-3, betas=(0.9, 0.999))
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1 (AdaMax).
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return adamax_transform(lr, (float(betas[0]), float(betas[1])), eps, weight_decay, maximize, impl, state_dtype)
