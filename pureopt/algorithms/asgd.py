"""Averaged SGD (with weight decay and maximize), as torch.optim.ASGD.

Update rule, per parameter ``p`` with gradient ``g`` and per-parameter scalars ``t`` (``step``), ``eta`` (the
current step size, ``lr`` before the first step) and ``mu`` (the averaging weight, 1 before averaging starts), and
the running average ``ax``::

    g <- -g                                          if maximize
    t <- t + 1
    g <- g + weight_decay * p                        if weight_decay != 0
    p <- p * (1 - lambd * eta) - eta * g             (torch's p.mul_(...).add_(g, alpha=-eta), one rounding)
    ax <- ax + mu * (p - ax)                         (a lerp: ax = p exactly while mu == 1, i.e. until t0 steps)
    eta <- lr / (1 + lambd * lr * t) ** alpha
    mu <- 1 / max(1, t - t0)

The update returned is ``p_new - p``; ``update`` needs the parameters. ``eta`` and ``mu`` are stored in torch's
scalar dtype (float32, float64 under a float64 default dtype) and used from there, as torch does; ``eta`` takes the
current ``lr`` on a parameter's first step (torch initialises it lazily then). No value is read back to the host on
the pure path: the branch on ``mu == 1`` in torch is replaced by ``torch.lerp``, which computes
``p - (1 - mu) * (p - ax)`` for ``mu >= 0.5`` and so gives ``ax == p`` exactly when ``mu == 1``. Complex tensors
are viewed as real pairs, as torch.optim does. Sparse gradients are rejected with torch.optim's message.

Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms.define import (
    LR,
    Algorithm,
    Field,
    Hyper,
    Impl,
    Kernel,
    NonNeg,
    StateDtype,
    scalar_state,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.hyperparams import resolve
from pureopt.kernels.common import cast_values, map_scalars_n, on_host, over, scalars_for, torch_grad
from pureopt.transforms._util import step_dtype

__all__ = ["ASGD", "ASGDState", "asgd"]


def _eta_init(h: Hyper, state_dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    def init(p: Tensor) -> Tensor:  # the learning rate at update 0 (torch: at the parameter's first step)
        value = resolve(h.lr, torch.zeros((), dtype=torch.int64, device=p.device))
        if isinstance(value, Tensor):
            return value.detach().reshape(()).to(device=p.device, dtype=step_dtype()).clone()
        return torch.full((), float(value), dtype=step_dtype(), device=p.device)

    return init


def _mu_init(p: Tensor) -> Tensor:
    return torch.ones((), dtype=step_dtype(), device=p.device)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    if not steps:
        return {}
    h, lr = k.h, k.h.lr
    eta_dtype, mu_dtype = k.eta[0].dtype, k.mu[0].dtype

    def fn(t: Tensor, eta: Tensor, mu: Tensor) -> tuple[Tensor, ...]:  # (t: the advanced count)
        # eta is lr (rounded to eta's dtype) on a parameter's first step, as torch's lazy state init
        lr_now = (
            lr.to(t.device, eta_dtype)
            if isinstance(lr, Tensor)
            else torch.full((), lr, dtype=eta_dtype, device=t.device)
        )
        eta_used = torch.where(t == 1, lr_now.to(t.device, t.dtype), eta)
        lr64 = lr.to(t.device, t.dtype) if isinstance(lr, Tensor) else lr
        new_eta = over(lr64, (1 + h.lambd * lr64 * t) ** h.alpha).to(eta_dtype)
        new_mu = over(1.0, torch.clamp(t - h.t0, min=1.0)).to(mu_dtype)
        return 1 - h.lambd * eta_used, -eta_used, mu.to(mu_dtype), new_eta, new_mu

    # (Python numbers on the applied CPU path, as torch's eta.item() and mu.item())
    host = on_host(k.apply, k.ax)
    decay, neg_eta, mu, etas, mus = map_scalars_n(fn, steps, k.eta, k.mu, outputs=5, host=(0, 1, 2) if host else ())
    return {"eta": etas, "mu": mus, "decay": scalars_for(decay, k.ax), "neg_eta": scalars_for(neg_eta, k.ax),
            "mu_now": mu if host else cast_values(mu, k.ax)}  # fmt: skip


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, p, apply = k.ops, k.h, k.p, k.apply
    if not k.g:
        return (None if apply else []), {}
    host = not isinstance(k.neg_eta[0], Tensor)  # (read to the host: on_host)
    g, owned = torch_grad(ops, k.g, p, maximize=h.maximize, weight_decay=h.weight_decay)
    # torch: p.mul_(1 - lambd * eta); p.add_(g, alpha=-eta) (one rounding; an addcmul by a 0-d -eta is the same)
    new_p = ops.mul(p, k.decay, inplace=apply)
    if host and len(set(k.neg_eta)) == 1:
        new_p = ops.add(new_p, g, alpha=k.neg_eta[0], inplace=True)
    elif host:  # (different step counts: no foreach op takes one alpha per tensor)
        new_p = ops.add(new_p, ops.mul(g, k.neg_eta, inplace=owned), inplace=True)
    else:
        new_p = ops.addcmul(new_p, g, k.neg_eta, inplace=True)
    # ax + mu * (p_new - ax): a lerp, exactly p_new while mu == 1 (torch then copies, as here on the CPU path)
    if host and all(m == 1 for m in k.mu_now):
        ax = ops.copy_(k.ax, new_p) if k.donate else ops.clone(new_p)
    else:
        ax = ops.lerp(k.ax, new_p, k.mu_now, inplace=k.donate)
    return (None if apply else ops.sub(new_p, p, inplace=True)), {"ax": ax}


ASGD = Algorithm(
    "ASGD",
    record="ASGDState",
    fields={
        "step": step_count(),
        "eta": Field(
            "per-parameter step sizes (0-d, torch's scalar dtype); ``lr`` until the parameter's first step.",
            _eta_init,
            per_tensor=True,
        ),
        "mu": scalar_state(
            _mu_init, "per-parameter averaging weights (0-d, torch's scalar dtype); 1 until averaging starts after t0."
        ),
        "ax": state("per-parameter running averages of the iterates (equal to the parameters while ``mu == 1``)."),
    },
    math=_math,
    scalars=_scalars,
    params_required="asgd",
    needs_params=(),
    chunk_scale=4,  # (three light in-place ops per element and no temporaries: bigger chunks, fewer calls)
    doc="State of :func:`asgd` (torch.optim.ASGD's state keys).",
)
ASGDState = ASGD.state


@ASGD.public
def asgd(
    lr: LR = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: NonNeg = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Averaged stochastic gradient descent, as ``torch.optim.ASGD`` (the rule is in the module docstring).

    The averaged iterate ``ax`` is kept in the state (``state.ax``), as torch keeps it in ``state['ax']``; it
    equals the parameter until ``t0`` steps have passed and averages the iterates afterwards.

    Args:
      lr: learning rate (float, 0-d tensor or schedule; read at every update, as torch reads its group's lr).
      lambd: decay term.
      alpha: power of the step-size decay.
      t0: the step count after which averaging starts.
      weight_decay: L2 penalty added to the gradient.
      state_dtype: dtype of ``ax`` (default: the parameter's, as torch); ``eta``, ``mu`` and ``step`` are kept
        in torch's scalar dtype.

    Example::

        tx = pureopt.asgd(lr=0.01, t0=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        averaged = state.ax

    Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4),
    1992.
    """
    return ASGD.build(locals())
