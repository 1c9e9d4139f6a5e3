"""Annealed Gaussian gradient noise, from a counter-based generator (pure and reproducible)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, LeafList, UpdateContext, leaf_transformation
from pureopt.kernels.rounding import fmix32
from pureopt.transforms._util import count_device, new_count
from pureopt.tree import PyTreeSpec

__all__ = ["AddNoiseState", "add_noise", "counter_normal"]

_M32 = 0xFFFFFFFF


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`.

    Attributes:
      num_updates: number of updates so far (0-d int64).
      seed: the generator's seed (0-d int64). Give each model of a vmapped ensemble its own to draw different
        noise (``state._replace(seed=...)``).
    """

    num_updates: Tensor
    seed: Tensor


def counter_normal(key: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """``numel`` standard normal draws that are a pure function of ``key`` (a 0-d int64 tensor in ``[0, 2**32)``).

    Draw ``j`` hashes ``(key, 2j)`` and ``(key, 2j + 1)`` into two 24-bit uniforms and applies the Box-Muller
    transform. Only elementwise integer and float ops: no ``torch.Generator``, works under ``torch.func.vmap``
    (a batched key gives each model its own draws) and ``torch.compile``.
    """
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    h1 = fmix32(key ^ fmix32((2 * index) & _M32))
    h2 = fmix32(fmix32(key ^ 0x9E3779B9) ^ fmix32((2 * index + 1) & _M32))
    scale = 2.0**-24
    u1 = ((h1 >> 8).to(dtype) + 1.0) * scale  # (0, 1]: log is finite
    u2 = (h2 >> 8).to(dtype) * scale  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def add_noise(eta: float, gamma: float = 0.55, seed: int = 0) -> GradientTransformation:
    """Add annealed Gaussian noise to the updates.

    Rule, with ``t`` the number of updates so far including this one::

        u <- u + N(0, sigma_t**2),     sigma_t**2 = eta / t**gamma

    The noise is drawn from a counter-based generator: it is a pure function of ``(seed, t, parameter index,
    entry index)``, computed with integer hashing on tensors. There is no ``torch.Generator`` and no global RNG
    state, so ``update`` stays pure, the same state always gives the same noise (a checkpoint resumes the exact
    sequence), and it runs under ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``. The draws are
    computed in float32 (float64 for float64 updates) from 24-bit uniforms; complex updates get independent
    noise in their real and imaginary parts.

    Args:
      eta: the noise scale (>= 0); the paper uses 0.01, 0.3 or 1.0.
      gamma: the annealing exponent (>= 0); the paper uses 0.55.
      seed: the generator's seed (stored in the state as a 0-d int64 tensor).

    Example::

        tx = pureopt.chain(add_noise(0.01, 0.55, seed=0), pureopt.sgd(lr=0.1))

    Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", 2015
    (arXiv:1511.06807).
    """
    if not eta >= 0:
        raise ValueError(f"Invalid eta value: {eta}")
    if not gamma >= 0:
        raise ValueError(f"Invalid gamma value: {gamma}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed value: {seed!r} (an int is required)")

    def init_leaves(leaves: list[object], spec: PyTreeSpec) -> AddNoiseState:
        del spec
        return AddNoiseState(new_count(leaves), torch.tensor(seed, dtype=torch.int64, device=count_device(leaves)))

    def noisy(u: Tensor, key: Tensor, std: Tensor) -> Tensor:
        real = torch.view_as_real(u) if u.is_complex() else u
        dtype = torch.float64 if real.dtype == torch.float64 else torch.float32
        z = counter_normal(key.to(u.device), real.numel(), dtype).reshape(real.shape)
        out = real + (std.to(device=u.device, dtype=dtype) * z).to(real.dtype)
        return torch.view_as_complex(out) if u.is_complex() else out

    def update_leaves(
        updates: LeafList, state: AddNoiseState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, AddNoiseState]:
        del params, ctx
        t = state.num_updates + 1
        std = torch.sqrt(eta / torch.pow(t.to(torch.float64), gamma))
        seed_bits = state.seed & _M32
        step_key = fmix32(fmix32(seed_bits) ^ ((state.seed >> 32) & _M32))
        step_key = fmix32(step_key ^ (t & _M32))
        out = [None if u is None else noisy(u, fmix32(step_key ^ i), std) for i, u in enumerate(updates)]
        return out, AddNoiseState(t, state.seed)

    return leaf_transformation(init_leaves, update_leaves)
