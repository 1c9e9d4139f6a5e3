"""pureopt inside ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO-1: optimizer state sharded over ranks).

``ZeroRedundancyOptimizer`` gives each rank a *local optimizer* over its share of the parameters, built from
``optimizer_class``; after each local step the ranks broadcast their updated parameters.

* Without ``overlap_with_ddp``, the local optimizer is a :class:`~pureopt.adapters.TorchOptimizer`: pass
  ``optimizer_class=functools.partial(TorchOptimizer, tx_or_factory=pureopt.adamw)`` and the hyperparameters as
  ZeRO's keyword arguments (or a ready transformation as ``tx_or_factory``). ``step``, ``consolidate_state_dict``,
  ``state_dict`` and ``load_state_dict`` work as with torch.optim's classes; the update counters travel in the
  param groups (ZeRO copies the local optimizer's group keys into its own, and back on load).
* With ``overlap_with_ddp=True`` (the step of each DDP gradient bucket runs in DDP's communication hook,
  ``hook_with_zero_step``), ZeRO needs a *functional* optimizer registered with
  ``torch.distributed.optim.utils.register_functional_optim``: :class:`ZeroFunctionalOptimizer`, registered when
  this module is imported. Pass ``optimizer_class=ZeroFunctionalOptimizer, tx=pureopt.adamw(lr=...)``.

Example::

    from pureopt.adapters.zero import ZeroFunctionalOptimizer  # registers it with torch

    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=ZeroFunctionalOptimizer,
                                   overlap_with_ddp=True, tx=pureopt.adamw(lr=1e-3))
    ddp.register_comm_hook(None, hook_with_zero_step(allreduce_hook, ddp, zero))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.distributed.optim.utils import register_functional_optim

from pureopt.adapters.functional import FunctionalOptimizer

__all__ = ["ZeroFunctionalOptimizer"]


class _ReadOnlyState(Mapping[Tensor, dict[str, Tensor]]):
    """``ZeroFunctionalOptimizer.state``: each parameter's state (the live tensors); writes are refused."""

    def __init__(self, entries: dict[Tensor, dict[str, Tensor]]) -> None:
        self._entries = entries

    def __getitem__(self, key: Tensor) -> dict[str, Tensor]:
        return self._entries[key]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __setitem__(self, key: Tensor, value: Any) -> None:
        raise NotImplementedError(
            "ZeroFunctionalOptimizer's state cannot be written entry by entry, which is how "
            "ZeroRedundancyOptimizer(overlap_with_ddp=True).load_state_dict loads a checkpoint: resume an "
            "overlapped run from its model weights, or checkpoint ZeRO without overlap_with_ddp (TorchOptimizer as "
            "the local optimizer), whose load_state_dict works"
        )


class ZeroFunctionalOptimizer(FunctionalOptimizer):
    """A :class:`FunctionalOptimizer` as ``ZeroRedundancyOptimizer``'s local optimizer with ``overlap_with_ddp``.

    ZeRO calls ``step(gradients)`` once per DDP gradient bucket assigned to this rank, with ``None`` for the other
    parameters. Here those calls are partial steps (``step_params``): one optimizer step per iteration, so the
    ``num_updates`` counter and the schedules that read it advance once per iteration, not once per bucket.

    Args:
      params: this rank's share of the parameters (ZeRO passes it).
      tx: the transformation, e.g. ``pureopt.adamw(lr=1e-3)`` (passed as ZeRO's ``tx=`` keyword).
      flat, _allow_empty_param_list: as :class:`FunctionalOptimizer` (ZeRO passes the latter).

    Loading a checkpoint through ``ZeroRedundancyOptimizer.load_state_dict`` is refused (a NotImplementedError
    says why): it writes ``optim.state[p]``, which a functional optimizer does not keep in that form.
    """

    def step(self, gradients: Sequence[Tensor | None]) -> None:
        """A partial step over the parameters whose gradient is not ``None`` (see the class docstring)."""
        if len(self.params) != len(gradients):
            raise ValueError(
                f"ZeroFunctionalOptimizer got {len(gradients)} gradients for {len(self.params)} parameters"
            )
        present = [(p, g) for p, g in zip(self.params, gradients) if g is not None]
        if present:
            self.step_params([p for p, _ in present], [g for _, g in present])

    @property
    def state(self) -> _ReadOnlyState:  # type: ignore[override]
        """Per-parameter state in torch's form (the live tensors); read-only."""
        return _ReadOnlyState(FunctionalOptimizer.state.fget(self))  # type: ignore[attr-defined]


register_functional_optim(ZeroFunctionalOptimizer, ZeroFunctionalOptimizer)
