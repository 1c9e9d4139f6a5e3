"""LAMB: Adam's direction plus decoupled weight decay, scaled per layer by the trust ratio ||p|| / ||u||.

Update rule (You et al. 2020, Algorithm 2, with phi the identity), per parameter tensor ``p`` with gradient ``g``
and its own step count ``t``::

    g <- -g                                            if maximize
    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    r = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    u = r + weight_decay * p
    ratio = ||p|| / ||u||                              (1 where ||p|| == 0 or ||u|| == 0; torch.where, no host sync)
    update = -lr * ratio * u

``r`` is Adam's bias-corrected direction, computed by Adam's own definition (:mod:`pureopt.algorithms.adam`,
torch's eps placement), so the moments, step counts and complex handling are Adam's. Every tensor is one "layer";
on flat buffers (``UpdateContext.segments``) the ratios are per parameter. Use :func:`pureopt.partition` or the mask
of :func:`~pureopt.transforms.trust_ratio.scale_by_trust_ratio` in a chain to exempt biases and norm weights.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer & Hsieh, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pureopt.algorithms.adam import ADAM
from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Betas,
    Eps,
    Hyper,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.kernels.common import as_real, cast_like, join_segments, segment_views
from pureopt.kernels.lars import map_scalars, norms, trust_ratio

__all__ = ["LAMB", "LambState", "lamb"]


def _direction(k: Kernel) -> Kernel:
    """The arguments of Adam's ``scale_by_adam`` form (no learning rate, no weight decay, no amsgrad)."""
    h = k.h
    adam_h = Hyper(betas=h.betas, eps=h.eps, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
                   maximize=h.maximize, lr=None)  # fmt: skip
    return Kernel(**{**vars(k), "h": adam_h, "coef": 1.0, "apply": False, "target": None})


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    assert ADAM.scalars is not None
    return ADAM.scalars(_direction(k), steps)


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, segs = k.ops, k.h, k.segments
    direction, new = ADAM.math(_direction(k))
    assert direction is not None
    # fresh tensors owned by this kernel; in the state dtype (0-d results may come back promoted)
    u = cast_like(as_real(direction), as_real(new["exp_avg"]))
    rp = cast_like(as_real(k.p), u)
    if h.weight_decay != 0:
        u = ops.add(u, rp, alpha=h.weight_decay, inplace=True)
    rp_parts, u_parts = segment_views(rp, segs), segment_views(u, segs)  # per parameter
    scales = map_scalars(
        lambda pn, un: k.coef * trust_ratio(pn, un, 1.0, 0.0), norms(ops, rp_parts), norms(ops, u_parts), like=u_parts
    )
    if k.apply:  # p + ratio * u with one rounding (in place, into the parameters)
        ops.addcmul(rp_parts, u_parts, scales, inplace=True)
        return None, new
    scaled = ops.mul(u_parts, scales, inplace=True)
    return join_segments(scaled, u_parts, u, segs), new


LAMB = Algorithm(
    "LAMB",
    record="LambState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_avg_sq": state("second moments.", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    elementwise=False,
    tensorwise=True,
    segmentwise=True,
    params_required="lamb",
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`lamb` (the moments and step counts of Adam).",
)
LambState = LAMB.state


@LAMB.public
def lamb(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-6,
    weight_decay: NonNeg = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """LAMB: Adam's bias-corrected direction plus decoupled weight decay, rescaled per tensor by ``||p|| / ||u||``
    (the rule is in the module docstring).

    Args:
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (after the bias correction, as torch.optim.Adam).
      weight_decay: decoupled weight decay, added to the direction before the trust ratio.

    Example::

        tx = pureopt.lamb(lr=2e-3, weight_decay=0.01)

    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020.
    """
    return LAMB.build(locals())
