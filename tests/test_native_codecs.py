"""The native codec kernels (pureopt/kernels/codecs.cpp) against references written here.

Block codecs: decode is ``value of the code * scale of its block``; encode is, per block, ``scale = max |x| / top``
(NaN when the block holds a NaN), ``v = x / (scale if scale > 0 else 1)`` and the index of the nearest code value,
ties to the lower one (``torch.bucketize`` against the midpoints); fp8 codes are decoded by the float8 cast. Every
step is one IEEE operation per element, so the kernel must give these bits exactly, on its AVX2 loop and on its
portable one (``bitwise``: also rerun under ``ATEN_CPU_CAPABILITY=avx2``). Stochastic rounding to bf16: murmur3's
finaliser as written out below, and the carry rule of :func:`pureopt.kernels.rounding.stochastic_round`.

A whole AdamW step with 8-bit state is the same with the native codecs as with the torch-op ones (paths differ
only in which calls they make).
"""

from __future__ import annotations

import pytest
import torch

import pureopt
from pureopt.kernels import native
from pureopt.kernels.encoding import NAMED, BlockEncoding, Quantized

pytestmark = pytest.mark.skipif(
    native._kernel() is None, reason="native codecs unavailable here (no C++ toolchain, or PUREOPT_NATIVE=0)"
)

_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_PATHS = [pytest.param("avx2", marks=pytest.mark.skipif(not _AVX2, reason="no AVX2 here")), "portable"]
_BLOCK = ["q8", "q8u", "q4", "q4u", "fp8", "fp8u", "fp8_e5m2", "fp8_e5m2u"]


@pytest.fixture(params=_PATHS)
def path(request, monkeypatch):
    """Run the kernels' AVX2 loop or their portable one."""
    flag = 0 if request.param == "avx2" else 16
    monkeypatch.setattr(native, "_vector_flag", lambda: flag)
    return request.param


def _values(enc: BlockEncoding) -> torch.Tensor:
    """The value of each code (float32): the code table, or every fp8 bit pattern through the cast."""
    if enc.dtype is not None:
        return torch.arange(256, dtype=torch.uint8).view(enc.dtype).to(torch.float32)
    return torch.tensor(enc.code, dtype=torch.float32)


def _indices(stored: Quantized, enc: BlockEncoding, n: int) -> torch.Tensor:
    """Each element's code index (int64), 4-bit codes unpacked (low nibble first)."""
    raw = stored.codes.view(torch.uint8).long()
    if enc.bits == 4:
        raw = torch.stack((raw & 15, raw >> 4), dim=1).reshape(-1)
    return raw[:n]


def _reference_decode(stored: Quantized, enc: BlockEncoding, lo: int, hi: int) -> torch.Tensor:
    idx = _indices(stored, enc, hi)[lo:hi]
    blocks = torch.arange(lo, hi) // enc.block
    return _values(enc)[idx] * stored.scale[blocks]


def _reference_encode(x: torch.Tensor, enc: BlockEncoding) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, code indices as int64) for the float32 flat ``x``; fp8: the cast's bit patterns as indices."""
    scales, idx = [], []
    values = _values(enc)
    for lo in range(0, x.numel(), enc.block):
        part = x[lo : lo + enc.block]
        s = torch.where(part.isnan().any(), torch.tensor(float("nan")), part.abs().max() / enc.top)
        scales.append(s)
        v = part / torch.where(s > 0, s, torch.tensor(1.0))
        if enc.dtype is not None:
            low = -enc.top if enc.least is None else enc.least
            idx.append(v.clamp(low, enc.top).to(enc.dtype).view(torch.uint8).long())
        else:
            mids = (values[1:] + values[:-1]) / 2
            idx.append(torch.bucketize(v, mids))
    return torch.stack(scales), torch.cat(idx)


def _data(n: int, seed: int, nonneg: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-9, 2, n)[torch.randperm(n, generator=g)]
    if n > 40:
        x[1] = 0.0
        x[2] = -0.0
        x[3] = 1e-42  # (subnormal)
        x[5:9] = 0.0
    return x.abs() if nonneg else x


