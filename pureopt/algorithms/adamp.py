"""AdamP: Adam whose step loses its radial component on scale-invariant weights, as the ``adamp`` package.

Update rule (Heo et al. 2021, Algorithm 2), per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    t <- t + 1
    m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g * g
    denom = sqrt(v) / sqrt(1 - beta2**t) + eps
    u = (beta1 * m + (1 - beta1) * g) / denom     if nesterov   else   m / denom
    if p has 2+ dims: (u, r) = project(p, g, u)   else r = 1
    p <- p * (1 - lr * weight_decay * r)          if weight_decay > 0
    p <- p - lr / (1 - beta1**t) * u

``project`` (the paper's scale-invariance test) tries two views of ``p`` in turn: its rows (``p.view(p.size(0), -1)``:
one channel per output) and then the whole tensor. For the first view in which every row's ``|cos(g, p)|`` is
below ``delta / sqrt(row length)``, the radial part is removed row by row, ``u <- u - p_n * <p_n, u>`` with
``p_n = p / (||p|| + eps)``, and the weight decay is scaled by ``r = wd_ratio``; if neither view passes, ``u`` and
``r = 1`` stay. pureopt decides this on the device (``torch.where``): no host sync, where the reference reads
``cosine_sim.max()`` to the host per tensor; only on the applied CPU path (the donated step, where such a read
costs nothing) it reads the decision too and skips the projection pass when neither view passes. Empty tensors are
not projected (the reference cannot view them).

The projection needs each parameter's shape, so AdamP is neither elementwise nor segmentwise (a flat buffer does
not know its parameters' rows): the flat layout runs it per tensor. The ``scale_by_adamp`` form returns the
projected direction ``u / (1 - beta1**t)`` (no weight decay). Oracle: ``adamp.AdamP`` (fp64 parity in
tests/test_algorithms_new_global.py).

Heo, Chun, Oh, Han, Yun, Kim, Uh & Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pureopt.algorithms._sums import scratch_math
from pureopt.algorithms.define import LR, Algorithm, Betas, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import adam_bias_corrections, add_update, ema_of_squares, on_host, scalar_for
from pureopt.kernels.listops import ListOps

__all__ = ["ADAMP", "ScaleByAdamPState", "adamp", "scale_by_adamp", "project", "projected_step"]


def _row_dots(x: Tensor, y: Tensor) -> Tensor:
    """``<x_r, y_r>`` per row of two ``(rows, n)`` matrices, without an ``x * y`` temporary."""
    return torch.einsum("ij,ij->i", x, y)


def project(
    p: Tensor, g: Tensor, u: Tensor, delta: float, wd_ratio: float, eps: float, host: bool = False
) -> tuple[Tensor, Tensor | float]:
    """AdamP's / SGDP's projection of one tensor's step ``u`` (see the module docstring): the new step (``u`` itself
    when not projected) and the weight-decay factor ``r``.

    Both views come from four per-row reductions (``||p_r||``, ``||g_r||``, ``<g_r, p_r>``, ``<p_r, u_r>``; the whole
    tensor's are their sums), and the chosen projection ``u - p * <p, u> / (||p|| + eps)**2`` (per row, or over the
    tensor) is one pass: the reference's ``p_n * <p_n, u>`` with ``p_n = p / (||p|| + eps)``. Cosines as
    ``torch.nn.functional.cosine_similarity``: ``<g, p> / (max(||g||, eps) * max(||p||, eps))``. The choice is made on
    the device (``torch.where``; ``r`` a 0-d tensor), or with ``host`` (the applied CPU path) read to the host as
    the reference does, which skips the pass when neither view passes (``r`` a float)."""
    if p.dim() < 2 or p.numel() == 0:
        return u, 1.0
    rows = p.shape[0]
    pv, gv, uv = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
    p_norm, g_norm = torch.linalg.vector_norm(pv, dim=1), torch.linalg.vector_norm(gv, dim=1)
    gp, pu = _row_dots(gv, pv), _row_dots(pv, uv)
    cos_rows = gp.abs() / (g_norm.clamp(min=eps) * p_norm.clamp(min=eps))
    p_all, g_all = torch.linalg.vector_norm(p_norm), torch.linalg.vector_norm(g_norm)
    cos_all = gp.sum().abs() / (g_all.clamp(min=eps) * p_all.clamp(min=eps))
    hit_rows = cos_rows.max() < delta / math.sqrt(pv.shape[1])
    hit_all = cos_all < delta / math.sqrt(p.numel())
    shape = [-1] + [1] * (p.dim() - 1)
    if host:
        if bool(hit_rows):
            return torch.addcmul(u, p, (pu / (p_norm + eps) ** 2).view(shape), value=-1), wd_ratio
        if bool(hit_all):
            return torch.add(u, p, alpha=-float(pu.sum() / (p_all + eps) ** 2)), wd_ratio
        return u, 1.0
    coef = torch.where(
        hit_rows,
        pu / (p_norm + eps) ** 2,
        torch.where(hit_all, pu.sum() / (p_all + eps) ** 2, torch.zeros_like(pu)),
    )
    out = torch.addcmul(u, p, coef.view(shape), value=-1)
    one = torch.ones((), dtype=u.dtype, device=u.device)
    return out, torch.where(hit_rows | hit_all, torch.full_like(one, wd_ratio), one)


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    beta1, beta2 = k.h.betas
    step_size, bc2_sqrt = adam_bias_corrections(
        steps, k.h.lr, beta1, beta2, like=k.exp_avg, host=on_host(k.apply, k.exp_avg)
    )
    return {"step_size": step_size, "bc2_sqrt": bc2_sqrt}


@scratch_math
def _math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    h, own = k.h, k.own
    beta1, beta2 = h.betas
    m = ops.add(ops.mul(k.exp_avg, beta1, inplace=k.donate), k.g, alpha=1 - beta1, inplace=k.donate)
    v = ema_of_squares(ops, k.exp_avg_sq, k.g, beta2, donate=k.donate, own=own)
    denom = ops.add_scalar(ops.div(ops.sqrt(v), k.bc2_sqrt, inplace=own), h.eps, inplace=own)
    if h.nesterov:
        numer = ops.add(ops.mul(m, beta1), k.g, alpha=1 - beta1, inplace=own)
        u = ops.div_list(numer, denom, inplace=own)
    else:
        u = ops.div_list(m, denom)
    new = {"exp_avg": m, "exp_avg_sq": v}
    return projected_step(k, ops, u, k.step_size, 1.0, owned=own)[0], new


def projected_step(
    k: Kernel, ops: ListOps, u: list[Tensor], step_size: Any, decay_scale: float, owned: bool
) -> tuple[list[Tensor] | None, list[Tensor]]:
    """Project ``u`` (AdamP / SGDP), then the step ``p * (1 - lr * wd * r * decay_scale) + step_size * u``: applied
    to ``k.target`` (``None`` updates) or returned as updates; also returns the projected ``u`` (``u``'s own tensors
    where not projected; ``owned``: ``u`` may be overwritten, else the step leaves it alone)."""
    h = k.h
    ratios: list[Any] = [1.0] * len(u)
    if h.delta != 0:
        host = on_host(k.apply, u) and all(type(t) is Tensor for t in u)
        pairs = [project(p, g, x, h.delta, h.wd_ratio, h.eps, host) for p, g, x in zip(k.p, k.g, u)]
        u, ratios = [x for x, _ in pairs], [r for _, r in pairs]
    shown = list(u)
    if not (h.weight_decay > 0 and h.lr is not None):
        return add_update(ops, k.target, u, step_size, owned=owned and k.own), shown
    shrink = per_tensor_factors([h.lr * h.weight_decay * decay_scale * r for r in ratios], k.p)
    if k.apply:  # the reference: p.mul_(1 - lr * weight_decay * r), then the step
        ops.mul(k.p, [1 - c for c in shrink], inplace=True)
        return add_update(ops, k.p, u, step_size, owned=owned and k.own), shown
    updates = add_update(ops, None, u, step_size, owned=owned and k.own)
    assert updates is not None
    return ops.sub(updates, ops.mul(k.p, shrink), inplace=k.own), shown


def per_tensor_factors(values: list[Any], like: list[Tensor]) -> list[Any]:
    """Per-tensor factors (numbers or 0-d tensors) cast to their tensor's dtype (never promoting a 0-d one)."""
    out = []
    for v, t in zip(values, like):
        cast = scalar_for(v, [t])
        out.append(cast[0] if isinstance(cast, list) else cast)
    return out


