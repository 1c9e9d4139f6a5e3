"""adagrad / adadelta / adamax / asgd / sparse_adam (and sgd with sparse gradients) against torch.optim itself.

Parity runs use tests/_parity.py (25 steps, None gradients, a 0-d and an empty parameter); sparse runs use
``F.embedding(..., sparse=True)`` gradients. Convergence tests compare with closed-form optima.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from _checks import assert_unchanged, snapshot
from _parity import make_params, run_parity, tolerances
from hypothesis import given, settings
from hypothesis import strategies as st

import pureopt
from pureopt.algorithms.adadelta import adadelta, scale_by_adadelta
from pureopt.algorithms.adagrad import adagrad, scale_by_adagrad
from pureopt.algorithms.adamax import adamax, scale_by_adamax
from pureopt.algorithms.asgd import asgd
from pureopt.algorithms.sgd import sgd
from pureopt.algorithms.sparse_adam import sparse_adam
from pureopt.combine import chain
from pureopt.transforms.scale import scale_by_learning_rate

DTYPES = [torch.float64, torch.float32]


IMPLS = ["loop", "foreach"]

STATE_KEYS = {
    "adagrad": ["step", "sum"],
    "adadelta": ["step", "square_avg", "acc_delta"],
    "adamax": ["step", "exp_avg", "exp_inf"],
    "asgd": ["step", "eta", "mu", "ax"],
    "sparse_adam": ["step", "exp_avg", "exp_avg_sq"],
    "sgd": ["momentum_buffer"],
}
TORCH = {
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "asgd": torch.optim.ASGD,
    "sparse_adam": torch.optim.SparseAdam,
    "sgd": torch.optim.SGD,
}
OURS = {
    "adagrad": adagrad,
    "adadelta": adadelta,
    "adamax": adamax,
    "asgd": asgd,
    "sparse_adam": sparse_adam,
    "sgd": sgd,
}

# Each grid covers every pair of flag values (a pairwise design) rather than the full product, plus extras.
_OFF_ON = [(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 0, 1), (0, 1, 1, 0), (1, 0, 1, 0), (0, 1, 0, 1)]  # 4 two-level flags
_OFF_ON3 = [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]  # 3 two-level flags


def _pick(levels, row):
    return [lv[i] for lv, i in zip(levels, row)]


ADAGRAD_GRID = [
    dict(lr=0.1, lr_decay=ld, weight_decay=wd, initial_accumulator_value=iv, maximize=mx)
    for ld, wd, iv, mx in (_pick([[0.0, 0.05], [0.0, 0.1], [0.0, 0.3], [False, True]], r) for r in _OFF_ON)
] + [dict(lr=0.05, eps=1e-3)]
ADADELTA_GRID = [
    dict(lr=lr_rho[0], rho=lr_rho[1], weight_decay=wd, maximize=mx)
    for lr_rho, wd, mx in (_pick([[(1.0, 0.9), (0.5, 0.5)], [0.0, 0.1], [False, True]], r) for r in _OFF_ON3)
] + [dict(eps=1e-3, rho=1.0), dict(rho=0.0)]
ADAMAX_GRID = [
    dict(lr=0.02, betas=b, weight_decay=wd, maximize=mx)
    for b, wd, mx in (_pick([[(0.9, 0.999), (0.5, 0.8)], [0.0, 0.1], [False, True]], r) for r in _OFF_ON3)
] + [dict(lr=0.02, eps=1e-2)]
ASGD_GRID = [
    dict(lr=0.05, lambd=lt[0], t0=lt[1], weight_decay=wd, maximize=mx)
    for lt, wd, mx in (_pick([[(1e-4, 1e6), (0.05, 5.0)], [0.0, 0.1], [False, True]], r) for r in _OFF_ON3)
] + [dict(lr=0.05, lambd=0.1, alpha=1.0, t0=0.0), dict(lr=0.05, lambd=0.02, alpha=0.5, t0=12.0, weight_decay=0.05)]

GRIDS = {"adagrad": ADAGRAD_GRID, "adadelta": ADADELTA_GRID, "adamax": ADAMAX_GRID, "asgd": ASGD_GRID}


def _id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items())


PARITY_CASES = [pytest.param(name, flags, id=f"{name}:{_id(flags)}") for name, grid in GRIDS.items() for flags in grid]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,flags", PARITY_CASES)
def test_matches_torch(name, flags, dtype, impl):
    run_parity(
        lambda p: TORCH[name](p, **flags),
        OURS[name](impl=impl, **flags),
        dtype,
        state_keys=STATE_KEYS[name],
        maximize=flags.get("maximize", False),
    )


@pytest.mark.parametrize("name", ["adagrad", "adadelta", "adamax", "asgd"])
def test_defaults_match_torch(name):
    run_parity(TORCH[name], OURS[name](), torch.float64, state_keys=STATE_KEYS[name])


@pytest.mark.parametrize("name", ["adagrad", "adadelta", "adamax", "asgd"])
def test_state_fields_are_torch_state_keys(name):
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = TORCH[name]([p])
    opt.step()
    state = OURS[name]().init({"p": p.detach()})
    assert state._fields[0] == "num_updates"
    assert set(state._fields[1:]) == set(opt.state[p])


# --- hypothesis-drawn hyperparameters


@settings(max_examples=20, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    lr_decay=st.floats(0.0, 0.5),
    weight_decay=st.floats(0.0, 0.5),
    initial_accumulator_value=st.floats(0.0, 2.0),
    eps=st.floats(1e-10, 1e-1),
    maximize=st.booleans(),
    impl=st.sampled_from(IMPLS),
)
def test_adagrad_hypothesis(lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize, impl):
    flags = dict(
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
        maximize=maximize,
    )
    run_parity(
        lambda p: torch.optim.Adagrad(p, **flags),
        adagrad(impl=impl, **flags),
        torch.float64,
        state_keys=STATE_KEYS["adagrad"],
        maximize=maximize,
    )


@settings(max_examples=8, deadline=None)
@given(
    lr=st.floats(1e-3, 1.0),  # rho near 1 with a large lr is plain SGD with a large step: both sides diverge
    rho=st.floats(0.0, 0.99),
    eps=st.floats(1e-8, 1e-1),
    weight_decay=st.floats(0.0, 0.5),
    maximize=st.booleans(),
)
def test_adadelta_hypothesis(lr, rho, eps, weight_decay, maximize):
    flags = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    run_parity(
        lambda p: torch.optim.Adadelta(p, **flags),
        adadelta(**flags),
        torch.float64,
        state_keys=STATE_KEYS["adadelta"],
        maximize=maximize,
    )


@settings(max_examples=8, deadline=None)
@given(
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.9999),
    eps=st.floats(1e-10, 1e-1),
    weight_decay=st.floats(0.0, 0.5),
    maximize=st.booleans(),
)
def test_adamax_hypothesis(lr, beta1, beta2, eps, weight_decay, maximize):
    flags = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize)
    run_parity(
        lambda p: torch.optim.Adamax(p, **flags),
        adamax(**flags),
        torch.float64,
        state_keys=STATE_KEYS["adamax"],
        maximize=maximize,
    )


@settings(max_examples=8, deadline=None)
@given(
    lr=st.floats(1e-4, 0.1),
    lambd=st.floats(0.0, 0.5),
    alpha=st.floats(0.0, 1.5),
    t0=st.floats(0.0, 30.0),
    weight_decay=st.floats(0.0, 0.5),
    maximize=st.booleans(),
)
def test_asgd_hypothesis(lr, lambd, alpha, t0, weight_decay, maximize):
    flags = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize)
    run_parity(
        lambda p: torch.optim.ASGD(p, **flags),
        asgd(**flags),
        torch.float64,
        state_keys=STATE_KEYS["asgd"],
        maximize=maximize,
    )


# --- learning rate as a tensor or a schedule

LR_CASES = {"adagrad": {"lr_decay": 0.01}, "adadelta": {}, "adamax": {}, "asgd": {"lambd": 0.05, "t0": 4.0}}


@pytest.mark.parametrize("name", list(LR_CASES))
def test_tensor_lr_is_read_at_each_update(name):
    lr = torch.tensor(0.05, dtype=torch.float64)
    torch_lr = torch.tensor(0.05, dtype=torch.float64)

    def before(step, opt):
        if step == 10:
            torch_lr.fill_(0.02)
            lr.fill_(0.02)

    run_parity(
        lambda p: TORCH[name](p, lr=torch_lr, **LR_CASES[name]),
        OURS[name](lr=lr, **LR_CASES[name]),
        torch.float64,
        state_keys=STATE_KEYS[name],
        before_step=before,
    )


@pytest.mark.parametrize("name", list(LR_CASES))
def test_schedule_lr_matches_torch_with_manual_lr(name):
    def schedule(count):
        return 0.08 * 0.9 ** torch.as_tensor(count, dtype=torch.float64)

    def before(step, opt):
        opt.param_groups[0]["lr"] = 0.08 * 0.9**step

    run_parity(
        lambda p: TORCH[name](p, lr=0.08, **LR_CASES[name]),
        OURS[name](lr=schedule, **LR_CASES[name]),
        torch.float64,
        state_keys=STATE_KEYS[name],
        before_step=before,
    )


# --- primitives (lr=None) chained with a learning rate


@pytest.mark.parametrize(
    "name,primitive,flags",
    [
        ("adagrad", lambda impl: scale_by_adagrad(0.2, 1e-6, impl=impl), dict(initial_accumulator_value=0.2, eps=1e-6)),
        ("adadelta", lambda impl: scale_by_adadelta(0.8, 1e-5, impl=impl), dict(rho=0.8, eps=1e-5)),
        ("adamax", lambda impl: scale_by_adamax((0.8, 0.99), 1e-6, impl=impl), dict(betas=(0.8, 0.99), eps=1e-6)),
    ],
    ids=["adagrad", "adadelta", "adamax"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_primitive_chained_with_lr_matches_torch(name, primitive, flags, impl):
    run_parity(
        lambda p: TORCH[name](p, lr=0.03, **flags),
        chain(primitive(impl), scale_by_learning_rate(0.03)),
        torch.float64,
        state_keys=STATE_KEYS[name],
    )


# --- sparse gradients (nn.Embedding(sparse=True))

EMB_SHAPES = {"emb1": (10, 3), "emb2": (7, 3)}
SPARSE_NONE_GRADS = {0: ("emb2",), 3: ("emb1",), 11: ("emb2",)}
EMPTY_BATCH_STEPS = (2, 7)  # emb2 sees no index at these steps: a sparse gradient with no entries


def _sparse_init(dtype, dense: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {**EMB_SHAPES, **({"w": (2, 3), "gain": ()} if dense else {})}
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def _sparse_grads(params: dict[str, torch.Tensor], step: int, sign: float = 1.0) -> dict[str, torch.Tensor | None]:
    """Gradients of a loss through two sparse embeddings (with repeated indices) and, if present, dense params."""
    gen = torch.Generator().manual_seed(1000 + step)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    idx1 = torch.randint(0, EMB_SHAPES["emb1"][0], (6,), generator=gen)
    idx2 = torch.randint(0, EMB_SHAPES["emb2"][0], (4,), generator=gen)
    if step in EMPTY_BATCH_STEPS:
        idx2 = idx2[:0]
    e1 = F.embedding(idx1, leaves["emb1"], sparse=True)
    e2 = F.embedding(idx2, leaves["emb2"], sparse=True)
    loss = (torch.tanh(e1).sum(0) ** 2).sum() + torch.sin(e2).sum() + 0.1 * (e2**2).sum()
    if "w" in leaves:
        loss = loss + (leaves["gain"] * torch.tanh(leaves["w"] @ e1.sum(0))).pow(2).sum() + 0.01 * leaves["gain"] ** 4
    (sign * loss).backward()
    grads: dict[str, torch.Tensor | None] = {k: v.grad for k, v in leaves.items()}
    assert grads["emb1"] is not None and grads["emb1"].is_sparse
    for k in SPARSE_NONE_GRADS.get(step, ()):
        grads[k] = None
    return grads


def _dense(t):
    return t.to_dense() if isinstance(t, torch.Tensor) and t.is_sparse else t


def run_sparse_parity(
    torch_factory, tx, dtype, state_keys, dense=True, maximize=False, steps=25, before_step=None, tol=None
):
    """Like run_parity, with sparse embedding gradients (and dense ones for the other params when ``dense``)."""
    sign = -1.0 if maximize else 1.0
    tol = tol or tolerances(dtype)
    init = _sparse_init(dtype, dense)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = torch_factory(list(torch_params.values()))
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    for step in range(steps):
        tg = _sparse_grads({k: t.detach() for k, t in torch_params.items()}, step, sign)
        for k, t in torch_params.items():
            t.grad = tg[k]
        if before_step is not None:
            before_step(step, opt)
        opt.step()
        updates, state = tx.update(_sparse_grads(params, step, sign), state, params)
        params = pureopt.apply_updates(params, updates)
        for k, t in torch_params.items():
            assert params[k].layout == torch.strided and params[k].dtype == dtype
            torch.testing.assert_close(params[k], t.detach(), **tol, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
            for key in state_keys:
                theirs = opt.state.get(t, {}).get(key)
                if theirs is None:
                    continue
                theirs = torch.as_tensor(_dense(theirs))
                mine = getattr(state, key)[k]
                torch.testing.assert_close(
                    mine.to(theirs.dtype), theirs, **tol, msg=lambda m, k=k, s=step, key=key: f"{key} {k} @ {s}: {m}"
                )
    return state


SPARSE_SGD_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, maximize=mx)
    for m, d, n, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]
SPARSE_ADAGRAD_GRID = [
    dict(lr_decay=ld, initial_accumulator_value=iv, maximize=mx)
    for ld, iv, mx in (_pick([[0.0, 0.05], [0.0, 0.3], [False, True]], r) for r in _OFF_ON3)
]
SPARSE_IMPLS = ["loop", "foreach"]  # sparse gradients always take the loop; the dense ones take the given impl


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SPARSE_ADAGRAD_GRID, ids=_id)
def test_adagrad_sparse_matches_torch(flags, dtype, impl):
    state = run_sparse_parity(
        lambda p: torch.optim.Adagrad(p, lr=0.1, **flags),
        adagrad(lr=0.1, impl=impl, **flags),
        dtype,
        STATE_KEYS["adagrad"],
        maximize=flags["maximize"],
    )
    assert all(s.layout == torch.strided for s in state.sum.values())


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SPARSE_SGD_GRID, ids=_id)
def test_sgd_sparse_matches_torch(flags, dtype, impl):
    tol = None
    if dtype == torch.float32 and flags["momentum"] != 0:
        # torch keeps the momentum buffer as an uncoalesced sparse tensor whose entries are added to the
        # parameter one at a time (one rounding each, ~25 per row after 25 steps): torch's own fp32 result is
        # only that accurate. fp64 runs (both sides exact to ~1e-15) hold the 1e-10 tolerance.
        tol = {"rtol": 1e-4, "atol": 1e-5}
    run_sparse_parity(
        lambda p: torch.optim.SGD(p, lr=0.05, **flags),
        sgd(lr=0.05, impl=impl, **flags),
        dtype,
        STATE_KEYS["sgd"],
        maximize=flags["maximize"],
        tol=tol,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "flags", [dict(), dict(maximize=True), dict(betas=(0.5, 0.8), eps=1e-3), dict(betas=(0.0, 0.0))], ids=_id
)
def test_sparse_adam_matches_torch(flags, dtype):
    state = run_sparse_parity(
        lambda p: torch.optim.SparseAdam(p, lr=0.05, **flags),
        sparse_adam(lr=0.05, **flags),
        dtype,
        STATE_KEYS["sparse_adam"],
        dense=False,
        maximize=flags.get("maximize", False),
    )
    # torch counts a step for a gradient without entries too (emb2 at the empty-batch steps)
    assert float(state.step["emb2"]) == 25 - sum(1 for s in SPARSE_NONE_GRADS.values() if "emb2" in s)


def test_sparse_adam_tensor_lr_is_read_at_each_update():
    lr = torch.tensor(0.05, dtype=torch.float64)
    torch_lr = torch.tensor(0.05, dtype=torch.float64)

    def before(step, opt):
        if step == 10:
            torch_lr.fill_(0.01)
            lr.fill_(0.01)

    run_sparse_parity(
        lambda p: torch.optim.SparseAdam(p, lr=torch_lr),
        sparse_adam(lr=lr),
        torch.float64,
        STATE_KEYS["sparse_adam"],
        dense=False,
        before_step=before,
    )


@pytest.mark.parametrize("name", ["sparse_adam", "adagrad", "sgd"])
def test_sparse_schedule_lr_matches_torch_with_manual_lr(name):
    def schedule(count):
        return 0.08 * 0.9 ** torch.as_tensor(count, dtype=torch.float64)

    def before(step, opt):
        opt.param_groups[0]["lr"] = 0.08 * 0.9**step

    extra = {"momentum": 0.9} if name == "sgd" else {}
    run_sparse_parity(
        lambda p: TORCH[name](p, lr=0.08, **extra),
        OURS[name](lr=schedule, **extra),
        torch.float64,
        STATE_KEYS[name],
        dense=name != "sparse_adam",
        before_step=before,
    )


def test_sparse_updates_only_touch_rows_in_the_gradient():
    """Adagrad / SparseAdam / plain SGD return sparse updates: rows without entries are not even added to."""
    params = {"emb": torch.randn(10, 3, dtype=torch.float64)}
    g = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1]]), torch.randn(3, 3, dtype=torch.float64), (10, 3))
    for tx in (adagrad(lr=0.1), sparse_adam(lr=0.1), sgd(lr=0.1)):
        updates, _ = tx.update({"emb": g}, tx.init(params), params)
        u = updates["emb"]
        assert u.is_sparse
        assert set(u.coalesce().indices()[0].tolist()) == {1, 4}


# --- errors: torch.optim's wording, raised before anything changes

BAD_ARGS = [
    ("adagrad", dict(lr=-1.0)),
    ("adagrad", dict(lr=torch.tensor([0.1, 0.2]))),
    ("adagrad", dict(lr_decay=-0.1)),
    ("adagrad", dict(weight_decay=-1e-3)),
    ("adagrad", dict(initial_accumulator_value=-0.5)),
    ("adagrad", dict(eps=-1e-10)),
    ("adadelta", dict(lr=-1.0)),
    ("adadelta", dict(rho=1.5)),
    ("adadelta", dict(rho=-0.1)),
    ("adadelta", dict(eps=-1.0)),
    ("adadelta", dict(weight_decay=-0.1)),
    ("adamax", dict(lr=-2e-3)),
    ("adamax", dict(eps=-1.0)),
    ("adamax", dict(betas=(1.0, 0.999))),
    ("adamax", dict(betas=(0.9, -0.1))),
    ("adamax", dict(weight_decay=-0.1)),
    ("asgd", dict(lr=-0.01)),
    ("asgd", dict(weight_decay=-0.5)),
    ("asgd", dict(lr=torch.tensor([0.1, 0.2]))),
    ("sparse_adam", dict(lr=0.0)),
    ("sparse_adam", dict(lr=-1e-3)),
    ("sparse_adam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("sparse_adam", dict(eps=0.0)),
    ("sparse_adam", dict(betas=(0.9, 1.0))),
    ("sparse_adam", dict(betas=(-0.1, 0.999))),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGS, ids=lambda v: str(v))
def test_invalid_hyperparameters_use_torch_wording(name, kwargs):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        TORCH[name]([p], **kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(str(theirs.value))}$"):
        OURS[name](**kwargs)


def _embedding_with_sparse_grad(rows: int = 5) -> torch.nn.Embedding:
    emb = torch.nn.Embedding(rows, 2, sparse=True)
    emb(torch.tensor([0, 3, 3])).sum().backward()
    return emb


@pytest.mark.parametrize("name", ["adadelta", "adamax", "asgd"])
def test_sparse_gradients_rejected_with_torch_wording(name):
    emb = _embedding_with_sparse_grad()
    with pytest.raises(RuntimeError) as theirs:
        TORCH[name](emb.parameters()).step()
    tx = OURS[name]()
    params = {"emb": emb.weight.detach().clone(), "w": torch.ones(3)}
    state = tx.init(params)
    snap = snapshot(state)
    grads = {"emb": emb.weight.grad, "w": torch.ones(3)}
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(theirs.value))}$"):
        tx.update(grads, state, params)
    assert_unchanged(state, snap, "state")


@pytest.mark.parametrize("name", ["adagrad", "sgd"])
def test_weight_decay_with_sparse_gradients_raises_like_torch(name):
    emb = _embedding_with_sparse_grad()
    with pytest.raises(RuntimeError) as theirs:
        TORCH[name](emb.parameters(), lr=0.1, weight_decay=0.1).step()
    tx = OURS[name](lr=0.1, weight_decay=0.1)
    params = {"emb": emb.weight.detach().clone()}
    state = tx.init(params)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients") as ours:
        tx.update({"emb": emb.weight.grad}, state, params)
    if name == "adagrad":  # torch.optim.SGD fails inside torch.add with a message of its own
        assert str(ours.value) == str(theirs.value)


def test_sparse_adam_rejects_dense_gradients_with_torch_wording():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.SparseAdam([p]).step()
    tx = sparse_adam()
    params = {"emb": torch.zeros(4, 2), "p": torch.zeros(3)}
    state = tx.init(params)
    snap = snapshot(state)
    grads = {"emb": _embedding_with_sparse_grad(4).weight.grad, "p": torch.ones(3)}
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(theirs.value))}$"):
        tx.update(grads, state, params)
    assert_unchanged(state, snap, "state")


def test_sparse_adam_rejects_complex_parameters_and_foreach():
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        torch.optim.SparseAdam([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match=r"Complex params at \['z'\]: SparseAdam does not support complex parameters"):
        sparse_adam().init({"x": torch.zeros(2), "z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="sparse_adam has no impl='foreach' path"):
        sparse_adam(impl="foreach")


def test_asgd_needs_params():
    tx = asgd()
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="asgd needs the parameters"):
        tx.update({"w": torch.ones(2)}, state)


@pytest.mark.parametrize("name", ["adagrad", "adadelta", "adamax", "asgd"])
def test_unknown_impl_is_rejected(name):
    with pytest.raises(ValueError, match="Invalid impl: 'fast'"):
        OURS[name](impl="fast")


# --- purity: update never mutates its inputs (dense and sparse gradients)

PURITY = [
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
    ("adagrad", dict(lr=0.1, maximize=True)),
    ("adadelta", dict(weight_decay=0.1, maximize=True)),
    ("adadelta", dict(rho=0.5)),
    ("adamax", dict(weight_decay=0.1, maximize=True)),
    ("adamax", dict()),
    ("asgd", dict(lambd=0.05, t0=1.0, weight_decay=0.1, maximize=True)),
    ("asgd", dict(t0=0.0)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,flags", PURITY, ids=[f"{n}:{_id(f)}" for n, f in PURITY])
def test_update_never_mutates_inputs(name, flags, impl):
    tx = OURS[name](impl=impl, **flags)
    params = make_params(torch.float32)
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        grads["b1"] = None if step == 1 else grads["b1"]
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


SPARSE_PURITY = [
    ("adagrad", dict(lr=0.1, lr_decay=0.01, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1)),
    ("sgd", dict(lr=0.1, maximize=True)),
    ("sparse_adam", dict(lr=0.1, maximize=True)),
]


@pytest.mark.parametrize("name,flags", SPARSE_PURITY, ids=[f"{n}:{_id(f)}" for n, f in SPARSE_PURITY])
def test_sparse_update_never_mutates_inputs(name, flags):
    tx = OURS[name](**flags)
    params = _sparse_init(torch.float32, dense=name != "sparse_adam")
    state = tx.init(params)
    for step in range(4):
        grads = _sparse_grads(params, step)
        snaps = [snapshot(params), snapshot(grads), snapshot(state)]
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


# --- donated (in-place) steps give torch's numbers too

DONATED = [
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True)),
    ("adadelta", dict(lr=0.5, weight_decay=0.1, maximize=True)),
    ("adamax", dict(lr=0.02, weight_decay=0.1, maximize=True)),
    ("asgd", dict(lr=0.05, lambd=0.05, t0=5.0, weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,flags", DONATED, ids=[n for n, _ in DONATED])
def test_donated_step_matches_torch(name, flags, impl):
    inplace_step = getattr(pureopt.base, "inplace_step", None)
    if inplace_step is None:
        pytest.skip("pureopt.base.inplace_step is not available")

    class _Donating:
        """A GradientTransformation-like pair whose update runs inplace_step (params are updated in place)."""

        def __init__(self, tx):
            self.tx = tx

        def init(self, params):
            return self.tx.init(params)

        def update(self, grads, state, params):
            new_state = inplace_step(self.tx, grads, state, params)
            return {k: None for k in grads}, new_state

    run_parity(
        lambda p: TORCH[name](p, **flags),
        _Donating(OURS[name](impl=impl, **flags)),
        torch.float64,
        state_keys=STATE_KEYS[name],
        maximize=flags.get("maximize", False),
    )


def test_sparse_donated_steps_match_torch():
    inplace_step = getattr(pureopt.base, "inplace_step", None)
    if inplace_step is None:
        pytest.skip("pureopt.base.inplace_step is not available")
    cases = [
        (lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01), adagrad(lr=0.1, lr_decay=0.01), True),
        (lambda p: torch.optim.SparseAdam(p, lr=0.05), sparse_adam(lr=0.05), False),
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), sgd(lr=0.05, momentum=0.9), True),
        (lambda p: torch.optim.SGD(p, lr=0.05), sgd(lr=0.05), True),
    ]
    for torch_factory, tx, dense in cases:
        init = _sparse_init(torch.float64, dense)
        torch_params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        opt = torch_factory(list(torch_params.values()))
        params = {k: v.clone() for k, v in init.items()}
        state = tx.init(params)
        for step in range(10):
            tg = _sparse_grads({k: t.detach() for k, t in torch_params.items()}, step)
            for k, t in torch_params.items():
                t.grad = tg[k]
            opt.step()
            state = inplace_step(tx, _sparse_grads(params, step), state, params)
            for k, t in torch_params.items():
                torch.testing.assert_close(params[k], t.detach(), rtol=1e-10, atol=1e-12)


# --- complex parameters (torch.optim treats them as pairs of reals)

COMPLEX_CASES = [
    ("adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.3, weight_decay=0.1)),
    ("adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True)),
    ("adamax", dict(lr=0.02, weight_decay=0.1)),
    ("asgd", dict(lr=0.05, lambd=0.05, t0=5.0, weight_decay=0.1)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,flags", COMPLEX_CASES, ids=[n for n, _ in COMPLEX_CASES])
def test_complex_params_match_torch(name, flags, impl):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    r0 = torch.randn(3, dtype=torch.float64, generator=gen)
    tps = [p0.clone().requires_grad_(True), r0.clone().requires_grad_(True)]
    opt = TORCH[name](tps, **flags)
    tx = OURS[name](impl=impl, **flags)
    params = (p0.clone(), r0.clone())
    state = tx.init(params)
    for _ in range(25):
        g = (
            torch.randn(4, 3, dtype=torch.complex128, generator=gen),
            torch.randn(3, dtype=torch.float64, generator=gen),
        )
        for t, gi in zip(tps, g):
            t.grad = gi.clone()
        opt.step()
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        for mine, t in zip(params, tps):
            assert mine.dtype == t.dtype
            torch.testing.assert_close(mine, t.detach(), rtol=1e-10, atol=1e-12)
        for key in STATE_KEYS[name]:
            theirs = opt.state[tps[0]][key]
            torch.testing.assert_close(getattr(state, key)[0].to(theirs.dtype), theirs, rtol=1e-10, atol=1e-12)


# --- torch.func.vmap: an ensemble of models, one optimizer state each


@pytest.mark.parametrize("name,flags", COMPLEX_CASES, ids=[n for n, _ in COMPLEX_CASES])
def test_vmapped_ensemble_matches_torch_per_model(name, flags):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)}  # 3 models
    models = [params["w"][i].clone().requires_grad_(True) for i in range(3)]
    opts = [TORCH[name]([m], **flags) for m in models]
    tx = OURS[name](**flags)
    state = torch.func.vmap(tx.init)(params)
    for _ in range(10):
        grads = {"w": torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)}
        for i, (m, opt) in enumerate(zip(models, opts)):
            m.grad = grads["w"][i].clone()
            opt.step()
        updates, state = torch.func.vmap(tx.update)(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        for i, m in enumerate(models):
            torch.testing.assert_close(params["w"][i], m.detach(), rtol=1e-10, atol=1e-12)


# --- bf16 parameters with fp32 state

BF16_CASES = [
    ("adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01)),
    ("adadelta", dict(lr=1.0, weight_decay=0.01)),
    ("adamax", dict(lr=0.02, weight_decay=0.01)),
    ("asgd", dict(lr=0.05, lambd=0.05, t0=10.0)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,flags", BF16_CASES, ids=[n for n, _ in BF16_CASES])
def test_bf16_params_with_fp32_state_track_fp32_torch(name, flags, impl):
    """bf16 parameters, fp32 state: compared with torch in fp32 whose parameters are rounded to bf16 after every
    step (what bf16 storage does), tightly, and with a plain fp32 torch run, loosely (bf16 has 8 mantissa bits)."""
    init = {k: v.to(torch.bfloat16).float() for k, v in make_params(torch.float32).items()}
    rounded = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    plain = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt_rounded = TORCH[name](list(rounded.values()), **flags)
    opt_plain = TORCH[name](list(plain.values()), **flags)
    tx = OURS[name](impl=impl, state_dtype=torch.float32, **flags)
    params = {k: v.to(torch.bfloat16) for k, v in init.items()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        g = {k: torch.randn(v.shape, generator=gen).to(torch.bfloat16) for k, v in init.items()}  # same on all sides
        for ref, opt in ((rounded, opt_rounded), (plain, opt_plain)):
            for k, t in ref.items():
                t.grad = g[k].float()
            opt.step()
        with torch.no_grad():
            for t in rounded.values():
                t.copy_(t.bfloat16().float())
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        for k in init:
            assert params[k].dtype == torch.bfloat16
            torch.testing.assert_close(params[k].float(), rounded[k].detach(), rtol=8e-3, atol=1e-5)
    for k in init:
        torch.testing.assert_close(params[k].float(), plain[k].detach(), rtol=5e-2, atol=5e-2)
    for key in STATE_KEYS[name]:
        for leaf in pureopt.tree.leaves(getattr(state, key)):
            if leaf.dim() > 0:
                assert leaf.dtype == torch.float32


def test_bf16_sparse_adam_with_fp32_state_tracks_fp32_torch():
    init = _sparse_init(torch.float32, dense=False)
    ref = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.SparseAdam(list(ref.values()), lr=0.02)
    tx = sparse_adam(lr=0.02, state_dtype=torch.float32)
    params = {k: v.to(torch.bfloat16) for k, v in init.items()}
    state = tx.init(params)
    for step in range(25):
        g = _sparse_grads({k: t.detach() for k, t in ref.items()}, step)
        for k, t in ref.items():
            t.grad = g[k]
        opt.step()
        grads = {k: None if v is None else v.to(torch.bfloat16) for k, v in g.items()}
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
    for k, t in ref.items():
        assert params[k].dtype == torch.bfloat16 and state.exp_avg[k].dtype == torch.float32
        torch.testing.assert_close(params[k].float(), t.detach(), rtol=2e-2, atol=2e-2)


# --- convergence to closed-form optima (float32, and complex64 where torch supports complex)


def _rosenbrock_grad(xy: torch.Tensor) -> torch.Tensor:
    """Gradient of (1 - x)**2 + 100 * (y - x**2)**2, whose minimum is at (1, 1)."""
    x, y = xy[0], xy[1]
    return torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def _minimize(tx, params, grad_fn, steps):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = pureopt.apply_updates(params, updates)
    return params, state


def _decay(lr0: float, rate: float):
    return lambda count: lr0 * rate ** torch.as_tensor(count, dtype=torch.float32)


ROSENBROCK = [
    ("adagrad", lambda: adagrad(lr=1.5), 4000, 2e-2),
    ("adadelta", lambda: adadelta(lr=_decay(3.0, 0.999), rho=0.95), 4000, 2e-2),
    ("adamax", lambda: adamax(lr=0.2, betas=(0.99, 0.999)), 2500, 1e-3),
    ("asgd", lambda: asgd(lr=2e-3, lambd=0.0), 5000, 2e-2),
]


@pytest.mark.parametrize("name,make,steps,tol", ROSENBROCK, ids=[r[0] for r in ROSENBROCK])
def test_rosenbrock_converges(name, make, steps, tol):
    params, _ = _minimize(make(), {"xy": torch.tensor([-1.2, 1.0])}, lambda p: {"xy": _rosenbrock_grad(p["xy"])}, steps)
    assert params["xy"].dtype == torch.float32
    torch.testing.assert_close(params["xy"], torch.ones(2), rtol=0, atol=tol)


def _least_squares(dtype):
    gen = torch.Generator().manual_seed(3)
    real = torch.float64
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=gen, dtype=real))
    a = q * torch.linspace(1.0, 2.0, 5, dtype=real)  # singular values in [1, 2]
    b = torch.randn(20, generator=gen, dtype=real)
    if dtype.is_complex:
        q2, _ = torch.linalg.qr(torch.randn(20, 5, generator=gen, dtype=real))
        a = torch.complex(a, 0.5 * q2)
        b = torch.complex(b, torch.randn(20, generator=gen, dtype=real))
    x_star = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)  # closed form, in double precision
    a_, b_ = a.to(dtype), b.to(dtype)

    def grad(p):  # d/dx of 0.5 * ||A x - b||^2 in torch's convention (conjugate Wirtinger for complex)
        return {"x": a_.mH @ (a_ @ p["x"] - b_)}

    return grad, x_star


LEAST_SQUARES = [
    ("adagrad", lambda: adagrad(lr=0.5), 400),
    ("adadelta", lambda: adadelta(lr=_decay(3.0, 0.995), rho=0.9), 1500),
    ("adamax", lambda: adamax(lr=0.05, betas=(0.9, 0.999)), 800),
    ("asgd", lambda: asgd(lr=0.2, lambd=0.0, t0=150.0), 400),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=str)
@pytest.mark.parametrize("name,make,steps", LEAST_SQUARES, ids=[r[0] for r in LEAST_SQUARES])
def test_least_squares_converges(name, make, steps, dtype):
    grad, x_star = _least_squares(dtype)
    params, state = _minimize(make(), {"x": torch.zeros(5, dtype=dtype)}, grad, steps)
    assert params["x"].dtype == dtype
    torch.testing.assert_close(params["x"].to(x_star.dtype), x_star, rtol=0, atol=2e-3)
    if name == "asgd":  # the averaged iterate (averaging from t0 on) converges too
        torch.testing.assert_close(state.ax["x"].to(x_star.dtype), x_star, rtol=0, atol=2e-3)


def test_sparse_embedding_regression_converges():
    """Sparse gradients: fit an embedding table to targets (optimum: the targets themselves)."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(12, 4, generator=gen)

    def grads(p, step):
        idx = torch.randint(0, 12, (8,), generator=torch.Generator().manual_seed(step))
        w = p["emb"].detach().clone().requires_grad_(True)
        (0.5 * (F.embedding(idx, w, sparse=True) - target[idx]).pow(2).sum()).backward()
        return {"emb": w.grad}

    for tx, steps in ((sparse_adam(lr=0.05), 1200), (adagrad(lr=0.5), 600), (sgd(lr=0.2, momentum=0.5), 400)):
        params = {"emb": torch.zeros(12, 4)}
        state = tx.init(params)
        for step in range(steps):
            updates, state = tx.update(grads(params, step), state, params)
            params = pureopt.apply_updates(params, updates)
        torch.testing.assert_close(params["emb"], target, rtol=0, atol=2e-3)


def test_asgd_average_equals_params_before_t0_and_lags_after():
    """ax == p exactly while mu == 1 (torch copies p), then a running mean of the iterates (closed form)."""
    t0 = 5.0
    tx = asgd(lr=0.1, lambd=0.0, t0=t0)
    params = {"w": torch.tensor([4.0], dtype=torch.float64)}
    state = tx.init(params)
    iterates = []
    for step in range(1, 15):
        updates, state = tx.update({"w": params["w"].clone()}, state, params)  # f = w**2 / 2
        params = pureopt.apply_updates(params, updates)
        iterates.append(params["w"])
        if step <= t0 + 2:
            assert torch.equal(state.ax["w"], params["w"])
        else:
            # step t uses mu = 1 / (t - 1 - t0): ax is the mean of the iterates from step t0 + 2 on
            expected = torch.stack(iterates[int(t0) + 1 :]).mean(0)
            torch.testing.assert_close(state.ax["w"], expected, rtol=1e-6, atol=0)  # mu is stored in float32
    assert math.isclose(float(state.mu["w"]), 1 / (14 - t0), rel_tol=1e-6)
