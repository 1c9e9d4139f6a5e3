"""The one-pass kernel (pureopt/kernels/onepass.py): an algorithm's math traced into one native loop per tensor.

References: torch's own CPU kernels for every traced op (the generated code writes each op as the IEEE operations
torch's AVX2 kernels use: bitwise equal, except ``sqrt``, where torch's CPU kernel (MKL's vector math) is within an ulp
of the correctly rounded square root the kernel takes); and, for whole algorithms, the torch-op path (``impl=
"foreach"``: the same math through ``torch._foreach_*`` calls, chunk by chunk) from the same inputs, within a few
ulps (float32 state) or within the codes' rounding (8-bit / 4-bit / fp8 state).
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import pureopt
from pureopt.kernels import native, onepass
from pureopt.kernels.encoding import Quantized

pytestmark = pytest.mark.skipif(
    native._kernel() is None, reason="native kernels unavailable here (no C++ toolchain, or PUREOPT_NATIVE=0)"
)

_VECTOR = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture(params=[pytest.param("avx2", marks=pytest.mark.skipif(not _VECTOR, reason="no AVX2")), "portable"])
def loop(request, monkeypatch):
    """Run the kernel's AVX2 loop or its portable one."""
    flag = 0 if request.param == "avx2" else 16
    monkeypatch.setattr(native, "_vector_flag", lambda: flag)
    return request.param


@pytest.fixture
def kernels(monkeypatch):
    """Counts the one-pass kernels the step builds or looks up (a step that fell back to the chunked path: 0)."""
    calls: list[str] = []
    built = onepass._kernel

    def counted(source: str):
        calls.append(source)
        return built(source)

    monkeypatch.setattr(onepass, "_kernel", counted)
    return calls


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-6, 3, (n,), generator=g)
    x[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-42, -3e-41, 1.0])
    return x