@pytest.mark.bitwise
@pytest.mark.parametrize("name", _BLOCK)
@pytest.mark.parametrize("n", [1, 7, 63, 2048, 5000])
def test_encode_matches_the_reference(name, n, path):
    enc = NAMED[name]
    assert isinstance(enc, BlockEncoding)
    x = _data(n, n, name.endswith("u"))
    if n == 5000:  # a zero block, a block with a NaN, one with an infinity (at the smaller block sizes too)
        x[enc.block : 2 * enc.block] = 0.0
        x[2 * enc.block + 3] = float("nan")
        x[-2] = float("inf")
    stored = enc.empty(x)
    enc.encode_into(stored, 0, x)
    scales, idx = _reference_encode(x, enc)
    assert torch.equal(stored.scale.isnan(), scales.isnan())
    assert torch.equal(stored.scale[~scales.isnan()], scales[~scales.isnan()])
    got = _indices(stored, enc, n)
    finite = ~x.isnan()
    assert torch.equal(got[finite], idx[finite])
    if enc.bits == 4 and n % 2:  # (the last byte's free high nibble is written as 0)
        assert int(stored.codes[-1]) >> 4 == 0


@pytest.mark.bitwise
@pytest.mark.parametrize("name", _BLOCK)
@pytest.mark.parametrize("lo,hi", [(0, 5000), (1, 4999), (2048, 4097), (3, 4), (129, 200)])
def test_decode_matches_the_reference(name, lo, hi, path):
    enc = NAMED[name]
    assert isinstance(enc, BlockEncoding)
    n = 5000
    g = torch.Generator().manual_seed(lo)
    stored = enc.empty(torch.zeros(n))
    stored.codes.view(torch.uint8).copy_(torch.randint(0, 256, stored.codes.shape, generator=g, dtype=torch.uint8))
    stored.scale.copy_(torch.rand(stored.scale.shape, generator=g) * 10.0 ** torch.randint(-30, 30, stored.scale.shape))
    stored.scale[0] = 0.0
    got = enc.decode(stored, lo, hi, torch.float32)
    want = _reference_decode(stored, enc, lo, hi)
    nan = want.isnan()  # (fp8 NaN patterns, e5m2 infinities times a zero scale)
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], want[~nan])


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.mark.bitwise
@pytest.mark.parametrize("at", [0, 7, (1 << 32) - 5])
def test_stochastic_bf16_state_matches_the_rounding_rule(at, path):
    # bf16-sr state: element k of tensor `stream` at step `counter` gets the bits
    # fmix32(fmix32(place ^ seed) ^ seed * 0x9E37) with seed = fmix32(fmix32(key) ^ counter) and is rounded by adding
    # their low 16 bits to its float32 pattern and keeping the top 16 (NaN stays NaN)
    enc = NAMED["bf16-sr"]
    n, stream, counter, lo = 301, 2, 5, 64
    g = torch.Generator().manual_seed(at % 97)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-38, 38, (n,), generator=g)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3e38])
    stored = enc.empty(torch.zeros(lo + n))
    enc.encode_into(stored, lo, x, torch.tensor(counter), stream, at)
    key = (enc.seed * 0x9E3779B1 + stream) & 0xFFFFFFFF
    seed = _fmix32(_fmix32(key) ^ counter)
    mixed = (seed * 0x9E37) & 0xFFFFFFFF
    pattern = x.view(torch.int32).tolist()
    got = stored[lo:].view(torch.int16).tolist()
    for k in range(n):
        if x[k].isnan():
            assert stored[lo + k].isnan()
            continue
        r = _fmix32(_fmix32(((at + lo + k) & 0xFFFFFFFF) ^ seed) ^ mixed)
        want = (((pattern[k] & 0xFFFFFFFF) + (r & 0xFFFF)) >> 16) & 0xFFFF
        assert got[k] & 0xFFFF == want, k


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", ["q8", "q4", "fp8", "bf16-sr"])
def test_adamw_step_is_the_same_with_and_without_the_native_codecs(spec, monkeypatch):
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(70, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(4)]
    # (impl="foreach": the chunked path, which calls the codecs; the one-pass kernel has its own tests)
    tx = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec, impl="foreach")

    def run() -> list[torch.Tensor]:
        p = {k: v.clone() for k, v in params.items()}
        s = tx.init(p)
        for gr in grads:
            p, s = pureopt.step(tx, gr, s, p, donate=("params", "state"))
        return pureopt.tree.leaves((p, s))

    with_native = run()
    monkeypatch.setattr(native, "available", lambda *ts: False)
    without = run()
    for a, b in zip(with_native, without):
        assert torch.equal(a, b)


