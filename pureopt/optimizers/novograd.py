"""``novograd``: momentum SGD on gradients normalised by a layer-wise second moment."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.novograd import novograd_transform

__all__ = ["novograd"]


def novograd(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.95, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_averaging: bool = False,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NovoGrad: per-tensor ("layer") normalised gradients, decoupled weight decay, heavy-ball momentum.

    Update rule, per parameter tensor ``p`` (``v`` is one scalar per tensor; ``m`` starts at zero)::

        g <- -g if maximize
        v <- ||g||**2 on the tensor's first step, else beta2 * v + (1 - beta2) * ||g||**2
        m <- beta1 * m + c * (g / (sqrt(v) + eps) + weight_decay * p)   (c = 1 - beta1 if grad_averaging else 1)
        p <- p - lr * m

    The second moment costs one scalar per tensor instead of one per element.

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: momentum factor and decay of the layer-wise second moment (the paper uses 0.95 and 0.98).
      eps: added to the denominator.
      weight_decay: weight decay, added to the normalised gradient.
      grad_averaging: scale the new term by ``1 - beta1`` (an EMA instead of a plain momentum sum).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.novograd(lr=1e-2, weight_decay=1e-3)

    Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang & Cohen, "Stochastic Gradient
    Methods with Layer-wise Adaptive Moments for Training of Deep Networks", 2019 (arXiv:1905.11286).
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return novograd_transform(
        lr, (float(betas[0]), float(betas[1])), eps, weight_decay, grad_averaging, maximize, impl, state_dtype
    )