# one math per op, as an algorithm writes it (foreach calls on one-element lists), and the torch call it must equal
_OPS = {
    "mul": (lambda k: torch._foreach_mul(k.f, 0.37), lambda x, y: x * 0.37),
    "div": (lambda k: torch._foreach_div(k.f, 0.0447101779), lambda x, y: x / 0.0447101779),
    "add_scalar": (lambda k: torch._foreach_add(k.f, 1e-8), lambda x, y: x + 1e-8),
    "add_alpha": (lambda k: torch._foreach_add(k.f, k.g, alpha=-1e-5), lambda x, y: torch.add(x, y, alpha=-1e-5)),
    "sub": (lambda k: torch._foreach_sub(k.f, k.g), lambda x, y: x - y),
    "mul_list": (lambda k: torch._foreach_mul(k.f, k.g), lambda x, y: x * y),
    "div_list": (lambda k: torch._foreach_div(k.f, k.g), lambda x, y: x / y),
    "lerp_small": (lambda k: torch._foreach_lerp(k.f, k.g, 0.1), lambda x, y: torch.lerp(x, y, 0.1)),
    "lerp_large": (lambda k: torch._foreach_lerp(k.f, k.g, 0.75), lambda x, y: torch.lerp(x, y, 0.75)),
    "addcmul": (
        lambda k: torch._foreach_addcmul(k.f, k.g, k.g, value=0.3),
        lambda x, y: torch.addcmul(x, y, y, value=0.3),
    ),
    "addcdiv": (
        lambda k: torch._foreach_addcdiv(k.f, k.g, k.f, value=0.3),
        lambda x, y: torch.addcdiv(x, y, x, value=0.3),
    ),
    "maximum": (lambda k: torch._foreach_maximum(k.f, k.g), lambda x, y: torch.maximum(x, y)),
    "clamp_min": (lambda k: torch._foreach_clamp_min(k.f, 0.5), lambda x, y: x.clamp_min(0.5)),
    "clamp_max": (lambda k: torch._foreach_clamp_max(k.f, -0.5), lambda x, y: x.clamp_max(-0.5)),
    "neg": (lambda k: torch._foreach_neg(k.f), lambda x, y: -x),
    "abs": (lambda k: torch._foreach_abs(k.f), lambda x, y: x.abs()),
    "sign": (lambda k: torch._foreach_sign(k.f), lambda x, y: x.sign()),
    "reciprocal": (lambda k: torch._foreach_reciprocal(k.f), lambda x, y: x.reciprocal()),
    "pow2": (lambda k: torch._foreach_pow(k.f, 2.0), lambda x, y: x.pow(2.0)),
    "pow3": (lambda k: torch._foreach_pow(k.f, 3), lambda x, y: x.pow(3)),
    "sqrt": (lambda k: torch._foreach_sqrt(k.f), lambda x, y: x.sqrt()),
    "pow_half": (lambda k: torch._foreach_pow(k.f, 0.5), lambda x, y: x.pow(0.5)),
    "rsqrt": (lambda k: torch._foreach_pow(k.f, -0.5), lambda x, y: x.pow(-0.5)),
}
_SQRT = ("sqrt", "pow_half", "rsqrt")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 steps (same-signed finite values)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.bitwise
@pytest.mark.skipif(not _VECTOR, reason="torch's kernels fuse multiply-adds on AVX2 / AVX-512 only")
@pytest.mark.parametrize("op", list(_OPS))
def test_each_traced_op_computes_as_torch(op, loop, kernels):
    math, reference = _OPS[op]
    n = 1003  # (the vector loop and the one-by-one rest)
    x, y = _values(n, 1), _values(n, 2)
    if op in _SQRT:
        x = x.abs()
    got = onepass.run(
        lambda k: (math(k), {}), types.SimpleNamespace, None, [y.clone()], {"f": [x.clone()]}, {},
        {}, donate=True, apply=False,
    )  # fmt: skip
    assert got is not None and len(kernels) == 1
    out, want = got[0][0], reference(x, y)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    if op in _SQRT:  # (torch's CPU sqrt: within an ulp of the correctly rounded one)
        assert int(_ulps(out[~nan], want[~nan]).max()) <= 1
        exact = x.double().sqrt().float() if op != "rsqrt" else (1 / x.double().sqrt().float())
        assert torch.equal(out[~nan], exact[~nan])
    else:
        assert torch.equal(out[~nan], want[~nan])


def _algorithms() -> list[tuple[str, dict]]:
    cases = [
        ("adam", {"lr": 1e-2}), ("adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
        ("adam", {"lr": 1e-2, "maximize": True}), ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
        ("adamw", {"lr": torch.tensor(1e-2), "weight_decay": 0.1}), ("scale_by_adam", {}),
        ("adamax", {"lr": 1e-2}), ("nadam", {"lr": 1e-2}), ("radam", {"lr": 1e-2}), ("lion", {"lr": 1e-3}),
        ("rmsprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}), ("adagrad", {"lr": 1e-2}),
        ("adadelta", {"lr": 1.0}), ("adabelief", {"lr": 1e-2}), ("adan", {"lr": 1e-2}), ("ademamix", {"lr": 1e-2}),
        ("adopt", {"lr": 1e-2}), ("laprop", {"lr": 1e-2}), ("yogi", {"lr": 1e-2}), ("signum", {"lr": 1e-2}),
        ("asgd", {"lr": 1e-2}), ("sgd", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ]  # fmt: skip
    return cases


def _fields(make) -> list[str]:
    params = {"w": torch.zeros(3, 5)}
    state = make(None).init(params)
    return [
        name
        for name in state._fields
        if isinstance(getattr(state, name), dict)
        and all(isinstance(v, torch.Tensor) and v.shape == (3, 5) for v in getattr(state, name).values())
    ]


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(97, 70, generator=g),
        "b": torch.randn(70, generator=g),
        "s": torch.randn(3, generator=g),
    }
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(3)]
    return params, grads


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within a few ulps: torch's sqrt is within an ulp of the kernel's correctly rounded one, which can move what
    follows by an ulp or two, of the values or (where ``p + u`` cancels) of the tensor's largest magnitude."""
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()) + 1e-30)