def test_native_codecs_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PUREOPT_NATIVE", "0")
    native._kernel.cache_clear()
    try:
        assert not native.available(torch.zeros(4))
    finally:
        monkeypatch.delenv("PUREOPT_NATIVE")
        native._kernel.cache_clear()
    assert native.available(torch.zeros(4))


@pytest.mark.bitwise
@pytest.mark.parametrize("name", ["fp8", "fp8u", "fp8_e5m2", "fp8_e5m2u"])
def test_fp8_encode_rounds_as_the_cast_at_every_value_and_tie(name, path):
    # a block whose maximum is the format's largest value (scale 1): every finite value of the format, every midpoint
    # between neighbours (ties: to the even pattern) and the floats just beside each midpoint
    enc = NAMED[name]
    assert isinstance(enc, BlockEncoding) and enc.dtype is not None
    values = torch.arange(256, dtype=torch.uint8).view(enc.dtype).to(torch.float32)
    values = values[values.isfinite()].unique()  # (sorted)
    mids = (values[1:] + values[:-1]) / 2
    inf = torch.tensor(float("inf"))
    x = torch.cat((values, mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf)))
    if name.endswith("u"):
        x = x.abs()
    x = torch.cat((torch.tensor([enc.top]), x))
    assert x.numel() <= enc.block
    stored = enc.empty(x)
    enc.encode_into(stored, 0, x)
    assert float(stored.scale[0]) == 1.0
    low = -enc.top if enc.least is None else enc.least
    want = x.clamp(low, enc.top).to(enc.dtype).view(torch.uint8)
    assert torch.equal(stored.codes.view(torch.uint8), want)


