"""Choosing the torch code path (fused / foreach / per-tensor loop) for the tensors at hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "Impl",
    "IMPLS",
    "check_impl",
    "functorch_active",
    "choose_impl",
    "foreach_problem",
    "differentiating",
    "autograd_recording",
    "mark_differentiating",
    "grad_hyperparameter_probe",
]

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


_DIFFERENTIATING = [False]
"""Set (by :func:`differentiating`) while a transform steps tensors that autograd records: a parameter, a state
tensor or a hyperparameter (e.g. a tensor ``lr``) requires grad. The kernels then keep to the per-tensor path,
whose ops all have autograd formulas and never overwrite a tensor saved for backward."""
_DEPTH = [0]


class differentiating:
    """Context manager: while active with ``flag``, kernel selection takes the per-tensor path."""

    def __init__(self, flag: bool) -> None:
        self.flag = flag

    def __enter__(self) -> None:
        self.previous = _DIFFERENTIATING[0]
        _DIFFERENTIATING[0] = self.previous or self.flag
        _DEPTH[0] += 1

    def __exit__(self, *exc: object) -> None:
        _DIFFERENTIATING[0] = self.previous
        _DEPTH[0] -= 1


def autograd_recording(tensors: Sequence[object]) -> bool:
    """Whether autograd is recording and any of ``tensors`` (non-tensors ignored) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def records_autograd(*lists: Sequence[Any] | None) -> bool:
    """Whether autograd records through the tensors of these lists (``None`` lists skipped): the update is being
    differentiated. Kernels then avoid every in-place op, even on their own temporaries: an op like ``sqrt`` saves
    its output for the backward pass, and writing into it afterwards would break that."""
    return autograd_recording([t for ts in lists if ts is not None for t in ts])


def mark_differentiating(value: object) -> None:
    """Note that a hyperparameter value takes part in autograd (called by ``hyperparams.resolve``)."""
    if not (isinstance(value, Tensor) and value.requires_grad):
        return
    if _PROBES:
        _PROBES[-1].seen = True
    if _DEPTH[0] and torch.is_grad_enabled():
        _DIFFERENTIATING[0] = True  # undone when the enclosing ``differentiating`` block exits


class grad_hyperparameter_probe:
    """Context manager: ``seen`` becomes true if a hyperparameter that requires grad is resolved inside it, even
    with grad mode off (:func:`pureopt.step` runs its fast path under ``torch.no_grad()`` and redoes the step on
    the differentiable path when the probe fires)."""

    def __init__(self) -> None:
        self.seen = False

    def __enter__(self) -> grad_hyperparameter_probe:
        _PROBES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _PROBES.remove(self)


_PROBES: list[grad_hyperparameter_probe] = []


def _foreach_legal(tensors: Sequence[Tensor]) -> bool:
    return foreach_problem(tensors) is None


def foreach_problem(tensors: Sequence[Tensor]) -> str | None:
    """Why the ``_foreach_*`` path cannot run on ``tensors`` (``None`` if it can), for error messages.

    torch's foreach ops take any strided memory layout (they fall back to per-tensor kernels where their fast path
    needs one layout), so only the context (transforms, autograd) and the tensor types matter.
    """
    if functorch_active():
        return "a torch.func transform is active"
    if _DIFFERENTIATING[0]:
        return "the update is being differentiated (a parameter, state or hyperparameter requires grad)"
    for i, t in enumerate(tensors):
        if type(t) not in _PLAIN_TYPES:
            return f"tensor {i} is a {type(t).__name__}, not a plain torch.Tensor{_dtensor_note(t)}"
        if t.layout != torch.strided:
            return f"tensor {i} has layout {t.layout}, not torch.strided"
    if torch.is_grad_enabled():
        for i, t in enumerate(tensors):
            if t.requires_grad:
                return f"autograd records the update (tensor {i} requires grad and grad mode is on)"
    return None


def _dtensor_note(t: object) -> str:
    """For a DTensor, when the fast kernels do run on DTensors (an explanation appended to a refusal)."""
    if type(t).__name__ != "DTensor":
        return ""
    return (
        " (torch's foreach/fused kernels run on DTensors through their local shards, for elementwise algorithms "
        "only, and only where each parameter, its gradient and its state are placed alike on one device mesh, "
        "none of them Partial: see pureopt.kernels.dtensor)"
    )


def choose_impl(impl: str, tensors: Sequence[Tensor], *, fused_available: bool = False) -> str:
    """Resolve ``impl`` to ``"fused"``, ``"foreach"`` or ``"loop"`` for ``tensors``.

    ``"auto"`` takes the fused path when ``fused_available`` (the caller made a fused plan, see
    :func:`pureopt.kernels.fused.fused_plan`, which checks legality, memory layouts included), else foreach where
    legal, else the per-tensor loop. An explicit request that is not legal for these tensors raises a clear error
    that names the reason.
    """
    if impl == "loop" or not tensors:
        return "loop"
    if fused_available and impl in ("auto", "fused"):
        return "fused"  # the caller has a fused plan, which it only makes for tensors the fused kernel can take
    legal = _foreach_legal(tensors)
    if impl == "auto":
        return "foreach" if legal else "loop"
    if not legal:
        reason = foreach_problem(tensors) or "these tensors cannot take it"
        raise RuntimeError(f"impl={impl!r} cannot run here because {reason}; use impl='auto' or impl='loop'")
    if impl == "fused" and not fused_available:
        raise RuntimeError("impl='fused' is not available for this algorithm and these tensors")
    return impl