def _copy(tree):
    return pureopt.tree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


@pytest.mark.parametrize("name,kwargs", _algorithms(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_algorithms())])
def test_traced_algorithms_step_as_the_torch_op_path(name, kwargs, kernels):
    # float32 state kept as an encoding (so that the step takes the encoded path), stepped from the same inputs
    fn = getattr(pureopt, name)
    keys = _fields(lambda sd: fn(state_dtype=sd, **kwargs))
    spec = dict.fromkeys(keys, torch.float32)
    mine, ref = fn(state_dtype=spec, **kwargs), fn(state_dtype=spec, impl="foreach", **kwargs)
    params, grads = _problem()
    state = mine.init(params)
    for g in grads:
        steps = [pureopt.step(tx, g, _copy(state), _copy(params), donate=("params", "state")) for tx in (mine, ref)]
        (p1, s1), (p2, s2) = steps
        for a, b in zip(pureopt.tree.leaves((p1, s1)), pureopt.tree.leaves((p2, s2))):
            _close(a, b)
        params, state = p2, s2
    assert len(kernels) == len(grads), "the step did not take the one-pass kernel"


@pytest.mark.parametrize(
    "spec", ["q8", "q4", "fp8", "bf16", "bf16-sr", {"exp_avg": "q8", "exp_avg_sq": torch.float32}], ids=str
)
def test_encoded_adamw_steps_as_the_torch_op_path_within_the_codes(spec, kernels):
    params, grads = _problem(1)
    mine = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec)
    ref = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec, impl="foreach")
    state = mine.init(params)
    for g in grads:
        (p1, s1), (p2, s2) = [
            pureopt.step(tx, g, _copy(state), _copy(params), donate=("params", "state")) for tx in (mine, ref)
        ]
        _within_the_codes(p1, s1, p2, s2, spec)
        params, state = p2, s2
    assert len(kernels) == len(grads)


