"""NAdam's Nesterov-accelerated moments (``scale_by_nadam``) and the NAdam algorithm transform on one kernel."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.nadam import nadam as nadam_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_dtype, step_init, zeros

__all__ = ["ScaleByNAdamState", "scale_by_nadam", "nadam_transform"]


class ScaleByNAdamState(NamedTuple):
    """State of :func:`scale_by_nadam` and :func:`pureopt.optimizers.nadam.nadam`.

    Field names follow torch.optim.NAdam's per-parameter state keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      mu_product: per-parameter running products of the momentum coefficients ``mu_t`` (0-d, in the step
        count's dtype, as torch keeps them).
      exp_avg: first moments.
      exp_avg_sq: second moments.
    """

    num_updates: Tensor
    step: Any
    mu_product: Any
    exp_avg: Any
    exp_avg_sq: Any


def mu_product_init(p: Tensor) -> Tensor:
    """A state initialiser: the 0-d running product of the momentum coefficients, starting at 1."""
    return torch.ones((), dtype=step_dtype(), device=p.device)


def nadam_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The NAdam step (see :mod:`pureopt.kernels.nadam`) as a transformation; ``lr=None`` is ``scale_by_nadam``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = nadam_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s["mu_product"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "mu_product": mu_product_init,
        "exp_avg": zeros(state_dtype),
        "exp_avg_sq": zeros(state_dtype),
    }
    return kernel_transform(ScaleByNAdamState, fields, step, elementwise=True)


def scale_by_nadam(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum_decay: float = 4e-3,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by NAdam's Nesterov-style mix of the gradient and the first moment (torch's numerics).

    Update rule, per parameter with its own step count ``t``::

        mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay));   mu_product <- mu_product * mu_t
        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        d = sqrt(v / (1 - beta2**t)) + eps
        u = (1 - mu_t) / (1 - mu_product) * g / d  +  mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / d

    Args:
      betas: decay rates of the first and second moment estimates.
      eps: added to the denominator.
      momentum_decay: how fast ``mu_t`` approaches ``beta1`` (torch's ``momentum_decay``, psi in the paper).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_nadam(), pureopt.scale_by_learning_rate(2e-3))

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    check_nonneg(momentum_decay, "momentum_decay")
    return nadam_transform(None, betas, eps, 0.0, momentum_decay, False, False, impl, state_dtype)
