"""Encoded optimizer state (issue 16): codecs against a reference written here, algorithms with quantised state
against their fp32 runs, checkpoints, purity, and stochastic rounding.

The codec reference: each block of ``block`` elements scaled by its absolute maximum, each element stored as the code
value nearest to ``x / absmax`` (brute-force argmin over the code), decoded as ``code * absmax``.
"""

from __future__ import annotations

import copy
import importlib
import io
import itertools
import math
import pkgutil

import pytest
import torch
from _registry import CONFIGS

import pureopt
import pureopt.algorithms
from pureopt.algorithms.define import Algorithm
from pureopt.kernels.encoding import NAMED, BlockEncoding, Quantized, dynamic_code, linear_code, stored_bytes
from pureopt.kernels.rounding import random_bits, stochastic_round


def _reference_roundtrip(x: torch.Tensor, code: list[float], block: int) -> torch.Tensor:
    flat = x.reshape(-1).double()
    out = torch.empty_like(flat)
    table = torch.tensor(code, dtype=torch.float64)
    for lo in range(0, flat.numel(), block):
        part = flat[lo : lo + block]
        absmax = part.abs().max()
        if absmax == 0:
            out[lo : lo + block] = 0
            continue
        normed = part / absmax
        idx = (normed[:, None] - table[None, :]).abs().argmin(dim=1)
        out[lo : lo + block] = table[idx] * absmax
    return out.view_as(x)


@pytest.mark.parametrize("name", ["q8", "q8u", "q4", "q4u"])
def test_block_codes_match_the_reference_and_its_error_bound(name):
    enc = NAMED[name]
    assert isinstance(enc, BlockEncoding) and enc.code is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * enc.block + 37, generator=g)
    if name.endswith("u"):
        x = x.square()
    stored = enc.empty(x)
    enc.encode_into(stored, 0, x)
    got = enc.decode(stored, 0, x.numel(), torch.float64)
    want = _reference_roundtrip(x, list(enc.code), enc.block)
    # float32 scale vs the float64 reference: equal up to the scale's rounding
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    code = sorted(enc.code)
    half_gap = max(b - a for a, b in itertools.pairwise(code)) / 2
    for lo in range(0, x.numel(), enc.block):
        part = x[lo : lo + enc.block].double()
        err = (got[lo : lo + enc.block] - part).abs().max()
        absmax = part.abs().max()
        bound = absmax * max(half_gap, min(abs(c) for c in code if c != 0))  # (zero-free codes: the smallest value)
        assert err <= bound * (1 + 1e-5)  # (+ the float32 scale's rounding)


@pytest.mark.bitwise
@pytest.mark.parametrize("name", ["q8", "q8u", "q4", "q4u"])
def test_table_lookup_finds_the_nearest_code_like_a_binary_search(name):
    # nearest_index replaces the binary search by two table reads; the reference is torch.bucketize against the
    # midpoints (ties to the lower value), on every midpoint, its float32 neighbours and random values of all scales
    from pureopt.kernels.encoding import nearest_index

    code = tuple(NAMED[name].code)
    table = torch.tensor(code, dtype=torch.float32)
    mids = (table[1:] + table[:-1]) / 2
    g = torch.Generator().manual_seed(1)
    spread = (torch.rand(1 << 16, generator=g) * 2 - 1) * torch.logspace(-12, 0, 1 << 16)
    x = torch.cat([
        mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
        table, spread, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]),
    ])  # fmt: skip
    got = nearest_index(x, code)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), torch.bucketize(x, mids))


def test_chunks_never_exceed_the_chunk_width():
    # the step's transient memory is bounded by the chunk: whole small tensors are grouped up to CHUNK_ELEMENTS
    # elements, big ones cut at block multiples (one unsplittable tensor is the only exception)
    from pureopt.algorithms.storage import CHUNK_ELEMENTS, _plan

    w = CHUNK_ELEMENTS
    sizes = [w // 3, w // 3, w // 3, w // 2, 5 * w // 2, 7, w, w + 1, 3 * w]
    splittable = [True] * len(sizes)
    splittable[-1] = False
    chunks = list(_plan(sizes, splittable, 2048, elementwise=True))
    for chunk in chunks:
        width = sum(hi - lo for _, lo, hi, _ in chunk)
        assert width <= w or chunk == [(8, 0, 3 * w, True)]
    covered = sorted((i, lo, hi) for chunk in chunks for i, lo, hi, _ in chunk)
    for i, n in enumerate(sizes):  # every element exactly once, in order
        parts = [(lo, hi) for j, lo, hi in covered if j == i]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] and b[0] % 2048 == 0 for a, b in itertools.pairwise(parts))


