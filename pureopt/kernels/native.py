"""Native CPU kernels for the block codecs: decode or encode a chunk of 8-bit / 4-bit / fp8 state in one pass.

The torch-op codecs of :mod:`pureopt.kernels.encoding` take about ten passes over a chunk (a gather, a broadcast
product, the block maxima, a bit shift, two table reads, a comparison, an add, ...), each a separate call; the
chunk's codecs then cost ten to twenty times the fp32 step itself. ``codecs.cpp`` does each codec in one pass, eight
lanes at a time where the CPU has AVX2, through exactly the same IEEE operations per element, so that both paths
write the same bits (the tests hold them to it): this is a kernel choice like fused / foreach, not a second
definition. A chunk of at least two 32K-element grains is split at block starts over torch's intra-op threads
(``torch.set_num_threads``; each block is written by one thread, so the bits do not depend on the thread count).

It is built on first use with the C++ toolchain ``torch.compile`` uses on the CPU (inductor's
``CppPythonBindingsCodeCache``: the same compiler, flags and on-disk cache), once per machine. Where that is not
possible (no compiler, another platform, a torch whose private build API moved) or ``PUREOPT_NATIVE=0`` is set, the
codecs keep their torch ops: same results, slower. ``ATEN_CPU_CAPABILITY=default`` (or a CPU without AVX2) selects
the portable loop.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "decode", "decode_fp8", "encode", "encode_fp8", "stochastic_bf16"]

_log = logging.getLogger(__name__)

_DECODE8, _ENCODE8, _DECODE4, _ENCODE4, _ROUND_BF16, _ENCODE_FP8, _DECODE_FP8, _PORTABLE = 0, 1, 2, 3, 4, 5, 6, 16

MAX_BLOCK = 4096
"""Largest block the 4-bit encoder takes (its per-block index buffer); bigger blocks keep the torch ops."""


@functools.cache
def _kernel() -> Callable[..., Any] | None:
    if os.environ.get("PUREOPT_NATIVE", "1") == "0":
        return None
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        source = resources.files("pureopt.kernels").joinpath("codecs.cpp").read_text()
        argtypes = ["int64_t", "float*", "uint8_t*", "float*", "const void*", "const void*"]
        argtypes += ["int64_t", "int64_t", "int64_t", "float", "int64_t"]
        return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)
    except Exception as exc:  # (no compiler, or the private API moved: the torch-op codecs stay)
        _log.warning("pureopt: native codec kernels unavailable (%s); using torch ops", exc)
        return None


@functools.cache
def _capability_flag() -> int:
    # (ATEN_CPU_CAPABILITY is read once, at startup, by torch too)
    return 0 if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else _PORTABLE


def _vector_flag() -> int:
    return _capability_flag()


def available(*tensors: Tensor) -> bool:
    """Whether the native codecs can take these tensors (CPU, not traced, not under a ``torch.func`` transform, plain
    tensors) and the kernel builds here."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    for t in tensors:  # (a loop, not all(...): this runs four times per chunk)
        if type(t) is not Tensor or not t.is_cpu or not t.is_contiguous():
            return False
    return _kernel() is not None


def decode(codes: Tensor, scale: Tensor, table: Tensor, out: Tensor, lo: int, block: int, bits: int) -> None:
    """``out[k] = table[code of element lo + k] * scale[(lo + k) // block]`` for ``k < out.numel()`` (float32;
    ``bits`` 8: one byte per element, 4: two per byte, low nibble first)."""
    _check(codes, scale, out, lo, block, bits)
    kernel = _kernel()
    assert kernel is not None and table.dtype == torch.float32 and table.numel() == 1 << bits
    op = (_DECODE8 if bits == 8 else _DECODE4) | _vector_flag()
    kernel(op, out, codes, scale, table, table, lo, out.numel(), block, 1.0, 0)


