"""Rprop (resilient backpropagation, the "Rprop-" variant of torch.optim.Rprop) on tensor lists.

Update rule (torch.optim.Rprop), per parameter with gradient ``g``, previous (masked) gradient ``prev`` and
per-element step sizes ``s`` (initialised to ``lr``)::

    g <- -g                                        if maximize
    t <- t + 1
    q = sign(g * prev)
    f = eta_plus where q > 0,  eta_minus where q < 0,  1 where q == 0
    s <- clamp(s * f, step_size_min, step_size_max)
    g <- 0 where q < 0                             (no move after a sign change)
    update = -sign(g) * s
    prev <- g

Every sign-dependent choice is a ``torch.where`` on tensors: no host synchronisation, no Python branch on
tensor values. ``negate=False`` returns the positive step ``sign(g) * s`` (used by
:func:`pureopt.transforms.rprop.scale_by_rprop`). Complex tensors are treated as pairs of reals, as torch does.

Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm", 1993;
Igel & Hüsken, "Improving the Rprop Learning Algorithm", 2000.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.kernels.common import as_complex_like, as_real, can_apply, cast_like, elementwise
from pureopt.kernels.listops import ListOps, ops_for
from pureopt.kernels.nadam import autograd_recording
from pureopt.kernels.select import choose_impl, functorch_active

__all__ = ["RpropResult", "rprop", "clamp"]


class RpropResult(NamedTuple):
    """Updates and new state lists (named like torch.optim's state keys)."""

    updates: list[Tensor] | None  # None: already added to the parameters (apply=True)
    step: list[Tensor]
    prev: list[Tensor]
    step_size: list[Tensor]


def clamp(ops: ListOps, xs: list[Tensor], lo: float, hi: float, inplace: bool = False) -> list[Tensor]:
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


def rprop(
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    steps: list[Tensor],
    *,
    etaminus: float,
    etaplus: float,
    step_size_min: float,
    step_size_max: float,
    maximize: bool,
    first_step_size: float | Tensor | None = None,
    negate: bool = True,
    impl: str = "auto",
    donate: bool = False,
    params: list[Tensor] | None = None,
    apply: bool = False,
) -> RpropResult:
    """One Rprop step over tensor lists; returns the updates and the new state lists (see module docstring).

    Args:
      grads: the gradients, one per parameter (none of them ``None``).
      prevs: the previous masked gradients (torch's ``prev``).
      step_sizes: the per-element step sizes (torch's ``step_size``).
      steps: per-parameter step counts.
      first_step_size: when given (a learning rate that may change between updates: a tensor or a schedule),
        a parameter on its first step (``step == 0``) starts from this step size, as torch initialises its
        state lazily with the learning rate of that moment.
      negate: return ``-sign(g) * s`` (a descent update) rather than ``sign(g) * s``.
      impl: ``"auto" | "loop" | "foreach"``.
      donate: the caller owns the state buffers: they are updated in place.
      params, apply: with ``donate``, add the updates to ``params`` in place (torch's
        ``p.addcmul_(sign(g), s, value=-1)``) and return ``updates=None``.
    """
    path = choose_impl(impl, [*grads, *prevs])
    ops = ops_for(path)
    # in place on the kernel's own temporaries, unless autograd records through the update
    tmp = not autograd_recording(grads, prevs, step_sizes, [first_step_size] if first_step_size is not None else [])
    donate = donate and tmp
    like = grads
    prev = as_real(prevs)
    sizes = as_real(step_sizes)
    g = cast_like(as_real(grads), prev)  # state may be kept in another dtype (state_dtype=)
    rparams = cast_like(as_real(params), prev) if params is not None else None
    apply = can_apply(ops, apply and donate, params, rparams)
    fresh = [t == 0 for t in steps] if first_step_size is not None else None
    new_steps = ops.add_scalar(steps, 1, inplace=donate)
    own = tmp and ops.inplace_ok  # results may go straight into buffers with out=

    def body(
        ops: ListOps,
        p: list[Tensor] | None,
        g: list[Tensor],
        prev: list[Tensor],
        sizes: list[Tensor],
        fresh: list[Tensor] | None,
    ) -> tuple[list[Tensor] | None, ...]:
        if maximize:
            g = ops.neg(g)
        owned_sizes = donate
        if fresh is not None:
            sizes = [torch.where(f, first_step_size, s) for f, s in zip(fresh, sizes)]  # type: ignore[arg-type]
            owned_sizes = tmp
        q = ops.sign(ops.mul_list(g, prev), inplace=tmp)
        # q > 0 -> eta_plus, q < 0 -> eta_minus, q == 0 -> 1 (q + 1), NaN stays NaN as in torch
        factors = [torch.where(x > 0, etaplus, torch.where(x < 0, etaminus, x + 1)) for x in q]
        new_sizes = clamp(ops, ops.mul_list(sizes, factors, inplace=owned_sizes), step_size_min, step_size_max, tmp)
        if donate and own:  # g with zeros after a sign change, written over prev (read above for the last time)
            zeros: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # (out= takes no Python number)
            for pv in prev:
                if (pv.device, pv.dtype) not in zeros:
                    zeros[pv.device, pv.dtype] = pv.new_zeros(())
            new_prev = [torch.where(x < 0, zeros[pv.device, pv.dtype], gi, out=pv) for x, gi, pv in zip(q, g, prev)]
        else:
            new_prev = [torch.where(x < 0, 0.0, gi) for x, gi in zip(q, g)]
        if apply:  # torch: p.addcmul_(sign(g), s, value=-1)
            assert p is not None
            ops.addcmul(p, ops.sign(new_prev), new_sizes, value=-1.0 if negate else 1.0, inplace=True)
            return None, new_prev, new_sizes
        direction = ops.mul_list(ops.sign(new_prev), new_sizes, inplace=tmp)
        updates = ops.neg(direction, inplace=tmp) if negate else direction
        return updates, new_prev, new_sizes

    updates, new_prev, new_sizes = elementwise(
        body, ops, (rparams, g, prev, sizes, fresh), writes=(None, 2, 3), in_place=apply
    )
    assert new_prev is not None and new_sizes is not None
    return RpropResult(
        None if updates is None else as_complex_like(updates, like),
        new_steps,
        as_complex_like(new_prev, like),
        as_complex_like(new_sizes, like),
    )
