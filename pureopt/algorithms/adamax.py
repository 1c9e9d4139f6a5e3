"""Adamax (Adam with the infinity norm; weight decay, maximize), as torch.optim.Adamax.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0
    t <- t + 1
    m <- m + (1 - beta1) * (g - m)                   (lerp; torch's exp_avg)
    u <- max(beta2 * u, |g| + eps)                   (torch's exp_inf)
    update = -(lr / (1 - beta1**t)) * m / u

The ``scale_by_adamax`` form returns the positive direction. Complex tensors are viewed as real pairs, as torch
does; sparse gradients are refused with torch's message.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1 (AdaMax).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Betas, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import addcdiv_update, on_host, over, per_tensor, scalars_for, torch_grad

__all__ = ["ADAMAX", "ScaleByAdamaxState", "adamax", "scale_by_adamax"]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    # torch: clr = lr / (1 - beta1**t) on Python floats; here per tensor in float64 (Python floats on CPU, applied)
    beta1 = k.h.betas[0]
    clr = per_tensor(steps, lambda t: over(k.coef, 1 - torch.pow(beta1, t)), host=on_host(k.apply, k.exp_avg))
    return {"step_size": scalars_for(clr, k.exp_avg)}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    beta1, beta2 = h.betas
    g, owned = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=h.weight_decay)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    abs_eps = ops.add_scalar(ops.abs(g, inplace=owned), h.eps, inplace=True)
    u = ops.maximum(ops.mul(k.exp_inf, beta2, inplace=k.donate), abs_eps, inplace=True)
    # (step_size * m) / u: torch's addcdiv order, so that p + update is bitwise torch's p.addcdiv_(m, u, -clr)
    return addcdiv_update(ops, k.target, m, u, k.step_size, owned=False), {"exp_avg": m, "exp_inf": u}


ADAMAX = Algorithm(
    "Adamax",
    record="ScaleByAdamaxState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_inf": state("exponentially weighted infinity norms.", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`adamax` and :func:`scale_by_adamax` (torch.optim.Adamax's state keys).",
)
ScaleByAdamaxState = ADAMAX.state


@ADAMAX.public
def adamax(
    lr: LR = 2e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adamax, as ``torch.optim.Adamax`` (the rule is in the module docstring).

    Args:
      betas: decay rates of the first moment and of the infinity norm.
      eps: added to ``|g|`` before the maximum.
      weight_decay: L2 penalty added to the gradient.

    Example::

        tx = pureopt.adamax(lr=2e-3, betas=(0.9, 0.999))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    return ADAMAX.build(locals())


@ADAMAX.public
def scale_by_adamax(
    betas: Betas = (0.9, 0.999), eps: Eps = 1e-8, *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Rescale updates by Adamax's ``m / (1 - beta1**t) / u`` with ``u <- max(beta2 * u, |g| + eps)``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_adamax(), pureopt.scale_by_learning_rate(2e-3))
    """
    return ADAMAX.build(locals())
