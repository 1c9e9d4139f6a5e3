"""``rprop``: torch.optim.Rprop with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.rprop import check_etas, check_step_sizes, rprop_transform

__all__ = ["rprop"]


def rprop(
    lr: ScalarOrSchedule = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The resilient backpropagation algorithm, as ``torch.optim.Rprop``.

    Every element has its own step size ``s`` (starting at ``lr``) that grows by ``eta_plus`` while the
    gradient keeps its sign and shrinks by ``eta_minus`` when the sign flips; only the gradient's sign is used.
    Update rule, per element (``prev`` starts at zero)::

        g <- -g if maximize
        q = sign(g * prev)
        s <- clamp(s * (eta_plus if q > 0 else eta_minus if q < 0 else 1), step_size_min, step_size_max)
        g <- 0 where q < 0          (after a sign change, skip this step)
        p <- p - sign(g) * s;   prev <- g

    The sign-dependent choices are ``torch.where`` on tensors: no host synchronisation.

    Args:
      lr: the initial step size (float, 0-d tensor or schedule). As in torch it is only read when a
        parameter takes its first step (torch creates the state then).
      etas: ``(eta_minus, eta_plus)``, multiplicative decrease and increase factors
        (``0 < eta_minus < 1 < eta_plus``).
      step_sizes: ``(min, max)`` bounds of the step sizes.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of ``prev`` and ``step_size`` (default: the parameter's, as torch).

    Example::

        tx = pureopt.rprop(lr=1e-3, etas=(0.5, 1.2), step_sizes=(1e-6, 1.0))

    Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
    1993.
    """
    lr = checked_lr(lr)
    check_etas(etas)
    check_step_sizes(step_sizes)
    return rprop_transform(lr, etas, step_sizes, maximize, impl, state_dtype)
