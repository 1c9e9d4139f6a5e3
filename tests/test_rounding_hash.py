"""The stochastic-rounding hash (pureopt.kernels.rounding) against references written here with Python integers.

References, all arithmetic mod ``2**32`` on Python ints:

- ``fmix32`` (MurmurHash3's finaliser): ``h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35;
  h ^= h >> 16``; an int64 input outside ``[0, 2**32)`` has its first xor-shift taken on the int64 value (an
  arithmetic shift, as Python's ``>>``), as the int64 formula always did.
- ``random_bits``: ``seed = fmix32(fmix32(key) ^ counter)``, ``bits[j] = fmix32(fmix32((offset + j) ^ seed) ^
  (seed * 0x9E37))``.
- ``stochastic_round`` to bfloat16: the float32 pattern ``p``; finite: the bf16 pattern
  ``((p + (bits & 0xFFFF)) & ~0xFFFF) >> 16``; infinities stay, NaN stays NaN.
- to float16: ``low`` the largest float16 (or -inf) at most ``x``, ``high`` the next one up (-0.0 above the
  negative smallest subnormal; a zero ``x`` is its own ``low``); ``high`` when ``(bits & 0xFFFFFF) / 2**24`` is
  below ``(x - low) / (high - low)`` rounded to float32 (0 when the gap is 0), else ``low``.

Each is checked eagerly, under ``torch.compile`` (inductor, fullgraph) and under ``torch.func.vmap``. Integer ops
are exact on every CPU, so the comparisons are bitwise.
"""

from __future__ import annotations

import bisect
import math
import struct

import pytest
import torch

from pureopt.kernels import rounding
from pureopt.kernels.rounding import fmix32, random_bits, stochastic_round

M32 = 0xFFFFFFFF
EDGES = [0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]


def ref_fmix32(h: int) -> int:
    h = (h ^ (h >> 16)) & M32
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_random_bits(key: int, counter: int, offset: int, numel: int) -> list[int]:
    seed = ref_fmix32(ref_fmix32(key & M32) ^ (counter & M32))
    mixed = (seed * 0x9E37) & M32
    return [ref_fmix32(ref_fmix32(((offset + j) & M32) ^ seed) ^ mixed) for j in range(numel)]


