"""The SparseAdam algorithm transform: torch.optim.SparseAdam's state and masked Adam step."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import GradientTransformation, LeafInit, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import resolve
from pureopt.kernels.sparse_adam import sparse_adam as sparse_adam_kernel
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init, zeros
from pureopt.tree import PyTreeSpec

__all__ = ["SparseAdamState", "sparse_adam_transform"]


class SparseAdamState(NamedTuple):
    """State of :func:`pureopt.optimizers.sparse_adam.sparse_adam`; fields follow torch.optim.SparseAdam's keys.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; torch keeps a Python int under the same key).
      exp_avg: first moments (dense; only the rows present in a gradient change).
      exp_avg_sq: second moments (dense; only the rows present in a gradient change).
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def sparse_adam_transform(
    lr: ScalarOrSchedule,
    betas: tuple[float, float],
    eps: float,
    maximize: bool,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The SparseAdam step (see :mod:`pureopt.kernels.sparse_adam`) as a transformation."""
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        del params
        res = sparse_adam_kernel(
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s["step"],
            lr=resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            maximize=maximize,
            donate=ctx.donate,
        )
        return res.updates, {"step": res.step, "exp_avg": res.exp_avg, "exp_avg_sq": res.exp_avg_sq}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "exp_avg": zeros(state_dtype),
        "exp_avg_sq": zeros(state_dtype),
    }
    tx = kernel_transform(SparseAdamState, fields, step)
    inner_init = tx.init.init_leaves  # type: ignore[attr-defined]

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> Any:
        _check_params(spec.unflatten(leaves))
        return inner_init(leaves, spec)

    return GradientTransformation(LeafInit(init_leaves), tx.update)


def _check_params(params: Any) -> None:
    """torch.optim.SparseAdam's checks on the parameters: dense layout, not complex (indices are tree paths)."""
    paths = _tree.tree_paths(params)
    leaves = _tree.leaves(params)
    sparse = [p for p, x in zip(paths, leaves) if isinstance(x, Tensor) and x.is_sparse]
    if sparse:
        raise ValueError(f"Sparse params at {_names(sparse)}: SparseAdam requires dense parameter tensors")
    complex_ = [p for p, x in zip(paths, leaves) if isinstance(x, Tensor) and x.is_complex()]
    if complex_:
        raise ValueError(f"Complex params at {_names(complex_)}: SparseAdam does not support complex parameters")


def _names(paths: list[Any]) -> str:
    return ", ".join(_tree.format_path(p) for p in paths)
