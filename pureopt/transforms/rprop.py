"""Rprop's sign-based adaptive steps (``scale_by_rprop``) and the Rprop algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import is_schedule, resolve
from pureopt.kernels.rprop import rprop as rprop_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, state_dtype_for, step_init, zeros

__all__ = ["ScaleByRpropState", "scale_by_rprop", "rprop_transform", "check_etas", "check_step_sizes"]


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop` and :func:`pureopt.optimizers.rprop.rprop`.

    Field names follow torch.optim.Rprop's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      prev: the previous gradients, zeroed where their sign changed.
      step_size: the per-element step sizes (initialised to the learning rate; for complex parameters both
        the real and the imaginary part, as torch).
    """

    num_updates: Tensor
    step: Any
    prev: Any
    step_size: Any


def check_etas(etas: tuple[float, float]) -> None:
    """torch.optim.Rprop's check: ``0 < eta_minus < 1 < eta_plus``."""
    if not 0.0 < etas[0] < 1.0 < etas[1]:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")


def check_step_sizes(step_sizes: tuple[float, float]) -> None:
    """``0 <= step_size_min <= step_size_max`` (torch does not check; a reversed pair is surely a mistake)."""
    if not 0.0 <= step_sizes[0] <= step_sizes[1]:
        raise ValueError(f"Invalid step_sizes: {step_sizes[0]}, {step_sizes[1]} (expected 0 <= min <= max)")


def rprop_transform(
    lr: ScalarOrSchedule,
    etas: tuple[float, float],
    step_sizes: tuple[float, float],
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
    negate: bool = True,
) -> GradientTransformation:
    """The Rprop step (see :mod:`pureopt.kernels.rprop`) as a transformation.

    ``lr`` is the initial step size. A tensor or scheduled ``lr`` is read again when a parameter takes its
    first step (torch initialises its state lazily, with the learning rate of that moment). ``negate=False``
    returns the positive step ``sign(g) * step_size`` (:func:`scale_by_rprop`).
    """
    check_impl(impl)
    etaminus, etaplus = float(etas[0]), float(etas[1])
    step_size_min, step_size_max = float(step_sizes[0]), float(step_sizes[1])
    dynamic = isinstance(lr, Tensor) or is_schedule(lr)

    def size_init(p: Tensor) -> Tensor:
        sizes = torch.zeros_like(p, dtype=state_dtype_for(p, state_dtype))
        real = torch.view_as_real(sizes) if sizes.is_complex() else sizes
        first = resolve(lr, torch.zeros((), dtype=torch.int64, device=p.device))
        if isinstance(first, Tensor):
            real.add_(first.to(real.dtype))
        else:
            real.fill_(first)
        return sizes

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = rprop_kernel(
            grads,
            s["prev"],
            s["step_size"],
            s["step"],
            etaminus=etaminus,
            etaplus=etaplus,
            step_size_min=step_size_min,
            step_size_max=step_size_max,
            maximize=maximize,
            first_step_size=resolve(lr, num_updates) if dynamic else None,
            negate=negate,
            impl=impl,
            donate=ctx.donate,
            params=params,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    fields: dict[str, LeafInitFn | None] = {"step": step_init, "prev": zeros(state_dtype), "step_size": size_init}
    return kernel_transform(ScaleByRpropState, fields, step, elementwise=True)


def scale_by_rprop(
    initial_step_size: float = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace each update by its sign times a per-element step size adapted from sign agreement (Rprop).

    Update rule, per element (``s`` starts at ``initial_step_size``, ``prev`` at zero)::

        q = sign(g * prev)
        s <- clamp(s * (eta_plus if q > 0 else eta_minus if q < 0 else 1), *step_sizes)
        g <- 0 where q < 0;   prev <- g
        u = sign(g) * s

    The result points along the gradient: chain with ``scale(-1.0)`` to descend (``pureopt.rprop`` does).

    Args:
      initial_step_size: the step size every element starts from.
      etas: ``(eta_minus, eta_plus)``, the factors applied after a sign change and after a sign agreement
        (``0 < eta_minus < 1 < eta_plus``).
      step_sizes: ``(min, max)`` bounds of the step sizes.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of ``prev`` and ``step_size`` (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_rprop(1e-3), pureopt.scale(-1.0))

    Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
    1993.
    """
    if not 0.0 <= initial_step_size:
        raise ValueError(f"Invalid initial step size: {initial_step_size}")
    check_etas(etas)
    check_step_sizes(step_sizes)
    return rprop_transform(initial_step_size, etas, step_sizes, False, impl, state_dtype, negate=False)
