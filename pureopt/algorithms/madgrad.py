"""MADGRAD: momentumised, adaptive, dual-averaged gradient descent.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t`` (``S`` and ``s`` start at zero,
``x0`` at the parameter's initial value)::

    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 and not decoupled
    t <- t + 1
    lr' = lr + eps if lr != 0 else 0                 (the reference's "for stability")
    lam = lr' * sqrt(t)
    x0 = p + s / (S**(1/3) + eps)                    if momentum == 0 (S, s of the previous step)
    S <- S + lam * g * g                             (grad_sum_sq)
    s <- s + lam * g
    z = x0 - s / (S**(1/3) + eps)                    (a zero denominator counts as infinite when eps == 0)
    p_new = z                                        if momentum == 0
    p_new = momentum * p + (1 - momentum) * z        otherwise
    p_new <- p_new - lr' * weight_decay * p          if weight_decay != 0 and decoupled

The update is ``p_new - p``; the donated step writes ``p_new`` into the parameters. There is no ``scale_by_*``
form: ``lr`` enters the dual average nonlinearly (the step scales like ``lr**(2/3)``), so it is not a final
scale. MADGRAD needs the parameters (``update(grads, state, params)``). Complex tensors are viewed as real pairs.

Reference and defaults: the authors' ``madgrad`` package (``MADGRAD``: ``lr=1e-2``, ``momentum=0.9``, ``eps=1e-6``,
``decouple_decay``), also pytorch-optimizer's ``MADGRAD`` (``lr=1e-3``; ``maximize``). pureopt follows the authors'
package, with three differences: one step count per parameter instead of the package's one per optimizer (``k``;
they differ only for a parameter whose gradient was ``None`` on some step); with ``eps == 0`` and ``momentum == 0``
the zero denominator is infinite in the ``x0`` line too (as pytorch-optimizer; the package gives NaN there); sparse
gradients are refused (the package takes them with ``momentum == 0``). ``momentum * p + (1 - momentum) * z`` is one
``lerp`` (the package rounds ``p * momentum + z * (1 - momentum)``; pytorch-optimizer also uses ``lerp``).

Defazio & Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive, Dual Averaged Gradient Method for
Stochastic Optimization", JMLR 23(144), 2022 (arXiv:2101.11075, 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import (
    AS_FLOAT,
    LR,
    Algorithm,
    Check,
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    param_copy,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import map_scalars_n, on_host, scalar_for, torch_grad, uniform

__all__ = ["MADGRAD", "MadgradState", "madgrad"]


def _momentum(value: Any, name: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"Invalid momentum value: {value} (MADGRAD's momentum is in [0, 1))")
    return float(value)


Momentum = Annotated[float, Check(_momentum)]
Eps = Annotated[float, nonneg("epsilon"), AS_FLOAT]
NonNeg = Annotated[float, nonneg(), AS_FLOAT]


def _lr(h: Any) -> float | Tensor:
    """``lr + eps`` (``0`` when ``lr`` is zero), the reference's effective learning rate."""
    if isinstance(h.lr, Tensor):
        return torch.where(h.lr != 0, h.lr + h.eps, torch.zeros_like(h.lr))
    return h.lr + h.eps if h.lr != 0 else 0.0


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    lr = _lr(k.h)
    host = on_host(k.apply, k.grad_sum_sq)
    (lam,) = map_scalars_n(lambda t: (lr * torch.sqrt(t),), steps, outputs=1, like=k.grad_sum_sq, host=host)
    return {"lam": lam}


def _rms(ops: Any, sum_sq: list[Tensor], eps: float, own: bool) -> list[Tensor]:
    rms = ops.add_scalar(ops.pow(sum_sq, 1 / 3), eps, inplace=own)
    if eps == 0:  # 0/0 in s / rms: a coordinate that never had a gradient does not move
        rms = [torch.where(r == 0, torch.full_like(r, float("inf")), r) for r in rms]
    return rms


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, _ = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=coupled, own=own)
    x0 = ops.addcdiv(k.p, k.s, _rms(ops, k.grad_sum_sq, h.eps, own)) if h.momentum == 0 else k.x0  # p + s / rms
    lam = uniform(k.lam)
    if isinstance(lam, float):  # the reference's ops: S.addcmul_(g, g, value=lam); s.add_(g, alpha=lam)
        sum_sq = ops.addcmul(k.grad_sum_sq, g, g, value=lam, inplace=k.donate)
        s = ops.add(k.s, g, alpha=lam, inplace=k.donate)
    else:
        lg = ops.mul(g, lam)  # lam * g
        sum_sq = ops.addcmul(k.grad_sum_sq, lg, g, inplace=k.donate)
        s = ops.add(k.s, lg, inplace=k.donate)
    new = {"grad_sum_sq": sum_sq, "s": s}
    z = ops.addcdiv(x0, s, _rms(ops, sum_sq, h.eps, own), value=-1.0, inplace=own and h.momentum == 0)  # x0 - s/rms
    decay = ops.mul(k.p, scalar_for(-_lr(h) * h.weight_decay, k.p)) if decoupled else None
    if k.apply:
        if h.momentum == 0:
            ops.copy_(k.p, z)
        else:
            ops.lerp(k.p, z, 1 - h.momentum, inplace=True)
        if decay is not None:
            ops.add(k.p, decay, inplace=True)
        return None, new
    if h.momentum == 0:
        updates = ops.sub(z, k.p, inplace=own)
    else:
        updates = ops.mul(ops.sub(z, k.p, inplace=own), 1 - h.momentum, inplace=own)  # lerp(p, z, c) - p
    if decay is not None:
        updates = ops.add(updates, decay, inplace=own)
    return updates, new


MADGRAD = Algorithm(
    "MADGRAD",
    record="MadgradState",
    fields={
        "step": step_count(),
        "grad_sum_sq": state("weighted sums of the squared gradients (S).", nonneg=True),
        "s": state("weighted sums of the gradients (the dual average)."),
        "x0": param_copy("the parameters' initial values.", when=lambda h: h.momentum != 0),
    },
    math=_math,
    scalars=_scalars,
    params_required="madgrad",
    check_order=("lr", "momentum", "weight_decay", "eps"),
    doc="State of :func:`madgrad` (the ``madgrad`` package's state keys, with torch's ``step``).",
)
MadgradState = MADGRAD.state


@MADGRAD.public
def madgrad(
    lr: LR = 1e-2,
    momentum: Momentum = 0.9,
    weight_decay: NonNeg = 0.0,
    eps: Eps = 1e-6,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """MADGRAD (the rule is in the module docstring); defaults of the authors' ``madgrad`` package.

    Args:
      lr: learning rate (float, 0-d tensor or schedule); ``lr + eps`` is used, as in the reference.
      momentum: interpolation towards the dual-averaging iterate ``z``, in ``[0, 1)``.
      weight_decay: weight decay coefficient (an L2 term added to the gradient unless decoupled).
      eps: added to the cube root of the gradient sums.
      decoupled_weight_decay: subtract ``lr * weight_decay * p`` after the step (the package's ``decouple_decay``).

    Example::

        tx = pureopt.madgrad(lr=1e-2, momentum=0.9)

    Defazio & Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive, Dual Averaged Gradient Method for
    Stochastic Optimization", 2021.
    """
    return MADGRAD.build(locals())
