"""RAdam's rectified moments (``scale_by_radam``) and the RAdam algorithm transform on the same kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.radam import radam as radam_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros

__all__ = ["ScaleByRAdamState", "scale_by_radam", "radam_transform"]


class ScaleByRAdamState(NamedTuple):
    """State of :func:`scale_by_radam` and :func:`pureopt.optimizers.radam.radam`.

    Field names follow torch.optim.RAdam's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      exp_avg: first moments.
      exp_avg_sq: second moments.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def radam_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The RAdam step (see :mod:`pureopt.kernels.radam`) as a transformation; ``lr=None`` is ``scale_by_radam``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = radam_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "exp_avg": zeros(state_dtype),
        "exp_avg_sq": zeros(state_dtype),
    }
    return kernel_transform(ScaleByRAdamState, fields, step, elementwise=True)


def scale_by_radam(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by RAdam's rectified moment estimates (torch's eps placement and threshold).

    Update rule, per parameter with its own step count ``t``::

        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
        u = m_hat * sqrt(1 - beta2**t) / (sqrt(v) + eps) * r_t   if rho_t > 5   else   m_hat
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))

    The choice on ``rho_t`` is made per parameter with ``torch.where`` (no host synchronisation).

    Args:
      betas: decay rates of the first and second moment estimates.
      eps: added to the denominator.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_radam(), pureopt.scale_by_learning_rate(1e-3))

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    return radam_transform(None, betas, eps, 0.0, False, False, impl, state_dtype)
