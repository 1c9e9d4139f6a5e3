"""``lion``: the Lion optimizer (sign of interpolated momentum, decoupled weight decay)."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.lion import lion_transform

__all__ = ["lion"]


def lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: Betas = (0.9, 0.99),
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Lion (EvoLved Sign Momentum): every coordinate moves by exactly ``lr`` along a sign.

    Update rule, per parameter (``m`` starts at zero)::

        g <- -g if maximize
        c = beta1 * m + (1 - beta1) * g
        p <- p - lr * (sign(c) + weight_decay * p)      (decoupled weight decay)
        m <- beta2 * m + (1 - beta2) * g

    Because the update has unit magnitude per coordinate, Lion wants a learning rate 3-10x smaller than AdamW's
    and a weight decay 3-10x larger, to keep ``lr * weight_decay`` similar.

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      betas: ``beta1`` interpolates momentum and gradient for the step; ``beta2`` is the momentum's decay.
      weight_decay: decoupled weight decay coefficient (multiplied by ``lr``).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum (default: the parameter's); e.g. ``torch.float32`` for bf16 params.
        Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.lion(lr=3e-5, weight_decay=0.1)

    Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of Optimization
    Algorithms", NeurIPS 2023.
    """
    lr = checked_lr(lr)
    check_betas(betas)
    check_nonneg(weight_decay, "weight_decay")
    return lion_transform(lr, (float(betas[0]), float(betas[1])), weight_decay, maximize, impl, state_dtype)
