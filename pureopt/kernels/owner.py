"""Whole-matrix math on sharded matrices: each matrix gathered on one owner rank, computed there, scattered back.

Some transformations need each parameter's whole matrix, not its local shard: Muon orthogonalises the momentum
with a Newton-Schulz iteration (matrix products over both dimensions). On FSDP2 (``DTensor`` parameters, each
rank holding a ``Shard`` of every matrix) the naive way is ``full_tensor()`` on every rank: every rank receives
every matrix and runs the iteration on all of them, the same work ``world`` times over. :func:`map_whole` instead
gives each matrix one *owner* rank:

1. owners are chosen greedily by cost (largest matrix first, to the least loaded rank; the same plan on every rank,
   from the global shapes alone), so the ranks share the work;
2. one ``all_to_all_single`` per process group sends each rank's local shards (cast to the compute dtype first,
   which is what the computation would do with the whole matrix) to their owners, which concatenate them along
   the sharded dimension into the whole matrix;
3. each owner applies ``fn`` to its matrices, same-shape matrices stacked into one batch;
4. a second ``all_to_all_single`` sends every rank its shard of each result.

The results are the local shards of ``fn(whole matrix)``: bit for bit what the unsharded computation gives, where
``fn`` gives the same bits on a batch as on each matrix alone (a batch of one is passed as such). Matrices split
over one mesh dimension (FSDP2's ``Shard(0)``, ``Shard(1)``, HSDP's ``(Replicate, Shard(0))``: each replica
group gathers among its own ranks) take this path; others (split over two mesh dimensions) are gathered on every
rank (``full_tensor``), which is also what ``mode="all"`` does for every matrix (the naive path, for comparison).
It is a collective: every rank calls it with the same matrices in the same order.

Example (Muon's orthogonalisation of FSDP2 momentum shards; ``pureopt.algorithms.muon`` does this)::

    specs = [spec_of(g) for g in grads]                # the DTensor gradients
    ortho = map_whole(local_directions, specs, newton_schulz_batch, torch.bfloat16)

Liu et al., "Muon is Scalable for LLM Training", 2025 (arXiv:2502.16982), distribute Muon's orthogonalisation
over data-parallel ranks in this spirit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ShardSpec", "spec_of", "owners", "map_whole", "map_whole_dtensors", "MODES"]

MODES = ("owner", "all")
"""``"owner"``: each matrix gathered on one owner rank; ``"all"``: every rank gathers every matrix."""


@dataclass(frozen=True)
class ShardSpec:
    """Where a local shard sits in its matrix: the DTensor's mesh, placements and global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def spec_of(t: Any) -> ShardSpec:
    """The :class:`ShardSpec` of a DTensor."""
    return ShardSpec(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))


