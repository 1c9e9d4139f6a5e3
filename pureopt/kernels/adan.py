"""Adan (adaptive Nesterov momentum), the restart-free version, with proximal or decoupled weight decay.

Update rule (Xie et al. 2022, Algorithm 1, with bias correction), per parameter ``p`` with gradient ``g``, the
previous gradient ``g_prev`` and its own step count ``t``. The betas follow the authors' released code: ``beta``
here is ``1 - beta`` of the paper (the paper's ``(0.02, 0.08, 0.01)`` are ``betas=(0.98, 0.92, 0.99)``)::

    g <- -g                                                   if maximize
    diff = g - g_prev                                         (0 on the tensor's first step)
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g                          (gradient moment)
    d <- beta2 * d + (1 - beta2) * diff                       (gradient-difference moment)
    n <- beta3 * n + (1 - beta3) * (g + beta2 * diff)**2      (second moment of the Nesterov gradient)
    u = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / (sqrt(n) / sqrt(1 - beta3**t) + eps)
    p_new = (p - lr * u) / (1 + lr * weight_decay)            proximal weight decay (default)
    p_new = p * (1 - lr * weight_decay) - lr * u              no_prox=True (decoupled, as AdamW)
    update = p_new - p;   g_prev <- g

``lr=None`` returns ``u`` (used by ``scale_by_adan``). Complex tensors are viewed as real pairs.

Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022
(arXiv:2208.06677; IEEE TPAMI 2024).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_scaled,
    add_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_for,
    torch_grad,
)
from pureopt.kernels.lars import require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdanResult", "adan"]


class AdanResult(NamedTuple):
    """Updates and new state lists (named like the reference implementation's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_diff: list[Tensor]
    exp_avg_sq: list[Tensor]
    pre_grad: list[Tensor]


def adan(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    pre_grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> AdanResult:
    """One Adan step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): update the parameters
    in place too (the authors' order: decay, step, or step then the proximal division) and return
    ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m, d, n, prev = as_real(exp_avgs), as_real(exp_avg_diffs), as_real(exp_avg_sqs), as_real(pre_grads)
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    decay = weight_decay != 0 and lr is not None
    if decay:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)

    def scalars(t: Tensor) -> tuple[Tensor, ...]:
        t1 = t + 1
        seen = (t > 0).to(t.dtype)  # 0 on a tensor's first step: there is no previous gradient
        inv_bc1 = 1 / (1 - torch.pow(beta1, t1))
        diff_scale = beta2 / (1 - torch.pow(beta2, t1))
        return seen, inv_bc1, diff_scale, torch.sqrt(1 - torch.pow(beta3, t1))

    seen, inv_bc1, diff_scale, bc3_sqrt = map_scalars_n(scalars, steps, outputs=4, like=m, host=on_host(apply, m))
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        m: list[Tensor],
        d: list[Tensor],
        n: list[Tensor],
        prev: list[Tensor],
        seen: list[Tensor],
        inv_bc1: list[Tensor],
        diff_scale: list[Tensor],
        bc3_sqrt: list[Tensor],
    ) -> tuple[list[Tensor] | None, ...]:
        g, owned = torch_grad(ops, g, None, maximize=maximize, weight_decay=0.0)
        diff = ops.mul(ops.sub(g, prev), seen, inplace=True)
        new_m = ops.lerp(m, g, 1 - beta1, inplace=donate)
        new_d = ops.lerp(d, diff, 1 - beta2, inplace=donate)
        nesterov_g = ops.add(ops.mul(diff, beta2, inplace=True), g, inplace=True)  # g + beta2 * diff
        new_n = ema_of_squares(ops, n, nesterov_g, beta3, donate=donate)
        new_prev = ops.copy_(prev, g) if donate else (g if owned else ops.clone(g))

        denom = ops.add_scalar(ops.div(ops.sqrt(new_n), bc3_sqrt, inplace=True), eps, inplace=True)
        numer = ops.add(ops.mul(new_m, inv_bc1), ops.mul(new_d, diff_scale), inplace=True)
        direction = ops.div_list(numer, denom, inplace=True)
        if apply:
            assert p is not None
            if decay and no_prox:
                ops.mul(p, scalar_for(1 - lr * weight_decay, p), inplace=True)  # type: ignore[operator]
            add_update(ops, p, direction, 1.0 if lr is None else -lr, owned=True)
            if decay and not no_prox:
                ops.mul(p, scalar_for(1 / (1 + lr * weight_decay), p), inplace=True)  # type: ignore[operator]
            return None, new_m, new_d, new_n, new_prev
        if lr is None:
            return direction, new_m, new_d, new_n, new_prev
        updates = ops.mul(direction, -lr, inplace=True)
        if decay:
            updates = add_scaled(ops, updates, p, -lr * weight_decay, inplace=True)  # type: ignore[arg-type]
            if not no_prox:
                updates = ops.mul(updates, scalar_for(1 / (1 + lr * weight_decay), updates), inplace=True)
        return updates, new_m, new_d, new_n, new_prev

    columns = (rparams, g, m, d, n, prev, seen, inv_bc1, diff_scale, bc3_sqrt)
    updates, new_m, new_d, new_n, new_prev = elementwise(body, ops, columns, writes=(None, 2, 3, 4, 5), in_place=apply)
    assert new_m is not None and new_d is not None and new_n is not None and new_prev is not None
    return AdanResult(
        None if updates is None else as_complex_like(updates, grads),
        new_steps,
        as_complex_like(new_m, grads),
        as_complex_like(new_d, grads),
        as_complex_like(new_n, grads),
        as_complex_like(new_prev, grads),
    )
