"""``adafactor``: torch.optim.Adafactor with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import is_schedule, number
from pureopt.transforms.adafactor import adafactor_transform, check_adafactor_args

__all__ = ["adafactor"]


def adafactor(
    lr: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adafactor, as ``torch.optim.Adafactor``: factored second moments and a step size relative to the weights.

    Update rule, per parameter with its own step count ``t`` (``RMS(x) = ||x|| / sqrt(numel(x))``)::

        g <- -g if maximize
        w = t ** beta2_decay;   rho = min(lr, 1 / sqrt(t));   alpha = max(eps2, RMS(p)) * rho
        p <- p - lr * weight_decay * p                                   (decoupled decay)
        2+ dims:  R <- R + w * (mean(g**2, -1) - R);   C <- C + w * (mean(g**2, -2) - C)
                  V = (R @ C) / max(mean(R, -2), eps1)                   (factored over the last two dims)
        else:     V <- V + w * (g**2 - V)
        U = g / sqrt(max(V, eps1**2))
        p <- p - alpha / max(1, RMS(U) / d) * U

    torch reads ``step``, ``RMS(p)`` and ``RMS(U)`` back to the host every step; here they stay on the device
    as 0-d tensors (no synchronisation).

    Args:
      lr: caps the relative step size ``rho`` and scales the weight decay (float, 0-d tensor or schedule).
      beta2_decay: exponent of the second-moment decay schedule (<= 0).
      eps: ``(eps1, eps2)``: the floor of the second-moment estimate (``None``: the machine epsilon of the
        dtype the update is computed in) and the floor of ``RMS(p)`` in the step size.
      d: clipping threshold on the RMS of the normalised update (>= 1).
      weight_decay: decoupled weight decay coefficient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the factors (default: the parameter's, as torch); e.g. ``torch.float32`` for bf16
        parameters.

    Complex parameters are rejected, as torch does.

    Example::

        tx = pureopt.adafactor(lr=1e-2, weight_decay=1e-2)

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
    """
    if not is_schedule(lr):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        value = number(lr)  # type: ignore[arg-type]
        if value == value and not 0.0 <= value:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if isinstance(lr, Tensor):
            lr = lr.reshape(())
    check_adafactor_args(beta2_decay, eps, d)
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
    return adafactor_transform(lr, float(beta2_decay), eps, float(d), float(weight_decay), maximize, impl, state_dtype)
