"""DoG (Distance over Gradients): SGD with a parameter-free step size, as the ``dog-optimizer`` package's ``DoG``.

Update rule (Ivgi, Hinder & Carmon 2023, Algorithm 1; all parameters of the transformation taken as one vector,
``x0`` the initial parameters, ``rbar`` and ``G`` global)::

    g   <- g + weight_decay * p
    first step:  rbar = reps_rel * (1 + ||x0||);       G = ||g||^2 + eps
    later:       rbar <- max(rbar, ||p - x0||);        G <- G + ||g||^2
    eta = lr * rbar / sqrt(G)                          (``init_eta`` on the first step, when given)
    p   <- p - eta * g

Norms and sums run over every parameter of the transformation that has a gradient this step, as 0-d tensors (no
host sync, except on the applied CPU path where reading costs nothing; the reference asserts ``G > 0`` on the host,
which pureopt does not). The
reference needs a gradient for every parameter (it fails on a ``None`` one); pureopt leaves a parameter without a
gradient out of that step's norms, and out of its step. ``x0`` is a per-parameter copy taken by ``init`` (the
reference takes it at its first step, per group, as ``init_buffer``). The reference keeps one ``rbar``/``G`` per
param group; in pureopt one transformation is one group. The paper recommends iterate averaging on top (the
reference's ``PolynomialDecayAverager``; not part of this transformation). Layer-wise DoG (``LDoG``) is not offered.
Not elementwise (global norms). Oracle: ``dog.DoG``.

Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule", ICML 2023.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms._sums import norm_total, number, on_host_scalars, scratch_math, sq_total
from pureopt.algorithms.define import LR, Algorithm, Global, Impl, Kernel, NonNeg, StateDtype, param_copy
from pureopt.algorithms.prodigy import positive, scalar0
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_update, scalar_for, torch_grad
from pureopt.kernels.listops import ListOps

__all__ = ["DOG", "DoGState", "dog"]


@scratch_math
def _math(k: Kernel, ops: ListOps) -> tuple[list[Tensor] | None, Mapping[str, Any]]:
    h, own = k.h, k.own
    rbar, total, step = k.rbar, k.G, k.k
    first = step == 0
    host = on_host_scalars(k.apply, k.g)  # (CPU, applied: the branch and the step size on the host)
    g, owned = torch_grad(ops, k.g, k.p, maximize=False, weight_decay=h.weight_decay, own=own)
    if host:  # only the norm this step needs
        if bool(first):
            new_rbar = h.reps_rel * (1 + norm_total(ops, k.p, rbar))
        else:
            new_rbar = torch.maximum(rbar, norm_total(ops, ops.sub(k.p, k.x0), rbar))
    else:
        start = h.reps_rel * (1 + norm_total(ops, k.p, rbar))
        new_rbar = torch.where(first, start, torch.maximum(rbar, norm_total(ops, ops.sub(k.p, k.x0), rbar)))
    gsq = sq_total(ops, g, total)
    new_total = torch.where(first, gsq + h.eps, total + gsq)
    lr = h.lr.to(rbar) if isinstance(h.lr, Tensor) else h.lr
    eta = lr * new_rbar / torch.sqrt(new_total)
    if h.init_eta is not None:
        eta = torch.where(first, torch.full_like(eta, h.init_eta), eta)
    updates = add_update(ops, k.target, g, scalar_for(-number(eta, host), g), owned=owned)
    return updates, {"rbar": new_rbar, "G": new_total, "k": step + 1}


DOG = Algorithm(
    "DoG",
    record="DoGState",
    fields={"x0": param_copy("the initial parameters (the reference's ``init_buffer``).")},
    math=_math,
    elementwise=False,
    global_fields={
        "rbar": Global(
            "the largest distance from x0 so far (0-d, float64 where the device has it).", init=scalar0(0.0)
        ),
        "G": Global("the running sum of squared gradient norms.", init=scalar0(0.0)),
        "k": Global("the number of steps taken.", init=scalar0(0.0)),
    },
    check_order=("lr",),
    doc="State of :func:`dog` (``x0`` per parameter; the reference's group values ``rbar``, ``G`` as global fields).",
)
DoGState = DOG.state


@DOG.public
def dog(
    lr: Annotated[LR, positive("learning rate")] = 1.0,
    reps_rel: NonNeg = 1e-6,
    weight_decay: NonNeg = 0.0,
    eps: NonNeg = 1e-8,
    init_eta: Annotated[float | None, positive("init_eta")] = None,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """DoG, as ``dog.DoG`` (the rule is in the module docstring; the same defaults).

    Args:
      lr: multiplier of the step size (the paper's ``c``; leave it at 1).
      reps_rel: the first step's distance, relative to ``1 + ||x0||`` (1e-4 for models with batch normalisation).
      weight_decay: L2 term added to the gradient.
      eps: added to the first squared gradient norm.
      init_eta: the first step size, overriding ``reps_rel``.

    Example::

        tx = pureopt.dog()

    Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule", ICML 2023.
    """
    if init_eta is None and not reps_rel > 0:
        raise ValueError(f"Invalid reps_rel value ({reps_rel}): it must be > 0 (or give init_eta)")
    if init_eta is not None:
        reps_rel = 0.0  # the reference: init_eta replaces the first step's distance
    return DOG.build(locals())
