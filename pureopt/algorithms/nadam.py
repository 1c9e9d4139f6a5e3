"""NAdam (Adam with Nesterov momentum and momentum decay), as torch.optim.NAdam (NAdamW with decoupled decay).

Update rule, per parameter ``p`` with gradient ``g``, its own step count ``t`` and running product ``mu_product``
(a 0-d tensor per parameter in the step count's dtype, as torch keeps it)::

    g <- -g                                             if maximize
    g <- g + weight_decay * p                           if weight_decay != 0 and not decoupled
    t <- t + 1
    mu_t      = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_{t+1}  = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    mu_product <- mu_product * mu_t
    m <- m + (1 - beta1) * (g - m);   v <- beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v / (1 - beta2**t)) + eps
    update = -lr * (1 - mu_t) / (1 - mu_product) * g / denom
             - lr * mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / denom
    update <- update - lr * weight_decay * p            if weight_decay != 0 and decoupled

The ``scale_by_nadam`` form returns the positive direction. Complex tensors are viewed as real pairs, as torch does.

Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
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
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    scalar_state,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import (
    add_decay,
    addcdiv_update,
    decay_params,
    ema_of_squares,
    map_scalars_n,
    on_host,
    scalar_dtype,
    scalars_for,
    torch_grad,
)
from pureopt.transforms._util import step_dtype

__all__ = ["NADAM", "ScaleByNAdamState", "nadam", "scale_by_nadam"]

Eps = Annotated[float, nonneg("epsilon"), AS_FLOAT]
NonNeg = Annotated[float, nonneg(), AS_FLOAT]


def _mu_product_init(p: Tensor) -> Tensor:
    return torch.ones((), dtype=step_dtype(), device=p.device)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    h = k.h
    beta1, beta2 = h.betas

    def fn(t: Tensor, mu_prod: Tensor) -> tuple[Tensor, ...]:
        t = t.to(scalar_dtype(t.device))
        mu = beta1 * (1.0 - 0.5 * torch.pow(0.96, t * h.momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1) * h.momentum_decay))
        new_prod = mu_prod * mu.to(mu_prod.dtype)  # torch: its float32 mu_product times the Python float mu
        prod = new_prod.to(t.dtype)
        coef_g = k.coef * (1.0 - mu) / (1.0 - prod)
        coef_m = k.coef * mu_next / (1.0 - prod * mu_next)
        return new_prod, coef_g, coef_m, 1 - torch.pow(beta2, t)

    host = (1, 2, 3) if on_host(k.apply, k.exp_avg) else ()
    prods, coef_g, coef_m, bc2 = map_scalars_n(fn, steps, k.mu_product, outputs=4, keep_dtype=True, host=host)
    return {
        "mu_product": prods,
        "coef_g": scalars_for(coef_g, k.g),
        "coef_m": scalars_for(coef_m, k.g),
        "bc2": scalars_for(bc2, k.g),
    }


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    beta1, beta2 = h.betas
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay and h.lr is not None
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, owned = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=coupled, own=own)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    v = ema_of_squares(ops, k.exp_avg_sq, g, beta2, donate=k.donate, own=own)
    new = {"exp_avg": m, "exp_avg_sq": v}
    denom = ops.add_scalar(ops.sqrt(ops.div(v, k.bc2), inplace=own), h.eps, inplace=own)
    if k.apply:  # torch: p.mul_(1 - lr * wd); p.addcdiv_(g, denom, value=coef_g); p.addcdiv_(m, denom, ...)
        if decoupled:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        addcdiv_update(ops, k.p, g, denom, k.coef_g, owned=owned)
        addcdiv_update(ops, k.p, m, denom, k.coef_m, owned=False)
        return None, new
    updates = addcdiv_update(ops, None, g, denom, k.coef_g, owned=owned)
    assert updates is not None
    updates = ops.add(updates, ops.div_list(ops.mul(m, k.coef_m), denom, inplace=own), inplace=own)
    if decoupled:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=own)
    return updates, new


NADAM = Algorithm(
    "NAdam",
    record="ScaleByNAdamState",
    fields={
        "step": step_count(),
        "mu_product": scalar_state(_mu_product_init, "running products of the momentum coefficients (0-d each)."),
        "exp_avg": state("first moments."),
        "exp_avg_sq": state("second moments.", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    neutral={"decoupled_weight_decay": False},
    check_order=("lr", "eps", "betas", "weight_decay", "momentum_decay"),
    doc="State of :func:`nadam` and :func:`scale_by_nadam` (torch.optim.NAdam's state keys).",
)
ScaleByNAdamState = NADAM.state


@NADAM.public
def nadam(
    lr: LR = 2e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    momentum_decay: NonNeg = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """NAdam, as ``torch.optim.NAdam`` (the rule is in the module docstring).

    Args:
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator.
      weight_decay: weight decay coefficient.
      momentum_decay: momentum decay (psi in the paper).
      decoupled_weight_decay: decay the weights directly (NAdamW) instead of adding an L2 term to the gradient.
      state_dtype: dtype of the moments (default: the parameter's, as torch); ``mu_product`` is a 0-d tensor in
        the step count's dtype, as torch keeps it.

    Example::

        tx = pureopt.nadam(lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True)

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
    """
    return NADAM.build(locals())


@NADAM.public
def scale_by_nadam(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    momentum_decay: NonNeg = 4e-3,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Rescale updates by NAdam's Nesterov-style mix of the gradient and the first moment (torch's numerics):
    ``(1 - mu_t) / (1 - mu_product) * g / d + mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / d``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_nadam(), pureopt.scale_by_learning_rate(2e-3))
    """
    return NADAM.build(locals())