ADAMP = Algorithm(
    "AdamP",
    record="ScaleByAdamPState",
    dtensor=False,  # (its per-tensor / global values are plain tensors: tests/test_fsdp_registry.py)
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "exp_avg_sq": state("second moments.", nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    needs_params=("weight_decay", "delta"),
    elementwise=False,
    tensorwise=True,
    check_order=("lr", "eps", "betas", "weight_decay"),
    doc="State of :func:`adamp` and :func:`scale_by_adamp` (the ``adamp`` package's state keys).",
)
ScaleByAdamPState = ADAMP.state


@ADAMP.public
def adamp(
    lr: LR = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    weight_decay: NonNeg = 0.0,
    delta: NonNeg = 0.1,
    wd_ratio: NonNeg = 0.1,
    nesterov: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """AdamP, as ``adamp.AdamP`` (the rule is in the module docstring; the same defaults).

    Args:
      betas: decay rates of the first and second moments.
      eps: added to the bias-corrected root of the second moment; also the projection's norm guard.
      weight_decay: weight decay, multiplied into the parameter before the step (``1 - lr * weight_decay * r``).
      delta: threshold of the scale-invariance test (``0`` turns the projection off).
      wd_ratio: factor ``r`` of the weight decay on projected tensors.
      nesterov: use the Nesterov momentum ``beta1 * m + (1 - beta1) * g``.

    Example::

        tx = pureopt.adamp(lr=1e-3, weight_decay=1e-2)

    Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021.
    """
    return ADAMP.build(locals())


@ADAMP.public
def scale_by_adamp(
    betas: Betas = (0.9, 0.999),
    eps: Eps = 1e-8,
    delta: NonNeg = 0.1,
    wd_ratio: NonNeg = 0.1,
    nesterov: bool = False,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by AdamP's projected direction ``u / (1 - beta1**t)`` (no weight decay; it needs the
    parameters for the projection).

    Example::

        tx = pureopt.chain(pureopt.scale_by_adamp(), pureopt.scale_by_learning_rate(1e-3))
    """
    return ADAMP.build(locals())
