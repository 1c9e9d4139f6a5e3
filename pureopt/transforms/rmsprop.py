"""RMSprop's normalisation (``scale_by_rms``) and the RMSprop algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_nonneg, resolve
from pureopt.kernels.rmsprop import rmsprop as rmsprop_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros

__all__ = ["ScaleByRmsState", "scale_by_rms", "rmsprop_transform"]


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms` and :func:`pureopt.optimizers.rmsprop.rmsprop`.

    Field names follow torch.optim.RMSprop's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      square_avg: running averages of the squared gradients.
      momentum_buffer: momentum buffers when ``momentum > 0``, else ``()``.
      grad_avg: running averages of the gradients when ``centered``, else ``()``.
    """

    num_updates: Tensor
    step: Any
    square_avg: Any
    momentum_buffer: Any
    grad_avg: Any


def rmsprop_transform(
    lr: ScalarOrSchedule | None,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The RMSprop step (see :mod:`pureopt.kernels.rmsprop`) as a transformation; ``lr=None`` is unscaled."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = rmsprop_kernel(
            params,
            grads,
            s["square_avg"],
            s.get("grad_avg"),
            s.get("momentum_buffer"),
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "square_avg": zeros(state_dtype),
        "momentum_buffer": zeros(state_dtype) if momentum > 0 else None,
        "grad_avg": zeros(state_dtype) if centered else None,
    }
    return kernel_transform(ScaleByRmsState, fields, step, elementwise=True)


def scale_by_rms(
    alpha: float = 0.99,
    eps: float = 1e-8,
    centered: bool = False,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Divide updates by the root of a running average of their squares (RMSprop's normalisation, torch's eps).

    Update rule, per parameter (``v`` and ``m`` start at zero)::

        v <- alpha * v + (1 - alpha) * g**2
        m <- alpha * m + (1 - alpha) * g                      (centered only)
        u = g / (sqrt(v - m**2) + eps)   if centered   else   g / (sqrt(v) + eps)

    There is no bias correction (as in torch.optim.RMSprop). ``chain(scale_by_rms(), trace(momentum),
    scale_by_learning_rate(lr))`` is torch's RMSprop with momentum.

    Args:
      alpha: smoothing constant of the running averages.
      eps: added to the root (outside the square root, as torch does).
      centered: normalise by an estimate of the variance (subtract the squared mean) instead of the raw
        second moment.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the running averages (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_rms(alpha=0.9), pureopt.scale_by_learning_rate(1e-3))

    Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012); Graves,
    "Generating Sequences With Recurrent Neural Networks" (centered), 2013.
    """
    check_nonneg(eps, "epsilon")
    check_nonneg(alpha, "alpha")
    return rmsprop_transform(None, alpha, eps, 0.0, 0.0, centered, False, impl, state_dtype)
