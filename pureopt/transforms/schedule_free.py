"""The Schedule-Free SGD / AdamW transform and ``schedule_free_eval_params`` (train point y -> eval point x).

Train / eval parameters. A schedule-free optimizer works with three sequences (see
:mod:`pureopt.kernels.schedule_free`): the parameters you hold, pass to ``update`` and compute gradients at are
``y``; the state keeps ``z``; the point to *evaluate* (validation, checkpoints for deployment, the final model) is
the average ``x``, which :func:`schedule_free_eval_params` recovers from ``y`` and ``z``::

    y = (1 - beta) * z + beta * x      <=>      x = y + (1 - 1 / beta) * (z - y)

with ``beta`` the momentum (SGD) or ``betas[0]`` (AdamW). Nothing is switched in place: keep training on ``y``
and compute ``x`` whenever you need it (it is a new tree; the params and state are unchanged). Models with
BatchNorm should recompute their running statistics at ``x`` before evaluating, as the paper recommends.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import (
    GradientTransformation,
    LeafList,
    LeafUpdate,
    Params,
    ScalarOrSchedule,
    UpdateContext,
    as_leaf_update,
)
from pureopt.hyperparams import resolve
from pureopt.kernels.common import scalar_dtype
from pureopt.kernels.schedule_free import ScheduleFreeScalars, schedule_free, schedule_free_scalars
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import copy_of, kernel_transform, step_init, zeros
from pureopt.transforms.trust_ratio import with_extra

__all__ = ["ScheduleFreeState", "schedule_free_eval_params", "schedule_free_transform"]

_SCALARS = "_pureopt_schedule_free_scalars"


class ScheduleFreeState(NamedTuple):
    """State of :func:`pureopt.optimizers.schedule_free.schedule_free_sgd` / ``schedule_free_adamw``.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor); the warmup and the averaging weights use it.
      step: per-parameter step counts for Adam's bias correction (AdamW); ``()`` for SGD.
      z: the base sequence, one tensor per parameter (starts at the initial parameters).
      exp_avg_sq: Adam's second moments (AdamW); ``()`` for SGD.
      weight_sum: the sum of the averaging weights so far (0-d tensor).
      lr_max: the largest warmed-up learning rate so far (0-d tensor).
      momentum: ``beta`` of ``y = (1 - beta) z + beta x`` (0-d tensor), read by :func:`schedule_free_eval_params`.
    """

    num_updates: Tensor
    step: Any
    z: Any
    exp_avg_sq: Any
    weight_sum: Tensor
    lr_max: Tensor
    momentum: Tensor


def schedule_free_transform(
    lr: ScalarOrSchedule,
    *,
    beta: float,
    adam: bool,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The schedule-free step (see :mod:`pureopt.kernels.schedule_free`): AdamW if ``adam`` else SGD."""
    check_impl(impl)

    def make_state(num_updates: Tensor, **fields: Any) -> ScheduleFreeState:
        dev = num_updates.device
        dtype = scalar_dtype(dev)
        return ScheduleFreeState(
            num_updates=num_updates,
            **fields,
            weight_sum=torch.zeros((), dtype=dtype, device=dev),
            lr_max=torch.zeros((), dtype=dtype, device=dev),
            momentum=torch.tensor(beta, dtype=dtype, device=dev),
        )

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        scalars: ScheduleFreeScalars = ctx.extra_args[_SCALARS]
        res = schedule_free(
            params,
            grads,
            s["z"],
            s.get("exp_avg_sq"),
            s.get("step"),
            lr=scalars.lr,
            ckp1=scalars.ckp1,
            beta=beta,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates" and v is not None}

    fields = {
        "step": step_init if adam else None,
        "z": copy_of(state_dtype),
        "exp_avg_sq": zeros(state_dtype) if adam else None,
    }
    inner = kernel_transform(make_state, fields, step, elementwise=True)
    inner_update = as_leaf_update(inner)

    def update_leaves(
        updates: LeafList, state: ScheduleFreeState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, ScheduleFreeState]:
        if params is None:
            raise ValueError("schedule-free needs the parameters (the y sequence): call update(grads, state, params)")
        scalars = schedule_free_scalars(
            state.num_updates,
            resolve(lr, state.num_updates),
            state.weight_sum,
            state.lr_max,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
        )
        new_updates, new_state = inner_update(updates, state, params, with_extra(ctx, _SCALARS, scalars))
        return new_updates, new_state._replace(weight_sum=scalars.weight_sum, lr_max=scalars.lr_max)

    return GradientTransformation(inner.init, LeafUpdate(update_leaves, elementwise=True))


def _find_state(state: Any) -> ScheduleFreeState | None:
    if isinstance(state, ScheduleFreeState):
        return state
    if isinstance(state, dict):
        children: list[Any] = list(state.values())
    elif isinstance(state, (tuple, list)):
        children = list(state)
    else:
        return None
    for child in children:
        found = _find_state(child)
        if found is not None:
            return found
    return None


def schedule_free_eval_params(state: Any, params: Params) -> Params:
    """The evaluation parameters ``x`` of a schedule-free optimizer, from the training parameters ``y``.

    ``x = y + (1 - 1 / beta) * (z - y)``, computed in the state's dtype and cast to each parameter's dtype.
    ``state`` may be the schedule-free state or any state containing it (e.g. a chain's tuple). Pure: returns a
    new tree; a leaf whose ``z`` is ``None`` is returned as it is.

    Example::

        tx = pureopt.schedule_free_adamw(lr=2.5e-3, warmup_steps=100)
        ... train on params (y) ...
        eval_params = pureopt.schedule_free_eval_params(state, params)
        val_loss = loss_fn(eval_params, val_batch)
    """
    sf = _find_state(state)
    if sf is None:
        raise ValueError("schedule_free_eval_params: no ScheduleFreeState found in the given optimizer state")
    leaves, spec = _tree.flatten(params)
    zs = _tree.flatten_like(spec, sf.z, "the schedule-free state", "the parameters")
    weight = 1 - 1 / sf.momentum

    def leaf(y: Any, z: Any) -> Any:
        if y is None or z is None:
            return y
        y_s = y.to(z.dtype)
        x = y_s + (z - y_s) * weight.to(z.device)
        return x.to(y.dtype)

    return spec.unflatten([leaf(y, z) for y, z in zip(leaves, zs)])
