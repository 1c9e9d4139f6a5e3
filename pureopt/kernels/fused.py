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

from pureopt.kernels import select as _select
from pureopt.kernels.select import functorch_active

__all__ = ["FUSED_DEVICES", "fused_plan", "group_indices", "fused_lr", "zeros_like_all", "clone_all", "run_grouped"]

Plan = list[list[int]]
"""Indices of the tensors of each (device, dtype) group a fused kernel is called on."""

FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


_PLAIN = (Tensor, torch.nn.Parameter)


def fused_plan(inputs: Sequence[Tensor], state: Sequence[Tensor]) -> Plan | None:
    """How to run a fused kernel over these tensors, or ``None`` if torch's fused kernels can't take them.

    Legal when no torch.func transform is active, nothing is being differentiated, the ``inputs`` (gradients and
    parameters, which come from the caller) are plain strided tensors, and the ``state`` tensors (created by
    pureopt, one per gradient, in the dtype the kernel computes in) are real floating point on a device with
    fused kernels. The plan groups the indices by the state's (device, dtype), using torch's C++ grouping, so
    the per-step cost is a few checks per tensor rather than a Python loop over properties.
    """
    if not state or functorch_active() or _select._DIFFERENTIATING[0]:
        return None
    if torch.compiler.is_compiling():
        return None  # the fused ops have no fake-tensor/functionalization support: foreach traces (and fuses)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None
    if not all(type(t) in _PLAIN and t.layout == torch.strided for t in inputs):
        return None
    groups = torch._C._group_tensors_by_device_and_dtype([list(state)], True)
    plan: Plan = []
    for (device, dtype), (_, indices) in groups.items():
        if not dtype.is_floating_point or device.type not in FUSED_DEVICES:
            return None
        plan.append(list(indices))
    return plan


def group_indices(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices grouped by key (e.g. ``(device, dtype)``), in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def fused_lr(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """The ``lr`` argument for a fused kernel: a Python float, or a tensor on the kernel's device.

    torch's GPU fused kernels read a tensor lr as float32, so off the CPU it is cast to float32.
    """
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=lr.dtype if device.type == "cpu" else torch.float32)
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
    plan: Plan,
    body: Callable[[list[int]], list[Tensor] | None],
) -> list[Tensor] | None:
    """Run ``body`` on each group of indices; gather the per-group updates back in order.

    ``body`` returns the group's updates, or ``None`` when it applied them to the parameters itself. The result
    is ``None`` only if every group applied its updates.
    """
    out: list[Tensor | None] = [None] * n
    applied_all = True
    for idx in plan:
        updates = body(idx)
        if updates is not None:
            applied_all = False
            for i, u in zip(idx, updates):
                out[i] = u
    return None if applied_all else out  # type: ignore[return-value]
