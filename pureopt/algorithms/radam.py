"""RAdam (rectified Adam, with coupled or decoupled weight decay, maximize), as torch.optim.RAdam.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                             if maximize
    t <- t + 1
    g <- g + weight_decay * p                           if weight_decay != 0 and not decoupled
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
    if rho_t > 5:   (the variance is tractable)
        r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        update = -lr * m_hat * sqrt(1 - beta2**t) / (sqrt(v) + eps) * r
    else:
        update = -lr * m_hat                            (SGD with momentum while warming up)
    update <- update - lr * weight_decay * p            if weight_decay != 0 and decoupled (RAdamW)

The branch on ``rho_t`` is a ``torch.where`` on per-tensor 0-d values (no host synchronisation): each
parameter takes its own branch from its own step count. The ``scale_by_radam`` form returns the positive
direction. Complex tensors are viewed as real pairs, as torch does.

Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
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
    Eps,
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import (
    add_decay,
    decay_params,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalars_for,
    torch_grad,
)

__all__ = ["RADAM", "ScaleByRAdamState", "radam", "scale_by_radam"]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    h = k.h
    beta1, beta2 = h.betas
    rho_inf = 2 / (1 - beta2) - 1

    def rho(t: Tensor) -> Tensor:
        return rho_inf - 2 * t * torch.pow(beta2, t) / (1 - torch.pow(beta2, t))

    def rect(t: Tensor) -> Tensor:
        rho_t = rho(t)
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        # only taken where rho_t > 5; elsewhere 1 so that no NaN is ever formed (even for autograd)
        return torch.sqrt(torch.where(rho_t > 5.0, ratio, torch.ones_like(ratio)))

    sign = -1.0 if h.lr is not None else 1.0
    step_lr = 1.0 if h.lr is None else h.lr

    def fn(t: Tensor) -> tuple[Tensor, ...]:
        bc1, bc2_sqrt, ok, r = 1 - torch.pow(beta1, t), torch.sqrt(1 - torch.pow(beta2, t)), rho(t) > 5.0, rect(t)
        # torch's foreach scalars: the rectified step with sqrt(1 - beta2**t) and the plain step, 0 when not taken
        rect_step = bc2_sqrt * (step_lr * torch.where(ok, r, torch.zeros_like(r)) / bc1) * sign
        plain_step = (step_lr * (~ok).to(bc1.dtype) / bc1) * sign
        return bc1, bc2_sqrt, ok, r, rect_step, plain_step

    # on the applied CPU path: Python numbers and torch's foreach formula (torch.optim.RAdam(foreach=True)),
    # 9 passes instead of 12: direction = m * (rect_step / (sqrt(v) + eps) + plain_step)
    host = on_host(k.apply, k.exp_avg)
    bc1, bc2_sqrt, ok, rects, rect_step, plain_step = map_scalars_n(fn, steps, outputs=6, host=(4, 5) if host else ())
    bc1, bc2_sqrt, rects = (scalars_for(x, k.exp_avg) for x in (bc1, bc2_sqrt, rects))
    return {"bc1": bc1, "bc2_sqrt": bc2_sqrt, "rectified": ok, "rects": rects, "rect_step": rect_step,
            "plain_step": plain_step}  # fmt: skip


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, p, tmp = k.ops, k.h, k.p, k.own
    beta1, beta2 = h.betas
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay and h.lr is not None
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, _ = torch_grad(ops, k.g, p, maximize=h.maximize, weight_decay=coupled, own=tmp)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    v = ema_of_squares(ops, k.exp_avg_sq, g, beta2, donate=k.donate, own=tmp)
    new = {"exp_avg": m, "exp_avg_sq": v}
    if not isinstance(k.rect_step[0], Tensor):  # read to the host (on_host): p.addcmul_(m, rect / denom + plain)
        factor = ops.add_scalar(ops.sqrt(v), h.eps, inplace=True)
        factor = ops.add_scalar(ops.reciprocal(ops.div(factor, k.rect_step, inplace=True), inplace=True),
                                k.plain_step, True)  # fmt: skip
        if decoupled:
            decay_params(ops, p, h.lr, h.weight_decay)
        ops.addcmul(p, m, factor, inplace=True)
        return None, new
    # torch (for-loop): m_hat = m / bc1; m_hat * lr * (sqrt(bc2) / (sqrt(v) + eps)) * r, the middle factor
    # formed as reciprocal(sqrt(v) + eps) * sqrt(bc2) (Python's float / Tensor)
    plain = ops.div(m, k.bc1)
    if h.lr is not None:
        plain = ops.mul(plain, h.lr, inplace=tmp)
    denom = ops.add_scalar(ops.sqrt(v), h.eps, inplace=tmp)
    adaptive = ops.mul(ops.reciprocal(denom, inplace=tmp), k.bc2_sqrt, tmp)
    scaled = ops.mul(ops.mul_list(adaptive, plain, inplace=tmp), k.rects, inplace=tmp)
    if tmp and ops.inplace_ok:  # into the temporary it replaces (not under vmap: no batching rule)
        direction = [torch.where(c, s, x, out=s) for c, s, x in zip(k.rectified, scaled, plain)]
    else:
        direction = [torch.where(c, s, x) for c, s, x in zip(k.rectified, scaled, plain)]
    if k.apply:  # torch: p.mul_(1 - lr * wd); p.add_(direction, alpha=-1)
        if decoupled:
            decay_params(ops, p, h.lr, h.weight_decay)
        (ops.sub if h.lr is not None else ops.add)(p, direction, inplace=True)
        return None, new
    updates = ops.neg(direction, inplace=tmp) if h.lr is not None else direction
    if decoupled:
        updates = add_decay(ops, updates, p, h.lr, h.weight_decay, inplace=tmp)
    return updates, new


RADAM = Algorithm(
    "RAdam",
    record="ScaleByRAdamState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_avg_sq": state("second moments.", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    neutral={"decoupled_weight_decay": False},
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`radam` and :func:`scale_by_radam` (torch.optim.RAdam's state keys).",
)
ScaleByRAdamState = RADAM.state


@RADAM.public
def radam(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Annotated[float, nonneg("epsilon"), AS_FLOAT] = 1e-8,
    weight_decay: Annotated[float, nonneg(), AS_FLOAT] = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """RAdam (rectified Adam), as ``torch.optim.RAdam`` (the rule is in the module docstring).

    Args:
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator.
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly (RAdamW) instead of adding an L2 term to the gradient.
      state_dtype: dtype of the moments (default: the parameter's, as torch); e.g. ``torch.float32`` for bf16
        parameters.

    Example::

        tx = pureopt.radam(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """
    return RADAM.build(locals())


@RADAM.public
def scale_by_radam(
    betas: Betas = (0.9, 0.999), eps: Eps = 1e-8, *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Rescale updates by RAdam's rectified moment estimates (torch's eps placement and threshold):
    ``m_hat * sqrt(1 - beta2**t) / (sqrt(v) + eps) * r_t`` where ``rho_t > 5``, else ``m_hat``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_radam(), pureopt.scale_by_learning_rate(1e-3))

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """
    return RADAM.build(locals())
