"""Helpers shared by the kernels: per-tensor scalars from step counts, complex-as-real views."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.kernels.dtensor import is_dtensor
from pureopt.kernels.listops import LOOP, ListOps, Scratch, ScratchOps
from pureopt.kernels.materialize import materialize_when_compiling

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
    "torch_grad",
    "adam_bias_corrections",
    "ema_of_squares",
    "segment_views",
    "join_segments",
    "StepScalars",
    "scalar_for",
    "add_scaled",
    "decay_params",
    "add_decay",
    "CHUNK_BYTES",
    "can_apply",
    "on_host",
    "HOST_SCALARS",
    "SCRATCH",
    "SCRATCH_MIN_BYTES",
    "FEW_TENSORS",
    "elementwise",
    "add_update",
    "addcdiv_update",
    "uniform",
]

StepScalars = list[Tensor]


def scalar_dtype(device: torch.device) -> torch.dtype:
    """The dtype used for per-step scalars (bias corrections, ...): float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def per_tensor(steps: Sequence[Tensor], fn: Callable[[Tensor], Tensor], host: bool = False) -> list[Any]:
    """Evaluate ``fn`` on the step counts of all tensors at once; returns one 0-d tensor per step count.

    The counts are stacked (one op), converted to float64 and mapped with ``fn``; the result is unbound
    into 0-d tensors. This avoids a host sync (no ``.item()``) and costs a few ops per group, not per tensor.
    Counts on different devices are handled group by group (see :func:`map_scalars_n`). With ``host`` the values
    come back as Python numbers instead (see :func:`on_host`).
    """
    return map_scalars_n(lambda t: (fn(t),), steps, outputs=1, host=host)[0]


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
    host: bool | Collection[int] = False,
) -> list[list[Any]]:
    """Evaluate ``fn`` on per-tensor 0-d values stacked into vectors; ``fn`` returns ``outputs`` vectors.

    Each column holds one 0-d tensor per parameter tensor. The columns are stacked (a few ops per group, not per
    tensor), converted to ``dtype`` (default: the scalar dtype, float64 where the device has it) and passed to
    ``fn``; each output vector is unbound into 0-d tensors. Values on different devices are handled device by
    device. With ``like`` (one tensor per position) each value is cast to its tensor's dtype, so that it never
    promotes a 0-d tensor it multiplies (``fp32_0d * fp64_0d`` is float64). With ``keep_dtype`` the columns are
    passed in their own dtype (for state kept as scalars, e.g. NAdam's ``mu_product``). ``host`` (``True`` or the
    indices of some outputs) returns those outputs as Python numbers, read from the vectors in one call each (see
    :func:`on_host`; the op they scale then rounds them to its tensor's dtype, as a ``like`` cast would).
    """
    n = len(columns[0])
    if n == 0:
        return [[] for _ in range(outputs)]
    on_host_idx = set(range(outputs)) if host is True else set(host or ())
    devices = {c.device for c in columns[0]}
    if len(devices) == 1:
        dev = columns[0][0].device
        stacked = [torch.stack([v if v.device == dev else v.to(dev) for v in col]) for col in columns]
        if not keep_dtype:
            work = dtype or scalar_dtype(dev)
            stacked = [s.to(work) for s in stacked]
        results = materialize_when_compiling(tuple(fn(*stacked)))  # once per step, not per vector (compiled)
        numbers = {k: results[k].tolist() for k in on_host_idx}
        like_dtypes = {t.dtype for t in like} if like is not None else set()
        if len(like_dtypes) == 1:  # one cast per output vector instead of one per value
            target = like_dtypes.pop()
            results = tuple(out.to(target) for out in results)
        if like is None:
            return [numbers[k] if k in numbers else list(torch.unbind(out)) for k, out in enumerate(results)]
        return [
            numbers[k] if k in numbers else cast_values(list(torch.unbind(out)), like) for k, out in enumerate(results)
        ]
    result: list[list[Any]] | None = None
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
            host=host,
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
    return [
        s.to(t.dtype) if isinstance(s, Tensor) and t.dim() == 0 and s.dtype != t.dtype else s
        for s, t in zip(scalars, tensors)
    ]


def scalar_for(value: float | Tensor, like: Sequence[Tensor]) -> float | list[Tensor]:
    """A hyperparameter ready to multiply ``like``: a number as it is, a 0-d tensor cast once per dtype in ``like``
    (so that it never promotes a 0-d tensor), as a per-tensor list."""
    if not isinstance(value, Tensor):
        return value
    casts: dict[torch.dtype, Tensor] = {}
    out = []
    for t in like:
        if t.dtype not in casts:
            casts[t.dtype] = value if value.dtype == t.dtype else value.to(t.dtype)
        out.append(casts[t.dtype])
    return out


