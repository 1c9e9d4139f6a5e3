"""Flat-buffer mode: ``flat=True`` in the adapters and the ``pureopt.flatten`` transformation.

References: torch.optim itself (fused, for the algorithms it has), the per-tensor (``flat=False``) adapters,
which tests/test_adapters_*.py check against torch.optim, and per-tensor runs of the same transformation.

Bits: torch's vectorised CPU kernels round some operations (fused multiply-adds in lerp, addcmul, the fused
optimizers) differently in their vector body and in the scalar tail of each tensor, and an element's place
relative to the vector width changes when tensors are concatenated. With every tensor a multiple of 64 elements
there is no tail in either layout and the results must be bitwise equal (ALIGNED); with odd sizes they agree to
the last bit or two (ODD, compared with tight tolerances).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _checks import same_bits
from _registry import OPTIMIZERS

import pureopt
from pureopt.base import is_elementwise, is_segmentwise
from pureopt.flat import FlatLayout

ALIGNED = [(4, 16), (64,), (2, 4, 8), (1, 64), (128,)]
ODD = [(3, 4), (7,), (2, 3, 2), (1,), (33,)]


def make_params(seed: int = 0, mixed: bool = True, shapes: list = ALIGNED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        dtype = torch.float64 if mixed and i == 2 else torch.float32
        out.append(torch.randn(shape, generator=g, dtype=dtype).requires_grad_())
    return out


def grads_for(params: list[torch.Tensor], step: int, skip: set[int] = frozenset()) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    return [None if i in skip else torch.randn(p.shape, generator=g, dtype=p.dtype) for i, p in enumerate(params)]


def clones(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


# which parameters have no gradient at each step: step counts diverge at step 2 and agree again after step 4
SKIPS = {2: {1}, 4: {0, 2, 3, 4}}


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, zero_to_none: bool = True) -> None:
    for t in range(steps):
        opt.zero_grad(set_to_none=zero_to_none)
        for p, g in zip(params, grads_for(params, t, SKIPS.get(t, set()))):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert same_bits(x.detach(), y.detach()), f"{what}: tensor {i} differs by {(x - y).abs().max().item()}"


def assert_near(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    """Equal up to the rounding of vector body vs scalar tail (a few ulps after a few steps)."""
    for i, (x, y) in enumerate(zip(a, b)):
        tol = dict(rtol=1e-13, atol=1e-14) if x.dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
        torch.testing.assert_close(x.detach(), y.detach(), **tol, msg=lambda m, i=i: f"{what}: tensor {i}: {m}")


def assert_same_state(sd_a: dict, sd_b: dict) -> None:
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for pid, entry in sd_a["state"].items():
        assert entry.keys() == sd_b["state"][pid].keys()
        for key, value in entry.items():
            other = sd_b["state"][pid][key]
            assert same_bits(torch.as_tensor(value), torch.as_tensor(other)), f"state[{pid}][{key!r}] differs"


@pytest.mark.bitwise
@pytest.mark.parametrize("opt_id,factory", OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_flat_matches_per_tensor_for_every_optimizer(opt_id, factory):
    params_flat = make_params()
    params_ref = clones(params_flat)
    flat = pureopt.TorchOptimizer(params_flat, factory("auto"), flat=True)
    ref = pureopt.TorchOptimizer(params_ref, factory("auto"))
    run(flat, params_flat, 7)
    run(ref, params_ref, 7)
    assert_same(params_flat, params_ref, opt_id)
    assert_same_state(flat.state_dict(), ref.state_dict())
    group = flat._groups[0].flat
    assert group is not None
    tx = factory("auto")
    assert group.flattened == is_segmentwise(tx)
    if group.flattened:  # the step counts agree again after step 4: back on the flat kernel
        assert group.uniform


@pytest.mark.parametrize("opt_id,factory", OPTIMIZERS[::3], ids=[o for o, _ in OPTIMIZERS[::3]])
def test_flat_is_close_to_per_tensor_with_odd_sizes(opt_id, factory):
    params_flat = make_params(shapes=ODD)
    params_ref = clones(params_flat)
    flat = pureopt.TorchOptimizer(params_flat, factory("auto"), flat=True)
    ref = pureopt.TorchOptimizer(params_ref, factory("auto"))
    run(flat, params_flat, 7)
    run(ref, params_ref, 7)
    assert_near(params_flat, params_ref, opt_id)


# (torch class, pureopt factory, kwargs, the torch implementation whose kernel the adapter's step runs). SGD, Adam
# and AdamW run torch's own fused kernel on the flat buffers. Adagrad does not: the adapter's lr is a 0-d tensor and
# pureopt's Adagrad takes torch's fused kernel only for a float lr, so its step is torch's foreach math. Torch's
# fused Adagrad kernel orders its arithmetic differently from torch's own foreach/for-loop Adagrad and ends a few
# ulps away from it (with ATEN_CPU_CAPABILITY avx512, avx2 and default alike), so only the foreach reference is
# bitwise; test_flat_adagrad_is_close_to_torch_fused_adagrad compares with the fused kernel to a few ulps.
TORCH_CASES = [
    ("SGD", pureopt.sgd, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), "fused"),
    ("Adam", pureopt.adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1), "fused"),
    ("AdamW", pureopt.adamw, dict(lr=0.01, weight_decay=0.1, maximize=True), "fused"),
    ("Adagrad", pureopt.adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.1), "foreach"),
]


@pytest.mark.bitwise
@pytest.mark.parametrize("name,factory,kwargs,torch_impl", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_flat_is_bitwise_torch_fused(name, factory, kwargs, torch_impl):
    """Against torch.optim's own optimizer running the same kernel (fused, or foreach for Adagrad: see
    TORCH_CASES), with two param groups of different lr and mixed dtypes.

    Bitwise on every CPU: both sides run the same torch kernels on sizes that are multiples of 64 elements, so
    no element falls in a scalar tail whatever the vector width (AVX2, AVX-512)."""
    params = make_params()
    params_ref = clones(params)

    def groups(ps: list[torch.Tensor]) -> list[dict]:
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": kwargs["lr"] / 2}]

    opt = pureopt.TorchOptimizer(groups(params), factory, flat=True, **kwargs)
    torch_opt = getattr(torch.optim, name)(groups(params_ref), **{torch_impl: True}, **kwargs)
    run(opt, params, 8, zero_to_none=False)
    run(torch_opt, params_ref, 8, zero_to_none=False)
    assert_same(params, params_ref, name)
    assert_same_state(opt.state_dict(), torch_opt.state_dict())


def test_flat_adagrad_is_close_to_torch_fused_adagrad():
    """Torch's fused Adagrad kernel orders its arithmetic differently from the foreach math the adapter runs
    (TORCH_CASES): equal to a few ulps (fp32 rtol 2e-6 after 8 steps; the fp64 tensor 1e-13)."""
    _, factory, kwargs, _ = TORCH_CASES[3]
    params = make_params()
    params_ref = clones(params)
    opt = pureopt.TorchOptimizer(params, factory, flat=True, **kwargs)
    torch_opt = torch.optim.Adagrad(params_ref, fused=True, **kwargs)
    run(opt, params, 8, zero_to_none=False)
    run(torch_opt, params_ref, 8, zero_to_none=False)
    assert_near(params, params_ref, "Adagrad against torch's fused Adagrad")


def test_flat_is_close_to_torch_fused_with_odd_sizes():
    params = make_params(shapes=ODD)
    params_ref = clones(params)
    opt = pureopt.TorchOptimizer(params, pureopt.adamw, flat=True, lr=0.01, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(params_ref, fused=True, lr=0.01, weight_decay=0.1)
    run(opt, params, 8)
    run(torch_opt, params_ref, 8)
    assert_near(params, params_ref, "AdamW, odd sizes")


def test_parameters_and_gradients_become_views_of_flat_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    objects = list(model.parameters())
    opt = pureopt.TorchOptimizer(model.parameters(), pureopt.adam, lr=1e-3, flat=True)
    assert list(model.parameters()) == objects and all(a is b for a, b in zip(model.parameters(), objects))
    assert_same(list(model.parameters()), before, "values after re-pointing")
    flat = opt._groups[0].flat
    assert flat is not None
    (buffer,) = flat.flat.buffers
    assert buffer.numel() == sum(p.numel() for p in objects)
    for p, offset in zip(objects, flat.flat.layout.offset_of):
        assert p.data_ptr() == buffer.data_ptr() + offset * buffer.element_size()
    opt.zero_grad(set_to_none=False)
    model(torch.randn(5, 4)).sum().backward()
    (grad_buffer,) = flat.flat._grad_buffers
    for p, offset in zip(objects, flat.flat.layout.offset_of):  # backward accumulated into the flat buffer
        assert p.grad.data_ptr() == grad_buffer.data_ptr() + offset * grad_buffer.element_size()
    expected = [p.detach() - 1e-3 * torch.sign(p.grad) for p in objects]  # Adam's first step: lr * sign(g)
    opt.step()
    for p, e in zip(objects, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


@pytest.mark.bitwise
def test_checkpoints_move_between_flat_per_tensor_and_torch():
    params = make_params(mixed=False)
    flat = pureopt.TorchOptimizer(params, pureopt.adamw, lr=0.01, weight_decay=0.1, flat=True)
    run(flat, params, 5)
    torch_params = clones(params)
    torch_opt = torch.optim.AdamW(torch_params, lr=0.01, weight_decay=0.1, fused=True)
    # state dicts hold the live tensors (as torch.optim's do): copy them, as torch.save / torch.load would
    torch_opt.load_state_dict(copy.deepcopy(flat.state_dict()))
    # a group saved without torch's implementation flags loads with torch's defaults (fused=None: its for-loop,
    # which rounds differently from the fused kernel by an ulp here and there): keep torch on its fused kernel,
    # the one pureopt's flat and per-tensor steps run, so that the comparison below is bitwise on every CPU
    torch_opt.param_groups[0]["fused"] = True
    per_tensor_params = clones(params)
    per_tensor = pureopt.TorchOptimizer(per_tensor_params, pureopt.adamw, lr=0.01, weight_decay=0.1)
    per_tensor.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    back_params = clones(params)
    back = pureopt.TorchOptimizer(back_params, pureopt.adamw, lr=1.0, flat=True)
    back.load_state_dict(copy.deepcopy(per_tensor.state_dict()))
    for opt, ps in ((flat, params), (torch_opt, torch_params), (per_tensor, per_tensor_params), (back, back_params)):
        for p, g in zip(ps, grads_for(ps, 9)):
            p.grad = g
        opt.step()
    assert_same(back_params, torch_params, "flat -> torch -> per-tensor -> flat")
    assert_same(params, torch_params, "flat")
    assert_same_state(back.state_dict(), torch_opt.state_dict())
    # every parameter gets its own step tensor in the checkpoint (torch's fused kernels add to each one)
    steps = [entry["step"] for entry in back.state_dict()["state"].values()]
    assert len({id(s) for s in steps}) == len(steps)


def test_failed_load_leaves_flat_optimizer_unchanged():
    params = make_params(mixed=False)
    opt = pureopt.TorchOptimizer(params, pureopt.adam, lr=0.01, flat=True)
    run(opt, params, 3)
    saved = opt.state_dict()
    bad = {**saved, "state": {**saved["state"], 1: {**saved["state"][1], "exp_avg": torch.zeros(2)}}}
    before = [p.detach().clone() for p in params]
    state_before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\] has shape \(2,\)"):
        opt.load_state_dict(bad)
    assert_same(params, before, "params")
    assert_same_state(opt.state_dict(), {"state": state_before})


@pytest.mark.bitwise
def test_hyperparameter_change_rebuilds_flat_state():
    """Switching amsgrad on mid-run (torch.optim cannot): against the per-tensor adapter doing the same."""
    params = make_params(mixed=False)
    ref_params = clones(params)
    opt = pureopt.TorchOptimizer(params, pureopt.adam, lr=0.01, flat=True)
    ref = pureopt.TorchOptimizer(ref_params, pureopt.adam, lr=0.01)
    run(opt, params, 6)
    run(ref, ref_params, 6)
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True  # max_exp_avg_sq starts at zero
        o.param_groups[0]["lr"] = 0.005
    for t in range(6, 9):
        for ps, o in ((params, opt), (ref_params, ref)):
            for p, g in zip(ps, grads_for(ps, t)):
                p.grad = g
            o.step()
    group = opt._groups[0].flat
    assert group is not None and group.flattened and group.uniform
    assert "max_exp_avg_sq" in opt.state[params[0]]
    assert_same(params, ref_params, "after switching amsgrad on")
    assert_same_state(opt.state_dict(), ref.state_dict())


def test_flat_needs_dense_parameters_and_changes_nothing_when_refused():
    dense = torch.randn(3, requires_grad=True)
    sparse = torch.randn(4, 4).to_sparse().requires_grad_()
    ptr = dense.data_ptr()
    with pytest.raises(ValueError, match="flat=True needs dense parameters; parameter 1"):
        pureopt.TorchOptimizer([dense, sparse], pureopt.sgd, lr=0.1, flat=True)
    assert dense.data_ptr() == ptr
    with pytest.raises(TypeError, match="flat must be a bool"):
        pureopt.TorchOptimizer([dense], pureopt.sgd, lr=0.1, flat="yes")


# --- FunctionalOptimizer ---------------------------------------------------------------------------------------


@pytest.mark.bitwise
def test_functional_flat_step_and_partial_steps_match_torch():
    """``step`` and DDP-style ``step_params`` per bucket, against torch.optim.AdamW (fused)."""
    params = make_params()
    ref_params = clones(params)
    opt = pureopt.FunctionalOptimizer(params, pureopt.adamw(lr=0.01, weight_decay=0.1), flat=True)
    torch_opt = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.1, fused=True)
    for t in range(6):
        grads = grads_for(params, t)
        if t % 2:
            opt.step(grads)
        else:  # two "buckets", each its own call: one optimizer step
            opt.step_params(params[:2], grads[:2])
            opt.step_params(params[2:], grads[2:])
            opt.end_step()
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        torch_opt.step()
    assert_same(params, ref_params, "FunctionalOptimizer(flat=True)")
    assert_same_state(opt.state_dict(), torch_opt.state_dict())
    assert opt.state_dict()["pureopt"]["groups"][0]["globals"]["num_updates"].item() == 6


@pytest.mark.bitwise
def test_functional_flat_checkpoint_roundtrip():
    params = make_params(mixed=False)
    opt = pureopt.FunctionalOptimizer(params, pureopt.sgd(lr=0.1, momentum=0.9), flat=True)
    for t in range(3):
        opt.step(grads_for(params, t))
    other_params = clones(params)
    other = pureopt.FunctionalOptimizer(other_params, pureopt.sgd(lr=0.1, momentum=0.9))
    other.load_state_dict(opt.state_dict())
    back_params = clones(params)
    back = pureopt.FunctionalOptimizer(back_params, pureopt.sgd(lr=0.1, momentum=0.9), flat=True)
    back.load_state_dict(other.state_dict())
    for o, ps in ((opt, params), (other, other_params), (back, back_params)):
        o.step(grads_for(ps, 7))
    assert_same(back_params, other_params, "flat <- per-tensor")
    assert_same(params, other_params, "flat")


# --- the flatten transformation ----------------------------------------------------------------------------------


def run_flatten_against_plain(tx, flat_tx, params, steps=5):
    """``steps`` pure steps of ``tx`` and of ``flat_tx`` (its flatten) from ``params``: (params, flat params,
    flat state)."""
    state, flat_state = tx.init(params), flat_tx.init(params)
    ps, flat_ps = dict(params), dict(params)
    for t in range(steps):
        grads = dict(zip(params, grads_for(list(params.values()), t)))
        updates, state = tx.update(grads, state, ps)
        flat_updates, flat_state = flat_tx.update(grads, flat_state, flat_ps)
        ps = pureopt.apply_updates(ps, updates)
        flat_ps = pureopt.apply_updates(flat_ps, flat_updates)
    return ps, flat_ps, flat_state


@pytest.mark.bitwise
def test_flatten_matches_per_tensor_transformation():
    params = {f"p{i}": p.detach() for i, p in enumerate(make_params())}
    tx = pureopt.adamw(lr=0.01, weight_decay=0.1, impl="foreach")
    ps, flat_ps, flat_state = run_flatten_against_plain(tx, pureopt.flatten(tx), params)
    assert_same(list(flat_ps.values()), list(ps.values()), "flatten(adamw)")
    group_sizes = {
        (sum(p.numel() for p in params.values() if p.dtype == dtype),) for dtype in (torch.float32, torch.float64)
    }
    assert {t.shape for t in pureopt.tree.leaves(flat_state) if t.dim() > 0} == group_sizes


def test_flatten_under_vmap_matches_per_model_loop():
    tx = pureopt.flatten(pureopt.adam(lr=0.1))
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 5, generator=g)}
    grads = {"w": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 5, generator=g)}

    def one(p, gr):
        state = tx.init(p)
        updates, _ = tx.update(gr, state, p)
        return pureopt.apply_updates(p, updates)

    batched = torch.func.vmap(one)(params, grads)
    for k in range(4):
        single = pureopt.adam(lr=0.1)
        p = {n: v[k] for n, v in params.items()}
        updates, _ = single.update({n: v[k] for n, v in grads.items()}, single.init(p), p)
        expected = pureopt.apply_updates(p, updates)
        for name in params:
            torch.testing.assert_close(batched[name][k], expected[name], rtol=1e-6, atol=1e-7)


def test_flatten_refuses_per_tensor_math_and_partial_gradients():
    with pytest.raises(ValueError, match="flatten needs an elementwise transformation"):
        pureopt.flatten(pureopt.adafactor(lr=0.01))
    with pytest.raises(ValueError, match="flatten needs an elementwise transformation"):
        pureopt.flatten(pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.muon(lr=0.02)))
    with pytest.raises(ValueError, match="flatten needs an elementwise transformation"):
        pureopt.flatten(pureopt.lars(lr=0.1, mask=lambda params: {k: True for k in params}))
    tx = pureopt.flatten(pureopt.adam(lr=0.1))
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"flatten: the gradient at \['b'\] is None"):
        tx.update({"a": torch.ones(2), "b": None}, state, params)
    updates, same_state = tx.update({"a": None, "b": None}, state, params)
    assert updates == {"a": None, "b": None} and same_state is state


def test_flat_layout_groups_by_device_and_dtype():
    tensors = [torch.ones(2), torch.ones(3, dtype=torch.float64), torch.full((2, 2), 2.0)]
    layout = FlatLayout(tensors)
    assert [(g.dtype, g.indices, g.offsets, g.numel) for g in layout.groups] == [
        (torch.float32, (0, 2), (0, 2), 6),
        (torch.float64, (1,), (0,), 3),
    ]
    vectors = layout.gather(tensors)
    assert vectors[0].tolist() == [1, 1, 2, 2, 2, 2] and vectors[1].tolist() == [1, 1, 1]
    assert [v.shape for v in layout.views(vectors)] == [t.shape for t in tensors]
    assert layout.matches(tensors) is None
    assert "entry 1" in layout.matches([tensors[0], torch.ones(3), tensors[2]])


@pytest.mark.bitwise
def test_regroup_follows_given_groups_and_refuses_bad_ones():
    params = make_params()
    ref_params = clones(params)
    opt = pureopt.FunctionalOptimizer(params, pureopt.adam(lr=0.01), flat=True)
    ref = torch.optim.Adam(ref_params, lr=0.01, fused=True)
    opt.step(grads_for(params, 0))
    ptrs = [p.data_ptr() for p in params]
    for bad, message in (
        ([[0, 1], [3, 4]], "every tensor exactly once"),
        ([[0, 1, 2], [3, 4]], "group 0 of a flat layout is empty or mixes devices or dtypes"),
    ):
        with pytest.raises(ValueError, match=message):
            opt.regroup(bad)
        assert [p.data_ptr() for p in params] == ptrs
    opt.regroup([[4, 0], [2], [3, 1]])  # the order within a buffer is the order given
    assert opt.flat_groups() == [[4, 0], [2], [3, 1]]
    assert params[0].data_ptr() == params[4].data_ptr() + params[4].numel() * params[4].element_size()
    # a partial step covering whole buffers is a flat step on those buffers only
    grads = grads_for(params, 1)
    opt.step_params([params[i] for i in (4, 0, 2)], [grads[i] for i in (4, 0, 2)])
    opt.step_params([params[i] for i in (3, 1)], [grads[i] for i in (3, 1)])
    opt.end_step()
    assert opt._flat is not None and opt._flat.uniform
    for t in range(2):
        for p, g in zip(ref_params, grads_for(ref_params, t)):
            p.grad = g
        ref.step()
    assert_same(params, ref_params, "after regroup")
    assert_same_state(opt.state_dict(), ref.state_dict())


# --- segmentwise transformations: per-tensor reductions computed per parameter on the flat buffers --------------

SEGMENTWISE = {
    "lamb": lambda: pureopt.lamb(lr=0.01, weight_decay=0.1),
    "lars": lambda: pureopt.lars(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "clip_by_global_norm+adam": lambda: pureopt.chain(pureopt.clip_by_global_norm(0.5), pureopt.adam(lr=0.01)),
    "clip_by_block_rms+sgd": lambda: pureopt.chain(pureopt.clip_by_block_rms(0.1), pureopt.sgd(lr=0.1)),
    "trust_ratio chain": lambda: pureopt.chain(
        pureopt.scale_by_adam(),
        pureopt.add_decayed_weights(0.01),
        pureopt.scale_by_trust_ratio(),
        pureopt.scale_by_learning_rate(0.01),
    ),
    "inject_hyperparams(lamb)": lambda: pureopt.inject_hyperparams(pureopt.lamb)(lr=0.01, weight_decay=0.1),
}


def test_which_transformations_are_segmentwise():
    for name, make in SEGMENTWISE.items():
        assert is_segmentwise(make()) and not is_elementwise(make()), name
    assert is_segmentwise(pureopt.adam(lr=0.1))  # elementwise implies segmentwise
    masked_lars = pureopt.lars(lr=0.1, mask=lambda params: {k: True for k in params})
    for tx in (pureopt.adafactor(lr=0.01), pureopt.muon(lr=0.02), masked_lars, pureopt.novograd(lr=0.01)):
        assert not is_segmentwise(tx)
    assert not is_segmentwise(pureopt.scale_by_trust_ratio(mask=lambda params: {k: True for k in params}))
    assert not is_segmentwise(pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adafactor(lr=0.01)))


@pytest.mark.bitwise
@pytest.mark.parametrize("name", list(SEGMENTWISE))
def test_segmentwise_flat_adapter_is_bitwise_per_tensor(name):
    """The adapter steps these on the flat buffers (one flat state) and gets the per-tensor adapter's bits; the
    step counts diverge (a None gradient) and agree again on the way."""
    params_flat = make_params()
    params_ref = clones(params_flat)
    flat = pureopt.TorchOptimizer(params_flat, SEGMENTWISE[name](), flat=True)
    ref = pureopt.TorchOptimizer(params_ref, SEGMENTWISE[name]())
    group = flat._groups[0].flat
    assert group is not None and group.flattened
    run(flat, params_flat, 7)
    run(ref, params_ref, 7)
    assert_same(params_flat, params_ref, name)
    assert_same_state(flat.state_dict(), ref.state_dict())
    assert group.uniform


@pytest.mark.bitwise
@pytest.mark.parametrize("name", list(SEGMENTWISE))
def test_flatten_of_segmentwise_transformations_matches_per_tensor(name):
    params = {f"p{i}": p.detach() for i, p in enumerate(make_params())}
    ps, flat_ps, _ = run_flatten_against_plain(SEGMENTWISE[name](), pureopt.flatten(SEGMENTWISE[name]()), params)
    assert_same(list(flat_ps.values()), list(ps.values()), name)


@pytest.mark.bitwise
def test_segmentwise_runs_flat_only_on_small_parameters():
    """Above SEGMENTWISE_MAX_MEAN_BYTES per parameter a segmentwise (not elementwise) transformation keeps the
    per-tensor step (its whole-buffer passes lose to the per-tensor step's cache locality there); an elementwise
    one still runs flat. Both give the per-tensor numbers."""
    from pureopt.adapters._flat import SEGMENTWISE_MAX_MEAN_BYTES

    n = SEGMENTWISE_MAX_MEAN_BYTES // 4 + 64  # float32 elements: just above the limit
    for make, flat_expected in ((lambda: pureopt.lamb(lr=0.01), False), (lambda: pureopt.adam(lr=0.01), True)):
        params_flat = make_params(mixed=False, shapes=[(n,), (n,)])
        params_ref = clones(params_flat)
        flat = pureopt.TorchOptimizer(params_flat, make(), flat=True)
        ref = pureopt.TorchOptimizer(params_ref, make())
        group = flat._groups[0].flat
        assert group is not None and group.flattened == flat_expected
        run(flat, params_flat, 3)
        run(ref, params_ref, 3)
        assert_same(params_flat, params_ref, "big tensors")


def test_segmentwise_flat_lamb_with_odd_sizes_is_close():
    params_flat = make_params(shapes=ODD)
    params_ref = clones(params_flat)
    flat = pureopt.TorchOptimizer(params_flat, pureopt.lamb(lr=0.01, weight_decay=0.1), flat=True)
    ref = pureopt.TorchOptimizer(params_ref, pureopt.lamb(lr=0.01, weight_decay=0.1))
    run(flat, params_flat, 7)
    run(ref, params_ref, 7)
    assert_near(params_flat, params_ref, "lamb")


def test_flatten_of_lamb_under_grad_is_differentiable():
    """flatten(lamb) under torch.func.grad (the per-tensor kernels, segments joined by concatenation) against
    the unflattened LAMB: same value and same gradient of the loss after one step."""
    params = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
    target = {k: torch.randn_like(v) for k, v in params.items()}

    def after_step(tx):
        def f(ps):
            grads = {k: 2 * (v - target[k]) for k, v in ps.items()}
            updates, _ = tx.update(grads, tx.init(ps), ps)
            new = pureopt.apply_updates(ps, updates)
            return sum(((new[k] - target[k]) ** 2).sum() for k in new)

        return f

    plain = after_step(pureopt.lamb(lr=0.1, weight_decay=0.1))
    flat = after_step(pureopt.flatten(pureopt.lamb(lr=0.1, weight_decay=0.1)))
    torch.testing.assert_close(flat(params), plain(params), rtol=1e-12, atol=1e-12)
    g_plain, g_flat = torch.func.grad(plain)(params), torch.func.grad(flat)(params)
    for k in params:
        torch.testing.assert_close(g_flat[k], g_plain[k], rtol=1e-10, atol=1e-12)


@pytest.mark.bitwise
@pytest.mark.parametrize("name", ["lamb", "lars", "clip_by_global_norm+adam"])
def test_segmentwise_flat_on_a_buffer_big_enough_for_the_chunked_path(name):
    """320 small parameters (1.3 MB of float32): the flat step takes the chunked, scratch-memory kernel path
    (chunks above common.SCRATCH_MIN_BYTES); still the per-tensor adapter's bits."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(1024,)] * 300 + [(64, 64)] * 20
    start = [torch.randn(s, generator=gen) for s in shapes]
    params_flat = [p.clone().requires_grad_() for p in start]
    params_ref = [p.clone().requires_grad_() for p in start]
    flat = pureopt.TorchOptimizer(params_flat, SEGMENTWISE[name](), flat=True)
    ref = pureopt.TorchOptimizer(params_ref, SEGMENTWISE[name]())
    group = flat._groups[0].flat
    assert group is not None and group.flattened
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for a, b, g in zip(params_flat, params_ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        flat.step()
        ref.step()
    assert_same(params_flat, params_ref, name)
