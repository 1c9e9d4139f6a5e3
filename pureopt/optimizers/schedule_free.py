"""``schedule_free_sgd`` and ``schedule_free_adamw``: no learning-rate schedule, an online average instead.

See :mod:`pureopt.transforms.schedule_free` for how the training parameters (``y``, what ``update`` receives and
returns) relate to the evaluation parameters (``x``, from :func:`schedule_free_eval_params`).
"""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, check_nonneg
from pureopt.optimizers._common import Betas, checked_lr
from pureopt.transforms.schedule_free import schedule_free_eval_params, schedule_free_transform

__all__ = ["schedule_free_adamw", "schedule_free_eval_params", "schedule_free_sgd"]


def _check_schedule(warmup_steps: int, r: float, weight_lr_power: float) -> None:
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"Invalid warmup_steps value: {warmup_steps}")
    check_nonneg(r, "r")
    check_nonneg(weight_lr_power, "weight_lr_power")


def schedule_free_sgd(
    lr: ScalarOrSchedule = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-Free SGD: SGD steps on ``z``, gradients at ``y``, evaluation at the running average ``x``.

    Update rule (``k`` = number of updates so far; ``g`` the gradient at the parameters ``y``)::

        lr_k = lr * min(1, (k + 1) / warmup_steps);   lr_max = max(lr_max, lr_k)
        c = (k + 1)**r * lr_max**weight_lr_power / (sum of these weights up to now)
        d = g + weight_decay * y                                  (g <- -g first if maximize)
        y <- y + c * (z - y) + lr_k * (momentum * (1 - c) - 1) * d
        z <- z - lr_k * d

    which keeps ``y = (1 - momentum) * z + momentum * x`` with ``x <- (1 - c) * x + c * z``. Train on ``y`` (the
    parameters); evaluate at ``x = schedule_free_eval_params(state, params)``. No schedule is needed: a constant
    ``lr`` (with a short warmup) is the intended use, though a schedule or 0-d tensor is accepted.

    Args:
      lr: learning rate (the reference default is 1.0).
      momentum: ``beta``, the interpolation between ``z`` and ``x``; strictly between 0 and 1.
      weight_decay: L2 penalty evaluated at ``y``.
      warmup_steps: linear learning-rate warmup length (0: none).
      r: the averaging weights grow like ``(k + 1)**r`` (0: uniform).
      weight_lr_power: the averaging weights are proportional to ``lr_max**weight_lr_power`` (discounts warmup).
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of ``z`` (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.schedule_free_sgd(lr=0.5, warmup_steps=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)   # grads at params (y)
        params = pureopt.apply_updates(params, updates)
        eval_params = pureopt.schedule_free_eval_params(state, params)

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024.
    """
    lr = checked_lr(lr)
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum} (schedule-free needs 0 < momentum < 1)")
    check_nonneg(weight_decay, "weight_decay")
    _check_schedule(warmup_steps, r, weight_lr_power)
    return schedule_free_transform(
        lr,
        beta=float(momentum),
        adam=False,
        beta2=0.0,
        eps=0.0,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=float(r),
        weight_lr_power=float(weight_lr_power),
        maximize=maximize,
        impl=impl,
        state_dtype=state_dtype,
    )


def schedule_free_adamw(
    lr: ScalarOrSchedule = 0.0025,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-Free AdamW: as :func:`schedule_free_sgd` with Adam-normalised gradients and ``beta = betas[0]``.

    Update rule (``k`` = number of updates so far, ``t`` the parameter's own step count)::

        lr_k, c as in schedule_free_sgd
        v <- beta2 * v + (1 - beta2) * g**2
        d = g / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay * y
        y <- y + c * (z - y) + lr_k * (beta1 * (1 - c) - 1) * d
        z <- z - lr_k * d

    There is no first-moment buffer: ``beta1`` is the interpolation ``y = (1 - beta1) z + beta1 x``. Train on
    ``y`` (the parameters); evaluate at ``x = schedule_free_eval_params(state, params)``.

    Args:
      lr: learning rate (the reference default is 0.0025).
      betas: ``beta1`` (interpolation, strictly between 0 and 1) and ``beta2`` (second-moment decay).
      eps: added to the denominator.
      weight_decay: decoupled weight decay evaluated at ``y`` (multiplied by ``lr``).
      warmup_steps: linear learning-rate warmup length (0: none).
      r: the averaging weights grow like ``(k + 1)**r`` (0: uniform).
      weight_lr_power: the averaging weights are proportional to ``lr_max**weight_lr_power``.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of ``z`` and the second moments (default: the parameter's).

    Example::

        tx = pureopt.schedule_free_adamw(lr=2.5e-3, warmup_steps=1000, weight_decay=0.01)

    Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024.
    """
    lr = checked_lr(lr)
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    if not float(betas[0]) > 0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (schedule-free needs 0 < beta1 < 1)")
    check_nonneg(weight_decay, "weight_decay")
    _check_schedule(warmup_steps, r, weight_lr_power)
    return schedule_free_transform(
        lr,
        beta=float(betas[0]),
        adam=True,
        beta2=float(betas[1]),
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=float(r),
        weight_lr_power=float(weight_lr_power),
        maximize=maximize,
        impl=impl,
        state_dtype=state_dtype,
    )
