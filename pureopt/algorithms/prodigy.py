"""Prodigy: Adam with a learning rate estimated on the fly (``d``), as the ``prodigyopt`` package.

Update rule (the reference's, one step ``k = 0, 1, ...``; ``d``, ``d_max``, ``r`` global, one per transformation;
``s``, ``p0`` (the initial parameters), ``m``, ``v`` per parameter; ``beta3 = sqrt(beta2)`` unless given)::

    c    = sqrt(1 - beta2**(k+1)) / (1 - beta1**(k+1))   if use_bias_correction   else 1
    dlr  = d * lr * c
    g   <- g + weight_decay * p                          if not decouple
    r   <- beta3 * r + (d / d0) * dlr * sum_i <g_i, p0_i - p_i>
    m   <- beta1 * m + d * (1 - beta1) * g;    v <- beta2 * v + d**2 * (1 - beta2) * g * g
    s   <- beta3 * s + (d / d0) * dlr * g                (``(d / d0) * d * g`` if safeguard_warmup)
    d_hat = d_coef * r / sum_i ||s_i||_1
    d_max <- max(d_max, d_hat);   d <- max(d, d_hat) if d == d0;   d <- min(d_max, d * growth_rate)
    p   <- p - weight_decay * dlr * p                    if decouple
    p   <- p - dlr * m / (sqrt(v) + d * eps)             (``- dlr * d * g / (sqrt(v) + d * eps)`` if beta1 == 0)

(``dlr`` is the one computed before ``d`` changes; the denominator takes the new ``d``.) A step whose
``sum ||s||_1`` is zero (all gradients zero) changes the moments but neither the parameters nor ``d``, ``r``, ``k``,
as the reference returns early; pureopt decides it on the device. The per-parameter step counts still advance.

Global sums (``<g, p0 - p>``, ``||s||_1``) run over every parameter of the transformation that has a gradient, as
0-d tensors on the device (no host sync; the reference reads each per-tensor sum with ``.item()``). Only on the
applied CPU path (the donated step, where a read costs nothing) are the scalars read as Python numbers, so that the
moments and the step run as torch's fused ``alpha=`` / ``value=`` ops, with temporaries in reused memory. The reference
shares ``d`` across all its param groups (they must have one ``lr``); in pureopt one transformation is one group,
and a ``TorchOptimizer`` keeps one transformation per param group, so each group gets its own ``d``. On DTensor
(FSDP2) parameters the sums are global (DTensor reductions), where the reference needs ``fsdp_in_use``.

Where the reference differs from the paper (Mishchenko & Defazio 2023, Algorithm 4) pureopt follows the reference
and keeps its switches: ``d`` enters the moments (the paper's ``lambda_k`` weighting), ``use_bias_correction`` (off
by default; the paper has none) and ``safeguard_warmup`` (off by default; on, ``s`` grows with ``d`` instead of
``d * lr``, which keeps ``d`` from overshooting under a warm-up schedule). ``slice_p`` (estimating ``d`` on every
``slice_p``-th element) is not offered: ``p0`` and ``s`` are full copies, in the parameter's shape (the reference
keeps them flattened, and ``p0`` as a 0-d zero for an all-zero parameter). Not elementwise (global sums). Oracle:
``prodigyopt.Prodigy``.

Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024 (arXiv 2306.06101).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms._sums import (
    abs_total,
    dot_total,
    like_scalar,
    number,
    on_host_scalars,
    scratch_math,
)
from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Betas,
    Check,
    Global,
    Hyper,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    param_copy,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_scaled, addcdiv_update, scalar_for, torch_grad
from pureopt.kernels.listops import ListOps

__all__ = ["PRODIGY", "ProdigyState", "prodigy", "positive"]


def positive(label: str) -> Check:
    """``Invalid {label} value: {value}`` unless ``value > 0`` (the references' wording) for a number."""

    def fn(value: Any, name: str) -> Any:
        if isinstance(value, (int, float)) and not value > 0:  # (a tensor lr was checked as one; a schedule passes)
            raise ValueError(f"Invalid {label} value: {value}")
        return value

    return Check(fn)


def scalar0(value: float | Callable[[Hyper], float]) -> Callable[[Hyper, torch.device], Tensor]:
    """A :class:`Global` initialiser: ``value`` (or ``value(h)``) as a 0-d tensor in the scalar dtype (float64 where
    the device has it)."""

    def init(h: Hyper, device: torch.device) -> Tensor:
        return torch.full((), value(h) if callable(value) else value, dtype=like_scalar(device), device=device)

    return init


def _dlr(k: Kernel) -> Tensor:
    """Prodigy's step size ``d * lr`` (bias-corrected) from the globals before the step."""
    h, d, step = k.h, k.d, k.k
    beta1, beta2 = h.betas
    lr = h.lr.to(d) if isinstance(h.lr, Tensor) else h.lr
    if h.use_bias_correction:
        return d * lr * (torch.sqrt(1 - torch.pow(beta2, step + 1)) / (1 - torch.pow(beta1, step + 1)))
    return d * lr


def _grads(ops: ListOps, k: Kernel, own: bool) -> tuple[list[Tensor], bool]:
    h = k.h
    return torch_grad(ops, k.g, k.p, maximize=False, weight_decay=0.0 if h.decouple else h.weight_decay, own=own)


def _s(
    ops: ListOps, k: Kernel, g: list[Tensor], d: Tensor | float, gain: Tensor | float, inplace: bool
) -> list[Tensor]:
    """The new weighted sums ``beta3 s + w g`` (``w``: ``d**2 / d0`` with the safeguard warmup, else the gain)."""
    h = k.h
    beta3 = math.sqrt(h.betas[1]) if h.beta3 is None else h.beta3
    return add_scaled(ops, ops.mul(k.s, beta3, inplace=inplace), g, d / h.d0 * d if h.safeguard_warmup else gain,
                      inplace=inplace)  # fmt: skip


def _reduce(k: Kernel) -> dict[str, Tensor]:
    """The step's sums over the tensors given (see ``Algorithm(reduce=...)``), from its inputs, writing nothing."""
    ops, d = k.ops, k.d
    g, _ = _grads(ops, k, own=False)
    gain = d / k.h.d0 * _dlr(k)
    return {"dot": dot_total(ops, g, ops.sub(k.p0, k.p), d), "l1": abs_total(ops, _s(ops, k, g, d, gain, False), d)}


@scratch_math
def _math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, Any]]:
    h, own = k.h, k.own
    beta1, beta2 = h.betas
    beta3 = math.sqrt(beta2) if h.beta3 is None else h.beta3
    d, d_max, r, step = k.d, k.d_max, k.d_numerator, k.k
    host = on_host_scalars(k.apply, k.g)  # (CPU, applied: the scalars as Python floats, fused ops as the reference)
    totals = getattr(k, "totals", None)  # (given: the sums over all tensors, the math runs on a chunk of them)
    dlr = _dlr(k)
    g, owned = _grads(ops, k, own)
    gain = d / h.d0 * dlr
    delta = gain * (totals["dot"] if totals is not None else dot_total(ops, g, ops.sub(k.p0, k.p), d))
    d_, gain_ = number(d, host), number(gain, host)
    if beta1 > 0:
        m = add_scaled(ops, ops.mul(k.exp_avg, beta1, inplace=k.donate), g, d_ * (1 - beta1), inplace=k.donate)
    v = ops.mul(k.exp_avg_sq, beta2, inplace=k.donate)
    if host:
        v = ops.addcmul(v, g, g, value=d_ * d_ * (1 - beta2), inplace=k.donate)
    else:
        v = add_scaled(ops, v, ops.mul_list(g, g), d * d * (1 - beta2), inplace=k.donate)
    s = _s(ops, k, g, d_, gain_, k.donate)
    denominator = totals["l1"] if totals is not None else abs_total(ops, s, d)
    numerator = beta3 * r + delta
    d_hat = h.d_coef * numerator / denominator
    skip = denominator == 0
    new_d = torch.where(d == h.d0, torch.maximum(d, d_hat), d)
    new_d_max = torch.maximum(d_max, d_hat)
    new_d = torch.minimum(new_d_max, new_d * h.growth_rate)
    globals_ = {
        "d": torch.where(skip, d, new_d),
        "d_max": torch.where(skip, d_max, new_d_max),
        "d_numerator": torch.where(skip, r, numerator),
        "k": torch.where(skip, step, step + 1),
    }
    new = {"s": s, "exp_avg_sq": v, **({"exp_avg": m} if beta1 > 0 else {})}
    step_lr = number(torch.where(skip, torch.zeros_like(dlr), dlr), host)
    next_d = number(globals_["d"], host)
    sign = 1.0 if h.lr is None else -1.0
    denom = ops.add_scalar(ops.sqrt(v), scalar_for(next_d * h.eps, v), inplace=own)
    updates: list[Tensor] | None
    if h.weight_decay != 0 and h.decouple and h.lr is not None:
        decay = -h.weight_decay * step_lr
        if k.apply:  # the reference's p.add_(p, alpha=-decay * dlr)
            if host:
                ops.add(k.p, k.p, alpha=decay, inplace=True)
            else:
                ops.add(k.p, ops.mul(k.p, scalar_for(decay, k.p)), inplace=True)
            decayed = None
        else:
            decayed = ops.mul(k.p, scalar_for(decay, k.p))
    else:
        decayed = None
    if beta1 > 0:
        updates = addcdiv_update(ops, k.target, m, denom, scalar_for(sign * step_lr, m), owned=False)
    else:
        updates = addcdiv_update(ops, k.target, g, denom, scalar_for(sign * step_lr * next_d, g), owned=owned)
    if updates is not None and decayed is not None:
        updates = ops.add(updates, decayed, inplace=own)
    return updates, {**new, **globals_}


