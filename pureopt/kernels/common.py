"""Helpers shared by the kernels: per-tensor scalars from step counts, complex-as-real views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "scalar_dtype",
    "per_tensor",
    "over",
    "scalars_for",
    "as_real",
    "as_complex_like",
    "cast_like",
    "StepScalars",
]

StepScalars = list[Tensor]


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype used for per-step scalars (bias corrections, ...): float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def per_tensor(steps: Sequence[Tensor], fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """Evaluate ``fn`` on the step counts of all tensors at once; returns one 0-d tensor per step count.

    The counts are stacked (one op), converted to float64 and mapped with ``fn``; the result is unbound
    into 0-d tensors. This avoids a host sync (no ``.item()``) and costs a few ops per group, not per tensor.
    Counts on different devices are handled group by group.
    """
    if not steps:
        return []
    devices = {s.device for s in steps}
    if len(devices) == 1:
        dev = steps[0].device
        stacked = torch.stack(list(steps)).to(scalar_dtype(dev))
        return list(torch.unbind(fn(stacked)))
    out: list[Tensor | None] = [None] * len(steps)
    for dev in devices:
        idx = [i for i, s in enumerate(steps) if s.device == dev]
        vals = per_tensor([steps[i] for i in idx], fn)
        for i, v in zip(idx, vals):
            out[i] = v
    return out  # type: ignore[return-value]


def over(num: float | Tensor, den: Tensor) -> Tensor:
    """``num / den`` rounded once, as torch computes it on Python floats.

    (torch evaluates ``number / tensor`` as ``number * reciprocal(tensor)``, which rounds twice.)
    """
    return (num if isinstance(num, Tensor) else torch.full_like(den, num)) / den


def scalars_for(scalars: Sequence[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor 0-d scalars (float64) cast to their tensor's dtype where that tensor is 0-d.

    A 0-d float64 scalar does not promote a dimensioned float32 tensor, but it does promote a 0-d one; casting
    keeps every update and state in its tensor's dtype (torch casts a Python scalar the same way).
    """
    return [s.to(t.dtype) if t.dim() == 0 and s.dtype != t.dtype else s for s, t in zip(scalars, tensors)]


def cast_like(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Cast each tensor to the dtype of its partner in ``like`` (e.g. bf16 grads to fp32 state)."""
    return [t if t.dtype == ref.dtype else t.to(ref.dtype) for t, ref in zip(tensors, like)]


def as_real(tensors: Sequence[Tensor | None]) -> list[Tensor]:
    """View complex tensors as real ``(..., 2)`` tensors (torch.optim's treatment of complex params)."""
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]  # type: ignore[misc]


def as_complex_like(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Undo :func:`as_real` for the positions where ``like`` is complex."""
    return [torch.view_as_complex(t) if ref.is_complex() else t for t, ref in zip(tensors, like)]
