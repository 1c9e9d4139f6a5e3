"""Adafactor's factored second moments (``scale_by_factored_rms``) and the Adafactor algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import resolve
from pureopt.kernels.adafactor import adafactor as adafactor_kernel
from pureopt.kernels.adafactor import is_factored
from pureopt.kernels.dtensor import zeros_reduced
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import LeafInitFn, kernel_transform, step_init

__all__ = ["ScaleByFactoredRmsState", "scale_by_factored_rms", "adafactor_transform", "check_adafactor_args"]


class ScaleByFactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rms` and :func:`pureopt.optimizers.adafactor.adafactor`.

    Field names follow torch.optim.Adafactor's per-parameter state keys. As in torch, which keys a parameter
    has depends on its shape: a parameter with two or more dimensions keeps ``row_var`` (shape with the last
    dim set to 1) and ``col_var`` (the second-to-last dim set to 1), and its ``variance`` entry is ``()``; a
    vector or 0-d parameter keeps ``variance`` (shaped like it), and its ``row_var`` / ``col_var`` entries are
    ``()``.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (0-d float tensors; a parameter without gradient does not advance).
      row_var: row factors of the second moment (factored parameters).
      col_var: column factors of the second moment (factored parameters).
      variance: unfactored second moments (vectors and 0-d parameters).
    """

    num_updates: Tensor
    step: Any
    row_var: Any
    col_var: Any
    variance: Any


def check_adafactor_args(beta2_decay: float, eps: tuple[float | None, float], d: float) -> None:
    """torch.optim.Adafactor's checks (and wording) for ``beta2_decay``, ``eps`` and ``d``."""
    if not 0.0 >= beta2_decay:
        raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
    if eps[0] is not None and not 0.0 <= eps[0]:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
    if not 0.0 <= eps[1]:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
    if not 1.0 <= d:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")


def _real(p: Tensor) -> Tensor:
    if p.is_complex():
        raise RuntimeError("Adafactor does not support complex parameters")
    return p


def adafactor_transform(
    lr: ScalarOrSchedule | None,
    beta2_decay: float,
    eps: tuple[float | None, float],
    d: float,
    weight_decay: float,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The Adafactor step (see :mod:`pureopt.kernels.adafactor`) as a transformation.

    ``lr=None`` gives :func:`scale_by_factored_rms` (no relative step size, no weight decay).
    """
    check_impl(impl)
    eps1 = None if eps[0] is None else float(eps[0])
    eps2 = float(eps[1])

    def row_init(p: Tensor) -> Any:
        p = _real(p)
        if not is_factored(p):
            return ()
        return zeros_reduced(p, -1, state_dtype or p.dtype)  # a DTensor for a DTensor parameter

    def col_init(p: Tensor) -> Any:
        p = _real(p)
        if not is_factored(p):
            return ()
        return zeros_reduced(p, -2, state_dtype or p.dtype)

    def var_init(p: Tensor) -> Any:
        p = _real(p)
        return () if is_factored(p) else torch.zeros_like(p, dtype=state_dtype)

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Any]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor], dict[str, list[Any]]]:
        res = adafactor_kernel(
            params,
            grads,
            s["row_var"],
            s["col_var"],
            s["variance"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta2_decay=beta2_decay,
            eps1=eps1,
            eps2=eps2,
            d=d,
            weight_decay=weight_decay,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
        )
        return res.updates, {k: v for k, v in res._asdict().items() if k != "updates"}

    fields: dict[str, LeafInitFn | None] = {
        "step": step_init,
        "row_var": row_init,
        "col_var": col_init,
        "variance": var_init,
    }
    return kernel_transform(ScaleByFactoredRmsState, fields, step)


def scale_by_factored_rms(
    beta2_decay: float = -0.8,
    eps: float | None = None,
    d: float = 1.0,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Normalise updates by Adafactor's (factored) second-moment estimate, then clip their RMS to ``d``.

    Update rule, per parameter with its own step count ``t`` (``w = t ** beta2_decay``)::

        2+ dims:  R <- R + w * (mean(g**2, -1) - R);   C <- C + w * (mean(g**2, -2) - C)
                  V = (R @ C) / max(mean(R, -2), eps)
        else:     V <- V + w * (g**2 - V)
        U = g / sqrt(max(V, eps**2));   u = U / max(1, RMS(U) / d)

    The second moment of a matrix costs ``rows + cols`` numbers instead of ``rows * cols``. This is
    torch.optim.Adafactor without its relative step size (``max(eps2, RMS(p)) * min(lr, 1/sqrt(t))``) and
    weight decay: chain with a learning rate to descend.

    Args:
      beta2_decay: exponent of the decay schedule ``1 - beta2_t = t ** beta2_decay`` (<= 0).
      eps: floor of the estimate (torch's ``eps1``); ``None`` is the machine epsilon of the update's dtype.
      d: clipping threshold on the RMS of the normalised update (>= 1).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the factors (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_factored_rms(), pureopt.scale_by_learning_rate(1e-2))

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
    """
    check_adafactor_args(beta2_decay, (eps, 0.0), d)
    return adafactor_transform(None, beta2_decay, (eps, 0.0), d, 0.0, False, impl, state_dtype)
