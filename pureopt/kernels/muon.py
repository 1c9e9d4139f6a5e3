"""Muon (momentum + Newton-Schulz orthogonalisation of 2-D updates): torch.optim.Muon's math on tensor lists.

Update rule (torch.optim.Muon), per 2-D parameter ``P`` (shape ``A x B``) with gradient ``G``::

    M <- M + (1 - momentum) * (G - M)                         (lerp; M starts at zero)
    U  = G + momentum * (M - G)    if nesterov   else   M     (lerp)
    O  = NS(U)                                                (Newton-Schulz, below)
    P_new = P * (1 - lr * weight_decay) - adjusted_lr * O     (decoupled weight decay)
    adjusted_lr = lr * sqrt(max(1, A / B))                    adjust_lr_fn None / "original"
                = lr * 0.2 * sqrt(max(A, B))                  adjust_lr_fn "match_rms_adamw"

``NS(U)`` with coefficients ``(a, b, c)``: cast ``U`` to ``ns_dtype`` (bfloat16, as torch does), transpose it if it
is taller than wide, divide by ``max(||U||_F, eps)`` so that its spectral norm is at most one, then iterate
``ns_steps`` times::

    S = X X^T;   X <- a X + (b S + c S S) X

and transpose back. The quintic's coefficients are tuned for speed, not exact convergence: the singular values of
the result land roughly in ``[0.5, 1.5]`` rather than at exactly one (Jordan, 2024).

The update is returned as ``P_new - P`` with ``P_new`` computed with torch's own operations, so that
:func:`pureopt.apply_updates` gives torch's parameter bit for bit wherever the step changes an entry by less than
a factor of two (Sterbenz), which keeps trajectories through the bfloat16 iteration identical. ``lr=None``
returns the positive direction ``O * sqrt(max(1, A/B))`` (or the ``match_rms_adamw`` ratio) instead (used by
:func:`pureopt.transforms.muon.scale_by_muon`).

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
(https://kellerjordan.github.io/posts/muon/); Liu et al., "Muon is Scalable for LLM Training", 2025
(arXiv:2502.16982).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import cast_like
from pureopt.kernels.listops import ops_for
from pureopt.kernels.select import choose_impl

__all__ = [
    "DEFAULT_NS_COEFFICIENTS",
    "DEFAULT_NS_STEPS",
    "DEFAULT_EPS",
    "ADJUST_LR_FNS",
    "MuonResult",
    "newton_schulz",
    "newton_schulz_batch",
    "adjusted_lr_ratio",
    "muon",
]

DEFAULT_NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""The quintic's coefficients ``(a, b, c)`` from Keller Jordan's Muon (torch.optim.Muon's default)."""
DEFAULT_NS_STEPS = 5
DEFAULT_EPS = 1e-7
ADJUST_LR_FNS: tuple[str, ...] = ("original", "match_rms_adamw")


class MuonResult(NamedTuple):
    """Updates and the new momentum buffers (torch.optim's ``momentum_buffer``)."""

    updates: list[Tensor]
    momentum_buffer: list[Tensor]


