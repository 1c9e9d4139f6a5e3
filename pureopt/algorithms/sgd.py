"""SGD with momentum, dampening, Nesterov, weight decay and maximize, as torch.optim.SGD; ``trace`` is its momentum.

Update rule, per parameter ``p`` with gradient ``g`` (``b`` is the momentum buffer)::

    g <- -g                                    if maximize
    g <- g + weight_decay * p                  if weight_decay != 0
    b <- g                                     on the first step with momentum (b = 0 before)
    b <- momentum * b + (1 - dampening) * g    afterwards
    g <- g + momentum * b  if nesterov  else  b
    update = -lr * g

The buffer starts at zero, which reproduces torch's "first step copies the gradient" exactly when
``dampening == 0``; with dampening a per-parameter step count (kept only then) tells the first step apart.
``trace`` (no learning rate, no weight decay, no sign flip) returns ``g``, the positive direction. Runs
``torch._fused_sgd_`` where it can take the tensors and ``dampening == 0`` (see :mod:`pureopt.kernels.fused`).

Sparse (COO) gradients are accepted where torch.optim.SGD accepts them: without momentum the update is sparse
(per-tensor path); with momentum the gradient is made dense (torch's sparse buffer holds the same values as the
dense one kept here). ``weight_decay`` with a sparse gradient raises, as in torch.

Robbins & Monro, "A Stochastic Approximation Method", 1951; Polyak, "Some methods of speeding up the convergence
of iteration methods", 1964; Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum
in deep learning" (Nesterov form), ICML 2013.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Field, Hyper, Impl, Kernel, NonNeg, StateDtype, state
from pureopt.base import GradientTransformation, UpdateContext, add_inplace
from pureopt.kernels import fused as _fused
from pureopt.kernels.common import cast_like, per_tensor, scalars_for
from pureopt.transforms._util import step_init

__all__ = ["SGD", "SPARSE_WEIGHT_DECAY_ERROR", "TraceState", "sgd", "trace"]

SPARSE_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"

Out = tuple[list[Tensor] | None, Mapping[str, Any]]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    if k.h.momentum == 0 or k.h.dampening == 0:
        return {}
    # the gradient's weight in the buffer: 1 on the first step (torch copies it in), else 1 - dampening
    scale = per_tensor(
        steps, lambda s: torch.where(s == 1, torch.ones_like(s), torch.full_like(s, 1.0 - k.h.dampening))
    )
    return {"g_weight": scalars_for(scale, k.g)}


def _math(k: Kernel) -> Out:
    ops, h = k.ops, k.h
    g = ops.neg(k.g) if h.maximize else k.g
    owned = h.maximize
    if h.weight_decay != 0:
        g = ops.add(g, k.p, alpha=h.weight_decay, inplace=owned)
        owned = True
    new = {}
    if h.momentum != 0:
        bufs = ops.mul(k.momentum_buffer, h.momentum, inplace=k.donate)
        if h.dampening != 0:
            bufs = ops.add(bufs, ops.mul(g, k.g_weight), inplace=True)
        else:
            bufs = ops.add(bufs, g, inplace=True)
        new["momentum_buffer"] = bufs
        if h.nesterov:
            g = ops.add(g, bufs, alpha=h.momentum, inplace=owned)
            owned = True
        else:
            g, owned = bufs, False
    if h.lr is None:
        updates = g if owned else ops.clone(g)
    elif isinstance(h.lr, Tensor):
        updates = ops.mul(g, scalars_for([-h.lr] * len(g), g), inplace=owned)
    else:
        updates = ops.mul(g, -h.lr, inplace=owned)
    if k.apply:
        add_inplace(k.p, updates)
        return None, new
    return updates, new


def _fused_math(k: Kernel, plan: _fused.Plan) -> Out:
    """The step through ``torch._fused_sgd_`` (``dampening == 0``): torch's own call on the parameters when the step
    applies them (GradScaler's arguments passed on), else pointed at a zero buffer that ends up holding the update.
    A skipped first step leaves the zero momentum buffers as they are, so the next step is a proper first step."""
    h, ctx, params, grads = k.h, k.ctx, k.p, k.g
    bufs: list[Tensor] = []
    if h.momentum != 0:
        bufs = k.momentum_buffer if k.donate else _fused.clone_all(k.momentum_buffer)
    kernel_lr: float | Tensor = -1.0 if h.lr is None else h.lr  # lr=None (trace): +direction into the zero buffer
    if (h.weight_decay != 0 or k.apply) and params is None:
        raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
    like = bufs if bufs else grads

    def body(idx: list[int]) -> list[Tensor] | None:
        take = _fused.take
        g = take(grads, idx)
        b = take(bufs, idx) if bufs else []
        ref = take(like, idx)
        p = take(params, idx) if params is not None else None
        device = ref[0].device
        g = cast_like(g, ref)
        if k.apply and p is not None and all(x.dtype == y.dtype for x, y in zip(p, ref)):
            torch._fused_sgd_(p, g, b, weight_decay=h.weight_decay, momentum=h.momentum,
                              lr=_fused.fused_lr(kernel_lr, device), dampening=0.0, nesterov=h.nesterov,
                              maximize=h.maximize, is_first_step=False,
                              **_fused.amp_kwargs(ctx.grad_scale, ctx.found_inf, device))  # fmt: skip
            return None
        assert ctx.grad_scale is None and ctx.found_inf is None
        g = _fused.folded_grads(g, p, h.maximize, h.weight_decay)
        updates = _fused.zeros_like_all(ref)
        torch._fused_sgd_(updates, g, b, weight_decay=0.0, momentum=h.momentum,
                          lr=_fused.fused_lr(kernel_lr, device), dampening=0.0, nesterov=h.nesterov,
                          maximize=False, is_first_step=False)  # fmt: skip
        if k.apply:
            add_inplace(p, updates)
            return None
        return updates

    updates = _fused.run_grouped(len(grads), plan, body)
    return updates, ({"momentum_buffer": bufs} if h.momentum != 0 else {})


def _sparse(
    run: Any, h: Hyper, impl: str, params: list[Tensor] | None, grads: list[Tensor], s: Any, ctx: UpdateContext
) -> Out:
    """Sparse gradients: with momentum made dense; without, plain SGD per tensor (the update is sparse too)."""
    if h.weight_decay != 0:
        raise RuntimeError(SPARSE_WEIGHT_DECAY_ERROR)  # torch.optim.SGD fails here too
    if h.momentum != 0:  # torch keeps a sparse momentum buffer holding the same values as this dense one
        return run(h, impl, params, [g.to_dense() if g.is_sparse else g for g in grads], s, ctx)
    unscaled = _fused.amp_unscale(grads, ctx.grad_scale, ctx.found_inf)
    if unscaled is None:  # skipped by GradScaler
        return _fused.skipped_updates(grads, ctx.apply and ctx.donate and params is not None), {}
    dense = [i for i, g in enumerate(unscaled) if not g.is_sparse]
    updates: list[Tensor] = []
    for g in unscaled:  # sparse: u = -lr * g (sign flipped if maximize), itself sparse over g's entries
        if g.is_sparse:
            g = -g if h.maximize else g
            updates.append(g.clone() if h.lr is None else g * -h.lr)
        else:
            updates.append(g)  # replaced below
    if dense:
        plain = ctx.but(apply=False, grad_scale=None, found_inf=None)
        res, _ = run(h, impl, None, [unscaled[i] for i in dense], {}, plain)
        for i, u in zip(dense, res):
            updates[i] = u
    return updates, {}


SGD = Algorithm(
    "SGD",
    record="TraceState",
    fields={
        "momentum_buffer": state("per-parameter momentum buffers.", when=lambda h: h.momentum != 0),
        "step": Field(
            "per-parameter step counts, kept only when ``dampening != 0`` (to tell the first step apart, where "
            "torch copies the gradient into the buffer)",
            lambda h, dtype: step_init,
            when=lambda h: h.momentum != 0 and h.dampening != 0,
            per_tensor=True,
        ),
    },
    math=_math,
    scalars=_scalars,
    fused=_fused_math,
    fused_state=("momentum_buffer",),
    fused_cpu_dtypes=(torch.float32, torch.float64),  # torch 2.13's CPU kernel skips bf16/fp16 (see fused_plan)
    fused_when=lambda h: h.momentum == 0 or h.dampening == 0,
    sparse=_sparse,
    amp_native=True,
    doc="State of :func:`trace` and :func:`sgd` (torch.optim.SGD's state keys); a state never holds ``None`` "
    "(``torch.func.vmap`` cannot return it): a field that is not kept is ``()``.",
)
TraceState = SGD.state


def _check_nesterov(momentum: float, dampening: float, nesterov: bool) -> None:
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


@SGD.public
def sgd(
    lr: LR = 1e-3,
    momentum: NonNeg = 0.0,
    dampening: float = 0.0,
    weight_decay: NonNeg = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD`` (the rule is in the module docstring).

    Args:
      momentum: momentum factor.
      dampening: dampening for momentum.
      weight_decay: L2 penalty added to the gradient.
      nesterov: Nesterov momentum (Sutskever et al., 2013).
      state_dtype: dtype of the momentum buffers (default: the parameter's, as torch); e.g. ``torch.float32``
        for bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.

    Example::

        tx = pureopt.sgd(lr=0.1, momentum=0.9, nesterov=True)
    """
    _check_nesterov(momentum, dampening, nesterov)
    return SGD.build(locals())


@SGD.public
def trace(
    momentum: NonNeg,
    dampening: float = 0.0,
    nesterov: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """torch.optim.SGD's momentum as a building block (no learning rate, no sign flip): ``b`` starts at zero (on
    the first step ``b <- g``), ``b <- momentum * b + (1 - dampening) * g``, and the update is
    ``g + momentum * b`` if ``nesterov`` else ``b``.

    Args:
      momentum: momentum factor (>= 0).
      dampening: dampening of the gradient's contribution (0 for Nesterov).
      nesterov: use Nesterov momentum (Sutskever et al., 2013).

    Example::

        tx = pureopt.chain(pureopt.trace(0.9, nesterov=True), pureopt.scale_by_learning_rate(0.1))
    """
    _check_nesterov(momentum, dampening, nesterov)
    return SGD.build(locals())
