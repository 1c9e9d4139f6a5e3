"""Running torch's fused optimizer kernels (``torch._fused_adam_`` & co.) for the pure and the donated paths.

torch's fused kernels work in place: they overwrite the parameters and the state. pureopt uses them two ways:

* **donated** (``donate=True, apply=True``; the adapters and :func:`pureopt.inplace_step`): exactly as torch
  does — parameters, moments and step counts are updated in one pass.
* **pure** (``donate=False``): the state is copied first and the kernel is pointed at a zero-filled *update*
  buffer instead of the parameters. Every fused kernel computes ``param <- param - lr * direction`` without
  reading the parameter (once weight decay is folded into the gradient beforehand), so starting from zero the
  buffer ends up holding exactly the update ``-lr * direction``. Nothing passed in is modified.

**GradScaler** (``UpdateContext.grad_scale`` / ``found_inf``, see :class:`pureopt.base.UpdateContext`): a
transformation registered with :func:`mark_amp_native` receives them and passes them to torch's kernel when its
donated step is torch's own call (:func:`amp_kwargs`; step counts are then put back with :func:`undo_steps` on a
skipped step, as torch.optim does), with no host sync. On any other path it falls back to :func:`amp_unscale`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, LeafUpdate
from pureopt.kernels import select as _select
from pureopt.kernels.listops import FOREACH
from pureopt.kernels.select import _dtensor_note, functorch_active

__all__ = [
    "FUSED_DEVICES",
    "fused_plan",
    "layout_problem",
    "group_indices",
    "fused_lr",
    "zeros_like_all",
    "folded_grads",
    "clone_all",
    "run_grouped",
    "mark_amp_native",
    "is_amp_native",
    "same_dtypes",
    "amp_kwargs",
    "undo_steps",
    "amp_unscale",
    "skipped_updates",
]

Plan = list[list[int]]
"""Indices of the tensors of each (device, dtype) group a fused kernel is called on."""

FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


_PLAIN = (Tensor, torch.nn.Parameter)
_CONTIGUOUS = Tensor.is_contiguous


def fused_plan(
    inputs: Sequence[Tensor],
    state: Sequence[Tensor],
    *more_state: Sequence[Tensor],
    impl: str = "auto",
    devices: Sequence[str] = FUSED_DEVICES,
    cpu_dtypes: Sequence[torch.dtype] | None = None,
) -> Plan | None:
    """How to run a fused kernel over these tensors, or ``None`` if torch's fused kernels can't take them.

    ``inputs`` are the gradients, followed by the parameters where the kernel reads them (``[*grads, *params]``);
    ``state`` and each of ``more_state`` hold one state tensor per gradient (``state`` in the dtype the kernel
    computes in). Legal when no torch.func transform is active, nothing is being differentiated, the inputs are
    plain strided tensors, the state is real floating point on a device with fused kernels, and every tensor has
    a memory layout the kernels handle (:func:`layout_problem`). ``devices``: the device types the algorithm's
    fused kernel exists on (torch's fused Adagrad: CPU only); ``cpu_dtypes``: the state dtypes its CPU kernel computes
    right (torch 2.13's CPU ``_fused_sgd_`` leaves bf16/fp16 tensors of 16 or more elements unchanged). With
    ``impl="fused"`` a refusal for a reason in
    the tensors themselves raises a RuntimeError that names it; otherwise (and for the reasons in the context:
    transforms, differentiation, compiling) the result is ``None`` and :func:`pureopt.kernels.select.choose_impl`
    takes another path or raises.

    The plan groups the indices by the state's (device, dtype), using torch's C++ grouping. The per-step cost is
    a few attribute checks per tensor: the common case (everything contiguous) is one pass; only a step with a
    non-contiguous tensor pays for the full layout analysis.
    """
    if not state or functorch_active() or _select._DIFFERENTIATING[0]:
        return None
    if torch.compiler.is_compiling():
        return None  # the fused ops have no fake-tensor/functionalization support: foreach traces (and fuses)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        _refuse(impl, "autograd records the update (a gradient or parameter requires grad and grad mode is on)")
        return None
    plain = all(type(t) in _PLAIN and t.layout == torch.strided for t in inputs)
    contiguous = _CONTIGUOUS
    if not (
        plain
        and all(map(contiguous, inputs))
        and all(map(contiguous, state))
        and all(all(map(contiguous, s)) for s in more_state)
    ):
        problem = layout_problem(inputs, [state, *more_state])
        if problem is not None:
            _refuse(impl, problem)
            return None
    groups = torch._C._group_tensors_by_device_and_dtype([list(state)], True)
    plan: Plan = []
    for (device, dtype), (_, indices) in groups.items():
        if cpu_dtypes is not None and device.type == "cpu" and dtype.is_floating_point and dtype not in cpu_dtypes:
            i = indices[0]
            _refuse(impl, f"the state of tensor {i} is {dtype} on cpu (this fused kernel computes wrong numbers there)")
            return None
        if not dtype.is_floating_point or device.type not in devices:
            i = indices[0]
            kind = "complex" if dtype.is_complex else str(dtype)
            where = f"on {device.type}" if dtype.is_floating_point else f"of dtype {kind}"
            _refuse(
                impl, f"the state of tensor {i} is {where} (torch's fused kernels take real floating point tensors "
                f"on {', '.join(devices)})"
            )  # fmt: skip
            return None
        plan.append(list(indices))
    return plan


def _refuse(impl: str, problem: str) -> None:
    """With an explicit ``impl="fused"``, raise a RuntimeError naming ``problem``; otherwise nothing."""
    if impl == "fused":
        raise RuntimeError(
            f"impl='fused' is not available for these tensors: {problem}; use impl='auto' (which then takes the "
            "foreach or per-tensor path), 'foreach' or 'loop'"
        )


def _roles(inputs: Sequence[Tensor], n: int) -> list[tuple[str, Sequence[Tensor]]]:
    """``inputs`` (``[*grads]`` or ``[*grads, *params]``) cut into named lists of ``n`` tensors."""
    names = ("gradient", "parameter")
    return [(names[min(k, 1)], inputs[k * n : (k + 1) * n]) for k in range(len(inputs) // n)]


def layout_problem(inputs: Sequence[Tensor], states: Sequence[Sequence[Tensor]]) -> str | None:
    """Why torch's fused kernels would compute wrong numbers (or fail) on these tensors; ``None`` if they can take
    them.

    torch's fused kernels walk each tensor's memory from its first element as one dense vector, pairing the
    ``k``-th element in memory of the parameter with the ``k``-th of its gradient and state (the CPU kernels do
    not look at strides; the multi-tensor CUDA kernels assume one layout too). So every tensor must be a plain strided
    tensor that is non-overlapping and dense (contiguous, or a permutation of it such as channels_last; any
    storage offset), and the tensors of one parameter must share its shape and strides. Refused, e.g.: a strided
    view with gaps (strides ``(10, 2)``), an expanded gradient (stride 0), a channels_last parameter with a
    contiguous gradient or state. ``inputs`` is ``[*grads]`` or ``[*grads, *params]``; each of ``states`` has one
    tensor per gradient. The message names the tensor (its index in the step) and what is wrong with it.
    """
    n = len(states[0]) if states else len(inputs)
    if n == 0:
        return None
    lists = [*_roles(inputs, n), *(("state", s) for s in states)]
    for role, tensors in lists:
        for i, t in enumerate(tensors):
            if type(t) not in _PLAIN:
                return f"the {role} of tensor {i} is a {type(t).__name__}, not a plain torch.Tensor{_dtensor_note(t)}"
            if t.layout != torch.strided:
                return f"the {role} of tensor {i} has layout {t.layout}, not torch.strided"
            if not _dense(t):
                return (
                    f"the {role} of tensor {i} is not dense in memory (shape {tuple(t.shape)}, strides "
                    f"{t.stride()}: a view with gaps, overlapping or expanded elements)"
                )
    _, first = lists[0]
    for i in range(n):
        ref = first[i]
        for role, tensors in lists[1:]:
            t = tensors[i]
            if t.shape != ref.shape:
                return f"the {role} of tensor {i} has shape {tuple(t.shape)} but its gradient {tuple(ref.shape)}"
            if not _same_strides(t, ref):
                return (
                    f"the {role} of tensor {i} has strides {t.stride()} but its gradient {ref.stride()} (the same "
                    "memory layout, e.g. both contiguous or both channels_last, is needed)"
                )
    return None


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a block of memory exactly once (non-overlapping and dense), in any order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((s for s in zip(t.shape, t.stride()) if s[0] != 1), key=lambda s: s[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_strides(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape lay their elements out in the same memory order (strides of size-1
    dimensions do not matter)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(x == y for size, x, y in zip(a.shape, a.stride(), b.stride()) if size != 1)


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


def folded_grads(
    grads: list[Tensor], params: Sequence[Tensor] | None, maximize: bool, weight_decay: float
) -> list[Tensor]:
    """The gradients with what torch's fused kernels fold in before their step, for a call on an update buffer
    (the pure path): negated when maximizing, plus ``weight_decay * p`` (coupled decay; ``p`` cast to the gradient's
    dtype). ``grads`` are never written."""
    g = FOREACH.neg(grads) if maximize else grads
    if weight_decay != 0:
        assert params is not None
        p = [q if q.dtype == x.dtype else q.to(x.dtype) for q, x in zip(params, g)]
        g = FOREACH.add(g, p, alpha=weight_decay, inplace=maximize)
    return g


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


# --- GradScaler: grad_scale / found_inf ---------------------------------------------------------------------------

_AMP_NATIVE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def mark_amp_native(tx: GradientTransformation) -> GradientTransformation:
    """Register ``tx`` as honouring ``UpdateContext.grad_scale`` / ``found_inf`` itself; returns ``tx``.

    Only for a transformation whose kernel is the first thing to read the gradients and which honours both
    fields on every path: in torch's fused kernel where its donated step is torch's own call, else through
    :func:`amp_unscale`. What is registered is the leaf-level update function (``tx.update.update_leaves``), the
    one the adapters call; a tree-level update cannot be registered. Nothing is registered while
    ``torch.compile`` traces (a transformation built there, e.g. by ``inject_hyperparams``, takes the generic path).
    """
    if not isinstance(tx.update, LeafUpdate):
        raise TypeError("only a leaf-level transformation (leaf_transformation) can handle grad_scale/found_inf")
    if not torch.compiler.is_compiling():  # dynamo cannot trace adding a closure to a WeakSet
        _AMP_NATIVE.add(tx.update.update_leaves)
    return tx


def is_amp_native(update_leaves: Callable[..., Any]) -> bool:
    """Whether a leaf-level update function was registered with :func:`mark_amp_native`."""
    return update_leaves in _AMP_NATIVE


def same_dtypes(params: Sequence[Tensor] | None, state: Sequence[Tensor]) -> bool:
    """Whether every parameter has its state's dtype: a fused kernel can then run on the parameters themselves."""
    return params is not None and all(p.dtype == s.dtype for p, s in zip(params, state))


def amp_kwargs(grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device) -> dict[str, Any]:
    """The ``grad_scale`` / ``found_inf`` keyword arguments of a fused kernel on ``device``.

    torch's kernels read both as float32 on the kernel's device (``found_inf`` must be exactly 1.0 to skip).
    """
    return {
        "grad_scale": None if grad_scale is None else grad_scale.to(device, torch.float32),
        "found_inf": None if found_inf is None else found_inf.to(device, torch.float32),
    }


def undo_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """``steps -= found_inf`` in place: a fused kernel skipped on ``found_inf`` leaves the step counts as they
    were before the caller's ``+1`` (torch.optim's ``_foreach_sub_``)."""
    if found_inf is not None and steps:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def amp_unscale(grads: Sequence[Any], grad_scale: Tensor | None, found_inf: Tensor | None) -> list[Any] | None:
    """GradScaler's generic handling, for a step that does not run in one fused kernel.

    Returns ``None`` when ``found_inf`` is nonzero (the step is to be skipped; a host sync, as in GradScaler's
    own path for optimizers without fused kernels), else the gradients divided by ``grad_scale`` out of place
    (the inputs are read only; ``None`` leaves stay ``None``; unchanged if ``grad_scale`` is ``None``).
    """
    if found_inf is not None and bool(found_inf != 0):
        return None
    if grad_scale is None:
        return list(grads)
    out = list(grads)
    dense = [i for i, g in enumerate(grads) if g is not None and not g.is_sparse and g.device == grad_scale.device]
    if dense:
        for i, g in zip(dense, torch._foreach_div([grads[i] for i in dense], grad_scale)):
            out[i] = g
    for i, g in enumerate(grads):
        if g is not None and (g.is_sparse or g.device != grad_scale.device):
            out[i] = g / grad_scale.to(g.device)
    return out


def skipped_updates(grads: Sequence[Tensor], apply: bool) -> list[Tensor] | None:
    """The updates of a step skipped by :func:`amp_unscale`: ``None`` (nothing to add) when the kernel would have
    applied them itself, else zeros."""
    return None if apply else [torch.zeros_like(g) for g in grads]