def test_slices_at_block_boundaries_decode_as_the_whole():
    enc = NAMED["q4"]
    x = torch.randn(10 * enc.block + 6, generator=torch.Generator().manual_seed(1))
    whole, parts = enc.empty(x), enc.empty(x)
    enc.encode_into(whole, 0, x)
    for lo in range(0, x.numel(), 4 * enc.block):
        enc.encode_into(parts, lo, x[lo : lo + 4 * enc.block])
    assert torch.equal(whole.codes, parts.codes) and torch.equal(whole.scale, parts.scale)
    assert torch.equal(enc.decode(whole, 2 * enc.block, 5 * enc.block + 3, torch.float32),
                       enc.decode(whole, 0, x.numel(), torch.float32)[2 * enc.block : 5 * enc.block + 3])  # fmt: skip


def test_fp8_blocks_scale_the_maximum_to_the_format_top():
    enc = NAMED["fp8"]
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 1e-6  # far below fp8's normal range
    stored = enc.empty(x)
    enc.encode_into(stored, 0, x)
    got = enc.decode(stored, 0, x.numel(), torch.float64)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for every element at least 2**-6 of its block's maximum
    for lo in range(0, x.numel(), enc.block):
        part, dec = x[lo : lo + enc.block].double(), got[lo : lo + enc.block]
        big = part.abs() >= part.abs().max() * 2**-6
        assert ((dec - part).abs()[big] <= part.abs()[big] * 2**-4).all()


def test_codes_have_the_documented_shape():
    for bits in (4, 8):
        for signed in (True, False):
            code = dynamic_code(bits, signed)
            assert len(code) == 2**bits and code == sorted(code) and 0.0 in code and 1.0 in code
            assert (min(code) < 0) == signed
    assert linear_code(4, zero=False)[0] == 1 / 16  # no zero: a second moment never decodes to 0


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
    return params, state


def _problem(n_steps=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(300, 70, generator=g),
        "b": torch.randn(70, generator=g),
        "s": torch.randn(3, generator=g),
    }
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(n_steps)]
    return params, grads


# relative distance to the fp32 run after 20 steps, as a fraction of how far the fp32 run moved
_Q_TOL = {"q8": 0.1, "fp8": 0.25, "q4": 0.5}
_ALGOS = [
    ("adam", lambda sd: pureopt.adam(lr=1e-2, state_dtype=sd)),
    ("adamw", lambda sd: pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=sd)),
    ("lion", lambda sd: pureopt.lion(lr=1e-3, state_dtype=sd)),
    ("rmsprop", lambda sd: pureopt.rmsprop(lr=1e-3, momentum=0.9, state_dtype=sd)),
    ("nadam", lambda sd: pureopt.nadam(lr=1e-2, state_dtype=sd)),
    ("adamax", lambda sd: pureopt.adamax(lr=1e-2, state_dtype=sd)),
]


@pytest.mark.parametrize("spec", list(_Q_TOL))
@pytest.mark.parametrize("name,make", _ALGOS, ids=[a for a, _ in _ALGOS])
def test_quantised_state_tracks_the_fp32_run(name, make, spec):
    params, grads = _problem()
    ref, _ = _run(make(None), params, grads)
    got, state = _run(make(spec), params, grads)
    moved = sum((ref[k] - params[k]).square().sum() for k in params).sqrt()
    dist = sum((got[k] - ref[k]).square().sum() for k in params).sqrt()
    assert dist <= _Q_TOL[spec] * moved, (float(dist), float(moved))
    leaves = [x for x in state if isinstance(x, dict)]
    assert any(isinstance(v, Quantized) for d in leaves for v in d.values())


