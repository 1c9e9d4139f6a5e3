"""Running torch's fused optimizer kernels (``torch._fused_adam_`` & co.) for the pure and the donated paths.

torch's fused kernels work in place: they overwrite the parameters and the state. pureopt uses them two ways:

* **donated** (``donate=True, apply=True``; the adapters and :func:`pureopt.inplace_step`): exactly as torch
  does — parameters, moments and step counts are updated in one pass.
* **pure** (``donate=False``): the state is copied first and the kernel is pointed at a zero-filled *update*
  buffer instead of the parameters. Every fused kernel computes ``param <- param - lr * direction`` without
  reading the parameter (once weight decay is folded into the gradient beforehand), so starting from zero the
  buffer ends up holding exactly the update ``-lr * direction``. Nothing passed in is modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.kernels.select import functorch_active

__all__ = ["FUSED_DEVICES", "fused_legal", "group_indices", "fused_lr", "zeros_like_all", "clone_all"]

FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def fused_legal(tensors: Sequence[Tensor]) -> bool:
    """Whether torch's fused kernels can take these tensors: real floating, plain, strided, supported device,
    no torch.func transform active, and not differentiating through the update."""
    if not tensors or functorch_active():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(
        type(t) in (Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.is_floating_point()
        and t.device.type in FUSED_DEVICES
        for t in tensors
    )


def group_indices(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices grouped by key (e.g. ``(device, dtype)``), in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def fused_lr(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """The ``lr`` argument for a fused kernel: a Python float, or a tensor on the kernel's device."""
    if isinstance(lr, Tensor):
        return lr.to(device=device)
    return float(lr)


def zeros_like_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Fresh zero buffers shaped like ``tensors``."""
    return [torch.zeros_like(t) for t in tensors]


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (the pure path must not touch the caller's state)."""
    return [t.clone() for t in tensors]


def take(xs: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    """``[xs[i] for i in idx]``."""
    return [xs[i] for i in idx]


def run_grouped(
    n: int,
    keys: Sequence[Any],
    body: Callable[[list[int]], list[Tensor] | None],
) -> list[Tensor] | None:
    """Run ``body`` on each group of indices; gather the per-group updates back in order.

    ``body`` returns the group's updates, or ``None`` when it applied them to the parameters itself. The result
    is ``None`` only if every group applied its updates.
    """
    out: list[Tensor | None] = [None] * n
    applied_all = True
    for idx in group_indices(keys).values():
        updates = body(idx)
        if updates is not None:
            applied_all = False
            for i, u in zip(idx, updates):
                out[i] = u
    return None if applied_all else out  # type: ignore[return-value]
