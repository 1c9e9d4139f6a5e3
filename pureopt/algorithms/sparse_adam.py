"""SparseAdam: Adam masked to the entries of sparse (COO) gradients, as torch.optim.SparseAdam.

Update rule, per parameter ``p`` with a sparse gradient ``g`` whose (coalesced) entries sit at the index set ``I``,
and its own step count ``t``; everything outside ``I`` is left as it is::

    g <- -g                                          if maximize
    t <- t + 1                                       (also when g holds no entries)
    m[I] <- m[I] + (1 - beta1) * (g[I] - m[I])
    v[I] <- v[I] + (1 - beta2) * (g[I]**2 - v[I])
    update[I] = -(lr * sqrt(1 - beta2**t) / (1 - beta1**t)) * m[I] / (sqrt(v[I]) + eps)

The update is a sparse tensor over ``I`` (``apply_updates`` adds it to the dense parameter). Every gradient must be
sparse (``nn.Embedding(sparse=True)``): a dense one raises torch's RuntimeError. Parameters must be dense and real
(checked at ``init``). There is no foreach path: sparse tensors are handled one at a time.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (torch.optim.SparseAdam's masked variant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.algorithms.define import Algorithm, Betas, Check, Hyper, Impl, Kernel, StateDtype, state, step_count
from pureopt.base import GradientTransformation, LeafInit, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import is_schedule, number
from pureopt.kernels.common import per_tensor
from pureopt.kernels.listops import LOOP
from pureopt.tree import PyTreeSpec

__all__ = ["DENSE_GRAD_ERROR", "SPARSE_ADAM", "SparseAdamState", "sparse_adam"]

DENSE_GRAD_ERROR = "SparseAdam does not support dense gradients, please consider Adam instead"

Out = tuple[list[Tensor] | None, Mapping[str, Any]]


def _positive(value: float | Tensor) -> bool:
    number_ = number(value)
    return number_ != number_ or 0.0 < number_


def _lr(value: Any, name: str) -> Any:
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not is_schedule(value) and not _positive(value):
        raise ValueError(f"Invalid learning rate: {value}")
    return value.reshape(()) if isinstance(value, Tensor) else value


def _eps(value: Any, name: str) -> Any:
    if not _positive(value):
        raise ValueError(f"Invalid epsilon value: {value}")
    return value


def _no_dense(k: Kernel) -> Out:
    raise RuntimeError(DENSE_GRAD_ERROR)  # (the engine refuses dense gradients before anything runs)


def _sparse_step(
    run: Any, h: Hyper, impl: str, params: list[Tensor] | None, grads: list[Tensor], s: Any, ctx: UpdateContext
) -> Out:
    """The whole step: one sparse tensor at a time; only the entries of each gradient change."""
    beta1, beta2 = h.betas
    lr, eps, donate = h.lr, h.eps, ctx.donate
    new_steps = LOOP.add_scalar(s["step"], 1, inplace=donate)
    # torch: step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t) on Python floats; here per tensor in float64
    neg_step_size = per_tensor(
        new_steps, lambda t: -(lr * torch.sqrt(1 - torch.pow(beta2, t)) / (1 - torch.pow(beta1, t)))
    )
    updates, new_ms, new_vs = [], [], []
    for grad, m, v, factor in zip(grads, s["exp_avg"], s["exp_avg_sq"], neg_step_size):
        g = -grad if h.maximize else grad
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
    return updates, {"step": new_steps, "exp_avg": new_ms, "exp_avg_sq": new_vs}


def _sparse(indices: Tensor, values: Tensor, like: Tensor) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, like.shape, check_invariants=False)


SPARSE_ADAM = Algorithm(
    "SparseAdam",
    record="SparseAdamState",
    fields={
        "step": step_count(
            "per-parameter step counts (0-d float tensors; torch keeps a Python int under the same key)."
        ),
        "exp_avg": state("first moments (dense; only the rows present in a gradient change)."),
        "exp_avg_sq": state("second moments (dense; only the rows present in a gradient change).", nonneg=True),
    },
    math=_no_dense,
    sparse=_sparse_step,
    dense_error=DENSE_GRAD_ERROR,
    check_order=("lr", "eps", "betas"),
    doc="State of :func:`sparse_adam` (torch.optim.SparseAdam's state keys).",
)
SparseAdamState = SPARSE_ADAM.state


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


@SPARSE_ADAM.public
def sparse_adam(
    lr: Annotated[ScalarOrSchedule, Check(_lr)] = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Annotated[float, Check(_eps)] = 1e-8,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """SparseAdam, as ``torch.optim.SparseAdam``: Adam masked to the entries of sparse gradients (the rule is in
    the module docstring).

    Args:
      lr: learning rate (> 0; float, 0-d tensor or schedule).
      betas: coefficients of the running averages of the gradient and its square.
      eps: term added to the denominator (> 0).
      maximize: maximize the objective instead of minimizing.
      impl: ``"auto"`` or ``"loop"``: sparse tensors are processed one at a time (there is no foreach path).
      state_dtype: dtype of the moments (default: the parameter's, as torch).

    Example::

        tx = pureopt.sparse_adam(lr=1e-3)
        state = tx.init({"emb": embedding.weight.detach()})
        updates, state = tx.update({"emb": embedding.weight.grad}, state)

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (torch.optim.SparseAdam's variant).
    """
    if impl not in ("auto", "loop"):
        raise ValueError(f"sparse_adam has no impl={impl!r} path: sparse gradients are processed one tensor at a time")
    tx = SPARSE_ADAM.build(locals())
    inner_init = tx.init.init_leaves  # type: ignore[attr-defined]

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> Any:
        _check_params(spec.unflatten(leaves))
        return inner_init(leaves, spec)

    return GradientTransformation(LeafInit(init_leaves), tx.update)
