"""GradScaler support: ``grad_scale`` / ``found_inf`` through torch's fused kernels, and the generic fallback.

The native path is compared bitwise with torch.optim's ``fused=True`` optimizers driven by GradScaler's contract
for them (``opt.grad_scale`` / ``opt.found_inf`` set around ``opt.step()``): both run the same kernel. The
fallback is compared with the same transformation stepped on unscaled gradients with the skipped steps left out.
The loss scale is a power of two, so unscaling is exact and every comparison can be bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import pureopt
from pureopt.adapters import _amp
from pureopt.adapters._amp import donated_step
from pureopt.base import UpdateContext, as_leaf_update
from pureopt.kernels import fused as _fused
from pureopt.kernels.fused import is_amp_native, mark_amp_native
from tests._checks import assert_unchanged, same_bits, snapshot
from tests._parity import find_state_field, loss_fn, make_data, make_params

# every comparison here is bitwise against another computation (torch's fused kernels): rerun under AVX2 too
pytestmark = pytest.mark.bitwise

SCALE = 2.0**12
STEPS = 10
SKIP = (2, 5, 6)  # steps whose (scaled) gradients hold an inf/NaN: found_inf = 1


def _init(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parity parameters, keys in the order pureopt flattens a dict (sorted), so lists line up."""
    return dict(sorted(make_params(dtype).items()))