@pytest.mark.bitwise
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("skip", [False, True], ids=["all", "a-without-gradient"])
def test_stochastic_rounding_of_bf16_params_follows_the_rule(donate, transposed, skip, path):
    # stochastic_rounding(sgd) on bf16 parameters: p <- SR(float32(p) - lr * float32(g)) with the bits of place
    # offset + k (offset: the elements of all the parameters before it, stepped or not, so that a parameter's bits
    # do not depend on which others a call steps; k in the logical order, also for a transposed parameter),
    # key = seed, counter = the step
    seed, lr = 77, 0.25  # (a power of two: the inner bf16 update -lr * g is exact)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(51, 20, generator=g).bfloat16().t() if transposed else torch.randn(20, 51, generator=g).bfloat16()
    params = {"a": torch.randn(33, generator=g).bfloat16(), "b": b}
    grads = {k: torch.randn(v.shape, generator=g).bfloat16() for k, v in params.items()}
    given = {**grads, "a": None} if skip else grads
    tx = pureopt.stochastic_rounding(pureopt.sgd(lr=lr), seed=seed)
    mine = {k: v.clone() for k, v in params.items()}
    state = tx.init(mine)
    for _ in range(2):  # (the second step: counter 1)
        if donate:
            state = pureopt.inplace_step(tx, given, state, mine)
        else:
            updates, state = tx.update(given, state, mine)
            mine = pureopt.apply_updates(mine, updates)
    want = {k: v.clone() for k, v in params.items()}
    for counter in range(2):
        s = _fmix32(_fmix32(seed) ^ counter)
        offset = 0
        for k in ("a", "b"):
            if given[k] is None:  # (not stepped; its elements still count)
                offset += want[k].numel()
                continue
            total = (want[k].float() - lr * grads[k].float()).reshape(-1)
            pattern = total.view(torch.int32).tolist()
            out = []
            for j, pat in enumerate(pattern):
                r = _fmix32(_fmix32((offset + j) ^ s) ^ ((s * 0x9E37) & 0xFFFFFFFF))
                out.append((((pat & 0xFFFFFFFF) + (r & 0xFFFF)) >> 16) & 0xFFFF)
            offset += total.numel()
            want[k] = torch.tensor(out, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(want[k].shape)
    for k in params:
        assert torch.equal(mine[k].view(torch.int16), want[k].view(torch.int16)), k


@pytest.mark.bitwise
@pytest.mark.parametrize("bits,size", [(4, 9), (8, 16)])
def test_codes_of_other_sizes_round_trip_as_the_reference(bits, size, path):
    # a user's code with fewer than 2**bits values: the codecs must not read past it (the native kernels take only
    # full-size codes; the others keep the torch ops)
    code = [i / (size - 1) * 2 - 1 for i in range(size)]
    enc = BlockEncoding("custom", bits=bits, code=code, block=64)
    x = _data(300, 1, nonneg=False)
    stored = enc.empty(x)
    enc.encode_into(stored, 0, x)
    scales, idx = _reference_encode(x, enc)
    assert torch.equal(stored.scale, scales)
    assert torch.equal(_indices(stored, enc, x.numel()), idx)
    got = enc.decode(stored, 0, x.numel(), torch.float32)
    assert torch.equal(got, _reference_decode(stored, enc, 0, x.numel()))


def test_a_code_that_does_not_fit_its_bits_is_refused():
    with pytest.raises(ValueError, match="4-bit code holds 2 to 16 values, not 17"):
        BlockEncoding("custom", bits=4, code=[i / 16 for i in range(17)], block=64)
    with pytest.raises(ValueError, match="8-bit or 4-bit codes, not 2-bit"):
        BlockEncoding("custom", bits=2, code=[0.0, 1.0], block=64)


@pytest.fixture
def two_threads():
    """Run the kernels with two intra-op threads (torch.set_num_threads; the kernels' OpenMP follows it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _fmix32_tensor(h: torch.Tensor) -> torch.Tensor:
    # _fmix32 on int64 tensors holding 32-bit values (products split in 16-bit halves: no int64 overflow)
    def mul(a: torch.Tensor, c: int) -> torch.Tensor:
        return ((a & 0xFFFF) * c + (((a >> 16) * c & 0xFFFF) << 16)) & 0xFFFFFFFF

    h = h ^ (h >> 16)
    h = mul(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul(h, 0xC2B2AE35)
    return h ^ (h >> 16)


@pytest.mark.bitwise
@pytest.mark.parametrize("name", ["q8", "q8u", "q4", "q4u", "fp8", "fp8_e5m2u"])
def test_codecs_over_several_threads_match_the_reference(name, path, two_threads):
    # chunks of two grains (2**15 elements) or more are split over the threads at block starts: every block is
    # still written by one thread through the same operations, so the bits are the reference's
    enc = NAMED[name]
    assert isinstance(enc, BlockEncoding)
    n, lo = 3 * 2**15 + 777, 5 * enc.block
    x = _data(n, 11, name.endswith("u"))
    stored = enc.empty(torch.zeros(lo + n))
    enc.encode_into(stored, lo, x)
    scales, idx = _reference_encode(x, enc)
    assert torch.equal(stored.scale[lo // enc.block :], scales)
    assert torch.equal(_indices(stored, enc, lo + n)[lo:], idx)
    for a, b in [(lo, lo + n), (lo + 3, lo + n - 5), (1, lo + n)]:
        got = enc.decode(stored, a, b, torch.float32)
        want = _reference_decode(stored, enc, a, b)
        assert torch.equal(got, want), (a, b)


@pytest.mark.bitwise
def test_stochastic_bf16_over_several_threads_follows_the_rule(path, two_threads):
    enc = NAMED["bf16-sr"]
    n, stream, counter, lo, at = 3 * 2**15 + 101, 1, 9, 3, (1 << 32) - 70000
    x = torch.randn(n, generator=torch.Generator().manual_seed(8))
    stored = enc.empty(torch.zeros(lo + n))
    enc.encode_into(stored, lo, x, torch.tensor(counter), stream, at)
    key = (enc.seed * 0x9E3779B1 + stream) & 0xFFFFFFFF
    seed = _fmix32(_fmix32(key) ^ counter)
    mixed = (seed * 0x9E37) & 0xFFFFFFFF
    places = (at + lo + torch.arange(n, dtype=torch.int64)) & 0xFFFFFFFF
    r = _fmix32_tensor(_fmix32_tensor(places ^ seed) ^ mixed)
    pattern = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    want = ((pattern + (r & 0xFFFF)) >> 16) & 0xFFFF
    got = stored[lo:].view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got, want)
