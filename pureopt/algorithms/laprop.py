"""LaProp: Adam with the momentum taken over the *normalised* gradients (and the learning rate inside it).

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t`` (``m``, ``v``, ``mean`` and the
running averages ``L1``, ``L2`` start at zero)::

    g <- -g                                          if maximize
    t <- t + 1
    v <- beta2 * v + (1 - beta2) * g * g
    L1 <- beta1 * L1 + (1 - beta1) * lr;   L2 <- beta2 * L2 + (1 - beta2)     (exp_avg_lr_1, exp_avg_lr_2)
    mean <- mean + (1 - beta2) * (g - mean);   s = v - mean**2  if centered and t > steps_before_using_centered
                                               s = v             otherwise
    vmax <- max(vmax, s); use vmax for s             if amsgrad
    d = (sqrt(s + 1e-15) + eps) / sqrt(L2)
    m <- beta1 * m + (1 - beta1) * lr * g / d
    p <- p - (lr / L1) * m                           (lr / L1 = 1 / (1 - beta1**t) for a constant lr; 1 if lr == 0)
    p <- p * (1 - lr * weight_decay)                 if weight_decay != 0 (after the step, as the reference)

Keeping ``lr`` inside the momentum, with ``L1`` as the matching bias correction, is the paper's form: a changed
learning rate takes effect gradually. The ``scale_by_laprop`` form runs the rule with ``lr = 1`` and returns the
positive direction ``m / L1``. Complex tensors are viewed as real pairs.

Reference and defaults: pytorch-optimizer's ``LaProp`` (``lr=4e-4``, ``betas=(0.9, 0.999)``, ``eps=1e-15``,
``steps_before_using_centered=10``, ``weight_decouple=True``), whose per-parameter path pureopt follows, including
its ``1e-15`` inside the root and ``eps`` outside it. The authors' code (Z-T-WANG/LaProp-Optimizer) differs in three
small ways: ``d = sqrt(s / L2) + eps`` (eps not scaled by ``1/sqrt(L2)``, no ``1e-15``), and its weight decay is
``p <- p - weight_decay * p``, not scaled by ``lr`` (pass ``weight_decay / lr`` for that with a constant ``lr``).
The reference's coupled decay (``weight_decouple=False``) is added to the gradient only after the step has used it,
so it has no effect; pureopt has only the decoupled decay. Step counts are per parameter (the reference's bias
correction of ``v`` uses one count per param group; they differ only where a gradient was ``None``).

Ziyin, Wang & Ueda, "LaProp: Separating Momentum and Adaptivity in Adam", arXiv:2002.04839, 2020.
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
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    scalar_state,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import (
    add_scaled,
    add_update,
    decay_params,
    map_scalars_n,
    on_host,
    scalar_dtype,
    scalars_for,
    uniform,
)

__all__ = ["LAPROP", "ScaleByLaPropState", "laprop", "scale_by_laprop"]

Eps = Annotated[float, nonneg("epsilon"), AS_FLOAT]
NonNeg = Annotated[float, nonneg(), AS_FLOAT]
SQ_EPS = 1e-15
"""Added to the second moment inside the root (the reference's ``exp_avg_sq_eps``)."""


def _zero(p: Tensor) -> Tensor:
    return torch.zeros((), dtype=scalar_dtype(p.device), device=p.device)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    h = k.h
    beta1, beta2 = h.betas
    lr = 1.0 if h.lr is None else h.lr
    sign = 1.0 if h.lr is None else -1.0

    def fn(t: Tensor, l1: Tensor, l2: Tensor) -> tuple[Tensor, ...]:
        l1 = l1 * beta1 + (1.0 - beta1) * lr
        l2 = l2 * beta2 + (1.0 - beta2)
        bc1 = torch.where(torch.as_tensor(lr != 0), l1 / lr, torch.ones_like(l1))
        off = -(t > h.steps_before_using_centered).to(t.dtype)  # -1: subtract mean**2, 0: not yet
        return l1, l2, sign / bc1, torch.sqrt(l2), off

    host = (2, 3, 4) if on_host(k.apply, k.exp_avg) else ()
    l1, l2, *rest = map_scalars_n(fn, steps, k.exp_avg_lr_1, k.exp_avg_lr_2, outputs=5, host=host)
    coef, bc2_sqrt, centered = (scalars_for(values, k.exp_avg) for values in rest)
    return {"exp_avg_lr_1": l1, "exp_avg_lr_2": l2, "step_coef": coef, "bc2_sqrt": bc2_sqrt, "neg_centered": centered}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    beta1, beta2 = h.betas
    g = ops.neg(k.g) if h.maximize else k.g
    v = ops.addcmul(ops.mul(k.exp_avg_sq, beta2, inplace=k.donate), g, g, value=1 - beta2, inplace=own)
    new = {"exp_avg_sq": v}
    second = v
    if h.centered:
        mean = new["exp_mean_avg_beta2"] = ops.lerp(k.exp_mean_avg_beta2, g, 1 - beta2, inplace=k.donate)
        second = ops.add(ops.mul(ops.mul_list(mean, mean), k.neg_centered, inplace=own), v, inplace=own)
    if h.amsgrad:
        second = new["max_exp_avg_sq"] = ops.maximum(k.max_exp_avg_sq, second, inplace=k.donate)
    d = ops.add_scalar(ops.sqrt(ops.add_scalar(second, SQ_EPS), inplace=own), h.eps, inplace=own)
    d = ops.div(d, uniform(k.bc2_sqrt), inplace=own)
    scale = (1 - beta1) * (1.0 if h.lr is None else h.lr)
    m = ops.mul(k.exp_avg, beta1, inplace=k.donate)
    if isinstance(scale, float):  # the reference's exp_avg.mul_(beta1).addcdiv_(g, d, value=(1 - beta1) * lr)
        m = ops.addcdiv(m, g, d, value=scale, inplace=own)
    else:
        m = add_scaled(ops, m, ops.div_list(g, d, inplace=own and h.maximize), scale, inplace=own)
    new["exp_avg"] = m
    decay = h.weight_decay != 0 and h.lr is not None
    if k.apply:
        add_update(ops, k.p, m, uniform(k.step_coef), owned=False)
        if decay:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        return None, new
    updates = add_update(ops, None, m, k.step_coef, owned=False)
    assert updates is not None
    if decay:  # p_new = (p + u) * (1 - lr * wd)
        updates = add_scaled(ops, updates, ops.add(updates, k.p), -h.lr * h.weight_decay, inplace=own)
    return updates, new


LAPROP = Algorithm(
    "LaProp",
    record="ScaleByLaPropState",
    fields={
        "step": step_count(),
        "exp_avg": state("momentum of the normalised gradients (the learning rate inside)."),
        "exp_avg_sq": state("second moments of the gradients.", nonneg=True),
        "exp_avg_lr_1": scalar_state(_zero, "running average of the learning rate with beta1 (0-d float64 each)."),
        "exp_avg_lr_2": scalar_state(_zero, "running average of 1 with beta2: the bias correction of v (0-d)."),
        "exp_mean_avg_beta2": state("running averages of the gradients.", when=lambda h: h.centered),
        "max_exp_avg_sq": state("maxima of the second moments.", when=lambda h: h.amsgrad, nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    check_order=("lr", "betas", "weight_decay", "eps"),
    doc="State of :func:`laprop` and :func:`scale_by_laprop` (pytorch-optimizer's state keys).",
)
ScaleByLaPropState = LAPROP.state


@LAPROP.public
def laprop(
    lr: LR = 4e-4,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-15,
    weight_decay: NonNeg = 0.0,
    centered: bool = False,
    steps_before_using_centered: int = 10,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """LaProp (the rule is in the module docstring); pytorch-optimizer's defaults.

    Args:
      lr: learning rate (float, 0-d tensor or schedule); it scales the gradients entering the momentum.
      betas: decay rates of the momentum and of the second moment.
      eps: added to the root of the second moment.
      weight_decay: decoupled weight decay, ``p <- p * (1 - lr * weight_decay)`` after the step.
      centered: normalise by the gradients' variance (``v - mean**2``) once ``t > steps_before_using_centered``.
      steps_before_using_centered: steps that only accumulate the mean in the centered variant.
      amsgrad: normalise by the running maximum of the second moment (the reference's ``ams_bound``).
      state_dtype: dtype of the moments (default: the parameter's); ``exp_avg_lr_*`` are 0-d float64.

    Example::

        tx = pureopt.laprop(lr=4e-4, weight_decay=1e-2)

    Ziyin, Wang & Ueda, "LaProp: Separating Momentum and Adaptivity in Adam", 2020.
    """
    return LAPROP.build(locals())


@LAPROP.public
def scale_by_laprop(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-15,
    centered: bool = False,
    steps_before_using_centered: int = 10,
    amsgrad: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by LaProp's bias-corrected momentum of ``g / d`` (the rule with ``lr = 1``).

    Example::

        tx = pureopt.chain(pureopt.scale_by_laprop(), pureopt.scale_by_learning_rate(4e-4))
    """
    return LAPROP.build(locals())
