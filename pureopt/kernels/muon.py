"""The Newton-Schulz iteration of Muon: approximately orthogonalise matrices (their polar factor ``U V^T``).

``NS(U)`` with coefficients ``(a, b, c)``: cast ``U`` to ``ns_dtype`` (bfloat16, as torch.optim.Muon does),
transpose it if it is taller than wide, divide by ``max(||U||_F, eps)`` so that its spectral norm is at most one,
then iterate ``ns_steps`` times::

    S = X X^T;   X <- a X + (b S + c S S) X

and transpose back. The quintic's coefficients are tuned for speed, not exact convergence: the singular values of
the result land roughly in ``[0.5, 1.5]`` rather than at exactly one (Jordan, 2024). The optimizer is
:mod:`pureopt.algorithms.muon`; the stateless transformation :func:`pureopt.transforms.muon.orthogonalize`.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
(https://kellerjordan.github.io/posts/muon/).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pureopt.kernels.owner import MODES

__all__ = [
    "DEFAULT_NS_COEFFICIENTS",
    "DEFAULT_NS_STEPS",
    "DEFAULT_EPS",
    "ADJUST_LR_FNS",
    "newton_schulz",
    "newton_schulz_batch",
    "adjusted_lr_ratio",
    "check_ns_steps",
    "check_ns_coefficients",
    "check_sharded",
]

DEFAULT_NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""The quintic's coefficients ``(a, b, c)`` from Keller Jordan's Muon (torch.optim.Muon's default)."""
DEFAULT_NS_STEPS = 5
DEFAULT_EPS = 1e-7
ADJUST_LR_FNS: tuple[str, ...] = ("original", "match_rms_adamw")


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


def check_ns_steps(ns_steps: int) -> int:
    """torch.optim.Muon's check of ``ns_steps`` (its wording; torch checks when it steps, pureopt at construction)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    return ns_steps


def check_ns_coefficients(ns_coefficients: Sequence[float]) -> tuple[float, float, float]:
    """torch.optim.Muon's check of ``ns_coefficients`` (its wording); returns them as Python floats."""
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = (float(x) for x in ns_coefficients)
    return a, b, c


def check_sharded(sharded: str) -> str:
    """``sharded`` must name a way to orthogonalise sharded matrices (:data:`pureopt.kernels.owner.MODES`)."""
    if sharded not in MODES:
        raise ValueError(f"sharded must be one of {MODES}, got {sharded!r}")
    return sharded
