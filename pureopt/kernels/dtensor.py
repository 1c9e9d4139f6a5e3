"""Elementwise kernels on the local shards of ``DTensor`` parameters (FSDP2's ``fully_shard``, HSDP, TP).

Under FSDP2 every parameter, gradient and state tensor of a sharded parameter is a ``DTensor``. torch's
foreach/fused kernels and pureopt's listops would run on them through DTensor's dispatcher (a sharding
propagation per op and per tensor), and pureopt's kernels mix them with plain 0-d tensors (step counts, per-tensor
scalars), which DTensor refuses for most ops. An *elementwise* algorithm (see :func:`pureopt.base.is_elementwise`:
each element of the update and of the new state depends only on the same element of the gradient, parameter and
state) computes the same numbers on any subset of the elements, so it can run on each rank's local shard:

* :func:`run_on_local_shards` replaces, for the kernel call, every DTensor by its local tensor (the DTensor's own
  storage, so in-place writes of a donated step land in the DTensor), where every tensor of a parameter (its
  gradient, the parameter, its non-scalar state) is a DTensor on the same device mesh with the same placements and
  shape, none of them ``Partial``; 0-d state (step counts) stays plain, as in torch.optim. The kernel then picks
  fused / foreach / loop on plain tensors as usual.
* Results are wrapped back: a state tensor the kernel overwrote in place is the caller's DTensor itself; a new one
  (the pure path) becomes a DTensor placed like the state it replaces, so DCP saves it sharded like its parameter;
  updates are placed like their gradient. An encoded field (a record of DTensors: codes and scales, shaped by the
  parameter's rows) is unwrapped and wrapped part by part.

Nothing converts while a ``torch.func`` transform is active, while autograd records the update, or while
``torch.compile`` traces (those keep the DTensor path), nor when any parameter's tensors disagree on placement: the
step then runs on the DTensors themselves, where DTensor's own rules apply. Reductions over a parameter (norms,
trust ratios) are not elementwise and never take this path: DTensor reduces them across shards.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.kernels import select as _select

__all__ = [
    "dtensor_type",
    "is_dtensor",
    "run_on_local_shards",
    "local_shard_problem",
    "reduced_placements",
    "zeros_reduced",
    "as_plain_scalar",
    "like_placed",
    "from_local_like",
    "local_flat_offset",
    "row_sharding_problem",
    "is_split",
    "row_runs_problem",
    "row_run_widths",
    "blocks_fit_runs",
    "shard_starts",
    "sharded_mesh_dims",
    "shard_norms",
]


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor`` if it has been imported (no DTensor can exist before), else ``None``."""
    mod = sys.modules.get("torch.distributed.tensor._api")
    return None if mod is None else mod.DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor``."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def _same_placement(a: Any, b: Any) -> bool:
    """Whether two DTensors are laid out alike: the same mesh, placements and global shape."""
    return (
        (a.device_mesh is b.device_mesh or a.device_mesh == b.device_mesh)
        and (a.placements is b.placements or a.placements == b.placements)
        and a.shape == b.shape
    )


def local_shard_problem(
    dtensor: Any, params: Sequence[Any] | None, grads: Sequence[Any], state: Mapping[str, Sequence[Any]]
) -> str | None:
    """Why these tensors cannot run on their local shards (``None`` if they can); see the module docstring."""
    if _select.functorch_active():
        return "a torch.func transform is active"
    if _select._DIFFERENTIATING[0]:
        return "the update is being differentiated"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    for i, g in enumerate(grads):
        sharded = isinstance(g, dtensor)
        if sharded and any(p.is_partial() for p in g.placements):
            return f"the gradient of tensor {i} has a Partial placement ({g.placements})"
        others = [("parameter", params[i])] if params is not None else []
        others += [(name, values[i]) for name, values in state.items() if not isinstance(values, Tensor)]
        for role, t in others:
            if not isinstance(t, Tensor):
                continue
            if isinstance(t, dtensor):
                if not sharded:
                    return f"the {role} of tensor {i} is a DTensor but its gradient a plain tensor"
                if not _same_placement(t, g):
                    return (
                        f"the {role} of tensor {i} is placed as {t.placements} on {t.device_mesh} with shape "
                        f"{tuple(t.shape)}, its gradient as {g.placements} on {g.device_mesh} with shape "
                        f"{tuple(g.shape)}"
                    )
            elif sharded and t.dim() != 0:
                return (
                    f"the {role} of tensor {i} is a plain tensor of shape {tuple(t.shape)} but its gradient a DTensor"
                )
    return None


