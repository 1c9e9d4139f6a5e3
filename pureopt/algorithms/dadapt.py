"""D-Adaptation: Adam and SGD with the learning rate estimated from a lower bound on the distance to the solution,
as the ``dadaptation`` package (``DAdaptAdam``, ``DAdaptSGD``).

**D-Adapt Adam** (the reference's rule; ``d``, ``r`` (``numerator_weighted``) and the step count ``k`` global;
``s``, ``m``, ``v`` per parameter)::

    c    = sqrt(1 - beta2**(k+1)) / (1 - beta1**(k+1))   if use_bias_correction   else 1
    dlr  = d * lr * c;   b = sqrt(beta2)
    g   <- g + weight_decay * p                          if not decouple
    r   <- b * r + (1 - b) * dlr * sum_i <g_i, s_i / (sqrt(v_i) + eps)>      (s, v before this step's update)
    m   <- beta1 * m + dlr * (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g * g
    s   <- b * s + dlr * (1 - b) * g
    d   <- max(d, min(r / ((1 - b) * sum_i ||s_i||_1), d * growth_rate))
    p   <- p - weight_decay * dlr * p                    if decouple
    p   <- p - m / (sqrt(v) + eps)

**D-Adapt SGD** (``d``, ``r``, ``k`` and ``g0 = ||g_0||`` global; ``s``, ``z``, ``x0`` per parameter)::

    g0   = ||g||  over all parameters, at k = 0 (without the weight decay: the reference's ``grad.add`` there is
           not in place)
    dlr  = d * lr / g0
    g   <- g + weight_decay * p
    r   <- r + dlr * sum_i <g_i, s_i>;   s <- s + dlr * g
    d   <- max(d, min(2 * r / sqrt(sum_i ||s_i||^2), d * growth_rate))
    z   <- x0 - s;   p <- momentum * p + (1 - momentum) * z

A step whose ``s`` sums to zero (all gradients zero) leaves the parameters, ``d``, ``r`` and ``k`` as they were,
as the references return early (decided on the device here; the per-parameter step counts of Adam still advance).
D-Adapt SGD with a zero first gradient norm takes no step (the reference divides by zero).

Global sums run over every parameter of the transformation that has a gradient, as 0-d tensors (no host sync;
the references read each per-tensor sum with ``.item()``; only the applied CPU path reads the scalars as Python
numbers, for torch's fused ``alpha=`` ops, as Prodigy's). The references share ``d`` across their param groups
(one ``lr``, per-group ``layer_scale``); in pureopt one transformation is one group (``layer_scale`` 1). Their
``log_every`` (logging) is not offered. Where they differ from the paper (Defazio & Mishchenko 2023, Algorithms 1
and 4) pureopt follows them: Adam's ``dlr`` is folded into ``m`` (so a changing ``lr`` acts through the moments),
``use_bias_correction`` is off by default, SGD's ``g0`` excludes the weight decay, and ``growth_rate`` (default:
unbounded) caps the growth of ``d``. Not elementwise (global sums). Oracles: ``dadaptation.DAdaptAdam`` and
``dadaptation.DAdaptSGD``.

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms._sums import (
    abs_total,
    dot_total,
    number,
    on_host_scalars,
    scratch_math,
    sq_total,
)
from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Betas,
    Global,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    param_copy,
    state,
    step_count,
)
from pureopt.algorithms.prodigy import positive, scalar0
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_scaled, ema_of_squares, scalar_for, torch_grad
from pureopt.kernels.listops import ListOps

__all__ = ["DADAPT_ADAM", "DADAPT_SGD", "DAdaptAdamState", "DAdaptSGDState", "dadapt_adam", "dadapt_sgd"]


def _lr(h: Any, like: Tensor) -> Any:
    return h.lr.to(like) if isinstance(h.lr, Tensor) else h.lr


def _adam_dlr(k: Kernel) -> Tensor:
    """D-Adapt Adam's step size ``d * lr`` (bias-corrected) from the globals before the step."""
    h, d, step = k.h, k.d, k.k
    beta1, beta2 = h.betas
    dlr = d * _lr(h, d)
    if h.use_bias_correction:
        dlr = dlr * torch.sqrt(1 - torch.pow(beta2, step + 1)) / (1 - torch.pow(beta1, step + 1))
    return dlr


