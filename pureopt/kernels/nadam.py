"""NAdam (Adam with Nesterov momentum and momentum decay): torch.optim.NAdam's math on tensor lists.

Update rule (torch.optim.NAdam), per parameter ``p`` with gradient ``g``, its own step count ``t`` and
running product ``mu_product`` (a 0-d tensor per parameter, as torch keeps it)::

    g <- -g                                             if maximize
    t <- t + 1
    g <- g + weight_decay * p                           if weight_decay != 0 and not decoupled
    mu_t      = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_{t+1}  = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    mu_product <- mu_product * mu_t                     (in the step-count dtype, as torch)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v / (1 - beta2**t)) + eps
    update = -lr * (1 - mu_t) / (1 - mu_product) * g / denom
             - lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / denom
    update <- update - lr * weight_decay * p            if weight_decay != 0 and decoupled

``lr=None`` gives the positive direction (the same with ``lr = 1`` and the sign flipped), used by
:func:`pureopt.transforms.nadam.scale_by_nadam`. Complex tensors are viewed as real pairs, as torch does.

Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.kernels import select
from pureopt.kernels.common import (
    add_scaled,
    addcdiv_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_dtype,
    scalar_for,
    scalars_for,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["NAdamResult", "nadam", "autograd_recording"]


class NAdamResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    mu_product: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def autograd_recording(*lists: Sequence[Any] | None) -> bool:
    """Whether autograd records through these tensors (the update is being differentiated).

    Kernels then avoid every in-place op, even on their own temporaries: an op like ``sqrt`` saves its output
    for the backward pass, and writing into it afterwards would break that.
    """
    return select.autograd_recording([t for ts in lists if ts is not None for t in ts])


def nadam(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> NAdamResult:
    """One NAdam step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (torch's ops: decay, then two ``addcdiv_``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    # in place on the kernel's own temporaries, unless autograd records through the update
    tmp = not autograd_recording(params, grads, exp_avgs, exp_avg_sqs)
    donate = donate and tmp
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    like = grads
    ms, vs = as_real(exp_avgs), as_real(exp_avg_sqs)
    g = cast_like(as_real(grads), ms)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), ms) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    sign = -1.0 if lr is not None else 1.0
    step_lr = 1.0 if lr is None else lr

    def scalars(t: Tensor, mu_prod: Tensor) -> tuple[Tensor, ...]:
        t = t.to(scalar_dtype(t.device))
        mu = beta1 * (1.0 - 0.5 * torch.pow(0.96, t * momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1) * momentum_decay))
        # torch multiplies its float32 (float64 under a float64 default) mu_product by the Python float mu
        new_prod = mu_prod * mu.to(mu_prod.dtype)
        prod = new_prod.to(t.dtype)
        coef_g = sign * step_lr * (1.0 - mu) / (1.0 - prod)
        coef_m = sign * step_lr * mu_next / (1.0 - prod * mu_next)
        bias_correction2 = 1 - torch.pow(beta2, t)
        return new_prod, coef_g, coef_m, bias_correction2

    new_prods, coef_g, coef_m, bc2 = map_scalars_n(
        scalars, new_steps, mu_products, outputs=4, keep_dtype=True, host=(1, 2, 3) if on_host(apply, ms) else ()
    )
    coef_g, coef_m, bc2 = (scalars_for(x, g) for x in (coef_g, coef_m, bc2))
    decoupled = weight_decay != 0 and decoupled_weight_decay and lr is not None

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        ms: list[Tensor],
        vs: list[Tensor],
        coef_g: list[Tensor],
        coef_m: list[Tensor],
        bc2: list[Tensor],
    ) -> tuple[list[Tensor] | None, ...]:
        coupled = 0.0 if decoupled_weight_decay else weight_decay
        g, owned = torch_grad(ops, g, p, maximize=maximize, weight_decay=coupled, own=tmp)
        m = ops.lerp(ms, g, 1 - beta1, inplace=donate)
        v = ema_of_squares(ops, vs, g, beta2, donate=donate, own=tmp)
        denom = ops.add_scalar(ops.sqrt(ops.div(v, bc2), inplace=tmp), eps, inplace=tmp)
        if apply:  # torch: p.mul_(1 - lr * wd); p.addcdiv_(g, denom, value=coef_g); p.addcdiv_(m, denom, ...)
            assert p is not None
            if decoupled:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            addcdiv_update(ops, p, g, denom, coef_g, owned=owned)
            addcdiv_update(ops, p, m, denom, coef_m, owned=False)
            return None, m, v
        updates = addcdiv_update(ops, None, g, denom, coef_g, owned=owned)
        assert updates is not None
        updates = ops.add(updates, ops.div_list(ops.mul(m, coef_m), denom, inplace=tmp), inplace=tmp)
        if decoupled:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=tmp)  # type: ignore[arg-type, operator]
        return updates, m, v

    updates, m, v = elementwise(
        body, ops, (rparams, g, ms, vs, coef_g, coef_m, bc2), writes=(None, 2, 3), in_place=apply
    )
    assert m is not None and v is not None
    return NAdamResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        new_prods,
        as_complex_like(m, like),
        as_complex_like(v, like),
    )
