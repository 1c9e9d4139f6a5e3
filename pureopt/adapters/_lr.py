"""The learning rates of ``TorchOptimizer``'s groups: checked, held in 0-d tensors, refilled at each step.

Each group's transformation reads its learning rate from a 0-d tensor (``_lr_tensor``) that the step refills
from ``param_groups[i]["lr"]`` (``_lr_value`` checks it, ``_fill_lr`` writes it). Under ``torch.compile`` the
refill is the opaque custom op ``pureopt::refill_lrs`` (:func:`_refill_lrs_op`), which finds its optimizer in
the ``_LIVE_OPTIMIZERS`` registry by the key ``_KEYS`` gave it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from numbers import Number
from typing import Any, Protocol

import torch
from torch import Tensor


def _lr_value(value: Any, where: str) -> float | Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        return value
    if isinstance(value, Number) and not isinstance(value, bool):
        return float(value)  # type: ignore[arg-type]
    raise TypeError(
        f"{where}: lr must be a number or a 1-element tensor, got a {type(value).__name__} "
        "(use torch.optim.lr_scheduler to schedule it)"
    )


def _lr_tensor(value: float | Tensor, params: Sequence[Tensor]) -> Tensor:
    """The 0-d tensor a group's transformation reads its learning rate from, on the parameters' device.

    float64 on CPU (a Python float's precision: torch's CPU fused kernels then give the same bits as with a float
    lr); float32 elsewhere, the only dtype torch's CUDA fused kernels read a tensor lr in.
    """
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    out = torch.zeros((), dtype=dtype, device=device)
    with torch.no_grad():
        out.fill_(value.reshape(()) if isinstance(value, Tensor) else value)
    return out


# --- torch.compile: the learning rates, refilled when the graph runs --------------------------------------------


class _LrOwner(Protocol):
    """What :func:`_refill_lrs_op` needs of the optimizer registered under a key (a ``TorchOptimizer``)."""

    def _lr_values(self) -> list[float | Tensor]: ...


_LIVE_OPTIMIZERS: weakref.WeakValueDictionary[int, _LrOwner] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("pureopt::refill_lrs", mutates_args=("lrs",))
def _refill_lrs_op(lrs: list[Tensor], key: int) -> None:
    """Fill each group's lr tensor from ``param_groups[i]["lr"]`` of the optimizer registered under ``key``.

    Why an opaque op: inside a compiled ``step``, reading the Python float makes dynamo guard on its value (one
    recompile per lr change), and writing it into the group's 0-d float64 CPU lr tensor is lost altogether:
    dynamo gives such a tensor an ``item()`` symbol (it is how it represents unspecialized Python floats), the
    float-tensorify pass then fails on that symbol, specializes it and restarts the analysis, and the restarted
    graph treats the tensor's value as that constant — the in-place refill disappears and the first lr is applied
    for ever (SGD ended 12% off after 6 steps, AdamW 43%). Read here, at run time, the float never enters the
    graph; ``mutates_args`` orders the write before every read of the lr tensors.
    """
    owner = _LIVE_OPTIMIZERS.get(key)
    if owner is None:
        raise RuntimeError("pureopt::refill_lrs: the TorchOptimizer this graph was compiled for is gone")
    values = owner._lr_values()
    if len(values) != len(lrs):
        raise RuntimeError("pureopt::refill_lrs: the optimizer's param groups changed since the graph was compiled")
    with torch.no_grad():
        for target, value in zip(lrs, values):
            _fill_lr(target, value)


@_refill_lrs_op.register_fake
def _refill_lrs_fake(lrs: list[Tensor], key: int) -> None:
    del lrs, key


def _fill_lr(target: Tensor, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        target.copy_(value.detach().reshape(()))
    else:
        target.fill_(value)
