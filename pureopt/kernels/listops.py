"""Elementwise operations over lists of tensors, with a per-tensor and a ``torch._foreach_*`` backend.

Each algorithm's math is written once against :class:`ListOps`; the backend decides which torch calls run:

* ``ListOps(foreach=False)``: one ordinary torch call per tensor. Works under every ``torch.func`` transform
  (vmap, grad, jvp) and with autograd through the update.
* ``ListOps(foreach=True)``: one ``torch._foreach_*`` call per operation for the whole list.

Every operation takes ``inplace``: when ``True`` the first list is overwritten and returned (allowed only on
buffers the caller owns: temporaries the kernel created, or donated state), otherwise new tensors are returned.
Kernels must always use the returned lists (``FUNCTIONAL`` ignores ``inplace``; see :func:`ops_for`).

A *scalar* argument may be a Python number, a 0-d tensor (shared by all tensors) or a list with one Python
number or 0-d tensor per tensor (a list of numbers is what the applied CPU path passes: see
:func:`pureopt.kernels.common.on_host`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ListOps", "Scalar", "LOOP", "FOREACH", "FUNCTIONAL", "ops_for", "Scratch", "ScratchOps"]

Scalar = float | Tensor | Sequence[float | Tensor]


def _per(s: Scalar, n: int) -> Sequence[float | Tensor]:
    if isinstance(s, (list, tuple)):
        return s
    return [s] * n  # type: ignore[list-item]


def _values(value: float | Sequence[float], n: int) -> Sequence[float]:
    return value if isinstance(value, (list, tuple)) else [value] * n  # type: ignore[list-item]


def _is_list(s: Scalar) -> bool:
    return isinstance(s, (list, tuple))


def _foreach_arg(s: Scalar) -> Any:
    """``s`` as a ``torch._foreach_*`` scalar argument (a number, a 0-d tensor, a list of 0-d tensors or a list of
    numbers), or ``None`` for a list mixing numbers and tensors (then the ops run tensor by tensor)."""
    if not _is_list(s):
        return s
    kinds = {isinstance(v, Tensor) for v in s}  # type: ignore[union-attr]
    return list(s) if len(kinds) <= 1 else None  # type: ignore[arg-type]


class ListOps:
    """Out-of-place / in-place elementwise ops over tensor lists (see module docstring)."""

    def __init__(self, foreach: bool, inplace_ok: bool = True) -> None:
        self.foreach = foreach
        self.inplace_ok = inplace_ok

    # --- binary with a scalar -------------------------------------------------------------------------------
    def _map_scalar(self, name: str, xs: list[Tensor], s: Scalar, arg: Any, inplace: bool) -> list[Tensor]:
        """``torch.<name>(x, s)`` of each tensor: one ``torch._foreach_<name>`` call with ``arg`` where it is not
        ``None`` (the foreach backend, a scalar argument it takes), else tensor by tensor."""
        in_place = inplace and self.inplace_ok
        if arg is not None:
            if in_place:
                getattr(torch, f"_foreach_{name}_")(xs, arg)
                return xs
            return list(getattr(torch, f"_foreach_{name}")(xs, arg))
        fn = getattr(Tensor, f"{name}_") if in_place else getattr(torch, name)
        return [fn(x, v) for x, v in zip(xs, _per(s, len(xs)))]

    def mul(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x * s``."""
        return self._map_scalar("mul", xs, s, _foreach_arg(s) if self.foreach else None, inplace)

    def div(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x / s``."""
        return self._map_scalar("div", xs, s, _foreach_arg(s) if self.foreach else None, inplace)

    def add_scalar(self, xs: list[Tensor], s: Scalar, inplace: bool = False) -> list[Tensor]:
        """``x + s``."""
        numbers = not _is_list(s) or not any(isinstance(v, Tensor) for v in s)  # type: ignore[union-attr]
        return self._map_scalar("add", xs, s, s if self.foreach and numbers else None, inplace)

    # --- binary with a list -----------------------------------------------------------------------------------
    def _map_lists(
        self, name: str, xs: list[Tensor], *others: Sequence[Tensor], inplace: bool, **kw: Any
    ) -> list[Tensor]:
        """``torch.<name>(x, *partners, **kw)`` of each tensor with its partners (one entry per tensor in each of
        ``others``): one ``torch._foreach_<name>`` call on the foreach backend; ``Tensor.<name>_`` when ``inplace``
        is asked for and allowed."""
        ys = [o if isinstance(o, list) else list(o) for o in others]
        in_place = inplace and self.inplace_ok
        if self.foreach:
            if in_place:
                getattr(torch, f"_foreach_{name}_")(xs, *ys, **kw)
                return xs
            return list(getattr(torch, f"_foreach_{name}")(xs, *ys, **kw))
        fn = getattr(Tensor, f"{name}_") if in_place else getattr(torch, name)
        if len(ys) == 1:  # (the common case without unpacking per tensor)
            return [fn(x, y, **kw) for x, y in zip(xs, ys[0])]
        return [fn(*args, **kw) for args in zip(xs, *ys)]

    def add(self, xs: list[Tensor], ys: Sequence[Tensor], alpha: float = 1.0, inplace: bool = False) -> list[Tensor]:
        """``x + alpha * y`` (``alpha`` a Python number)."""
        return self._map_lists("add", xs, ys, inplace=inplace, alpha=alpha)

    def sub(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x - y``."""
        return self._map_lists("sub", xs, ys, inplace=inplace)

    def mul_list(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x * y`` elementwise."""
        return self._map_lists("mul", xs, ys, inplace=inplace)

    def div_list(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``x / y`` elementwise."""
        return self._map_lists("div", xs, ys, inplace=inplace)

    def lerp(
        self, xs: list[Tensor], ys: Sequence[Tensor], weight: float | Sequence[Tensor], inplace: bool = False
    ) -> list[Tensor]:
        """``x + weight * (y - x)`` (``weight`` a Python number or one 0-d tensor per tensor)."""
        w: Any = list(weight) if _is_list(weight) else weight  # type: ignore[arg-type]
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_lerp_(xs, list(ys), w)
                return xs
            return list(torch._foreach_lerp(xs, list(ys), w))
        per = _per(weight, len(xs))
        if inplace and self.inplace_ok:
            return [x.lerp_(y, v) for x, y, v in zip(xs, ys, per)]
        return [torch.lerp(x, y, v) for x, y, v in zip(xs, ys, per)]

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
    def _addc(
        self, name: str, xs: list[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], value: Any, inplace: bool
    ) -> list[Tensor]:
        """``torch.<name>`` (``addcmul`` / ``addcdiv``) with ``value`` a Python number or one per tensor."""
        if not self.foreach:
            fn = getattr(Tensor, f"{name}_") if inplace and self.inplace_ok else getattr(torch, name)
            return [fn(x, y, z, value=c) for x, y, z, c in zip(xs, ys, zs, _values(value, len(xs)))]
        if _is_list(value):  # (torch._foreach_addc*(..., scalars) takes a list positionally, a number as value=)
            return self._map_lists(name, xs, ys, zs, list(value), inplace=inplace)
        return self._map_lists(name, xs, ys, zs, inplace=inplace, value=value)

    def addcmul(
        self,
        xs: list[Tensor],
        ys: Sequence[Tensor],
        zs: Sequence[Tensor],
        value: float | Sequence[float] = 1.0,
        inplace: bool = False,
    ) -> list[Tensor]:
        """``x + value * y * z`` (``value`` a Python number, or one per tensor)."""
        return self._addc("addcmul", xs, ys, zs, value, inplace)

    def addcdiv(
        self,
        xs: list[Tensor],
        ys: Sequence[Tensor],
        zs: Sequence[Tensor],
        value: float | Sequence[float] = 1.0,
        inplace: bool = False,
    ) -> list[Tensor]:
        """``x + value * y / z`` (``value`` a Python number, or one per tensor)."""
        return self._addc("addcdiv", xs, ys, zs, value, inplace)

    # --- unary ------------------------------------------------------------------------------------------------
    def _map_unary(self, name: str, xs: Sequence[Tensor], inplace: bool) -> list[Tensor]:
        """``torch.<name>`` of each tensor: one ``torch._foreach_<name>`` call on the foreach backend, the
        in-place variant when ``inplace`` is asked for and allowed."""
        xs = xs if isinstance(xs, list) else list(xs)
        in_place = inplace and self.inplace_ok
        if self.foreach:
            if in_place:
                getattr(torch, f"_foreach_{name}_")(xs)
                return xs
            return list(getattr(torch, f"_foreach_{name}")(xs))
        if in_place:
            return [getattr(x, f"{name}_")() for x in xs]
        fn = getattr(torch, name)
        return [fn(x) for x in xs]

    def neg(self, xs: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        """``-x``."""
        return self._map_unary("neg", xs, inplace)

    def sqrt(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``sqrt(x)``."""
        return self._map_unary("sqrt", xs, inplace)

    def abs(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``|x|``."""
        return self._map_unary("abs", xs, inplace)

    def sign(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``sign(x)``."""
        return self._map_unary("sign", xs, inplace)

    def reciprocal(self, xs: list[Tensor], inplace: bool = False) -> list[Tensor]:
        """``1 / x`` (``torch.reciprocal``)."""
        return self._map_unary("reciprocal", xs, inplace)

    def pow(self, xs: list[Tensor], exponent: float, inplace: bool = False) -> list[Tensor]:
        """``x ** exponent`` (``exponent`` a Python number)."""
        if self.foreach:
            if inplace and self.inplace_ok:
                torch._foreach_pow_(xs, exponent)
                return xs
            return list(torch._foreach_pow(xs, exponent))
        if inplace and self.inplace_ok:
            return [x.pow_(exponent) for x in xs]
        return [torch.pow(x, exponent) for x in xs]

    def clamp(
        self, xs: list[Tensor], lo: Scalar | None = None, hi: Scalar | None = None, inplace: bool = False
    ) -> list[Tensor]:
        """``min(max(x, lo), hi)`` (``torch.clamp``; either bound may be ``None``): bounds as scalar arguments."""
        for name, bound in (("clamp_min", lo), ("clamp_max", hi)):
            if bound is None:
                continue
            per = list(_per(bound, len(xs)))
            if self.foreach and _foreach_arg(per) is not None:
                fn = getattr(torch, f"_foreach_{name}_" if inplace and self.inplace_ok else f"_foreach_{name}")
                out = fn(xs, per)
                xs = xs if out is None else list(out)
            elif inplace and self.inplace_ok:
                xs = [getattr(x, f"{name}_")(b) for x, b in zip(xs, per)]
            else:
                xs = [getattr(torch, name)(x, b) for x, b in zip(xs, per)]
            inplace = True  # (the second bound works on the first one's result)
        return xs

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


# --- temporaries from reused buffers (the chunked, applied CPU path) -------------------------------------------


class Scratch:
    """Memory for the temporaries of one chunk of a kernel at a time, carved from flat buffers that are kept (per
    thread, device and dtype) and reused chunk after chunk and step after step.

    Freshly allocated temporaries of a few MB are often handed back to the OS by glibc when freed (its trim and
    mmap thresholds), so every chunk would page-fault its temporaries in again; these buffers stay mapped.
    :meth:`take` hands out views; :meth:`reset` makes all of them free again (the caller must be done with them).
    """

    _local = threading.local()

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._used: dict[tuple[torch.device, torch.dtype], int] = {}
        # the views handed out for a layout, by (offsets before, layout): chunks and steps repeat their layouts
        self._views: dict[tuple[Any, ...], tuple[list[Tensor], dict[tuple[torch.device, torch.dtype], int]]] = {}
        self.active = False

    @classmethod
    def acquire(cls) -> Scratch:
        """This thread's scratch space (a fresh one if it is in use: a chunked kernel inside another)."""
        mine: Scratch | None = getattr(cls._local, "scratch", None)
        if mine is None:
            mine = cls._local.scratch = cls()
        return cls() if mine.active else mine

    def take(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Uninitialised contiguous tensors shaped like ``like`` (same dtypes and devices), not overlapping each
        other or anything taken since the last :meth:`reset`; 64-byte aligned."""
        key = (tuple(self._used.items()), tuple((t.device, t.dtype, t.shape) for t in like))
        hit = self._views.get(key)
        if hit is not None:
            self._used = dict(hit[1])
            return hit[0]
        out = []
        for t in like:
            dk = (t.device, t.dtype)
            n = t.numel()
            align = max(1, 64 // t.element_size())
            start = -(-self._used.get(dk, 0) // align) * align
            buf = self._buffers.get(dk)
            if buf is None or buf.numel() < start + n:  # grow; views handed out keep the old buffer alive
                size = max(start + n, 2 * buf.numel() if buf is not None else 0)
                buf = self._buffers[dk] = torch.empty(size, dtype=t.dtype, device=t.device)
                self._views.clear()
            self._used[dk] = start + n
            out.append(buf[start : start + n].view(t.shape))
        if len(self._views) > 1024:  # layouts of many different models: start over
            self._views.clear()
        self._views[key] = (out, dict(self._used))
        return out

    def reset(self) -> None:
        """Everything taken so far is free again."""
        self._used = {}


class ScratchOps(ListOps):
    """A backend whose out-of-place results are written into :class:`Scratch` memory (``torch.<op>(..., out=)``,
    tensor by tensor, which on CPU costs what a ``torch._foreach_*`` call does) instead of new tensors; in-place
    ops are the base backend's. Used by :func:`pureopt.kernels.common.elementwise` on the chunked path."""

    def __init__(self, base: ListOps, scratch: Scratch) -> None:
        super().__init__(base.foreach, base.inplace_ok)
        self.scratch = scratch

    def _into(
        self, op: Callable[..., Tensor], xs: Sequence[Tensor], *args: Sequence[Any], **kwargs: Sequence[Any]
    ) -> list[Tensor]:
        """``op(xs[i], *(a[i] for a in args), out=scratch_i, **{k: v[i]})`` for each tensor: ``args`` and the
        keyword values hold one entry per tensor."""
        outs = self.scratch.take(xs)
        return [
            op(x, *(a[i] for a in args), out=o, **{k: v[i] for k, v in kwargs.items()})
            for i, (x, o) in enumerate(zip(xs, outs))
        ]

    def _unary(self, op: Callable[..., Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
        """``op(x)`` for each tensor, written into scratch memory."""
        return self._into(op, xs)

    def _map_scalar(self, name: str, xs: list[Tensor], s: Scalar, arg: Any, inplace: bool) -> list[Tensor]:
        if inplace:
            return super()._map_scalar(name, xs, s, arg, True)
        return self._into(getattr(torch, name), xs, _per(s, len(xs)))

    def _map_lists(
        self, name: str, xs: list[Tensor], *others: Sequence[Tensor], inplace: bool, **kw: Any
    ) -> list[Tensor]:
        if inplace:
            return super()._map_lists(name, xs, *others, inplace=True, **kw)
        return self._into(getattr(torch, name), xs, *others, **{k: [v] * len(xs) for k, v in kw.items()})

    def lerp(
        self, xs: list[Tensor], ys: Sequence[Tensor], weight: float | Sequence[Tensor], inplace: bool = False
    ) -> list[Tensor]:
        if inplace:
            return super().lerp(xs, ys, weight, True)
        return self._into(torch.lerp, xs, ys, _per(weight, len(xs)))

    def maximum(self, xs: list[Tensor], ys: Sequence[Tensor], inplace: bool = False) -> list[Tensor]:
        return super().maximum(xs, ys, True) if inplace else self._into(torch.maximum, xs, ys)

    def _addc(
        self, name: str, xs: list[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], value: Any, inplace: bool
    ) -> list[Tensor]:
        if inplace:
            return super()._addc(name, xs, ys, zs, value, True)
        return self._into(getattr(torch, name), xs, ys, zs, value=_values(value, len(xs)))

    def _map_unary(self, name: str, xs: Sequence[Tensor], inplace: bool) -> list[Tensor]:
        return super()._map_unary(name, xs, True) if inplace else self._unary(getattr(torch, name), xs)

    def pow(self, xs: list[Tensor], exponent: float, inplace: bool = False) -> list[Tensor]:
        return super().pow(xs, exponent, True) if inplace else self._into(torch.pow, xs, [exponent] * len(xs))

    def clamp(
        self, xs: list[Tensor], lo: Scalar | None = None, hi: Scalar | None = None, inplace: bool = False
    ) -> list[Tensor]:
        if inplace:
            return super().clamp(xs, lo, hi, True)
        return super().clamp(self.clone(xs), lo, hi, True)

    def clone(self, xs: Sequence[Tensor]) -> list[Tensor]:
        return [o.copy_(x) for x, o in zip(xs, self.scratch.take(xs))]