def _adam_dot(ops: ListOps, k: Kernel, g: list[Tensor], own: bool) -> Tensor:
    """``sum <g, s / (sqrt(v) + eps)>`` over the tensors given, from the state before the step."""
    old_denom = ops.add_scalar(ops.sqrt(k.exp_avg_sq), k.h.eps, inplace=own)
    if own:  # s / denom into the temporary denominator
        ratio = ops.mul_list(ops.reciprocal(old_denom, inplace=True), k.s, inplace=True)
    else:
        ratio = ops.div_list(k.s, old_denom)
    return dot_total(ops, g, ratio, k.d)


def _adam_s(ops: ListOps, k: Kernel, g: list[Tensor], dlr: Tensor | float, inplace: bool) -> list[Tensor]:
    """The new weighted sums ``sqrt(beta2) s + dlr (1 - sqrt(beta2)) g``."""
    b = math.sqrt(k.h.betas[1])
    return add_scaled(ops, ops.mul(k.s, b, inplace=inplace), g, dlr * (1 - b), inplace=inplace)


def _adam_grads(ops: ListOps, k: Kernel, own: bool) -> list[Tensor]:
    h = k.h
    return torch_grad(ops, k.g, k.p, maximize=False, weight_decay=0.0 if h.decouple else h.weight_decay, own=own)[0]


def _adam_reduce(k: Kernel) -> dict[str, Tensor]:
    """The step's sums over the tensors given (see ``Algorithm(reduce=...)``), from its inputs, writing nothing."""
    ops = k.ops
    g = _adam_grads(ops, k, own=False)
    return {"dot": _adam_dot(ops, k, g, own=False), "l1": abs_total(ops, _adam_s(ops, k, g, _adam_dlr(k), False), k.d)}


@scratch_math
def _adam_math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, Any]]:
    h, own = k.h, k.own
    beta1, beta2 = h.betas
    b = math.sqrt(beta2)
    d, r, step = k.d, k.numerator_weighted, k.k
    dlr = _adam_dlr(k)
    host = on_host_scalars(k.apply, k.g)  # (CPU, applied: the scalars as Python floats, fused ops as the reference)
    totals = getattr(k, "totals", None)  # (given: the sums over all tensors, the math runs on a chunk of them)
    g = _adam_grads(ops, k, own)
    acc = dlr * (totals["dot"] if totals is not None else _adam_dot(ops, k, g, own))
    dlr_ = number(dlr, host)
    m = add_scaled(ops, ops.mul(k.exp_avg, beta1, inplace=k.donate), g, dlr_ * (1 - beta1), inplace=k.donate)
    v = ema_of_squares(ops, k.exp_avg_sq, g, beta2, donate=k.donate, own=own)
    s = _adam_s(ops, k, g, dlr_, k.donate)
    l1 = totals["l1"] if totals is not None else abs_total(ops, s, d)
    numerator = b * r + (1 - b) * acc
    skip = l1 == 0
    new_d = torch.maximum(d, torch.minimum(numerator / ((1 - b) * l1), d * h.growth_rate))
    new = {"exp_avg": m, "exp_avg_sq": v, "s": s}
    globals_ = {
        "d": torch.where(skip, d, new_d),
        "numerator_weighted": torch.where(skip, r, numerator),
        "k": torch.where(skip, step, step + 1),
    }
    keep = torch.where(skip, torch.zeros_like(d), torch.ones_like(d))  # 0: no step
    denom = ops.add_scalar(ops.sqrt(v), h.eps, inplace=own)
    decay = h.weight_decay != 0 and h.decouple
    if host:  # the reference's p.add_(p, alpha=-decay * dlr); p.addcdiv_(m, denom, value=-1), unless skipped
        if not bool(skip):
            if decay:
                ops.add(k.p, k.p, alpha=-h.weight_decay * dlr_, inplace=True)
            ops.addcdiv(k.p, m, denom, value=-1.0, inplace=True)
        return None, {**new, **globals_}
    direction = ops.div_list(m, denom, inplace=False)
    if k.apply:
        if decay:  # the reference's p.add_(p, alpha=-decay * dlr)
            ops.add(k.p, ops.mul(k.p, scalar_for(-h.weight_decay * dlr * keep, k.p)), inplace=True)
        ops.add(k.p, ops.mul(direction, scalar_for(-keep, direction), inplace=own), inplace=True)
        return None, {**new, **globals_}
    updates = ops.mul(direction, scalar_for(-keep, direction), inplace=own)
    if decay:
        updates = ops.sub(updates, ops.mul(k.p, scalar_for(h.weight_decay * dlr * keep, k.p)), inplace=own)
    return updates, {**new, **globals_}


