"""RMSprop (plain or centered, with momentum, weight decay, maximize), as torch.optim.RMSprop.

Update rule, per parameter ``p`` with gradient ``g`` (all buffers start at zero; no bias correction)::

    g <- -g                                   if maximize
    g <- g + weight_decay * p                 if weight_decay != 0
    v <- alpha * v + (1 - alpha) * g * g      (square_avg)
    m <- m + (1 - alpha) * (g - m)            if centered (grad_avg, a lerp)
    avg = sqrt(v - m * m) + eps   if centered   else   sqrt(v) + eps
    b <- momentum * b + g / avg               if momentum > 0 (momentum_buffer)
    update = -lr * b      if momentum > 0     else   -lr * g / avg

The step count is kept for the state dict (torch keeps it) but not used. The ``scale_by_rms`` form returns the
positive direction; ``chain(scale_by_rms(), trace(momentum), scale_by_learning_rate(lr))`` is torch's RMSprop with
momentum. Complex tensors are viewed as real pairs, as torch does.

Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012); Graves, "Generating
Sequences With Recurrent Neural Networks" (centered variant), 2013.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from torch import Tensor

from pureopt.algorithms.define import AS_FLOAT, LR, Algorithm, Impl, Kernel, StateDtype, nonneg, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_update, addcdiv_update, ema_of_squares, torch_grad

__all__ = ["RMSPROP", "ScaleByRmsState", "rmsprop", "scale_by_rms"]

NonNeg = Annotated[float, nonneg(), AS_FLOAT]


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    g, owned = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=h.weight_decay, own=own)
    sq = ema_of_squares(ops, k.square_avg, g, h.alpha, donate=k.donate, own=own)
    new = {"square_avg": sq}
    if h.centered:
        ga = new["grad_avg"] = ops.lerp(k.grad_avg, g, 1 - h.alpha, inplace=k.donate)
        avg = ops.sqrt(ops.addcmul(sq, ga, ga, value=-1), inplace=own)
    else:
        avg = ops.sqrt(sq)
    avg = ops.add_scalar(avg, h.eps, inplace=own)
    if h.momentum > 0:
        buf = ops.addcdiv(ops.mul(k.momentum_buffer, h.momentum, inplace=k.donate), g, avg, inplace=own)
        new["momentum_buffer"] = buf
        return add_update(ops, k.target, buf, k.coef, owned=False), new  # torch: p.add_(buf, alpha=-lr)
    return addcdiv_update(ops, k.target, g, avg, k.coef, owned=owned), new  # torch: p.addcdiv_(g, avg, value=-lr)


RMSPROP = Algorithm(
    "RMSprop",
    record="ScaleByRmsState",
    fields={
        "step": step_count(),
        "square_avg": state("running averages of the squared gradients.", nonneg=True),
        "momentum_buffer": state("momentum buffers.", when=lambda h: h.momentum > 0),
        "grad_avg": state("running averages of the gradients.", when=lambda h: h.centered),
    },
    math=_math,
    neutral={"momentum": 0.0},
    check_order=("lr", "eps", "momentum", "weight_decay", "alpha"),
    doc="State of :func:`rmsprop` and :func:`scale_by_rms` (torch.optim.RMSprop's state keys).",
)
ScaleByRmsState = RMSPROP.state


@RMSPROP.public
def rmsprop(
    lr: LR = 1e-2,
    alpha: NonNeg = 0.99,
    eps: Annotated[float, nonneg("epsilon"), AS_FLOAT] = 1e-8,
    weight_decay: NonNeg = 0.0,
    momentum: NonNeg = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop`` (the rule is in the module docstring).

    Args:
      alpha: smoothing constant of the running averages.
      eps: term added to the root of the average (outside the square root).
      weight_decay: L2 penalty added to the gradient.
      momentum: momentum factor.
      centered: normalise by an estimate of the gradient's variance instead of its raw second moment.
      state_dtype: dtype of the running averages and momentum buffer (default: the parameter's, as torch);
        e.g. ``torch.float32`` for bf16 parameters. Updates are then computed in that dtype and cast back by
        ``apply_updates``.

    Example::

        tx = pureopt.rmsprop(lr=1e-3, alpha=0.9, momentum=0.9, centered=True)

    Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012).
    """
    return RMSPROP.build(locals())


@RMSPROP.public
def scale_by_rms(
    alpha: NonNeg = 0.99,
    eps: Annotated[float, nonneg("epsilon")] = 1e-8,
    centered: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Divide updates by the root of a running average of their squares: ``g / (sqrt(v) + eps)``, or
    ``g / (sqrt(v - m**2) + eps)`` when ``centered`` (RMSprop's normalisation, torch's eps placement).

    Example::

        tx = pureopt.chain(pureopt.scale_by_rms(alpha=0.9), pureopt.scale_by_learning_rate(1e-3))
    """
    return RMSPROP.build(locals())
