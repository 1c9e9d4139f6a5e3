"""Lion's sign-of-interpolated-momentum direction (``scale_by_lion``) and the Lion algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, resolve
from pureopt.kernels.lion import lion as lion_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform, zeros

__all__ = ["LionState", "lion_transform", "scale_by_lion"]


class LionState(NamedTuple):
    """State of :func:`scale_by_lion` and :func:`pureopt.optimizers.lion.lion`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      exp_avg: the momentum (an EMA of the gradients with ``beta2``).
    """

    num_updates: Tensor
    exp_avg: Any


def lion_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    weight_decay: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Lion step (see :mod:`pureopt.kernels.lion`) as a transformation; ``lr=None`` is ``scale_by_lion``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = lion_kernel(
            params,
            grads,
            s["exp_avg"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {"exp_avg": res.exp_avg}

    return kernel_transform(LionState, {"exp_avg": zeros(state_dtype)}, step, elementwise=True)


def scale_by_lion(
    betas: tuple[float, float] = (0.9, 0.99),
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace updates by Lion's direction: the sign of an interpolation of the momentum and the gradient.

    Update rule, per parameter (``m`` starts at zero)::

        u = sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g

    Args:
      betas: the interpolation weight for the step (``beta1``) and the momentum decay (``beta2``).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_lion(), pureopt.scale_by_learning_rate(1e-4))

    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """
    check_betas(betas)
    return lion_transform(None, (float(betas[0]), float(betas[1])), 0.0, False, impl, state_dtype)
