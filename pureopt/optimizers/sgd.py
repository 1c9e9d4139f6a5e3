"""``sgd``: torch.optim.SGD with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.momentum import sgd_transform

__all__ = ["sgd"]


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    Update rule, per parameter (``b`` is the momentum buffer; on its first step ``b <- g``)::

        g <- -g if maximize;   g <- g + weight_decay * p
        b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b  if nesterov  else  b
        p <- p - lr * g

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      momentum: momentum factor.
      dampening: dampening for momentum.
      weight_decay: L2 penalty added to the gradient.
      nesterov: Nesterov momentum (Sutskever et al., 2013).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's, as torch); e.g. ``torch.float32``
        for bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.sgd(lr=0.1, momentum=0.9, nesterov=True)
    """
    lr = checked_lr(lr)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    check_nonneg(weight_decay, "weight_decay")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return sgd_transform(lr, momentum, dampening, weight_decay, nesterov, maximize, impl, state_dtype)
