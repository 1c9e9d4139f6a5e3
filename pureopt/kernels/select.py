"""Choosing the torch code path (fused / foreach / per-tensor loop) for the tensors at hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Impl", "IMPLS", "check_impl", "functorch_active", "choose_impl"]

Impl = Literal["auto", "loop", "foreach", "fused"]
IMPLS: tuple[str, ...] = ("auto", "loop", "foreach", "fused")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def check_impl(impl: str) -> None:
    """Raise a ValueError for an unknown ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r}; expected one of {', '.join(repr(i) for i in IMPLS)}")


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running: ``_foreach_*``/fused ops can't."""
    return bool(torch._C._are_functorch_transforms_active())


def _foreach_legal(tensors: Sequence[Tensor]) -> bool:
    if functorch_active():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # differentiating through the update: keep to ops with plain autograd formulas
    return all(type(t) in _PLAIN_TYPES and t.layout == torch.strided for t in tensors)


def choose_impl(impl: str, tensors: Sequence[Tensor], *, fused_available: bool = False) -> str:
    """Resolve ``impl`` to ``"fused"``, ``"foreach"`` or ``"loop"`` for ``tensors``.

    ``"auto"`` takes the fused path when ``fused_available`` (the caller made a fused plan, see
    :func:`pureopt.kernels.fused.fused_plan`, which checks legality), else foreach where legal, else the per-tensor
    loop. An explicit request that is not legal for these tensors raises a clear error.
    """
    if impl == "loop" or not tensors:
        return "loop"
    if fused_available and impl in ("auto", "fused"):
        return "fused"  # the caller has a fused plan, which it only makes for tensors the fused kernel can take
    legal = _foreach_legal(tensors)
    if impl == "auto":
        return "foreach" if legal else "loop"
    if not legal:
        reason = (
            "a torch.func transform is active"
            if functorch_active()
            else "the update is being differentiated or the tensors are not plain strided tensors"
        )
        raise RuntimeError(f"impl={impl!r} cannot run here because {reason}; use impl='auto' or impl='loop'")
    if impl == "fused" and not fused_available:
        raise RuntimeError("impl='fused' is not available for this algorithm and these tensors")
    return impl
