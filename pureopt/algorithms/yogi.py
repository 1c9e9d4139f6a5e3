"""Yogi: Adam with an additive, sign-controlled second-moment update that cannot blow the step size up.

Update rule (Zaheer et al. 2018, Algorithm 2), per parameter ``p`` with gradient ``g``::

    g <- -g                                            if maximize
    g <- g + weight_decay * p                          if weight_decay != 0 (L2 penalty)
    m <- beta1 * m + (1 - beta1) * g                   (m starts at 0)
    v <- v - (1 - beta2) * sign(v - g**2) * g**2       (v starts at initial_accumulator_value)
    update = -lr * m / (sqrt(v) + eps)                 without bias correction (the paper's algorithm)
    update = -(lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)   with it (t: own step count)

The paper leaves Adam's debiasing out of its pseudo-code for clarity; ``bias_correction=True`` (the default)
applies it as torch.optim.Adam does. ``v`` stays non-negative for a non-negative start. The ``scale_by_yogi`` form
returns the positive direction. Complex tensors are viewed as real pairs.

Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Betas,
    Eps,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    filled,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import adam_bias_corrections, addcdiv_update, on_host, torch_grad

__all__ = ["YOGI", "ScaleByYogiState", "scale_by_yogi", "yogi"]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    if not k.h.bias_correction:
        return {}
    beta1, beta2 = k.h.betas
    step_size, bc2_sqrt = adam_bias_corrections(
        steps, k.h.lr, beta1, beta2, like=k.exp_avg, host=on_host(k.apply, k.exp_avg)
    )
    return {"step_size": step_size, "bc2_sqrt": bc2_sqrt}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    beta1, beta2 = h.betas
    g, _ = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=h.weight_decay)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    g2 = ops.mul_list(g, g)
    direction = ops.sign(ops.sub(k.exp_avg_sq, g2), inplace=True)
    v = ops.addcmul(k.exp_avg_sq, direction, g2, value=-(1 - beta2), inplace=k.donate)
    denom = ops.sqrt(v)
    if h.bias_correction:
        denom = ops.div(denom, k.bc2_sqrt, inplace=True)
    denom = ops.add_scalar(denom, h.eps, inplace=True)
    scale = k.step_size if h.bias_correction else k.coef
    return addcdiv_update(ops, k.target, m, denom, scale, owned=False), {"exp_avg": m, "exp_avg_sq": v}


YOGI = Algorithm(
    "Yogi",
    record="ScaleByYogiState",
    fields={
        "step": dataclasses.replace(
            step_count("per-parameter step counts for the bias correction."), when=lambda h: h.bias_correction
        ),
        "exp_avg": state("first moments (start at 0)."),
        "exp_avg_sq": filled(
            lambda h: h.initial_accumulator_value,
            "Yogi's second moments (start at ``initial_accumulator_value``).",
            nonneg=True,
        ),
    },
    math=_math,
    scalars=_scalars,
    check_order=("lr", "eps", "betas"),
    doc="State of :func:`yogi` and :func:`scale_by_yogi`.",
)
ScaleByYogiState = YOGI.state


@YOGI.public
def yogi(
    lr: LR = 1e-2,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-3,
    initial_accumulator_value: NonNeg = 1e-6,
    weight_decay: NonNeg = 0.0,
    *,
    bias_correction: bool = True,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Yogi: Adam with ``v <- v - (1 - beta2) * sign(v - g**2) * g**2`` (the rule is in the module docstring).

    Args:
      lr: learning rate (float, 0-d tensor or schedule); the paper's default is 1e-2.
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (the paper uses 1e-3).
      initial_accumulator_value: the starting value of ``v``.
      weight_decay: L2 penalty added to the gradient.
      bias_correction: Adam's debiasing with the per-parameter step count ``t`` (the paper's pseudo-code omits
        it for clarity; ``False`` is that pseudo-code exactly).

    Example::

        tx = pureopt.yogi(lr=1e-2)

    Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    return YOGI.build(locals())


@YOGI.public
def scale_by_yogi(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-3,
    initial_accumulator_value: NonNeg = 1e-6,
    bias_correction: bool = True,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Rescale updates by Yogi's moment estimates: ``(m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)``,
    or ``m / (sqrt(v) + eps)`` without bias correction.

    Example::

        tx = pureopt.chain(pureopt.scale_by_yogi(), pureopt.scale_by_learning_rate(1e-2))

    Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    return YOGI.build(locals())
