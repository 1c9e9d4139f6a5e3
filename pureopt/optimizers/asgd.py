"""``asgd``: torch.optim.ASGD with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.asgd import asgd_transform

__all__ = ["asgd"]


def asgd(
    lr: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Averaged stochastic gradient descent, as ``torch.optim.ASGD``.

    Update rule, per parameter with its own step count ``t`` (``eta`` starts at ``lr``, ``mu`` at 1)::

        g <- -g if maximize;   g <- g + weight_decay * p
        p <- p * (1 - lambd * eta) - eta * g
        ax <- ax + mu * (p - ax)
        eta <- lr / (1 + lambd * lr * t) ** alpha
        mu <- 1 / max(1, t - t0)

    The averaged iterate ``ax`` is kept in the state (``state.ax``), as torch keeps it in ``state['ax']``; it
    equals the parameter until ``t0`` steps have passed and averages the iterates afterwards. ``update`` needs
    the parameters. Complex parameters are treated as pairs of reals, as torch does. Sparse gradients raise.

    Args:
      lr: learning rate (float, 0-d tensor or schedule; read at every update, as torch reads its group's lr).
      lambd: decay term.
      alpha: power of the step-size decay.
      t0: the step count after which averaging starts.
      weight_decay: L2 penalty added to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of ``ax`` (default: the parameter's, as torch); ``eta``, ``mu`` and ``step`` are kept
        in torch's scalar dtype.

    Example::

        tx = asgd(lr=0.01, t0=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        averaged = state.ax

    Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4),
    1992.
    """
    lr = checked_lr(lr)
    check_nonneg(weight_decay, "weight_decay")
    return asgd_transform(lr, lambd, alpha, t0, weight_decay, maximize, impl, state_dtype)
