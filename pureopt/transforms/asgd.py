"""The averaged SGD (ASGD) algorithm transform: torch.optim.ASGD's state and step."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import resolve
from pureopt.kernels.asgd import asgd as asgd_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_dtype, step_init, zeros

__all__ = ["ASGDState", "asgd_transform"]


class ASGDState(NamedTuple):
    """State of :func:`pureopt.optimizers.asgd.asgd`; field names follow torch.optim.ASGD's state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      eta: per-parameter step sizes (0-d, torch's scalar dtype); ``lr`` until the parameter's first step.
      mu: per-parameter averaging weights (0-d, torch's scalar dtype); 1 until averaging starts after ``t0``.
      ax: per-parameter running averages of the iterates (equal to the parameters while ``mu == 1``).
    """

    num_updates: Tensor
    step: Any
    eta: Any
    mu: Any
    ax: Any


def _eta_init(lr: ScalarOrSchedule) -> LeafInitFn:
    def init(p: Tensor) -> Tensor:
        value = resolve(lr, torch.zeros((), dtype=torch.int64, device=p.device))
        if isinstance(value, Tensor):
            return value.detach().reshape(()).to(device=p.device, dtype=step_dtype()).clone()
        return torch.full((), float(value), dtype=step_dtype(), device=p.device)

    return init


def _mu_init(p: Tensor) -> Tensor:
    return torch.ones((), dtype=step_dtype(), device=p.device)


def asgd_transform(
    lr: ScalarOrSchedule,
    lambd: float,
    alpha: float,
    t0: float,
    weight_decay: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The ASGD step (see :mod:`pureopt.kernels.asgd`) as a transformation (``update`` needs ``params``)."""
    check_impl(impl)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = asgd_kernel(
            params,
            grads,
            s["ax"],
            s["eta"],
            s["mu"],
            s["step"],
            lr=resolve(lr, num_updates),
            lambd=lambd,
            alpha=alpha,
            t0=t0,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {"step": res.step, "eta": res.eta, "mu": res.mu, "ax": res.ax}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "eta": _eta_init(lr),
        "mu": _mu_init,
        "ax": zeros(state_dtype),
    }
    return kernel_transform(ASGDState, fields, step, elementwise=True)
