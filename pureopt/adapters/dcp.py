"""Loading a ``torch.distributed.checkpoint`` (DCP) checkpoint of encoded optimizer state into unsharded parameters.

DCP loads into a *template*: the state dict of the model and optimizer being loaded into, whose tensors give the
shapes it reads. An encoded field (``state_dtype="q8"``, ...) is stored by FSDP2 / tensor-parallel parameters by
rows (2-D codes and scales, or a float32 tensor where rows are too short to block) and by unsharded parameters as
flat blocks, so the template of an unsharded optimizer asks for other shapes (or keys) than such a checkpoint holds,
and DCP refuses ("Size mismatch"). :class:`SavedLayoutLoadPlanner` lets the checkpoint's layout through; the
optimizer's ``load_state_dict`` (``set_state_dict``) then keeps it (see ``pureopt.adapters._layouts``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from pureopt.kernels.dtensor import from_local_like, is_dtensor

__all__ = ["SavedLayoutLoadPlanner"]

_PARTS = (".codes", ".scale")


class SavedLayoutLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but an unsharded optimizer's encoded state is read in the layout the checkpoint
    saved it in.

    Each optimizer-state entry of the template that is an encoded field's part (``"<field>.codes"`` /
    ``"<field>.scale"``) is replaced by a tensor of the checkpoint's shape and dtype where they differ (for a
    DTensor parameter, a DTensor placed as the template: the scales of other blocks, which a matrix sharded by
    columns takes at another world size), and, for a plain tensor parameter, the pair by the field's plain tensor
    (``"<field>"``) where the checkpoint keeps the field so (the float32 state of a sharded run's 1-D
    parameters). Everything else loads as with
    :class:`~torch.distributed.checkpoint.DefaultLoadPlanner`. Pass the loaded optimizer state dict to
    ``set_state_dict`` / ``set_optimizer_state_dict`` (or ``load_state_dict``): a :class:`TorchOptimizer` keeps
    each field in the layout it arrives in (bitwise, no re-encoding) and refuses one it cannot read.

    Example (a checkpoint of an FSDP2 run, resumed in one process)::

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path, planner=SavedLayoutLoadPlanner())
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    """

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is not None and self.flatten_state_dict:
            self._take_saved_layouts(metadata)

    def _take_saved_layouts(self, metadata: Metadata) -> None:
        saved = metadata.state_dict_metadata
        for fqn, value in list(self.state_dict.items()):
            path = self.mappings.get(fqn)
            if path is None or len(path) < 3 or path[-3] != "state" or not isinstance(value, Tensor):
                continue
            if not str(path[-1]).endswith(_PARTS):
                continue
            base = fqn[: -len(_PARTS[0])]
            if any(base + part not in self.state_dict for part in _PARTS):
                continue  # (not an encoded field's pair)
            found = saved.get(fqn)
            if isinstance(found, TensorStorageMetadata):
                if tuple(found.size) != tuple(value.shape) or found.properties.dtype != value.dtype:
                    self._put(fqn, path, _like(found, value))
                continue
            if is_dtensor(value):
                continue  # (a sharded parameter keeps its fields' kinds: blocks are all that may change)
            plain = saved.get(base)
            if found is None and isinstance(plain, TensorStorageMetadata) and base not in self.state_dict:
                for part in _PARTS:  # the pair becomes the field's plain tensor
                    self._drop(base + part)
                self._put(base, (*path[:-1], str(path[-1])[: -len(_PARTS[0])]), _like(plain, value))

    def _put(self, fqn: str, path: tuple[Any, ...], value: Tensor) -> None:
        self.state_dict[fqn] = value
        self.mappings[fqn] = path
        _parent(self.original_state_dict, path)[path[-1]] = value

    def _drop(self, fqn: str) -> None:
        path = self.mappings.pop(fqn)
        del self.state_dict[fqn]
        del _parent(self.original_state_dict, path)[path[-1]]


def _like(found: TensorStorageMetadata, template: Tensor) -> Tensor:
    """A tensor to read ``found`` into: of its shape and dtype, placed like ``template`` (a DTensor's local shard
    as DTensor would split the saved shape over the template's mesh and placements)."""
    shape, dtype = tuple(found.size), found.properties.dtype
    if not is_dtensor(template):
        return torch.empty(shape, dtype=dtype, device=template.device)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = template.device_mesh, template.placements  # type: ignore[attr-defined]
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = torch.empty(local_shape, dtype=dtype, device=template.to_local().device)  # type: ignore[attr-defined]
    return from_local_like(local, template, shape)


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree
