"""Schedule-Free SGD / AdamW: three interleaved sequences instead of a learning-rate schedule.

The method keeps a base sequence ``z`` (plain SGD or Adam-normalised steps), an average ``x`` of the ``z``'s (what one
evaluates), and the point ``y`` between them where gradients are taken (the training parameters)::

    y_t     = (1 - beta) * z_t + beta * x_t
    z_{t+1} = z_t - lr_t * d_t                            d_t: the (normalised) gradient at y_t, below
    x_{t+1} = (1 - c_{t+1}) * x_t + c_{t+1} * z_{t+1}

Only ``y`` (the parameters) and ``z`` (state) are stored; ``x = y + (1 - 1 / beta) * (z - y)`` is recovered on
demand by :func:`schedule_free_eval_params` (nothing is switched in place: keep training on ``y``; models with
BatchNorm should recompute their running statistics at ``x`` before evaluating, as the paper recommends).
Eliminating ``x`` gives the step actually applied to the parameters::

    y_{t+1} - y_t = c_{t+1} * (z_t - y_t) + lr_t * (beta * (1 - c_{t+1}) - 1) * d_t

The global scalars follow the reference algorithm, with ``k`` the number of updates so far (0 on the first)::

    lr_t    = lr * min(1, (k + 1) / warmup_steps)            (lr when warmup_steps == 0)
    lr_max  = max(lr_max, lr_t)
    weight  = (k + 1)**r * lr_max**weight_lr_power
    c_{t+1} = weight / (sum of all weights so far)           (0 while that sum is 0)

and the per-parameter direction (``g`` the gradient at ``y``, negated if maximize; ``t`` its own step count)::

    SGD:    d = g + weight_decay * y                                        (beta = momentum)
    AdamW:  v <- beta2 * v + (1 - beta2) * g**2;   d = g / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay * y
                                                                            (beta = betas[0]; no first moment)

Complex tensors are viewed as real pairs.

Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled", NeurIPS 2024.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.algorithms.define import (
    AS_FLOAT,
    LR,
    Algorithm,
    Check,
    Eps,
    Field,
    Global,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    nonneg,
    param_copy,
    state,
)
from pureopt.base import GradientTransformation, LeafList, LeafUpdate, Params, UpdateContext, as_leaf_update
from pureopt.hyperparams import check_betas, resolve
from pureopt.kernels.common import (
    add_scaled,
    add_update,
    ema_of_squares,
    map_scalars_n,
    scalar_dtype,
    scalar_for,
    torch_grad,
)
from pureopt.transforms._util import step_init
from pureopt.transforms.trust_ratio import with_extra

__all__ = [
    "SCHEDULE_FREE",
    "ScheduleFreeScalars",
    "ScheduleFreeState",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_scalars",
    "schedule_free_sgd",
]

_SCALARS = "_pureopt_schedule_free_scalars"


class ScheduleFreeScalars(NamedTuple):
    """The global (not per-parameter) quantities of one schedule-free update, as 0-d tensors."""

    lr: Tensor
    """the warmed-up learning rate ``lr_t``"""
    ckp1: Tensor
    """the averaging weight ``c_{t+1}``"""
    weight_sum: Tensor
    """the new sum of averaging weights"""
    lr_max: Tensor
    """the new largest learning rate so far"""


def schedule_free_scalars(
    num_updates: Tensor,
    lr: float | Tensor,
    weight_sum: Tensor,
    lr_max: Tensor,
    *,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
) -> ScheduleFreeScalars:
    """The warmed-up learning rate, the averaging weight and the new running sums (see module docstring).

    Computed in ``weight_sum``'s dtype on its device, without a host sync.
    """
    dtype, device = weight_sum.dtype, weight_sum.device
    k1 = num_updates.to(dtype=dtype, device=device) + 1
    lr_t = torch.as_tensor(lr, dtype=dtype, device=device)
    if warmup_steps > 0:
        lr_t = lr_t * torch.clamp(k1 / warmup_steps, max=1.0)
    new_lr_max = torch.maximum(lr_max, lr_t)
    weight = torch.pow(k1, r) * torch.pow(new_lr_max, weight_lr_power)
    new_sum = weight_sum + weight
    positive = new_sum > 0
    ckp1 = torch.where(positive, weight / torch.where(positive, new_sum, torch.ones_like(new_sum)), 0.0)
    return ScheduleFreeScalars(lr_t, ckp1, new_sum, new_lr_max)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    if not k.h.adam:
        return {}
    (bc2,) = map_scalars_n(lambda t: (1 - torch.pow(k.h.beta2, t),), steps, outputs=1, like=k.exp_avg_sq)
    return {"bc2": bc2}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, y, z = k.ops, k.h, k.p, k.z
    sc: ScheduleFreeScalars = k.extra[_SCALARS]
    lr, ckp1 = sc.lr, sc.ckp1
    coef = lr * (h.beta * (1 - ckp1) - 1)
    g, owned = torch_grad(ops, k.g, None, maximize=h.maximize, weight_decay=0.0)
    new = {}
    if h.adam:
        new_v = new["exp_avg_sq"] = ema_of_squares(ops, k.exp_avg_sq, g, h.beta2, donate=k.donate)
        denom = ops.add_scalar(ops.sqrt(ops.div(new_v, k.bc2), inplace=True), h.eps, inplace=True)
        g, owned = ops.div_list(g, denom, inplace=owned), True
    if h.weight_decay != 0:
        g, owned = ops.add(g, y, alpha=h.weight_decay, inplace=owned), True
    if k.apply:  # the reference's ops: y.lerp_(z, ckp1); y.add_(d, alpha=lr * (beta * (1 - ckp1) - 1))
        ops.lerp(y, z, scalar_for(ckp1, y), inplace=True)
        add_update(ops, y, g, coef, owned=owned)
        updates = None
    else:
        updates = ops.mul(ops.sub(z, y), scalar_for(ckp1, z), inplace=True)
        updates = add_scaled(ops, updates, g, coef, inplace=True)
    # z - lr * d with one rounding (the reference's z.sub_(d, alpha=lr))
    new["z"] = ops.addcmul(z, g, scalar_for(-lr, z), inplace=k.donate)  # type: ignore[arg-type]
    return updates, new


def _zero(h: Any, device: torch.device) -> Tensor:
    return torch.zeros((), dtype=scalar_dtype(device), device=device)


SCHEDULE_FREE = Algorithm(
    "ScheduleFree",
    record="ScheduleFreeState",
    fields={
        "step": Field(
            "per-parameter step counts for Adam's bias correction (AdamW)",
            lambda h, dtype: step_init,
            when=lambda h: h.adam,
            per_tensor=True,
        ),
        "z": param_copy("the base sequence, one tensor per parameter (starts at the initial parameters)."),
        "exp_avg_sq": state("Adam's second moments (AdamW).", when=lambda h: h.adam, nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    global_fields={
        "weight_sum": Global("the sum of the averaging weights so far (0-d tensor).", _zero),
        "lr_max": Global("the largest warmed-up learning rate so far (0-d tensor).", _zero),
        "momentum": Global(
            "``beta`` of ``y = (1 - beta) z + beta x`` (0-d tensor), read by :func:`schedule_free_eval_params`.",
            lambda h, device: torch.tensor(h.beta, dtype=scalar_dtype(device), device=device),
        ),
    },
    updates_globals=False,  # (advanced by _with_scalars, outside the math: chunked on the applied CPU path)
    check_order=("lr", "eps", "betas"),
    doc="State of :func:`schedule_free_sgd` / :func:`schedule_free_adamw`.",
)
ScheduleFreeState = SCHEDULE_FREE.state


def _interpolation(value: Any, name: str) -> Any:
    if not 0.0 < value < 1.0:
        raise ValueError(f"Invalid momentum value: {value} (schedule-free needs 0 < momentum < 1)")
    return value


def _betas(value: Any, name: str) -> tuple[float, float]:
    check_betas(value)
    if not float(value[0]) > 0:
        raise ValueError(f"Invalid beta parameter at index 0: {value[0]} (schedule-free needs 0 < beta1 < 1)")
    return float(value[0]), float(value[1])


def _warmup(value: Any, name: str) -> Any:
    if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"Invalid warmup_steps value: {value}")
    return value


Warmup = Annotated[int, Check(_warmup)]
Power = Annotated[float, nonneg(), AS_FLOAT]


def _with_scalars(inner: GradientTransformation, h: Mapping[str, Any]) -> GradientTransformation:
    """``inner`` given the global scalars of each update (computed once, from the update count), which then
    advances ``weight_sum`` and ``lr_max``."""
    inner_update = as_leaf_update(inner)

    def update_leaves(updates: LeafList, state: Any, params: LeafList | None, ctx: UpdateContext) -> Any:
        if params is None:
            raise ValueError("schedule-free needs the parameters (the y sequence): call update(grads, state, params)")
        scalars = schedule_free_scalars(
            state.num_updates,
            resolve(h["lr"], state.num_updates),
            state.weight_sum,
            state.lr_max,
            warmup_steps=h["warmup_steps"],
            r=h["r"],
            weight_lr_power=h["weight_lr_power"],
        )
        new_updates, new_state = inner_update(updates, state, params, with_extra(ctx, _SCALARS, scalars))
        return new_updates, new_state._replace(weight_sum=scalars.weight_sum, lr_max=scalars.lr_max)

    return GradientTransformation(inner.init, LeafUpdate(update_leaves, elementwise=True))


@SCHEDULE_FREE.public
def schedule_free_sgd(
    lr: LR = 1.0,
    momentum: Annotated[float, Check(_interpolation)] = 0.9,
    weight_decay: NonNeg = 0.0,
    *,
    warmup_steps: Warmup = 0,
    r: Power = 0.0,
    weight_lr_power: Power = 2.0,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Schedule-Free SGD: SGD steps on ``z``, gradients at ``y``, evaluation at the running average ``x`` (the rule
    is in the module docstring, ``beta = momentum``). Train on ``y`` (the parameters); evaluate at
    ``x = schedule_free_eval_params(state, params)``. No schedule is needed: a constant ``lr`` (with a short
    warmup) is the intended use, though a schedule or 0-d tensor is accepted.

    Args:
      lr: learning rate (the reference default is 1.0).
      momentum: ``beta``, the interpolation between ``z`` and ``x``; strictly between 0 and 1.
      weight_decay: L2 penalty evaluated at ``y``.
      warmup_steps: linear learning-rate warmup length (0: none).
      r: the averaging weights grow like ``(k + 1)**r`` (0: uniform).
      weight_lr_power: the averaging weights are proportional to ``lr_max**weight_lr_power`` (discounts warmup).
      state_dtype: dtype of ``z`` (default: the parameter's); e.g. ``torch.float32`` for bf16 params.

    Example::

        tx = pureopt.schedule_free_sgd(lr=0.5, warmup_steps=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)   # grads at params (y)
        params = pureopt.apply_updates(params, updates)
        eval_params = pureopt.schedule_free_eval_params(state, params)

    Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
    """
    h = dict(locals())
    return _with_scalars(SCHEDULE_FREE.build(h, beta=float(momentum), adam=False, beta2=0.0, eps=0.0), h)


