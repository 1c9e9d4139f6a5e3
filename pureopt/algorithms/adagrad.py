"""Adagrad (with lr_decay, weight decay, maximize, sparse gradients), as torch.optim.Adagrad.

Update rule, per parameter ``p`` with gradient ``g``, accumulator ``s`` (initialised to
``initial_accumulator_value``) and its own step count ``t``::

    t <- t + 1
    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 (dense gradients only)
    clr = lr / (1 + (t - 1) * lr_decay)
    s <- s + g * g
    update = -clr * g / (sqrt(s) + eps)

The ``scale_by_adagrad`` form returns the positive direction ``g / (sqrt(s) + eps)``. Runs torch's
``_fused_adagrad_`` (CPU only, float ``lr``) where it can take the tensors.

Sparse (COO) gradients, e.g. from ``nn.Embedding(sparse=True)``, are accepted as torch.optim.Adagrad accepts
them: the gradient is coalesced, only the rows it holds update the accumulator, and the update is a sparse
tensor over the same rows (``apply_updates`` adds it to the dense parameter). They always take the per-tensor
path; the dense gradients of the same call still take the requested path. As in torch, ``weight_decay`` cannot
be combined with sparse gradients. Complex (dense) tensors are viewed as real pairs, as torch.optim does (both
parts of the accumulator start at ``initial_accumulator_value``).

Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
JMLR 12, 2011.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Eps, Field, Hyper, Impl, Kernel, NonNeg, StateDtype, step_count
from pureopt.base import GradientTransformation, UpdateContext, add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import cast_like, over, per_tensor, scalars_for, torch_grad
from pureopt.kernels.listops import FOREACH, LOOP
from pureopt.transforms._util import LeafInitFn

__all__ = ["ADAGRAD", "SPARSE_WEIGHT_DECAY_ERROR", "ScaleByAdagradState", "adagrad", "scale_by_adagrad"]

SPARSE_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"

Out = tuple[list[Tensor] | None, Mapping[str, Any]]


def _accumulator_init(h: Hyper, dtype: torch.dtype | None) -> LeafInitFn:
    """``value`` everywhere; ``value + value*1j`` for complex parameters (torch sets both components)."""
    value = float(h.initial_accumulator_value)

    def init(p: Tensor) -> Tensor:
        fill = complex(value, value) if (dtype or p.dtype).is_complex else value
        return torch.full_like(p, fill, dtype=dtype)

    return init


def _neg_clr(steps: list[Tensor], lr: float | Tensor, lr_decay: float) -> list[Tensor]:
    """``-lr / (1 + (t - 1) * lr_decay)`` per tensor, in float64 (torch computes it on Python floats)."""
    return per_tensor(steps, lambda t: over(-lr, 1 + (t - 1) * lr_decay))


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    return {} if k.h.lr is None else {"neg_clr": scalars_for(_neg_clr(steps, k.h.lr, k.h.lr_decay), k.g)}


def _math(k: Kernel) -> Out:
    ops, h = k.ops, k.h
    g, owned = torch_grad(ops, k.g, k.p, maximize=h.maximize, weight_decay=h.weight_decay)
    new_sums = ops.addcmul(k.sum, g, g, value=1.0, inplace=k.donate)
    std = ops.add_scalar(ops.sqrt(new_sums), h.eps, inplace=True)
    if h.lr is not None:  # (-clr * g) / std: torch's addcdiv order, so p + update is bitwise torch's result
        g, owned = ops.mul(g, k.neg_clr, inplace=owned), True
    updates = ops.div_list(g, std, inplace=owned)
    if k.apply:
        add_inplace(k.p, updates)
        return None, {"sum": new_sums}
    return updates, {"sum": new_sums}


def _fused_math(k: Kernel, plan: _fused.Plan) -> Out:
    """The dense step through ``torch._fused_adagrad_``: torch's own call on the parameters when the step applies
    them with a learning rate (GradScaler's arguments passed on), else pointed at a zero buffer."""
    h, ctx, params, grads, donate = k.h, k.ctx, k.p, k.g, k.donate
    new_steps = FOREACH.add_scalar(k.step, 1, inplace=donate)
    sums = k.sum if donate else _fused.clone_all(k.sum)
    # lr=None (scale_by_adagrad): lr=-1 and no decay write +direction into the zero buffer
    kernel_lr = -1.0 if h.lr is None else float(h.lr)
    kernel_decay = 0.0 if h.lr is None else h.lr_decay
    own_call = k.apply and h.lr is not None

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        s, st = take(sums, idx), take(new_steps, idx)
        g = cast_like(take(grads, idx), s)
        p = take(params, idx) if params is not None else None
        if own_call and p is not None and all(x.dtype == y.dtype for x, y in zip(p, s)):
            amp = _fused.amp_kwargs(ctx.grad_scale, ctx.found_inf, s[0].device)
            torch._fused_adagrad_(p, g, s, st, lr=kernel_lr, lr_decay=kernel_decay, weight_decay=h.weight_decay,
                                  eps=h.eps, maximize=h.maximize, **amp)  # fmt: skip
            _fused.undo_steps(st, amp["found_inf"])
            return None
        assert ctx.grad_scale is None and ctx.found_inf is None
        g = _fused.folded_grads(g, p, h.maximize, h.weight_decay)
        updates = _fused.zeros_like_all(s)
        torch._fused_adagrad_(updates, g, s, st, lr=kernel_lr, lr_decay=kernel_decay, weight_decay=0.0, eps=h.eps,
                              maximize=False)  # fmt: skip
        if k.apply:
            add_inplace(p, updates)
            return None
        return updates

    return _fused.run_grouped(len(grads), plan, body), {"step": new_steps, "sum": sums}


def _sparse(
    run: Any, h: Hyper, impl: str, params: list[Tensor] | None, grads: list[Tensor], s: Any, ctx: UpdateContext
) -> Out:
    """Some gradients sparse: the dense ones take ``run``, the sparse ones the per-tensor loop below, where only
    the rows present in the gradient change; the updates are then added to the parameters if the step applies."""
    apply = ctx.apply and ctx.donate and params is not None
    if ctx.grad_scale is not None or ctx.found_inf is not None:
        unscaled = _fused.amp_unscale(grads, ctx.grad_scale, ctx.found_inf)
        if unscaled is None:
            return _fused.skipped_updates(grads, apply), {}
        grads, ctx = unscaled, ctx.but(grad_scale=None, found_inf=None)
    if h.weight_decay != 0:
        raise RuntimeError(SPARSE_WEIGHT_DECAY_ERROR)
    sparse = [i for i, g in enumerate(grads) if g.is_sparse]
    dense = [i for i, g in enumerate(grads) if not g.is_sparse]
    updates: list[Any] = [None] * len(grads)
    sums: list[Any] = [None] * len(grads)
    steps: list[Any] = [None] * len(grads)
    if dense:
        sub = {key: [s[key][i] for i in dense] for key in ("step", "sum")}
        sub_params = None if params is None else [params[i] for i in dense]
        res, new = run(h, impl, sub_params, [grads[i] for i in dense], sub, ctx.but(apply=False))
        for j, i in enumerate(dense):
            updates[i], sums[i], steps[i] = res[j], new["sum"][j], new["step"][j]
    new_steps = LOOP.add_scalar([s["step"][i] for i in sparse], 1, inplace=ctx.donate)
    neg_clr = _neg_clr(new_steps, h.lr, h.lr_decay) if h.lr is not None else [None] * len(sparse)
    for i, st, factor in zip(sparse, new_steps, neg_clr):
        state_sum = s["sum"][i]
        g = -grads[i] if h.maximize else grads[i]
        g = g.coalesce()  # the update is non-linear in g: duplicate indices must be summed first
        if g.dtype != state_sum.dtype:
            g = g.to(state_sum.dtype)
        indices, values = g._indices(), g._values()
        squares = torch.sparse_coo_tensor(indices, values * values, g.shape, check_invariants=False)
        new_sum = state_sum.add_(squares) if ctx.donate else state_sum + squares
        std_values = new_sum.sparse_mask(g)._values().sqrt() + h.eps
        step_values = values / std_values
        if factor is not None:
            step_values = step_values * factor
        updates[i] = torch.sparse_coo_tensor(indices, step_values, g.shape, check_invariants=False)
        sums[i], steps[i] = new_sum, st
    if apply:
        add_inplace(params, updates)  # type: ignore[arg-type]
        return None, {"step": steps, "sum": sums}
    return updates, {"step": steps, "sum": sums}


ADAGRAD = Algorithm(
    "Adagrad",
    record="ScaleByAdagradState",
    fields={
        "step": step_count(),
        "sum": Field(
            "per-parameter sums of squared gradients (dense, shaped like the parameter).",
            _accumulator_init,
            nonneg=True,
        ),
    },
    math=_math,
    scalars=_scalars,
    fused=_fused_math,
    fused_state=("sum",),
    fused_devices=("cpu",),  # torch._fused_adagrad_ exists on the CPU only; CUDA takes foreach
    fused_when=lambda h: not isinstance(h.lr, Tensor),
    neutral={"lr_decay": 0.0},
    sparse=_sparse,
    amp_native=True,
    doc="State of :func:`adagrad` and :func:`scale_by_adagrad` (torch.optim.Adagrad's state keys).",
)
ScaleByAdagradState = ADAGRAD.state


@ADAGRAD.public
def adagrad(
    lr: LR = 1e-2,
    lr_decay: NonNeg = 0.0,
    weight_decay: NonNeg = 0.0,
    initial_accumulator_value: NonNeg = 0.0,
    eps: Eps = 1e-10,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adagrad, as ``torch.optim.Adagrad``: per-coordinate step sizes from the sum of past squared gradients (the
    rule is in the module docstring).

    Args:
      lr_decay: learning-rate decay: the step size at step ``t`` is ``lr / (1 + (t - 1) * lr_decay)``.
      weight_decay: L2 penalty added to the gradient.
      initial_accumulator_value: starting value of the sums of squared gradients.
      eps: term added to the denominator (after the square root).
      impl: kernel path for dense gradients, ``"auto" | "loop" | "foreach" | "fused"`` (sparse ones use the loop).
      state_dtype: dtype of the accumulators (default: the parameter's, as torch); e.g. ``torch.float32`` for
        bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.adagrad(lr=0.1, lr_decay=1e-4)

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
    JMLR 12, 2011.
    """
    return ADAGRAD.build(locals())


@ADAGRAD.public
def scale_by_adagrad(
    initial_accumulator_value: NonNeg = 0.0,
    eps: Eps = 1e-10,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Rescale updates by the root of the sum of all past squared gradients, ``g / (sqrt(s) + eps)`` with
    ``s <- s + g * g`` from ``initial_accumulator_value`` (Adagrad, torch's eps placement). Sparse (COO)
    gradients are accepted: only their rows change, and the update is sparse over the same rows.

    Example::

        tx = pureopt.chain(pureopt.scale_by_adagrad(), pureopt.scale_by_learning_rate(0.1))

    Duchi, Hazan & Singer, JMLR 12, 2011.
    """
    return ADAGRAD.build(locals())
