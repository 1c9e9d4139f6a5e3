"""Sums over all the tensors of a transformation, as 0-d tensors (no host sync): what the learning-rate-free
algorithms (Prodigy, D-Adaptation, DoG) reduce their global estimates from (internal).

Each per-tensor reduction runs in the tensor's dtype (as the references' ``torch.dot(...)`` / ``.sum()`` do); the
per-tensor results are then added in the scalar dtype (float64 where the device has it, as the references add
them in Python floats) on the device of the global state they feed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from pureopt.kernels import common
from pureopt.kernels.common import on_host, scalar_dtype
from pureopt.kernels.listops import ListOps, Scratch, ScratchOps

__all__ = [
    "total",
    "dot_total",
    "abs_total",
    "sq_total",
    "norm_total",
    "like_scalar",
    "on_host_scalars",
    "number",
    "reused_temporaries",
]


def total(values: Sequence[Tensor], like: Tensor) -> Tensor:
    """``sum(values)`` (0-d tensors) in ``like``'s dtype and device; ``0`` for no values."""
    if not values:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.stack([v.to(device=like.device, dtype=like.dtype) for v in values]).sum()


def _dot(x: Tensor, y: Tensor) -> Tensor:
    if type(x) is Tensor and type(y) is Tensor and x.dtype == y.dtype and not x.is_complex():
        return torch.dot(x.reshape(-1), y.reshape(-1))  # one pass, no temporary (the references' torch.dot)
    return torch.sum(x * y)


def dot_total(ops: ListOps, xs: Sequence[Tensor], ys: Sequence[Tensor], like: Tensor) -> Tensor:
    """``sum_i <x_i, y_i>`` over all tensors."""
    return total([_dot(x, y) for x, y in zip(xs, ys)], like)


def on_host_scalars(apply: bool, tensors: Sequence[Tensor]) -> bool:
    """Whether the step may read its global scalars (``d``, step sizes) to the host as Python numbers, so that torch's
    ops take them as ``alpha=`` / ``value=`` arguments (fused passes) as the references do: the applied CPU path only
    (see :func:`pureopt.kernels.common.on_host`; never pure, compiled, on meta or accelerator tensors)."""
    return on_host(apply, tensors) and all(type(t) is Tensor for t in tensors)


def number(value: Tensor, host: bool) -> Tensor | float:
    """``value`` as a Python float when ``host`` (see :func:`on_host_scalars`), else as it is."""
    return float(value) if host else value


def abs_total(ops: ListOps, xs: Sequence[Tensor], like: Tensor) -> Tensor:
    """``sum_i ||x_i||_1`` over all tensors (one ``torch._foreach_norm`` call on the foreach backend)."""
    if ops.foreach and xs:
        return total(list(torch._foreach_norm(list(xs), 1)), like)
    return total([torch.sum(torch.abs(x)) for x in xs], like)


def _norms(ops: ListOps, xs: Sequence[Tensor]) -> list[Tensor]:
    if ops.foreach and xs:
        return list(torch._foreach_norm(list(xs)))
    return [torch.linalg.vector_norm(x) for x in xs]


def sq_total(ops: ListOps, xs: Sequence[Tensor], like: Tensor) -> Tensor:
    """``sum_i ||x_i||_2^2`` over all tensors (one ``torch._foreach_norm`` call on the foreach backend)."""
    if not xs:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    norms = torch.stack([n.to(device=like.device, dtype=like.dtype) for n in _norms(ops, xs)])
    return (norms * norms).sum()


def norm_total(ops: ListOps, xs: Sequence[Tensor], like: Tensor) -> Tensor:
    """``||(||x_1||, ||x_2||, ...)||_2``: the 2-norm of all tensors taken as one vector (DoG's distances)."""
    if not xs:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.linalg.vector_norm(torch.stack([n.to(device=like.device, dtype=like.dtype) for n in _norms(ops, xs)]))


def like_scalar(device: torch.device) -> torch.dtype:
    """The dtype of the global estimates on ``device`` (float64 where the device has it)."""
    return scalar_dtype(device)


@contextlib.contextmanager
def reused_temporaries(ops: ListOps, tensors: Sequence[Tensor], enabled: bool) -> Iterator[ListOps]:
    """``ops`` whose out-of-place results come from reused :class:`~pureopt.kernels.listops.Scratch` memory, while
    the block runs: for a step over whole lists (not chunked) on the applied CPU path (``enabled``; the state is
    updated in place and nothing computed escapes the step), when the tensors average at least
    :data:`pureopt.kernels.common.SCRATCH_MIN_BYTES` (temporaries that big are otherwise page-faulted in again every
    step: glibc hands them back to the OS when a whole list of them is freed). ``ops`` already over scratch memory
    (a chunk of :func:`pureopt.kernels.common.elementwise`) are used as they are."""
    big = bool(tensors) and sum(t.numel() * t.element_size() for t in tensors) >= common.SCRATCH_MIN_BYTES * len(
        tensors
    )
    if not (enabled and big and common.SCRATCH) or isinstance(ops, ScratchOps):  # (chunked: the chunk's own)
        yield ops
        return
    scratch = Scratch.acquire()
    scratch.active = True
    try:
        yield ScratchOps(ops, scratch)
    finally:
        scratch.reset()
        scratch.active = False


R = TypeVar("R")


def scratch_math(math: Callable[[Any, ListOps], R]) -> Callable[[Any], R]:
    """An algorithm's ``math(k, ops)`` as ``math(k)``, run with :func:`reused_temporaries` ops over ``k.g`` (enabled
    on the applied CPU path, :func:`on_host_scalars`)."""

    @functools.wraps(math)
    def run(k: Any) -> R:
        with reused_temporaries(k.ops, k.g, on_host_scalars(k.apply, k.g)) as ops:
            return math(k, ops)

    return run
