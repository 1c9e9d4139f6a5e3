"""Hyperparameter values: Python numbers, 0-d tensors or schedules, and torch.optim's validation wording."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pureopt.base import ScalarOrSchedule
from pureopt.kernels.select import mark_differentiating

__all__ = ["resolve", "is_schedule", "number", "check_lr", "check_nonneg", "check_beta", "check_betas"]


def is_schedule(value: Any) -> bool:
    """Whether ``value`` is a schedule (a callable of the step count)."""
    return callable(value) and not isinstance(value, Tensor)


def resolve(value: ScalarOrSchedule, count: Tensor) -> float | Tensor:
    """The value of a hyperparameter at step ``count``: a schedule is called, numbers and tensors pass through."""
    out = value(count) if is_schedule(value) else value  # type: ignore[operator]
    mark_differentiating(out)  # a tensor hyperparameter that requires grad: kernels keep to autograd-safe ops
    return out  # type: ignore[return-value]


def number(x: float | Tensor) -> float:
    """The number to validate; NaN (every check passes) for a tensor whose value can't be read without breaking
    a transform or a device stream: one batched by ``torch.func.vmap``, a symbolic one inside ``torch.compile``,
    a ``meta`` tensor (no value), or a CUDA tensor while a CUDA graph is being captured (a read would sync)."""
    if not isinstance(x, Tensor):
        return float(x)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return float("nan")
    if x.device.type == "meta" or (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return float("nan")
    return float(x.item())


def check_lr(lr: ScalarOrSchedule) -> None:
    """torch.optim's checks on ``lr`` (skipped for schedules, whose values are only known at run time)."""
    if is_schedule(lr):
        return
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    value = number(lr)  # type: ignore[arg-type]
    if value == value and not 0.0 <= value:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonneg(value: ScalarOrSchedule, what: str) -> None:
    """``Invalid {what} value: {value}`` unless ``value >= 0`` (torch.optim's wording)."""
    if is_schedule(value):
        return
    x = number(value)  # type: ignore[arg-type]
    if x == x and not 0.0 <= x:
        raise ValueError(f"Invalid {what} value: {value}")


def check_beta(beta: float | Tensor, index: int) -> None:
    """``Invalid beta parameter at index i`` unless ``0 <= beta < 1``."""
    x = number(beta)
    if x == x and not 0.0 <= x < 1.0:
        raise ValueError(f"Invalid beta parameter at index {index}: {beta}")


def check_betas(betas: tuple[float | Tensor, float | Tensor]) -> None:
    """Check both Adam betas with torch.optim's wording."""
    for i, beta in enumerate(betas):
        check_beta(beta, i)


def as_python_or_tensor(value: float | Tensor) -> float | Tensor:
    """A 1-element tensor as a 0-d tensor; numbers unchanged."""
    if isinstance(value, Tensor):
        return value.reshape(())
    return value
