"""``materialize``: a value that ``torch.compile`` computes once, in its own kernel, instead of inlining it.

Per-tensor scalars (Adam's bias corrections ``1 - beta**t``, step sizes, ...) are a few float64 operations on the
step counts. Inductor inlines such cheap pointwise producers into every consumer, so a compiled pure step would
evaluate ``pow``/``sqrt`` in double precision once per vector of every parameter tensor — several times the cost
of the memory traffic the step needs. Passing them through this identity, which inductor cannot see into, makes
it compute the scalars once per step (one small kernel for all tensors) and read them in the elementwise kernels.

Only used while compiling (eager code calls nothing); it is differentiable (identity gradient, for
hypergradients through a tensor ``lr``) and vmap-able (for compiled ensembles).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["materialize", "materialize_when_compiling"]


@torch.library.custom_op("pureopt::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy of ``x``, computed by its producer before anything reads it (a fusion barrier for inductor)."""
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _backward(ctx: Any, grad: Tensor) -> Tensor:
    return grad


materialize.register_autograd(_backward)


@materialize.register_vmap
def _(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
    return materialize(x), in_dims[0]


def materialize_when_compiling(values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``values`` through :func:`materialize` while ``torch.compile`` traces, unchanged otherwise."""
    if not torch.compiler.is_compiling():
        return values
    return tuple(materialize(v) for v in values)