def add_scaled(
    ops: ListOps, xs: list[Tensor], ys: Sequence[Tensor], coef: float | Tensor, inplace: bool = False
) -> list[Tensor]:
    """``x + coef * y`` where ``coef`` is a Python number or a 0-d tensor (kept from promoting the result)."""
    if isinstance(coef, Tensor):
        return ops.add(xs, ops.mul(list(ys), scalar_for(coef, xs)), inplace=inplace)
    return ops.add(xs, ys, alpha=coef, inplace=inplace)


def decay_params(ops: ListOps, params: list[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """Decoupled weight decay applied to the parameters in place, torch's ``p.mul_(1 - lr * weight_decay)`` (the
    applied path of AdamW-style algorithms)."""
    ops.mul(params, scalar_for(1 - lr * weight_decay, params), inplace=True)


def add_decay(
    ops: ListOps, updates: list[Tensor], params: Sequence[Tensor], lr: float | Tensor, weight_decay: float,
    inplace: bool,
) -> list[Tensor]:  # fmt: skip
    """``updates - lr * weight_decay * params``: decoupled weight decay added to returned updates (the pure path's
    counterpart of :func:`decay_params`)."""
    return add_scaled(ops, updates, params, -lr * weight_decay, inplace=inplace)


def cast_like(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Cast each tensor to the dtype of its partner in ``like`` (e.g. bf16 grads to fp32 state)."""
    return [t if t.dtype == ref.dtype else t.to(ref.dtype) for t, ref in zip(tensors, like)]


def as_real(tensors: Sequence[Tensor | None]) -> list[Tensor]:
    """View complex tensors as real ``(..., 2)`` tensors (torch.optim's treatment of complex params)."""
    # (entries that are not tensors, e.g. ``()`` for a field a parameter does not keep, pass through)
    return [torch.view_as_real(t) if isinstance(t, Tensor) and t.is_complex() else t for t in tensors]  # type: ignore[misc]


def as_complex_like(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Undo :func:`as_real` for the positions where ``like`` is complex."""
    return [torch.view_as_complex(t) if ref.is_complex() else t for t, ref in zip(tensors, like)]


def torch_grad(
    ops: ListOps,
    grads: list[Tensor],
    params: Sequence[Tensor] | None,
    *,
    maximize: bool,
    weight_decay: float,
    own: bool = True,
) -> tuple[list[Tensor], bool]:
    """torch.optim's gradient preamble: ``g <- -g`` if ``maximize``, then ``g <- g + weight_decay * p`` (coupled
    weight decay; pass ``weight_decay=0`` where the decay is decoupled or absent).

    Returns the gradient and whether it is a temporary of the kernel's own that later ops may overwrite in place:
    true once either op ran, unless ``own`` is false (autograd records through the update, so not even the kernel's
    temporaries may be overwritten). The caller's ``grads`` are never written."""
    owned = False
    if maximize:
        grads, owned = ops.neg(grads), own
    if weight_decay != 0:
        assert params is not None
        grads, owned = ops.add(grads, params, alpha=weight_decay, inplace=owned), own
    return grads, owned


def adam_bias_corrections(
    steps: Sequence[Tensor],
    lr: float | Tensor | None,
    beta1: float,
    beta2: float,
    *,
    like: Sequence[Tensor],
    host: bool,
) -> tuple[list[Any], list[Any]]:
    """Adam-style per-tensor scalars at the (already advanced) step counts: the signed step size
    ``-lr / (1 - beta1**t)`` (``+1 / (1 - beta1**t)`` when ``lr`` is ``None``: the positive direction) and
    ``sqrt(1 - beta2**t)``, through :func:`map_scalars_n` (``like``, ``host`` as there)."""
    sign = -1.0 if lr is not None else 1.0
    step_lr = 1.0 if lr is None else lr
    step_size, bc2_sqrt = map_scalars_n(
        lambda t: (sign * step_lr / (1 - torch.pow(beta1, t)), torch.sqrt(1 - torch.pow(beta2, t))),
        steps,
        outputs=2,
        like=like,
        host=host,
    )
    return step_size, bc2_sqrt


def ema_of_squares(
    ops: ListOps, avgs: list[Tensor], xs: Sequence[Tensor], decay: float, *, donate: bool, own: bool = True
) -> list[Tensor]:
    """torch.optim's running average of squares, ``avg.mul_(decay).addcmul_(x, x, value=1 - decay)``: Adam's
    ``exp_avg_sq``, RMSprop's ``square_avg``, Adadelta's ``square_avg`` / ``acc_delta``, ...

    ``avgs`` are overwritten only with ``donate``; ``own=False`` (autograd records through the update) keeps the
    second op out of place too."""
    return ops.addcmul(ops.mul(avgs, decay, inplace=donate), xs, xs, value=1 - decay, inplace=own)


def segment_views(tensors: Sequence[Tensor], segments: Sequence[Sequence[int]] | None) -> list[Tensor]:
    """The parameters inside flat buffers, as views: tensor ``i`` cut along its first dimension into pieces of
    ``segments[i]`` elements (``UpdateContext.segments``), all in one list. ``tensors`` themselves when
    ``segments`` is ``None``. Per-tensor reductions (norms) over these views give the bits they give over the
    parameters, and in-place ops on them write into the flat buffers."""
    if segments is None:
        return list(tensors)
    return [view for t, sizes in zip(tensors, segments) for view in t.split(list(sizes))]


def join_segments(
    results: Sequence[Tensor],
    views: Sequence[Tensor],
    whole: Sequence[Tensor],
    segments: Sequence[Sequence[int]] | None,
) -> list[Tensor]:
    """Per-segment ``results`` back as one tensor per flat buffer: ``whole`` itself where ``results`` are its
    ``views`` (:func:`segment_views`) updated in place, else the concatenation of each buffer's results (an op
    that could not run in place, e.g. while autograd records). ``results`` when ``segments`` is ``None``."""
    if segments is None:
        return list(results)
    if len(results) == len(views) and all(r is v for r, v in zip(results, views)):
        return list(whole)
    out, k = [], 0
    for sizes in segments:
        out.append(torch.cat(list(results[k : k + len(sizes)])))
        k += len(sizes)
    return out


# --- the donated, applied path: the last op writes into the parameters; CPU lists run in cache-sized chunks ------

CHUNK_BYTES = 1 << 20
"""How many bytes of parameters one chunk of :func:`elementwise` covers on CPU (see docs/benchmarks.md).

A chunk's parameters, gradients, state and temporaries then stay in the CPU caches from the first op of the
kernel to the last, and its temporaries are a chunk's worth, reused by the next chunk, instead of a whole list's
worth page-faulted in every step. Smaller chunks cost more Python and dispatch per step, bigger ones miss the
caches: 1 MiB was the best of 0.25-4 MiB on the benchmark sets."""


def can_apply(ops: ListOps, apply: bool, params: Sequence[Tensor] | None, rparams: Sequence[Tensor] | None) -> bool:
    """Whether a kernel may add its updates to the parameters itself: the caller allows it (``apply`` with
    ``donate``), the backend runs in-place ops, and ``rparams`` (the parameters as the kernel computes with them,
    see :func:`as_real` / :func:`cast_like`) are the parameters' own memory, not converted copies."""
    if not (apply and ops.inplace_ok and params is not None and rparams is not None):
        return False
    return all(r is p or r.dtype == (p.dtype.to_real() if p.is_complex() else p.dtype) for r, p in zip(rparams, params))


SCRATCH = True
"""Whether the chunked path takes big temporaries from reused :class:`~pureopt.kernels.listops.Scratch` memory."""

SCRATCH_MIN_BYTES = 128 << 10
"""Chunks whose tensors average at least this size (glibc's initial mmap threshold) take their temporaries from
:class:`~pureopt.kernels.listops.Scratch` memory: freshly allocated blocks that big are often returned to the OS
when freed and page-faulted in again by the next chunk. Smaller ones come from the allocator's free lists, and
``torch._foreach_*`` calls cost less than the per-tensor ``out=`` calls over many small tensors."""

FEW_TENSORS = 4
"""Chunks of at most this many tensors run on the per-tensor backend (:data:`~pureopt.kernels.listops.LOOP`) even
on the foreach path: one call per tensor costs less there than a ``torch._foreach_*`` call."""

HOST_SCALARS = True
"""Whether :func:`on_host` may hand per-tensor scalars over as Python numbers (tests switch it off to run the applied
path with 0-d tensor scalars, as on an accelerator)."""


def on_host(apply: bool, tensors: Sequence[Tensor]) -> bool:
    """Whether a kernel may read its per-tensor scalars (bias corrections, ...) to the host as Python numbers, as
    torch.optim's loop and foreach implementations do: only on the applied path (never pure, vmapped or
    differentiated), for CPU tensors (no device synchronisation) and not while compiling. Torch's ops then take
    them as scalar arguments: ``p.addcdiv_(m, u, value=-clr)`` in one pass instead of a multiplication first."""
    if not (apply and HOST_SCALARS) or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors)


def _chunks(
    columns: Sequence[Sequence[Any] | None], limit: int, split: bool
) -> Iterator[tuple[list[list[Any] | None], int]]:
    """Split the columns (lists with one entry per parameter) into chunks of about ``limit`` bytes of the first
    column; yields each chunk with its average tensor size in bytes. With ``split``, a tensor bigger than ``limit``
    is cut into flat slices when every per-element entry of its position is contiguous and as long as it;
    per-tensor values (0-d tensors, numbers) are repeated for each slice."""
    ref = next(c for c in columns if c is not None)
    start = acc = 0
    for i, t in enumerate(ref):
        size = t.numel() * t.element_size()
        if split and size > limit and _splittable([None if c is None else c[i] for c in columns], t.numel()):
            if start < i:
                yield [None if c is None else list(c[start:i]) for c in columns], acc // (i - start)
            start, acc = i + 1, 0
            width = max(1, limit // t.element_size())
            kinds = [None if c is None else _per_element(c[i]) for c in columns]  # None / per element / scalar
            flat: list[Any] = [None if c is None else (c[i].view(-1) if k else c[i]) for c, k in zip(columns, kinds)]
            for lo in range(0, t.numel(), width):
                hi = lo + width
                yield (
                    [None if k is None else [f[lo:hi]] if k else [f] for f, k in zip(flat, kinds)],
                    min(width, t.numel() - lo) * t.element_size(),
                )
            continue
        acc += size
        if acc >= limit:
            yield [None if c is None else list(c[start : i + 1]) for c in columns], acc // (i + 1 - start)
            start, acc = i + 1, 0
    if acc:  # (a rest of empty tensors has nothing to compute)
        yield [None if c is None else list(c[start:]) for c in columns], acc // (len(ref) - start)


def _per_element(entry: object) -> bool:
    return isinstance(entry, Tensor) and entry.dim() > 0


def _splittable(entries: Sequence[Any], numel: int) -> bool:
    """Whether every per-element entry of a position is contiguous and ``numel`` long (0-d tensors and numbers are
    per-tensor values, repeated for each slice)."""
    return all(not _per_element(e) or (e.numel() == numel and e.is_contiguous()) for e in entries)


def elementwise(
    body: Callable[..., Sequence[list[Tensor] | None]],
    ops: ListOps,
    columns: Sequence[Sequence[Any] | None],
    writes: Sequence[int | None],
    *,
    in_place: bool,
    split: bool = True,
    chunk_scale: int = 1,
) -> tuple[list[Tensor] | None, ...]:
    """Run a kernel's elementwise body on all tensors at once, or in place chunk by chunk.

    ``columns`` are lists with one entry per parameter (or ``None``): tensors shaped like that parameter, or
    per-tensor values (0-d tensors or Python numbers, read only). ``body(ops, *columns)`` returns a tuple of
    lists; ``writes[k]`` names the column that output ``k`` is the new value of (``None``: the updates, or anything
    that is not state). The body must use the ``ops`` it is given.

    Without ``in_place`` this is ``body(ops, *columns)``. With ``in_place`` (the donated path that applies its updates
    to the parameters: the state columns may be overwritten and the body returns ``None`` updates) the body runs
    on chunks of about :data:`CHUNK_BYTES` of parameters when all tensors are on the CPU (big tensors are split
    into flat slices), with ``ops`` writing its temporaries into reused :class:`~pureopt.kernels.listops.Scratch`
    memory, each output that is not already its column's tensor is copied into it, and the result is
    ``None`` for the outputs not in ``writes`` and the columns themselves for the others. The body must therefore
    be elementwise given its per-tensor values (no norms or reductions over a tensor), and per-tensor state (step
    counts, ...) must be advanced outside it, once. With ``split=False`` tensors are never cut: chunks hold whole
    tensors, so a body with per-tensor reductions (norms) may run chunk by chunk too. ``chunk_scale`` multiplies
    the chunk size (a body of a few light in-place ops without temporaries gains more from fewer chunks).
    """
    if not in_place:
        return tuple(body(ops, *columns))
    ref = next(c for c in columns if c is not None)
    scratch: Scratch | None = None
    if not all(t.device.type == "cpu" for t in ref) or any(map(is_dtensor, ref)):  # DTensors are not sliced
        parts: Iterator[tuple[list[Any], int]] = iter([(list(columns), 0)])
    else:
        parts = _chunks(columns, CHUNK_BYTES * chunk_scale, split)
        if SCRATCH:
            scratch = Scratch.acquire()
            scratch.active = True
    try:
        for part, tensor_bytes in parts:
            # a few tensors: one call per tensor costs less than a torch._foreach_* call (whose CPU kernels loop over
            # the tensors anyway)
            chunk_ops = LOOP if ops.foreach and len(next(c for c in part if c is not None)) <= FEW_TENSORS else ops
            # big temporaries from reused memory; small ones from the allocator (no page faults, fewer calls)
            big = scratch is not None and tensor_bytes >= SCRATCH_MIN_BYTES
            outputs = body(ScratchOps(chunk_ops, scratch) if big and scratch is not None else chunk_ops, *part)
            for out, col in zip(outputs, writes):
                if col is None or out is None or out is part[col]:
                    continue
                for new, own in zip(out, part[col]):
                    if new is not own:
                        own.copy_(new)
            if big and scratch is not None:
                scratch.reset()
    finally:
        if scratch is not None:
            scratch.reset()
            scratch.active = False
    return tuple(None if col is None else columns[col] for col in writes)  # type: ignore[misc]


def _numbers(coef: object) -> bool:
    return isinstance(coef, (int, float)) or (
        isinstance(coef, (list, tuple)) and not any(isinstance(c, Tensor) for c in coef)
    )


def add_update(
    ops: ListOps,
    target: list[Tensor] | None,
    xs: list[Tensor],
    coef: float | Tensor | Sequence[float | Tensor],
    owned: bool,
) -> list[Tensor] | None:
    """The update ``coef * x``: added into ``target`` in place when given (``target + coef * x`` in one op with one
    rounding, torch's ``p.add_(x, alpha=coef)``) and ``None`` returned, else returned as new tensors.

    ``coef`` is a Python number, a 0-d tensor, or per-tensor 0-d tensors or numbers; ``owned``: ``xs`` may be
    overwritten.
    """
    coef = scalar_for(coef, xs)  # type: ignore[arg-type]
    if target is None:
        if isinstance(coef, (int, float)) and coef == 1:
            return xs if owned else ops.clone(xs)
        return ops.mul(xs, coef, inplace=owned)
    if isinstance(coef, (int, float)):
        ops.add(target, xs, alpha=coef, inplace=True)
    elif _numbers(coef):  # (no foreach op takes one alpha per tensor)
        ops.add(target, ops.mul(xs, coef, inplace=owned), inplace=True)
    else:  # x * c added with one rounding, as p.add_(x, alpha=c) with c a number
        ops.addcmul(target, xs, coef, inplace=True)
    return None


def addcdiv_update(
    ops: ListOps,
    target: list[Tensor] | None,
    xs: list[Tensor],
    ys: list[Tensor],
    coef: float | Tensor | Sequence[float | Tensor],
    owned: bool,
) -> list[Tensor] | None:
    """The update ``(coef * x) / y``: added into ``target`` in place when given (torch's
    ``p.addcdiv_(x, y, value=coef)``, bitwise ``p + update``) and ``None`` returned, else returned as new tensors.

    ``coef`` as in :func:`add_update` (numbers, from :func:`on_host`, go straight into ``addcdiv_``); ``owned``:
    ``xs`` may be overwritten.
    """
    coef = scalar_for(coef, xs)  # type: ignore[arg-type]
    if target is not None and _numbers(coef):
        ops.addcdiv(target, xs, ys, value=coef, inplace=True)  # type: ignore[arg-type]
        return None
    if isinstance(coef, (int, float)) and coef == 1:
        numer = xs
    else:
        numer, owned = ops.mul(xs, coef, inplace=owned), True
    if target is not None:
        ops.addcdiv(target, numer, ys, inplace=True)
        return None
    return ops.div_list(numer, ys, inplace=owned)


def uniform(values: Sequence[Any]) -> Any:
    """The one number all of ``values`` are, where they are host numbers that agree (per-tensor scalars from
    :func:`on_host` when every parameter has the same step count), else ``values``: then a scalar argument of one
    fused op (``p.add_(m, alpha=c)``, ``v.addcmul_(g, g, value=c)``) instead of a per-tensor product first."""
    first = values[0] if len(values) else None
    if isinstance(first, float) and all(v == first for v in values):
        return first
    return values