# every optimizer of the registry, each storage, three donated steps against its float32 run: within this fraction
# of the distance that run moved. Measured maxima: q8 0.065, fp8 0.078 (sign-based Signum both), q4 0.38 (ADOPT),
# bf16 / bf16-sr 0.02 (Signum, Sophia-G). Failures these bounds caught: D-Adapt SGD, DoG and Prodigy with q8 (their
# copies of the parameters quantised: 10-10**4 times off); D-Adapt Adam with q4 (47x) and fp8 (0.55), MARS with q4
# (1.05): second moments stored in signed codes, which decode small values to zero (`nonneg` fields); ASGD (0.98),
# Adadelta (0.61), DoG (17x) and D-Adapt SGD (10**4 x) with a bare torch.bfloat16: the math ran in bf16 on the
# rounded float32 parameters; Adafactor with it (0.11-0.4): its default eps1 became bf16's machine epsilon
_REGISTRY_TOL = {"q8": 0.15, "fp8": 0.15, "q4": 0.5, "bf16": 0.05, "bf16-sr": 0.05}
_REGISTRY_SPEC = {"bf16": torch.bfloat16}  # (the bare dtype: storage only for float32 parameters)


@pytest.mark.parametrize("spec", list(_REGISTRY_TOL))
@pytest.mark.parametrize("name,factory,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_optimizer_with_encoded_state_tracks_its_float32_run(name, factory, kw, spec):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 64, generator=g), torch.randn(64, generator=g), torch.randn(32, 64, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) * 1e-2 for p in params] for _ in range(3)]
    try:
        tx = factory(**kw, state_dtype=_REGISTRY_SPEC.get(spec, spec))
    except ValueError as e:  # (factors not shaped like the parameters: refused by name)
        assert "is not shaped like its parameter" in str(e), e
        return

    def run(tx):
        mine = [p.clone() for p in params]
        state = tx.init(mine)
        for gs in grads:
            state = pureopt.inplace_step(tx, gs, state, mine)
        return mine

    ref, got = run(factory(**kw)), run(tx)
    moved = sum((r - p).square().sum() for r, p in zip(ref, params)).sqrt()
    dist = sum((a - r).square().sum() for a, r in zip(got, ref)).sqrt()
    assert dist <= _REGISTRY_TOL[spec] * moved, (float(dist), float(moved))


def _algorithms() -> dict[type, Algorithm]:
    """Every Algorithm of pureopt.algorithms, by its state record type."""
    found = {}
    for info in pkgutil.iter_modules(pureopt.algorithms.__path__):
        for value in vars(importlib.import_module(f"pureopt.algorithms.{info.name}")).values():
            if isinstance(value, Algorithm):
                found[value.state] = value
    return found


def _records(state, types):
    if type(state) in types:
        yield state
    elif isinstance(state, tuple):
        for x in state:
            yield from _records(x, types)


# fields never negative in the float32 runs that may still be: Sophia's Hessian estimates (Hutchinson's are signed)
_SIGNED_BY_DESIGN = {("SophiaG", "hessian")}


@pytest.mark.parametrize("name,factory,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fields_declared_nonneg_are_exactly_those_never_negative(name, factory, kw):
    # q8 / q4 / fp8 store `nonneg` fields in codes without zero (a second moment decoding to 0 under a nonzero first
    # moment makes a step of m / eps); 22 fields of 18 optimizers were undeclared: signed codes
    algorithms = _algorithms()
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(64, 64, generator=g), torch.randn(64, generator=g)]
    tx = factory(**kw)
    state = tx.init(params)
    seen: dict[tuple[str, str], bool] = {}
    for i in range(6):  # (gradients of two scales: sums and averages of squares stay >= 0 either way)
        grads = [torch.randn(p.shape, generator=g) * (1e-2 if i % 2 else 1.0) for p in params]
        state = pureopt.inplace_step(tx, grads, state, params)
        for record in _records(state, algorithms):
            algorithm = algorithms[type(record)]
            for key, field in algorithm.fields.items():
                values = getattr(record, key)
                if field.per_tensor or not field.like_param or field.copies_param or not values:
                    continue
                negative = any(bool((v < 0).any()) for v in values)
                seen[(algorithm.name, key)] = seen.get((algorithm.name, key), False) or negative
    by_name = {a.name: a for a in algorithms.values()}
    for (algorithm_name, key), negative in seen.items():
        declared = by_name[algorithm_name].fields[key].nonneg
        if (algorithm_name, key) in _SIGNED_BY_DESIGN:
            assert not declared
            continue
        assert declared == (not negative), (algorithm_name, key, "negative" if negative else "never negative")


# learning-rate-free estimates with 8-bit state over 20 steps of a quadratic, where d grows from d0 (the registry's
# random gradients leave it at d0): their sums run chunk by chunk over the decoded state first (Algorithm(reduce=)),
# then the step; d within 3% of the float32 run's (measured 2.6% / 0.06%), the parameters within this fraction of
# the distance that run moved (measured 0.34 / 0.12: d of 2.3 at lr 1 oscillates, and the 8-bit moments move it)
_ESTIMATES = [("dadapt_adam", pureopt.dadapt_adam, 0.5), ("prodigy", pureopt.prodigy, 0.2)]


@pytest.mark.parametrize("name,factory,tol", _ESTIMATES, ids=[e[0] for e in _ESTIMATES])
def test_learning_rate_free_estimates_with_8bit_state_track_the_float32_run(name, factory, tol):
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 70), (70,), (3,)]
    target = [torch.randn(s, generator=g) for s in shapes]

    def run(state_dtype):
        tx = factory(lr=1.0, state_dtype=state_dtype)
        params = [torch.zeros(s) for s in shapes]
        state = tx.init(params)
        for _ in range(20):  # (the gradient of 0.5 |p - target|^2)
            state = pureopt.inplace_step(tx, [p - t for p, t in zip(params, target)], state, params)
        return params, float(state.d)

    (ref, d_ref), (got, d_got) = run(None), run("q8")
    assert d_ref > 100 * 1e-6 and abs(d_got - d_ref) <= 0.03 * d_ref, (d_got, d_ref)
    moved = sum(r.square().sum() for r in ref).sqrt()
    assert sum((a - b).square().sum() for a, b in zip(got, ref)).sqrt() <= tol * moved


