"""MARS: AdamW or Lion on a variance-reduced gradient (the approximate, single-gradient form).

Update rule, per parameter ``p`` (a matrix, or any tensor with ``optimize_1d``) with gradient ``g``, its own step
count ``t`` and the previous step's gradient ``g_prev`` (``last_grad``; ``m``, ``v`` and ``g_prev`` start at
zero)::

    g <- -g                                          if maximize
    t <- t + 1
    c = g + gamma * beta1 / (1 - beta1) * (g - g_prev)
    c <- c / ||c||                                   if ||c|| > 1 (the Frobenius norm of this tensor's c)
    m <- m + (1 - beta1) * (c - m)
    adamw:  v <- beta2 * v + (1 - beta2) * c * c;   vmax <- max(vmax, v), used for v if amsgrad
            u = m / ((sqrt(v + 1e-15) + eps) / sqrt(1 - beta2**t) * (1 - beta1**t))
    lion:   u = sign(m)
    p <- p * (1 - lr * weight_decay) - lr * u        (decoupled weight decay)
    g_prev <- g

Other tensors (``ndim < 2``: biases, gains; unless ``optimize_1d``) take an AdamW step with ``betas_1d``,
``weight_decay_1d`` and the learning rate ``lr * lr_1d / lr_0`` (``lr_0``: ``lr`` when the transformation is built,
so that a schedule scales both), on ``g`` itself: ``m``, ``v`` as above with ``c = g``. The per-tensor norm makes
MARS not elementwise (flat buffers step it per parameter); the donated CPU step runs it in cache-sized chunks of
whole tensors (``tensorwise``). Complex tensors are viewed as real pairs, so a complex
vector counts as a matrix, as in the reference's per-parameter path.

The ``scale_by_mars`` form applies the MARS rule to every tensor (``optimize_1d``) and returns the positive
direction ``u``; partition biases to another transformation where wanted.

Reference and defaults: pytorch-optimizer's ``MARS`` (``lr=3e-3``, ``betas=(0.95, 0.99)``, ``gamma=0.025``,
``lr_1d=3e-3``, ``betas_1d=(0.9, 0.95)``, ``weight_decay_1d=0.1``, ``eps=1e-8``), whose per-parameter path pureopt
follows, as the authors' code (AGI-Arena/MARS, ``is_approx=True``) with the same defaults. The authors' denominator
is ``(sqrt(v) / sqrt(1 - beta2**t) + eps) * (1 - beta1**t)`` (no ``1e-15``, eps not scaled by the bias correction)
and their weight decay is added to the step (``p - lr * (wd * p + u)``), equal up to rounding. Their Lion form is
the sign of the MARS momentum ``m`` (one ``beta1``; not Lion's two-beta interpolation); so is pureopt's. The
``'shampoo'`` form (Newton-Schulz on matrices) and the reference's ``cautious`` masking are not provided, nor its
coupled weight decay (``weight_decouple=False``, which adds the decay to the gradient only after the step used
it). Step counts are per parameter (the reference keeps one per param group; they differ only where a gradient was
``None``).

Yuan, Liu, Wu, Zhou & Gu, "MARS: Unleashing the Power of Variance Reduction for Training Large Models",
arXiv:2411.10438, 2024.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import (
    AS_FLOAT,
    LR,
    Algorithm,
    Betas,
    Check,
    Impl,
    Kernel,
    StateDtype,
    nonneg,
    state,
    step_count,
)
from pureopt.base import GradientTransformation
from pureopt.hyperparams import is_schedule
from pureopt.kernels.common import add_update, map_scalars_n, on_host, scalar_dtype, scalar_for, scalars_for

__all__ = ["MARS", "ScaleByMarsState", "mars", "scale_by_mars"]

SQ_EPS = 1e-15
"""Added to the second moment inside the root (the reference's ``exp_avg_sq_eps``)."""


def _mars_type(value: Any, name: str) -> str:
    if value not in ("adamw", "lion"):
        raise ValueError(f"Invalid mars_type: {value!r} (one of 'adamw', 'lion')")
    return str(value)


MarsType = Annotated[str, Check(_mars_type)]
Eps = Annotated[float, nonneg("epsilon"), AS_FLOAT]
NonNeg = Annotated[float, nonneg(), AS_FLOAT]


def _lr_1d_factor(lr: Any, lr_1d: float) -> float | Tensor:
    """``lr_1d / lr_0`` (the reference's ``lr_1d_factor``), 1 where ``lr_0`` is zero; ``lr_0`` is ``lr`` now (a
    schedule's value at step 0, a tensor's copy: nothing is read to the host)."""
    lr0 = lr(torch.zeros((), dtype=torch.int64)) if is_schedule(lr) else lr
    if isinstance(lr0, Tensor):
        lr0 = lr0.detach().to(scalar_dtype(lr0.device), copy=True)
        return torch.where(lr0 != 0, lr_1d / lr0, torch.ones_like(lr0))
    return lr_1d / lr0 if lr0 != 0 else 1.0


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    (b1, b2), (c1, c2) = k.h.betas, k.h.betas_1d

    def bcs(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(f for a, b in ((b1, b2), (c1, c2)) for f in (1 - torch.pow(a, t), torch.sqrt(1 - torch.pow(b, t))))

    host = on_host(k.apply, k.exp_avg)
    out = map_scalars_n(bcs, steps, outputs=4, host=host)
    names = ("bc1", "bc2_sqrt", "bc1_1d", "bc2_sqrt_1d")
    return {name: scalars_for(values, k.exp_avg) for name, values in zip(names, out)}


def _pick(values: Sequence[Any] | None, idx: Sequence[int]) -> Any:
    return None if values is None else [values[i] for i in idx]


def _norms(ops: Any, xs: list[Tensor]) -> list[Tensor]:
    if ops.foreach and xs:
        return list(torch._foreach_norm(xs))
    return [torch.linalg.vector_norm(x) for x in xs]


def _adam_direction(ops: Any, k: Kernel, idx: list[int], c: list[Tensor], betas: Any, one_d: bool) -> Any:
    """Adam's ``m / d`` on ``c`` for the tensors at ``idx``; returns (direction, new m, new v, new vmax)."""
    own, h = k.own, k.h
    beta1, beta2 = betas
    suffix = "_1d" if one_d else ""
    m = ops.lerp(_pick(k.exp_avg, idx), c, 1 - beta1, inplace=k.donate)
    v = ops.addcmul(ops.mul(_pick(k.exp_avg_sq, idx), beta2, inplace=k.donate), c, c, value=1 - beta2, inplace=own)
    vmax = ops.maximum(_pick(k.max_exp_avg_sq, idx), v, inplace=k.donate) if h.amsgrad else None
    d = ops.add_scalar(ops.sqrt(ops.add_scalar(v if vmax is None else vmax, SQ_EPS), inplace=own), h.eps, inplace=own)
    d = ops.mul(ops.div(d, _pick(getattr(k, "bc2_sqrt" + suffix), idx), inplace=own),
                _pick(getattr(k, "bc1" + suffix), idx), inplace=own)  # fmt: skip
    return ops.div_list(m, d), m, v, vmax


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    g = ops.neg(k.g) if h.maximize else k.g
    n = len(g)
    mixed = [i for i in range(n) if h.optimize_1d or g[i].dim() >= 2]
    one_d = sorted(set(range(n)) - set(mixed))
    if one_d and k.p is None and h.weight_decay_1d != 0 and h.lr is not None:
        raise ValueError("weight_decay_1d needs the parameters: call update(grads, state, params)")
    new: dict[str, list[Any]] = {key: [None] * n for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    updates: list[Any] = [None] * n
    for idx, is_1d in ((mixed, False), (one_d, True)):
        if not idx:
            continue
        gs = _pick(g, idx)
        if is_1d:
            u, m, v, vmax = _adam_direction(ops, k, idx, gs, h.betas_1d, True)
        else:
            beta1 = h.betas[0]
            c = ops.add(ops.mul(ops.sub(gs, _pick(k.last_grad, idx)), h.gamma * (beta1 / (1 - beta1)), inplace=own),
                        gs, inplace=own)  # fmt: skip
            c = ops.div(c, [x.clamp_min(1.0) for x in _norms(ops, c)], inplace=own)
            if h.mars_type == "adamw":
                u, m, v, vmax = _adam_direction(ops, k, idx, c, h.betas, False)
            else:
                m = ops.lerp(_pick(k.exp_avg, idx), c, 1 - beta1, inplace=k.donate)
                u, v, vmax = ops.sign(m), _pick(k.exp_avg_sq, idx), _pick(getattr(k, "max_exp_avg_sq", None), idx)
        for key, values in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
            for i, value in zip(idx, values or ()):
                new[key][i] = value
        lr = h.lr * h.lr_1d_factor if (is_1d and h.lr is not None) else h.lr
        coef = k.coef * h.lr_1d_factor if is_1d else k.coef
        wd = h.weight_decay_1d if is_1d else h.weight_decay
        ps = _pick(k.p, idx)
        if k.apply:  # the reference's order: decay, then p.add_(u, alpha=-lr)
            if wd != 0 and lr is not None:
                ops.mul(ps, scalar_for(1 - lr * wd, ps), inplace=True)
            add_update(ops, ps, u, coef, owned=True)
            continue
        step = add_update(ops, None, u, coef, owned=True)
        assert step is not None
        if wd != 0 and lr is not None:
            step = ops.add(step, ops.mul(ps, scalar_for(-lr * wd, ps)), inplace=own)
        for i, value in zip(idx, step):
            updates[i] = value
    if k.donate:
        last = ops.copy_(k.last_grad, g)
    else:
        last = g if h.maximize and own else ops.clone(g)  # (never the caller's gradients themselves)
    out = {"last_grad": last, **{key: values for key, values in new.items() if key in ("exp_avg", "exp_avg_sq")}}
    if h.amsgrad:
        out["max_exp_avg_sq"] = [
            k.max_exp_avg_sq[i] if value is None else value for i, value in enumerate(new["max_exp_avg_sq"])
        ]
    return (None if k.apply else updates), out


MARS = Algorithm(
    "MARS",
    record="ScaleByMarsState",
    fields={
        "step": step_count(),
        "exp_avg": state("momentum of the variance-reduced gradients (of the gradients for 1-d AdamW tensors)."),
        "exp_avg_sq": state("second moments (unused by the Lion form's matrices).", nonneg=True),
        "last_grad": state("the previous step's gradients."),
        "max_exp_avg_sq": state("maxima of the second moments.", when=lambda h: h.amsgrad, nonneg=True),
    },
    math=_math,
    scalars=_scalars,
    elementwise=False,
    tensorwise=True,
    neutral={"weight_decay_1d": 0.0, "optimize_1d": True, "lr_1d_factor": 1.0},
    check_order=("lr", "betas", "mars_type", "gamma", "weight_decay", "weight_decay_1d", "eps"),
    doc="State of :func:`mars` and :func:`scale_by_mars` (pytorch-optimizer's state keys).",
)
ScaleByMarsState = MARS.state


@MARS.public
def mars(
    lr: LR = 3e-3,
    betas: Betas = (0.95, 0.99),
    gamma: NonNeg = 0.025,
    mars_type: MarsType = "adamw",
    optimize_1d: bool = False,
    lr_1d: NonNeg = 3e-3,
    betas_1d: Betas = (0.9, 0.95),
    weight_decay: NonNeg = 0.0,
    weight_decay_1d: NonNeg = 0.1,
    amsgrad: bool = False,
    eps: Eps = 1e-8,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """MARS (the rule is in the module docstring); pytorch-optimizer's defaults.

    Args:
      betas: decay rates of the momentum and of the second moment (matrices).
      gamma: strength of the gradient correction ``g - g_prev``.
      mars_type: ``"adamw"`` (Adam on the corrected gradient) or ``"lion"`` (its momentum's sign).
      optimize_1d: apply MARS to tensors with fewer than 2 dimensions too (else they take AdamW).
      lr_1d: the AdamW learning rate of those tensors at the initial ``lr`` (it follows a schedule of ``lr``).
      betas_1d: their AdamW decay rates.
      weight_decay: decoupled weight decay of the MARS tensors (``p <- p * (1 - lr * weight_decay)``).
      weight_decay_1d: decoupled weight decay of the AdamW tensors.
      amsgrad: normalise by the running maximum of the second moment (the reference's ``ams_bound``).
      eps: added to the root of the second moment.

    Example::

        tx = pureopt.mars(lr=3e-3, weight_decay=1e-2, mars_type="lion")

    Yuan et al., "MARS: Unleashing the Power of Variance Reduction for Training Large Models", 2024.
    """
    return MARS.build(locals(), lr_1d_factor=_lr_1d_factor(lr, lr_1d))


@MARS.public
def scale_by_mars(
    betas: Betas = (0.95, 0.99),
    gamma: NonNeg = 0.025,
    mars_type: MarsType = "adamw",
    amsgrad: bool = False,
    eps: Eps = 1e-8,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by MARS's direction (AdamW's ``m_hat / d`` or Lion's ``sign(m)`` on the variance-reduced
    gradient), for every tensor.

    Example::

        tx = pureopt.chain(pureopt.scale_by_mars(), pureopt.scale_by_learning_rate(3e-3))
    """
    return MARS.build(locals(), betas_1d=betas)