def f32_pattern(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def to_f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def ref_bf16(x: float, r: int) -> int | None:
    """The bf16 pattern (None: NaN)."""
    if math.isnan(x):
        return None
    p = f32_pattern(x)
    if math.isinf(x):
        return p >> 16
    return (((p + (r & 0xFFFF)) & M32) & ~0xFFFF) >> 16


_F16 = [struct.unpack("<e", struct.pack("<H", b))[0] for b in range(0x7C00)]  # +0 ... 65504
_F16_LINE = [-math.inf] + [-v for v in reversed(_F16[1:])] + _F16 + [math.inf]


def ref_fp16(x: float, r: int) -> int | None:
    """The float16 pattern (None: NaN)."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return struct.unpack("<H", struct.pack("<e", x))[0]
    if x == 0:
        low, high = x, 2.0**-24  # (the zero's own sign)
    else:
        i = bisect.bisect_right(_F16_LINE, x) - 1
        low, high = _F16_LINE[i], _F16_LINE[i + 1]
        if high == 0:
            high = -0.0
    gap = high - low
    frac = to_f32((x - low) / gap) if gap > 0 else 0.0
    u = (r & 0xFFFFFF) / 2**24
    return struct.unpack("<H", struct.pack("<e", high if u < frac else low))[0]


def check_rounded(out: torch.Tensor, xs: list[float], rs: list[int], dtype: torch.dtype) -> None:
    ref = ref_bf16 if dtype == torch.bfloat16 else ref_fp16
    got = [b & 0xFFFF for b in out.cpu().view(torch.int16).reshape(-1).tolist()]
    bad = []
    for i, (x, r, g) in enumerate(zip(xs, rs, got)):
        want = ref(x, r)
        ok = (g & 0x7FFF) > (0x7F80 if dtype == torch.bfloat16 else 0x7C00) if want is None else g == want
        if not ok:
            bad.append((i, x, hex(r), hex(g), want if want is None else hex(want)))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"


def hash_inputs() -> list[int]:
    g = torch.Generator().manual_seed(16)
    return EDGES + torch.randint(0, 2**32, (3000,), generator=g).tolist()


def float_inputs() -> list[float]:
    """Normals over the whole float32 range, both signs, subnormals, zeros, the largest finites, bf16/fp16-exact
    values, the float16 boundaries, infinities and NaNs (several payloads)."""
    g = torch.Generator().manual_seed(17)
    mags = torch.exp2(torch.empty(2000).uniform_(-149, 128, generator=g))
    signs = torch.where(torch.rand(2000, generator=g) < 0.5, -1.0, 1.0)
    rand = (mags * signs).tolist() + (torch.randn(1000, generator=g) * 1e-3).tolist()
    patterns = [0x00000001, 0x007FFFFF, 0x00400000, 0x80000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000]
    patterns += [0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFF800001, 0xFFFFFFFF, 0x3F80FFFF, 0xBF80FFFF, 0x0000FFFF]
    specials = [struct.unpack("<f", struct.pack("<I", p))[0] for p in patterns]
    specials += [0.0, -0.0, math.inf, -math.inf, 1.0, -1.0, 2.0**-24, -(2.0**-24), 2.0**-25, -(2.0**-25), 2.0**-14]
    specials += [65504.0, -65504.0, 65519.0, -65519.0, 65520.0, -65520.0, 70000.0, -70000.0, 1e-30, -1e-30]
    return [to_f32(v) for v in specials + rand]


def round_bits(n: int) -> list[int]:
    """Random 32-bit values (in int64) with the edge cases of the low 16 / 24 bits first."""
    g = torch.Generator().manual_seed(18)
    edges = [0, 0xFFFF, 0x10000, 0x8000, 0x7FFF, 0xFFFFFF, 0x800000, M32, 2**31]
    return (edges + torch.randint(0, 2**32, (n,), generator=g).tolist())[:n]


@pytest.mark.bitwise
def test_fmix32_matches_the_python_reference():
    hs = hash_inputs()
    assert fmix32(torch.tensor(hs)).tolist() == [ref_fmix32(h) for h in hs]
    assert fmix32(torch.tensor(1)).item() == 0x514E28B7
    # int64 values outside [0, 2**32) hash as the int64 formula hashed them
    odd = [-1, -2, -(2**31), -(2**63), 2**63 - 1, 2**32, 2**40 + 7, -(2**40) - 3, 2**48 + 0xFFFF]
    assert fmix32(torch.tensor(odd)).tolist() == [ref_fmix32(h) for h in odd]


@pytest.mark.bitwise
def test_fmix32_does_not_write_its_input_and_keeps_the_shape():
    h = torch.tensor([[5, 2**32 - 1], [2**31, 0]])
    before = h.clone()
    out = fmix32(h)
    assert torch.equal(h, before) and out.shape == (2, 2) and out.dtype == torch.int64
    assert out.reshape(-1).tolist() == [ref_fmix32(v) for v in before.reshape(-1).tolist()]


CASES = [  # (key, counter, offset, numel)
    (7, 0, 0, 1000),
    (0, 0, 0, 1),
    (2**32 - 1, 2**32 - 1, 2**31 - 300, 600),  # indices crossing 2**31
    (2**31, 2**31 - 1, 2**32 - 200, 400),  # indices crossing 2**32 (wrap to 0)
    (-5, 2**40 + 3, 2**33 + 11, 300),  # key, counter and offset beyond 32 bits
    (123456789, 17, 70000, 66000),  # more than one 64K piece
]


@pytest.mark.bitwise
@pytest.mark.parametrize("tensor_seed", [False, True], ids=["python-seed", "tensor-seed"])
def test_random_bits_match_the_python_reference(tensor_seed, monkeypatch):
    if tensor_seed:  # the 0-d seed by tensor ops, as under vmap / compile / on other devices
        monkeypatch.setattr(rounding, "_plain_cpu", lambda *ts: False)
    for key, counter, offset, numel in CASES:
        out = random_bits(torch.tensor(key), torch.tensor(counter), offset, numel, torch.device("cpu"))
        assert out.dtype == torch.int64 and out.shape == (numel,)
        assert out.tolist() == ref_random_bits(key, counter, offset, numel), (key, counter, offset, numel)


@pytest.mark.bitwise
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_matches_the_python_reference(dtype):
    xs = float_inputs()
    rs = round_bits(len(xs))
    x = torch.tensor(xs, dtype=torch.float32)
    before = x.clone()
    out = stochastic_round(x, dtype, torch.tensor(rs))
    assert out.dtype == dtype and torch.equal(x.view(torch.int32), before.view(torch.int32))
    check_rounded(out, xs, rs, dtype)
    # the same bits from random_bits, on a 2-d x (flat order)
    bits = random_bits(torch.tensor(3), torch.tensor(9), 40, len(xs) - 1, torch.device("cpu"))
    out2 = stochastic_round(x[1:].view(-1, 1), dtype, bits)
    assert out2.shape == (len(xs) - 1, 1)
    check_rounded(out2, xs[1:], bits.tolist(), dtype)


@pytest.mark.bitwise
def test_compiled_hash_and_rounding_match_the_python_reference():
    hs = hash_inputs()
    xs = float_inputs()
    rs = round_bits(len(xs))

    def all_of_it(h, key, counter, x, bits):
        return (
            fmix32(h),
            random_bits(key, counter, 5, 700, h.device),
            random_bits(key, counter, 2**32 - 300, 600, h.device),
            stochastic_round(x, torch.bfloat16, bits),
            stochastic_round(x, torch.float16, bits),
        )

    compiled = torch.compile(all_of_it, backend="inductor", fullgraph=True)
    key, counter = 2**32 - 7, 2**31 + 5
    f, b1, b2, bf, hf = compiled(
        torch.tensor(hs), torch.tensor(key), torch.tensor(counter), torch.tensor(xs), torch.tensor(rs)
    )
    assert f.tolist() == [ref_fmix32(h) for h in hs]
    assert b1.tolist() == ref_random_bits(key, counter, 5, 700)
    assert b2.tolist() == ref_random_bits(key, counter, 2**32 - 300, 600)
    check_rounded(bf, xs, rs, torch.bfloat16)
    # (float16: inductor keeps float16 intermediates in float32 precision, which once made this round to nearest)
    check_rounded(hf, xs, rs, torch.float16)


@pytest.mark.bitwise
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_float16_values_from_their_bits_match_struct(compiled):
    # every float16 bit pattern but the NaNs, against Python's own float16 decoding
    patterns = [b for b in range(1 << 16) if (b & 0x7FFF) <= 0x7C00]
    want = [f32_pattern(struct.unpack("<e", struct.pack("<H", b))[0]) for b in patterns]
    q = torch.tensor(patterns, dtype=torch.int32).to(torch.int16)
    fn = torch.compile(rounding._fp16_value, backend="inductor", fullgraph=True) if compiled else rounding._fp16_value
    got = [v & M32 for v in fn(q).view(torch.int32).tolist()]
    assert got == want


@pytest.mark.bitwise
def test_vmapped_hash_and_rounding_match_the_python_reference():
    hs = hash_inputs()[:3000]
    rows = torch.tensor(hs).view(3, 1000)
    assert torch.func.vmap(fmix32)(rows).reshape(-1).tolist() == [ref_fmix32(h) for h in hs]

    keys, counters = [1, 2**32 - 1, 2**31], [0, 7, 2**32 - 2]
    cpu = torch.device("cpu")
    # batched keys and counters; batched counters with one key (as an encoded state's step counter under vmap); and
    # batched keys with one counter
    both = torch.func.vmap(lambda k, c: random_bits(k, c, 2**31 - 50, 100, cpu))(
        torch.tensor(keys), torch.tensor(counters)
    )
    by_counter = torch.func.vmap(lambda c: random_bits(torch.tensor(keys[0]), c, 0, 100, cpu))(torch.tensor(counters))
    by_key = torch.func.vmap(lambda k: random_bits(k, torch.tensor(counters[1]), 0, 100, cpu))(torch.tensor(keys))
    for i in range(3):
        assert both[i].tolist() == ref_random_bits(keys[i], counters[i], 2**31 - 50, 100)
        assert by_counter[i].tolist() == ref_random_bits(keys[0], counters[i], 0, 100)
        assert by_key[i].tolist() == ref_random_bits(keys[i], counters[1], 0, 100)

    xs = float_inputs()[:1500]
    rs = round_bits(len(xs))
    x, r = torch.tensor(xs).view(3, 500), torch.tensor(rs).view(3, 500)
    for dtype in (torch.bfloat16, torch.float16):
        rounded = lambda a, b: stochastic_round(a, dtype, b)  # noqa: B023 (used at once)
        check_rounded(torch.func.vmap(rounded)(x, r), xs, rs, dtype)
        # batched x with one set of bits, and one x with batched bits
        check_rounded(torch.func.vmap(rounded, in_dims=(0, None))(x, r[0]), xs, rs[:500] * 3, dtype)
        check_rounded(torch.func.vmap(rounded, in_dims=(None, 0))(x[0], r), xs[:500] * 3, rs, dtype)