def _chunk_sizes(n: int, world: int) -> list[int]:
    """The sizes of ``torch.chunk(n, world)`` padded to ``world`` entries (DTensor's ``Shard`` layout)."""
    full = -(-n // world) if n else 0
    return [max(0, min(full, n - k * full)) for k in range(world)]


def owners(costs: Sequence[float], world: int) -> list[int]:
    """Greedy owner assignment: by decreasing cost (ties: list order), each to the least loaded rank (ties: lowest).

    >>> owners([4.0, 1.0, 1.0, 1.0], 2)
    [0, 1, 1, 1]
    """
    loads = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[i] = r
        loads[r] += costs[i]
    return out


def _split_dim(spec: ShardSpec) -> tuple[int, int] | None:
    """``(mesh dim, tensor dim)`` of the one mesh dimension that shards this matrix (a plain ``Shard``: the
    ``torch.chunk`` layout; the others ``Replicate``), else ``None``. It depends on the spec alone, so every rank
    makes the same choice (the paths have different collectives)."""
    from torch.distributed.tensor import Replicate, Shard

    shard = [(d, p.dim % len(spec.shape)) for d, p in enumerate(spec.placements) if type(p) is Shard]
    if len(shard) != 1 or any(type(p) not in (Shard, Replicate) for p in spec.placements):
        return None
    return shard[0]


def _apply_batched(fn: Callable[[Tensor], Tensor], matrices: list[Tensor]) -> list[Tensor]:
    """``fn`` over a batch per shape (a batch of one is ``fn(m[None])``); results in input order."""
    out: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(j)
    for members in by_shape.values():
        results = fn(torch.stack([matrices[j] for j in members]))
        for j, r in zip(members, results.unbind()):
            out[j] = r
    return out  # type: ignore[return-value]


def _everywhere(local: Tensor, spec: ShardSpec, fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Tensor:
    """The naive path: the whole matrix on this rank (``full_tensor``), ``fn``, this rank's shard of the result."""
    from torch.distributed.tensor import DTensor, Replicate

    whole = DTensor.from_local(
        local.to(dtype), spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
    ).full_tensor()
    result = fn(whole[None])[0].contiguous()
    replicated = DTensor.from_local(result, spec.mesh, [Replicate()] * spec.mesh.ndim, run_check=False)
    return replicated.redistribute(spec.mesh, spec.placements).to_local()


def map_whole(
    local: Sequence[Tensor],
    specs: Sequence[ShardSpec],
    fn: Callable[[Tensor], Tensor],
    dtype: torch.dtype,
    mode: str = "owner",
) -> list[Tensor]:
    """The local shards of ``fn(whole matrix)`` for each sharded matrix (see the module docstring).

    Args:
      local: this rank's shard of each matrix (plain tensors).
      specs: how each is sharded (:func:`spec_of` of its DTensor).
      fn: maps a batch of whole matrices ``(B, rows, cols)`` in ``dtype`` to results of the same shape.
      dtype: the dtype shards travel and ``fn`` computes in (the shards are cast before they are sent).
      mode: ``"owner"`` (one rank per matrix) or ``"all"`` (every rank gathers every matrix: the naive path).

    Returns this rank's shard of each result, in ``dtype``, shaped like ``local``.
    """
    import torch.distributed as dist

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out: list[Tensor | None] = [None] * len(local)
    groups: dict[Any, list[tuple[int, int, list[int]]]] = {}  # process group -> (index, tensor dim, chunk sizes)
    for i, (t, spec) in enumerate(zip(local, specs)):
        split = None if mode == "all" else _split_dim(spec)
        if split is not None:
            mesh_dim, dim = split
            sizes = _chunk_sizes(spec.shape[dim], spec.mesh.size(mesh_dim))
            if t.shape[dim] != sizes[spec.mesh.get_local_rank(mesh_dim)]:
                raise RuntimeError(
                    f"matrix {i}: a local shard of shape {tuple(t.shape)} for {spec.placements} of a "
                    f"{tuple(spec.shape)} matrix is not torch.chunk's layout ({sizes} along dimension {dim})"
                )
            groups.setdefault(spec.mesh.get_group(mesh_dim), []).append((i, dim, sizes))
            continue
        out[i] = _everywhere(t, spec, fn, dtype)  # split over several mesh dims (or another shard type)
    for pg, members in groups.items():
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        costs = [float(specs[i].shape.numel() * min(specs[i].shape)) for i, _, _ in members]
        owner = owners(costs, world)
        mine = [m for m, r in zip(members, owner) if r == me]

        def shard_shape(i: int, dim: int, sizes: list[int], k: int) -> list[int]:
            shape = list(specs[i].shape)
            shape[dim] = sizes[k]
            return shape

        # 1. every rank's shards to their owners (grouped by owner, in list order)
        order = [i for r in range(world) for (i, _, _), o in zip(members, owner) if o == r]
        in_splits = [sum(local[i].numel() for (i, _, _), o in zip(members, owner) if o == r) for r in range(world)]
        piece = [[int(torch.Size(shard_shape(i, d, s, k)).numel()) for (i, d, s) in mine] for k in range(world)]
        device = local[order[0]].device
        received = torch.empty(sum(map(sum, piece)), dtype=dtype, device=device)
        send_buf = torch.cat([local[i].to(dtype).reshape(-1) for i in order])
        dist.all_to_all_single(received, send_buf, [sum(p) for p in piece], in_splits, group=pg)
        # 2. the owner's whole matrices, concatenated along the sharded dimension
        from_rank = list(received.split([sum(p) for p in piece]))
        parts = [list(from_rank[k].split(piece[k])) for k in range(world)]
        whole = [
            torch.cat([parts[k][j].view(shard_shape(i, d, s, k)) for k in range(world)], dim=d)
            for j, (i, d, s) in enumerate(mine)
        ]
        results = _apply_batched(fn, whole)
        # 3. every rank's shard of each result back
        back = [r.narrow(d, sum(s[:k]), s[k]).reshape(-1) for k in range(world) for r, (_, d, s) in zip(results, mine)]
        back_buf = torch.cat(back) if back else torch.empty(0, dtype=dtype, device=device)
        mine_back = torch.empty(sum(in_splits), dtype=dtype, device=device)
        dist.all_to_all_single(mine_back, back_buf, in_splits, [sum(p) for p in piece], group=pg)
        for i, shard in zip(order, mine_back.split([local[i].numel() for i in order])):
            out[i] = shard.view(local[i].shape)
    return out  # type: ignore[return-value]


def map_whole_dtensors(
    xs: Sequence[Any], fn: Callable[[Tensor], Tensor], dtype: torch.dtype, mode: str = "owner"
) -> list[Any]:
    """:func:`map_whole` over DTensors: new DTensors placed like ``xs`` holding ``fn`` of each whole matrix."""
    from torch.distributed.tensor import DTensor

    specs = [spec_of(x) for x in xs]
    results = map_whole([x.to_local() for x in xs], specs, fn, dtype, mode)
    return [
        DTensor.from_local(r, s.mesh, s.placements, run_check=False, shape=s.shape, stride=s.stride)
        for r, s in zip(results, specs)
    ]
