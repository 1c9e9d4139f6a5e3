"""``chain(clip_by_global_norm(c), optimizer)`` folds the clipping into the optimizer's step: the global norm is
taken first, and the step multiplies each chunk of gradients by the clip factor as it reads it, so the clipped
gradients never exist whole (before: 4 bytes per parameter of float32 beyond the state, the largest transient of
the most common training setup, also with 8-bit state).

Reference: torch's own ``torch.nn.utils.clip_grad_norm_`` on a copy of the gradients, then the optimizer alone.
The products are the same IEEE multiplications as clipping's, read where the math needs them, and each algorithm
runs the same kernels on them (torch's fused kernel chunk by chunk where the whole step would use it), so the
results are bitwise equal on any CPU width: the chunks are cut at multiples of 2**17 elements, never inside a
vector, and whole tensors keep their own tails.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _memory import transient_peak
from _registry import CONFIGS

import pureopt
from pureopt.kernels.common import CHUNK_BYTES

SHAPES = [(300, 700), (64,), (32, 64), (5,)]  # (one tensor cut into chunks, small ones grouped whole)


def _problem(steps: int = 3, scale: float = 1.0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * scale for s in SHAPES] for _ in range(steps)]
    return params, grads


def _clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ on copies of ``grads`` (it clips parameters' ``.grad``)."""
    holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for holder, g in zip(holders, grads):
        holder.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(holders, max_norm)
    return [h.grad for h in holders]  # type: ignore[misc]


def _assert_donated_runs_agree(chain: Any, alone: Any, params: list[torch.Tensor], grads: Any, max_norm: float):
    """``chain`` (clipping folded in) against torch's clipping then ``alone``, donated steps: bitwise."""
    got, ref = [p.clone() for p in params], [p.clone() for p in params]
    s_got, s_ref = chain.init(got), alone.init(ref)
    for gs in grads:
        s_got = pureopt.inplace_step(chain, gs, s_got, got)
        s_ref = pureopt.inplace_step(alone, _clipped(gs, max_norm), s_ref, ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _both(factory: Any, kw: dict[str, Any], max_norm: float, donated: bool, steps: int = 3, scale: float = 1.0):
    params, grads = _problem(steps, scale)
    chain = pureopt.chain(pureopt.clip_by_global_norm(max_norm), factory(**kw))
    alone = factory(**kw)
    got, ref = [p.clone() for p in params], [p.clone() for p in params]
    s_got, s_ref = chain.init(got), alone.init(ref)
    for gs in grads:
        if donated:
            s_got = pureopt.inplace_step(chain, gs, s_got, got)
            s_ref = pureopt.inplace_step(alone, _clipped(gs, max_norm), s_ref, ref)
        else:
            u, s_got = chain.update(gs, s_got, got)
            got = pureopt.apply_updates(got, u)
            u, s_ref = alone.update(_clipped(gs, max_norm), s_ref, ref)
            ref = pureopt.apply_updates(ref, u)
    return got, ref


def _factory(factory: Any, state_dtype: str | None) -> Any:
    return factory if state_dtype is None else (lambda **kw: factory(**kw, state_dtype=state_dtype))


@pytest.mark.bitwise
@pytest.mark.parametrize("state_dtype", [None, "q8"])
@pytest.mark.parametrize("name,factory,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_clipping_folded_into_each_optimizer_equals_torch_clipping_then_the_optimizer(name, factory, kw, state_dtype):
    try:
        factory(**kw, **({} if state_dtype is None else {"state_dtype": state_dtype}))
    except ValueError as e:  # (Adafactor's and CAME's factors take float dtypes only)
        assert "is not shaped like its parameter" in str(e)
        return
    got, ref = _both(_factory(factory, state_dtype), kw, max_norm=1.0, donated=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.bitwise
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "novograd", "lamb"])
def test_the_pure_update_of_a_folded_chain_equals_torch_clipping_then_the_optimizer(name):
    factory, kw = next((f, k) for n, f, k in CONFIGS if n == name)
    got, ref = _both(factory, kw, max_norm=1.0, donated=False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.bitwise
def test_a_norm_below_the_threshold_leaves_the_gradients_as_they_are():
    # factor 1: each product is the gradient itself
    got, ref = _both(pureopt.adamw, dict(lr=0.01), max_norm=1e6, donated=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.bitwise
def test_named_chain_folds_and_parameters_without_gradients_keep_their_state():
    params, grads = _problem()
    tx = pureopt.named_chain(("clip", pureopt.clip_by_global_norm(0.5)), ("adam", pureopt.adamw(lr=0.01)))
    alone = pureopt.adamw(lr=0.01)
    got, ref = [p.clone() for p in params], [p.clone() for p in params]
    s_got, s_ref = tx.init(got), alone.init(ref)
    for gs in grads:
        some: list[Any] = [g if i != 1 else None for i, g in enumerate(gs)]  # (the second has no gradient)
        s_got = pureopt.inplace_step(tx, some, s_got, got)
        kept = _clipped([g for g in some if g is not None], 0.5)
        s_ref = pureopt.inplace_step(alone, [kept.pop(0) if g is not None else None for g in some], s_ref, ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s_got["adam"].exp_avg[1].count_nonzero() == 0


def test_bf16_parameters_scale_their_gradients_whole_as_clipping_does():
    # the factor meets bf16 gradients in bf16 (as clip_grad_norm_ multiplies them): not folded, same numbers
    params, grads = _problem()
    params = [p.bfloat16() for p in params]
    grads = [[g.bfloat16() for g in gs] for gs in grads]
    chain = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=0.01, state_dtype=torch.float32))
    _assert_donated_runs_agree(chain, pureopt.adamw(lr=0.01, state_dtype=torch.float32), params, grads, 1.0)


def test_a_chain_into_a_transformation_that_does_not_take_the_factor_clips_first():
    # inject_hyperparams' update is not an algorithm's kernel: the clipped gradients are made as before
    params, grads = _problem()
    chain = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.inject_hyperparams(pureopt.adamw)(lr=0.01))
    got = [p.clone() for p in params]
    state = chain.init(got)
    ref = [p.clone() for p in params]
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(p) for p in ref], lr=0.01)
    for gs in grads:
        state = pureopt.inplace_step(chain, gs, state, got)
        for p, g in zip(torch_opt.param_groups[0]["params"], _clipped(gs, 1.0)):
            p.grad = g
        torch_opt.step()
    for a, b in zip(got, torch_opt.param_groups[0]["params"]):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("state_dtype", [None, "q8"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "lamb"])
