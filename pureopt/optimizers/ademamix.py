"""``ademamix``: Adam with a second, slow gradient EMA mixed into the numerator."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.ademamix import ademamix_transform, check_ademamix_args

__all__ = ["ademamix"]


def ademamix(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    alpha: float = 2.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdEMAMix: Adam plus ``alpha`` times a slow EMA of the gradient (``beta3`` close to 1) in the numerator.

    Update rule, per parameter with its own step count ``t``::

        g <- -g if maximize
        m1 <- beta1 * m1 + (1 - beta1) * g                 (fast, bias-corrected)
        m2 <- beta3_t * m2 + (1 - beta3_t) * g             (slow, not bias-corrected)
        v <- beta2 * v + (1 - beta2) * g**2
        p <- p - lr * ((m1 / (1 - beta1**t) + alpha_t * m2) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
                       + weight_decay * p)                 (decoupled weight decay)

    ``alpha_t = alpha`` and ``beta3_t = beta3`` unless the paper's warmups are on: ``alpha_warmup=T`` gives
    ``alpha_t = min(t * alpha / T, alpha)``; ``beta3_warmup=T`` moves ``beta3_t`` from ``beta1`` to ``beta3``
    linearly in half-life over ``T`` steps (see :mod:`pureopt.kernels.ademamix`). Both are advised for large
    ``beta3`` (the paper sets ``T`` to the length of training).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: ``(beta1, beta2, beta3)``: fast EMA, second moment, slow EMA.
      alpha: weight of the slow EMA (the reference default is 2; the paper uses 5-10 for language models).
      eps: added to the denominator.
      weight_decay: decoupled weight decay coefficient (multiplied by ``lr``).
      alpha_warmup: number of steps of the alpha warmup (``None``: off).
      beta3_warmup: number of steps of the beta3 warmup (``None``: off).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.ademamix(lr=1e-3, alpha=8.0, alpha_warmup=10_000, beta3_warmup=10_000, weight_decay=0.1)

    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024 (arXiv:2409.03137).
    """
    lr = checked_lr(lr)
    check_ademamix_args(betas, alpha, eps, alpha_warmup, beta3_warmup)
    check_nonneg(weight_decay, "weight_decay")
    b1, b2, b3 = (float(b) for b in betas)
    return ademamix_transform(
        lr, (b1, b2, b3), alpha, eps, weight_decay, alpha_warmup, beta3_warmup, maximize, impl, state_dtype
    )