def _grads(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    return torch.func.grad(loss_fn)(params, *data)


def _poison(grads: Sequence[torch.Tensor]) -> None:
    """What an overflow in the scaled backward pass leaves: an inf and a NaN."""
    grads[0].view(-1)[0] = float("inf")
    grads[1].view(-1)[1] = float("nan")


class _Pure:
    """pureopt's side: a transformation stepped by :func:`donated_step` over flat lists (as an adapter does)."""

    def __init__(self, tx: pureopt.GradientTransformation, init: dict[str, torch.Tensor]) -> None:
        self.tree = {k: v.clone() for k, v in init.items()}
        self.params, self.spec = pureopt.tree.flatten(self.tree)
        self.state = tx.init(self.tree)
        self.update = as_leaf_update(tx)

    def step(self, grads: list[Any], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        ctx = UpdateContext(self.spec, donate=True, apply=True, grad_scale=grad_scale, found_inf=found_inf)
        self.state = donated_step(self.update, grads, self.state, self.params, ctx)


def _run_against_torch_fused(
    make_torch: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    tx: pureopt.GradientTransformation,
    dtype: torch.dtype,
    state_keys: Sequence[str],
    *,
    scaled: bool = True,
    skip: Sequence[int] = SKIP,
) -> _Pure:
    """Both sides get the same (scaled) gradients, GradScaler's flags, and must agree bitwise after every step.

    The generic path (unscale out of place, host check) must not run: everything happens in the fused kernel.
    """
    assert is_amp_native(as_leaf_update(tx))
    with pytest.MonkeyPatch.context() as mp:
        for module in (_fused, _amp):
            mp.setattr(module, "amp_unscale", _no_fallback)
        return _run_against_torch_fused_native(make_torch, tx, dtype, state_keys, scaled=scaled, skip=skip)


def _no_fallback(*args: Any) -> None:
    raise AssertionError("the generic fallback ran instead of the fused kernel")


def _run_against_torch_fused_native(
    make_torch: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    tx: pureopt.GradientTransformation,
    dtype: torch.dtype,
    state_keys: Sequence[str],
    *,
    scaled: bool,
    skip: Sequence[int],
) -> _Pure:
    data, init = make_data(dtype), _init(dtype)
    names = list(init)
    tparams = [init[k].clone().requires_grad_(True) for k in names]
    opt = make_torch(tparams)
    mine = _Pure(tx, init)
    grad_scale = torch.tensor(SCALE) if scaled else None
    for step in range(STEPS):
        g = _grads({k: t.detach() for k, t in zip(names, tparams)}, data)
        grads = [g[k] * SCALE if scaled else g[k] for k in names]
        if step in skip:
            _poison(grads)
        found_inf = torch.tensor(1.0 if step in skip else 0.0)
        for t, gr in zip(tparams, grads):
            t.grad = gr.clone()
        opt.grad_scale, opt.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
        opt.step()
        del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]

        before_params, before_state = snapshot(mine.params), snapshot(mine.state)
        mine.step(grads, grad_scale, found_inf)
        # torch's fused kernels write the unscaled gradients back (not on a skipped step), as torch.optim does
        assert all(same_bits(gr, t.grad) for gr, t in zip(grads, tparams)), f"gradients @ {step}"
        if step in skip:
            assert_unchanged(mine.params, before_params, "a skipped step: the parameters")
            assert_unchanged(mine.state, before_state, "a skipped step: the state")
        for k, p, t in zip(names, mine.params, tparams):
            assert same_bits(p, t.detach()), f"{k} @ {step}"
            for key in state_keys:
                theirs = opt.state[t].get(key)
                if theirs is not None:
                    assert same_bits(find_state_field(mine.state, key)[k], theirs), f"state {key} of {k} @ {step}"
    assert int(mine.state.num_updates) == STEPS - len(skip)
    return mine


# --- native: torch's fused kernels ------------------------------------------------------------------------------

SGD_CASES = [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
    {"weight_decay": 0.01},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(kw))
def test_sgd_matches_torch_fused(kw: dict[str, Any], dtype: torch.dtype) -> None:
    _run_against_torch_fused(
        lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True, **kw),
        pureopt.sgd(0.05, **kw),
        dtype,
        ["momentum_buffer"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("algo", ["Adam", "AdamW", "Adam+L2"])
def test_adam_adamw_match_torch_fused(algo: str, amsgrad: bool, dtype: torch.dtype) -> None:
    wd = {"Adam": 0.0, "AdamW": 0.1, "Adam+L2": 0.01}[algo]
    torch_class = torch.optim.AdamW if algo == "AdamW" else torch.optim.Adam
    factory = pureopt.adamw if algo == "AdamW" else pureopt.adam
    _run_against_torch_fused(
        lambda ps: torch_class(ps, lr=0.01, weight_decay=wd, amsgrad=amsgrad, fused=True),
        factory(0.01, weight_decay=wd, amsgrad=amsgrad),
        dtype,
        ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adagrad_matches_torch_fused(dtype: torch.dtype) -> None:
    kw = {"lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}
    _run_against_torch_fused(
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True, **kw),
        pureopt.adagrad(0.1, **kw),
        dtype,
        ["step", "sum"],
    )


@pytest.mark.parametrize(
    "make_torch,tx,keys",
    [
        (
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
            pureopt.sgd(0.05, 0.9),
            ["momentum_buffer"],
        ),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), pureopt.adamw(0.01), ["step", "exp_avg"]),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True), pureopt.adagrad(0.1), ["step", "sum"]),
    ],
    ids=["sgd", "adamw", "adagrad"],
)
def test_already_unscaled_grads_found_inf_only(make_torch: Any, tx: Any, keys: list[str]) -> None:
    """``scaler.unscale_(opt)`` was called first: ``grad_scale=None``, only ``found_inf`` is set."""
    _run_against_torch_fused(make_torch, tx, torch.float32, keys, scaled=False)


def test_sgd_skipped_first_step_keeps_the_zero_buffer() -> None:
    """A skipped first step leaves the momentum buffers at zero: the next step is a proper first step.

    (torch.optim.SGD(fused=True) keeps the uninitialised buffers it allocated for that step instead.)
    """
    data, init = make_data(torch.float32), _init(torch.float32)
    names = list(init)
    skipped, fresh = _Pure(pureopt.sgd(0.05, 0.9), init), _Pure(pureopt.sgd(0.05, 0.9), init)
    g = _grads(init, data)
    poisoned = [g[k] * SCALE for k in names]
    _poison(poisoned)
    skipped.step(poisoned, torch.tensor(SCALE), torch.tensor(1.0))
    assert all(not b.any() for b in pureopt.tree.leaves(skipped.state.momentum_buffer))
    for side in (skipped, fresh):
        side.step([g[k] * SCALE for k in names], torch.tensor(SCALE), torch.tensor(0.0))
    assert all(same_bits(a, b) for a, b in zip(skipped.params, fresh.params))
    assert all(same_bits(a, b) for a, b in zip(snapshot(skipped.state), snapshot(fresh.state)))


