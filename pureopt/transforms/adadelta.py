"""Adadelta's step (``scale_by_adadelta``) and the Adadelta algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_nonneg, resolve
from pureopt.kernels.adadelta import adadelta as adadelta_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros

__all__ = ["ScaleByAdadeltaState", "scale_by_adadelta", "adadelta_transform", "check_rho"]


class ScaleByAdadeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta` and :func:`pureopt.optimizers.adadelta.adadelta`.

    Field names follow torch.optim.Adadelta's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; kept for torch's state format, not used by the math).
      square_avg: running averages of the squared gradients.
      acc_delta: running averages of the squared steps.
    """

    num_updates: Tensor
    step: Any
    square_avg: Any
    acc_delta: Any


def check_rho(rho: float) -> None:
    """``Invalid rho value: ...`` unless ``0 <= rho <= 1`` (torch.optim.Adadelta's wording)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")


def adadelta_transform(
    lr: ScalarOrSchedule | None,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adadelta step (see :mod:`pureopt.kernels.adadelta`) as a transformation; ``lr=None`` gives
    :func:`scale_by_adadelta`."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = adadelta_kernel(
            params,
            grads,
            s["square_avg"],
            s["acc_delta"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {"step": res.step, "square_avg": res.square_avg, "acc_delta": res.acc_delta}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "square_avg": zeros(state_dtype),
        "acc_delta": zeros(state_dtype),
    }
    return kernel_transform(ScaleByAdadeltaState, fields, step, elementwise=True)


def scale_by_adadelta(
    rho: float = 0.9,
    eps: float = 1e-6,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by Adadelta's ratio of running RMS values (no learning rate, no sign flip).

    Update rule, per parameter (``v`` and ``u`` start at zero)::

        v <- rho * v + (1 - rho) * g * g
        d = sqrt(u + eps) / sqrt(v + eps) * g
        u <- rho * u + (1 - rho) * d * d
        output d

    Args:
      rho: decay rate of both running averages (0 <= rho <= 1).
      eps: added inside both square roots.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the running averages (default: the parameter's).

    Example::

        from pureopt.combine import chain
        from pureopt.transforms.scale import scale_by_learning_rate
        tx = chain(scale_by_adadelta(rho=0.95), scale_by_learning_rate(1.0))

    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    """
    check_rho(rho)
    check_nonneg(eps, "epsilon")
    return adadelta_transform(None, rho, eps, 0.0, False, impl, state_dtype)