def _within_the_codes(p1, s1, p2, s2, spec) -> None:
    """AdamW's parameters within a few ulps and its fields within their encoding's rounding of each other."""
    for k in p2:
        _close(p1[k], p2[k])
    for field in ("exp_avg", "exp_avg_sq"):
        for k in p2:
            a, b = getattr(s1, field)[k], getattr(s2, field)[k]
            if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16:
                # (equal but where the float32 value, an ulp apart, rounds to the neighbouring bfloat16)
                assert int(_ulps(a.float(), b.float()).max()) <= 1 << 16
                assert int((a != b).sum()) <= max(2, a.numel() // 1000)
                continue
            if not isinstance(a, Quantized):
                _close(a, b)
                continue
            # same scales to the ulp; codes equal but where a value sat on a midpoint within that ulp: one step
            torch.testing.assert_close(a.scale, b.scale, rtol=1e-6, atol=0)
            ca, cb = a.codes.view(torch.uint8).long(), b.codes.view(torch.uint8).long()
            if isinstance(spec, str) and spec == "q4":
                ca, cb = torch.stack((ca & 15, ca >> 4)), torch.stack((cb & 15, cb >> 4))
            assert int((ca - cb).abs().max()) <= 1
            assert int((ca != cb).sum()) <= max(2, ca.numel() // 1000)


def _compiled(step):
    """``torch.compile(step, fullgraph=True)`` with inductor, and the names of the ops dynamo's graphs call."""
    from torch._inductor.compile_fx import compile_fx

    called: list[str] = []

    def backend(gm, example_inputs):
        called.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(step, fullgraph=True, backend=backend), called


@pytest.mark.parametrize("spec,lr", [("q8", "tensor"), ("q8", "schedule"), ("q8", "number schedule"),
                                     ("q4", "tensor"), ("fp8", "tensor"), ("bf16-sr", "tensor")])  # fmt: skip
def test_compiled_donated_encoded_step_is_one_opaque_op_stepping_as_the_torch_op_path(spec, lr, kernels):
    # under torch.compile (inductor, fullgraph) the donated step is one opaque op (pureopt::inplace_step) running
    # the one-pass kernel, not the chunked codec ops; a learning rate changed in place between steps (or a schedule)
    # reaches it without recompiles; each step from the same inputs as the torch-op path's, within the codes
    params, grads = _problem(4)
    rate = torch.tensor(1e-2)
    # (a schedule of the count gives a tensor; one that ignores it, a Python number, which travels as a float64)
    schedules = {"schedule": lambda count: 1e-2 / (1.0 + count), "number schedule": lambda count: 3e-3}
    lr_arg = rate if lr == "tensor" else schedules[lr]
    mine = pureopt.adamw(lr=lr_arg, weight_decay=0.1, state_dtype=spec)
    ref = pureopt.adamw(lr=lr_arg, weight_decay=0.1, state_dtype=spec, impl="foreach")
    compiled, called = _compiled(lambda g, s, p: pureopt.step(mine, g, s, p, donate=("params", "state")))
    state = mine.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, g in enumerate(grads):
            rate.fill_(1e-2 * (i + 1))
            p1, s1 = compiled(g, _copy(state), _copy(params))
            p2, s2 = pureopt.step(ref, g, _copy(state), _copy(params), donate=("params", "state"))
            _within_the_codes(p1, s1, p2, s2, spec)
            params, state = p2, s2
    assert [name for name in called if name.startswith("pureopt.")] == ["pureopt.inplace_step"], called
    assert len(kernels) == len(grads), "the op did not take the one-pass kernel"


@pytest.mark.parametrize("spec", ["q8", "bf16-sr"])
def test_compiled_pure_encoded_step_is_one_op_returning_new_state(spec, kernels):
    # the pure step, compiled: one opaque op (pureopt::step) that runs the eager pure step and returns the updates
    # and the new state; nothing passed in changes; each step within the codes of the torch-op path's
    params, grads = _problem(5)
    mine = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec)
    ref = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec, impl="foreach")
    compiled, called = _compiled(lambda g, s, p: pureopt.step(mine, g, s, p))
    state = mine.init(params)
    for g in grads:
        before = (_copy(params), _copy(state))
        p1, s1 = compiled(g, state, params)
        same = pureopt.tree.tree_map(lambda a, b: torch.equal(a, b), (params, state), before)
        assert all(pureopt.tree.flatten(same)[0]), "the pure step wrote its inputs"
        p2, s2 = pureopt.step(ref, g, _copy(state), _copy(params))
        _within_the_codes(p1, s1, p2, s2, spec)
        params, state = p2, s2
    assert [name for name in called if name.startswith("pureopt.")] == ["pureopt.step"], called
    assert len(kernels) == len(grads)


def test_compiled_step_of_a_transformation_built_while_tracing_takes_the_traced_chunks():
    # inject_hyperparams builds its inner transformation inside the traced update: no opaque step is registered
    # there (its key is a hash dynamo cannot trace); the step is traced chunk by chunk, within the codes of the
    # eager torch-op path's
    params, grads = _problem(7)
    mine = pureopt.inject_hyperparams(pureopt.adamw)(lr=1e-2, state_dtype="q8")
    ref = pureopt.inject_hyperparams(pureopt.adamw)(lr=1e-2, state_dtype="q8", impl="foreach")
    compiled, called = _compiled(lambda g, s, p: pureopt.step(mine, g, s, p, donate=("params", "state")))
    state = mine.init(params)
    for g in grads:
        p1, s1 = compiled(g, _copy(state), _copy(params))
        p2, s2 = pureopt.step(ref, g, _copy(state), _copy(params), donate=("params", "state"))
        _within_the_codes(p1, s1.inner_state, p2, s2.inner_state, "q8")
        params, state = p2, s2
    assert "pureopt.inplace_step" not in called and "pureopt.block_encode" in called, called


