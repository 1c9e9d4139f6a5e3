"""Yogi: Adam with an additive, sign-controlled second-moment update that cannot blow the step size up.

Update rule (Zaheer et al. 2018, Algorithm 2), per parameter ``p`` with gradient ``g``::

    g <- -g                                            if maximize
    g <- g + weight_decay * p                          if weight_decay != 0 (L2 penalty)
    m <- beta1 * m + (1 - beta1) * g                   (m starts at 0)
    v <- v - (1 - beta2) * sign(v - g**2) * g**2       (v starts at initial_accumulator_value)
    update = -lr * m / (sqrt(v) + eps)                 without bias correction (the paper's algorithm)
    update = -(lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)   with it (t: own step count)

The paper leaves Adam's debiasing out of its pseudo-code for clarity; ``bias_correction=True`` (the default)
applies it as torch.optim.Adam does. ``v`` stays non-negative for a non-negative start. ``lr=None`` returns the
positive direction (used by ``scale_by_yogi``). Complex tensors are viewed as real pairs.

Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from pureopt.kernels.common import (
    adam_bias_corrections,
    addcdiv_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    on_host,
    torch_grad,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["YogiResult", "yogi"]


class YogiResult(NamedTuple):
    """Updates and new state lists; ``step`` is ``None`` without bias correction."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor] | None
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def yogi(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor] | None,
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> YogiResult:
    """One Yogi step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (``p.addcdiv_(m, denom, value=-step_size)``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m, v = as_real(exp_avgs), as_real(exp_avg_sqs)
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    if weight_decay != 0:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    sign = -1.0 if lr is not None else 1.0
    step_lr = 1.0 if lr is None else lr
    new_steps = None
    step_size: list[Any] | None = None
    bc2_sqrt: list[Any] | None = None
    if bias_correction:
        assert steps is not None
        new_steps = ops.add_scalar(steps, 1, inplace=donate)
        step_size, bc2_sqrt = adam_bias_corrections(new_steps, lr, beta1, beta2, like=m, host=on_host(apply, m))

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        m: list[Tensor],
        v: list[Tensor],
        step_size: list[Tensor] | None,
        bc2_sqrt: list[Tensor] | None,
    ) -> tuple[list[Tensor] | None, ...]:
        g, _ = torch_grad(ops, g, p, maximize=maximize, weight_decay=weight_decay)
        new_m = ops.lerp(m, g, 1 - beta1, inplace=donate)
        g2 = ops.mul_list(g, g)
        direction = ops.sign(ops.sub(v, g2), inplace=True)
        new_v = ops.addcmul(v, direction, g2, value=-(1 - beta2), inplace=donate)
        denom = ops.sqrt(new_v)
        if bc2_sqrt is not None:
            denom = ops.div(denom, bc2_sqrt, inplace=True)
        denom = ops.add_scalar(denom, eps, inplace=True)
        scale = step_size if step_size is not None else sign * step_lr
        updates = addcdiv_update(ops, p if apply else None, new_m, denom, scale, owned=False)
        return updates, new_m, new_v

    updates, new_m, new_v = elementwise(
        body, ops, (rparams, g, m, v, step_size, bc2_sqrt), writes=(None, 2, 3), in_place=apply
    )
    assert new_m is not None and new_v is not None
    return YogiResult(
        None if updates is None else as_complex_like(updates, grads),
        new_steps,
        as_complex_like(new_m, grads),
        as_complex_like(new_v, grads),
    )