def test_block_encodings_of_fields_holding_parameter_values_are_refused():
    # "q8" for all fields keeps schedule-free's z in float32; naming it is refused, a float dtype is not
    state = pureopt.schedule_free_adamw(state_dtype="q8").init([torch.ones(64)])
    assert state.z[0].dtype == torch.float32 and isinstance(state.exp_avg_sq[0], Quantized)
    with pytest.raises(ValueError, match="ScheduleFree's z holds parameter values"):
        pureopt.schedule_free_adamw(state_dtype={"z": "q8"})
    pureopt.schedule_free_adamw(state_dtype={"z": torch.bfloat16})


def test_state_bytes_per_parameter():
    params = {"w": torch.zeros(1024, 1024)}
    for spec, limit in (("q8", 2.1), ("q4", 1.1), (None, 8.0)):
        state = pureopt.adamw(lr=1e-3, state_dtype=spec).init(params)
        total = sum(stored_bytes(v) for field in (state.exp_avg, state.exp_avg_sq) for v in field.values())
        assert total / params["w"].numel() <= limit


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", ["q8", "q4", {"exp_avg": torch.bfloat16, "exp_avg_sq": "q8"}])
def test_pure_update_leaves_inputs_unchanged_and_equals_the_donated_step(spec):
    params, grads = _problem(n_steps=3)
    tx = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec)
    state = tx.init(params)
    pure_p, pure_s = params, state
    own_p = {k: v.clone() for k, v in params.items()}
    own_s = tx.init(own_p)
    for g in grads:
        snapshot = [t.clone() for t in pureopt.tree.leaves((pure_p, pure_s, g))]
        updates, new_s = tx.update(g, pure_s, pure_p)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, pureopt.tree.leaves((pure_p, pure_s, g))))
        pure_p, pure_s = pureopt.apply_updates(pure_p, updates), new_s
        own_s = pureopt.inplace_step(tx, g, own_s, own_p)
    # The same math: where the step is chunked, the donated one runs torch's fused AdamW on the parameters and the
    # pure one adds the same kernel's update to them (on the CPU both take the one-pass kernel, which writes p + u
    # either way): the parameters agree to rounding (AdamW's decay is decoupled, so the moments never read them),
    # the encoded state bitwise.
    for k in params:
        torch.testing.assert_close(own_p[k], pure_p[k], rtol=2.4e-7, atol=2e-6)  # (an ulp of ~8)
    for mine, theirs in zip(pureopt.tree.leaves(own_s), pureopt.tree.leaves(pure_s)):
        assert torch.equal(mine, theirs)