def test_found_inf_summed_over_devices_still_skips() -> None:
    """GradScaler sums its per-device flags (2.0 for two devices); torch's kernels skip on exactly 1.0 only."""
    init = _init(torch.float32)
    mine = _Pure(pureopt.adam(0.01), init)
    grads = [torch.ones_like(p) for p in mine.params]
    before = snapshot(mine.params), snapshot(mine.state)
    mine.step(grads, torch.tensor(SCALE), torch.tensor(2.0))
    assert_unchanged(mine.params, before[0], "the parameters")
    assert_unchanged(mine.state, before[1], "the state")


# --- fallback: everything else ----------------------------------------------------------------------------------


def _run_fallback(tx_factory: Callable[[], pureopt.GradientTransformation], dtype: torch.dtype = torch.float32) -> None:
    """Through the fallback (scaled gradients, found_inf) == the same transformation on unscaled gradients with
    the skipped steps left out, bitwise; a skipped step changes nothing."""
    data, init = make_data(dtype), _init(dtype)
    names = list(init)
    mine, ref = _Pure(tx_factory(), init), _Pure(tx_factory(), init)
    grad_scale = torch.tensor(SCALE)
    for step in range(STEPS):
        g = _grads(dict(zip(names, ref.params)), data)
        grads = [g[k] * SCALE for k in names]
        if step in SKIP:
            _poison(grads)
        before = snapshot(mine.params), snapshot(mine.state), snapshot(grads)
        mine.step(grads, grad_scale, torch.tensor(1.0 if step in SKIP else 0.0))
        assert_unchanged(grads, before[2], "the gradients")
        if step in SKIP:
            assert_unchanged(mine.params, before[0], "a skipped step: the parameters")
            assert_unchanged(mine.state, before[1], "a skipped step: the state")
            continue
        ref.step([g[k] for k in names], None, None)
        assert all(same_bits(a, b) for a, b in zip(mine.params, ref.params)), f"params @ {step}"
        assert all(same_bits(a, b) for a, b in zip(snapshot(mine.state), snapshot(ref.state))), f"state @ {step}"


FALLBACK = {
    "rmsprop": lambda: pureopt.rmsprop(0.01, momentum=0.9, centered=True),
    "lion": lambda: pureopt.lion(1e-3, weight_decay=0.1),
    "chain_clip_adam": lambda: pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adam(0.01)),
    "inject_hyperparams_sgd": lambda: pureopt.inject_hyperparams(pureopt.sgd)(lr=0.05, momentum=0.9),
}


@pytest.mark.parametrize("name", list(FALLBACK))
def test_fallback_unscales_and_skips(name: str) -> None:
    assert not is_amp_native(as_leaf_update(FALLBACK[name]()))
    _run_fallback(FALLBACK[name])


NOT_FUSED_HERE = {
    "adam_foreach": lambda: pureopt.adam(0.01, impl="foreach"),
    "adamw_fp32_state_of_bf16": lambda: pureopt.adamw(0.01, state_dtype=torch.float32),
    "sgd_dampening": lambda: pureopt.sgd(0.05, momentum=0.9, dampening=0.5),
    "adagrad_loop": lambda: pureopt.adagrad(0.1, impl="loop"),
}


@pytest.mark.parametrize("name", list(NOT_FUSED_HERE))
def test_native_transform_off_its_fused_kernel_falls_back(name: str) -> None:
    """An AMP-native transformation whose step is not torch's own fused call unscales and skips by itself."""
    assert is_amp_native(as_leaf_update(NOT_FUSED_HERE[name]()))
    _run_fallback(NOT_FUSED_HERE[name], torch.bfloat16 if "bf16" in name else torch.float32)


