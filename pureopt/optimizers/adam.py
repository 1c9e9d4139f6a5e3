"""``adam`` and ``adamw``: torch.optim.Adam / AdamW with their argument names, defaults, validation, numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.adam import adam_transform

__all__ = ["adam", "adamw"]


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (``decoupled_weight_decay=True`` is AdamW).

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize;   g <- g + weight_decay * p   (coupled decay)
        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        v_used = max(v_max, v) if amsgrad else v
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v_used) / sqrt(1 - beta2**t) + eps)
        p <- p - lr * weight_decay * p_old                  (decoupled decay)

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator.
      weight_decay: weight decay coefficient.
      amsgrad: the AMSGrad variant (Reddi et al., 2018).
      maximize: maximize the objective instead of minimizing.
      decoupled_weight_decay: decay the weights directly (AdamW) instead of adding an L2 term to the gradient.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's, as torch); e.g. ``torch.float32`` for
        bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.adam(lr=1e-3, betas=(0.9, 0.99))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return adam_transform(
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


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay (default 0.01).

    Update rule: as :func:`adam`, with ``p <- p * (1 - lr * weight_decay)`` applied to the weights instead of
    adding ``weight_decay * p`` to the gradient.

    Example::

        tx = pureopt.adamw(lr=3e-4, weight_decay=0.1)

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    return adam(
        lr,
        betas,
        eps,
        weight_decay,
        amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        impl=impl,
        state_dtype=state_dtype,
    )
