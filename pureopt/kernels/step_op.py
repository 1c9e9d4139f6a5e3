"""A whole in-place optimizer step as one opaque torch op, for a step traced by ``torch.compile``.

The eager encoded step runs the algorithm's math in one native pass per tile (:mod:`pureopt.kernels.onepass`):
decode, step and encode in cache, all tensors in one call. dynamo cannot trace that pass (it traces the math on
symbolic values and builds a kernel from it), and the compiled step it can trace instead decodes and encodes chunk
by chunk through :mod:`pureopt.kernels.codec_ops`, about twice as slow. So the whole encoded step is one op here:
the compiled graph calls the eager step, which, donated (the adapters, ``pureopt.inplace_step``), overwrites the
parameters and the state (``pureopt::inplace_step``), and, pure, returns the updates and the new state
(``pureopt::step``).

A step is named by a *plan*, a string registered (:func:`register`) when the transformation is built, made from
everything static that decides the step (the algorithm, its numeric hyperparameters, the encodings), so that a
graph cached on disk names the same step in another process. What changes from call to call travels as tensors:
parameters, gradients, the state's tensors (flattened; ``layout`` says how to rebuild the records) and the
hyperparameters given as tensors or schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "inplace_step", "step"]

_PLANS: dict[str, Callable[..., list[Tensor] | None]] = {}


def register(key: str, body: Callable[..., list[Tensor] | None]) -> str:
    """Name ``body(layout, params, grads, state, extras, donate=...)`` (an eager step: donated, in place; else
    returning the updates and the new state's tensors) ``key`` for :func:`inplace_step` and :func:`step`; ``key``
    must be made from everything static that decides the step (equal keys: interchangeable steps)."""
    _PLANS[key] = body
    return key


@torch.library.custom_op("pureopt::inplace_step", mutates_args=("params", "state"))
def _inplace_step(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> None:
    _PLANS[plan](layout, params, grads, state, extras)


@_inplace_step.register_fake
def _(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> None:
    return None


def inplace_step(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> Any:
    """Run the step registered as ``plan`` (see :func:`register`): it overwrites ``params`` and ``state``."""
    return torch.ops.pureopt.inplace_step(plan, layout, params, grads, state, extras)


@torch.library.custom_op("pureopt::step", mutates_args=())
def _step(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> list[Tensor]:
    out = _PLANS[plan](layout, params, grads, state, extras, donate=False)
    assert out is not None
    return out


@_step.register_fake
def _(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> list[Tensor]:
    return [torch.empty_like(t) for t in (*params, *state)]


def step(
    plan: str, layout: str, params: list[Tensor], grads: list[Tensor], state: list[Tensor], extras: list[Tensor]
) -> list[Tensor]:
    """Run the step registered as ``plan`` on new tensors (the pure step): the updates (one per parameter), then
    the new state's tensors (one per tensor of ``state``, shaped alike); nothing passed in is written."""
    return list(torch.ops.pureopt.step(plan, layout, params, grads, state, extras))
