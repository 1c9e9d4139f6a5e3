"""The donated path whose kernel adds the updates to the parameters itself (``apply``), run in chunks on CPU.

test_kernels.py checks ``inplace_step == update + apply_updates`` for every optimizer on small tensors (one chunk).
Here the chunk size is made tiny so that the same steps run over many chunks and over flat slices of every
tensor, and on tensors bigger than the default chunk; and the kernels that apply in place are checked to do so.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _parity import grads_at, make_data, make_params, run_parity
from _registry import OPTIMIZERS, fused_available

import pureopt
from pureopt.base import UpdateContext, as_leaf_update
from pureopt.kernels import common
from pureopt.kernels.listops import FOREACH, Scratch, ScratchOps

# the optimizers (registry ids start with these names) whose non-fused kernels apply the updates themselves
APPLIED = (
    "rmsprop",
    "adamax",
    "nadam",
    "radam",
    "adadelta",
    "asgd",
    "rprop",
    "lion",
    "sign_sgd",
    "signum",
    "adabelief",
    "yogi",
    "adan",
    "ademamix",
    "schedule_free",
    "novograd",
    "lamb",
    "lars",
)

UNFUSED = [(i, f) for i, f in OPTIMIZERS if not fused_available(i)]
IDS = [i for i, _ in UNFUSED]
FACTORIES = [f for _, f in UNFUSED]


def _run_both(tx, params, grads_fn, steps, tol):
    """``steps`` donated steps and as many pure steps from the same start; compare params and state."""
    pure_params = {k: v.clone() for k, v in params.items()}
    pure_state = tx.init(pure_params)
    own_params = {k: v.clone() for k, v in params.items()}
    own_state = pureopt.tree.tree_clone(tx.init(own_params))
    for step in range(steps):
        updates, pure_state = tx.update(grads_fn(pure_params, step), pure_state, pure_params)
        pure_params = pureopt.apply_updates(pure_params, updates)
        own_grads = grads_fn(own_params, step)
        grads_copy = {k: None if v is None else v.clone() for k, v in own_grads.items()}
        own_state = pureopt.inplace_step(tx, own_grads, own_state, own_params)
        for k, v in own_grads.items():  # gradients are read-only
            assert v is None or torch.equal(v, grads_copy[k]), k
        for k in own_params:
            torch.testing.assert_close(own_params[k], pure_params[k], **tol, msg=lambda m, k=k, s=step: f"{k}@{s}: {m}")
    for mine, theirs in zip(pureopt.tree.leaves(own_state), pureopt.tree.leaves(pure_state)):
        torch.testing.assert_close(mine, theirs, **tol)


@pytest.mark.parametrize("mode", ["numbers-scratch", "tensors-allocated"])
@pytest.mark.parametrize("chunk_bytes", [8, 40], ids=["slices-of-1", "slices-of-5"])
@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_chunked_donated_step_equals_pure_update(factory, impl, chunk_bytes, mode, monkeypatch):
    """Tiny chunks: every tensor is cut into flat slices (per-tensor scalars repeated), small ones are grouped;
    per-tensor scalars as Python numbers (the CPU path), temporaries in scratch memory and foreach calls on every
    chunk, or scalars as 0-d tensors (as on an accelerator), temporaries from the allocator and per-tensor calls
    on chunks of a few tensors."""
    monkeypatch.setattr(common, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(common, "HOST_SCALARS", mode.startswith("numbers"))
    monkeypatch.setattr(common, "SCRATCH_MIN_BYTES", 0 if mode.endswith("scratch") else 1 << 62)
    monkeypatch.setattr(common, "FEW_TENSORS", 0 if mode.endswith("scratch") else 4)
    data = make_data(torch.float64)
    _run_both(
        factory(impl),
        make_params(torch.float64),
        lambda p, s: grads_at(p, s, data),
        steps=8,
        tol={"rtol": 1e-12, "atol": 1e-14},
    )


def _big_params(dtype):
    gen = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(3 * common.CHUNK_BYTES // 8 + 5, generator=gen, dtype=torch.float64).to(dtype),
        "wt": torch.randn(70, 3000, generator=gen, dtype=torch.float64).to(dtype).T,  # not contiguous
        "small": torch.randn(3, generator=gen, dtype=torch.float64).to(dtype),
        "scalar": torch.randn((), generator=gen, dtype=torch.float64).to(dtype),
    }


def _smooth_grads(params, step):
    return {k: torch.sin(3 * v + step) + 0.1 * v for k, v in params.items()}


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_donated_step_on_big_tensors_equals_pure_update(factory, impl):
    """At the default chunk size: a tensor several chunks long (sliced), a non-contiguous one (kept whole)."""
    # (the applied step may round differently from p + update by an ulp, e.g. an FMA as torch's p.add_(x, alpha=c);
    # over 400k elements and 3 steps a centered RMSprop's cancellation can make that 1e-11 relative)
    _run_both(factory(impl), _big_params(torch.float64), _smooth_grads, steps=3, tol={"rtol": 1e-10, "atol": 1e-12})


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize(
    "factory", [f for i, f in UNFUSED if i.startswith(APPLIED)], ids=[i for i in IDS if i.startswith(APPLIED)]
)
def test_kernels_apply_in_place(factory, impl):
    """The kernels in ``APPLIED`` add the updates to the parameters themselves under ``apply`` (updates ``None``)."""
    tx = factory(impl)
    params = make_params(torch.float64)
    state = tx.init(params)
    grads = grads_at(params, 1, make_data(torch.float64))
    leaves, spec = pureopt.tree.flatten(grads)
    param_leaves = pureopt.tree.flatten_like(spec, params)
    with torch.no_grad():
        updates, _ = as_leaf_update(tx)(leaves, state, param_leaves, UpdateContext(spec, donate=True, apply=True))
    assert updates is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: pureopt.rmsprop(lr=0.01, momentum=0.9, state_dtype=torch.float64),
        lambda: pureopt.adamax(lr=0.01, state_dtype=torch.float64),
    ],
)
def test_state_in_another_dtype_is_not_applied_in_kernel(make):
    """fp32 parameters with fp64 state: the kernel computes on converted copies, so the caller adds the updates."""
    params = {k: v.to(torch.float32) for k, v in _big_params(torch.float64).items()}
    tx = make()
    pure_params = {k: v.clone() for k, v in params.items()}
    pure_state = tx.init(pure_params)
    state = tx.init(params)
    for step in range(3):
        updates, pure_state = tx.update(_smooth_grads(pure_params, step), pure_state, pure_params)
        pure_params = pureopt.apply_updates(pure_params, updates)
        state = pureopt.inplace_step(tx, _smooth_grads(params, step), state, params)
        for k in params:
            torch.testing.assert_close(params[k], pure_params[k], rtol=1e-6, atol=1e-7)


def test_scratch_hands_out_disjoint_aligned_views_and_reuses_them():
    scratch = Scratch()
    like = [torch.zeros(5, 3), torch.zeros(()), torch.zeros(7, dtype=torch.float64), torch.zeros(2, 2).T]
    first = scratch.take(like)
    second = scratch.take(like[:2])
    for got, ref in zip(first, like):
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_contiguous()
        assert got.data_ptr() % 64 == 0
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in [*first, *second]
        if t.dtype == torch.float32
    )
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))  # no overlap before a reset
    scratch.reset()
    again = [scratch.take(like), scratch.take(like[:2])]
    scratch.reset()
    once_more = [scratch.take(like), scratch.take(like[:2])]  # (the buffers have grown to fit by now)
    assert [t.data_ptr() for ts in once_more for t in ts] == [t.data_ptr() for ts in again for t in ts]
    big = scratch.take([torch.zeros(10_000)])[0]  # grows; what was handed out stays valid
    assert big.numel() == 10_000 and again[0][0].shape == (5, 3)
    ops = ScratchOps(FOREACH, scratch)
    xs = [torch.tensor([1.0, 4.0]), torch.tensor([9.0])]
    assert [t.tolist() for t in ops.sqrt(xs)] == [[1.0, 2.0], [3.0]]
    assert xs[0].tolist() == [1.0, 4.0]  # out of place


# --- the applied path gives torch.optim's numbers (fp64), flags included

TORCH_DONATED = [
    ("RMSprop", "rmsprop", dict(lr=0.01, alpha=0.9, weight_decay=0.1, maximize=True)),
    ("RMSprop", "rmsprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("Adamax", "adamax", dict(lr=0.02, weight_decay=0.1)),
    ("NAdam", "nadam", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("NAdam", "nadam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", "radam", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("RAdam", "radam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adadelta", "adadelta", dict(lr=0.5, rho=0.8)),
    ("ASGD", "asgd", dict(lr=0.05, lambd=0.05, t0=5.0)),
    ("Rprop", "rprop", dict(lr=0.01, maximize=True)),
]


class _Donating:
    """A GradientTransformation-like pair whose update runs inplace_step (params are updated in place)."""

    def __init__(self, tx):
        self.tx = tx

    def init(self, params):
        return self.tx.init(params)

    def update(self, grads, state, params):
        return {k: None for k in grads}, pureopt.inplace_step(self.tx, grads, state, params)


@pytest.mark.parametrize("chunk_bytes", [16, 1 << 20], ids=["tiny-chunks", "default-chunks"])
@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize(
    "cls,name,flags", TORCH_DONATED, ids=[f"{n}-{'-'.join(map(str, f))}" for _, n, f in TORCH_DONATED]
)
def test_applied_step_matches_torch(cls, name, flags, impl, chunk_bytes, monkeypatch):
    monkeypatch.setattr(common, "CHUNK_BYTES", chunk_bytes)
    run_parity(
        lambda p: getattr(torch.optim, cls)(p, **flags),
        _Donating(getattr(pureopt, name)(impl=impl, **flags)),
        torch.float64,
        maximize=flags.get("maximize", False),
    )


PRIMITIVES = {
    "scale_by_rms": lambda: pureopt.scale_by_rms(alpha=0.9),
    "scale_by_adamax": lambda: pureopt.scale_by_adamax(),
    "scale_by_nadam": lambda: pureopt.scale_by_nadam(),
    "scale_by_radam": lambda: pureopt.scale_by_radam(),
    "scale_by_adadelta": lambda: pureopt.scale_by_adadelta(),
    "scale_by_rprop": lambda: pureopt.scale_by_rprop(1e-3),
    "scale_by_lion": lambda: pureopt.scale_by_lion(),
    "scale_by_signum": lambda: pureopt.scale_by_signum(0.9),
    "scale_by_sign": lambda: pureopt.scale_by_sign(),
    "scale_by_belief": lambda: pureopt.scale_by_belief(),
    "scale_by_yogi": lambda: pureopt.scale_by_yogi(),
    "scale_by_adan": lambda: pureopt.scale_by_adan(),
    "scale_by_ademamix": lambda: pureopt.scale_by_ademamix(),
}


@pytest.mark.parametrize("make", PRIMITIVES.values(), ids=PRIMITIVES.keys())
def test_primitive_applied_last_adds_its_direction(make, monkeypatch):
    """A primitive (no learning rate) as the whole optimizer applies ``+direction``, as the pure path adds it."""
    monkeypatch.setattr(common, "CHUNK_BYTES", 40)
    data = make_data(torch.float64)
    _run_both(
        make(),
        make_params(torch.float64),
        lambda p, s: {k: None if v is None else 1e-3 * v for k, v in grads_at(p, s, data).items()},
        steps=8,  # (RAdam's rectified branch from step 6)
        tol={"rtol": 1e-12, "atol": 1e-14},
    )