@pytest.mark.bitwise
def test_compiled_donated_step_of_untraceable_math_steps_as_torch_optim(kernels):
    # Rprop (a comparison: no one-pass kernel) with float32 fields, compiled donated: the op runs the chunked eager
    # step, which steps as torch.optim.Rprop bit for bit
    params, grads = _problem(6)
    spec = dict.fromkeys(_fields(lambda sd: pureopt.rprop(lr=1e-2, state_dtype=sd)), torch.float32)
    mine = pureopt.rprop(lr=1e-2, state_dtype=spec)
    compiled, called = _compiled(lambda g, s, p: pureopt.step(mine, g, s, p, donate=("params", "state")))
    p, s = _copy(params), mine.init(params)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Rprop(list(ref.values()), lr=1e-2, foreach=True)
    for g in grads:
        p, s = compiled(g, s, p)
        for k, v in ref.items():
            v.grad = g[k].clone()
        opt.step()
    assert kernels == [] and "pureopt.inplace_step" in called
    for k in params:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=0, atol=0)


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", ["q8", "q4", "fp8", "bf16-sr"])
def test_the_loops_and_thread_counts_write_the_same_bits(spec, monkeypatch):
    # every tile is computed by one thread through the same IEEE operations in either loop
    params = {"w": torch.randn(300, 700, generator=torch.Generator().manual_seed(4))}
    grads = {"w": torch.randn(300, 700, generator=torch.Generator().manual_seed(5))}
    tx = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec)
    results = []
    before = torch.get_num_threads()
    try:
        for flag, threads in ((0, 1), (16, 1), (0, 2)):
            if flag == 0 and not _VECTOR:
                continue
            monkeypatch.setattr(native, "_vector_flag", lambda flag=flag: flag)
            torch.set_num_threads(threads)
            p = _copy(params)
            s = tx.init(p)
            for _ in range(2):
                p, s = pureopt.step(tx, grads, s, p, donate=("params", "state"))
            results.append(pureopt.tree.leaves((p, s)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # and the bits are the step's: the torch-op path (independent of both loops) within the codes' rounding
    ref = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype=spec, impl="foreach")
    p, s = _copy(params), ref.init(params)
    for _ in range(2):
        p, s = pureopt.step(ref, grads, s, p, donate=("params", "state"))
    off = (results[0][0] - p["w"]).abs() > 1e-6 + 1e-5 * p["w"].abs()  # (where a code flipped at a midpoint)
    assert int(off.sum()) <= p["w"].numel() // 1000


@pytest.mark.bitwise
def test_untraceable_math_takes_the_chunked_path(kernels):
    # Rprop's math branches on the sign of a product (a comparison the tracer does not follow): the step takes the
    # chunked path, which, with float32 fields, steps as torch.optim.Rprop
    params, grads = _problem(2)
    spec = dict.fromkeys(_fields(lambda sd: pureopt.rprop(lr=1e-2, state_dtype=sd)), torch.float32)
    mine = pureopt.rprop(lr=1e-2, state_dtype=spec)
    p, s = _copy(params), mine.init(params)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Rprop(list(ref.values()), lr=1e-2, foreach=True)
    for g in grads:
        p, s = pureopt.step(mine, g, s, p, donate=("params", "state"))
        for k, v in ref.items():
            v.grad = g[k].clone()
        opt.step()
    assert kernels == []
    for k in params:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=0, atol=0)


def test_tracing_refuses_what_it_cannot_follow():
    make = types.SimpleNamespace

    def branch(k):
        if torch._foreach_sqrt(k.f)[0]:  # (a branch on values)
            pass
        return k.f, {}

    def compare(k):
        return (k.f if k.f[0] == 0 else k.g), {}  # (== on a tensor compares values: refused, not identity)

    refused = (branch, compare, lambda k: (torch._foreach_exp(k.f), {}), lambda k: (torch._foreach_pow(k.f, 0.3), {}))
    for math in refused:
        with pytest.raises(onepass.Untraceable):
            onepass.trace(math, make, ["f"], [], False, False)


