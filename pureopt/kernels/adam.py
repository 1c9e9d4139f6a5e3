"""Adam / AdamW (with amsgrad, maximize, coupled or decoupled weight decay): torch.optim.Adam's math on lists.

Update rule (torch.optim.Adam / AdamW), per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 and not decoupled
    t <- t + 1
    m <- m + (1 - beta1) * (g - m)                   (lerp)
    v <- beta2 * v + (1 - beta2) * g * g
    vmax <- max(vmax, v); use vmax for v             if amsgrad
    denom = sqrt(v) / sqrt(1 - beta2**t) + eps
    update = -(lr / (1 - beta1**t)) * m / denom
    update <- update - lr * weight_decay * p         if weight_decay != 0 and decoupled

``lr=None`` returns the positive direction ``m_hat / (sqrt(v_hat) + eps)`` (used by
:func:`pureopt.scale_by_adam`). Complex tensors are viewed as real pairs, as torch.optim does.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015; Loshchilov & Hutter, "Decoupled Weight
Decay Regularization", 2019; Reddi et al., "On the Convergence of Adam and Beyond" (amsgrad), 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.base import add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import as_complex_like, as_real, cast_like, ema_of_squares, over, per_tensor, scalars_for
from pureopt.kernels.listops import FOREACH, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdamResult", "adam"]


class AdamResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    max_exp_avg_sq: list[Tensor] | None


def adam(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> AdamResult:
    """One Adam step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists (and gradients) may be overwritten. ``apply`` (with ``donate`` and ``params``):
    add the updates to the parameters in place too and return ``updates=None``. ``grad_scale`` / ``found_inf``:
    GradScaler's (see :class:`pureopt.base.UpdateContext`); passed to torch's fused kernel when it runs on the
    parameters, else gradients are unscaled out of place and a set ``found_inf`` skips the step (host sync).
    """
    apply = apply and donate and params is not None
    plan = None
    if impl in ("auto", "fused"):
        more = [exp_avg_sqs, *([max_exp_avg_sqs] if amsgrad and max_exp_avg_sqs is not None else [])]
        plan = _fused.fused_plan([*grads, *(params or [])], exp_avgs, *more, impl=impl)
    path = choose_impl(impl, grads, fused_available=plan is not None)
    amp = grad_scale is not None or found_inf is not None
    if amp and not (path == "fused" and apply and _fused.same_dtypes(params, exp_avgs)):  # not torch's own call
        unscaled = _fused.amp_unscale(grads, grad_scale, found_inf)
        if unscaled is None:  # skipped: nothing changes
            return AdamResult(_fused.skipped_updates(grads, apply), steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        grads, grad_scale, found_inf = unscaled, None, None
    if path == "fused":
        assert plan is not None
        return _adam_fused(
            plan,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            donate=donate,
            apply=apply,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
    ops = ops_for(path)
    like = grads
    grads = as_real(grads)
    exp_avgs, exp_avg_sqs = as_real(exp_avgs), as_real(exp_avg_sqs)
    rparams = as_real(params) if params is not None else None
    if max_exp_avg_sqs is not None:
        max_exp_avg_sqs = as_real(max_exp_avg_sqs)
    grads = cast_like(grads, exp_avgs)  # state may be kept in another dtype (state_dtype=)
    if rparams is not None:
        rparams = cast_like(rparams, exp_avgs)
    if weight_decay != 0 and rparams is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")

    g = ops.neg(grads) if maximize else grads
    if weight_decay != 0 and not decoupled_weight_decay:
        g = ops.add(g, rparams, alpha=weight_decay, inplace=maximize)  # type: ignore[arg-type]
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    m = ops.lerp(exp_avgs, g, 1 - beta1, inplace=donate)
    v = ema_of_squares(ops, exp_avg_sqs, g, beta2, donate=donate)
    vmax = None
    if amsgrad:
        assert max_exp_avg_sqs is not None
        vmax = ops.maximum(max_exp_avg_sqs, v, inplace=donate)
    sign = -1.0 if lr is not None else 1.0
    step_lr = 1.0 if lr is None else lr
    # step_size = lr / (1 - beta1**t), bias_correction2_sqrt = sqrt(1 - beta2**t), per tensor, in float64
    neg_step_size = per_tensor(new_steps, lambda t: over(sign * step_lr, 1 - torch.pow(beta1, t)))
    bc2_sqrt = per_tensor(new_steps, lambda t: torch.sqrt(1 - torch.pow(beta2, t)))
    neg_step_size, bc2_sqrt = scalars_for(neg_step_size, m), scalars_for(bc2_sqrt, m)
    denom = ops.sqrt(vmax if vmax is not None else v)
    denom = ops.add_scalar(ops.div(denom, bc2_sqrt, inplace=True), eps, inplace=True)
    updates = ops.div_list(ops.mul(m, neg_step_size), denom, inplace=True)
    if weight_decay != 0 and decoupled_weight_decay and lr is not None:
        decay = -lr * weight_decay
        if isinstance(decay, Tensor):
            decays = scalars_for([decay] * len(updates), updates)
            updates = ops.add(updates, ops.mul(rparams, decays), inplace=True)  # type: ignore[arg-type]
        else:
            updates = ops.add(updates, rparams, alpha=decay, inplace=True)  # type: ignore[arg-type]
    if apply:
        add_inplace(params, as_complex_like(updates, like))  # type: ignore[arg-type]
    return AdamResult(
        None if apply else as_complex_like(updates, like),
        new_steps,
        as_complex_like(m, like),
        as_complex_like(v, like),
        as_complex_like(vmax, like) if vmax is not None else None,
    )


def _adam_fused(
    plan: _fused.Plan,
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    donate: bool,
    apply: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> AdamResult:
    """The same step through ``torch._fused_adam_`` / ``torch._fused_adamw_`` (see :mod:`pureopt.kernels.fused`).

    ``grad_scale`` / ``found_inf`` only when every group runs torch's own call on the parameters."""
    new_steps = FOREACH.add_scalar(steps, 1, inplace=donate)
    m = exp_avgs if donate else _fused.clone_all(exp_avgs)
    v = exp_avg_sqs if donate else _fused.clone_all(exp_avg_sqs)
    vmax = None
    if amsgrad:
        assert max_exp_avg_sqs is not None
        vmax = max_exp_avg_sqs if donate else _fused.clone_all(max_exp_avg_sqs)
    # lr=None (scale_by_adam): lr=-1 makes the kernel write +direction into the zero buffer
    kernel_lr: float | Tensor = -1.0 if lr is None else lr
    if (weight_decay != 0 or apply) and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        g, mm, vv, st = take(grads, idx), take(m, idx), take(v, idx), take(new_steps, idx)
        vm = take(vmax, idx) if vmax is not None else []
        p = take(params, idx) if params is not None else None
        device = mm[0].device
        g = cast_like(g, mm)
        in_kernel = apply and p is not None and all(x.dtype == y.dtype for x, y in zip(p, mm))
        if in_kernel:  # torch's own call: parameters, moments and steps in one pass
            assert p is not None
            amp = _fused.amp_kwargs(grad_scale, found_inf, device)
            fn = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
            fn(p, g, mm, vv, vm, st, lr=_fused.fused_lr(kernel_lr, device), beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize, **amp)  # fmt: skip
            _fused.undo_steps(st, amp["found_inf"])
            return None
        assert grad_scale is None and found_inf is None
        if maximize:
            g = FOREACH.neg(g)
        if weight_decay != 0 and not decoupled_weight_decay:
            g = FOREACH.add(g, cast_like(p, mm), alpha=weight_decay, inplace=maximize)  # type: ignore[arg-type]
        updates = _fused.zeros_like_all(mm)
        torch._fused_adam_(updates, g, mm, vv, vm, st, lr=_fused.fused_lr(kernel_lr, device), beta1=beta1,
                           beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=amsgrad, maximize=False)  # fmt: skip
        if weight_decay != 0 and decoupled_weight_decay and lr is not None:
            decay = -lr * weight_decay
            pp = cast_like(p, mm)  # type: ignore[arg-type]
            if isinstance(decay, Tensor):
                updates = FOREACH.add(updates, FOREACH.mul(pp, decay.to(device)), inplace=True)
            else:
                updates = FOREACH.add(updates, pp, alpha=decay, inplace=True)
        if apply:
            add_inplace(p, updates)  # type: ignore[arg-type]
            return None
        return updates

    updates = _fused.run_grouped(len(grads), plan, body)
    return AdamResult(updates, new_steps, m, v, vmax)