def newton_schulz(
    g: Tensor,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    ns_steps: int = DEFAULT_NS_STEPS,
    eps: float = DEFAULT_EPS,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalise a matrix (its "zeroth power" ``U V^T``) with a Newton-Schulz iteration.

    Args:
      g: a 2-D tensor.
      ns_coefficients: ``(a, b, c)``; each step is ``X <- a X + (b S + c S^2) X`` with ``S = X X^T``.
      ns_steps: number of iterations.
      eps: lower bound of the Frobenius norm that ``g`` is divided by.
      ns_dtype: dtype the iteration runs in (bfloat16, as torch.optim.Muon).

    Returns a new tensor of dtype ``ns_dtype`` shaped like ``g`` (``g`` is never modified). With the classic cubic
    coefficients ``(1.5, -0.5, 0)`` and enough steps it converges to the polar factor ``U V^T`` of ``g = U S V^T``.
    """
    if g.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    a, b, c = ns_coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(ns_dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: the singular values are now <= 1
    for _ in range(ns_steps):
        s = x @ x.T
        poly = torch.addmm(s, s, s, beta=b, alpha=c)  # b * S + c * S @ S
        x = torch.addmm(x, poly, x, beta=a)  # a * X + poly @ X
    return x.T if tall else x


def newton_schulz_batch(
    g: Tensor,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    ns_steps: int = DEFAULT_NS_STEPS,
    eps: float = DEFAULT_EPS,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """:func:`newton_schulz` of each matrix of a batch ``(B, rows, cols)`` (one batched product per step).

    A batch of one is :func:`newton_schulz` itself (the unsharded bits); larger batches use ``baddbmm``, whose
    rounding may differ from ``addmm``'s by an ulp of ``ns_dtype`` here and there.
    """
    if g.ndim != 3:
        raise ValueError(f"newton_schulz_batch takes a batch of matrices (B, rows, cols), got a {g.ndim}-D tensor")
    if g.size(0) == 1:
        return newton_schulz(g[0], ns_coefficients, ns_steps, eps, ns_dtype)[None]
    a, b, c = ns_coefficients
    tall = g.size(1) > g.size(2)
    x = g.to(ns_dtype)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        s = x @ x.mT
        poly = torch.baddbmm(s, s, s, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def adjusted_lr_ratio(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """The factor torch.optim.Muon multiplies the learning rate by for a parameter of this shape."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def muon(
    params: list[Tensor] | None,
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor | None,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    ns_steps: int = DEFAULT_NS_STEPS,
    eps: float = DEFAULT_EPS,
    adjust_lr_fn: str | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    impl: str = "auto",
    donate: bool = False,
    orthogonalize: Callable[[list[Tensor]], list[Tensor]] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> MuonResult:
    """One Muon step over tensor lists; returns the updates and the new momentum buffers (see module docstring).

    Args:
      params: the 2-D parameters (needed unless ``lr is None``).
      grads: their gradients (none ``None``).
      momentum_buffers: one buffer per parameter; its dtype is the dtype the step is computed in.
      lr: the learning rate (a float or 0-d tensor); ``None`` returns the shape-scaled orthogonal direction.
      impl: ``"auto" | "loop" | "foreach"`` for the elementwise parts (the orthogonalisation is per tensor).
      donate: the caller owns the momentum buffers: they are updated in place.
      orthogonalize: maps the list of directions to their Newton-Schulz results (in ``ns_dtype``), where the
        tensors given are shards of the matrices (FSDP2: :func:`pureopt.kernels.owner.map_whole` gathers each
        matrix on one rank); by default :func:`newton_schulz` of each.
      shapes: the whole matrices' shapes, for the learning-rate ratio (default: the tensors' own).
    """
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        if g.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
        if g.is_complex():
            raise RuntimeError("Muon does not support complex parameters")
    if lr is not None and params is None:
        raise ValueError("muon needs the parameters: call update(grads, state, params)")
    path = choose_impl(impl, [*grads, *momentum_buffers])
    ops = ops_for(path)
    grads = cast_like(grads, momentum_buffers)  # state may be kept in another dtype (state_dtype=)

    bufs = ops.lerp(momentum_buffers, grads, 1 - momentum, inplace=donate)
    directions = ops.lerp(grads, bufs, momentum) if nesterov else bufs
    if orthogonalize is None:
        ortho = [newton_schulz(u, ns_coefficients, ns_steps, eps, ns_dtype) for u in directions]
    else:
        ortho = orthogonalize(directions)
    ratios = [adjusted_lr_ratio(shape, adjust_lr_fn) for shape in (shapes or [g.shape for g in grads])]

    if lr is None:
        updates = [o.to(g.dtype) * r for o, g, r in zip(ortho, grads, ratios)]
        return MuonResult(updates, bufs)

    assert params is not None
    compute = cast_like(params, momentum_buffers)
    # torch: p.mul_(1 - lr * wd); p.add_(O, alpha=-lr * ratio). Replayed out of place on a copy we own.
    new_params = ops.mul(compute, 1 - lr * weight_decay)
    for i, (o, r) in enumerate(zip(ortho, ratios)):
        adjusted = lr * r
        if isinstance(adjusted, Tensor):  # a tensor alpha would cost a host sync: multiply instead
            new_params[i] = new_params[i].add_(o.to(new_params[i].dtype) * -adjusted)
        else:
            new_params[i] = new_params[i].add_(o, alpha=-adjusted)
    updates = ops.sub(new_params, compute, inplace=True)
    return MuonResult(updates, bufs)