def _is_record(t: Any) -> bool:
    """A state value stored as a record of tensors (an encoded field: ``codes`` and ``scale``)."""
    return isinstance(t, tuple) and hasattr(type(t), "_fields")


def _local(t: Any, dtensor: Any) -> Any:
    if _is_record(t):  # (each part a DTensor: an encoded field, see pureopt.kernels.encoding)
        return type(t)(*(_local(x, dtensor) for x in t))
    return t._local_tensor if isinstance(t, dtensor) else t


def _wrap(local: Any, ref: Any, dtensor: Any) -> Any:
    """``local`` as a DTensor placed like ``ref`` (``ref`` itself where ``local`` is its own local tensor)."""
    if _is_record(ref) and _is_record(local):
        parts = [_wrap(a, b, dtensor) for a, b in zip(local, ref)]
        return ref if all(a is b for a, b in zip(parts, ref)) else type(ref)(*parts)
    if local is None or not isinstance(ref, dtensor) or isinstance(local, dtensor):
        return local
    if local is ref._local_tensor:
        return ref
    ref_local = ref._local_tensor
    if local.stride() == ref_local.stride() or local.numel() == 0:
        stride = ref.stride()
    else:  # a new contiguous tensor for a non-contiguous reference: contiguous global strides
        stride = torch.empty(ref.shape, device="meta").stride()
    return dtensor.from_local(local, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=stride)


def from_local_like(local: Tensor, p: Any, shape: Sequence[int]) -> Any:
    """The local tensor ``local`` (contiguous, laid out like DTensor ``p``'s local shard: its rows and, for a
    matrix sharded by columns, its run of columns) as a DTensor of global ``shape`` on ``p``'s mesh with ``p``'s
    placements."""
    stride = torch.empty(tuple(shape), device="meta").stride()
    return dtensor_type().from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def _strided(pl: Any) -> bool:
    """Whether placement ``pl`` is a strided shard (FSDP2 over tensor parallelism on the same dimension: a rank's
    slices of that dimension are not consecutive)."""
    return type(pl).__name__ == "_StridedShard"


def is_split(pl: Any) -> bool:
    """Whether placement ``pl`` splits a dimension (``pl.dim``) over its mesh dimension: ``Shard``, or the strided
    shard of FSDP2 over tensor parallelism (which is not a ``Shard``, nor ``is_shard()``, in torch 2.13)."""
    return bool(pl.is_shard()) or _strided(pl)


def row_sharding_problem(t: Any) -> str | None:
    """Why DTensor ``t`` is not sharded by rows (every ``Shard`` placement on dimension 0, none strided or
    ``Partial``: FSDP2, HSDP), so that its local shard is whole rows, a run of consecutive global elements;
    ``None`` if it is."""
    if any(
        pl.is_partial() or (is_split(pl) and (pl.dim % max(t.dim(), 1) != 0 or _strided(pl))) for pl in t.placements
    ):
        return f"a DTensor of shape {tuple(t.shape)} placed as {tuple(t.placements)} is not sharded by rows (Shard(0))"
    return None


def row_runs_problem(t: Any) -> str | None:
    """Why the local shard of DTensor ``t`` is not, in each of ``t``'s rows (its first dimension, the others
    flattened), one run of consecutive elements: ``Shard`` placements on dimension 0 (of any kind: rows are kept
    whole) and, for a matrix, plain ``Shard(1)`` (tensor parallelism's row-wise layers, FSDP2's
    ``shard_placement_fn``) leave runs; ``Partial`` and other dimensions do not. ``None`` if it is."""
    for pl in t.placements:
        if pl.is_partial():
            return f"a DTensor placed as {tuple(t.placements)} is a pending reduction (Partial)"
        if is_split(pl):
            dim = pl.dim % max(t.dim(), 1)
            if dim != 0 and not (dim == 1 and t.dim() == 2 and not _strided(pl)):
                return (
                    f"a DTensor of shape {tuple(t.shape)} placed as {tuple(t.placements)} is split within its rows "
                    "other than by whole runs of a matrix's columns (Shard(1))"
                )
    return None


