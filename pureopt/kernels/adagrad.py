"""Adagrad (with lr_decay, weight decay, maximize, sparse gradients): torch.optim.Adagrad's math on lists.

Update rule (torch.optim.Adagrad), per parameter ``p`` with gradient ``g``, accumulator ``s`` (initialised to
``initial_accumulator_value``) and its own step count ``t``::

    t <- t + 1
    g <- -g                                          if maximize
    g <- g + weight_decay * p                        if weight_decay != 0 (dense gradients only)
    clr = lr / (1 + (t - 1) * lr_decay)
    s <- s + g * g
    update = -clr * g / (sqrt(s) + eps)

``lr=None`` returns the positive direction ``g / (sqrt(s) + eps)`` (used by :func:`scale_by_adagrad`).

Sparse (COO) gradients, e.g. from ``nn.Embedding(sparse=True)``, are accepted as torch.optim.Adagrad accepts
them: the gradient is coalesced, only the rows it holds update the accumulator, and the update is a sparse
tensor over the same rows (``apply_updates`` adds it to the dense parameter). They always take the per-tensor
path; the dense gradients of the same call still take the requested path. As in torch, ``weight_decay`` cannot
be combined with sparse gradients. Complex (dense) tensors are viewed as real pairs, as torch.optim does.

Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
JMLR 12, 2011.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.base import add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import as_complex_like, as_real, cast_like, over, per_tensor, scalars_for, torch_grad
from pureopt.kernels.listops import FOREACH, LOOP, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["AdagradResult", "adagrad", "SPARSE_WEIGHT_DECAY_ERROR"]

SPARSE_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"


class AdagradResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    sum: list[Tensor]


_FUSED_DEVICES = ("cpu",)  # torch._fused_adagrad_ exists on the CPU only; CUDA takes foreach


def adagrad(
    params: list[Tensor] | None,
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> AdagradResult:
    """One Adagrad step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      params: the parameters (needed when ``weight_decay != 0``).
      grads: the gradients, dense or sparse COO (none of them ``None``).
      state_sums: the accumulators of squared gradients (torch's ``sum``), dense.
      steps: per-parameter step counts (0-d tensors).
      lr: the learning rate; ``None`` returns the unscaled direction (no ``lr_decay`` either).
      impl: ``"auto" | "loop" | "foreach"`` for the dense gradients; sparse ones always take the loop.
      donate: the caller owns the state buffers: they are updated in place.
      apply: with ``donate`` and ``params``, also add the updates to the parameters and return ``updates=None``
        (dense gradients with a float ``lr`` run ``torch._fused_adagrad_`` on the parameters, as torch does).
      grad_scale, found_inf: GradScaler's (see :class:`pureopt.base.UpdateContext`); passed to torch's fused
        kernel when it runs on the parameters, else gradients are unscaled out of place and a set ``found_inf``
        skips the step (host sync).
    """
    sparse = [i for i, g in enumerate(grads) if g.is_sparse]
    amp = grad_scale is not None or found_inf is not None
    if apply and donate and params is not None:
        if not sparse and impl in ("auto", "fused") and not isinstance(lr, Tensor) and lr is not None:
            plan = _fused.fused_plan([*grads, *params], state_sums, impl=impl, devices=_FUSED_DEVICES)
            if plan is not None and (not amp or _fused.same_dtypes(params, state_sums)):
                return _adagrad_fused(plan, params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps,
                                      maximize, donate=True, apply=True, grad_scale=grad_scale,
                                      found_inf=found_inf)  # fmt: skip
    if amp:  # not torch's own fused call: unscale out of place, skip on a host check
        unscaled = _fused.amp_unscale(grads, grad_scale, found_inf)
        if unscaled is None:
            return AdagradResult(
                _fused.skipped_updates(grads, apply and donate and params is not None), steps, state_sums
            )
        return adagrad(params, unscaled, state_sums, steps, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                       eps=eps, maximize=maximize, impl=impl, donate=donate, apply=apply)  # fmt: skip
    if apply and donate and params is not None:
        res = adagrad(params, grads, state_sums, steps, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                      maximize=maximize, impl=impl, donate=donate)  # fmt: skip
        add_inplace(params, res.updates)  # type: ignore[arg-type]
        return res._replace(updates=None)
    if sparse and weight_decay != 0:
        raise RuntimeError(SPARSE_WEIGHT_DECAY_ERROR)
    if weight_decay != 0 and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    if not sparse:
        return _adagrad_dense(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, maximize, impl, donate)
    dense = [i for i, g in enumerate(grads) if not g.is_sparse]
    out_updates: list[Tensor | None] = [None] * len(grads)
    out_sums: list[Tensor | None] = [None] * len(grads)
    out_steps: list[Tensor | None] = [None] * len(grads)
    if dense:
        res = _adagrad_dense(
            None if params is None else [params[i] for i in dense],
            [grads[i] for i in dense],
            [state_sums[i] for i in dense],
            [steps[i] for i in dense],
            lr,
            lr_decay,
            weight_decay,
            eps,
            maximize,
            impl,
            donate,
        )
        for j, i in enumerate(dense):
            out_updates[i], out_sums[i], out_steps[i] = res.updates[j], res.sum[j], res.step[j]  # type: ignore[index]
    res = _adagrad_sparse(
        [grads[i] for i in sparse], [state_sums[i] for i in sparse], [steps[i] for i in sparse], lr, lr_decay, eps,
        maximize, donate,
    )  # fmt: skip
    for j, i in enumerate(sparse):
        out_updates[i], out_sums[i], out_steps[i] = res.updates[j], res.sum[j], res.step[j]  # type: ignore[index]
    return AdagradResult(out_updates, out_steps, out_sums)  # type: ignore[arg-type]


def _neg_clr(steps: list[Tensor], lr: float | Tensor, lr_decay: float) -> list[Tensor]:
    """``-lr / (1 + (t - 1) * lr_decay)`` per tensor, in float64 (torch computes it on Python floats)."""
    return per_tensor(steps, lambda t: over(-lr, 1 + (t - 1) * lr_decay))


def _adagrad_dense(
    params: list[Tensor] | None,
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    lr: float | Tensor | None,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    impl: str,
    donate: bool,
) -> AdagradResult:
    plan = None
    # torch's fused Adagrad: a float lr only
    if impl in ("auto", "fused") and not isinstance(lr, Tensor):
        plan = _fused.fused_plan([*grads, *(params or [])], state_sums, impl=impl, devices=_FUSED_DEVICES)
    path = choose_impl(impl, grads, fused_available=plan is not None)
    if path == "fused":
        assert plan is not None
        return _adagrad_fused(plan, params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, maximize,
                              donate=donate, apply=False)  # fmt: skip
    ops = ops_for(path)
    like = grads
    sums = as_real(state_sums)
    g = cast_like(as_real(grads), sums)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), sums) if weight_decay != 0 else None  # type: ignore[arg-type]
    g, owned = torch_grad(ops, g, rparams, maximize=maximize, weight_decay=weight_decay)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    new_sums = ops.addcmul(sums, g, g, value=1.0, inplace=donate)
    std = ops.add_scalar(ops.sqrt(new_sums), eps, inplace=True)
    if lr is not None:  # (-clr * g) / std: torch's addcdiv order, so p + update is bitwise torch's result
        g, owned = ops.mul(g, scalars_for(_neg_clr(new_steps, lr, lr_decay), g), inplace=owned), True
    updates = ops.div_list(g, std, inplace=owned)
    return AdagradResult(as_complex_like(updates, like), new_steps, as_complex_like(new_sums, like))


def _adagrad_sparse(
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    lr: float | Tensor | None,
    lr_decay: float,
    eps: float,
    maximize: bool,
    donate: bool,
) -> AdagradResult:
    """Sparse COO gradients, one tensor at a time: only the rows present in the gradient change."""
    new_steps = LOOP.add_scalar(steps, 1, inplace=donate)
    neg_clr = _neg_clr(new_steps, lr, lr_decay) if lr is not None else [None] * len(grads)
    updates, new_sums = [], []
    for grad, state_sum, factor in zip(grads, state_sums, neg_clr):
        g = -grad if maximize else grad
        g = g.coalesce()  # the update is non-linear in g: duplicate indices must be summed first
        if g.dtype != state_sum.dtype:
            g = g.to(state_sum.dtype)
        indices, values = g._indices(), g._values()
        squares = torch.sparse_coo_tensor(indices, values * values, g.shape, check_invariants=False)
        new_sum = state_sum.add_(squares) if donate else state_sum + squares
        std_values = new_sum.sparse_mask(g)._values().sqrt() + eps
        step_values = values / std_values
        if factor is not None:
            step_values = step_values * factor
        updates.append(torch.sparse_coo_tensor(indices, step_values, g.shape, check_invariants=False))
        new_sums.append(new_sum)
    return AdagradResult(updates, new_steps, new_sums)


def _adagrad_fused(
    plan: _fused.Plan,
    params: list[Tensor] | None,
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    lr: float | Tensor | None,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    *,
    donate: bool,
    apply: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> AdagradResult:
    """The dense step through ``torch._fused_adagrad_`` (see :mod:`pureopt.kernels.fused`).

    ``grad_scale`` / ``found_inf`` only when every group runs torch's own call on the parameters."""
    new_steps = FOREACH.add_scalar(steps, 1, inplace=donate)
    sums = state_sums if donate else _fused.clone_all(state_sums)
    # lr=None (scale_by_adagrad): lr=-1 and no decay write +direction into the zero buffer
    kernel_lr = -1.0 if lr is None else float(lr)
    kernel_decay = 0.0 if lr is None else lr_decay

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        s, st = take(sums, idx), take(new_steps, idx)
        g = cast_like(take(grads, idx), s)
        p = take(params, idx) if params is not None else None
        if apply and p is not None and all(x.dtype == y.dtype for x, y in zip(p, s)):
            amp = _fused.amp_kwargs(grad_scale, found_inf, s[0].device)
            torch._fused_adagrad_(p, g, s, st, lr=kernel_lr, lr_decay=kernel_decay, weight_decay=weight_decay,
                                  eps=eps, maximize=maximize, **amp)  # fmt: skip
            _fused.undo_steps(st, amp["found_inf"])
            return None
        assert grad_scale is None and found_inf is None
        if maximize:
            g = FOREACH.neg(g)
        if weight_decay != 0:
            g = FOREACH.add(g, cast_like(p, s), alpha=weight_decay, inplace=maximize)  # type: ignore[arg-type]
        updates = _fused.zeros_like_all(s)
        torch._fused_adagrad_(updates, g, s, st, lr=kernel_lr, lr_decay=kernel_decay, weight_decay=0.0, eps=eps,
                              maximize=False)  # fmt: skip
        if apply:
            add_inplace(p, updates)  # type: ignore[arg-type]
            return None
        return updates

    return AdagradResult(_fused.run_grouped(len(grads), plan, body), new_steps, sums)
