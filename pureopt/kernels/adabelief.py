"""AdaBelief: Adam with the second moment replaced by the EMA of the squared deviation from the first moment.

Update rule (Zhuang et al. 2020, Algorithm 2), per parameter ``p`` with gradient ``g`` and its own step count::

    g <- -g                                                    if maximize
    g <- g + weight_decay * p                                  if weight_decay != 0 and not decoupled
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g
    s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps            (eps inside the belief term, as in the paper)
    smax <- max(smax, s); use smax for s                       if amsgrad
    update = -(lr / (1 - beta1**t)) * m / (sqrt(s) / sqrt(1 - beta2**t) + eps)
    update <- update - lr * weight_decay * p                   if weight_decay != 0 and decoupled

``m`` in ``(g - m)`` is the updated first moment. ``lr=None`` returns the positive direction
``m_hat / (sqrt(s_hat) + eps)`` (used by ``scale_by_belief``). Complex tensors are viewed as real pairs.

Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief Optimizer: Adapting Stepsizes by the
Belief in Observed Gradients", NeurIPS 2020.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from pureopt.kernels.common import (
    adam_bias_corrections,
    add_scaled,
    addcdiv_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    on_host,
    scalar_for,
    torch_grad,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdaBeliefResult", "adabelief"]


class AdaBeliefResult(NamedTuple):
    """Updates and new state lists (named like the reference implementation's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_var: list[Tensor]
    max_exp_avg_var: list[Tensor] | None


def adabelief(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None,
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
) -> AdaBeliefResult:
    """One AdaBelief step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): update the parameters
    in place too (decoupled decay first, then ``p.addcdiv_(m, denom, value=-step_size)``) and return
    ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m, s = as_real(exp_avgs), as_real(exp_avg_vars)
    smax = as_real(max_exp_avg_vars) if amsgrad and max_exp_avg_vars is not None else None
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    uses_p = weight_decay != 0 and (lr is not None or not decoupled_weight_decay)
    if uses_p:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    decoupled = uses_p and decoupled_weight_decay
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    step_size, bc2_sqrt = adam_bias_corrections(new_steps, lr, beta1, beta2, like=m, host=on_host(apply, m))

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        m: list[Tensor],
        s: list[Tensor],
        smax: list[Tensor] | None,
        step_size: list[Tensor],
        bc2_sqrt: list[Tensor],
    ) -> tuple[list[Tensor] | None, ...]:
        coupled = weight_decay if uses_p and not decoupled_weight_decay else 0.0
        g, _ = torch_grad(ops, g, p, maximize=maximize, weight_decay=coupled)
        new_m = ops.lerp(m, g, 1 - beta1, inplace=donate)
        residual = ops.sub(g, new_m)
        new_s = ema_of_squares(ops, s, residual, beta2, donate=donate)
        new_s = ops.add_scalar(new_s, eps, inplace=True)
        new_smax = None
        if amsgrad:
            assert smax is not None
            new_smax = ops.maximum(smax, new_s, inplace=donate)
        denom = ops.sqrt(new_smax if new_smax is not None else new_s)
        denom = ops.add_scalar(ops.div(denom, bc2_sqrt, inplace=True), eps, inplace=True)
        if apply:
            assert p is not None
            if decoupled:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            addcdiv_update(ops, p, new_m, denom, step_size, owned=False)
            return None, new_m, new_s, new_smax
        updates = addcdiv_update(ops, None, new_m, denom, step_size, owned=False)
        if decoupled and lr is not None:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)  # type: ignore[arg-type]
        return updates, new_m, new_s, new_smax

    columns = (rparams, g, m, s, smax, step_size, bc2_sqrt)
    updates, new_m, new_s, new_smax = elementwise(body, ops, columns, writes=(None, 2, 3, 4), in_place=apply)
    assert new_m is not None and new_s is not None
    return AdaBeliefResult(
        None if updates is None else as_complex_like(updates, grads),
        new_steps,
        as_complex_like(new_m, grads),
        as_complex_like(new_s, grads),
        as_complex_like(new_smax, grads) if new_smax is not None else None,
    )
