"""``rmsprop``: torch.optim.RMSprop with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.rmsprop import rmsprop_transform

__all__ = ["rmsprop"]


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop`` (plain or centered, with optional momentum).

    Update rule, per parameter (all buffers start at zero; no bias correction)::

        g <- -g if maximize;   g <- g + weight_decay * p
        v <- alpha * v + (1 - alpha) * g**2                        (square_avg)
        m <- alpha * m + (1 - alpha) * g                           (grad_avg, centered only)
        avg = sqrt(v - m**2) + eps  if centered  else  sqrt(v) + eps
        b <- momentum * b + g / avg;   p <- p - lr * b            if momentum > 0
        p <- p - lr * g / avg                                      otherwise

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      alpha: smoothing constant of the running averages.
      eps: term added to the root of the average (outside the square root).
      weight_decay: L2 penalty added to the gradient.
      momentum: momentum factor.
      centered: normalise by an estimate of the gradient's variance instead of its raw second moment.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the running averages and momentum buffer (default: the parameter's, as torch);
        e.g. ``torch.float32`` for bf16 parameters. Updates are then computed in that dtype and cast back by
        ``apply_updates``.

    Example::

        tx = pureopt.rmsprop(lr=1e-3, alpha=0.9, momentum=0.9, centered=True)

    Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012); Graves,
    "Generating Sequences With Recurrent Neural Networks" (centered variant), 2013.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_nonneg(momentum, "momentum")
    check_nonneg(weight_decay, "weight_decay")
    check_nonneg(alpha, "alpha")
    return rmsprop_transform(
        lr, float(alpha), float(eps), float(weight_decay), float(momentum), centered, maximize, impl, state_dtype
    )
