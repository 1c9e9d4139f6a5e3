"""Ensembles over ``pureopt.FlatParams``: ``torch.func.vmap`` of a pure training step over K members' flat buffers
stacked on a leading dimension.

Reference: K separate runs of torch.optim (``foreach=False``) on the unflattened ``torch.nn`` models, each on its
own batches, with ``loss.backward()`` (and ``torch.nn.utils.clip_grad_norm_`` per member for the clipped chain);
the learning rate changes between steps. Nothing of pureopt runs on the reference side.

Tolerance: float64, rtol 1e-11 / atol 1e-13 over 6 steps, eager and compiled. Under vmap the step takes the
per-tensor out-of-place ops on the whole (K, n) buffer, torch.optim its in-place single-tensor ops (e.g. ``addcdiv_``
against ``div`` + ``add``; ``torch.func.grad`` through one ``split`` against ``backward``; inductor fuses and
reorders the elementwise math): the same formulas in a different op order, a few ulps apart per step, which
Adam's and RMSprop's division by ``sqrt(v) + eps`` and the clip's norm amplify. The largest relative difference
seen was 1e-13 (clipped AdamW, centered RMSprop); SGD and the per-member-lr sweep stay below 4e-15.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot
from torch._dynamo.utils import counters
from torch.func import functional_call, grad, stack_module_state, vmap

import pureopt
from pureopt.flat_params import FlatParams
from pureopt.wrappers import inject_hyperparams

K = 3  # ensemble members
STEPS = 6
LR_SCALE = [1.0, 0.8, 1.2, 0.5, 1.0, 0.7]  # the lr at each step, as a multiple of the configuration's
TOL = dict(rtol=1e-11, atol=1e-13)


def _make_models(dtype: torch.dtype = torch.float64) -> list[torch.nn.Module]:
    """K small MLPs with different initialisations (sizes with scalar tails in torch's vector kernels)."""
    models = []
    for m in range(K):
        torch.manual_seed(10 + m)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        models.append(net.to(dtype))
    return models


def _batches(dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: inputs (K, 8, 5) and targets (K, 8, 3), one batch per member."""
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(K, 8, 5, generator=gen, dtype=dtype), torch.randn(K, 8, 3, generator=gen, dtype=dtype))
        for _ in range(STEPS)
    ]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


class _TorchMember:
    """One member trained alone by torch.optim, as torch users write it."""

    def __init__(self, model: torch.nn.Module, cls: str, kw: dict[str, Any], clip: float | None) -> None:
        self.model = copy.deepcopy(model)
        self.kw, self.clip = kw, clip
        self.opt = getattr(torch.optim, cls)(self.model.parameters(), foreach=False, **kw)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        self.opt.zero_grad()
        _mse(self.model(x), y).backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=False)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()


# (id, pureopt factory, torch.optim class, kwargs, clip norm or None)
CASES: list[tuple[str, Callable[..., pureopt.GradientTransformation], str, dict[str, Any], float | None]] = [
    ("adamw", pureopt.adamw, "AdamW", dict(lr=0.02, weight_decay=0.1), None),
    ("sgd-momentum", pureopt.sgd, "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), None),
    ("rmsprop-centered", pureopt.rmsprop, "RMSprop", dict(lr=0.01, momentum=0.9, centered=True), None),
    ("adam-amsgrad", pureopt.adam, "Adam", dict(lr=0.02, amsgrad=True, weight_decay=0.01), None),
    # segmentwise: each member is clipped by its own global norm (not the ensemble's)
    ("clip-adamw", pureopt.adamw, "AdamW", dict(lr=0.02, weight_decay=0.1), 0.05),
]


def _build(
    factory: Callable[..., pureopt.GradientTransformation], kw: dict[str, Any], clip: float | None, lr: torch.Tensor
) -> pureopt.GradientTransformation:
    tx = factory(**{**kw, "lr": lr})
    return pureopt.chain(pureopt.clip_by_global_norm(clip), tx) if clip is not None else tx


def _ensemble(
    models: list[torch.nn.Module], max_buffer_bytes: int | None = None
) -> tuple[FlatParams, tuple[torch.Tensor, ...], torch.nn.Module]:
    """The layout of one member, the members' buffers stacked on dim 0, and a parameterless skeleton."""
    stacked_tree, _ = stack_module_state(models)  # each leaf (K, *shape)
    stacked_tree = {k: v.detach() for k, v in stacked_tree.items()}
    flat = FlatParams({k: v.detach() for k, v in models[0].named_parameters()}, max_buffer_bytes=max_buffer_bytes)
    buffers = vmap(flat.flatten)(stacked_tree)  # per buffer: (K, n)
    return flat, buffers, copy.deepcopy(models[0]).to("meta")


def _check_members(
    flat: FlatParams, buffers: tuple[torch.Tensor, ...], refs: list[_TorchMember], t: int, tol: dict[str, float]
) -> None:
    for m, ref in enumerate(refs):
        mine = flat.views(tuple(b[m] for b in buffers))
        for k, theirs in ref.model.named_parameters():
            torch.testing.assert_close(mine[k], theirs.detach(), **tol, msg=f"member {m} {k} @ step {t}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("max_buffer_bytes", [None, 200], ids=["one-buffer", "chunked"])
def test_vmapped_flat_step_equals_k_torch_optim_runs(case: tuple, max_buffer_bytes: int | None) -> None:
    """``vmap`` of (``grad`` through ``flat.views`` + ``pureopt.step``) over K stacked members, lr a 0-d tensor
    changed between steps, one buffer per dtype or cut into several; the stacked inputs stay unchanged."""
    _, factory, cls, kw, clip = case
    models = _make_models()
    flat, buffers, skeleton = _ensemble(models, max_buffer_bytes)
    assert flat.num_groups == (1 if max_buffer_bytes is None else 3)
    lr = torch.tensor(kw["lr"], dtype=torch.float64)
    tx = flat.wrap(_build(factory, kw, clip, lr))
    state = vmap(tx.init)(buffers)
    refs = [_TorchMember(model, cls, kw, clip) for model in models]

    def loss_of(buffers: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mse(functional_call(skeleton, flat.views(buffers), (x,)), y)

    def train_step(buffers: Any, state: Any, x: torch.Tensor, y: torch.Tensor) -> Any:  # one member
        return pureopt.step(tx, grad(loss_of)(buffers, x, y), state, buffers)

    for t, (xs, ys) in enumerate(_batches()):
        lr.fill_(kw["lr"] * LR_SCALE[t])
        before = snapshot((buffers, state))
        new_buffers, new_state = vmap(train_step)(buffers, state, xs, ys)
        assert_unchanged((buffers, state), before, "the stacked buffers and state")
        assert [b.shape for b in new_buffers] == [b.shape for b in buffers]
        buffers, state = new_buffers, new_state
        for m, ref in enumerate(refs):
            ref.step(xs[m], ys[m], kw["lr"] * LR_SCALE[t])
        _check_members(flat, buffers, refs, t, TOL)
    # the state is per member too: torch's moments, laid out flat, one row per member
    if cls in ("AdamW", "Adam"):
        inner = state[1] if clip is not None else state
        for m, ref in enumerate(refs):
            exp_avg = flat.views(tuple(e[m] for e in inner.exp_avg))
            for k, p in ref.model.named_parameters():
                torch.testing.assert_close(exp_avg[k], ref.opt.state[p]["exp_avg"], **TOL, msg=f"exp_avg {m} {k}")


def test_compiled_vmapped_flat_step_equals_k_torch_optim_runs() -> None:
    """The vmapped ensemble step under ``torch.compile(fullgraph=True)`` (inductor): one graph while the lr and
    the step counts change, no graph breaks, against K torch.optim.AdamW runs. Donation is asked for and, under
    vmap, not honoured: the old buffers stay as they were."""
    torch._dynamo.reset()
    counters.clear()
    models = _make_models()
    flat, buffers, skeleton = _ensemble(models)
    kw = dict(lr=0.02, weight_decay=0.1)
    lr = torch.tensor(kw["lr"], dtype=torch.float64)
    tx = flat.wrap(pureopt.adamw(**{**kw, "lr": lr}))
    # vmap returns the counters (which do not depend on the buffers) expanded, stride 0; the step returns them
    # contiguous: cloned once here, the compiled step sees the same strides at every step and is not recompiled
    state = pureopt.tree.tree_map(torch.clone, vmap(tx.init)(buffers))
    assert all(0 not in x.stride() for x in pureopt.tree.leaves(state))
    refs = [_TorchMember(model, "AdamW", kw, None) for model in models]

    def loss_of(buffers: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mse(functional_call(skeleton, flat.views(buffers), (x,)), y)

    def member_step(grads: Any, state: Any, buffers: Any) -> Any:
        return pureopt.step(tx, grads, state, buffers, donate=("params", "state"))

    @torch.compile(fullgraph=True)
    def opt_step(grads: Any, state: Any, buffers: Any) -> Any:
        return vmap(member_step)(grads, state, buffers)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for t, (xs, ys) in enumerate(_batches()):
            lr.fill_(kw["lr"] * LR_SCALE[t])
            grads = vmap(grad(loss_of))(buffers, xs, ys)
            before = snapshot((buffers, state))
            new_buffers, new_state = opt_step(grads, state, buffers)
            assert_unchanged((buffers, state), before, "the buffers and state (donation not honoured under vmap)")
            buffers, state = new_buffers, new_state
            for m, ref in enumerate(refs):
                ref.step(xs[m], ys[m], kw["lr"] * LR_SCALE[t])
            _check_members(flat, buffers, refs, t, TOL)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_one_learning_rate_per_member() -> None:
    """A sweep: ``inject_hyperparams`` keeps lr in the state, one value per member (the stacked state's
    ``hyperparams["lr"]``); member m equals torch.optim.SGD(momentum) run alone with lrs[m]."""
    lrs = [0.1, 0.03, 0.01]
    models = _make_models()
    flat, buffers, skeleton = _ensemble(models)
    tx = flat.wrap(inject_hyperparams(pureopt.sgd, static_args=("momentum",))(lr=0.1, momentum=0.9))
    state = vmap(tx.init)(buffers)
    state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(lrs, dtype=torch.float64)})
    refs = [_TorchMember(model, "SGD", dict(lr=lr, momentum=0.9), None) for model, lr in zip(models, lrs)]

    def train_step(buffers: Any, state: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        grads = grad(lambda b: _mse(functional_call(skeleton, flat.views(b), (x,)), y))(buffers)
        return pureopt.step(tx, grads, state, buffers)

    for t, (xs, ys) in enumerate(_batches()):
        buffers, state = vmap(train_step)(buffers, state, xs, ys)
        for m, ref in enumerate(refs):
            ref.step(xs[m], ys[m], lrs[m])
        _check_members(flat, buffers, refs, t, TOL)


def test_stacked_buffers_outside_vmap_are_refused() -> None:
    """Stacked (K, n) buffers given to the step itself (not vmapped) raise a ValueError that says to vmap it, before
    anything is computed; so do members whose buffers have another layout."""
    models = _make_models()
    flat, buffers, _ = _ensemble(models)
    tx = flat.wrap(pureopt.adamw(lr=0.01))
    state = vmap(tx.init)(buffers)
    grads = tuple(torch.ones_like(b) for b in buffers)
    before = snapshot((grads, state, buffers))
    with pytest.raises(ValueError, match=r"stacked ensemble.*torch\.func\.vmap"):
        pureopt.step(tx, grads, state, buffers)
    with pytest.raises(ValueError, match=r"stacked ensemble.*torch\.func\.vmap"):
        tx.init(buffers)
    with pytest.raises(ValueError, match=r"flat gradients\[0\] is torch.float64 \(50,\) on cpu; the layout has"):
        vmap(lambda g, s, b: pureopt.step(tx, g, s, b))(tuple(g[:, :50] for g in grads), state, buffers)
    assert_unchanged((grads, state, buffers), before, "inputs")
