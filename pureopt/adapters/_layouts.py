"""Loading encoded optimizer state saved in another layout (internal to the adapters).

An encoded field (``state_dtype="q8"``, ...) is stored by unsharded parameters as flat codes and scales (blocks of
the encoding's size over the parameter's flat elements), and by DTensor parameters (FSDP2, tensor parallelism) by
rows: 2-D codes and scales whose blocks lie within rows, or, where rows are too short to block (1-D parameters),
as a plain tensor in the compute dtype (see ``pureopt.algorithms.define``). Both are self-describing: the step
reads any of them (``Encoding.local``: the block is the codes' row over the scales' row). So a checkpoint of a
sharded run, gathered to full tensors (``get_optimizer_state_dict`` with ``full_state_dict=True``, or
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``), loads into an optimizer over unsharded
parameters *as saved*: each field whose saved layout differs takes that layout, bitwise, with no re-encoding (the
run then continues with the sharded run's blocks). For DTensor parameters only the blocks may differ: a matrix
sharded by columns saved at another world size took other blocks for its runs of a row, and its scales load as
saved wherever those blocks lie within every rank's runs here (else a ValueError names them). Shapes that are not
such a layout are left to the usual checks (a ValueError naming the parameter and key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from pureopt.adapters._state import StateLayout
from pureopt.algorithms.storage import compute_dtype
from pureopt.kernels.dtensor import blocks_fit_runs, from_local_like, is_dtensor
from pureopt.kernels.encoding import Quantized, row_block

__all__ = ["adopt_saved_layouts"]

_CODES, _SCALE = ".codes", ".scale"


def adopt_saved_layouts(
    layout: StateLayout,
    fresh: Any,
    entries: Mapping[int, Any],
    params: Sequence[Tensor],
    where: str = "the checkpoint",
    labels: Sequence[Any] | None = None,
) -> tuple[Any, StateLayout]:
    """``fresh`` (a state of ``layout``, e.g. from ``tx.init``) with each encoded field laid out as its loaded entry
    has it, where that differs and is a layout the step reads: for an unsharded parameter, codes and scales by rows
    (whole blocks within each row) or a plain floating tensor shaped like the parameter (the compute dtype's state
    of a field whose rows could not be blocked); for a DTensor parameter, scales of other blocks that lie within
    every rank's runs. The adopted fields are new zero buffers (the load writes them); the rest of ``fresh`` is
    kept. Returns the state and its layout (``fresh`` and ``layout`` themselves
    when nothing changes). Nothing is modified.

    ``entries``: per-parameter values by parameter index in torch's ``{key: tensor}`` form, as loaded; ``where``
    and ``labels`` (each parameter's id) name them in errors. Raises a ValueError for codes and scales by rows that
    are not whole blocks of the parameter.
    """
    leaves = layout.leaves(fresh)
    paths = optree.tree_paths(fresh, none_is_leaf=True)
    changes: list[tuple[tuple[Any, ...], Any]] = []
    for i, entry in entries.items():
        if not (isinstance(entry, Mapping) and isinstance(i, int) and 0 <= i < layout.num_params):
            continue  # (reported by the load's checks)
        p = params[i]
        keys = layout.param_keys[i]
        for key, pos in keys.items():
            base = key[: -len(_CODES)]
            if not key.endswith(_CODES) or base + _SCALE not in keys:
                continue
            adopted = _saved_layout(entry, base, leaves[pos], leaves[keys[base + _SCALE]], p)
            if isinstance(adopted, str):
                label = labels[i] if labels is not None else i
                raise ValueError(f"{where}: state[{label}][{base!r}] is stored by rows, but {adopted}")
            if adopted is not None:
                changes.append((paths[pos][:-1], adopted))
    if not changes:
        return fresh, layout
    state = fresh
    for path, value in changes:
        state = _replace(state, path, value)
    return state, StateLayout(state, layout.num_params)


def _saved_layout(entry: Mapping[Any, Any], base: str, codes: Tensor, scale: Tensor, p: Tensor) -> Any:
    """The buffers of field ``base`` laid out as ``entry`` saved it (``None``: as ``codes`` / ``scale`` already
    are, or not a layout of this field: the load's checks name it; a string: codes and scales by rows that are not
    whole blocks of ``p``, what is wrong)."""
    saved_codes, saved_scale, plain = entry.get(base + _CODES), entry.get(base + _SCALE), entry.get(base)
    if is_dtensor(p):
        return _saved_blocks(saved_codes, saved_scale, codes, scale, p)
    if isinstance(saved_codes, Tensor) and isinstance(saved_scale, Tensor):
        if saved_codes.shape == codes.shape and saved_scale.shape == scale.shape:
            return None
        if saved_codes.dim() != 2 or saved_scale.dim() != 2 or saved_codes.dtype != codes.dtype:
            return None
        per_code = 2 if codes.numel() != p.numel() else 1  # (4-bit codes: two elements a byte)
        bits = 4 if per_code == 2 else 8
        shapes = f"codes {tuple(saved_codes.shape)} and scales {tuple(saved_scale.shape)}"
        if saved_codes.numel() * per_code != p.numel():
            return f"its {shapes} do not hold the parameter's {p.numel()} elements ({bits}-bit codes)"
        width = saved_codes.shape[1] * per_code
        if saved_codes.shape[0] != saved_scale.shape[0] or row_block(width, saved_scale.shape[1], bits) is None:
            return (
                f"its {shapes} are not rows of whole blocks of 32 or more elements (rows of {width} elements, "
                "a scale per block)"
            )
        if not saved_scale.dtype.is_floating_point:
            return f"its scales are {saved_scale.dtype}, not floating point"
        return Quantized(
            torch.zeros(saved_codes.shape, dtype=codes.dtype, device=codes.device),
            torch.zeros(saved_scale.shape, dtype=scale.dtype, device=scale.device),
        )
    if saved_codes is None and saved_scale is None and isinstance(plain, Tensor):
        if plain.shape != p.shape or not plain.dtype.is_floating_point:
            return None
        return torch.zeros(p.shape, dtype=compute_dtype(p), device=p.device)
    return None


def _saved_blocks(saved_codes: Any, saved_scale: Any, codes: Any, scale: Any, p: Any) -> Any:
    """For DTensor parameter ``p``: its field's buffers with the scales of the saved blocks, where only the blocks
    differ (a matrix sharded by columns saved at another world size, whose runs of a row took other blocks) and
    they lie within every rank's runs here (``None``: as the buffers are, or not such a layout: the load's checks
    name it; a string: blocks that do not fit the runs, what is wrong)."""
    if not (is_dtensor(saved_codes) and is_dtensor(saved_scale)) or saved_codes.shape != codes.shape:
        return None
    if saved_scale.shape == scale.shape or saved_scale.dim() != 2 or saved_scale.shape[0] != scale.shape[0]:
        return None
    per_code = 2 if codes.shape[1] != p.numel() // p.shape[0] else 1  # (4-bit codes: two elements a byte)
    width = codes.shape[1] * per_code
    block = row_block(width, saved_scale.shape[1], 4 if per_code == 2 else 8)
    if block is None or saved_scale.placements != p.placements or not blocks_fit_runs(p, block, per_code):
        return (
            f"its blocks of {width // max(saved_scale.shape[1], 1)} elements (scales {tuple(saved_scale.shape)}) "
            f"do not lie within each rank's run of the rows of this {tuple(p.shape)} parameter placed as "
            f"{tuple(p.placements)}"
        )
    local = torch.zeros_like(saved_scale.to_local(), dtype=scale.dtype)
    return Quantized(codes, from_local_like(local, p, saved_scale.shape))


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``tree`` with the subtree at ``path`` (optree's path entries) replaced by ``value``; the rest shared."""
    if not path:
        return value
    children, meta, entries, unflatten = optree.tree_flatten_one_level(tree, none_is_leaf=True)
    children = list(children)
    k = list(entries).index(path[0])
    children[k] = _replace(children[k], path[1:], value)
    return unflatten(meta, children)