def row_run_widths(t: Any, shape: Sequence[int] | None = None) -> list[int]:
    """For DTensor ``t`` that passes :func:`row_runs_problem`: the length of each rank's run of every row (the
    row's whole width where no placement shards dimension 1), by mesh coordinates along the mesh dimensions that
    shard dimension 1, in order. ``shape``: the same for a matrix of that global shape placed as ``t`` is (how
    DTensor would split a record shaped by ``t``'s rows, e.g. codes or per-block scales)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape = tuple(t.shape) if shape is None else tuple(shape)
    width = math.prod(shape[1:]) if shape else 1
    dims = [d for d, pl in enumerate(t.placements) if is_split(pl) and t.dim() == 2 and pl.dim % 2 == 1]
    if not dims:
        return [width]
    mesh_shape = tuple(t.device_mesh.shape)
    widths = []
    for picked in itertools.product(*(range(mesh_shape[d]) for d in dims)):
        coordinate = [0] * len(mesh_shape)
        for d, c in zip(dims, picked):
            coordinate[d] = c
        local, _ = _compute_local_shape_and_global_offset(shape, mesh_shape, coordinate, t.placements, True)
        widths.append(int(local[1]))
    return widths


def blocks_fit_runs(t: Any, block: int, per_code: int) -> bool:
    """Whether blocks of ``block`` elements, a scale each, lie within every rank's run of each row of DTensor
    ``t`` (which passes :func:`row_runs_problem`), and DTensor splits a record by rows of ``t`` as it splits ``t``:
    its codes (``per_code`` elements a code) and its scales (one per block), so that each rank holds its runs'
    own codes and scales."""
    width = t.numel() // t.shape[0] if t.dim() and t.shape[0] else 0
    runs = row_run_widths(t)
    if not width or width % block or any(run % block for run in runs):
        return False
    if runs == [width]:
        return True
    return all(
        row_run_widths(t, (t.shape[0], width // divisor)) == [run // divisor for run in runs]
        for divisor in (per_code, block)
    )


def local_flat_offset(t: Any) -> int:
    """The index, in the global flat (row-major) order of DTensor ``t``, of its local shard's first element, for a
    DTensor sharded by rows (:func:`row_sharding_problem`). Raises a ValueError naming the placements otherwise."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if (problem := row_sharding_problem(t)) is not None:
        raise ValueError(f"{problem}: its local elements are not consecutive in the whole tensor")
    if t.dim() == 0:
        return 0
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]) * (t.numel() // t.shape[0] if t.shape[0] else 0)


_SHARD_STARTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("pureopt_shard_starts", default=None)


def _start(t: Any, dtensor: Any) -> int:
    if not isinstance(t, dtensor):
        return 0
    try:
        return local_flat_offset(t)
    except ValueError:  # (not sharded by rows: no consecutive run of global places; nothing keyed by them runs)
        return 0


def shard_starts() -> list[int] | None:
    """While :func:`run_on_local_shards` runs a step on local shards: for each tensor, the place of its shard's
    first element in the whole tensor (:func:`local_flat_offset`; 0 for plain tensors), so that what is keyed by
    an element's place (stochastic rounding's random bits) is the same sharded or not. ``None`` otherwise."""
    return _SHARD_STARTS.get()


StepResult = tuple[list[Tensor] | None, dict[str, list[Tensor]]]


def run_on_local_shards(
    step: Callable[..., StepResult],
    params: list[Tensor] | None,
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    *args: Any,
) -> StepResult:
    """``step(params, grads, state, *args)`` of an elementwise algorithm, on the local shards of DTensors.

    Where no DTensor is involved, or the tensors cannot run on their local shards (:func:`local_shard_problem`),
    this is ``step(...)`` itself. Otherwise ``step`` sees plain tensors (each DTensor's local tensor) and its
    results are wrapped back into DTensors placed like the tensors they replace (see the module docstring).
    """
    if torch.compiler.is_compiling():  # traced: the DTensor path (dynamo sees through DTensor ops)
        return step(params, grads, state, *args)
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(g, dtensor) for g in grads):
        return step(params, grads, state, *args)
    if local_shard_problem(dtensor, params, grads, state) is not None:
        return step(params, grads, state, *args)
    local_params = None if params is None else [_local(p, dtensor) for p in params]
    local_grads = [_local(g, dtensor) for g in grads]
    starts = _SHARD_STARTS.set([_start(g, dtensor) for g in grads])
    # (a global field, one 0-d value for the whole transformation, is not a list and passes as it is)
    glob = {name for name, values in state.items() if isinstance(values, Tensor)}
    local_state = {
        name: values if name in glob else [_local(t, dtensor) for t in values] for name, values in state.items()
    }
    try:
        updates, new_state = step(local_params, local_grads, local_state, *args)
    finally:
        _SHARD_STARTS.reset(starts)
    if updates is not None:
        updates = [_wrap(u, g, dtensor) for u, g in zip(updates, grads)]
    wrapped = {}
    for name, values in new_state.items():
        old = state.get(name)
        if name in glob:
            wrapped[name] = values
        elif old is None:  # a field the step adds: placed like the gradients
            wrapped[name] = [
                _wrap(t, g, dtensor) if isinstance(t, Tensor) and t.dim() else t for t, g in zip(values, grads)
            ]
        else:
            wrapped[name] = [_wrap(t, o, dtensor) for t, o in zip(values, old)]
    return updates, wrapped


