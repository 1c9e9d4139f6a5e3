"""How a state field is stored: a float dtype, fp8 with a scale per block, or block-wise 8-bit / 4-bit codes.

An :class:`Encoding` turns a chunk of a state field into the compute dtype (:meth:`Encoding.decode`) and back
(:meth:`Encoding.encode`); the algorithms never see it (see :mod:`pureopt.algorithms.define`, which decodes, runs
the math and encodes again, chunk by chunk). A stored field is a tensor (float encodings) or a
:class:`Quantized` record of two flat tensors: ``codes`` (one byte per element, or one per two elements at 4 bits)
and ``scale`` (one float32 per block of ``block`` elements: the block's absolute maximum, divided by the code's
largest magnitude for fp8). Element ``j`` of a parameter lives in block ``j // block`` of its flat order.

Block-wise quantisation with a non-linear code: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022 (dynamic tree code, block-wise absmax scaling). 4-bit states: Li, Chen & Zhu,
"Memory Efficient Optimizers with 4-bit States", NeurIPS 2023 (small blocks; a second-moment code that excludes
zero, because a second moment decoded as zero makes ``m / sqrt(v)`` blow up).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.kernels import codec_ops, native
from pureopt.kernels.rounding import PIECE_ELEMENTS, stochastic_round_into

__all__ = [
    "Encoding",
    "FloatEncoding",
    "BlockEncoding",
    "Quantized",
    "dynamic_code",
    "linear_code",
    "encoding_for",
    "shaped_like",
    "stored_bytes",
    "row_block",
]


class Quantized(NamedTuple):
    """A state field stored block-wise: flat ``codes`` (uint8, or float8) and one float32 ``scale`` per block."""

    codes: Tensor
    scale: Tensor


def dynamic_code(bits: int, signed: bool, zero: bool = True) -> list[float]:
    """A non-linear code for values in ``[-1, 1]`` (``signed``) or ``[0, 1]``: ``2**bits`` values, dense near zero.

    Values are spread over ``bits - 1`` decades: decade ``d`` (magnitudes ``10**(d - bits + 2) * [0.1, 1]``) holds
    ``2**d`` linearly spaced values per sign (``2**(d + 1)`` unsigned), i.e. an exponent given by leading zeros and
    a linear fraction in the remaining bits — the dynamic tree code of Dettmers et al. 2022. So the relative
    error is roughly constant over ``bits - 1`` orders of magnitude. Zero and ``1`` are exact.

    Without ``zero`` (unsigned only), zero's place holds the lowest decade's lower edge ``10**(2 - bits) * 0.1``
    instead: a second moment then never decodes to 0 where its first moment does not (``m / sqrt(v)`` would be
    ``m / eps``, a step thousands of times the learning rate: the zero-point problem of Li et al. 2023).
    """
    if not zero:
        if signed:
            raise ValueError("a signed dynamic code keeps zero (first moments change sign through it)")
        return [10.0 ** (2 - bits) * 0.1, *dynamic_code(bits, signed)[1:]]
    decades = bits - 1
    mags: list[float] = []
    for d in range(decades):
        count = 2**d if signed else 2 ** (d + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        mags += (10.0 ** (d - decades + 1) * (edges[:-1] + edges[1:]) / 2).tolist()
    values = [0.0, 1.0, *mags, *(-m for m in mags if signed)]
    assert len(values) == 2**bits
    return sorted(values)


def linear_code(bits: int, zero: bool) -> list[float]:
    """``2**bits`` evenly spaced values in ``[0, 1]``; without ``zero`` the smallest is ``1 / 2**bits`` (the
    zero-point-free code Li et al. 2023 use for second moments)."""
    n = 2**bits
    if zero:
        return [i / (n - 1) for i in range(n)]
    return [(i + 1) / n for i in range(n)]


_SHIFTS = (16, 15, 14, 13, 12)


class _Tables(NamedTuple):
    code: Tensor  # the code values, float32
    mids: Tensor  # midpoints between neighbours
    padded: Tensor  # mids and +inf
    lookup: Tensor | None  # see _build; None: search mids instead
    bound: Tensor | None  # padded[lookup]: the midpoint a bucket's floats are compared with (float32)
    shift: int
    pairs: Tensor | None  # codes of up to 16 values: the two values a byte of packed 4-bit codes holds, (256, 2)


@torch.compiler.disable
def _build(values: tuple[float, ...]) -> _Tables:
    """The code's tables on the CPU.

    The top ``32 - shift`` bits of a float32 (sign, exponent, leading mantissa bits) name a bucket of floats;
    ``lookup[bucket]`` is the number of midpoints below the bucket (uint8) and, when every bucket holds at most one
    midpoint, the nearest value's index for ``x`` in the bucket is ``lookup[bucket] + (x > mids[lookup[bucket]])``
    (``mids`` padded with ``+inf``; ``bound = mids[lookup]`` read with the same index as ``lookup``): exactly
    ``torch.bucketize(x, mids)``, in two independent table reads instead of a binary search. ``lookup`` is
    ``None`` when no shift keeps buckets that narrow (a code with values too close together).
    """
    code = torch.tensor(values, dtype=torch.float32)
    mids = (code[1:] + code[:-1]) / 2  # nearest value: the number of midpoints below it
    padded = torch.cat((mids, mids.new_full((1,), float("inf"))))
    byte = torch.arange(256)
    short = torch.cat((code, code.new_zeros(16 - len(values)))) if len(values) <= 16 else None  # (to 16 values)
    pairs = None if short is None else torch.stack((short[byte & 0xF], short[byte >> 4]), dim=1)
    for shift in _SHIFTS if len(values) <= 256 else ():
        keys = torch.arange(1 << (32 - shift), dtype=torch.int64)
        first = (keys << shift).to(torch.int32)  # wraps into the sign bit for the upper half: negative floats
        last = first | ((1 << shift) - 1)
        negative = keys >= 1 << (31 - shift)
        lo = torch.where(negative, last.view(torch.float32), first.view(torch.float32))  # the bucket's ends
        hi = torch.where(negative, first.view(torch.float32), last.view(torch.float32))
        below, upto = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if int((upto - below)[finite].max()) <= 1:
            bound = torch.index_select(padded, 0, below)
            return _Tables(code, mids, padded, below.to(torch.uint8), bound, shift, pairs)
    return _Tables(code, mids, padded, None, None, 0, pairs)


_ON_DEVICE: dict[tuple[tuple[float, ...], torch.device], _Tables] = {}
_NATIVE_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)  # (the formats codecs.cpp writes)


def _tables(values: tuple[float, ...], device: torch.device) -> _Tables:
    """The code's tables on ``device``, built once (in eager mode: ``empty`` builds them when the state is created,
    so a compiled step only reads them)."""
    found = _ON_DEVICE.get((values, device))
    if found is None:
        cpu = _build(values)
        found = cpu._replace(
            code=cpu.code.to(device), mids=cpu.mids.to(device), padded=cpu.padded.to(device),
            lookup=None if cpu.lookup is None else cpu.lookup.to(device),
            bound=None if cpu.bound is None else cpu.bound.to(device),
            pairs=None if cpu.pairs is None else cpu.pairs.to(device),
        )  # fmt: skip
        _ON_DEVICE[(values, device)] = found
    return found


def nearest_index(x: Tensor, values: tuple[float, ...], out: Tensor | None = None) -> Tensor:
    """The index (uint8) of the nearest of the sorted ``values`` for each element of the flat float32 ``x``; a tie
    goes to the lower value (``torch.bucketize`` against the midpoints, which it equals bitwise). Written into
    ``out`` (uint8, like ``x``) if given."""
    t = _tables(values, x.device)
    if t.lookup is None:
        idx = torch.bucketize(x, t.mids).to(torch.uint8)
        return idx if out is None else out.copy_(idx)
    key = torch.bitwise_right_shift(x.view(torch.int32), t.shift).bitwise_and_((1 << (32 - t.shift)) - 1)
    assert t.bound is not None
    below = torch.index_select(t.lookup, 0, key)
    above = x > torch.index_select(t.bound, 0, key)
    if out is None or compiling():
        idx = below + above
        return idx if out is None else out.copy_(idx)
    return torch.add(below, above, out=out)


def compiling() -> bool:
    """Whether dynamo is tracing or a ``torch.func`` transform (``vmap``) is active: the codecs then use functional
    forms (no ``out=``, no in-place writes into fresh unbatched buffers, no pieces), which inductor fuses and
    ``vmap`` batches."""
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def opaque_codecs() -> bool:
    """Whether dynamo is tracing outside any ``torch.func`` transform: block encodings then decode and encode
    through the opaque ops of :mod:`pureopt.kernels.codec_ops`, chunk by chunk (see there why)."""
    return torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None


class Encoding:
    """How one state field is stored (see module docstring)."""

    #: whether a step traced by dynamo decodes and encodes it chunk by chunk through the opaque ops of
    #: :mod:`pureopt.kernels.codec_ops` (the codecs inductor would otherwise give whole-state temporaries)
    opaque: bool = False

    name: str = "encoding"
    block: int = 1

    def empty(self, p: Tensor) -> Any:
        """A zero state for parameter ``p``."""
        raise NotImplementedError

    def decode(
        self, stored: Any, lo: int, hi: int, dtype: torch.dtype, after: Sequence[Tensor] = (), out: Tensor | None = None
    ) -> Tensor:
        """Elements ``lo:hi`` (flat order) in ``dtype``, as a flat tensor; ``after``: tensors (tokens
        :meth:`encode_into` returned, the last chunk's results) that a traced step reads them after (see
        :mod:`pureopt.kernels.codec_ops`); ``out``: a flat buffer of ``hi - lo`` elements of ``dtype`` the eager
        codecs may write the result into (and return), instead of allocating one."""
        raise NotImplementedError

    def encode_into(
        self, stored: Any, lo: int, x: Tensor, counter: Tensor | None = None, stream: int = 0, at: int = 0
    ) -> Tensor | None:
        """Write the flat values ``x`` into elements ``lo:lo + x.numel()`` of ``stored`` (``lo`` a block start).

        ``counter`` (0-d int64, advancing every step), ``stream`` (the tensor's position among the transformation's
        parameters, ``UpdateContext.streams``) and the elements' places
        ``at + lo + k`` in the whole tensor (``at``: a shard's offset) key the random bits of a stochastically
        rounding encoding; the others ignore them. Returns an ordering token when the write is an opaque op of a
        traced step, else ``None``."""
        raise NotImplementedError

    def local(self, stored: Any) -> tuple[Encoding | None, Any]:
        """How the stored value of one tensor is read: ``(encoding, flat record)``; the encoding is ``None`` for
        a value kept as a plain tensor in the compute dtype (see :meth:`BlockEncoding.for_rows`)."""
        return self, stored

    def like(self, stored: Any) -> Any:
        """An uninitialised stored field of the same size (the pure path writes the new state there)."""
        raise NotImplementedError

    def nbytes(self, stored: Any) -> int:
        """Bytes the stored field occupies."""
        raise NotImplementedError


class FloatEncoding(Encoding):
    """A field stored as a tensor of a floating dtype (``torch.bfloat16``, ``torch.float16``, ...); decoded by a
    cast, encoded with round-to-nearest-even, or with ``stochastic=True`` (bf16 / fp16) by unbiased stochastic
    rounding: random bits hashed from ``(seed, tensor, step, element)``
    (:func:`pureopt.kernels.rounding.random_bits`), so an exponential average whose increments are below half a
    bf16 gap keeps moving in expectation instead of stalling, reproducibly and without a global RNG."""

    def __init__(self, dtype: torch.dtype, *, stochastic: bool = False, seed: int = 0) -> None:
        if stochastic and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"stochastic rounding stores bfloat16 or float16 state, not {dtype}")
        self.dtype, self.stochastic, self.seed = dtype, stochastic, seed
        self.name = str(dtype).replace("torch.", "") + ("-sr" if stochastic else "")
        self.opaque = stochastic
        if stochastic:
            self.key = codec_ops.register(f"{self.name}/seed={seed}", self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # (unpickled: known to the opaque ops again)
        self.__dict__.update(state)
        if self.stochastic:
            codec_ops.register(self.key, self)

    def __eq__(self, other: object) -> bool:  # (by value: options rebuilt from a checkpoint equal the given ones)
        return self is other or (type(other) is type(self) and self._value() == other._value())

    def __hash__(self) -> int:
        return hash(self._value())

    def _value(self) -> tuple[Any, ...]:
        return (self.dtype, self.stochastic, self.seed)

    def empty(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self.dtype)

    def decode(
        self,
        stored: Tensor,
        lo: int,
        hi: int,
        dtype: torch.dtype,
        after: Sequence[Tensor] = (),
        out: Tensor | None = None,
    ) -> Tensor:
        if self.stochastic and opaque_codecs():
            return codec_ops.float_decode(self.key, stored, lo, hi, after).to(dtype)
        if out is not None and not compiling():
            return out.copy_(stored.reshape(-1)[lo:hi])
        return stored.reshape(-1)[lo:hi].to(dtype)

    def encode_into(
        self, stored: Tensor, lo: int, x: Tensor, counter: Tensor | None = None, stream: int = 0, at: int = 0
    ) -> Tensor | None:
        out = stored.view(-1)[lo : lo + x.numel()]
        if not self.stochastic or counter is None:  # (initial values, written before any step: to nearest)
            out.copy_(x.reshape(-1))
            return None
        if opaque_codecs():
            return codec_ops.float_encode(self.key, stored, lo, x.reshape(-1).to(torch.float32), counter, stream, at)
        key = torch.tensor(self.stream_key(stream), dtype=torch.int64, device=x.device)
        stochastic_round_into(out, x.reshape(-1).to(torch.float32), key, counter, at + lo)
        return None

    def stream_key(self, stream: int) -> int:
        """The stochastic rounding key of the tensor at position ``stream`` of a step (with the update count and the
        element's place it keys the random bits: :func:`pureopt.kernels.rounding.random_bits`)."""
        return (self.seed * 0x9E3779B1 + stream) & 0xFFFFFFFF

    def like(self, stored: Tensor) -> Tensor:
        return torch.empty_like(stored)

    def nbytes(self, stored: Tensor) -> int:
        return stored.numel() * stored.element_size()


class BlockEncoding(Encoding):
    """Block-wise quantisation: each block of ``block`` elements is scaled by its absolute maximum and every
    element stored as the index of the nearest value of ``code`` (``bits`` = 8 or 4), or, for an fp8 ``dtype``, as
    that float8 value after scaling the block's maximum to the format's largest finite value. ``nonzero`` (fp8, for
    non-negative fields): values below the format's smallest subnormal are written as it, not as 0, so that a
    second moment never decodes to 0 where its first moment does not (the zero-point problem: see
    :func:`dynamic_code`; a code without zero does the same for the other block encodings)."""

    def __init__(
        self, name: str, *, bits: int = 8, code: list[float] | None = None, block: int = 2048,
        dtype: torch.dtype | None = None, nonzero: bool = False,
    ) -> None:  # fmt: skip
        if code is None and dtype is None:
            raise ValueError("a block encoding needs a code or an fp8 dtype")
        if bits == 4 and block % 2:
            raise ValueError("4-bit blocks must hold an even number of elements")
        if bits not in (4, 8):
            raise ValueError(f"a block encoding stores 8-bit or 4-bit codes, not {bits}-bit")
        if code is not None and not 2 <= len(code) <= 1 << bits:
            raise ValueError(f"a {bits}-bit code holds 2 to {1 << bits} values, not {len(code)}")
        self.name, self.bits, self.block, self.dtype = name, bits, block, dtype
        self.code = None if code is None else tuple(code)
        self.top = float(torch.finfo(dtype).max) if dtype is not None else max(abs(v) for v in code or [1.0])
        if nonzero and dtype is None:
            raise ValueError("nonzero is for fp8 encodings; give a code without zero instead")
        # (the smallest positive value of the fp8 format: the bit pattern 1)
        self.least = float(torch.ones((), dtype=torch.uint8).view(dtype)) if nonzero and dtype is not None else None
        digest = hashlib.sha256(repr((bits, block, dtype, self.code, self.least)).encode()).hexdigest()[:16]
        self.key = codec_ops.register(f"{name}/{digest}", self)  # (names it to the opaque ops of a traced step)

    opaque = True

    def __setstate__(self, state: dict[str, Any]) -> None:  # (unpickled: known to the opaque ops again)
        self.__dict__.update(state)
        codec_ops.register(self.key, self)

    def __eq__(self, other: object) -> bool:  # (by value: options rebuilt from a checkpoint equal the given ones)
        return self is other or (type(other) is type(self) and self._value() == other._value())

    def __hash__(self) -> int:  # (without the code: hashed on every lookup of a step, a 256-value tuple cost)
        return hash((self.name, self.bits, self.block, self.dtype, self.least))

    def _value(self) -> tuple[Any, ...]:
        return (self.name, self.bits, self.block, self.dtype, self.code, self.least)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_by_device"}  # (tables: rebuilt where used)

    @property
    def _code(self) -> tuple[float, ...]:
        assert self.code is not None
        return self.code

    def _tables(self, device: torch.device) -> _Tables:
        """The code's tables on ``device`` (kept on the encoding too: the module cache's key hashes every value of
        the code, a cost paid per call otherwise)."""
        found = self.__dict__.setdefault("_by_device", {}).get(device)
        if found is None:
            found = self.__dict__["_by_device"][device] = _tables(self._code, device)
        return found

    def for_rows(self, width: int) -> BlockEncoding | None:
        """This encoding with blocks that never cross a row of ``width`` elements, so that a parameter sharded by
        rows (FSDP2's ``Shard(0)``) keeps whole blocks on every rank and a checkpoint means the same at any world
        size: blocks of ``block`` elements where ``width`` is a multiple of it, of ``width`` where rows are
        shorter, else of the largest divisor of ``width`` down to ``block / 4``; ``None`` where there is none, or
        the blocks would be under 32 elements (the scales would cost as much as the codes save) or odd at 4 bits:
        such a tensor's field is kept in the compute dtype instead (as bitsandbytes keeps small tensors' state in
        32 bits)."""
        sizes = [width] if width < self.block else range(self.block, self.block // 4 - 1, -1)
        return next((self.with_block(b) for b in sizes if width % b == 0 and self._fits(b)), None)

    def _fits(self, block: int) -> bool:
        """Whether blocks of ``block`` elements are worth their scales (32 or more) and whole bytes at 4 bits."""
        return _fits(block, self.bits)

    def with_block(self, block: int) -> BlockEncoding:
        """This encoding with blocks of ``block`` elements (the same code; kept, so that each size is one encoding
        and its tables are built once)."""
        if block == self.block:
            return self
        variants = self.__dict__.setdefault("_variants", {})
        if block not in variants:
            code = None if self.code is None else list(self.code)
            variants[block] = BlockEncoding(
                self.name, bits=self.bits, code=code, block=block, dtype=self.dtype, nonzero=self.least is not None
            )
        return variants[block]

    def local(self, stored: Any) -> tuple[Encoding | None, Any]:
        # a plain tensor: kept in the compute dtype (rows that cannot be blocked); 2-D codes: one row per parameter
        # row (or per run of a row, for a matrix sharded by columns), its blocks within it and their scales in the
        # scale's row (a DTensor parameter's local shard, see for_rows): the block size is the codes' row over the
        # scales' row
        if isinstance(stored, Tensor):
            return None, stored
        if stored.codes.dim() == 1:
            return self, stored
        width, per_row = stored.codes.shape[1] * (2 if self.bits == 4 else 1), stored.scale.shape[1]
        flat = Quantized(stored.codes.view(-1), stored.scale.view(-1))
        if stored.codes.numel() == 0:  # (an empty shard: nothing to read)
            return self, flat
        block = row_block(width, per_row, self.bits)
        if block is None:
            raise ValueError(
                f"{self.name}: rows of {width} elements stored with {per_row} scales each are not whole blocks of 32 "
                "or more elements (see for_rows)"
            )
        return self.with_block(block), flat

    def _ncodes(self, n: int) -> int:
        return (n + 1) // 2 if self.bits == 4 else n

    def empty(self, p: Tensor) -> Quantized:
        # (made *like* p's flat elements, so that under vmap the buffers are batched as p is)
        flat = p.detach().reshape(-1)
        blocks = -(-flat.numel() // self.block)
        scale = torch.zeros_like(flat[:blocks], dtype=torch.float32)
        if self.dtype is not None:
            return Quantized(torch.zeros_like(flat, dtype=self.dtype), scale)
        _tables(self._code, p.device)  # (built here, eagerly, for a compiled step to read)
        zero = min(range(len(self._code)), key=lambda i: abs(self._code[i]))  # the code nearest zero
        fill = zero | (zero << 4) if self.bits == 4 else zero
        codes = torch.full_like(flat[: self._ncodes(flat.numel())], fill, dtype=torch.uint8)
        return Quantized(codes, scale)

    def _pieces(self, n: int) -> range:
        """Starts of the pieces a chunk is encoded / decoded in (whole blocks, about 64K elements): the integer
        and float temporaries of the code search exist for one piece at a time. One piece when compiling."""
        return (
            range(0, n, n or 1)
            if compiling()
            else range(0, n, max(self.block, PIECE_ELEMENTS // self.block * self.block))
        )

    def decode(
        self, stored: Quantized, lo: int, hi: int, dtype: torch.dtype, after: Sequence[Tensor] = (),
        out: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        if opaque_codecs():
            return codec_ops.block_decode(self.key, stored.codes, stored.scale, lo, hi, after).to(dtype)
        n, b0, first = hi - lo, lo // self.block, lo % self.block
        if self._native_fits() and native.available(stored.codes, stored.scale):  # (one pass: pureopt.kernels.native)
            into = out if out is not None and out.dtype == torch.float32 else None
            values = torch.empty(n, dtype=torch.float32, device=stored.codes.device) if into is None else into
            if self.dtype is not None:
                native.decode_fp8(stored.codes, stored.scale, values, lo, self.block)
            else:
                native.decode(stored.codes, stored.scale, self._tables(stored.codes.device).code, values, lo,
                              self.block, self.bits)  # fmt: skip
            return values if into is not None else values.to(dtype)
        if self.dtype is not None:
            values = stored.codes[lo:hi].to(torch.float32)
        elif compiling():
            values = self._gather(stored.codes, lo, hi)
        else:
            values = torch.empty(n, dtype=torch.float32, device=stored.codes.device)
            code = self._tables(stored.codes.device).code
            step = self._pieces(n).step
            for start in self._pieces(n):
                stop = min(n, start + step)
                if self.bits == 8:
                    torch.index_select(code, 0, stored.codes[lo + start : lo + stop].int(), out=values[start:stop])
                else:
                    values[start:stop] = self._gather(stored.codes, lo + start, lo + stop)
        if first:  # a slice starting inside a block: one scale per element
            scale = stored.scale[b0 : -(-hi // self.block)].repeat_interleave(self.block)[first : first + n]
            return (values * scale).to(dtype)
        if compiling():  # functional, for inductor (which miscompiled repeat_interleave fused with the gather)
            nb = -(-n // self.block)
            padded = torch.nn.functional.pad(values, (0, nb * self.block - n)).view(nb, self.block)
            return (padded * stored.scale[b0 : b0 + nb, None]).view(-1)[:n].to(dtype)
        full = n - n % self.block
        values[:full].view(-1, self.block).mul_(stored.scale[b0 : b0 + full // self.block, None])
        if full < n:
            values[full:].mul_(stored.scale[b0 + full // self.block])
        return values.to(dtype)

    @property
    def _low(self) -> float:
        """fp8: the lowest value written (``-top``; for ``nonzero``, a non-negative field, the least subnormal)."""
        return -self.top if self.least is None else self.least

    def _native_fits(self) -> bool:
        """Whether the native kernels take this encoding: fp8 formats they know, or a code of ``2**bits`` values."""
        if self.dtype is not None:
            return self.dtype in _NATIVE_FP8
        return self.code is not None and len(self.code) == 1 << self.bits

    def _gather(self, codes: Tensor, lo: int, hi: int) -> Tensor:
        """The code values of elements ``lo:hi`` (float32, flat); 4-bit codes through a table of byte -> both
        values (one read per byte; inductor also miscompiled an index built by interleaving the two nibbles)."""
        t = _tables(self._code, codes.device)
        if self.bits == 8:
            return torch.index_select(t.code, 0, codes[lo:hi].int())
        assert t.pairs is not None
        both = torch.index_select(t.pairs, 0, codes[lo // 2 : (hi + 1) // 2].int()).view(-1)
        return both[lo % 2 : lo % 2 + hi - lo]

    def encode_into(
        self, stored: Quantized, lo: int, x: Tensor, counter: Tensor | None = None, stream: int = 0, at: int = 0
    ) -> Tensor | None:
        x = x.reshape(-1)
        if opaque_codecs():
            return codec_ops.block_encode(self.key, stored.codes, stored.scale, lo, x.to(torch.float32))
        if self._native_fits() and native.available(stored.codes, stored.scale):  # (one pass: pureopt.kernels.native)
            xs = x.to(torch.float32).contiguous()
            if self.dtype is not None:
                native.encode_fp8(xs, stored.codes, stored.scale, lo, self.block, self.top, self._low)
                return None
            t = self._tables(stored.codes.device)
            if t.lookup is not None and (self.bits == 8 or self.block <= native.MAX_BLOCK):
                native.encode(xs, stored.codes, stored.scale, t.lookup, t.padded, lo, self.block, self.top, t.shift,
                              self.bits)  # fmt: skip
                return None
        step = self._pieces(x.numel()).step
        for start in self._pieces(x.numel()):
            self._encode_piece(stored, lo + start, x[start : start + step].to(torch.float32))
        return None

    def _encode_piece(self, stored: Quantized, lo: int, x: Tensor) -> None:
        n = x.numel()
        b0 = lo // self.block
        nb = -(-n // self.block)
        pad = nb * self.block - n
        blocks = (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(nb, self.block)
        absmax = blocks.abs().amax(dim=1)  # (torch.aminmax over rows is ~10x slower on CPU)
        scale = absmax / self.top
        stored.scale[b0 : b0 + nb].copy_(scale)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        normed = (blocks / safe[:, None]).view(-1)[:n]
        if self.dtype is not None:
            stored.codes[lo : lo + n].copy_(normed.clamp(self._low, self.top))
            return
        assert self.code is not None
        if self.bits == 8:
            nearest_index(normed, self.code, out=stored.codes[lo : lo + n])
            return
        idx = nearest_index(normed, self.code)
        if n % 2:
            idx = torch.cat((idx, idx.new_zeros(1)))
        pairs = idx.view(-1, 2)
        stored.codes[lo // 2 : lo // 2 + pairs.shape[0]].copy_(pairs[:, 0] | (pairs[:, 1] << 4))

    def like(self, stored: Quantized) -> Quantized:
        return Quantized(torch.empty_like(stored.codes), torch.empty_like(stored.scale))

    def nbytes(self, stored: Quantized) -> int:
        return stored.codes.numel() * stored.codes.element_size() + stored.scale.numel() * 4


def _fits(block: int, bits: int) -> bool:
    return block >= 32 and (bits != 4 or block % 2 == 0)


def row_block(width: int, per_row: int, bits: int) -> int | None:
    """The block size of a record stored by rows (2-D codes and scales, see :meth:`BlockEncoding.local`): rows of
    ``width`` elements with ``per_row`` scales each; ``None`` where they are not whole blocks of 32 or more
    elements (of an even number of elements at 4 bits), which no encoding writes."""
    if per_row <= 0 or width % per_row:
        return None
    block = width // per_row
    return block if _fits(block, bits) else None


def _named() -> dict[str, Encoding]:
    return {
        # 8-bit (Dettmers et al. 2022): dynamic code, blocks of 2048 (signed for first moments, unsigned for second)
        "q8": BlockEncoding("q8", bits=8, code=dynamic_code(8, signed=True), block=2048),
        # (the second-moment codes exclude zero: see dynamic_code)
        "q8u": BlockEncoding("q8u", bits=8, code=dynamic_code(8, signed=False, zero=False), block=2048),
        # 4-bit (Li et al. 2023): blocks of 128; second moments with the zero-free linear code
        "q4": BlockEncoding("q4", bits=4, code=dynamic_code(4, signed=True), block=128),
        "q4u": BlockEncoding("q4u", bits=4, code=linear_code(4, zero=False), block=128),
        "fp8": BlockEncoding("fp8", dtype=torch.float8_e4m3fn, block=2048),
        "fp8_e5m2": BlockEncoding("fp8_e5m2", dtype=torch.float8_e5m2, block=2048),
        "fp8u": BlockEncoding("fp8u", dtype=torch.float8_e4m3fn, block=2048, nonzero=True),
        "fp8_e5m2u": BlockEncoding("fp8_e5m2u", dtype=torch.float8_e5m2, block=2048, nonzero=True),
        # 16-bit floats, the math in float32 chunk by chunk; "-sr": written with stochastic rounding
        "bf16": FloatEncoding(torch.bfloat16),
        "fp16": FloatEncoding(torch.float16),
        "bf16-sr": FloatEncoding(torch.bfloat16, stochastic=True),
        "fp16-sr": FloatEncoding(torch.float16, stochastic=True),
    }


NAMED = _named()
"""The named encodings: ``"q8"`` / ``"q4"`` (signed dynamic codes, for first moments and other signed state),
``"q8u"`` / ``"q4u"`` (non-negative fields: second moments; codes without zero), ``"fp8"`` (e4m3 with a scale per
block of 2048), ``"fp8_e5m2"``, ``"fp8u"`` / ``"fp8_e5m2u"`` (non-negative fields: never written as zero),
``"bf16"`` / ``"fp16"`` (16-bit storage, float32 math; a bare ``torch.bfloat16`` as the whole ``state_dtype``
computes in bf16 instead) and ``"bf16-sr"`` / ``"fp16-sr"`` (written with stochastic rounding). ``"q8"`` /
``"q4"`` / ``"fp8"`` / ``"fp8_e5m2"`` (or a float8 dtype) given for a field the algorithm declares non-negative take
the ``u`` variant."""


def encoding_for(spec: Any, nonneg: bool = False) -> Encoding | None:
    """The encoding a ``state_dtype`` entry asks for: ``None`` (the parameter's dtype), a float dtype, a name from
    :data:`NAMED` or an :class:`Encoding`. ``nonneg``: the field is non-negative (a second moment)."""
    if spec is None:
        return None
    if isinstance(spec, Encoding):
        return spec
    if isinstance(spec, torch.dtype):
        if spec in (torch.float8_e4m3fn, torch.float8_e5m2):
            return encoding_for("fp8" if spec == torch.float8_e4m3fn else "fp8_e5m2", nonneg)
        if not spec.is_floating_point and not spec.is_complex:
            raise ValueError(f"state_dtype: {spec} is not a floating dtype (use 'q8' or 'q4' for quantised states)")
        return None  # plain float dtypes are the state dtype itself (no encoding step)
    if isinstance(spec, str):
        key = spec + "u" if nonneg and spec in ("q8", "q4", "fp8", "fp8_e5m2") else spec
        if key not in NAMED:
            raise ValueError(f"state_dtype: unknown encoding {spec!r}; expected one of {sorted(NAMED)} or a dtype")
        return NAMED[key]
    raise TypeError(f"state_dtype: expected a torch.dtype, an encoding name or an Encoding, got {type(spec).__name__}")


def shaped_like(new: Any, old: Any) -> Any:
    """A new stored value (a tensor, or a flat record as the step writes it) shaped as the one it replaces: a record
    of row blocks keeps its 2-D codes and scales."""
    if isinstance(new, Tensor) or new.codes.shape == old.codes.shape:
        return new
    return type(old)(new.codes.view(old.codes.shape), new.scale.view(old.scale.shape))


def stored_bytes(stored: Any) -> int:
    """Bytes of a stored state value (a tensor or a :class:`Quantized` record)."""
    if isinstance(stored, Quantized):
        return stored.codes.numel() * stored.codes.element_size() + stored.scale.numel() * stored.scale.element_size()
    return stored.numel() * stored.element_size()
