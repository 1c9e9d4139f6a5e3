"""Stateful adapters over pure transformations: torch's functional-optimizer contract and ``torch.optim.Optimizer``.

* :class:`FunctionalOptimizer` — ``step_param`` / ``step`` / ``step_params`` with explicit gradients (the contract
  of ``torch.distributed.optim``'s functional optimizers; usable in DDP's optimizer-overlap hooks).
* :class:`TorchOptimizer` — a real ``torch.optim.Optimizer`` (param groups, closures, lr schedulers, GradScaler,
  torch-format checkpoints).

Both own their parameters and state and step them in place through the donated path (torch's fused kernels where
they apply). DDP communication hooks will live in ``pureopt.adapters.ddp``.
"""

from pureopt.adapters.functional import FunctionalOptimizer
from pureopt.adapters.torch_optim import TorchOptimizer

__all__ = ["FunctionalOptimizer", "TorchOptimizer"]
