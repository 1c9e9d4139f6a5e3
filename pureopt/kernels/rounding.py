"""Stochastic rounding to bfloat16 / float16 from counter-based random bits (no global RNG, vmap- and compile-safe).

Rounding ``x`` (float32) to bfloat16 stochastically rounds up with probability equal to the distance from the
lower neighbour, in units of the gap, so ``E[round(x)] = x``: small updates to a bf16 weight accumulate on average
instead of being lost to round-to-nearest. Here the 16 bits bf16 drops are replaced by ``bits`` of a uniform
random 16-bit integer added to the float32 bit pattern before truncation (magnitude and sign handled alike, as the
pattern is sign-magnitude). float16 targets round the float32 value to the two float16 neighbours explicitly.

The random bits are a hash of ``(key, counter, element index)`` computed with integer tensor ops (murmur3's 32-bit
finaliser, in int32 with wrap-around products), so the same key and counter give the same bits on every run and
device, no generator state is consumed, and the function works under ``torch.func.vmap`` and ``torch.compile``.

Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical Precision", ICML 2015 (stochastic
rounding); Zamirai, Zhang, Aberger & De Sa, "Revisiting BFloat16 Training", 2020 (bf16 weights without a master copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.kernels import native

__all__ = ["fmix32", "plain_seeds", "random_bits", "stochastic_round", "stochastic_round_into"]

_M32 = 0xFFFFFFFF
_INT32_END = 1 << 31


def _const(v: int) -> Tensor:
    """A 0-d int32 CPU constant. As an operand it is a scalar on every device, and on CPU the ops below run
    markedly faster with it than with a Python int (which each op would wrap into a new tensor)."""
    return torch.tensor(v, dtype=torch.int32, device="cpu")


# murmur3's fmix32 multipliers as int32 (two's complement: the same low 32 bits), shifts, masks
_C1, _C2 = _const(0x85EBCA6B - (1 << 32)), _const(0xC2B2AE35 - (1 << 32))
_S13, _S16, _S31 = _const(13), _const(16), _const(31)
_LOW16, _LOW19, _ABS, _NAN0 = _const(0xFFFF), _const(0x7FFFF), _const(0x7FFFFFFF), _const(0x7F800001)


def _to_int32(t: Tensor, device: torch.device | None = None) -> Tensor:
    """The low 32 bits of the integer tensor ``t`` as int32 (``t mod 2**32`` in two's complement). May be ``t``
    itself: never write into the result."""
    if t.is_floating_point() or t.is_complex():
        t = t.to(device=device, dtype=torch.int64)
    return t.to(device=device, dtype=torch.int32)


def _xorshift16(h: Tensor) -> Tensor:
    """``h ^ (h >>> 16)`` (logical shift) as a fresh tensor; ``h`` is not written. On int32 the arithmetic ``>>``
    fills with copies of the sign bit, which the mask clears."""
    t = h >> _S16
    t &= _LOW16
    t ^= h
    return t


def _fmix32_rest_(h: Tensor) -> Tensor:
    """The steps of :func:`fmix32` after the first xor-shift, in place on ``h``: a fresh int32 temporary, never an
    input (under ``torch.func.vmap`` a fresh result is batched exactly when what it was computed from is, so the
    in-place ops stay valid; under ``torch.compile`` they are functionalised and fused). int32 ``*`` keeps the
    low 32 bits of the product: ``mod 2**32``."""
    h *= _C1
    t = h >> _S13
    t &= _LOW19
    h ^= t
    h *= _C2
    t = h >> _S16
    t &= _LOW16
    h ^= t
    return h


def _fmix32_int32(h: Tensor) -> Tensor:
    """:func:`fmix32` on int32 bit patterns, as a fresh int32 tensor (``h`` is not written)."""
    return _fmix32_rest_(_xorshift16(h))


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of ``[0, 2**32)`` with good avalanche) on int64 tensors holding
    values in that range; returns int64 in ``[0, 2**32)``.

    Rule (products mod ``2**32``, logical shifts)::

        h ^= h >> 16;  h *= 0x85EBCA6B;  h ^= h >> 13;  h *= 0xC2B2AE35;  h ^= h >> 16

    Computed in int32 with wrap-around products after the first xor-shift (which runs in ``h``'s own dtype, so
    every int64 input, in range or not, gives what the int64 formula gives). Example::

        fmix32(torch.tensor(1))  # tensor(1364076727) == 0x514E28B7

    Appleby, MurmurHash3 (public domain), ``fmix32``.
    """
    t = h >> _S16
    t ^= h
    out = _fmix32_rest_(_to_int32(t)).to(torch.int64)  # (_to_int32 of the fresh t is fresh)
    out &= _M32
    return out


def _fmix32_int(h: int) -> int:
    """:func:`fmix32` of a Python int in ``[0, 2**32)``."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _plain_cpu(*ts: Tensor) -> bool:
    """Whether the 0-d tensors ``ts`` can be read as Python ints for free: plain CPU tensors, eagerly (not under
    dynamo, a ``torch.func`` transform, or a tracing tensor subclass)."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    return all(type(t) is Tensor and t.device.type == "cpu" and not t.is_floating_point() for t in ts)


def _signed32(v: int) -> int:
    """``v`` in ``[0, 2**32)`` as the int32 with the same bits."""
    return v - (1 << 32) if v >= _INT32_END else v


def plain_seeds(key: Tensor, counter: Tensor) -> tuple[int, int] | None:
    """``(seed, seed * 0x9E37 mod 2**32)`` of :func:`random_bits` as Python ints, when ``key`` and ``counter`` are
    plain CPU tensors and nothing traces; else ``None``."""
    if not _plain_cpu(key, counter):
        return None
    s = _fmix32_int(_fmix32_int(int(key) & _M32) ^ (int(counter) & _M32))
    return s, (s * 0x9E37) & _M32


def random_bits(key: Tensor, counter: Tensor, offset: int, numel: int, device: torch.device) -> Tensor:
    """``numel`` pseudo-random integers in ``[0, 2**32)`` (int64) for elements ``offset ... offset + numel - 1``,
    a function of ``key`` and ``counter`` (0-d int64 tensors) only.

    Rule (:func:`fmix32`; ``key``, ``counter``, indices and products mod ``2**32``)::

        seed = fmix32(fmix32(key) ^ counter)
        bits[j] = fmix32(fmix32((offset + j) ^ seed) ^ (seed * 0x9E37))

    Computed in int32 (wrap-around products); only the result is widened to int64. The 0-d ``seed`` is computed
    with Python ints when ``key`` and ``counter`` are plain CPU tensors and nothing traces (its two dozen 0-d tensor
    ops cost about a fifth of a 64K-element call on a CPU), else with tensor ops (batched under ``vmap``, traced under
    ``torch.compile``). Example::

        bits = random_bits(torch.tensor(1), torch.tensor(0), 0, 1024, torch.device("cpu"))
    """
    seed: Tensor | int
    mixed: Tensor | int
    plain = plain_seeds(key, counter)
    if plain is not None:
        seed, mixed = _signed32(plain[0]), _signed32(plain[1])
    else:
        # (out of place: under vmap the counter may be batched where the key's hash is not)
        seed = _fmix32_int32(_fmix32_int32(_to_int32(key, device)) ^ _to_int32(counter, device))
        mixed = seed * 0x9E37
    if 0 <= offset and offset + numel <= _INT32_END:
        idx = torch.arange(offset, offset + numel, dtype=torch.int32, device=device)
    else:  # (indices mod 2**32)
        idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device).to(torch.int32)
    h = _fmix32_rest_(_xorshift16(idx ^ seed))
    h ^= mixed
    out = _fmix32_rest_(_xorshift16(h)).to(torch.int64)
    out &= _M32
    return out