@scratch_math
def _sgd_math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, Any]]:
    h, own = k.h, k.own
    d, r, step, g0 = k.d, k.numerator_weighted, k.k, k.g0_norm
    g0 = torch.where(step == 0, torch.sqrt(sq_total(ops, k.g, d)), g0)
    moving = g0 > 0
    dlr = torch.where(moving, d * _lr(h, d) / torch.where(moving, g0, torch.ones_like(g0)), torch.zeros_like(d))
    host = on_host_scalars(k.apply, k.g)  # (CPU, applied: the scalars as Python floats, fused ops as the reference)
    g, _ = torch_grad(ops, k.g, k.p, maximize=False, weight_decay=h.weight_decay, own=own)
    numerator = r + dlr * dot_total(ops, g, k.s, d)
    s = add_scaled(ops, k.s, g, number(dlr, host), inplace=k.donate)
    sq = sq_total(ops, s, d)
    skip = sq == 0
    d_hat = 2 * numerator / torch.sqrt(sq)
    new_d = torch.maximum(d, torch.minimum(d_hat, d * h.growth_rate))
    globals_ = {
        "d": torch.where(skip, d, new_d),
        "numerator_weighted": torch.where(skip, r, numerator),
        "k": torch.where(skip, step, step + 1),
        "g0_norm": g0,
    }
    ck = 1 - h.momentum
    if host and k.donate:  # z.copy_(x0 - s) as two passes; p.mul_(1 - ck).add_(z, alpha=ck); nothing when skipped
        z = k.z
        if not bool(skip):
            z = ops.sub(ops.copy_(k.z, k.x0), s, inplace=True)
            ops.add(ops.mul(k.p, 1 - ck, inplace=True), z, alpha=ck, inplace=True)
        return None, {"s": s, "z": z, **globals_}
    # on a skipped step z and p keep their values (the reference returns before writing them): a lerp with weight
    # 1 (a step) or 0 (none) gives either side exactly
    keep = scalar_for(torch.where(skip, torch.zeros_like(d), torch.ones_like(d)), k.p)
    assert isinstance(keep, list)  # (a tensor: one cast per parameter)
    z = ops.lerp(k.z, ops.sub(k.x0, s), keep, inplace=k.donate)
    # p <- p * (1 - ck) + ck * z, as the reference's p.mul_(1 - ck).add_(z, alpha=ck)
    moved = ops.add(ops.mul(k.p, 1 - ck), z, alpha=ck, inplace=own)
    if k.apply:
        ops.lerp(k.p, moved, keep, inplace=True)
        return None, {"s": s, "z": z, **globals_}
    return ops.sub(ops.lerp(k.p, moved, keep), k.p, inplace=own), {"s": s, "z": z, **globals_}


