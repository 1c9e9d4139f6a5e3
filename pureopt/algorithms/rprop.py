"""Rprop (resilient backpropagation, the "Rprop-" variant of torch.optim.Rprop).

Update rule, per element with gradient ``g``, previous (masked) gradient ``prev`` and step size ``s`` (starting at
``lr``, the initial step size)::

    g <- -g                                        if maximize
    t <- t + 1
    q = sign(g * prev)
    f = eta_plus where q > 0,  eta_minus where q < 0,  1 where q == 0
    s <- clamp(s * f, step_size_min, step_size_max)
    g <- 0 where q < 0                             (no move after a sign change)
    update = -sign(g) * s
    prev <- g

Every sign-dependent choice is a ``torch.where`` on tensors: no host synchronisation, no Python branch on tensor
values. A tensor or scheduled ``lr`` is read again when a parameter takes its first step (torch creates its state
then, with the learning rate of that moment). The ``scale_by_rprop`` form returns the positive step
``sign(g) * s``. Complex tensors are treated as pairs of reals, as torch does.

Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm", 1993;
Igel & Hüsken, "Improving the Rprop Learning Algorithm", 2000.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Check, Field, Hyper, Impl, Kernel, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.hyperparams import is_schedule, resolve
from pureopt.kernels.listops import ListOps
from pureopt.kernels.select import functorch_active, records_autograd
from pureopt.transforms._util import state_dtype_for

__all__ = ["RPROP", "ScaleByRpropState", "rprop", "scale_by_rprop"]


def _etas(etas: Any, name: str) -> tuple[float, float]:
    if not 0.0 < etas[0] < 1.0 < etas[1]:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
    return float(etas[0]), float(etas[1])


def _step_sizes(sizes: Any, name: str) -> tuple[float, float]:
    # (torch does not check; a reversed pair is surely a mistake)
    if not 0.0 <= sizes[0] <= sizes[1]:
        raise ValueError(f"Invalid step_sizes: {sizes[0]}, {sizes[1]} (expected 0 <= min <= max)")
    return float(sizes[0]), float(sizes[1])


def _initial(value: Any, name: str) -> Any:
    if not 0.0 <= value:
        raise ValueError(f"Invalid initial step size: {value}")
    return value


Etas = Annotated[tuple[float, float], Check(_etas)]
"""``(eta_minus, eta_plus)`` with ``0 < eta_minus < 1 < eta_plus`` (torch.optim.Rprop's check)."""
StepSizes = Annotated[tuple[float, float], Check(_step_sizes)]
"""``(min, max)`` with ``0 <= min <= max``."""


def _size_init(h: Hyper, state_dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    def init(p: Tensor) -> Tensor:  # the learning rate at update 0 (torch: at the parameter's first step)
        sizes = torch.zeros_like(p, dtype=state_dtype_for(p, state_dtype))
        real = torch.view_as_real(sizes) if sizes.is_complex() else sizes
        first = resolve(h.lr, torch.zeros((), dtype=torch.int64, device=p.device))
        if isinstance(first, Tensor):
            real.add_(first.to(real.dtype))
        else:
            real.fill_(first)
        return sizes

    return init


def _clamp(ops: ListOps, xs: list[Tensor], lo: float, hi: float, inplace: bool = False) -> list[Tensor]:
    """``min(max(x, lo), hi)`` for every tensor (``torch.clamp``'s semantics, NaN propagates)."""
    if ops.foreach:
        if inplace:
            torch._foreach_clamp_min_(xs, lo)
            torch._foreach_clamp_max_(xs, hi)
            return xs
        out = list(torch._foreach_clamp_min(xs, lo))
        torch._foreach_clamp_max_(out, hi)
        return out
    if inplace and not functorch_active():  # vmap has no batching rule for clamp_ (a slow fallback)
        return [x.clamp_(lo, hi) for x in xs]
    return [torch.clamp(x, lo, hi) for x in xs]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    # a parameter on its first step (count advanced to 1) starts from the learning rate of this update
    return {"fresh": [t == 1 for t in steps]} if k.h.dynamic else {}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, prev = k.ops, k.h, k.prev
    first = h.lr if h.dynamic else None
    # in place on the kernel's own temporaries, unless autograd records through the update (or the learning rate)
    tmp = k.own and not records_autograd([first] if first is not None else [])
    donate = k.donate and tmp
    own = tmp and ops.inplace_ok  # results may go straight into buffers with out=
    etaminus, etaplus = h.etas
    g = ops.neg(k.g) if h.maximize else k.g
    sizes, owned_sizes = k.step_size, donate
    if first is not None:
        sizes = [torch.where(f, first, s) for f, s in zip(k.fresh, sizes)]
        owned_sizes = tmp
    q = ops.sign(ops.mul_list(g, prev), inplace=tmp)
    # q > 0 -> eta_plus, q < 0 -> eta_minus, q == 0 -> 1 (q + 1), NaN stays NaN as in torch
    factors = [torch.where(x > 0, etaplus, torch.where(x < 0, etaminus, x + 1)) for x in q]
    lo, hi = h.step_sizes
    new_sizes = _clamp(ops, ops.mul_list(sizes, factors, inplace=owned_sizes), lo, hi, tmp)
    if donate and own:  # g with zeros after a sign change, written over prev (read above for the last time)
        zeros: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # (out= takes no Python number)
        for pv in prev:
            if (pv.device, pv.dtype) not in zeros:
                zeros[pv.device, pv.dtype] = pv.new_zeros(())
        new_prev = [torch.where(x < 0, zeros[pv.device, pv.dtype], gi, out=pv) for x, gi, pv in zip(q, g, prev)]
    else:
        new_prev = [torch.where(x < 0, 0.0, gi) for x, gi in zip(q, g)]
    new = {"prev": new_prev, "step_size": new_sizes}
    if k.apply:  # torch: p.addcmul_(sign(g), s, value=-1)
        ops.addcmul(k.p, ops.sign(new_prev), new_sizes, value=-1.0 if h.negate else 1.0, inplace=True)
        return None, new
    direction = ops.mul_list(ops.sign(new_prev), new_sizes, inplace=tmp)
    return (ops.neg(direction, inplace=tmp) if h.negate else direction), new


RPROP = Algorithm(
    "Rprop",
    record="ScaleByRpropState",
    fields={
        "step": step_count(),
        "prev": state("the previous gradients, zeroed where their sign changed."),
        "step_size": Field(
            "the per-element step sizes (initialised to the learning rate; for complex parameters both the real and"
            " the imaginary part, as torch).",
            _size_init,
            nonneg=True,
        ),
    },
    math=_math,
    scalars=_scalars,
    doc="State of :func:`rprop` and :func:`scale_by_rprop` (torch.optim.Rprop's state keys).",
)
ScaleByRpropState = RPROP.state


@RPROP.public
def rprop(
    lr: LR = 1e-2,
    etas: Etas = (0.5, 1.2),
    step_sizes: StepSizes = (1e-6, 50.0),
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """The resilient backpropagation algorithm, as ``torch.optim.Rprop`` (the rule is in the module docstring).

    Every element has its own step size (starting at ``lr``) that grows by ``eta_plus`` while the gradient keeps
    its sign and shrinks by ``eta_minus`` when the sign flips; only the gradient's sign is used.

    Args:
      lr: the initial step size (float, 0-d tensor or schedule). As in torch it is only read when a
        parameter takes its first step (torch creates the state then).
      etas: ``(eta_minus, eta_plus)``, multiplicative decrease and increase factors
        (``0 < eta_minus < 1 < eta_plus``).
      step_sizes: ``(min, max)`` bounds of the step sizes.

    Example::

        tx = pureopt.rprop(lr=1e-3, etas=(0.5, 1.2), step_sizes=(1e-6, 1.0))

    Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
    1993.
    """
    return RPROP.build(locals(), negate=True, dynamic=isinstance(lr, Tensor) or is_schedule(lr))


@RPROP.public
def scale_by_rprop(
    initial_step_size: Annotated[float, Check(_initial)] = 1e-2,
    etas: Etas = (0.5, 1.2),
    step_sizes: StepSizes = (1e-6, 50.0),
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace each update by its sign times a per-element step size adapted from sign agreement (Rprop):
    ``sign(g) * s``, ``s`` starting at ``initial_step_size``.

    The result points along the gradient: chain with ``scale(-1.0)`` to descend (``pureopt.rprop`` does).

    Example::

        tx = pureopt.chain(pureopt.scale_by_rprop(1e-3), pureopt.scale(-1.0))

    Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
    1993.
    """
    return RPROP.build(locals(), lr=initial_step_size, negate=False, dynamic=False)
