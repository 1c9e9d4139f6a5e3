"""``sparse_adam``: torch.optim.SparseAdam with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_betas, is_schedule, number
from pureopt.kernels.select import check_impl
from pureopt.optimizers._common import Betas
from pureopt.transforms.sparse_adam import sparse_adam_transform

__all__ = ["sparse_adam"]


def _positive(value: float | Tensor) -> bool:
    number_ = number(value)
    return number_ != number_ or 0.0 < number_


def sparse_adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """SparseAdam, as ``torch.optim.SparseAdam``: Adam masked to the entries of sparse gradients.

    Only the rows present in each (coalesced) sparse gradient update the moments and the parameter; the
    update is a sparse tensor over those rows. Every gradient must be sparse (``nn.Embedding(sparse=True)``);
    a dense one raises torch's RuntimeError. Parameters must be dense and real (checked at ``init``).

    Update rule, per parameter with its own step count ``t``, on the gradient's index set ``I``::

        g <- -g if maximize
        m[I] <- beta1 * m[I] + (1 - beta1) * g[I];   v[I] <- beta2 * v[I] + (1 - beta2) * g[I]**2
        p[I] <- p[I] - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m[I] / (sqrt(v[I]) + eps)

    Args:
      lr: learning rate (> 0; float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (> 0).
      maximize: maximize the objective instead of minimizing.
      impl: ``"auto"`` or ``"loop"``: sparse tensors are processed one at a time (there is no foreach path).
      state_dtype: dtype of the moments (default: the parameter's, as torch).

    Example::

        tx = sparse_adam(lr=1e-3)
        state = tx.init({"emb": embedding.weight.detach()})
        updates, state = tx.update({"emb": embedding.weight.grad}, state)

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (torch.optim.SparseAdam's variant).
    """
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not is_schedule(lr) and not _positive(lr):  # type: ignore[arg-type]
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _positive(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    check_betas(betas)
    check_impl(impl)
    if impl not in ("auto", "loop"):
        raise ValueError(f"sparse_adam has no impl={impl!r} path: sparse gradients are processed one tensor at a time")
    if isinstance(lr, Tensor):
        lr = lr.reshape(())
    return sparse_adam_transform(lr, (float(betas[0]), float(betas[1])), eps, maximize, state_dtype)
