"""NovoGrad: SGD with momentum on gradients normalised by a layer-wise (one scalar per tensor) second moment.

Update rule (Ginsburg et al. 2019, Algorithm 1), per parameter tensor ("layer") ``p`` with gradient ``g`` and its
own step count ``t``::

    g <- -g                                                  if maximize
    v <- ||g||**2                                            on the tensor's first step
    v <- beta2 * v + (1 - beta2) * ||g||**2                  afterwards (v is a 0-d tensor per parameter)
    d = g / (sqrt(v) + eps) + weight_decay * p
    d <- (1 - beta1) * d                                     if grad_averaging
    m <- beta1 * m + d                                       (m starts at 0, so the first m is d)
    update = -lr * m

``lr=None`` returns ``m`` (used by ``scale_by_novograd``). Norms are the 2-norm of the whole tensor (the complex
2-norm for complex tensors, which are viewed as real pairs). The layer scalars are computed for all tensors at
once on stacked vectors (no host sync).

Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang & Cohen, "Stochastic Gradient
Methods with Layer-wise Adaptive Moments for Training of Deep Networks", 2019 (arXiv:1905.11286).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    add_update,
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    elementwise,
    map_scalars_n,
    on_host,
    scalar_for,
)
from pureopt.kernels.lars import norms, require_params
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["NovoGradResult", "novograd"]


class NovoGradResult(NamedTuple):
    """Updates and new state lists; ``exp_avg_sq`` holds one 0-d tensor per parameter."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def novograd(
    params: list[Tensor] | None,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_averaging: bool,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
    grad_norms: list[Tensor] | None = None,
) -> NovoGradResult:
    """One NovoGrad step over tensor lists; returns the updates and the new state lists (see module docstring).

    ``donate``: the state lists may be overwritten. ``apply`` (with ``donate`` and ``params``): add the updates to
    the parameters in place too (``p.add_(m, alpha=-lr)``) and return ``updates=None``. ``grad_norms``: each
    gradient's 2-norm (0-d, in the state dtype), when the tensors given are shards of the layers (FSDP2: the
    norms are taken over all shards, :func:`pureopt.kernels.dtensor.shard_norms`); by default they are computed
    here.
    """
    path = choose_impl(impl, [*grads, *exp_avgs])
    ops = ops_for(path)
    m = as_real(exp_avgs)
    g = cast_like(as_real(grads), m)  # state may be kept in another dtype (state_dtype=)
    if weight_decay != 0:
        require_params(params, "weight_decay")
    rparams = cast_like(as_real(params), m) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)

    def layer_moments(t: Tensor, v: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        n2 = n * n
        new_v = torch.where(t == 0, n2, beta2 * v + (1 - beta2) * n2)
        return new_v, torch.sqrt(new_v) + eps

    # the layer scalars first, over whole tensors (a norm is sign-blind: the gradient's, maximize or not), in the
    # layer moments' own dtype (the state dtype), like the per-element math; then the elementwise rest
    dtypes = {v.dtype for v in exp_avg_sqs}
    work = dtypes.pop() if len(dtypes) == 1 else None
    new_v, denom = map_scalars_n(
        layer_moments,
        steps,
        exp_avg_sqs,
        norms(ops, g) if grad_norms is None else grad_norms,
        outputs=2,
        dtype=work,
        like=g,
        host=(1,) if on_host(apply, m) else (),
    )
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    def body(
        ops: ListOps, p: list[Tensor] | None, g: list[Tensor], m: list[Tensor], denom: list[Tensor]
    ) -> tuple[list[Tensor] | None, ...]:
        if maximize:
            d = ops.div(ops.neg(g), denom, inplace=True)
        else:
            d = ops.div(g, denom)
        if weight_decay != 0:
            d = ops.add(d, p, alpha=weight_decay, inplace=True)  # type: ignore[arg-type]
        if grad_averaging:
            d = ops.mul(d, 1 - beta1, inplace=True)
        new_m = ops.add(ops.mul(m, beta1, inplace=donate), d, inplace=True)
        if apply:  # p.add_(m, alpha=-lr)
            return add_update(ops, p, new_m, 1.0 if lr is None else -lr, owned=False), new_m
        updates = ops.clone(new_m) if lr is None else ops.mul(new_m, scalar_for(-lr, new_m))
        return updates, new_m

    updates, new_m = elementwise(body, ops, (rparams, g, m, denom), writes=(None, 2), in_place=apply)
    assert new_m is not None
    return NovoGradResult(
        None if updates is None else as_complex_like(updates, grads), new_steps, as_complex_like(new_m, grads), new_v
    )