def _fp16_value(q: Tensor) -> Tensor:
    """The float32 value of the float16 bit patterns ``q`` (int16; no NaN), by integer ops and one exact float
    subtraction (no comparisons or ``where``: slow on CPU). The magnitude bits shifted up 13 and the exponent
    rebiased by ``127 - 15``; infinities rebiased to 255 instead; a subnormal or zero ``m`` gets exponent 1 more
    (``2**-14 * (1 + m / 2**10)``) and then ``2**-14`` taken off, leaving ``m * 2**-24`` exactly; the sign bit
    copied last (so -0.0 stays negative)."""
    qi = q.to(torch.int32)  # (sign-extended)
    m = qi & 0x7FFF
    sub = m - 0x400
    sub >>= 31
    sub &= 1  # 1 for a zero or subnormal (m < 0x400)
    rebias = m + 0x400
    rebias >>= 15  # 1 for an infinity (m >= 0x7C00)
    rebias *= 112
    rebias += sub
    rebias += 112
    rebias <<= 23
    m <<= 13
    m += rebias
    mag = m.view(torch.float32) - sub.to(torch.float32) * 2.0**-14
    out = mag.view(torch.int32) | (qi & -(1 << 31))
    return out.view(torch.float32)


def stochastic_round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (``torch.bfloat16`` or ``torch.float16``) with the random
    integers ``bits`` (one per element, as :func:`random_bits` gives; flat order). Only the low 16 (bf16) or 24
    (fp16) bits of each are used.

    bf16 rule: ``(pattern(x) + (bits & 0xFFFF)) & ~0xFFFF`` on the float32 bit pattern, mod ``2**32`` (the carry
    rounds the magnitude up with probability equal to the dropped fraction); non-finite ``x`` is cast as it is.
    fp16 rule: of the two float16 neighbours ``low <= x < high``, ``high`` when ``(bits & 0xFFFFFF) / 2**24`` is
    below ``(x - low) / (high - low)``. Example::

        stochastic_round(x, torch.bfloat16, random_bits(key, counter, 0, x.numel(), x.device))
    """
    x = x.to(torch.float32)
    r = _to_int32(bits.view(x.shape))
    if dtype == torch.bfloat16:
        # Integer passes only (on CPU a comparison or torch.where costs several times an int32 op): ``keep`` is
        # 0xFFFF where x is not NaN (magnitude bits at most +inf's 0x7F800000), 0 where it is; a NaN keeps its
        # pattern, an infinity has none of the dropped bits set, so both come out as ``x`` itself.
        p = x.view(torch.int32)
        keep = p & _ABS
        keep -= _NAN0  # (no overflow)
        keep >>= _S31
        keep &= _LOW16
        rounded = r & keep  # the random low bits (0 for NaN)
        rounded += p  # carry into the kept bits (int32 wraps like the pattern mod 2**32)
        rounded &= keep.bitwise_not_()  # drop the rest
        return rounded.view(torch.float32).to(dtype)
    if dtype == torch.float16:
        # The neighbours by stepping float16 bit patterns (sign-magnitude: the magnitude one up or down, across
        # zero by hand), as torch.nextafter steps them, and whether x was rounded up by comparing x with the float16
        # value rebuilt from its bits: inductor keeps float16 intermediates in float32 precision, so there
        # ``x.to(float16).to(float32)`` is ``x`` and a float16 nextafter is computed in float32 (returns its input).
        q = x.to(dtype).view(torch.int16)
        step = (q >> 15) | 1  # -1 where the sign bit is set, else 1: q - step is one magnitude step down-wards
        lowq = torch.where(_fp16_value(q) > x, torch.where(q == 0, -32767, q - step), q)  # (+0: -2**-24)
        step = (lowq >> 15) | 1
        highq = torch.where(lowq == -32768, 1, lowq + step)  # toward +inf (-0.0: +2**-24; -2**-24: -0.0)
        low, high = lowq.view(dtype), highq.view(dtype)
        gap = high.to(torch.float32) - low.to(torch.float32)
        frac = torch.where(gap > 0, (x - low.to(torch.float32)) / gap, torch.zeros_like(x))
        u = (r & 0xFFFFFF).to(torch.float32) / float(1 << 24)
        return torch.where(torch.isfinite(x), torch.where(u < frac, high, low), x.to(dtype))
    raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")


PIECE_ELEMENTS = 1 << 16
"""Elements the torch-op codecs work on at a time (:func:`stochastic_round_into`, the block encodings of
:mod:`pureopt.kernels.encoding`): their integer temporaries exist for one piece at a time."""


def stochastic_round_into(out: Tensor, x: Tensor, key: Tensor, counter: Tensor, offset: int) -> None:
    """Write the flat float32 ``x`` rounded stochastically into the flat ``out`` (bfloat16 or float16, as many
    elements) with the random bits of places ``offset + k``: :func:`stochastic_round` with :func:`random_bits`, a
    piece at a time, or in one native pass (:mod:`pureopt.kernels.native`) for bfloat16 on the CPU when ``key`` and
    ``counter`` are plain CPU tensors (the same bits; a NaN comes out as bfloat16's canonical NaN)."""
    if out.dtype == torch.bfloat16 and native.available(out, x):
        seeds = plain_seeds(key, counter)
        if seeds is not None:
            native.stochastic_bf16(x, out, offset, *seeds)
            return
    for start in range(0, x.numel(), PIECE_ELEMENTS):
        part = x[start : start + PIECE_ELEMENTS]
        bits = random_bits(key, counter, offset + start, part.numel(), x.device)
        out[start : start + part.numel()].copy_(stochastic_round(part, out.dtype, bits))
