"""AdEMAMix's mixture of a fast and a slow gradient EMA (``scale_by_ademamix``) and its algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_nonneg, resolve
from pureopt.kernels.ademamix import ademamix as ademamix_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros
from pureopt.transforms.adan import check_betas3

__all__ = ["AdEMAMixState", "ademamix_transform", "check_ademamix_args", "scale_by_ademamix"]


class AdEMAMixState(NamedTuple):
    """State of :func:`scale_by_ademamix` and :func:`pureopt.optimizers.ademamix.ademamix`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (bias corrections and the alpha / beta3 warmups use them).
      exp_avg_fast: the fast EMA of the gradient (``beta1``).
      exp_avg_slow: the slow EMA of the gradient (``beta3``).
      exp_avg_sq: the EMA of the squared gradient (``beta2``).
    """

    num_updates: Tensor
    step: Any
    exp_avg_fast: Any
    exp_avg_slow: Any
    exp_avg_sq: Any


def check_ademamix_args(
    betas: tuple[float, float, float], alpha: float, eps: float, alpha_warmup: int | None, beta3_warmup: int | None
) -> None:
    """AdEMAMix's hyperparameter checks, with torch.optim's wording."""
    check_nonneg(eps, "epsilon")
    check_betas3(betas)
    check_nonneg(alpha, "alpha")
    for name, warm in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
        if warm is not None and not (isinstance(warm, int) and warm > 0):
            raise ValueError(f"Invalid {name} value: {warm}")
    if beta3_warmup is not None:
        for i in (0, 2):  # the half-life interpolation takes logarithms of beta1 and beta3
            if not betas[i] > 0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]} (beta3_warmup needs it > 0)")


def ademamix_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float, float],
    alpha: float,
    eps: float,
    weight_decay: float,
    alpha_warmup: int | None,
    beta3_warmup: int | None,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The AdEMAMix step (see :mod:`pureopt.kernels.ademamix`); ``lr=None`` is ``scale_by_ademamix``."""
    check_impl(impl)
    beta1, beta2, beta3 = (float(b) for b in betas)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = ademamix_kernel(
            params,
            grads,
            s["exp_avg_fast"],
            s["exp_avg_slow"],
            s["exp_avg_sq"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=float(alpha),
            eps=eps,
            weight_decay=weight_decay,
            alpha_warmup=alpha_warmup,
            beta3_warmup=beta3_warmup,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    zero_init = zeros(state_dtype)
    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "exp_avg_fast": zero_init,
        "exp_avg_slow": zero_init,
        "exp_avg_sq": zero_init,
    }
    return kernel_transform(AdEMAMixState, fields, step, elementwise=True)


def scale_by_ademamix(
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    alpha: float = 2.0,
    eps: float = 1e-8,
    *,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace updates by AdEMAMix's direction: (fast EMA, bias-corrected, + alpha * slow EMA) / Adam's denominator.

    Update rule, per parameter with its own step count ``t``::

        m1 <- beta1 * m1 + (1 - beta1) * g;   m2 <- beta3 * m2 + (1 - beta3) * g
        v <- beta2 * v + (1 - beta2) * g**2
        u = (m1 / (1 - beta1**t) + alpha * m2) / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    ``alpha_warmup`` / ``beta3_warmup`` (steps) turn on the paper's warmup schedulers for ``alpha`` and ``beta3``
    (see :mod:`pureopt.kernels.ademamix`).

    Example::

        tx = pureopt.chain(pureopt.scale_by_ademamix(alpha=8.0), pureopt.scale_by_learning_rate(1e-3))

    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024.
    """
    check_ademamix_args(betas, alpha, eps, alpha_warmup, beta3_warmup)
    b1, b2, b3 = (float(b) for b in betas)
    return ademamix_transform(None, (b1, b2, b3), alpha, eps, 0.0, alpha_warmup, beta3_warmup, False, impl, state_dtype)