_ESTIMATE = {  # (the values dadaptation keeps in its param groups)
    "d": Global("the learning-rate estimate d (0-d, float64 where the device has it).", init=scalar0(lambda h: h.d0)),
    "numerator_weighted": Global("the running numerator r of the estimate.", init=scalar0(0.0)),
    "k": Global("the number of steps taken (DAdaptAdam's bias correction counts them).", init=scalar0(0.0)),
}

DADAPT_ADAM = Algorithm(
    "DAdaptAdam",
    record="DAdaptAdamState",
    fields={
        "step": step_count(),
        "s": state("weighted sums of the gradients (the denominator of the d estimate)."),
        "exp_avg": state("first moments (scaled by d * lr)."),
        "exp_avg_sq": state("second moments.", nonneg=True),
    },
    math=_adam_math,
    reduce=_adam_reduce,
    elementwise=False,
    global_fields=_ESTIMATE,
    check_order=("d0", "lr", "eps", "betas"),
    doc="State of :func:`dadapt_adam` (``dadaptation``'s per-parameter state keys; its group values as global fields).",
)
DAdaptAdamState = DADAPT_ADAM.state

DADAPT_SGD = Algorithm(
    "DAdaptSGD",
    record="DAdaptSGDState",
    fields={
        "z": param_copy("the dual-averaging iterates x0 - s."),
        "s": state("sums of the gradients, each times its step's dlr."),
        "x0": param_copy("the initial parameters."),
    },
    math=_sgd_math,
    elementwise=False,
    global_fields={**_ESTIMATE, "g0_norm": Global("the norm of the first gradient.", init=scalar0(0.0))},
    check_order=("d0", "lr"),
    doc="State of :func:`dadapt_sgd` (``dadaptation``'s per-parameter state keys; its group values as global fields).",
)
DAdaptSGDState = DADAPT_SGD.state


@DADAPT_ADAM.public
def dadapt_adam(
    lr: Annotated[LR, positive("learning rate")] = 1.0,
    betas: Betas = (0.9, 0.999),
    eps: Annotated[float, positive("epsilon")] = 1e-8,
    weight_decay: NonNeg = 0.0,
    decouple: bool = False,
    use_bias_correction: bool = False,
    d0: Annotated[float, positive("d0")] = 1e-6,
    growth_rate: float = float("inf"),
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """D-Adapt Adam, as ``dadaptation.DAdaptAdam`` (the rule is in the module docstring; the same defaults).

    Args:
      lr: learning-rate multiplier (float, 0-d tensor or schedule; > 0); leave it at 1 and schedule it if needed.
      betas: decay rates of the first and second moments.
      eps: added to the root of the second moment.
      weight_decay: weight decay (an L2 term, or decoupled with ``decouple``).
      decouple: AdamW-style decoupled weight decay.
      use_bias_correction: Adam's bias correction in the step size.
      d0: the initial estimate.
      growth_rate: bound on the growth of ``d`` per step.

    Example::

        tx = pureopt.dadapt_adam(weight_decay=0.01, decouple=True)

    Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023.
    """
    return DADAPT_ADAM.build(locals())


@DADAPT_SGD.public
def dadapt_sgd(
    lr: Annotated[LR, positive("learning rate")] = 1.0,
    momentum: NonNeg = 0.0,
    weight_decay: NonNeg = 0.0,
    d0: Annotated[float, positive("d0")] = 1e-6,
    growth_rate: float = float("inf"),
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """D-Adapt SGD, as ``dadaptation.DAdaptSGD`` (the rule is in the module docstring; the same defaults).

    Args:
      lr: learning-rate multiplier (float, 0-d tensor or schedule; > 0).
      momentum: averaging of the iterate towards ``z`` (``0``: ``p = z``).
      weight_decay: L2 term added to the gradient.
      d0: the initial estimate.
      growth_rate: bound on the growth of ``d`` per step.

    Example::

        tx = pureopt.dadapt_sgd(momentum=0.9)

    Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023.
    """
    return DADAPT_SGD.build(locals())
