"""``lamb``: layer-wise adaptive large-batch optimization (Adam direction scaled by a per-layer trust ratio)."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.trust_ratio import lamb_transform

__all__ = ["lamb"]


def lamb(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """LAMB: Adam's bias-corrected direction plus decoupled weight decay, rescaled per tensor by ``||p|| / ||u||``.

    Update rule, per parameter tensor with its own step count ``t``::

        g <- -g if maximize
        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        u = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps) + weight_decay * p
        ratio = ||p|| / ||u||     (1 where ||p|| == 0 or ||u|| == 0; computed with torch.where)
        p <- p - lr * ratio * u

    Every tensor is one "layer". Use :func:`pureopt.partition` or the mask of
    :func:`~pureopt.transforms.trust_ratio.scale_by_trust_ratio` in a chain to exempt biases and norm weights.

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (after the bias correction, as torch.optim.Adam).
      weight_decay: decoupled weight decay, added to the direction before the trust ratio.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.lamb(lr=2e-3, weight_decay=0.01)

    You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch Optimization for
    Deep Learning: Training BERT in 76 minutes", ICLR 2020.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return lamb_transform(lr, (float(betas[0]), float(betas[1])), eps, weight_decay, maximize, impl, state_dtype)