def test_the_folded_step_holds_one_chunk_of_scaled_gradients(name, state_dtype):
    # 24 matrices of 256 x 256 (6 MiB of float32 gradients): before, the clipped copy of all of them; the fused
    # kernel's chunks (float32 AdamW, SGD) are 4 times the others' (fewer calls; see Algorithm.run)
    factory, kw = next((f, k) for n, f, k in CONFIGS if n == name)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(256, 256, generator=g) for _ in range(24)]
    grads = [torch.randn(256, 256, generator=g) for _ in range(24)]
    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), _factory(factory, state_dtype)(**kw))
    state = pureopt.inplace_step(tx, grads, tx.init(params), params)  # (first steps allocate)
    box = [state]

    def step() -> None:
        box[0] = pureopt.inplace_step(tx, grads, box[0], params)

    peak, _ = transient_peak(step)
    whole = sum(x.numel() for x in grads) * 4
    assert peak <= 3 * CHUNK_BYTES <= whole / 2, (peak, whole)  # (measured: 0.06-2.5 MiB; before: 6 MiB, more)


@pytest.mark.bitwise
@pytest.mark.parametrize(
    "make",
    [
        lambda: pureopt.muon(lr=0.02),  # (matrices only; its own per-matrix step)
        lambda: pureopt.sign_sgd(lr=0.01, state_dtype=torch.bfloat16),  # (no state: the math in bf16, scaled first)
        lambda: pureopt.sgd(lr=0.01, state_dtype=torch.bfloat16),
    ],
    ids=["muon", "sign_sgd-bf16", "sgd-bf16"],
)
def test_matrices_and_stateless_math_in_another_dtype_fold_as_clipping_does(make):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 32, generator=g), torch.randn(128, 64, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    _assert_donated_runs_agree(pureopt.chain(pureopt.clip_by_global_norm(1.0), make()), make(), params, grads, 1.0)


def _labels(ps: Any) -> Any:
    return type(ps)("muon" if p.dim() == 2 else "adamw" for p in ps)


COMBINED = {
    # the usual Muon recipe, clipped: the factor reaches each inner step
    "partition": lambda: pureopt.partition({"muon": pureopt.muon(lr=0.02), "adamw": pureopt.adamw(0.01)}, _labels),
    # the others pass through clipped, as they came in
    "masked": lambda: pureopt.masked(pureopt.adamw(0.01), lambda ps: type(ps)(p.dim() == 2 for p in ps)),
    # a chain inside: its first step takes the factor (Muon), or gets the clipped updates (trace)
    "nested-chains": lambda: pureopt.partition(
        {"muon": pureopt.chain(pureopt.muon(lr=0.02)), "adamw": pureopt.chain(pureopt.trace(0.9), pureopt.sgd(0.01))},
        _labels,
    ),
}


@pytest.mark.bitwise
@pytest.mark.parametrize("name", list(COMBINED))
def test_clipping_folds_through_partition_masked_and_chains(name):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (128, 64), (64,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    make = COMBINED[name]
    _assert_donated_runs_agree(pureopt.chain(pureopt.clip_by_global_norm(1.0), make()), make(), params, grads, 1.0)
    # the pure update too (masked's other updates are the clipped gradients themselves)
    chain, alone = pureopt.chain(pureopt.clip_by_global_norm(1.0), make()), make()
    got, _ = chain.update(grads[0], chain.init(params), params)
    want, _ = alone.update(_clipped(grads[0], 1.0), alone.init(params), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_clipped_muon_recipe_holds_no_whole_copy_of_the_gradients():
    # 24 matrices of 256 x 256 and 24 vectors (6 MiB of gradients): before, the clipped copy of all of them
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(256, 256, generator=g) for _ in range(24)] + [
        torch.randn(256, generator=g) for _ in range(24)
    ]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), COMBINED["partition"]())
    state = tx.init(params)
    for _ in range(2):
        state = pureopt.inplace_step(tx, grads, state, params)
    box = [state]

    def step() -> None:
        box[0] = pureopt.inplace_step(tx, grads, box[0], params)

    peak, _ = transient_peak(step)
    assert peak <= 2 * CHUNK_BYTES, peak / 2**20  # (measured 1.1 MiB on 8 matrices; before: 3.1)