@SCHEDULE_FREE.public
def schedule_free_adamw(
    lr: LR = 0.0025,
    betas: Annotated[tuple[float | Tensor, float | Tensor], Check(_betas)] = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    *,
    warmup_steps: Warmup = 0,
    r: Power = 0.0,
    weight_lr_power: Power = 2.0,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Schedule-Free AdamW: as :func:`schedule_free_sgd` with Adam-normalised gradients and ``beta = betas[0]``
    (the rule is in the module docstring). There is no first-moment buffer: ``beta1`` is the interpolation
    ``y = (1 - beta1) z + beta1 x``. Train on ``y`` (the parameters); evaluate at
    ``x = schedule_free_eval_params(state, params)``.

    Args:
      lr: learning rate (the reference default is 0.0025).
      betas: ``beta1`` (interpolation, strictly between 0 and 1) and ``beta2`` (second-moment decay).
      eps: added to the denominator.
      weight_decay: decoupled weight decay evaluated at ``y`` (multiplied by ``lr``).
      warmup_steps: linear learning-rate warmup length (0: none).
      r: the averaging weights grow like ``(k + 1)**r`` (0: uniform).
      weight_lr_power: the averaging weights are proportional to ``lr_max**weight_lr_power``.

    Example::

        tx = pureopt.schedule_free_adamw(lr=2.5e-3, warmup_steps=1000, weight_decay=0.01)

    Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
    """
    h = dict(locals())
    return _with_scalars(SCHEDULE_FREE.build(h, beta=betas[0], adam=True, beta2=betas[1]), h)


def _find_state(state: Any) -> Any:
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
