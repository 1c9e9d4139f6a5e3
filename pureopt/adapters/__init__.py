"""Stateful adapters over pure transformations: torch's functional-optimizer contract, ``torch.optim.Optimizer``
and DDP hooks.

* :class:`FunctionalOptimizer` — ``step_param`` / ``step`` / ``step_params`` with explicit gradients (the contract
  of ``torch.distributed.optim``'s functional optimizers; usable in DDP's optimizer-overlap hooks).
* :class:`TorchOptimizer` — a real ``torch.optim.Optimizer`` (param groups, closures, lr schedulers, GradScaler,
  torch-format checkpoints).
* :func:`register_optimizer_hook` (optimizer step right after each DDP bucket's all-reduce),
  :func:`optimizer_in_backward` (step each parameter as soon as its gradient is accumulated) and
  :func:`periodic_average` (post-local SGD model averaging), in :mod:`pureopt.adapters.ddp`.
* :class:`SavedLayoutLoadPlanner` — a DCP load planner that reads encoded optimizer state saved by sharded
  parameters (FSDP2, tensor parallelism) into unsharded ones, in :mod:`pureopt.adapters.dcp`.

All of them own their parameters and state and step them in place through the donated path (torch's fused kernels
where they apply).
"""

import torch

from pureopt.adapters.functional import FunctionalOptimizer
from pureopt.adapters.torch_optim import TorchOptimizer

if torch.distributed.is_available():  # builds without torch.distributed still get the other adapters
    from pureopt.adapters.dcp import SavedLayoutLoadPlanner
    from pureopt.adapters.ddp import (
        OptimizerInBackward,
        PeriodicAverager,
        optimizer_in_backward,
        periodic_average,
        register_optimizer_hook,
    )

__all__ = [
    "FunctionalOptimizer",
    "OptimizerInBackward",
    "PeriodicAverager",
    "SavedLayoutLoadPlanner",
    "TorchOptimizer",
    "optimizer_in_backward",
    "periodic_average",
    "register_optimizer_hook",
]
