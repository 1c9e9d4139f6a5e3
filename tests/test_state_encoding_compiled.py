"""Encoded optimizer state under ``torch.compile`` (inductor): the compiled step keeps the eager step's memory
bound (one chunk of temporaries per encoded field, never a float32 copy of the whole state) and tracks
torch.optim.AdamW's fp32 run within the quantisation bound.

Memory is measured by ``benchmarks/memory.py``'s ``transient_peak``: the CPU allocator's events recorded by
``torch.profiler``, replayed in time order (the bytes a call allocates and has not freed, at their peak).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from _memory import transient_peak

import pureopt
from pureopt.algorithms.storage import CHUNK_ELEMENTS
from pureopt.kernels import codec_ops
from pureopt.kernels.encoding import BlockEncoding, FloatEncoding, Quantized, dynamic_code

# how far the parameters may drift from the fp32 run, as a fraction of how far that run moved them (L2 norms over
# all elements, 3 steps; as tests/test_state_encoding.py allows over 20 steps)
_TOL = {"q8": 0.1, "fp8": 0.25, "q4": 0.5, "bf16-sr": 0.05}


# (the pure path is the donated one past its copies: q8 stands for it)
@pytest.mark.parametrize(
    "spec,donated", [(spec, True) for spec in _TOL] + [("q8", False)], ids=[*(f"{s}-donated" for s in _TOL), "q8-pure"]
)
def test_compiled_encoded_step_stays_within_a_few_chunks(spec, donated):
    # Three tensors of 3.5 chunks each (1.4M elements: float32 Adam state 10.5 MiB). The bound, 12 float32
    # chunks (6 MiB), is what the eager step needs (a chunk's decoded fields, their new values, the update and
    # temporaries) with room to spare; a step that materialises the decoded state of every tensor (as inductor
    # did when handed the codecs' functional forms) needs at least the 10.5 MiB.
    n = CHUNK_ELEMENTS * 7 // 2
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=g) for _ in range(3)]
    grads = [[torch.randn(n, generator=g) * 1e-2 for _ in params] for _ in range(3)]
    tx = pureopt.adamw(lr=torch.tensor(1e-3), weight_decay=0.01, state_dtype=spec)
    donate = ("params", "state") if donated else ()

    def step(gr, s, p):
        return pureopt.step(tx, gr, s, p, donate=donate)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
    p, s = [x.clone() for x in params], tx.init(params)
    for t, gr in enumerate(grads):
        if t == 2:  # the step measured on copies (a donated step writes into what it is given)
            p_copy, s_copy = [x.clone() for x in p], copy.deepcopy(s)
            peak, live = transient_peak(lambda: compiled(gr, s_copy, p_copy))  # noqa: B023  (called right here)
            bound = 12 * CHUNK_ELEMENTS * 4
            assert peak - live <= bound, f"{spec}: transient {peak / 2**20:.2f} MiB > {bound / 2**20:.0f} MiB"
        p, s = compiled(gr, s, p)
        for r, gg in zip(ref, gr):
            r.grad = gg
        opt.step()
    moved = sum((r.detach() - x).square().sum() for r, x in zip(ref, params)).sqrt()
    err = sum((a - r.detach()).square().sum() for a, r in zip(p, ref)).sqrt()
    assert err <= _TOL[spec] * moved, (float(err), float(moved))
    field = s.exp_avg[0]
    assert isinstance(field, Quantized) or field.dtype == torch.bfloat16


def test_encodings_name_themselves_by_their_parameters_across_pickling():
    # the opaque ops find an encoding by a key made from what decides its codes: equal encodings share it, a
    # different block size or seed does not, and an unpickled encoding (another process) is found again
    code = dynamic_code(8, signed=True)
    a, b = BlockEncoding("mine", code=code, block=256), BlockEncoding("mine", code=code, block=256)
    c = BlockEncoding("mine", code=code, block=512)
    assert a.key == b.key != c.key
    assert (
        FloatEncoding(torch.bfloat16, stochastic=True, seed=1).key
        != FloatEncoding(torch.bfloat16, stochastic=True, seed=2).key
    )
    del codec_ops._ENCODINGS[c.key]
    back = pickle.loads(pickle.dumps(c))
    assert codec_ops._ENCODINGS[c.key] is back


@pytest.mark.parametrize("spec", ["q8", "q4", "fp8", "fp8_e5m2"])
def test_second_moments_never_decode_to_zero_so_steps_keep_adams_bound(spec):
    # Adam's step is bounded (Kingma & Ba 2015, sec. 2.1): |dp| <= lr * (1 - b1) / sqrt(1 - b2) when
    # 1 - b1 > sqrt(1 - b2). Elements whose gradients are persistently tiny next to their block's largest have a
    # second moment below the code's smallest nonzero value; had the code a zero there, v decoded as 0 while m is not
    # gives m / eps, thousands of times lr (the zero-point problem of Li et al. 2023). Both torch.optim.Adam (fp32)
    # and the encoded step must keep the bound (the encoded one with 50% slack for the quantisation of m and v).
    g = torch.Generator().manual_seed(8)
    n = 8192
    size = 10.0 ** (-6 * torch.rand(n, generator=g))  # each element's gradient scale, fixed over the steps
    grads = [[torch.randn(n, generator=g) * size] for _ in range(8)]
    lr, b1, b2 = 1e-3, 0.9, 0.999
    bound = lr * (1 - b1) / math.sqrt(1 - b2)
    tx = pureopt.adam(lr=lr, betas=(b1, b2), state_dtype=spec)
    params = [torch.zeros(n)]
    state = tx.init(params)
    ref = [torch.zeros(n, requires_grad=True)]
    opt = torch.optim.Adam(ref, lr=lr, betas=(b1, b2))
    for gr in grads:
        before, ref_before = params[0].clone(), ref[0].detach().clone()
        params, state = pureopt.step(tx, gr, state, params)
        ref[0].grad = gr[0]
        opt.step()
        assert (ref[0].detach() - ref_before).abs().max() <= bound * (1 + 1e-5)
        worst = float((params[0] - before).abs().max())
        assert worst <= 1.5 * bound, f"{spec}: a step of {worst / lr:.1f} lr"


def test_compiled_torch_optimizer_step_with_encoded_state_tracks_torch_adamw():
    # torch.compile(opt.step) on the drop-in optimizer (inductor), q8 state: within the quantisation bound of
    # torch.optim.AdamW's fp32 run over 5 steps
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    start = [p.detach().clone() for p in model.parameters()]
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = pureopt.TorchOptimizer(model.parameters(), pureopt.adamw, lr=1e-2, state_dtype="q8")
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="inductor")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, r in zip(model.parameters(), ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        step()
        ref_opt.step()
    moved = sum((r.detach() - s).square().sum() for r, s in zip(ref, start)).sqrt()
    err = sum((p.detach() - r.detach()).square().sum() for p, r in zip(model.parameters(), ref)).sqrt()
    assert err <= _TOL["q8"] * moved, (float(err), float(moved))
    assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in opt.state_dict()["state"][0].values())


def test_compiled_torch_optimizer_with_an_lr_scheduler_steps_as_the_eager_torch_op_path():
    # torch.compile(opt.step) with q8 state and a LambdaLR changing lr every step: the compiled step is one opaque
    # op reading the lr tensor that pureopt::refill_lrs filled from param_groups just before; the parameters follow
    # the eager torch-op path's run (impl="foreach", the same scheduler) but where a code flipped at a midpoint
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    twin = copy.deepcopy(model)
    opt = pureopt.TorchOptimizer(model.parameters(), pureopt.adamw, lr=1e-2, state_dtype="q8")
    ref = pureopt.TorchOptimizer(twin.parameters(), pureopt.adamw, lr=1e-2, state_dtype="q8", impl="foreach")
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for o in (opt, ref)]
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="inductor")
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for p, r in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        step()
        ref.step()
        for schedule in schedules:
            schedule.step()
    for p, r in zip(model.parameters(), twin.parameters()):
        off = (p.detach() - r.detach()).abs() > 1e-6 + 1e-5 * r.detach().abs()
        assert int(off.sum()) <= max(2, p.numel() // 1000), int(off.sum())
