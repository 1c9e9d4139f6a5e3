"""Helpers shared by the kernels: per-tensor scalars from step counts, complex-as-real views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "scalar_dtype",
    "per_tensor",
    "map_scalars_n",
    "cast_values",
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
    Counts on different devices are handled group by group (see :func:`map_scalars_n`).
    """
    return map_scalars_n(lambda t: (fn(t),), steps, outputs=1)[0]


def over(num: float | Tensor, den: Tensor) -> Tensor:
    """``num / den`` rounded once, as torch computes it on Python floats.

    (torch evaluates ``number / tensor`` as ``number * reciprocal(tensor)``, which rounds twice.)
    """
    return (num if isinstance(num, Tensor) else torch.full_like(den, num)) / den


def map_scalars_n(
    fn: Callable[..., tuple[Tensor, ...]],
    *columns: Sequence[Tensor],
    outputs: int,
    dtype: torch.dtype | None = None,
    like: Sequence[Tensor] | None = None,
    keep_dtype: bool = False,
) -> list[list[Tensor]]:
    """Evaluate ``fn`` on per-tensor 0-d values stacked into vectors; ``fn`` returns ``outputs`` vectors.

    Each column holds one 0-d tensor per parameter tensor. The columns are stacked (a few ops per group, not per
    tensor), converted to ``dtype`` (default: the scalar dtype, float64 where the device has it) and passed to
    ``fn``; each output vector is unbound into 0-d tensors. Values on different devices are handled device by
    device. With ``like`` (one tensor per position) each value is cast to its tensor's dtype, so that it never
    promotes a 0-d tensor it multiplies (``fp32_0d * fp64_0d`` is float64). With ``keep_dtype`` the columns are
    passed in their own dtype (for state kept as scalars, e.g. NAdam's ``mu_product``).
    """
    n = len(columns[0])
    if n == 0:
        return [[] for _ in range(outputs)]
    devices = {c.device for c in columns[0]}
    if len(devices) == 1:
        dev = columns[0][0].device
        stacked = [torch.stack([v.to(dev) for v in col]) for col in columns]
        if not keep_dtype:
            work = dtype or scalar_dtype(dev)
            stacked = [s.to(work) for s in stacked]
        results = fn(*stacked)
        like_dtypes = {t.dtype for t in like} if like is not None else set()
        if len(like_dtypes) == 1:  # one cast per output vector instead of one per value
            target = like_dtypes.pop()
            results = tuple(out.to(target) for out in results)
        if like is None:
            return [list(torch.unbind(out)) for out in results]
        return [cast_values(list(torch.unbind(out)), like) for out in results]
    result: list[list[Tensor]] | None = None
    for dev in devices:
        idx = [i for i, v in enumerate(columns[0]) if v.device == dev]
        sub_like = [like[i] for i in idx] if like is not None else None
        part = map_scalars_n(
            fn,
            *[[col[i] for i in idx] for col in columns],
            outputs=outputs,
            dtype=dtype,
            like=sub_like,
            keep_dtype=keep_dtype,
        )
        if result is None:
            result = [[torch.empty(())] * n for _ in part]
        for out, vals in zip(result, part):
            for i, v in zip(idx, vals):
                out[i] = v
    assert result is not None
    return result


def cast_values(values: list[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Each 0-d value in its partner's dtype (no op where it already is)."""
    return [v if v.dtype == t.dtype else v.to(t.dtype) for v, t in zip(values, like)]


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
