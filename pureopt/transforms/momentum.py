"""torch-style momentum (``trace``) and the SGD algorithm transform built on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt import kernels
from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import resolve
from pureopt.kernels.fused import mark_amp_native
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform, step_init, zeros

__all__ = ["TraceState", "trace", "sgd_transform"]


class TraceState(NamedTuple):
    """State of :func:`trace` and :func:`pureopt.sgd`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      momentum_buffer: per-parameter momentum buffers (torch's ``momentum_buffer``); ``()`` when
        ``momentum == 0``.
      step: per-parameter step counts, kept only when ``dampening != 0`` (to tell the first step apart,
        where torch copies the gradient into the buffer); ``()`` otherwise.

    A state never holds ``None`` (``torch.func.vmap`` cannot return it): a field that is not kept is ``()``.
    """

    num_updates: Tensor
    momentum_buffer: Any
    step: Any


def sgd_transform(
    lr: ScalarOrSchedule | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The SGD step (see :mod:`pureopt.kernels.sgd`) as a transformation; ``lr=None`` gives :func:`trace`."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = kernels.sgd(
            params,
            grads,
            s.get("momentum_buffer"),
            s.get("step"),
            lr=None if lr is None else resolve(lr, num_updates),
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
            grad_scale=ctx.grad_scale,
            found_inf=ctx.found_inf,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields = {
        "momentum_buffer": zeros(state_dtype) if momentum != 0 else None,
        "step": step_init if momentum != 0 and dampening != 0 else None,
    }
    return mark_amp_native(kernel_transform(TraceState, fields, step, elementwise=True))


def trace(
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """torch.optim.SGD's momentum as a building block (no learning rate, no sign flip).

    Update rule, per parameter (``b`` starts at zero; on the first step ``b <- g``)::

        b <- momentum * b + (1 - dampening) * g
        u <- g + momentum * b   if nesterov   else   b

    Args:
      momentum: momentum factor (>= 0).
      dampening: dampening of the gradient's contribution (0 for Nesterov).
      nesterov: use Nesterov momentum (Sutskever et al., 2013).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.trace(0.9, nesterov=True), pureopt.scale_by_learning_rate(0.1))
    """
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return sgd_transform(None, momentum, dampening, 0.0, nesterov, False, impl, state_dtype)
