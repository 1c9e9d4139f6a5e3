"""Adadelta (with weight decay and maximize), as torch.optim.Adadelta.

Update rule, per parameter ``p`` with gradient ``g``, running averages ``v`` (``square_avg``) and ``u``
(``acc_delta``), both starting at zero::

    t <- t + 1                                       (kept for torch's state format; not used)
    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0
    v <- rho * v + (1 - rho) * g * g
    delta = sqrt(u + eps) / sqrt(v + eps) * g
    u <- rho * u + (1 - rho) * delta * delta
    update = -lr * delta

The ``scale_by_adadelta`` form returns ``delta`` itself. Complex tensors are viewed as real pairs, as torch.optim
does. Sparse gradients are rejected with torch.optim's message. There is no ``capturable`` flag: the update never
reads values back to the host.

Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Check, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_update, ema_of_squares, torch_grad

__all__ = ["ADADELTA", "ScaleByAdadeltaState", "adadelta", "scale_by_adadelta"]


def _rho(rho: Any, name: str) -> Any:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")
    return rho


Rho = Annotated[float, Check(_rho)]
"""``Invalid rho value: ...`` unless ``0 <= rho <= 1`` (torch.optim.Adadelta's wording)."""


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, p = k.ops, k.h, k.p
    g, _ = torch_grad(ops, k.g, p, maximize=h.maximize, weight_decay=h.weight_decay)
    v = ema_of_squares(ops, k.square_avg, g, h.rho, donate=k.donate)
    std = ops.sqrt(ops.add_scalar(v, h.eps), inplace=True)
    delta = ops.sqrt(ops.add_scalar(k.acc_delta, h.eps), inplace=True)
    delta = ops.mul_list(ops.div_list(delta, std, inplace=True), g, inplace=True)
    new = {"square_avg": v, "acc_delta": ema_of_squares(ops, k.acc_delta, delta, h.rho, donate=k.donate)}
    if k.apply:  # torch: p.add_(delta, alpha=-lr)
        add_update(ops, p, delta, k.coef, owned=True)
        return None, new
    if h.lr is None:
        return delta, new
    if p is not None and not isinstance(h.lr, Tensor):
        # p_new - p with p_new from torch's own op (p.add_(delta, alpha=-lr), a fused multiply-add), so that
        # p + update reproduces torch's parameter bit for bit whenever the subtraction is exact
        return ops.sub(ops.add(p, delta, alpha=-h.lr), p, inplace=True), new
    return ops.mul(delta, -h.lr, inplace=True), new


ADADELTA = Algorithm(
    "Adadelta",
    record="ScaleByAdadeltaState",
    fields={
        "step": step_count("per-parameter step counts (0-d float tensors; kept for torch's state format, not used)."),
        "square_avg": state("running averages of the squared gradients.", nonneg=True),
        "acc_delta": state("running averages of the squared steps.", nonneg=True),
    },
    math=_math,
    doc="State of :func:`adadelta` and :func:`scale_by_adadelta` (torch.optim.Adadelta's state keys).",
)
ScaleByAdadeltaState = ADADELTA.state


@ADADELTA.public
def adadelta(
    lr: LR = 1.0,
    rho: Rho = 0.9,
    eps: Eps = 1e-6,
    weight_decay: NonNeg = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adadelta, as ``torch.optim.Adadelta``: steps scaled by the ratio of the RMS of past steps and gradients
    (the rule is in the module docstring).

    Args:
      lr: coefficient that scales delta before it is applied (float, 0-d tensor or schedule).
      rho: coefficient of the running averages (0 <= rho <= 1).
      eps: term added inside both square roots.
      weight_decay: L2 penalty added to the gradient.

    Example::

        tx = pureopt.adadelta(lr=1.0, rho=0.95)

    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """
    return ADADELTA.build(locals())


@ADADELTA.public
def scale_by_adadelta(
    rho: Rho = 0.9, eps: Eps = 1e-6, *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Rescale updates by Adadelta's ratio of running RMS values, ``sqrt(u + eps) / sqrt(v + eps) * g`` (no
    learning rate, no sign flip).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adadelta(rho=0.95), pureopt.scale_by_learning_rate(1.0))

    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """
    return ADADELTA.build(locals())
