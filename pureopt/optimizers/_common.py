"""Hyperparameter handling shared by the optimizer functions (internal)."""

from __future__ import annotations

from torch import Tensor

from pureopt.base import ScalarOrSchedule
from pureopt.hyperparams import check_lr

__all__ = ["Betas", "checked_lr"]

Betas = tuple[float | Tensor, float | Tensor]


def checked_lr(lr: ScalarOrSchedule) -> ScalarOrSchedule:
    """Validate ``lr`` with torch.optim's wording; a 1-element tensor becomes 0-d (read at every update)."""
    check_lr(lr)
    return lr.reshape(()) if isinstance(lr, Tensor) else lr