# --- reductions over a parameter (Adafactor's factored moments, norms) -------------------------------------------


def reduced_placements(t: Any, dim: int) -> tuple[Any, ...]:
    """The placements of a reduction of DTensor ``t`` over ``dim`` with ``keepdim=True``: a mesh dimension that
    shards ``dim`` holds the whole (reduced) result (``Replicate``); the others keep their placement."""
    from torch.distributed.tensor import Replicate

    dim = dim % t.dim()
    return tuple(Replicate() if is_split(p) and p.dim % t.dim() == dim else p for p in t.placements)


def zeros_reduced(p: Any, dim: int, dtype: torch.dtype) -> Any:
    """Zeros shaped like ``p`` with ``dim`` set to 1, as a DTensor placed by :func:`reduced_placements` when ``p``
    is a DTensor (a plain tensor otherwise)."""
    shape = list(p.shape)
    shape[dim] = 1
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=reduced_placements(p, dim))


def as_plain_scalar(x: Tensor) -> Tensor:
    """A 0-d DTensor (a reduction: a norm, a mean) as a plain 0-d tensor holding the value over all shards (an
    all-reduce where it is partial); a plain tensor is returned as it is."""
    if is_dtensor(x):
        return x.full_tensor()  # type: ignore[attr-defined]
    return x


def like_placed(x: Tensor, ref: Any) -> Tensor:
    """``x`` redistributed to ``ref``'s placements when both are DTensors placed differently (state keeps its
    placement from step to step); otherwise ``x``."""
    if is_dtensor(x) and is_dtensor(ref) and tuple(x.placements) != tuple(ref.placements):  # type: ignore[attr-defined]
        return x.redistribute(ref.device_mesh, ref.placements)  # type: ignore[attr-defined]
    return x


def sharded_mesh_dims(t: Any) -> tuple[int, ...]:
    """The mesh dimensions over which DTensor ``t`` is split (its ``Shard`` placements, strided ones too:
    :func:`is_split`; ``Replicate`` ones hold copies). Raises a ValueError for a ``Partial`` placement (a pending
    reduction, not a split)."""
    dims = []
    for d, p in enumerate(t.placements):
        if p.is_partial():
            raise ValueError(f"a DTensor with a Partial placement ({t.placements}) has no exact local reduction")
        if is_split(p):
            dims.append(d)
    return tuple(dims)


def shard_norms(xs: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """The 2-norm of each tensor over all its shards, as plain 0-d tensors (``dtype`` if given, else each one's).

    A DTensor's norm is ``sqrt`` of the sum of its local shards' squared norms over the mesh dimensions that
    split it: the squared local norms of all DTensors split alike are stacked and all-reduced once per mesh
    dimension (one collective per group, not per tensor); replicated dimensions need none. Plain tensors get their
    own norm. Complex tensors are normed as real pairs. Every rank must call this with the same DTensors in the
    same order (it is a collective).

    Example: NovoGrad's per-layer second moment on FSDP2 (``pureopt.algorithms.novograd``).
    """
    import torch.distributed as dist

    dtensor = dtensor_type()
    out: list[Tensor | None] = [None] * len(xs)
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    locals_: dict[int, Tensor] = {}
    for i, x in enumerate(xs):
        if dtensor is not None and isinstance(x, dtensor):
            dims = sharded_mesh_dims(x)
            local = x._local_tensor
            if local.is_complex():
                local = torch.view_as_real(local)
            locals_[i] = local if dtype is None else local.to(dtype)
            if dims:
                groups.setdefault((x.device_mesh, dims), []).append(i)
                continue
            out[i] = torch.linalg.vector_norm(locals_[i])
        else:
            real = torch.view_as_real(x) if x.is_complex() else x
            out[i] = torch.linalg.vector_norm(real if dtype is None else real.to(dtype))
    for (mesh, dims), indices in groups.items():
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in indices:
            by_dtype.setdefault(locals_[i].dtype, []).append(i)
        for members in by_dtype.values():
            squares = torch.stack([torch.linalg.vector_norm(locals_[i]).square() for i in members])
            for d in dims:
                dist.all_reduce(squares, group=mesh.get_group(d))
            for i, n in zip(members, squares.sqrt().unbind()):
                out[i] = n
    return out  # type: ignore[return-value]
