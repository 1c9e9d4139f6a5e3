"""``stochastic_rounding``: bf16 / fp16 parameters written with unbiased, reproducible stochastic rounding.

Training bf16 weights without an fp32 master copy loses every update smaller than half a bf16 gap (about
``|p| * 2**-9``) to round-to-nearest: late in training, when ``lr * update`` is small against the weights, they stop
moving. Stochastic rounding keeps those updates in expectation. This wrapper computes the new parameter
``p + u`` in float32 from the inner transformation's update ``u`` and rounds it to the parameter's dtype
stochastically (:func:`pureopt.kernels.rounding.stochastic_round`), with random bits from a counter-based hash of a
key kept in the state, the step count and the element's index: the same seed gives the same bits, no global RNG
is consumed, and it works under ``torch.func.vmap`` and ``torch.compile``.

Parameters of other dtypes (float32, float64) are left to ``apply_updates`` as usual. DTensor parameters sharded by
rows (FSDP2, HSDP) are rounded shard by shard with the random bits of each element's place in the whole parameter,
so a sharded run rounds exactly as an unsharded one would (other placements are refused before anything changes).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import (
    GradientTransformation,
    LeafList,
    UpdateContext,
    add_inplace,
    as_leaf_update,
    leaf_transformation,
)
from pureopt.combine import inner_context, returned
from pureopt.kernels.dtensor import from_local_like, is_dtensor, like_placed, local_flat_offset
from pureopt.kernels.rounding import stochastic_round_into
from pureopt.transforms._util import count_device, new_count
from pureopt.tree import PyTreeSpec

__all__ = ["StochasticRoundingState", "stochastic_rounding"]

_ROUNDED = (torch.bfloat16, torch.float16)


def _local(t: Any) -> Tensor:
    """A DTensor's local shard (its own storage); a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_rounding`.

    Attributes:
      key: the random key (0-d int64), from ``seed``.
      counter: steps so far (0-d int64), the counter of the random bits.
      inner_state: the wrapped transformation's state.
    """

    key: Tensor
    counter: Tensor
    inner_state: Any


def stochastic_rounding(inner: GradientTransformation, seed: int = 0) -> GradientTransformation:
    """Write bf16 / fp16 parameters with stochastic rounding of ``p + update`` (see the module docstring).

    The update returned for such a parameter is ``round_sr(p + u) - p`` in float32 (exact), so
    ``apply_updates(params, updates)`` gives the stochastically rounded parameters; the donated path
    (:func:`pureopt.inplace_step`, the adapters) writes them into the parameters directly. Give the inner optimizer
    float32 state for bf16 parameters (``state_dtype=torch.float32`` or an encoding), or its state rounds too.

    Args:
      inner: the optimizer whose updates are applied.
      seed: the key of the random bits (an int); the same seed reproduces the same bits.

    Example::

        tx = pureopt.stochastic_rounding(pureopt.adamw(lr=1e-3, state_dtype=torch.float32), seed=0)
        params = pureopt.step(tx, grads, state, params)  # bf16 params, unbiased writes

    Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015; Zamirai et al., "Revisiting BFloat16
    Training", 2020.
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"stochastic_rounding: inner is a {type(inner).__name__}, not a GradientTransformation")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"stochastic_rounding: seed must be an int, got {seed!r}")
    fn = as_leaf_update(inner)

    def init_leaves(leaves: list[Any], spec: PyTreeSpec) -> StochasticRoundingState:
        key = torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=count_device(leaves))
        return StochasticRoundingState(key, new_count(leaves), inner.init(spec.unflatten(leaves)))

    def update_leaves(
        updates: LeafList, state: StochasticRoundingState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList | None, StochasticRoundingState]:
        if not isinstance(state, StochasticRoundingState):
            raise ValueError(f"stochastic_rounding expects a StochasticRoundingState, got {type(state).__name__}")
        if params is None:
            raise ValueError("stochastic_rounding needs the parameters: call update(grads, state, params)")
        # (DTensor parameters: each rank rounds its local shard with the bits of those elements' global places,
        # so a sharded run rounds as the unsharded one; checked for every parameter before anything is written)
        starts = [local_flat_offset(p) if is_dtensor(p) and p.dtype in _ROUNDED else 0 for p in params]
        inner_updates, new_inner = fn(updates, state.inner_state, params, inner_context(ctx, allow_apply=False))
        out = list(returned(inner_updates))
        apply = ctx.apply and ctx.donate
        # (each parameter's elements are keyed by their places in all the parameters one after the other, every
        # parameter counted, so that the bits do not depend on which ones a call steps: a DDP bucket, a parameter
        # without a gradient)
        offsets = itertools.accumulate((0 if p is None else p.numel() for p in params), initial=0)
        for i, (p, u, offset) in enumerate(zip(params, out, offsets)):
            if u is None or p is None or p.dtype not in _ROUNDED:
                continue
            sharded = is_dtensor(p)
            here = _local(p) if sharded else p
            step = _local(like_placed(u, p)) if sharded else u
            total = here.to(torch.float32) + step.to(torch.float32)
            # (rounded into the parameter itself where it is one flat run of memory, else into a contiguous copy;
            # elements in their logical order either way, which keys their random bits)
            into = here.is_contiguous() and apply
            new_p = here if into else torch.empty_like(here, memory_format=torch.contiguous_format)
            stochastic_round_into(new_p.view(-1), total.reshape(-1), state.key, state.counter, offset + starts[i])
            if apply and not into:
                here.copy_(new_p)
            if apply:
                out[i] = None  # written: nothing left to add
            else:
                diff = new_p.to(torch.float32) - here.to(torch.float32)
                out[i] = from_local_like(diff, p, p.shape) if sharded else diff
        new_state = StochasticRoundingState(state.key, state.counter + 1, new_inner)
        if apply:  # the rest are added by the caller, like any returned update
            add_inplace(params, out)
            return None, new_state
        return out, new_state

    return leaf_transformation(init_leaves, update_leaves)
