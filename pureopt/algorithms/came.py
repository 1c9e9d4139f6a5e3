"""CAME: Adafactor's factored second moments plus a confidence-weighted (factored) first moment, as the
``came-pytorch`` package.

Update rule (Luo et al. 2023, Algorithm 1, in the reference's form), per parameter ``p`` with gradient ``g``; a
parameter with 2+ dimensions keeps row and column factors (means over the last and the second-to-last dimension),
a smaller one full second moments::

    q = g * g + eps1
    2+ dims:  R <- b2 * R + (1 - b2) * mean(q, -1);   C <- b2 * C + (1 - b2) * mean(q, -2)
              u = g * rsqrt(R / mean(R, -1)) (x) rsqrt(C)            (outer product over the last two dims)
    else:     V <- b2 * V + (1 - b2) * q;   u = g * rsqrt(V)
    u <- u / max(1, rms(u) / clip_threshold)                          (rms(x) = ||x|| / sqrt(numel))
    m <- b1 * m + (1 - b1) * u
    e = (u - m)**2 + eps2                                             (the instability)
    2+ dims:  Rr <- b3 * Rr + (1 - b3) * mean(e, -1);  Cr <- b3 * Cr + (1 - b3) * mean(e, -2)
              step = m * rsqrt(Rr / mean(Rr, -1)) (x) rsqrt(Cr)
    else:     step = m
    p <- p - lr * weight_decay * p                                    if weight_decay != 0
    p <- p - lr * step

The state keys are the reference's; which a parameter has depends on its shape (the others are ``()``, as
Adafactor's). The reference also stores ``RMS`` (the parameter's RMS, unused by its step); pureopt does not keep
it. Empty parameters are left alone (their means would be NaN). Complex parameters are refused (as Adafactor).
Needs the tensors' shapes: neither elementwise nor segmentwise. The ``scale_by_came`` form returns ``step``.
Oracle: ``came_pytorch.CAME``.

Luo, Ren, Zheng, Jiang, Jiang & You, "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Check, Field, Hyper, Impl, Kernel, NonNeg, StateDtype, step_count
from pureopt.algorithms.prodigy import positive
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_update, scalar_for
from pureopt.transforms._util import state_dtype_for

__all__ = ["CAME", "CAMEState", "came", "scale_by_came"]


def _factored(p: Tensor) -> bool:
    return p.dim() >= 2


def _real(p: Tensor) -> Tensor:
    if p.is_complex():
        raise RuntimeError("CAME does not support complex parameters")
    return p


def _zeros(shape: Callable[[Tensor], tuple[int, ...]], factored: bool, doc: str) -> Field:
    """A field kept for factored (or unfactored) parameters only, zeros of ``shape(p)``; ``()`` for the others."""

    def init(h: Hyper, dtype: torch.dtype | None) -> Callable[[Tensor], Any]:
        def make(p: Tensor) -> Any:
            if _factored(_real(p)) != factored:
                return ()
            return torch.zeros(shape(p), dtype=state_dtype_for(p, dtype), device=p.device)

        return make

    # (not shaped like the parameter, and ``()`` for some: encodings are refused for it, chunks take it whole)
    return Field(
        doc + (" (parameters with 2+ dims; ``()`` for the others)." if factored else ""), init, like_param=False
    )


def _rows(p: Tensor) -> tuple[int, ...]:
    return tuple(p.shape[:-1])


def _cols(p: Tensor) -> tuple[int, ...]:
    return (*p.shape[:-2], p.shape[-1])


def _ema(x: Tensor, new: Tensor, beta: float, donate: bool) -> Tensor:
    """``beta * x + (1 - beta) * new`` (the reference's ``x.mul_(beta).add_(new, alpha=1 - beta)``)."""
    return (x.mul_(beta) if donate else x * beta).add_(new, alpha=1 - beta)


def _approx(row: Tensor, col: Tensor) -> Tensor:
    """The rank-1 reconstruction ``rsqrt(row / mean(row)) (x) rsqrt(col)`` of a factored second moment."""
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / (x.numel() ** 0.5)


def _one(k: Kernel, i: int, new: dict[str, list[Any]]) -> Tensor:
    """One tensor's step direction; appends its new state entries to ``new``."""
    h, g = k.h, k.g[i]
    beta1, beta2, beta3 = h.betas
    eps1, eps2 = h.eps
    factored = _factored(g)
    q = g * g + eps1
    if factored:
        row = _ema(k.exp_avg_sq_row[i], q.mean(dim=-1), beta2, k.donate)
        col = _ema(k.exp_avg_sq_col[i], q.mean(dim=-2), beta2, k.donate)
        u = _approx(row, col) * g
        new["exp_avg_sq_row"].append(row)
        new["exp_avg_sq_col"].append(col)
        new["exp_avg_sq"].append(k.exp_avg_sq[i])
    else:
        v = _ema(k.exp_avg_sq[i], q, beta2, k.donate)
        u = v.rsqrt() * g
        new["exp_avg_sq"].append(v)
        new["exp_avg_sq_row"].append(k.exp_avg_sq_row[i])
        new["exp_avg_sq_col"].append(k.exp_avg_sq_col[i])
    u = u / (_rms(u) / h.clip_threshold).clamp(min=1.0)
    m = _ema(k.exp_avg[i], u, beta1, k.donate)
    new["exp_avg"].append(m)
    if factored:
        res = (u - m) ** 2 + eps2
        res_row = _ema(k.exp_avg_res_row[i], res.mean(dim=-1), beta3, k.donate)
        res_col = _ema(k.exp_avg_res_col[i], res.mean(dim=-2), beta3, k.donate)
        new["exp_avg_res_row"].append(res_row)
        new["exp_avg_res_col"].append(res_col)
        return _approx(res_row, res_col) * m
    new["exp_avg_res_row"].append(k.exp_avg_res_row[i])
    new["exp_avg_res_col"].append(k.exp_avg_res_col[i])
    return m.clone()


def _like(dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    return lambda p: torch.zeros_like(_real(p), dtype=state_dtype_for(p, dtype))


KEYS = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq")


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    new: dict[str, list[Any]] = {key: [] for key in KEYS}
    live: list[int] = []
    steps: list[Tensor] = []
    for i, g in enumerate(k.g):
        if g.numel() == 0:  # nothing to step; its means would be NaN
            for key in KEYS:
                new[key].append(getattr(k, key)[i])
            continue
        live.append(i)
        steps.append(_one(k, i, new))
    p = None if k.p is None else [k.p[i] for i in live]
    decayed = None
    if h.weight_decay != 0 and h.lr is not None:
        assert p is not None
        decayed = ops.mul(p, scalar_for(-h.weight_decay * h.lr, p))
        if k.apply:  # the reference: p.add_(p, alpha=-weight_decay * lr), then p.add_(-lr * step)
            ops.add(p, decayed, inplace=True)
    if k.apply:
        add_update(ops, p, steps, k.coef, owned=k.own)
        return None, new
    updates = add_update(ops, None, steps, k.coef, owned=k.own)
    assert updates is not None
    if decayed is not None:
        updates = ops.add(updates, decayed, inplace=k.own)
    return _full(k, updates, live), new


def _full(k: Kernel, steps: list[Tensor], live: list[int]) -> list[Tensor]:
    """The updates of all tensors: ``steps`` at ``live``, zeros (empty tensors) elsewhere."""
    out = [torch.zeros_like(g) for g in k.g]
    for i, s in zip(live, steps):
        out[i] = s
    return out


def _betas3(value: Any, name: str) -> tuple[float, float, float]:
    values = tuple(float(b) for b in value)
    if len(values) != 3:
        raise ValueError(f"Invalid betas: {value} (CAME takes three decay rates)")
    for i, b in enumerate(values):
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    return values[0], values[1], values[2]


def _eps2(value: Any, name: str) -> tuple[float, float]:
    values = tuple(float(e) for e in value)
    if len(values) != 2 or any(not e >= 0 for e in values):
        raise ValueError(f"Invalid epsilon value: {value} (two non-negative numbers)")
    return values[0], values[1]


Betas3 = Annotated[tuple[float, float, float], Check(_betas3)]
Eps2 = Annotated[tuple[float, float], Check(_eps2)]

CAME = Algorithm(
    "CAME",
    record="CAMEState",
    dtensor=False,  # (its per-tensor / global values are plain tensors: tests/test_fsdp_registry.py)
    fields={
        "step": step_count(),
        "exp_avg": Field("first moments of the normalised updates.", lambda h, dtype: _like(dtype)),
        "exp_avg_sq_row": _zeros(_rows, True, "row factors of the second moment"),
        "exp_avg_sq_col": _zeros(_cols, True, "column factors of the second moment"),
        "exp_avg_res_row": _zeros(_rows, True, "row factors of the instability"),
        "exp_avg_res_col": _zeros(_cols, True, "column factors of the instability"),
        "exp_avg_sq": _zeros(
            lambda p: tuple(p.shape),
            False,
            "second moments of parameters with fewer than 2 dims (``()`` for the others).",
        ),
    },
    math=_math,
    elementwise=False,
    tensorwise=True,
    check_order=("lr", "betas"),
    doc="State of :func:`came` and :func:`scale_by_came` (``came_pytorch``'s state keys).",
)
CAMEState = CAME.state


@CAME.public
def came(
    lr: Annotated[LR, positive("learning rate")],
    eps: Eps2 = (1e-30, 1e-16),
    clip_threshold: Annotated[float, positive("clip_threshold")] = 1.0,
    betas: Betas3 = (0.9, 0.999, 0.9999),
    weight_decay: NonNeg = 0.0,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """CAME, as ``came_pytorch.CAME`` (the rule is in the module docstring; the same defaults, ``lr`` required).

    Args:
      lr: learning rate (float, 0-d tensor or schedule; > 0). The paper uses 2e-4 for BERT / GPT-2.
      eps: ``(eps1, eps2)``: added to the squared gradient and to the instability.
      clip_threshold: bound on the RMS of the normalised update.
      betas: ``(b1, b2, b3)``: decay of the first moment, of the second moment and of the instability.
      weight_decay: weight decay ``p <- p - lr * weight_decay * p`` (decoupled).
      impl: kernel path, ``"auto" | "loop" | "foreach"`` (the factored math runs per tensor either way).

    Example::

        tx = pureopt.came(lr=2e-4, weight_decay=1e-2)

    Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023.
    """
    return CAME.build(locals())


@CAME.public
def scale_by_came(
    eps: Eps2 = (1e-30, 1e-16),
    clip_threshold: Annotated[float, positive("clip_threshold")] = 1.0,
    betas: Betas3 = (0.9, 0.999, 0.9999),
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by CAME's confidence-weighted direction (``step`` in the module docstring).

    Example::

        tx = pureopt.chain(pureopt.scale_by_came(), pureopt.scale_by_learning_rate(2e-4))
    """
    return CAME.build(locals())