PRODIGY = Algorithm(
    "Prodigy",
    record="ProdigyState",
    fields={
        "step": step_count(),
        "s": state("weighted sums of the gradients (the denominator of the d estimate)."),
        "p0": param_copy("the initial parameters."),
        "exp_avg": state("first moments (scaled by d).", when=lambda h: h.betas[0] > 0),
        "exp_avg_sq": state("second moments (scaled by d**2).", nonneg=True),
    },
    math=_math,
    reduce=_reduce,
    elementwise=False,
    global_fields={
        "d": Global(
            "the learning-rate estimate d (0-d, float64 where the device has it).", init=scalar0(lambda h: h.d0)
        ),
        "d_max": Global("the largest estimate so far.", init=scalar0(lambda h: h.d0)),
        "d_numerator": Global("the running numerator r of the estimate.", init=scalar0(0.0)),
        "k": Global("the number of steps taken (the bias correction's count).", init=scalar0(0.0)),
    },
    check_order=("d0", "lr", "eps", "betas"),
    doc="State of :func:`prodigy` (``prodigyopt``'s per-parameter state keys; its group values ``d``, ``d_max``, "
    "``d_numerator``, ``k`` as global fields).",
)
ProdigyState = PRODIGY.state


@PRODIGY.public
def prodigy(
    lr: Annotated[LR, positive("learning rate")] = 1.0,
    betas: Betas = (0.9, 0.999),
    beta3: float | None = None,
    eps: Annotated[float, positive("epsilon")] = 1e-8,
    weight_decay: NonNeg = 0.0,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: Annotated[float, positive("d0")] = 1e-6,
    d_coef: float = 1.0,
    growth_rate: float = float("inf"),
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Prodigy, as ``prodigyopt.Prodigy`` (the rule is in the module docstring; the same defaults).

    Leave ``lr`` at 1 (the estimate ``d`` is the step size); use a schedule on it (e.g. cosine) as with Adam.

    Args:
      lr: learning-rate multiplier (float, 0-d tensor or schedule; > 0).
      betas: decay rates of the first and second moments (``beta1 = 0``: no first moment is kept).
      beta3: decay of the estimate's sums (``None``: ``sqrt(beta2)``).
      eps: added to the root of the second moment (times ``d``).
      weight_decay: weight decay (decoupled, ``p <- p - weight_decay * dlr * p``, or an L2 term).
      decouple: AdamW-style decoupled weight decay.
      use_bias_correction: Adam's bias correction in the step size.
      safeguard_warmup: leave ``lr`` out of the denominator sums (for warm-up schedules).
      d0: the initial estimate.
      d_coef: multiplies the estimate.
      growth_rate: bound on the growth of ``d`` per step.

    Example::

        tx = pureopt.prodigy(weight_decay=0.01, safeguard_warmup=True, use_bias_correction=True)

    Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024.
    """
    return PRODIGY.build(locals())
