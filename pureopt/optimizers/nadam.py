"""``nadam``: torch.optim.NAdam with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.nadam import nadam_transform

__all__ = ["nadam"]


def nadam(
    lr: ScalarOrSchedule = 2e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdam (Adam with Nesterov momentum), as ``torch.optim.NAdam``.

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize;   g <- g + weight_decay * p                 (coupled decay)
        mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay));   mu_product <- mu_product * mu_t
        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        d = sqrt(v / (1 - beta2**t)) + eps
        p <- p - lr * (1 - mu_t) / (1 - mu_product) * g / d
               - lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / d
        p <- p - lr * weight_decay * p_old                                 (decoupled decay)

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator.
      weight_decay: weight decay coefficient.
      momentum_decay: momentum decay (psi in the paper).
      decoupled_weight_decay: decay the weights directly (NAdamW) instead of adding an L2 term to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's, as torch); e.g. ``torch.float32`` for bf16
        parameters. ``mu_product`` is a 0-d tensor in the step count's dtype, as torch keeps it.

    Example::

        tx = pureopt.nadam(lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True)

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    check_nonneg(momentum_decay, "momentum_decay")
    return nadam_transform(
        lr,
        (float(betas[0]), float(betas[1])),
        float(eps),
        float(weight_decay),
        float(momentum_decay),
        decoupled_weight_decay,
        maximize,
        impl,
        state_dtype,
    )