def encode(
    x: Tensor, codes: Tensor, scale: Tensor, lookup: Tensor, mids: Tensor, lo: int, block: int, top: float,
    shift: int, bits: int,
) -> None:  # fmt: skip
    """Encode the float32 ``x`` into elements ``lo:lo + x.numel()`` (``lo`` a block start): each block's scale
    ``max |x| / top`` and the nearest code index of ``x / scale`` (``lookup``: the bucket table of
    :func:`pureopt.kernels.encoding._build` for ``shift``; ``mids``: the midpoints padded with ``+inf``)."""
    _check(codes, scale, x, lo, block, bits)
    kernel = _kernel()
    assert kernel is not None and lo % block == 0 and (bits == 8 or block <= MAX_BLOCK)
    assert lookup.dtype == torch.uint8 and lookup.numel() == 1 << (32 - shift) and mids.dtype == torch.float32
    op = (_ENCODE8 if bits == 8 else _ENCODE4) | _vector_flag()
    kernel(op, x, codes, scale, lookup, mids, lo, x.numel(), block, top, shift)


def decode_fp8(codes: Tensor, scale: Tensor, out: Tensor, lo: int, block: int) -> None:
    """``out[k]`` = the float8 ``codes``' value of element ``lo + k`` (e4m3fn or e5m2, as the cast reads it) times
    its block's scale (float32)."""
    _check(codes, scale, out, lo, block, 8)
    kernel = _kernel()
    assert kernel is not None and codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    mbits = 3 if codes.dtype == torch.float8_e4m3fn else 2
    kernel(_DECODE_FP8 | _vector_flag(), out, codes, scale, scale, scale, lo, out.numel(), block, 1.0, mbits)


def encode_fp8(x: Tensor, codes: Tensor, scale: Tensor, lo: int, block: int, top: float, low: float) -> None:
    """Encode the float32 ``x`` into the float8 ``codes`` (e4m3fn or e5m2) at elements ``lo:`` (``lo`` a block
    start): each block's scale ``max |x| / top`` and ``(x / scale).clamp(low, top)`` cast to the format."""
    _check(codes, scale, x, lo, block, 8)
    kernel = _kernel()
    assert kernel is not None and lo % block == 0 and codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    mbits = 3 if codes.dtype == torch.float8_e4m3fn else 2
    low_t = torch.tensor([low], dtype=torch.float32)
    kernel(_ENCODE_FP8 | _vector_flag(), x, codes, scale, low_t, low_t, lo, x.numel(), block, top, mbits)


def stochastic_bf16(x: Tensor, out: Tensor, first: int, seed: int, mixed: int) -> None:
    """``out`` (bfloat16, like the float32 ``x``) = ``x`` rounded stochastically with the random bits of places
    ``first + k``: :func:`pureopt.kernels.rounding.stochastic_round` with
    :func:`~pureopt.kernels.rounding.random_bits` (``seed`` and ``mixed``: the two 32-bit values it derives from the
    key and counter)."""
    assert x.dtype == torch.float32 and out.dtype == torch.bfloat16 and x.numel() == out.numel()
    assert x.is_contiguous() and out.is_contiguous()
    kernel = _kernel()
    assert kernel is not None
    m32 = 0xFFFFFFFF
    kernel(_ROUND_BF16 | _vector_flag(), x, out, x, x, x, first & m32, x.numel(), seed & m32, 1.0, mixed & m32)


def _check(codes: Tensor, scale: Tensor, values: Tensor, lo: int, block: int, bits: int) -> None:
    # (the kernel reads and writes through raw pointers: dtypes, layout and extents are checked here)
    end = lo + values.numel()
    assert codes.element_size() == 1 and scale.dtype == torch.float32 and values.dtype == torch.float32
    assert codes.is_contiguous() and scale.is_contiguous() and values.is_contiguous() and values.dim() == 1
    assert lo >= 0 and block > 0 and codes.numel() * (8 // bits) >= end and scale.numel() >= -(-end // block)
