"""Averaged SGD (with weight decay and maximize): torch.optim.ASGD's math on tensor lists.

Update rule (torch.optim.ASGD), per parameter ``p`` with gradient ``g`` and per-parameter scalars ``t``
(``step``), ``eta`` (the current step size, ``lr`` before the first step) and ``mu`` (the averaging weight,
1 before averaging starts), and the running average ``ax``::

    g <- -g                                          if maximize
    t <- t + 1
    g <- g + weight_decay * p                        if weight_decay != 0
    p <- p * (1 - lambd * eta) - eta * g             (torch's p.mul_(...).add_(g, alpha=-eta), one rounding)
    ax <- ax + mu * (p - ax)                         (a lerp: ax = p exactly while mu == 1, i.e. until t0 steps)
    eta <- lr / (1 + lambd * lr * t) ** alpha
    mu <- 1 / max(1, t - t0)

The update returned is ``p_new - p``. ``eta`` and ``mu`` are stored in torch's scalar dtype (float32, float64
under a float64 default dtype) and used from there, as torch does; ``eta`` takes the current ``lr`` on a
parameter's first step (torch initialises it lazily then). No value is read back to the host on the pure path:
the branch on ``mu == 1`` in torch is replaced by ``torch.lerp``, which computes ``p - (1 - mu) * (p - ax)`` for
``mu >= 0.5`` and so gives ``ax == p`` exactly when ``mu == 1``. Complex tensors are viewed as real pairs, as
torch.optim does. Sparse gradients are rejected with torch.optim's message.

Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import (
    as_complex_like,
    as_real,
    can_apply,
    cast_like,
    cast_values,
    elementwise,
    map_scalars_n,
    on_host,
    over,
    scalars_for,
    torch_grad,
)
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["ASGDResult", "asgd"]


class ASGDResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    eta: list[Tensor]
    mu: list[Tensor]
    ax: list[Tensor]


def asgd(
    params: list[Tensor] | None,
    grads: list[Tensor],
    axs: list[Tensor],
    etas: list[Tensor],
    mus: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    lambd: float,
    alpha: float,
    t0: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
    apply: bool = False,
) -> ASGDResult:
    """One ASGD step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      params: the parameters (always needed: ASGD decays them and averages them).
      grads: the gradients, one per parameter (none of them ``None``).
      axs: the running averages of the parameters (torch's ``ax``).
      etas, mus, steps: per-parameter 0-d scalars (torch's ``eta``, ``mu``, ``step``).
      lr: the learning rate (a Python number or a 0-d tensor).
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: step counts and averages are updated in place.
      apply: with ``donate``, update the parameters in place too (torch's ops) and return ``updates=None``.
    """
    if any(g.is_sparse for g in grads):
        raise RuntimeError("ASGD does not support sparse gradients")
    if params is None:
        raise ValueError("asgd needs the parameters: call update(grads, state, params)")
    if not grads:
        return ASGDResult(None if apply and donate else [], [], [], [], [])
    path = choose_impl(impl, [*grads, *axs])
    ops = ops_for(path)
    like = params
    rax = as_real(axs)
    rparams = cast_like(as_real(params), rax)  # state may be kept in another dtype (state_dtype=)
    g = cast_like(as_real(grads), rax)
    apply = can_apply(ops, apply and donate, params, rparams)

    eta_dtype, mu_dtype = etas[0].dtype, mus[0].dtype

    def scalars(t: Tensor, eta: Tensor, mu: Tensor) -> tuple[Tensor, ...]:
        # eta is lr (rounded to eta's dtype) on a parameter's first step, as torch's lazy state init
        lr_now = (
            lr.to(t.device, eta_dtype)
            if isinstance(lr, Tensor)
            else torch.full((), lr, dtype=eta_dtype, device=t.device)
        )
        eta_used = torch.where(t == 0, lr_now.to(t.device, t.dtype), eta)
        new_t = t + 1
        lr64 = lr.to(t.device, t.dtype) if isinstance(lr, Tensor) else lr
        new_eta = over(lr64, (1 + lambd * lr64 * new_t) ** alpha).to(eta_dtype)
        new_mu = over(1.0, torch.clamp(new_t - t0, min=1.0)).to(mu_dtype)
        return 1 - lambd * eta_used, -eta_used, mu.to(mu_dtype), new_eta, new_mu

    # (Python numbers on the applied CPU path, as torch's eta.item() and mu.item())
    host = on_host(apply, rax)
    decay, neg_eta, mu, new_etas, new_mus = map_scalars_n(
        scalars, steps, etas, mus, outputs=5, host=(0, 1, 2) if host else ()
    )
    decay, neg_eta = scalars_for(decay, rax), scalars_for(neg_eta, rax)
    mu = mu if host else cast_values(mu, rax)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)

    def body(
        ops: ListOps,
        p: list[Tensor],
        g: list[Tensor],
        rax: list[Tensor],
        decay: list[Tensor],
        neg_eta: list[Tensor],
        mu: list[Tensor],
    ) -> tuple[list[Tensor] | None, ...]:
        g, owned = torch_grad(ops, g, p, maximize=maximize, weight_decay=weight_decay)
        # torch: p.mul_(1 - lambd * eta); p.add_(g, alpha=-eta) (one rounding; an addcmul by a 0-d -eta is the same)
        new_p = ops.mul(p, decay, inplace=apply)
        if host and len(set(neg_eta)) == 1:
            new_p = ops.add(new_p, g, alpha=neg_eta[0], inplace=True)  # type: ignore[arg-type]
        elif host:  # (different step counts: no foreach op takes one alpha per tensor)
            new_p = ops.add(new_p, ops.mul(g, neg_eta, inplace=owned), inplace=True)
        else:
            new_p = ops.addcmul(new_p, g, neg_eta, inplace=True)
        # ax + mu * (p_new - ax): a lerp, exactly p_new while mu == 1 (torch then copies, as here on the CPU path)
        if host and all(m == 1 for m in mu):
            new_ax = ops.copy_(rax, new_p) if donate else ops.clone(new_p)
        else:
            new_ax = ops.lerp(rax, new_p, mu, inplace=donate)
        return (None if apply else ops.sub(new_p, p, inplace=True)), new_ax

    columns = (rparams, g, rax, decay, neg_eta, mu)
    # (three light in-place ops per element and no temporaries: bigger chunks, fewer calls)
    updates, new_ax = elementwise(body, ops, columns, writes=(None, 2), in_place=apply, chunk_scale=4)
    assert new_ax is not None
    return ASGDResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        new_etas,
        new_mus,
        as_complex_like(new_ax, like),
    )
