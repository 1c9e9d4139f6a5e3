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

The second moment costs one scalar per tensor instead of one per element. Norms are the 2-norm of the whole tensor
(the complex 2-norm for complex tensors, which are viewed as real pairs), taken for all tensors at once (no host
sync); on FSDP2 (DTensor parameters) over all shards in one all-reduce per mesh group
(:func:`pureopt.kernels.dtensor.shard_norms`), the rest of the step on the local shards. The ``scale_by_novograd``
form returns ``m``.

Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang & Cohen, "Stochastic Gradient
Methods with Layer-wise Adaptive Moments for Training of Deep Networks", 2019 (arXiv:1905.11286).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Betas,
    Eps,
    Field,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_update, map_scalars_n, on_host
from pureopt.kernels.dtensor import is_dtensor, shard_norms
from pureopt.kernels.lars import norms

__all__ = ["NOVOGRAD", "NovoGradState", "novograd", "scale_by_novograd"]


def _layer_scalar(h: Any, dtype: torch.dtype | None) -> Any:
    return lambda p: torch.zeros((), dtype=(dtype or p.dtype).to_real(), device=p.device)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    h, beta2 = k.h, k.h.betas[1]
    dtypes = {v.dtype for v in k.exp_avg_sq}  # compute in the layer moments' own dtype (the real state dtype)
    work = dtypes.pop() if len(dtypes) == 1 else None
    sharded = k.dtensors if k.dtensors is not None else (k.g if any(map(is_dtensor, k.g)) else None)
    # (a norm is sign-blind: the gradient's, maximize or not; over all shards of a DTensor, as plain 0-d tensors)
    grad_norms = norms(k.ops, k.g) if sharded is None else shard_norms(sharded, work)

    def layer_moments(t: Tensor, v: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        n2 = n * n
        new_v = torch.where(t == 1, n2, beta2 * v + (1 - beta2) * n2)
        return new_v, torch.sqrt(new_v) + h.eps

    host = (1,) if on_host(k.apply, k.exp_avg) else ()
    new_v, denom = map_scalars_n(
        layer_moments, steps, k.exp_avg_sq, grad_norms, outputs=2, dtype=work, like=k.g, host=host
    )
    return {"exp_avg_sq": new_v, "denom": denom}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    d = ops.div(ops.neg(k.g), k.denom, inplace=k.own) if h.maximize else ops.div(k.g, k.denom)
    if h.weight_decay != 0:
        d = ops.add(d, k.p, alpha=h.weight_decay, inplace=k.own)
    if h.grad_averaging:
        d = ops.mul(d, 1 - h.betas[0], inplace=k.own)
    m = ops.add(ops.mul(k.exp_avg, h.betas[0], inplace=k.donate), d, inplace=k.own)
    return add_update(ops, k.target, m, k.coef, owned=False), {"exp_avg": m}  # (applied: p.add_(m, alpha=-lr))


NOVOGRAD = Algorithm(
    "NovoGrad",
    record="NovoGradState",
    fields={
        "step": step_count("per-parameter step counts (the first step initialises the layer moment)."),
        "exp_avg": state("per-parameter momentum of the normalised gradients."),
        "exp_avg_sq": Field(
            "the layer-wise second moment: one 0-d (real) tensor per parameter.", _layer_scalar, per_tensor=True
        ),
    },
    math=_math,
    scalars=_scalars,
    scalars_read_grads=True,  # (per-tensor gradient norms)
    elementwise=False,  # (the norms, in ``scalars``; the math itself is elementwise given them)
    tensorwise=True,
    local_shards=True,
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`novograd` and :func:`scale_by_novograd`.",
)
NovoGradState = NOVOGRAD.state


@NOVOGRAD.public
def novograd(
    lr: LR = 1e-3,
    betas: Betas = (0.95, 0.98),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    *,
    grad_averaging: bool = False,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """NovoGrad: per-tensor ("layer") normalised gradients, weight decay added to them, heavy-ball momentum (the
    rule is in the module docstring).

    Args:
      betas: momentum factor and decay of the layer-wise second moment (the paper uses 0.95 and 0.98).
      eps: added to the denominator.
      weight_decay: weight decay, added to the normalised gradient.
      grad_averaging: scale the new term by ``1 - beta1`` (an EMA instead of a plain momentum sum).

    Example::

        tx = pureopt.novograd(lr=1e-2, weight_decay=1e-3)

    Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep
    Networks", 2019.
    """
    return NOVOGRAD.build(locals())


@NOVOGRAD.public
def scale_by_novograd(
    betas: Betas = (0.95, 0.98),
    eps: Eps = 1e-8,
    grad_averaging: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by NovoGrad's momentum of layer-wise normalised gradients: ``v <- beta2 * v + (1 - beta2) *
    ||g||**2`` (``||g||**2`` on the first step), ``m <- beta1 * m + g / (sqrt(v) + eps)`` (times ``1 - beta1``
    with ``grad_averaging``), ``u = m``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_novograd(), pureopt.scale_by_learning_rate(1e-2))
    """
    return NOVOGRAD.build(locals())
