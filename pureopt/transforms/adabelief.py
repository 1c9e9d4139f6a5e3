"""AdaBelief's belief-scaled direction (``scale_by_belief``) and the AdaBelief algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.adabelief import adabelief as adabelief_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform, step_init, zeros

__all__ = ["ScaleByBeliefState", "adabelief_transform", "scale_by_belief"]


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief` and :func:`pureopt.optimizers.adabelief.adabelief`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      exp_avg: first moments.
      exp_avg_var: the "belief" second moments, EMAs of ``(g - m)**2`` plus ``eps``.
      max_exp_avg_var: running maxima of ``exp_avg_var`` (amsgrad), else ``()``.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_var: Any
    max_exp_avg_var: Any


def adabelief_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The AdaBelief step (see :mod:`pureopt.kernels.adabelief`); ``lr=None`` is ``scale_by_belief``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = adabelief_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_var"],
            s.get("max_exp_avg_var"),
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields = {
        "step": step_init,
        "exp_avg": zeros(state_dtype),
        "exp_avg_var": zeros(state_dtype),
        "max_exp_avg_var": zeros(state_dtype) if amsgrad else None,
    }
    return kernel_transform(ScaleByBeliefState, fields, step, elementwise=True)


def scale_by_belief(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-16,
    amsgrad: bool = False,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescale updates by AdaBelief's bias-corrected first moment over the root of its "belief" moment.

    Update rule, per parameter with its own step count ``t``::

        m <- beta1 * m + (1 - beta1) * g
        s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps      (amsgrad: s_used = max over time of s)
        u = (m / (1 - beta1**t)) / (sqrt(s_used) / sqrt(1 - beta2**t) + eps)

    Args:
      betas: decay rates of the first moment and of the belief moment.
      eps: added inside the belief term (as in the paper) and to the denominator.
      amsgrad: use the running maximum of the belief moments.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_belief(), pureopt.scale_by_learning_rate(1e-3))

    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    return adabelief_transform(None, betas, eps, 0.0, True, amsgrad, False, impl, state_dtype)