@pytest.mark.parametrize(
    "make",
    [lambda: pureopt.adagrad(0.1), lambda: pureopt.sgd(0.05), lambda: pureopt.sgd(0.05, momentum=0.9)],
    ids=["adagrad", "sgd", "sgd_momentum"],
)
def test_sparse_gradients(make: Callable[[], pureopt.GradientTransformation]) -> None:
    """Sparse (COO) gradients: no fused kernel takes them (SGD with momentum densifies them first)."""
    init = {"emb": torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), "w": torch.ones(3)}
    mine, ref = _Pure(make(), init), _Pure(make(), init)
    for step in range(4):
        rows = torch.tensor([[step % 6, (step + 2) % 6]])
        sparse = torch.sparse_coo_tensor(rows, torch.full((2, 3), 0.5 + step), (6, 3), check_invariants=True)
        grads = [sparse, torch.full((3,), 0.25)]
        scaled = [g * SCALE for g in grads]
        if step == 2:
            scaled[1][0] = float("inf")
        mine.step(scaled, torch.tensor(SCALE), torch.tensor(1.0 if step == 2 else 0.0))
        if step != 2:
            ref.step(grads, None, None)
        assert all(same_bits(a, b) for a, b in zip(mine.params, ref.params)), f"params @ {step}"
        assert all(same_bits(a, b) for a, b in zip(snapshot(mine.state), snapshot(ref.state))), f"state @ {step}"


def test_no_flags_is_the_plain_donated_step() -> None:
    init = _init(torch.float32)
    grads = list(_grads(init, make_data(torch.float32)).values())
    a, b = _Pure(pureopt.adam(0.01), init), _Pure(pureopt.adam(0.01), init)
    a.step(grads, None, None)
    b.state = pureopt.inplace_step(pureopt.adam(0.01), b.spec.unflatten(grads), b.state, b.tree)
    assert all(same_bits(x, y) for x, y in zip(a.params, b.params))


def test_flags_need_a_donated_step_and_a_leaf_transformation() -> None:
    mine = _Pure(pureopt.adam(0.01), _init(torch.float32))
    ctx = UpdateContext(mine.spec, found_inf=torch.tensor(0.0))
    with pytest.raises(ValueError, match="donate=True"):
        donated_step(mine.update, [None] * len(mine.params), mine.state, mine.params, ctx)
    with pytest.raises(TypeError, match="leaf-level"):
        mark_amp_native(pureopt.stateless(lambda u, p: u))


# --- through torch.amp.GradScaler itself ------------------------------------------------------------------------


class _AmpOptimizer(torch.optim.Optimizer):
    """A minimal adapter with ``_step_supports_amp_scaling``: what TorchOptimizer.step does, via donated_step."""

    def __init__(self, params: list[torch.Tensor], tx: pureopt.GradientTransformation) -> None:
        super().__init__(params, {})
        self._step_supports_amp_scaling = True
        self.update = as_leaf_update(tx)
        self.pure_state = tx.init(list(params))

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        params = self.param_groups[0]["params"]
        ctx = UpdateContext(
            pureopt.tree.flatten(list(params))[1],
            donate=True,
            apply=True,
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
        self.pure_state = donated_step(self.update, [p.grad for p in params], self.pure_state, list(params), ctx)


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize(
    "make_torch,tx,exact",
    [
        (
            lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
            pureopt.adamw(0.01, weight_decay=0.1),
            True,
        ),
        (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), pureopt.sgd(0.05, 0.9), True),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, foreach=False), pureopt.rmsprop(0.01), False),
    ],
    ids=["adamw_fused", "sgd_fused", "rmsprop_fallback"],
)
def test_grad_scaler_drives_it_like_torch(make_torch: Any, tx: Any, exact: bool, unscale_first: bool) -> None:
    """A real GradScaler (CPU) with a changing scale, one overflow, and optionally ``scaler.unscale_`` first."""
    sides = []
    for make in (make_torch, lambda ps: _AmpOptimizer(ps, tx)):
        init = _init(torch.float32)
        params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        sides.append((params, make(list(params.values())), scaler))
    data = make_data(torch.float32)
    for step in range(8):
        for params, opt, scaler in sides:
            opt.zero_grad()
            scaler.scale(loss_fn(params, *data)).backward()
            if step == 3:
                params["w1"].grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        (theirs, _, t_scaler), (mine, m_opt, m_scaler) = sides
        for k in theirs:
            if exact:
                assert same_bits(mine[k].detach(), theirs[k].detach()), f"{k} @ {step}"
            else:
                torch.testing.assert_close(mine[k].detach(), theirs[k].detach(), rtol=1e-6, atol=1e-7)
        assert m_scaler.get_scale() == t_scaler.get_scale()
    assert int(m_opt.pure_state.num_updates) == 7
