"""Adafactor (factored second moments, relative step size, update clipping): torch.optim.Adafactor on lists.

Update rule (torch.optim.Adafactor), per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                              if maximize
    t <- t + 1
    w = t ** beta2_decay                                 (1 - beta2_t)
    rho = min(lr, 1 / sqrt(t))
    alpha = max(eps2, RMS(p)) * rho                      (RMS(x) = ||x||_2 / sqrt(numel(x)))
    if p has 2 or more dims (factored over the last two):
        R <- R + w * (mean(g * g, dim=-1) - R)           (row_var)
        C <- C + w * (mean(g * g, dim=-2) - C)           (col_var)
        V = (R @ C) / max(mean(R, dim=-2), eps1)
    else:
        V <- V + w * (g * g - V)                         (variance)
    U = g / sqrt(max(V, eps1 ** 2))
    update = -alpha / max(1, RMS(U) / d) * U
    update <- update - lr * weight_decay * p             if weight_decay != 0

``eps1=None`` is the machine epsilon of the dtype the update is computed in. ``lr=None`` returns the clipped
direction ``U / max(1, RMS(U) / d)`` without the relative step size or weight decay (used by
:func:`pureopt.transforms.adafactor.scale_by_factored_rms`).

torch reads ``step``, ``||p||`` and ``||U||`` back to the host with ``.item()``; here every such scalar stays a
0-d tensor (stacked over the parameters), so an update never synchronises with the device. The row / column
reductions are per tensor on every path (as in torch's foreach implementation); the elementwise work runs
through ``ListOps``.

DTensor parameters (FSDP2): the factors are DTensors placed like the parameter except along the dimension they
reduce (:func:`pureopt.kernels.dtensor.zeros_reduced`: a factor over a sharded dimension is replicated), the
reductions are DTensor ops (exact across shards: a row mean over a sharded dimension is a sum over the size), and
the norms come back as plain 0-d tensors (one all-reduce each) to be stacked with the step counts.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import cast_like, map_scalars_n, scalar_dtype, scalars_for
from pureopt.kernels.dtensor import as_plain_scalar, is_dtensor, like_placed
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.nadam import autograd_recording
from pureopt.kernels.select import choose_impl

__all__ = ["AdafactorResult", "adafactor", "is_factored"]


class AdafactorResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys); ``()`` where a key is not kept.

    A parameter with two or more dimensions keeps ``row_var`` and ``col_var`` (its ``variance`` entry is
    ``()``); a vector or a 0-d parameter keeps ``variance`` (its ``row_var`` / ``col_var`` entries are ``()``).
    """

    updates: list[Tensor]
    step: list[Tensor]
    row_var: list[Any]
    col_var: list[Any]
    variance: list[Any]


def is_factored(p: Tensor) -> bool:
    """Whether Adafactor factors this parameter's second moment (two or more dimensions, as torch)."""
    return p.dim() > 1


def _clamp_min(ops: ListOps, xs: list[Tensor], lo: float, inplace: bool) -> list[Tensor]:
    if ops.foreach:
        if inplace:
            torch._foreach_clamp_min_(xs, lo)
            return xs
        return list(torch._foreach_clamp_min(xs, lo))
    if inplace:
        return [x.clamp_min_(lo) for x in xs]
    return [torch.clamp_min(x, lo) for x in xs]


def _rsqrt(ops: ListOps, xs: list[Tensor], inplace: bool) -> list[Tensor]:
    if ops.foreach:
        if inplace:
            torch._foreach_rsqrt_(xs)
            return xs
        return list(torch._foreach_rsqrt(xs))
    if inplace:
        return [x.rsqrt_() for x in xs]
    return [torch.rsqrt(x) for x in xs]


def _like(x: Tensor, ref: Tensor) -> Tensor:
    return x if x.dtype == ref.dtype and x.device == ref.device else x.to(device=ref.device, dtype=ref.dtype)


