"""Averaged SGD (with weight decay and maximize): torch.optim.ASGD's math on tensor lists.

Update rule (torch.optim.ASGD), per parameter ``p`` with gradient ``g`` and per-parameter scalars ``t``
(``step``), ``eta`` (the current step size, ``lr`` before the first step) and ``mu`` (the averaging weight,
1 before averaging starts), and the running average ``ax``::

    g <- -g                                          if maximize
    t <- t + 1
    g <- g + weight_decay * p                        if weight_decay != 0
    p <- p * (1 - lambd * eta) - eta * g
    ax <- ax + mu * (p - ax)                         (ax = p while mu == 1, i.e. until t0 steps)
    eta <- lr / (1 + lambd * lr * t) ** alpha
    mu <- 1 / max(1, t - t0)

The update returned is ``p_new - p``. ``eta`` and ``mu`` are stored in torch's scalar dtype (float32, float64
under a float64 default dtype) and used from there, as torch does; ``eta`` takes the current ``lr`` on a
parameter's first step (torch initialises it lazily then). No value is read back to the host: the branch on
``mu == 1`` in torch is replaced by the form ``ax <- p - (1 - mu) * (p - ax)``, which gives ``ax == p`` exactly
when ``mu == 1``. Complex tensors are viewed as real pairs, as torch.optim does. Sparse gradients are rejected
with torch.optim's message.

Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import as_complex_like, as_real, cast_like, map_scalars_n, over, scalars_for
from pureopt.kernels.listops import ops_for
from pureopt.kernels.select import choose_impl

__all__ = ["ASGDResult", "asgd"]


class ASGDResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor]
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
) -> ASGDResult:
    """One ASGD step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      params: the parameters (always needed: ASGD decays them and averages them).
      grads: the gradients, one per parameter (none of them ``None``).
      axs: the running averages of the parameters (torch's ``ax``).
      etas, mus, steps: per-parameter 0-d scalars (torch's ``eta``, ``mu``, ``step``).
      lr: the learning rate (a Python number or a 0-d tensor).
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: step counts are updated in place.
    """
    if any(g.is_sparse for g in grads):
        raise RuntimeError("ASGD does not support sparse gradients")
    if params is None:
        raise ValueError("asgd needs the parameters: call update(grads, state, params)")
    if not grads:
        return ASGDResult([], [], [], [], [])
    path = choose_impl(impl, [*grads, *axs])
    ops = ops_for(path)
    like = params
    rax = as_real(axs)
    rparams = cast_like(as_real(params), rax)  # state may be kept in another dtype (state_dtype=)
    g = cast_like(as_real(grads), rax)
    owned = False
    if maximize:
        g, owned = ops.neg(g), True
    if weight_decay != 0:
        g = ops.add(g, rparams, alpha=weight_decay, inplace=owned)

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
        return 1 - lambd * eta_used, -eta_used, 1 - mu, new_eta, new_mu

    decay, neg_eta, one_minus_mu, new_etas, new_mus = map_scalars_n(scalars, steps, etas, mus, outputs=5)
    decay, neg_eta, one_minus_mu = scalars_for(decay, rax), scalars_for(neg_eta, rax), scalars_for(one_minus_mu, rax)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    # p_new = p * (1 - lambd * eta) - eta * g   (torch's op order)
    new_p = ops.add(ops.mul(rparams, decay), ops.mul(g, neg_eta, inplace=owned or weight_decay != 0), inplace=True)
    updates = ops.sub(new_p, rparams)
    # ax_new = p_new - (1 - mu) * (p_new - ax): exactly p_new while mu == 1
    new_ax = ops.sub(new_p, ops.mul(ops.sub(new_p, rax), one_minus_mu, inplace=True), inplace=True)
    return ASGDResult(as_complex_like(updates, like), new_steps, new_etas, new_mus, as_complex_like(new_ax, like))
