"""Adam and AdamW (amsgrad, maximize, coupled or decoupled weight decay), as torch.optim.Adam / AdamW.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 and not decoupled
    t <- t + 1
    m <- m + (1 - beta1) * (g - m)                   (lerp)
    v <- beta2 * v + (1 - beta2) * g * g
    vmax <- max(vmax, v); use vmax for v             if amsgrad
    update = -(lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    update <- update - lr * weight_decay * p         if weight_decay != 0 and decoupled

The ``scale_by_adam`` form (``lr=None``) returns the positive direction ``m_hat / (sqrt(v_hat) + eps)``. Complex
tensors are viewed as real pairs, as torch.optim does. Runs torch's ``_fused_adam_`` / ``_fused_adamw_`` where they
can take the tensors (see :mod:`pureopt.kernels.fused`).

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; Loshchilov & Hutter, "Decoupled Weight
Decay Regularization", ICLR 2019; Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond" (amsgrad), 2018.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Betas, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation, add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import cast_like, ema_of_squares, over, per_tensor, scalars_for
from pureopt.kernels.listops import FOREACH

__all__ = ["ADAM", "ScaleByAdamState", "adam", "adamw", "scale_by_adam"]

Out = tuple[list[Tensor] | None, Mapping[str, Any]]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    # step_size = lr / (1 - beta1**t), bias_correction2_sqrt = sqrt(1 - beta2**t), per tensor, in float64
    beta1, beta2 = k.h.betas
    neg_step_size = per_tensor(steps, lambda t: over(k.coef, 1 - torch.pow(beta1, t)))
    bc2_sqrt = per_tensor(steps, lambda t: torch.sqrt(1 - torch.pow(beta2, t)))
    return {"neg_step_size": scalars_for(neg_step_size, k.exp_avg), "bc2_sqrt": scalars_for(bc2_sqrt, k.exp_avg)}


def _decoupled_decay(k: Kernel) -> bool:
    return k.h.weight_decay != 0 and k.h.decoupled_weight_decay and k.h.lr is not None


def _math(k: Kernel) -> Out:
    ops, h = k.ops, k.h
    beta1, beta2 = h.betas
    g = ops.neg(k.g) if h.maximize else k.g
    if h.weight_decay != 0 and not h.decoupled_weight_decay:
        g = ops.add(g, k.p, alpha=h.weight_decay, inplace=h.maximize)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    v = ema_of_squares(ops, k.exp_avg_sq, g, beta2, donate=k.donate)
    new = {"exp_avg": m, "exp_avg_sq": v}
    if h.amsgrad:
        new["max_exp_avg_sq"] = ops.maximum(k.max_exp_avg_sq, v, inplace=k.donate)
    denom = ops.sqrt(new.get("max_exp_avg_sq", v))
    denom = ops.add_scalar(ops.div(denom, k.bc2_sqrt, inplace=True), h.eps, inplace=True)
    updates = ops.div_list(ops.mul(m, k.neg_step_size), denom, inplace=True)
    if _decoupled_decay(k):
        decay = -h.lr * h.weight_decay
        if isinstance(decay, Tensor):
            updates = ops.add(updates, ops.mul(k.p, scalars_for([decay] * len(updates), updates)), inplace=True)
        else:
            updates = ops.add(updates, k.p, alpha=decay, inplace=True)
    if k.apply:
        add_inplace(k.p, updates)
        return None, new
    return updates, new


def _fused_math(k: Kernel, plan: _fused.Plan) -> Out:
    """The step through ``torch._fused_adam_`` / ``torch._fused_adamw_``: torch's own call on the parameters when the
    step applies them (GradScaler's arguments passed on), else pointed at a zero buffer that ends up holding the
    update (see :mod:`pureopt.kernels.fused`)."""
    h, donate, ctx = k.h, k.donate, k.ctx
    beta1, beta2 = h.betas
    new_steps = FOREACH.add_scalar(k.step, 1, inplace=donate)
    m = k.exp_avg if donate else _fused.clone_all(k.exp_avg)
    v = k.exp_avg_sq if donate else _fused.clone_all(k.exp_avg_sq)
    vmax = None
    if h.amsgrad:
        vmax = k.max_exp_avg_sq if donate else _fused.clone_all(k.max_exp_avg_sq)
    kernel_lr: float | Tensor = -1.0 if h.lr is None else h.lr  # lr=-1: +direction into the zero buffer
    if k.apply and k.p is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        g, mm, vv, st = take(k.g, idx), take(m, idx), take(v, idx), take(new_steps, idx)
        vm = take(vmax, idx) if vmax is not None else []
        p = take(k.p, idx) if k.p is not None else None
        device = mm[0].device
        g = cast_like(g, mm)
        if k.apply and p is not None and all(x.dtype == y.dtype for x, y in zip(p, mm)):  # torch's own call
            amp = _fused.amp_kwargs(ctx.grad_scale, ctx.found_inf, device)
            fn = torch._fused_adamw_ if h.decoupled_weight_decay else torch._fused_adam_
            fn(p, g, mm, vv, vm, st, lr=_fused.fused_lr(kernel_lr, device), beta1=beta1, beta2=beta2,
               weight_decay=h.weight_decay, eps=h.eps, amsgrad=h.amsgrad, maximize=h.maximize, **amp)  # fmt: skip
            _fused.undo_steps(st, amp["found_inf"])
            return None
        assert ctx.grad_scale is None and ctx.found_inf is None
        coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
        g = _fused.folded_grads(g, p, h.maximize, coupled)
        updates = _fused.zeros_like_all(mm)
        torch._fused_adam_(updates, g, mm, vv, vm, st, lr=_fused.fused_lr(kernel_lr, device), beta1=beta1,
                           beta2=beta2, weight_decay=0.0, eps=h.eps, amsgrad=h.amsgrad, maximize=False)  # fmt: skip
        if _decoupled_decay(k):
            decay = -h.lr * h.weight_decay
            pp = cast_like(p, mm)
            if isinstance(decay, Tensor):
                updates = FOREACH.add(updates, FOREACH.mul(pp, decay.to(device)), inplace=True)
            else:
                updates = FOREACH.add(updates, pp, alpha=decay, inplace=True)
        if k.apply:
            add_inplace(p, updates)
            return None
        return updates

    updates = _fused.run_grouped(len(k.g), plan, body)
    new = {"step": new_steps, "exp_avg": m, "exp_avg_sq": v}
    return updates, ({**new, "max_exp_avg_sq": vmax} if vmax is not None else new)


ADAM = Algorithm(
    "Adam",
    record="ScaleByAdamState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_avg_sq": state("second moments.", nonneg=True),
        "max_exp_avg_sq": state(
            "running maxima of the second moments (amsgrad).", when=lambda h: h.amsgrad, nonneg=True
        ),
    },
    math=_math,
    scalars=_scalars,
    fused=_fused_math,
    fused_state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    neutral={"decoupled_weight_decay": False},
    amp_native=True,
    chunked=False,
    doc="State of :func:`adam`, :func:`adamw` and :func:`scale_by_adam` (torch.optim's state keys).",
)
ScaleByAdamState = ADAM.state


@ADAM.public
def adam(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam`` (``decoupled_weight_decay=True`` is AdamW); the rule is in the module docstring.

    Args:
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (after the bias correction, as torch does).
      weight_decay: weight decay coefficient.
      amsgrad: the AMSGrad variant (Reddi et al., 2018).
      decoupled_weight_decay: decay the weights directly (AdamW) instead of adding an L2 term to the gradient.
      state_dtype: dtype of the moments (default: the parameter's, as torch); e.g. ``torch.float32`` for
        bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.adam(lr=1e-3, betas=(0.9, 0.99))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    return ADAM.build(locals())


@ADAM.public
def adamw(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW``: :func:`adam` with decoupled weight decay (default 0.01), i.e.
    ``p <- p * (1 - lr * weight_decay)`` instead of an L2 term in the gradient.

    Example::

        tx = pureopt.adamw(lr=3e-4, weight_decay=0.1)

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    return ADAM.build(locals(), decoupled_weight_decay=True)


@ADAM.public
def scale_by_adam(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    amsgrad: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates, ``m_hat / (sqrt(v_hat) + eps)`` (torch's eps
    placement; ``amsgrad``: the running maximum of ``v``).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adam(), pureopt.scale_by_learning_rate(1e-3))

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    return ADAM.build(locals())
