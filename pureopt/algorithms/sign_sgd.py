"""signSGD and Signum: steps of fixed size along the sign of the gradient (or of its running average).

Update rule (Bernstein et al. 2018, Algorithms 1 and 3), per parameter ``p`` with gradient ``g``::

    g <- -g                                   if maximize
    g <- g + weight_decay * p                 if weight_decay != 0 and not decoupled (the default)
    m <- momentum * m + (1 - momentum) * g    Signum (momentum != 0; m starts at 0), else d = g
    d = sign(m)
    update = -lr * d
    update <- update - lr * weight_decay * p  if weight_decay != 0 and decoupled

The ``scale_by_sign`` / ``scale_by_signum`` forms return ``sign(g)`` / ``sign(m)``. signSGD keeps no per-parameter
state (the state holds only the update counter); its ``state_dtype`` is the dtype the update is computed in.
Complex tensors are viewed as real pairs: the sign is taken per real component, as torch.optim.Rprop does.
``sign(0) = 0``.

Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed Optimisation for Non-Convex Problems",
ICML 2018.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Check, Impl, Kernel, NonNeg, StateDtype, state
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_decay, add_update, decay_params, torch_grad

__all__ = ["SIGNUM", "SignumState", "scale_by_sign", "scale_by_signum", "sign_sgd", "signum"]


def _momentum(value: Any, name: str) -> Any:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid momentum value: {value}")
    return value


Momentum = Annotated[float, Check(_momentum)]
"""The EMA coefficient, in ``[0, 1)``: ``Invalid momentum value: ...``."""


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    decoupled = h.weight_decay != 0 and h.decoupled_weight_decay and h.lr is not None
    coupled = 0.0 if h.decoupled_weight_decay else h.weight_decay
    g, owned = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=coupled)
    new: dict[str, list[Tensor]] = {}
    if h.momentum != 0:
        new["momentum_buffer"] = ops.lerp(k.momentum_buffer, g, 1 - h.momentum, inplace=k.donate)
        direction = ops.sign(new["momentum_buffer"])
    else:
        direction = ops.sign(g, inplace=owned)
    if k.apply:  # decoupled decay first, then p.add_(d, alpha=-lr)
        if decoupled:
            decay_params(ops, k.p, h.lr, h.weight_decay)
        add_update(ops, k.p, direction, k.coef, owned=True)
        return None, new
    if h.lr is None:
        return direction, new
    updates = ops.mul(direction, -h.lr, inplace=True)
    if decoupled:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=True)
    return updates, new


SIGNUM = Algorithm(
    "Signum",
    record="SignumState",
    fields={"momentum_buffer": state("per-parameter EMAs of the gradient (Signum).", when=lambda h: h.momentum != 0)},
    math=_math,
    neutral={"decoupled_weight_decay": False, "momentum": 0.0},
    doc="State of :func:`sign_sgd`, :func:`signum` and the sign primitives.",
)
SignumState = SIGNUM.state


@SIGNUM.public
def sign_sgd(
    lr: LR = 1e-3,
    weight_decay: NonNeg = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """signSGD: ``p <- p - lr * sign(g)`` (the rule is in the module docstring); keeps no per-parameter state.

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly instead of adding an L2 term inside the sign.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype the update is computed in (default: the gradient's).

    Example::

        tx = pureopt.sign_sgd(lr=1e-4)

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    return SIGNUM.build(locals())


@SIGNUM.public
def signum(
    lr: LR = 1e-3,
    momentum: Momentum = 0.9,
    weight_decay: NonNeg = 0.0,
    *,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Signum (signSGD with momentum): ``p <- p - lr * sign(m)``, ``m`` an EMA of the gradients (the rule is in
    the module docstring). ``momentum=0`` is :func:`sign_sgd` (and keeps no buffer).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      momentum: the EMA coefficient, in [0, 1).
      weight_decay: weight decay coefficient.
      decoupled_weight_decay: decay the weights directly instead of adding an L2 term to the gradient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's).

    Example::

        tx = pureopt.signum(lr=1e-4, momentum=0.9)

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    return SIGNUM.build(locals())


@SIGNUM.public
def scale_by_sign(*, impl: Impl = "auto") -> GradientTransformation:
    """Replace each update by its elementwise sign (``sign(0) = 0``; complex: per real component): ``u <- sign(u)``.

    Example::

        sign_sgd = pureopt.chain(pureopt.scale_by_sign(), pureopt.scale_by_learning_rate(1e-3))

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    return SIGNUM.build(locals())


@SIGNUM.public
def scale_by_signum(
    momentum: Momentum = 0.9, *, impl: Impl = "auto", state_dtype: StateDtype = None
) -> GradientTransformation:
    """Replace updates by the sign of their exponential moving average (Signum's direction):
    ``m <- momentum * m + (1 - momentum) * u``, ``u <- sign(m)``.

    Example::

        tx = pureopt.chain(pureopt.scale_by_signum(0.9), pureopt.scale_by_learning_rate(1e-4))

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    return SIGNUM.build(locals())
