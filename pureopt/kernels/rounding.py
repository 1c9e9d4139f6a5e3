"""Stochastic rounding to bfloat16 / float16 from counter-based random bits (no global RNG, vmap- and compile-safe).

Rounding ``x`` (float32) to bfloat16 stochastically rounds up with probability equal to the distance from the
lower neighbour, in units of the gap, so ``E[round(x)] = x``: small updates to a bf16 weight accumulate on average
instead of being lost to round-to-nearest. Here the 16 bits bf16 drops are replaced by ``bits`` of a uniform
random 16-bit integer added to the float32 bit pattern before truncation (magnitude and sign handled alike, as the
pattern is sign-magnitude). float16 targets round the float32 value to the two float16 neighbours explicitly.

The random bits are a hash of ``(key, counter, element index)`` computed with integer tensor ops (murmur3's 32-bit
finaliser, with products kept below 2**63), so the same key and counter give the same bits on every run and
device, no generator state is consumed, and the function works under ``torch.func.vmap`` and ``torch.compile``.

Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical Precision", ICML 2015 (stochastic
rounding); Zamirai, Zhang, Aberger & De Sa, "Revisiting BFloat16 Training", 2020 (bf16 weights without a master copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fmix32", "random_bits", "stochastic_round"]

_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """``(h * c) mod 2**32`` for ``0 <= h < 2**32`` in int64 without overflow (16-bit halves)."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of ``[0, 2**32)`` with good avalanche) on int64 tensors holding
    values in that range."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def random_bits(key: Tensor, counter: Tensor, offset: int, numel: int, device: torch.device) -> Tensor:
    """``numel`` pseudo-random integers in ``[0, 2**32)`` (int64) for elements ``offset ... offset + numel - 1``,
    a function of ``key`` and ``counter`` (0-d int64 tensors) only."""
    seed = fmix32((fmix32(key.to(device, torch.int64) & _M32) ^ (counter.to(device, torch.int64) & _M32)) & _M32)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device) & _M32
    return fmix32(fmix32(idx ^ seed) ^ ((seed * 0x9E37) & _M32))


def stochastic_round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (``torch.bfloat16`` or ``torch.float16``) with the random
    integers ``bits`` (one per element, as :func:`random_bits` gives; flat order)."""
    x = x.to(torch.float32)
    r = bits.view(x.shape)
    if dtype == torch.bfloat16:
        pattern = x.view(torch.int32).to(torch.int64)
        rounded = ((pattern + (r & 0xFFFF)) & ~0xFFFF).to(torch.int32)  # carry into the kept bits, drop the rest
        return torch.where(torch.isfinite(x), rounded.view(torch.float32), x).to(dtype)
    if dtype == torch.float16:
        down = x.to(dtype)
        low = torch.where(down.to(torch.float32) > x, torch.nextafter(down, torch.full_like(down, -torch.inf)), down)
        high = torch.nextafter(low, torch.full_like(low, torch.inf))
        gap = high.to(torch.float32) - low.to(torch.float32)
        frac = torch.where(gap > 0, (x - low.to(torch.float32)) / gap, torch.zeros_like(x))
        u = (r & 0xFFFFFF).to(torch.float32) / float(1 << 24)
        return torch.where(torch.isfinite(x), torch.where(u < frac, high, low), x.to(dtype))
    raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