def test_every_elementwise_algorithm_with_state_either_traces_or_falls_back(kernels):
    # (a survey: which algorithms' math the tracer follows; a change that loses one shows here)
    traced, fell_back = [], []
    params, grads = _problem(3)
    for name in dir(pureopt):
        fn = getattr(pureopt, name)
        algo = getattr(fn, "algorithm", None)
        if algo is None or not algo.elementwise or name.startswith("scale_by") or algo.leaf_args:
            continue
        if algo.dense_error is not None or "state_dtype" not in inspect.signature(fn).parameters:
            continue
        try:
            tx = fn(state_dtype="q8", **({"momentum": 0.9} if name in ("sgd",) else {}))
            state = tx.init(params)
        except (TypeError, ValueError):
            continue
        fields = [f for f in state if isinstance(f, dict)]
        if not any(isinstance(v, Quantized) for f in fields for v in f.values()):
            continue
        kernels.clear()
        pureopt.step(tx, grads[0], state, _copy(params), donate=("params", "state"))
        (traced if kernels else fell_back).append(name)
    assert set(traced) == {
        "adabelief", "adadelta", "adagrad", "adam", "adamax", "adamw", "adan", "ademamix", "adopt", "asgd", "laprop",
        "lion", "nadam", "radam", "rmsprop", "sgd", "signum", "yogi",
    }, traced  # fmt: skip
    # (schedule-free SGD keeps only z, parameter values: nothing of it is encoded by "q8")
    assert set(fell_back) == {"rprop", "madgrad", "schedule_free_adamw"}, fell_back


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_parameters_step_as_the_torch_op_path(rounding, kernels):
    # bf16 parameters and gradients, q8 state: the kernel reads them as float32; the math's update is added and
    # rounded to nearest (p.add_(u)), or handed to stochastic_rounding, which rounds p + u stochastically
    params, grads = _problem(5)
    params = {k: v.bfloat16() for k, v in params.items()}
    grads = [{k: v.bfloat16() for k, v in g.items()} for g in grads]

    def make(impl: str):
        inner = pureopt.adamw(lr=1e-2, weight_decay=0.1, state_dtype="q8", impl=impl)
        return inner if rounding == "nearest" else pureopt.stochastic_rounding(inner, seed=3)

    mine, ref = make("auto"), make("foreach")
    state = mine.init(params)
    for g in grads:
        (p1, _), (p2, s2) = [
            pureopt.step(tx, g, _copy(state), _copy(params), donate=("params", "state")) for tx in (mine, ref)
        ]
        for k in params:  # (equal but where the float32 sum, an ulp apart, rounds to the neighbouring bfloat16)
            assert p1[k].dtype == torch.bfloat16
            assert int(_ulps(p1[k].float(), p2[k].float()).max()) <= 1 << 16
            assert int((p1[k] != p2[k]).sum()) <= max(2, p1[k].numel() // 1000)
        params, state = p2, s2
    assert len(kernels) == len(grads)


def test_without_the_native_kernels_the_step_takes_the_chunked_path(kernels, monkeypatch):
    # (PUREOPT_NATIVE=0, or no C++ toolchain: native.available is false, and the torch-op codecs run chunk by chunk)
    monkeypatch.setattr(native, "available", lambda *tensors: False)
    params, grads = _problem(6)
    mine, ref = pureopt.adamw(lr=1e-2, state_dtype="q8"), pureopt.adamw(lr=1e-2, state_dtype="q8", impl="foreach")
    p1, s1 = pureopt.step(mine, grads[0], mine.init(params), _copy(params), donate=("params", "state"))
    p2, _ = pureopt.step(ref, grads[0], ref.init(params), _copy(params), donate=("params", "state"))
    assert kernels == [] and all(isinstance(v, Quantized) for v in s1.exp_avg.values())
    for k in params:  # (auto: torch's fused AdamW on each chunk; foreach: the same math op by op)
        _close(p1[k], p2[k])
