"""SparseAdam: torch.optim.SparseAdam's masked Adam for sparse (COO) gradients, on tensor lists.

Update rule (torch.optim.SparseAdam), per parameter ``p`` with a sparse gradient ``g`` whose (coalesced) entries
sit at the index set ``I``, and its own step count ``t``; everything outside ``I`` is left as it is::

    g <- -g                                          if maximize
    t <- t + 1                                       (also when g holds no entries)
    m[I] <- m[I] + (1 - beta1) * (g[I] - m[I])
    v[I] <- v[I] + (1 - beta2) * (g[I]**2 - v[I])
    update[I] = -(lr * sqrt(1 - beta2**t) / (1 - beta1**t)) * m[I] / (sqrt(v[I]) + eps)

The update is a sparse tensor over ``I`` (``apply_updates`` adds it to the dense parameter). There is no
foreach path: sparse tensors are handled one at a time. Dense gradients are rejected with torch.optim's message.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (torch.optim.SparseAdam's masked variant).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import per_tensor
from pureopt.kernels.listops import LOOP

__all__ = ["SparseAdamResult", "sparse_adam", "DENSE_GRAD_ERROR"]

DENSE_GRAD_ERROR = "SparseAdam does not support dense gradients, please consider Adam instead"


class SparseAdamResult(NamedTuple):
    """Updates (sparse tensors) and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor]
    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def sparse_adam(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    donate: bool = False,
) -> SparseAdamResult:
    """One SparseAdam step over tensor lists; returns the (sparse) updates and the new state lists.

    Args:
      grads: sparse COO gradients, one per parameter (none of them ``None``); a dense one raises.
      exp_avgs, exp_avg_sqs: dense moment estimates.
      steps: per-parameter step counts (0-d tensors).
      lr: the learning rate (a Python number or a 0-d tensor).
      donate: the caller owns the state buffers: they are updated in place.
    """
    if not all(g.is_sparse for g in grads):
        raise RuntimeError(DENSE_GRAD_ERROR)
    new_steps = LOOP.add_scalar(steps, 1, inplace=donate)
    # torch: step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t) on Python floats; here per tensor in float64
    neg_step_size = per_tensor(
        new_steps, lambda t: -(lr * torch.sqrt(1 - torch.pow(beta2, t)) / (1 - torch.pow(beta1, t)))
    )
    updates, new_ms, new_vs = [], [], []
    for grad, m, v, factor in zip(grads, exp_avgs, exp_avg_sqs, neg_step_size):
        g = -grad if maximize else grad
        g = g.coalesce()  # the update is non-linear in g: duplicate indices must be summed first
        if g.dtype != m.dtype:  # state may be kept in another dtype (state_dtype=)
            g = g.to(m.dtype)
        indices, values = g._indices(), g._values()
        old_m = m.sparse_mask(g)._values()
        m_delta = (values - old_m) * (1 - beta1)
        old_v = v.sparse_mask(g)._values()
        v_delta = (values * values - old_v) * (1 - beta2)
        new_m = m.add_(_sparse(indices, m_delta, g)) if donate else m + _sparse(indices, m_delta, g)
        new_v = v.add_(_sparse(indices, v_delta, g)) if donate else v + _sparse(indices, v_delta, g)
        numer = m_delta + old_m  # torch's order: the new moments' values without another sparse_mask
        denom = (v_delta + old_v).sqrt() + eps
        updates.append(_sparse(indices, numer / denom * factor, g))
        new_ms.append(new_m)
        new_vs.append(new_v)
    return SparseAdamResult(updates, new_steps, new_ms, new_vs)


def _sparse(indices: Tensor, values: Tensor, like: Tensor) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, like.shape, check_invariants=False)
