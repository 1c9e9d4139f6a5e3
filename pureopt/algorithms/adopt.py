"""ADOPT: Adam with the gradient normalised by the *previous* second moment, then clipped and averaged.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t`` (``m``, ``v`` start at zero)::

    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 and not decoupled
    p <- p * (1 - lr * weight_decay)                 if weight_decay != 0 and decoupled (every step, the first too)
    t <- t + 1
    t == 1:  v <- g * g                              (the first step only initialises v: m and p stay)
    t > 1:   n = g / max(sqrt(v), eps)               (v of the previous step)
             n <- clamp(n, -t**clip_exponent, t**clip_exponent)   if clip_exponent is not None
             m <- m + (1 - beta1) * (n - m)
             p <- p - lr * m
             v <- beta2 * v + (1 - beta2) * g * g

The clipping (``clip_exponent=0.25``, the clipping value ``t**0.25``) is the authors' update of Nov 2024 and their
default; ``clip_exponent=None`` is the unclipped algorithm of the paper's first version. The ``scale_by_adopt`` form
returns the positive direction ``m``. Complex tensors are viewed as real pairs.

Reference and defaults: the authors' ``adopt.py`` (iShohei220/adopt; ``clip_lambda=lambda step: step**0.25``,
``eps=1e-6``, ``betas=(0.9, 0.9999)``) and pytorch-optimizer's ``ADOPT``, which agree on the rule above. Both keep
one step count per param group; pureopt keeps one per parameter (torch.optim's convention), which differs only for
a parameter whose gradient was ``None`` on some step (its own count does not advance). The clipping value is
``t ** clip_exponent`` instead of an arbitrary callable (a number in a param group pickles with a checkpoint).

Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo, "ADOPT: Modified Adam Can
Converge with Any beta2 with the Optimal Rate", NeurIPS 2024.
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
    Betas,
    Check,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    nonneg,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import (
    add_decay,
    add_update,
    decay_params,
    map_scalars_n,
    on_host,
    torch_grad,
    uniform,
)

__all__ = ["ADOPT", "ScaleByAdoptState", "adopt", "scale_by_adopt"]


def _exponent(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not float(value) >= 0:
        raise ValueError(f"Invalid clip_exponent value: {value}")
    return float(value)


ClipExponent = Annotated[float | None, Check(_exponent)]
EpsF = Annotated[float, nonneg("epsilon"), AS_FLOAT]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    # per tensor: the first step only initialises v (weights 0 for m and p; v <- g*g); later steps Adam-like
    h = k.h
    beta1, beta2 = h.betas
    expo = h.clip_exponent

    def fn(t: Tensor) -> tuple[Tensor, ...]:
        first = t == 1
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        clip = torch.pow(t, expo) if expo is not None else one
        return (
            torch.where(first, one, torch.full_like(t, h.eps)),  # floor of sqrt(v) (1: keeps n finite at t == 1)
            -clip,
            clip,
            torch.where(first, zero, torch.full_like(t, 1 - beta1)),  # m's weight
            torch.where(first, one, torch.full_like(t, 1 - beta2)),  # v's weight (v <- lerp(v, g*g, w))
            torch.where(first, zero, k.coef * one),  # the step's coefficient
            torch.where(first, zero, torch.full_like(t, beta2)),  # v's decay (v <- decay * v + w * g * g)
        )

    host = on_host(k.apply, k.exp_avg)
    floor, lo, hi, w1, w2, coef, decay = map_scalars_n(fn, steps, outputs=7, like=k.exp_avg, host=host)
    return {"floor": floor, "lo": lo, "hi": hi, "w1": w1, "w2": w2, "step_coef": coef, "v_decay": decay}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay and h.lr is not None
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, _ = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=coupled, own=own)
    n = ops.div_list(g, ops.clamp(ops.sqrt(k.exp_avg_sq), k.floor, inplace=own), inplace=False)
    if h.clip_exponent is not None:
        n = ops.clamp(n, k.lo, k.hi, inplace=own)
    m = ops.lerp(k.exp_avg, n, k.w1, inplace=k.donate)
    decay, w2 = uniform(k.v_decay), uniform(k.w2)
    if isinstance(decay, float) and isinstance(w2, float):  # the reference's v.mul_(beta2).addcmul_(g, g, 1 - beta2)
        v = ops.addcmul(ops.mul(k.exp_avg_sq, decay, inplace=k.donate), g, g, value=w2, inplace=own)
    else:
        v = ops.lerp(k.exp_avg_sq, ops.mul_list(g, g), k.w2, inplace=k.donate)
    new = {"exp_avg": m, "exp_avg_sq": v}
    if k.apply:  # the authors' order: decay, then p.add_(m, alpha=-lr)
        if decoupled:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        add_update(ops, k.p, m, uniform(k.step_coef), owned=False)
        return None, new
    updates = add_update(ops, None, m, k.step_coef, owned=False)
    assert updates is not None
    if decoupled:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=own)
    return updates, new


ADOPT = Algorithm(
    "ADOPT",
    record="ScaleByAdoptState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments of the normalised, clipped gradients."),
        "exp_avg_sq": state("second moments of the gradients (one step behind the normalisation).", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    neutral={"decoupled_weight_decay": False},
    check_order=("lr", "betas", "weight_decay", "eps"),
    doc="State of :func:`adopt` and :func:`scale_by_adopt` (the authors' state keys).",
)
ScaleByAdoptState = ADOPT.state


@ADOPT.public
def adopt(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.9999),
    eps: EpsF = 1e-6,
    weight_decay: NonNeg = 0.0,
    decoupled_weight_decay: bool = False,
    clip_exponent: ClipExponent = 0.25,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """ADOPT (the rule is in the module docstring); defaults of the authors' implementation.

    Args:
      betas: decay rates of the first moment (of the normalised gradient) and of the second moment.
      eps: lower bound of ``sqrt(v)`` in the normalisation.
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: multiply the parameters by ``1 - lr * weight_decay`` (AdamW style, the authors'
        ``decouple=True``) instead of adding ``weight_decay * p`` to the gradient.
      clip_exponent: clip the normalised gradient to ``[-t**clip_exponent, t**clip_exponent]`` at step ``t``;
        ``None``: no clipping (the paper's first version).

    Example::

        tx = pureopt.adopt(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)

    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate", NeurIPS 2024.
    """
    return ADOPT.build(locals())


@ADOPT.public
def scale_by_adopt(
    betas: Betas = (0.9, 0.9999),
    eps: EpsF = 1e-6,
    clip_exponent: ClipExponent = 0.25,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by ADOPT's momentum of clipped ``g / max(sqrt(v_prev), eps)`` (zero at the first step).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adopt(), pureopt.scale_by_learning_rate(1e-3))
    """
    return ADOPT.build(locals())
