"""``adadelta``: torch.optim.Adadelta with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.adadelta import adadelta_transform, check_rho

__all__ = ["adadelta"]


def adadelta(
    lr: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adadelta, as ``torch.optim.Adadelta``: steps scaled by the ratio of the RMS of past steps and gradients.

    Update rule, per parameter (``v`` and ``u`` start at zero)::

        g <- -g if maximize;   g <- g + weight_decay * p
        v <- rho * v + (1 - rho) * g * g
        delta = sqrt(u + eps) / sqrt(v + eps) * g
        u <- rho * u + (1 - rho) * delta * delta
        p <- p - lr * delta

    Complex parameters are treated as pairs of reals, as torch does. Sparse gradients raise (as torch). There is
    no ``capturable`` flag: the update never reads values back to the host.

    Args:
      lr: coefficient that scales delta before it is applied (float, 0-d tensor or schedule).
      rho: coefficient of the running averages (0 <= rho <= 1).
      eps: term added inside both square roots.
      weight_decay: L2 penalty added to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the running averages (default: the parameter's, as torch).

    Example::

        tx = adadelta(lr=1.0, rho=0.95)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)

    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """
    lr = checked_lr(lr)
    check_rho(rho)
    check_nonneg(eps, "epsilon")
    check_nonneg(weight_decay, "weight_decay")
    return adadelta_transform(lr, rho, eps, weight_decay, maximize, impl, state_dtype)
