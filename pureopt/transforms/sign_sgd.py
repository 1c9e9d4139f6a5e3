"""Sign-based directions (``scale_by_sign``, ``scale_by_signum``) and the signSGD / Signum algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import resolve
from pureopt.kernels.select import check_impl
from pureopt.kernels.sign_sgd import signum as signum_kernel
from pureopt.transforms._util import kernel_transform, zeros

__all__ = ["SignumState", "scale_by_sign", "scale_by_signum", "signum_transform"]


class SignumState(NamedTuple):
    """State of :func:`pureopt.optimizers.sign_sgd.sign_sgd`, :func:`~pureopt.optimizers.sign_sgd.signum` and
    the sign primitives.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      momentum_buffer: per-parameter EMAs of the gradient (Signum); ``()`` for signSGD.
    """

    num_updates: Tensor
    momentum_buffer: Any


def signum_transform(
    lr: ScalarOrSchedule | None,
    momentum: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The signSGD (``momentum == 0``) / Signum step (see :mod:`pureopt.kernels.sign_sgd`) as a transformation."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = signum_kernel(
            params,
            grads,
            s.get("momentum_buffer"),
            lr=None if lr is None else resolve(lr, num_updates),
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            compute_dtype=state_dtype,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {} if res.momentum_buffer is None else {"momentum_buffer": res.momentum_buffer}

    fields = {"momentum_buffer": zeros(state_dtype) if momentum != 0 else None}
    return kernel_transform(SignumState, fields, step, elementwise=True)


def scale_by_sign(*, impl: str = "auto") -> GradientTransformation:
    """Replace each update by its elementwise sign (``sign(0) = 0``; complex: per real component).

    Update rule: ``u <- sign(u)``.

    Example::

        sign_sgd = pureopt.chain(pureopt.scale_by_sign(), pureopt.scale_by_learning_rate(1e-3))

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    return signum_transform(None, 0.0, 0.0, False, False, impl)


def scale_by_signum(
    momentum: float = 0.9, *, impl: str = "auto", state_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Replace updates by the sign of their exponential moving average (Signum's direction).

    Update rule, per parameter (``m`` starts at zero)::

        m <- momentum * m + (1 - momentum) * u
        u <- sign(m)

    Args:
      momentum: the EMA coefficient, in [0, 1).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moving averages (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_signum(0.9), pureopt.scale_by_learning_rate(1e-4))

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    return signum_transform(None, momentum, 0.0, False, False, impl, state_dtype)
