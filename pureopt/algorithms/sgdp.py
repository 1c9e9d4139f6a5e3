"""SGDP: SGD with momentum whose step loses its radial component on scale-invariant weights, as ``adamp.SGDP``.

Update rule (Heo et al. 2021, Algorithm 1), per parameter ``p`` with gradient ``g`` (``b`` starts at zero)::

    b <- momentum * b + (1 - dampening) * g
    u = g + momentum * b      if nesterov   else   b
    if p has 2+ dims: (u, r) = project(p, g, u)   else r = 1
    p <- p * (1 - lr * weight_decay * r / (1 - momentum))     if weight_decay > 0
    p <- p - lr * u

``project`` is AdamP's (see :mod:`pureopt.algorithms.adamp`): per tensor, decided on the device. The weight decay
divides by ``1 - momentum`` as the reference does (the effective step of a momentum of ``momentum``), so
``momentum = 1`` with weight decay is refused.

The reference's step ``u`` *is* its momentum buffer when not ``nesterov``, and its projection subtracts in place:
the buffer keeps the projected direction. The paper (Algorithm 1) projects only the step and keeps the momentum
as it was. pureopt follows the reference (``project_momentum=True``); ``project_momentum=False`` is the paper's
rule. Unlike ``torch.optim.SGD`` the first step does not copy the
gradient into the buffer. Not elementwise nor segmentwise (the projection needs the parameter's shape). The
``scale_by_sgdp`` form returns the projected direction ``u`` (no weight decay). Oracle: ``adamp.SGDP``.

Heo, Chun, Oh, Han, Yun, Kim, Uh & Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from pureopt.algorithms._sums import scratch_math
from pureopt.algorithms.adamp import projected_step
from pureopt.algorithms.define import LR, Algorithm, Eps, Impl, Kernel, NonNeg, StateDtype, state
from pureopt.base import GradientTransformation
from pureopt.kernels.listops import ListOps

__all__ = ["SGDP", "SGDPState", "sgdp", "scale_by_sgdp"]


@scratch_math
def _math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    h = k.h
    buf = ops.add(ops.mul(k.momentum, h.momentum, inplace=k.donate), k.g, alpha=1 - h.dampening, inplace=k.donate)
    u = ops.add(ops.mul(buf, h.momentum), k.g) if h.nesterov else buf
    scale = 1.0 / (1.0 - h.momentum) if h.weight_decay > 0 else 1.0
    updates, shown = projected_step(k, ops, u, k.coef, scale, owned=h.nesterov)
    if h.project_momentum and not h.nesterov and h.delta != 0:  # the reference projects its buffer in place
        moved = [(old, new) for old, new in zip(buf, shown) if new is not old]
        if k.donate:
            for old, new in moved:
                old.copy_(new)
        else:
            buf = shown
    return updates, {"momentum": buf}


SGDP = Algorithm(
    "SGDP",
    record="SGDPState",
    dtensor=False,  # (its per-tensor / global values are plain tensors: tests/test_fsdp_registry.py)
    fields={"momentum": state("momentum buffers.")},
    math=_math,
    neutral={"momentum": 0.0, "dampening": 0.0},
    needs_params=("weight_decay", "delta"),
    elementwise=False,
    tensorwise=True,
    check_order=("lr", "momentum", "weight_decay"),
    doc="State of :func:`sgdp` and :func:`scale_by_sgdp` (the ``adamp`` package's state key).",
)
SGDPState = SGDP.state


def _check_momentum(momentum: float, weight_decay: float) -> None:
    if weight_decay > 0 and momentum >= 1:
        raise ValueError(f"Invalid momentum value: {momentum} (SGDP's weight decay divides by 1 - momentum)")


@SGDP.public
def sgdp(
    lr: LR,
    momentum: NonNeg = 0.0,
    dampening: float = 0.0,
    weight_decay: NonNeg = 0.0,
    nesterov: bool = False,
    eps: Eps = 1e-8,
    delta: NonNeg = 0.1,
    wd_ratio: NonNeg = 0.1,
    *,
    project_momentum: bool = True,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """SGDP, as ``adamp.SGDP`` (the rule is in the module docstring; the same defaults, ``lr`` required).

    Args:
      momentum: momentum factor.
      dampening: the gradient enters the buffer times ``1 - dampening``.
      weight_decay: weight decay, multiplied into the parameter before the step.
      nesterov: step along ``g + momentum * b``.
      eps: the projection's norm guard.
      delta: threshold of the scale-invariance test (``0`` turns the projection off).
      wd_ratio: factor ``r`` of the weight decay on projected tensors.
      project_momentum: without ``nesterov``, keep the projected step as the momentum buffer (the reference's
        in-place projection); ``False``: the paper's unprojected momentum.

    Example::

        tx = pureopt.sgdp(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021.
    """
    _check_momentum(momentum, weight_decay)
    return SGDP.build(locals())


@SGDP.public
def scale_by_sgdp(
    momentum: NonNeg = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    eps: Eps = 1e-8,
    delta: NonNeg = 0.1,
    wd_ratio: NonNeg = 0.1,
    *,
    project_momentum: bool = True,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by SGDP's projected momentum direction ``u`` (no weight decay; it needs the parameters for
    the projection).

    Example::

        tx = pureopt.chain(pureopt.scale_by_sgdp(momentum=0.9), pureopt.scale_by_learning_rate(0.1))
    """
    return SGDP.build(locals())
