"""Lion (EvoLved Sign Momentum): the sign of an interpolated momentum, with decoupled weight decay.

Update rule (Chen et al. 2023, Algorithm 2), per parameter ``p`` with gradient ``g`` (``m`` starts at zero)::

    g <- -g                                    if maximize
    c = beta1 * m + (1 - beta1) * g            (interpolation used for the step)
    p <- p - lr * (sign(c) + weight_decay * p)
    m <- beta2 * m + (1 - beta2) * g           (the momentum kept, with the slower beta2)

No step count is needed: there is no bias correction. Complex tensors are viewed as real pairs, so the sign is
taken per real component.

Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le, "Symbolic Discovery of Optimization
Algorithms", NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Betas, Impl, Kernel, NonNeg, StateDtype, state
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_decay, add_update, decay_params

__all__ = ["LION", "LionState", "lion", "scale_by_lion"]


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    g = ops.neg(k.g) if h.maximize else k.g
    beta1, beta2 = h.betas
    direction = ops.sign(ops.lerp(k.exp_avg, g, 1 - beta1), inplace=True)
    exp_avg = ops.lerp(k.exp_avg, g, 1 - beta2, inplace=k.donate)
    decay = h.weight_decay != 0 and h.lr is not None
    if k.apply:  # the authors' order: p.mul_(1 - lr * wd).add_(sign(c), alpha=-lr)
        if decay:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        add_update(ops, k.p, direction, k.coef, owned=True)
        return None, {"exp_avg": exp_avg}
    updates = ops.mul(direction, k.coef, inplace=True) if h.lr is not None else direction
    if decay:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=True)
    return updates, {"exp_avg": exp_avg}


LION = Algorithm(
    "Lion",
    record="LionState",
    fields={"exp_avg": state("the momentum (an EMA of the gradients with ``beta2``).")},
    math=_math,
    doc="State of :func:`lion` and :func:`scale_by_lion`.",
)
LionState = LION.state


@LION.public
def lion(
    lr: LR = 1e-4,
    betas: Betas = (0.9, 0.99),
    weight_decay: NonNeg = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Lion: every coordinate moves by exactly ``lr`` along a sign (see the module docstring for the rule).

    Lion wants a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger, to keep
    ``lr * weight_decay`` similar.

    Args:
      betas: ``beta1`` interpolates momentum and gradient for the step; ``beta2`` is the momentum's decay.
      weight_decay: decoupled weight decay coefficient (multiplied by ``lr``).

    Example::

        tx = pureopt.lion(lr=3e-5, weight_decay=0.1)

    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """
    return LION.build(locals())


@LION.public
def scale_by_lion(
    betas: Betas = (0.9, 0.99), *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Replace updates by Lion's direction ``sign(beta1 * m + (1 - beta1) * g)``; ``m <- lerp(m, g, 1 - beta2)``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_lion(), pureopt.scale_by_learning_rate(1e-4))
    """
    return LION.build(locals())
