"""``adagrad``: torch.optim.Adagrad with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.adagrad import adagrad_transform

__all__ = ["adagrad"]


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad``: per-coordinate step sizes from the sum of past squared gradients.

    Update rule, per parameter with its own step count ``t`` (``s`` starts at ``initial_accumulator_value``)::

        g <- -g if maximize;   g <- g + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s <- s + g * g
        p <- p - clr * g / (sqrt(s) + eps)

    Sparse gradients (``nn.Embedding(sparse=True)``) are supported as in torch: only the rows present in the
    gradient change, the update is a sparse tensor, and ``weight_decay`` cannot be combined with them
    (RuntimeError, as torch). Complex parameters are treated as pairs of reals (both parts of the accumulator
    start at ``initial_accumulator_value``).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      lr_decay: learning-rate decay: the step size at step ``t`` is ``lr / (1 + (t - 1) * lr_decay)``.
      weight_decay: L2 penalty added to the gradient.
      initial_accumulator_value: starting value of the sums of squared gradients.
      eps: term added to the denominator (after the square root).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path for dense gradients, ``"auto" | "loop" | "foreach"`` (sparse ones use the loop).
      state_dtype: dtype of the accumulators (default: the parameter's, as torch); e.g. ``torch.float32`` for
        bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = adagrad(lr=0.1, lr_decay=1e-4)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
    JMLR 12, 2011.
    """
    lr = checked_lr(lr)
    check_nonneg(lr_decay, "lr_decay")
    check_nonneg(weight_decay, "weight_decay")
    check_nonneg(initial_accumulator_value, "initial_accumulator_value")
    check_nonneg(eps, "epsilon")
    return adagrad_transform(lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize, impl, state_dtype)