@pytest.mark.bitwise
def test_checkpoint_of_encoded_state_resumes_bitwise():
    params, grads = _problem(n_steps=10)
    tx = pureopt.adam(lr=1e-2, state_dtype="q8")
    p_ref, _ = _run(tx, params, grads)  # uninterrupted
    p_half, s_half = _run(tx, params, grads[:5])
    buf = io.BytesIO()
    torch.save((p_half, s_half), buf)
    buf.seek(0)
    p_loaded, s_loaded = torch.load(buf, weights_only=False)
    for g in grads[5:]:
        u, s_loaded = tx.update(g, s_loaded, p_loaded)
        p_loaded = pureopt.apply_updates(p_loaded, u)
    assert all(torch.equal(p_ref[k], p_loaded[k]) for k in params)


def test_bad_state_dtype_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="not a state field here"):
        pureopt.adam(lr=1e-3, state_dtype={"exp_avg_squared": "q8"})
    with pytest.raises(ValueError, match="unknown encoding"):
        pureopt.adam(lr=1e-3, state_dtype="q3")
    tx = pureopt.adam(lr=1e-3, state_dtype="q8")
    p = {"z": torch.zeros(4, dtype=torch.complex64)}
    with pytest.raises(ValueError, match="complex"):
        tx.update({"z": torch.ones(4, dtype=torch.complex64)}, tx.init({"z": torch.zeros(4)}), p)