def adafactor(
    params: list[Tensor] | None,
    grads: list[Tensor],
    row_vars: list[Any],
    col_vars: list[Any],
    variances: list[Any],
    steps: list[Tensor],
    *,
    lr: float | Tensor | None,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    impl: str = "auto",
    donate: bool = False,
) -> AdafactorResult:
    """One Adafactor step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      params: the parameters (needed unless ``lr`` is ``None``: the step size is relative to their RMS).
      grads: the gradients, one per parameter (none of them ``None``, none complex).
      row_vars, col_vars: the row / column factors for factored parameters, ``()`` for the others.
      variances: the unfactored second moments for vectors and 0-d parameters, ``()`` for the others.
      steps: per-parameter step counts.
      lr: the learning rate (caps the relative step size and scales the weight decay); ``None`` returns the
        clipped direction.
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: they are updated in place.
    """
    if lr is not None and params is None:
        raise ValueError("adafactor needs the parameters: call update(grads, state, params)")
    if any(g.is_complex() for g in grads):
        raise RuntimeError("Adafactor does not support complex parameters")
    if not grads:
        return AdafactorResult([], [], [], [], [])
    # the dtype each update is computed in: the state's (state_dtype=) or the gradient's
    dtypes = [(v if is_factored(g) else s).dtype for g, v, s in zip(grads, row_vars, variances)]
    path = choose_impl(impl, list(grads))
    ops = ops_for(path)
    # in place on the kernel's own temporaries, unless autograd records through the update
    tmp = not autograd_recording(params, grads, row_vars, col_vars, variances)
    donate = donate and tmp
    g = [x if x.dtype == dt else x.to(dt) for x, dt in zip(grads, dtypes)]
    if maximize:
        g = ops.neg(g)
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    rparams = cast_like(params, g) if params is not None else None

    # per-tensor scalars: 1 - beta2_t and alpha (before any decay, as torch)
    def first(t: Tensor, param_rms: Tensor) -> tuple[Tensor, ...]:
        t = t.to(scalar_dtype(t.device))
        one_minus_beta2 = torch.pow(t, beta2_decay)
        if lr is None:
            return (one_minus_beta2,)
        inv_sqrt_t = 1 / torch.pow(t, 0.5)
        rho = torch.minimum(lr.to(t.dtype), inv_sqrt_t) if isinstance(lr, Tensor) else inv_sqrt_t.clamp_max(lr)
        alpha = torch.clamp_min(param_rms.to(t.dtype), eps2) * rho
        return one_minus_beta2, alpha

    if rparams is not None and lr is not None:
        param_rms = [
            as_plain_scalar(torch.linalg.vector_norm(p)).to(scalar_dtype(s.device)) / (max(p.numel(), 1) ** 0.5)
            for p, s in zip(rparams, new_steps)
        ]
    else:
        param_rms = list(new_steps)  # unused
    scalars = map_scalars_n(first, new_steps, param_rms, outputs=1 if lr is None else 2, keep_dtype=True)
    weights = scalars[0]

    new_rows: list[Any] = list(row_vars)
    new_cols: list[Any] = list(col_vars)
    new_vars: list[Any] = list(variances)
    estimates: list[Tensor] = []
    for i, gi in enumerate(g):
        e1 = torch.finfo(gi.dtype).eps if eps1 is None else eps1
        w = _like(weights[i], gi)
        if gi.numel() == 0:  # nothing to average (torch would divide by a zero size)
            estimates.append(torch.ones_like(gi))
        elif is_factored(gi):
            # mean(g * g) over a dim, formed as torch forms it: ||g||^2 / size
            row_mean = torch.linalg.vector_norm(gi, 2, dim=-1, keepdim=True).square().div(gi.size(-1))
            col_mean = torch.linalg.vector_norm(gi, 2, dim=-2, keepdim=True).square().div(gi.size(-2))
            if sharded := is_dtensor(gi):  # placed as the factors are (reductions over sharded dims are exact)
                row_mean, col_mean = like_placed(row_mean, row_vars[i]), like_placed(col_mean, col_vars[i])
            if donate:
                row, col = row_vars[i].lerp_(row_mean, w), col_vars[i].lerp_(col_mean, w)
            else:
                row, col = torch.lerp(row_vars[i], row_mean, w), torch.lerp(col_vars[i], col_mean, w)
                row, col = like_placed(row, row_vars[i]), like_placed(col, col_vars[i])
            new_rows[i], new_cols[i] = row, col
            est = row @ col
            # a DTensor's mean over a sharded dimension as a sum (exact for uneven shards) over the size
            row_avg = row.sum(dim=-2, keepdim=True) / row.size(-2) if sharded else row.mean(dim=-2, keepdim=True)
            estimates.append(est / row_avg.clamp_min(e1))
        else:
            sq = gi * gi
            var = variances[i].lerp_(sq, w) if donate else torch.lerp(variances[i], sq, w)
            new_vars[i] = var
            estimates.append(var.clone() if donate else var)
    # U = g / sqrt(max(V, eps1**2)); estimates that are state (unfactored, not donated) are not written
    eps_sq = [(torch.finfo(x.dtype).eps if eps1 is None else eps1) ** 2 for x in g]
    owned = [tmp and est is not new_vars[i] for i, est in enumerate(estimates)]
    if all(owned) and len({*eps_sq}) <= 1:
        clamped = _clamp_min(ops, estimates, eps_sq[0] if eps_sq else 0.0, inplace=tmp)
    else:
        clamped = [
            est.clamp_min_(e) if own else torch.clamp_min(est, e) for est, e, own in zip(estimates, eps_sq, owned)
        ]
    u = ops.mul_list(_rsqrt(ops, clamped, inplace=tmp), g, inplace=tmp)

    u_rms = [
        as_plain_scalar(torch.linalg.vector_norm(x)).to(scalar_dtype(s.device)) / ((max(x.numel(), 1) ** 0.5) * d)
        for x, s in zip(u, new_steps)
    ]
    if lr is None:
        (denoms,) = map_scalars_n(lambda r: (torch.clamp_min(r, 1.0),), u_rms, outputs=1, keep_dtype=True)
        updates = ops.div(u, scalars_for(denoms, u), inplace=tmp)
    else:
        alphas = scalars[1]
        (coefs,) = map_scalars_n(
            lambda a, r: (-a / torch.clamp_min(r, 1.0),), alphas, u_rms, outputs=1, keep_dtype=True
        )
        updates = ops.mul(u, scalars_for(coefs, u), inplace=tmp)
        if weight_decay != 0:
            decay = -lr * weight_decay
            if isinstance(decay, Tensor):
                decays = scalars_for([decay] * len(updates), updates)
                updates = ops.add(updates, ops.mul(rparams, decays), inplace=tmp)  # type: ignore[arg-type]
            else:
                updates = ops.add(updates, rparams, alpha=decay, inplace=tmp)  # type: ignore[arg-type]
    if any(map(is_dtensor, grads)):  # DTensor ops may place an update otherwise (a product with a replicated factor)
        updates = [like_placed(u, g0) for u, g0 in zip(updates, grads)]
    return AdafactorResult(updates, new_steps, new_rows, new_cols, new_vars)
