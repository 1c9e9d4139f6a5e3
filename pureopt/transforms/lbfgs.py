"""The L-BFGS transform: torch.optim.LBFGS's whole ``step(closure)`` as a pure ``update`` (see kernels/lbfgs.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import GradientTransformation, LeafList, ScalarOrSchedule, UpdateContext, leaf_transformation
from pureopt.hyperparams import resolve
from pureopt.kernels.lbfgs import LBFGSState, ValueAndGrad, init_memory, lbfgs
from pureopt.transforms._util import count_device, gather, new_count, scatter
from pureopt.tree import PyTreeSpec

__all__ = ["LBFGSState", "lbfgs_transform", "flat_dtype"]  # (the state record: pureopt.kernels.lbfgs.LBFGSState)


_MISSING_FN = (
    "L-BFGS re-evaluates the objective during its step: call tx.update(grads, state, params, value_fn=f) with "
    "f(params) -> (loss, grads), or loss_fn=f with f(params) -> loss (gradients by torch.func.grad)"
)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def flat_dtype(leaves: list[Tensor], state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of L-BFGS's flat vectors: ``state_dtype``, else the promotion of the parameters' (real) dtypes."""
    if state_dtype is not None:
        return state_dtype
    return functools.reduce(torch.promote_types, [_real_dtype(p.dtype) for p in leaves])


def _value_and_grad(ctx: UpdateContext, idx: list[int], num_leaves: int) -> ValueAndGrad:
    """The objective from ``update``'s keyword arguments, as a function of the present parameters' list."""
    value_fn = ctx.extra_args.get("value_fn")
    loss_fn = ctx.extra_args.get("loss_fn")
    if value_fn is None and loss_fn is None:
        raise ValueError(_MISSING_FN)
    if value_fn is not None and loss_fn is not None:
        raise ValueError("pass either value_fn or loss_fn to the L-BFGS update, not both")
    fn: Callable[[Any], tuple[Any, Any]]
    if value_fn is not None:
        fn = value_fn
    else:
        grad_and_value = torch.func.grad_and_value(loss_fn)  # type: ignore[arg-type]

        def fn(tree: Any) -> tuple[Any, Any]:
            g, value = grad_and_value(tree)
            return value, g

    def value_and_grad(present: list[Tensor]) -> tuple[Any, list[Tensor | None]]:
        tree = ctx.spec.unflatten(scatter([None] * num_leaves, idx, present))
        value, grads = fn(tree)
        leaves = _tree.flatten_like(ctx.spec, grads, what="the gradients value_fn returned", against="the parameters")
        return value, gather(leaves, idx)

    return value_and_grad


def lbfgs_transform(
    lr: ScalarOrSchedule,
    max_iter: int,
    max_eval: int,
    tolerance_grad: float,
    tolerance_change: float,
    history_size: int,
    line_search_fn: str | None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """torch.optim.LBFGS's step as a transformation; ``update`` needs ``value_fn=`` or ``loss_fn=``.

    ``update(grads, state, params, *, value_fn=None, loss_fn=None, loss=None)``: with ``loss`` (the loss at
    ``params``), ``(loss, grads)`` is the first evaluation of the step; without it, the objective is evaluated
    at ``params`` first (torch's first closure call; ``grads`` then only give the structure). Parameters whose
    leaf is ``None`` are left out.
    """

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> LBFGSState:
        del spec
        present = [p for p in leaves if p is not None]
        numel = sum(2 * p.numel() if p.is_complex() else p.numel() for p in present)
        dtype = flat_dtype(present, state_dtype) if present else torch.get_default_dtype()
        return init_memory(numel, history_size, dtype, count_device(present))._replace(num_updates=new_count(leaves))

    def update_leaves(
        updates: LeafList, state: LBFGSState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, LBFGSState]:
        if params is None:
            raise ValueError("lbfgs needs the parameters: call update(grads, state, params, value_fn=f)")
        idx = [i for i, p in enumerate(params) if p is not None]
        value_and_grad = _value_and_grad(ctx, idx, len(params))
        present = gather(params, idx)
        loss = ctx.extra_args.get("loss")
        if loss is None:
            with torch.enable_grad():  # as torch calls its closure
                loss, grads = value_and_grad(present)
        else:
            grads = gather(updates, idx)
        res = lbfgs(
            present,
            loss,
            grads,
            state,
            value_and_grad,
            lr=resolve(lr, state.num_updates),
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
            donate=ctx.donate,
        )
        return scatter([None] * len(params), idx, res.updates), res.memory._replace(num_updates=state.num_updates + 1)

    return leaf_transformation(init_leaves, update_leaves)
