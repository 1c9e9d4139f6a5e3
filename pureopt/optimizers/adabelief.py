"""``adabelief``: Adam with the step size adapted by the "belief" in the observed gradient."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.adabelief import adabelief_transform

__all__ = ["adabelief"]


def adabelief(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    decoupled_weight_decay: bool = True,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdaBelief: Adam whose second moment tracks ``(g - m)**2``, the surprise of the gradient.

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize;   g <- g + weight_decay * p       (coupled decay)
        m <- beta1 * m + (1 - beta1) * g
        s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps        (eps inside, as in the paper)
        s_used = max(s_max, s) if amsgrad else s
        p <- p - lr / (1 - beta1**t) * m / (sqrt(s_used) / sqrt(1 - beta2**t) + eps)
        p <- p - lr * weight_decay * p_old                     (decoupled decay, the default)

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and of the belief term.
      eps: added inside the belief term and to the denominator (the reference default is 1e-16).
      weight_decay: weight decay coefficient.
      amsgrad: use the running maximum of the belief moments.
      decoupled_weight_decay: decay the weights directly (AdamW-style, the reference default) instead of adding
        an L2 term to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.adabelief(lr=1e-3, weight_decay=1e-2)

    Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief Optimizer: Adapting Stepsizes by
    the Belief in Observed Gradients", NeurIPS 2020.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return adabelief_transform(
        lr,
        (float(betas[0]), float(betas[1])),
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        impl,
        state_dtype,
    )
