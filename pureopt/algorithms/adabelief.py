"""AdaBelief: Adam with the second moment replaced by the EMA of the squared deviation from the first moment.

Update rule (Zhuang et al. 2020, Algorithm 2), per parameter ``p`` with gradient ``g`` and its own step count::

    g <- -g                                                    if maximize
    g <- g + weight_decay * p                                  if weight_decay != 0 and not decoupled
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g
    s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps            (eps inside the belief term, as in the paper)
    smax <- max(smax, s); use smax for s                       if amsgrad
    update = -(lr / (1 - beta1**t)) * m / (sqrt(s) / sqrt(1 - beta2**t) + eps)
    update <- update - lr * weight_decay * p                   if weight_decay != 0 and decoupled (the default)

``m`` in ``(g - m)`` is the updated first moment. The ``scale_by_belief`` form returns the positive direction
``m_hat / (sqrt(s_hat) + eps)``. Complex tensors are viewed as real pairs.

Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief Optimizer: Adapting Stepsizes by the
Belief in Observed Gradients", NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Betas, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import (
    adam_bias_corrections,
    add_decay,
    addcdiv_update,
    decay_params,
    ema_of_squares,
    on_host,
    torch_grad,
)

__all__ = ["ADABELIEF", "ScaleByBeliefState", "adabelief", "scale_by_belief"]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    beta1, beta2 = k.h.betas
    step_size, bc2_sqrt = adam_bias_corrections(
        steps, k.h.lr, beta1, beta2, like=k.exp_avg, host=on_host(k.apply, k.exp_avg)
    )
    return {"step_size": step_size, "bc2_sqrt": bc2_sqrt}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    beta1, beta2 = h.betas
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay and h.lr is not None
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, _ = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=coupled)
    m = ops.lerp(k.exp_avg, g, 1 - beta1, inplace=k.donate)
    s = ema_of_squares(ops, k.exp_avg_var, ops.sub(g, m), beta2, donate=k.donate)
    s = ops.add_scalar(s, h.eps, inplace=True)
    new = {"exp_avg": m, "exp_avg_var": s}
    if h.amsgrad:
        new["max_exp_avg_var"] = ops.maximum(k.max_exp_avg_var, s, inplace=k.donate)
    denom = ops.sqrt(new.get("max_exp_avg_var", s))
    denom = ops.add_scalar(ops.div(denom, k.bc2_sqrt, inplace=True), h.eps, inplace=True)
    if k.apply:  # decoupled decay first, then p.addcdiv_(m, denom, value=-step_size)
        if decoupled:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        addcdiv_update(ops, k.p, m, denom, k.step_size, owned=False)
        return None, new
    updates = addcdiv_update(ops, None, m, denom, k.step_size, owned=False)
    assert updates is not None
    if decoupled:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=True)
    return updates, new


ADABELIEF = Algorithm(
    "AdaBelief",
    record="ScaleByBeliefState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_avg_var": state('the "belief" second moments, EMAs of ``(g - m)**2`` plus ``eps``.', nonneg=True),
        "max_exp_avg_var": state("running maxima of ``exp_avg_var`` (amsgrad).", when=lambda h: h.amsgrad, nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    neutral={"decoupled_weight_decay": True},
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`adabelief` and :func:`scale_by_belief`.",
)
ScaleByBeliefState = ADABELIEF.state


@ADABELIEF.public
def adabelief(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-16,
    weight_decay: NonNeg = 0.0,
    amsgrad: bool = False,
    *,
    decoupled_weight_decay: bool = True,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """AdaBelief: Adam whose second moment tracks ``(g - m)**2``, the surprise of the gradient (the rule is in the
    module docstring).

    Args:
      betas: coefficients of the running averages of the gradient and of the belief term.
      eps: added inside the belief term and to the denominator (the reference default is 1e-16).
      weight_decay: weight decay coefficient.
      amsgrad: use the running maximum of the belief moments.
      decoupled_weight_decay: decay the weights directly (AdamW-style, the reference default) instead of adding
        an L2 term to the gradient.

    Example::

        tx = pureopt.adabelief(lr=1e-3, weight_decay=1e-2)

    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020.
    """
    return ADABELIEF.build(locals())


@ADABELIEF.public
def scale_by_belief(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-16,
    amsgrad: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Rescale updates by AdaBelief's bias-corrected first moment over the root of its "belief" moment:
    ``(m / (1 - beta1**t)) / (sqrt(s) / sqrt(1 - beta2**t) + eps)`` (``amsgrad``: the running maximum of ``s``).

    Example::

        tx = pureopt.chain(pureopt.scale_by_belief(), pureopt.scale_by_learning_rate(1e-3))

    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020.
    """
    return ADABELIEF.build(locals())
