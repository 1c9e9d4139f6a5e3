"""``sign_sgd`` and ``signum``: fixed-size steps along the sign of the gradient or of its moving average."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.sign_sgd import signum_transform

__all__ = ["sign_sgd", "signum"]


def sign_sgd(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """signSGD: ``p <- p - lr * sign(g)``.

    Update rule, per parameter::

        g <- -g if maximize;   g <- g + weight_decay * p     (coupled decay, the default)
        p <- p - lr * sign(g)
        p <- p - lr * weight_decay * p_old                   (decoupled decay)

    Keeps no per-parameter state (the state holds only the update counter).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly instead of adding an L2 term inside the sign.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype the update is computed in (default: the gradient's).

    Example::

        tx = pureopt.sign_sgd(lr=1e-4)

    Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems",
    ICML 2018.
    """
    lr = checked_lr(lr)
    check_nonneg(weight_decay, "weight_decay")
    return signum_transform(lr, 0.0, weight_decay, decoupled_weight_decay, maximize, impl, state_dtype)


def signum(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Signum (signSGD with momentum): ``p <- p - lr * sign(m)``, ``m`` an EMA of the gradients.

    Update rule, per parameter (``m`` starts at zero)::

        g <- -g if maximize;   g <- g + weight_decay * p     (coupled decay, the default)
        m <- momentum * m + (1 - momentum) * g
        p <- p - lr * sign(m)
        p <- p - lr * weight_decay * p_old                   (decoupled decay)

    ``momentum=0`` is :func:`sign_sgd` (and keeps no buffer).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      momentum: the EMA coefficient, in [0, 1).
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly instead of adding an L2 term to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's).

    Example::

        tx = pureopt.signum(lr=1e-4, momentum=0.9)

    Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems",
    ICML 2018.
    """
    lr = checked_lr(lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    check_nonneg(weight_decay, "weight_decay")
    return signum_transform(lr, momentum, weight_decay, decoupled_weight_decay, maximize, impl, state_dtype)