# --- stochastic rounding --------------------------------------------------------------------------------------------


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    down = x.to(torch.bfloat16)
    low = torch.where(down.float() > x, torch.nextafter(down, torch.tensor(-math.inf, dtype=torch.bfloat16)), down)
    return low.float(), torch.nextafter(low, torch.tensor(math.inf, dtype=torch.bfloat16)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    x = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 3
    n = 4000
    total = torch.zeros(64, dtype=torch.float64)
    for c in range(n):
        bits = random_bits(torch.tensor(7), torch.tensor(c), 0, x.numel(), x.device)
        r = stochastic_round(x, dtype, bits)
        if dtype == torch.bfloat16:
            low, high = _bf16_neighbours(x)
            assert ((r.float() == low) | (r.float() == high)).all()
        total += r.double()
    mean = total / n
    gap = (torch.nextafter(x.to(dtype), torch.tensor(math.inf, dtype=dtype)).float() - x.to(dtype).float()).abs()
    # a Bernoulli mean over n draws: within 5 standard deviations (gap / 2 / sqrt(n)) of x
    assert ((mean - x.double()).abs() <= 5 * gap.double() / 2 / math.sqrt(n) + 1e-12).all()


def test_random_bits_are_reproducible_and_keyed():
    a = random_bits(torch.tensor(1), torch.tensor(5), 100, 1000, torch.device("cpu"))
    b = random_bits(torch.tensor(1), torch.tensor(5), 100, 1000, torch.device("cpu"))
    c = random_bits(torch.tensor(2), torch.tensor(5), 100, 1000, torch.device("cpu"))
    d = random_bits(torch.tensor(1), torch.tensor(6), 100, 1000, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert a.min() >= 0 and a.max() < 2**32
    low16 = (a & 0xFFFF).double() / 2**16
    assert abs(low16.mean().item() - 0.5) < 0.05  # uniform-ish
    state = torch.random.get_rng_state()
    random_bits(torch.tensor(1), torch.tensor(5), 0, 10, torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG consumed


def _sgd_on_bf16(tx, steps=1500):
    g = torch.Generator().manual_seed(4)
    target = torch.randn(256, generator=g)
    params = {"w": torch.full((256,), 4.0, dtype=torch.bfloat16)}
    state = tx.init(params)
    for _ in range(steps):
        grads = {"w": (params["w"].float() - target)}
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
    return float((params["w"].float() - target).square().mean())


def test_stochastic_rounding_trains_where_round_to_nearest_stalls():
    # closed form in fp32: w_t - target = (4 - target) * (1 - lr)**t: after 3000 steps of lr=1e-3, exp(-3) of the
    # start; each bf16 update (lr * |w - target| < 0.008 while w <= 4) is below half a bf16 gap at 4 (0.0156)
    inner = lambda: pureopt.sgd(lr=1e-3, impl="foreach")
    stalled = _sgd_on_bf16(inner(), steps=3000)
    rounded = _sgd_on_bf16(pureopt.stochastic_rounding(inner(), seed=0), steps=3000)
    target = torch.randn(256, generator=torch.Generator().manual_seed(4))
    start = float((4.0 - target).square().mean())
    closed_form = start * (1 - 1e-3) ** (2 * 3000)
    assert stalled > 0.9 * start  # round-to-nearest never moves
    assert rounded < 2 * closed_form


def test_stochastic_rounding_same_seed_same_bits_and_compiles():
    params = {"w": torch.randn(100).to(torch.bfloat16)}
    grads = {"w": torch.randn(100)}
    tx = pureopt.stochastic_rounding(pureopt.sgd(lr=1e-2, impl="foreach"), seed=3)
    u1, _ = tx.update(grads, tx.init(params), params)
    u2, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(u1["w"], u2["w"])
    new = pureopt.apply_updates(params, u1)["w"].float()
    inner = pureopt.sgd(lr=1e-2, impl="foreach")
    plain = inner.update(grads, inner.init(params), params)[0]["w"]
    low, high = _bf16_neighbours(params["w"].float() + plain.float())
    assert ((new == low) | (new == high)).all()
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), fullgraph=True)
    u3, _ = compiled(grads, tx.init(params), params)
    assert torch.equal(u1["w"], u3["w"])
    # the donated step writes the same bits into the parameters
    own = {"w": params["w"].clone()}
    pureopt.inplace_step(tx, grads, tx.init(own), own)
    assert torch.equal(own["w"], new.to(torch.bfloat16))


def test_stochastic_rounding_under_vmap_matches_per_member():
    params = {"w": torch.randn(3, 50).to(torch.bfloat16)}
    grads = {"w": torch.randn(3, 50)}
    tx = pureopt.stochastic_rounding(pureopt.sgd(lr=1e-2, impl="loop"), seed=5)

    def one(g, p):
        return tx.update({"w": g}, tx.init({"w": p}), {"w": p})[0]["w"]

    batched = torch.func.vmap(one)(grads["w"], params["w"])
    for i in range(3):
        assert torch.equal(batched[i], one(grads["w"][i], params["w"][i]))


@pytest.mark.bitwise
def test_torch_optimizer_saves_encoded_state_under_its_own_keys_and_resumes_bitwise():
    torch.manual_seed(0)
    make = lambda m: pureopt.TorchOptimizer(m.parameters(), pureopt.adamw, lr=1e-2, state_dtype={"exp_avg": "q8"})
    data = [torch.randn(8, 30) for _ in range(6)]

    def steps(model, opt, batch):
        for x in batch:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    ref = torch.nn.Linear(30, 20)
    first = torch.nn.Linear(30, 20)
    first.load_state_dict(ref.state_dict())
    ref_opt, first_opt = make(ref), make(first)
    steps(ref, ref_opt, data)  # uninterrupted
    steps(first, first_opt, data[:3])
    saved = first_opt.state_dict()
    assert set(saved["state"][0]) == {"step", "exp_avg.codes", "exp_avg.scale", "exp_avg_sq"}
    assert saved["state"][0]["exp_avg.codes"].dtype == torch.uint8
    buf = io.BytesIO()
    torch.save((first.state_dict(), saved), buf)
    buf.seek(0)
    model_sd, opt_sd = torch.load(buf, weights_only=True)
    resumed = torch.nn.Linear(30, 20)
    resumed.load_state_dict(model_sd)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(opt_sd)
    steps(resumed, resumed_opt, data[3:])
    assert torch.equal(resumed.weight, ref.weight) and torch.equal(resumed.bias, ref.bias)


def test_bf16_state_with_stochastic_rounding_follows_the_closed_form_where_nearest_stalls():
    # SGD momentum with a constant gradient: buf_t = g * (1 - mu**t) / (1 - mu) (torch's rule: buf_1 = g). In bf16
    # with round-to-nearest, buf stops growing once g - (1 - mu) * buf is below half a bf16 gap (about buf / 512),
    # near 340 g; written with stochastic rounding its mean over 4096 elements follows the closed form (each
    # element's spread ~2.5%, so the mean's ~0.04%; asserted within 1%), reproducibly for a seed.
    mu, steps, g0 = 0.999, 2000, 1e-3
    want = g0 * (1 - mu**steps) / (1 - mu)
    grads = [torch.full((4096,), g0)]
    out = {}
    for spec in ("bf16", "bf16-sr", pureopt.kernels.encoding.FloatEncoding(torch.bfloat16, stochastic=True, seed=7)):
        params = [torch.zeros(4096)]
        tx = pureopt.sgd(lr=1e-9, momentum=mu, state_dtype={"momentum_buffer": spec})
        state = tx.init(params)
        for _ in range(steps):
            state = pureopt.inplace_step(tx, grads, state, params)
        buf = state.momentum_buffer[0]
        assert buf.dtype == torch.bfloat16
        out[getattr(spec, "name", spec) if not isinstance(spec, str) else spec] = buf
    assert out["bf16"].float().mean() < 0.5 * want  # nearest: stalled
    for key in ("bf16-sr", "bfloat16-sr"):
        assert abs(out[key].float().mean().item() - want) < 0.01 * want
    assert not torch.equal(out["bf16-sr"], out["bfloat16-sr"])  # another seed, other bits


@pytest.mark.bitwise
def test_stochastically_rounded_state_is_reproducible_and_lands_on_a_neighbour():
    # the same seed and step give the same bits; every stored value is one of the two bf16 neighbours of the
    # float32 value written (the encoder's input, recomputed here from the float32 run's rule)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5000, generator=g) * 1e-3, torch.randn(70, 30, generator=g)]
    runs = []
    for _ in range(2):
        params = [torch.zeros(5000), torch.zeros(70, 30)]
        tx = pureopt.sgd(lr=0.1, momentum=0.9, state_dtype="bf16-sr")
        state = tx.init(params)
        first = pureopt.inplace_step(tx, grads, state, params)
        before = [b.float() for b in first.momentum_buffer]
        second = pureopt.inplace_step(tx, grads, first, params)
        for b0, b1, gr in zip(before, second.momentum_buffer, grads):
            exact = 0.9 * b0 + gr  # float32, as the chunked math computes it
            down = exact.to(torch.bfloat16)
            lower = torch.where(
                down.float() > exact, torch.nextafter(down, torch.tensor(-math.inf, dtype=down.dtype)), down
            )
            upper = torch.nextafter(lower, torch.tensor(math.inf, dtype=lower.dtype))
            assert bool(((b1 == lower) | (b1 == upper)).all())
        runs.append([b.clone() for b in second.momentum_buffer])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("spec", ["q8", "q4"])
def test_encoded_state_compiles_with_inductor_without_recompiles(spec):
    # the pure step with encoded state traced whole (fullgraph) and compiled by inductor, lr a 0-d tensor changed
    # every step: no recompiles; the parameters track torch.optim.AdamW's fp32 run as closely as the eager encoded
    # step does (the quantisation error dominates; inductor's fused math differs from eager by an ulp, which can
    # move a value across a code midpoint, so the two are compared against the reference, not bitwise)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(64, 40, generator=g), torch.randn(300, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    lr = torch.tensor(1e-2)
    tx = pureopt.adamw(lr=lr, weight_decay=0.1, state_dtype=spec)

    def step(gr, s, p):
        u, s = tx.update(gr, s, p)
        return pureopt.apply_updates(p, u), s

    torch._dynamo.reset()  # (another parametrisation compiled the same code object)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    pc, sc = params, tx.init(params)
    pe, se = params, tx.init(params)
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t, gr in enumerate(grads):
            lr.fill_(1e-2 * (1 - 0.2 * t))
            opt.param_groups[0]["lr"] = 1e-2 * (1 - 0.2 * t)
            pc, sc = compiled(gr, sc, pc)
            pe, se = step(gr, se, pe)
            for r, gg in zip(ref, gr):
                r.grad = gg
            opt.step()
    moved = max((r.detach() - p).abs().max() for r, p in zip(ref, params))
    err_eager = max((a - r.detach()).abs().max() for a, r in zip(pe, ref))
    err_compiled = max((a - r.detach()).abs().max() for a, r in zip(pc, ref))
    assert err_compiled <= _Q_TOL[spec] * moved
    assert err_compiled <= 1.5 * err_eager + 1e-6
    assert isinstance(sc.exp_avg[0], Quantized) and sc.exp_avg[0].codes.dtype == torch.uint8


@pytest.mark.bitwise
@pytest.mark.parametrize("save_flat,load_flat", [(True, True), (True, False), (False, True)])
def test_flat_torch_optimizer_with_encoded_state_checkpoints_across_layouts(save_flat, load_flat):
    # TorchOptimizer(flat=True) with q8 state: it tracks torch.optim.AdamW's fp32 run within the quantisation
    # bound, and its checkpoint (per-parameter codes and scales) resumes bitwise the uninterrupted run, also into
    # the other layout
    torch.manual_seed(0)
    data = [torch.randn(8, 30) for _ in range(6)]

    def make(m, flat):
        return pureopt.TorchOptimizer(m.parameters(), pureopt.adamw, lr=1e-2, state_dtype="q8", flat=flat)

    def steps(model, opt, batch):
        for x in batch:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    init = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 3))
    clone = lambda: copy.deepcopy(init)
    ref, torch_ref, first = clone(), clone(), clone()
    steps(ref, make(ref, load_flat), data)  # uninterrupted, in the layout that resumes
    steps(torch_ref, torch.optim.AdamW(torch_ref.parameters(), lr=1e-2), data)
    moved = max((a - b).abs().max() for a, b in zip(torch_ref.parameters(), init.parameters()))
    err = max((a - b).abs().max() for a, b in zip(ref.parameters(), torch_ref.parameters()))
    assert err <= _Q_TOL["q8"] * moved
    first_opt = make(first, save_flat)
    steps(first, first_opt, data[:3])
    saved = first_opt.state_dict()
    assert saved["state"][0]["exp_avg.codes"].dtype == torch.uint8
    resumed = copy.deepcopy(first)
    resumed_opt = make(resumed, load_flat)
    resumed_opt.load_state_dict(saved)
    steps(resumed, resumed_opt, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), ref.parameters()))


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", ["q8", "q4", "fp8", "bf16-sr"])
def test_encoded_state_under_vmap_steps_each_member_as_alone(spec):
    # an ensemble of K models with encoded state, init and update vmapped: each member's updates track its own
    # torch.optim.AdamW fp32 run within the quantisation bound, and equal the member stepped alone (the codecs take
    # their functional forms under vmap; same ops per element as the foreach math, so bitwise; the eager default runs
    # torch's fused kernel on each chunk instead, which rounds differently)
    k_members, steps = 3, 3
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(k_members, 40, 30, generator=g), torch.randn(k_members, 300, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]
    tx = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec)
    step = torch.func.vmap(lambda gr, s, p: pureopt.step(tx, gr, s, p))
    mine, state = params, torch.func.vmap(tx.init)(params)
    for gr in grads:
        mine, state = step(gr, state, mine)
    alone_tx = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec, impl="foreach")
    for k in range(k_members):
        alone = [p[k] for p in params]
        s = alone_tx.init(alone)
        ref = [p[k].clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
        for gr in grads:
            alone, s = pureopt.step(alone_tx, [x[k] for x in gr], s, alone)
            for r, x in zip(ref, gr):
                r.grad = x[k]
            opt.step()
        assert all(torch.equal(m[k], a) for m, a in zip(mine, alone))
        moved = max((r.detach() - p[k]).abs().max() for r, p in zip(ref, params))
        err = max((m[k] - r.detach()).abs().max() for m, r in zip(mine, ref))
        assert err <= _Q_TOL.get(spec, 0.1) * moved
