"""Elementwise operations over lists of tensors, with a per-tensor and a ``torch._foreach_*`` backend.

Each algorithm's math is written once against :class:`ListOps`; the backend decides which torch calls run:

* ``ListOps(foreach=False)``: one ordinary torch call per tensor. Works under every ``torch.func`` transform
  (vmap, grad, jvp) and with autograd through the update.
* ``ListOps(foreach=True)``: one ``torch._foreach_*`` call per operation for the whole list.

Every operation takes ``inplace``: when ``True`` the first list is overwritten and returned (allowed only on
buffers the caller owns: temporaries the kernel created, or donated state), otherwise new tensors are returned.
Kernels must always use the returned lists (``FUNCTIONAL`` ignores ``inplace``; see :func:`ops_for`).

A *scalar* argument may be a Python number, a 0-d tensor (shared by all tensors) or a list with one Python
number or 0-d tensor per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ListOps", "Scalar", "LOOP", "FOREACH", "FUNCTIONAL", "ops_for"]

Scalar = float | Tensor | Sequence[float | Tensor]


def _per(s: Scalar, n: int) -> Sequence[float | Tensor]:
    if isinstance(s, (list, tuple)):
        return s
    return [s] * n  # type: ignore[list-item]


def _is_list(s: Scalar) -> bool:
    return isinstance(s, (list, tuple))


class ListOps:
    """Out-of-place / in-place elementwise ops over tensor lists (see module docstring)."""

    def __init__(self, foreach: bool, inplace_ok: bool = True) -> None:
        self.foreach = foreach
        self.inplace_ok = inplace_ok

    # --- binary with a scalar -------------------------------------------------------------------------------
    def mul(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x * s``."""
        if self.foreach and not (_is_list(s) and not all(isinstance(v, Tensor) for v in s)):  # type: ignore[union-attr]
            arg: Any = list(s) if _is_list(s) else s  # type: ignore[arg-type]
            if inplace and self.inplace_ok:
                torch._foreach_mul_(xs, arg)
                return xs
            return list(torch._foreach_mul(xs, arg))
        per = _per(s, len(xs))
        if inplace and self.inplace_ok:
            return [x.mul_(v) for x, v in zip(xs, per)]
        return [x * v for x, v in zip(xs, per)]

    def div(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x / s``."""
        if self.foreach and not (_is_list(s) and not all(isinstance(v, Tensor) for v in s)):  # type: ignore[union-attr]
            arg: Any = list(s) if _is_list(s) else s  # type: ignore[arg-type]
            if inplace and self.inplace_ok:
                torch._foreach_div_(xs, arg)
                return xs
            return list(torch._foreach_div(xs, arg))
        per = _per(s, len(xs))
        if inplace and self.inplace_ok:
            return [x.div_(v) for x, v in zip(xs, per)]
        return [x / v for x, v in zip(xs, per)]

    def add_scalar(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x + s``."""
        if self.foreach and not _is_list(s):
            if inplace and self.inplace_ok:
                torch._foreach_add_(xs, s)  # type: ignore[arg-type]
                return xs
            return list(torch._foreach_add(xs, s))  # type: ignore[arg-type]
        per = _per(s, len(xs))
        if inplace and self.inplace_ok:
            return [x.add_(v) for x, v in zip(xs, per)]
        return [x + v for x, v in zip(xs, per)]

    # --- binary with a list -----------------------------------------------------------------------------------
    def add(self, xs: list[Tensor], ys: Sequence[Tensor], alpha: float = 1.0, inplace: bool = False) -> list[Tensor]:
        """``x + alpha * y`` (``alpha`` a Python number)."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_add_(xs, list(ys), alpha=alpha)
                return xs
            return list(torch._foreach_add(xs, list(ys), alpha=alpha))
        if inplace and self.inplace_ok:
            return [x.add_(y, alpha=alpha) for x, y in zip(xs, ys)]
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys)]

    def sub(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x - y``."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_sub_(xs, list(ys))
                return xs
            return list(torch._foreach_sub(xs, list(ys)))
        if inplace and self.inplace_ok:
            return [x.sub_(y) for x, y in zip(xs, ys)]
        return [x - y for x, y in zip(xs, ys)]

    def mul_list(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x * y`` elementwise."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_mul_(xs, list(ys))
                return xs
            return list(torch._foreach_mul(xs, list(ys)))
        if inplace and self.inplace_ok:
            return [x.mul_(y) for x, y in zip(xs, ys)]
        return [x * y for x, y in zip(xs, ys)]

    def div_list(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x / y`` elementwise."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_div_(xs, list(ys))
                return xs
            return list(torch._foreach_div(xs, list(ys)))
        if inplace and self.inplace_ok:
            return [x.div_(y) for x, y in zip(xs, ys)]
        return [x / y for x, y in zip(xs, ys)]

    def lerp(self, xs: list[Tensor], ys: Sequence[Tensor], weight: float, inplace: bool = False) -> list[Tensor]:
        """``x + weight * (y - x)`` (``weight`` a Python number)."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_lerp_(xs, list(ys), weight)
                return xs
            return list(torch._foreach_lerp(xs, list(ys), weight))
        if inplace and self.inplace_ok:
            return [x.lerp_(y, weight) for x, y in zip(xs, ys)]
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys)]

    def maximum(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """Elementwise maximum."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_maximum_(xs, list(ys))
                return xs
            return list(torch._foreach_maximum(xs, list(ys)))
        if inplace and self.inplace_ok:
            return [torch.maximum(x, y, out=x) for x, y in zip(xs, ys)]
        return [torch.maximum(x, y) for x, y in zip(xs, ys)]

    # --- ternary ----------------------------------------------------------------------------------------------
    def addcmul(
        self,
        xs: list[Tensor],
        ys: Sequence[Tensor],
        zs: Sequence[Tensor],
        value: float = 1.0,
        inplace: bool = False,
    ) -> list[Tensor]:
        """``x + value * y * z`` (``value`` a Python number)."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_addcmul_(xs, list(ys), list(zs), value=value)
                return xs
            return list(torch._foreach_addcmul(xs, list(ys), list(zs), value=value))
        if inplace and self.inplace_ok:
            return [x.addcmul_(y, z, value=value) for x, y, z in zip(xs, ys, zs)]
        return [torch.addcmul(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]

    def addcdiv(
        self,
        xs: list[Tensor],
        ys: Sequence[Tensor],
        zs: Sequence[Tensor],
        value: float = 1.0,
        inplace: bool = False,
    ) -> list[Tensor]:
        """``x + value * y / z`` (``value`` a Python number)."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_addcdiv_(xs, list(ys), list(zs), value=value)
                return xs
            return list(torch._foreach_addcdiv(xs, list(ys), list(zs), value=value))
        if inplace and self.inplace_ok:
            return [x.addcdiv_(y, z, value=value) for x, y, z in zip(xs, ys, zs)]
        return [torch.addcdiv(x, y, z, value=value) for x, y, z in zip(xs, ys, zs)]

    # --- unary ------------------------------------------------------------------------------------------------
    def neg(self, xs: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``-x``."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_neg_(list(xs))
                return list(xs)
            return list(torch._foreach_neg(list(xs)))
        if inplace and self.inplace_ok:
            return [x.neg_() for x in xs]
        return [torch.neg(x) for x in xs]

    def sqrt(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``sqrt(x)``."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_sqrt_(xs)
                return xs
            return list(torch._foreach_sqrt(xs))
        if inplace and self.inplace_ok:
            return [x.sqrt_() for x in xs]
        return [torch.sqrt(x) for x in xs]

    def abs(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``|x|``."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_abs_(xs)
                return xs
            return list(torch._foreach_abs(xs))
        if inplace and self.inplace_ok:
            return [x.abs_() for x in xs]
        return [torch.abs(x) for x in xs]

    def sign(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``sign(x)``."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_sign_(xs)
                return xs
            return list(torch._foreach_sign(xs))
        if inplace and self.inplace_ok:
            return [x.sign_() for x in xs]
        return [torch.sign(x) for x in xs]

    def clone(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Copies that share no memory with ``xs``."""
        return [x.clone() for x in xs]

    def copy_(self, dst: list[Tensor], src: Sequence[Tensor]) -> list[Tensor]:
        """Write ``src`` into ``dst`` (in place)."""
        if self.foreach:
            torch._foreach_copy_(dst, list(src))
            return dst
        for d, s in zip(dst, src):
            d.copy_(s)
        return dst


LOOP = ListOps(foreach=False)
FOREACH = ListOps(foreach=True)
FUNCTIONAL = ListOps(foreach=False, inplace_ok=False)


def ops_for(path: str) -> ListOps:
    """The backend for a resolved impl path.

    ``"foreach"`` gives :data:`FOREACH`. The per-tensor path gives :data:`FUNCTIONAL` (every op out of place) when
    a ``torch.func`` transform is active or autograd is recording — in-place ops have no batching rules under
    vmap and can invalidate tensors saved for backward — and :data:`LOOP` otherwise.
    """
    if path == "foreach":
        return FOREACH
    if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return FUNCTIONAL
    return LOOP
