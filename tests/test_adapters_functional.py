"""FunctionalOptimizer against torch's own functional optimizers, torch.optim, DDP's optimizer overlap hook."""

from __future__ import annotations

import datetime
import gc
import io
import socket
import threading
import warnings

import pytest
import torch
from _parity import NONE_GRADS, grads_at, make_data, make_params, tolerances

import pureopt
from pureopt.adapters.functional import FunctionalOptimizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.distributed.optim.functional_adam import _FunctionalAdam
    from torch.distributed.optim.functional_adamw import _FunctionalAdamW
    from torch.distributed.optim.functional_sgd import _FunctionalSGD

NAMES = list(make_params(torch.float64))

# (id, torch functional class, its kwargs, pureopt factory, its kwargs)
CONFIGS = [
    ("sgd", _FunctionalSGD, dict(lr=0.05), pureopt.sgd, dict(lr=0.05)),
    (
        "sgd-nesterov-wd-max",
        _FunctionalSGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
        pureopt.sgd,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    ),
    (
        "sgd-dampening",
        _FunctionalSGD,
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        pureopt.sgd,
        dict(lr=0.05, momentum=0.9, dampening=0.3),
    ),
    ("adam", _FunctionalAdam, dict(lr=0.01), pureopt.adam, dict(lr=0.01)),
    (
        "adam-amsgrad-wd-max",
        _FunctionalAdam,
        dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True),
        pureopt.adam,
        dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True),
    ),
    ("adamw", _FunctionalAdamW, dict(lr=0.01, weight_decay=0.1), pureopt.adamw, dict(lr=0.01, weight_decay=0.1)),
    (
        "adamw-amsgrad",
        _FunctionalAdamW,
        dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        pureopt.adamw,
        dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    ),
]


def _torch_functional(cls, params, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cls(params, **kwargs)


def _drive(opt, params: list[torch.Tensor], grads: list[torch.Tensor | None], mode: str) -> None:
    """One step through the chosen entry point."""
    if mode == "step":
        opt.step(grads)
    elif isinstance(opt, FunctionalOptimizer):
        if mode == "step_param":
            for p, g in zip(params, grads):
                opt.step_param(p, g)  # None gradients included: a no-op
        else:  # step_params in two chunks
            opt.step_params(params[:3], grads[:3])
            opt.step_params(params[3:], grads[3:])
    else:  # torch's reference: step_param for each parameter with a gradient (torch 2.13's
        # _FunctionalSGD.step_param raises IndexError on a None gradient)
        for p, g in zip(params, grads):
            if g is not None:
                opt.step_param(p, g)


@pytest.mark.parametrize("mode", ["step", "step_param", "step_params"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_torch_functional_optimizers(config, dtype, mode):
    """25 steps with None gradients: parameters and per-parameter state equal torch's functional optimizer's."""
    _, torch_cls, torch_kwargs, factory, kwargs = config
    tol = tolerances(dtype)
    data = make_data(dtype)
    init = make_params(dtype)
    theirs = [v.clone() for v in init.values()]
    mine = [v.clone() for v in init.values()]
    ref = _torch_functional(torch_cls, theirs, **torch_kwargs)
    opt = FunctionalOptimizer(mine, factory(**kwargs))
    sign = -1.0 if torch_kwargs.get("maximize") else 1.0
    for step in range(25):
        tg = grads_at(dict(zip(NAMES, theirs)), step, data, sign)
        mg = grads_at(dict(zip(NAMES, mine)), step, data, sign)
        _drive(ref, theirs, [tg[k] for k in NAMES], mode)
        _drive(opt, mine, [mg[k] for k in NAMES], mode)
        for name, a, b in zip(NAMES, mine, theirs):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name, s=step: f"{n} @ {s}: {m}")
    state = opt.state
    for p_mine, p_theirs in zip(mine, theirs):
        their_state = ref.state.get(p_theirs, {})
        for key, value in their_state.items():
            torch.testing.assert_close(state[p_mine][key].to(value.dtype), value, **tol)
    # the parameter that never got a gradient on step 0 has advanced one step less (its own step count)
    if "exp_avg" in state.get(mine[0], {}):
        steps = {n: float(state[p]["step"]) for n, p in zip(NAMES, mine)}
        skipped = {n: sum(n in v for v in NONE_GRADS.values()) for n in NAMES}
        assert steps == {n: 25.0 - skipped[n] for n in NAMES}


def test_params_are_stepped_in_place_and_grads_only_read():
    params = [v.clone() for v in make_params(torch.float32).values()]
    objects = [p for p in params]
    grads = [torch.randn_like(p) for p in params]
    before = [g.clone() for g in grads]
    opt = FunctionalOptimizer(params, pureopt.adamw(lr=0.1, weight_decay=0.1, maximize=True))
    opt.step(grads)
    opt.step_params(params[:2], grads[:2])
    assert all(a is b for a, b in zip(opt.params, objects))
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_step_length_mismatch_raises_torchs_error():
    params = [torch.zeros(3), torch.zeros(2)]
    ref = _torch_functional(_FunctionalAdam, [p.clone() for p in params])
    with pytest.raises(ValueError) as theirs:
        ref.step([torch.ones(3)])
    opt = FunctionalOptimizer(params, pureopt.adam())
    with pytest.raises(ValueError) as mine:
        opt.step([torch.ones(3)])
    assert str(mine.value) == str(theirs.value)


def test_empty_parameter_list_raises_torchs_error():
    with pytest.raises(ValueError) as theirs:
        _torch_functional(_FunctionalSGD, [])
    with pytest.raises(ValueError) as mine:
        FunctionalOptimizer([], pureopt.sgd())
    assert str(mine.value) == str(theirs.value)


def _snapshot(opt: FunctionalOptimizer):
    return [p.clone() for p in opt.params], pureopt.tree.tree_clone(opt.opt_state)


def _assert_unchanged(opt: FunctionalOptimizer, snapshot) -> None:
    params, state = snapshot
    assert all(torch.equal(a, b) for a, b in zip(opt.params, params))
    for a, b in zip(pureopt.tree.leaves(opt.opt_state), pureopt.tree.leaves(state)):
        assert a is b is None or torch.equal(a, b)


def test_none_grad_step_param_is_a_no_op_and_bad_input_changes_nothing():
    params = [torch.randn(3, 2), torch.randn(4)]
    opt = FunctionalOptimizer(params, pureopt.adam(lr=0.1))
    opt.step([torch.ones(3, 2), torch.ones(4)])
    snap = _snapshot(opt)
    opt.step_param(params[0], None)
    opt.step_params(params, [None, None])
    opt.step([None, None])
    _assert_unchanged(opt, snap)
    assert int(opt.opt_state.num_updates) == 1
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.step_param(torch.randn(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="has shape"):
        opt.step([torch.ones(3, 2), torch.ones(5)])
    with pytest.raises(ValueError, match="aligned"):
        opt.step_params(params, [torch.ones(3, 2)])
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.step_params([params[0], params[0]], [torch.ones(3, 2), torch.ones(3, 2)])
    _assert_unchanged(opt, snap)


def test_partition_state_maps_to_each_parameters_own_keys():
    """A partition (MaskedNode in the inner states) behind the adapter: each parameter gets the keys of its own
    transformation, and the numbers equal torch.optim.Adam on one set and torch.optim.SGD on the other."""
    from pureopt.combine import partition

    dtype = torch.float64
    init = [torch.randn(3, 2, dtype=dtype), torch.randn(4, dtype=dtype), torch.randn(2, dtype=dtype)]
    mine = [p.clone() for p in init]
    tx = partition({"a": pureopt.adam(lr=0.1), "b": pureopt.sgd(lr=0.1, momentum=0.9)}, ("a", "b", "a"))
    opt = FunctionalOptimizer(mine, tx)
    theirs = [p.clone().requires_grad_(True) for p in init]
    adam = torch.optim.Adam([theirs[0], theirs[2]], lr=0.1)
    sgd = torch.optim.SGD([theirs[1]], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        if step == 5:
            saved = _roundtrip(opt.state_dict())
            opt = FunctionalOptimizer(mine, tx)
            opt.load_state_dict(saved)
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in init]
        grads[2] = None if step < 2 else grads[2]
        for t, g in zip(theirs, grads):
            t.grad = g
        adam.step()
        sgd.step()
        opt.step(grads)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b.detach(), **tolerances(dtype))
    sd = opt.state_dict()
    assert {k: sorted(v) for k, v in sd["state"].items()} == {
        0: ["exp_avg", "exp_avg_sq", "step"], 1: ["momentum_buffer"], 2: ["exp_avg", "exp_avg_sq", "step"]
    }  # fmt: skip
    assert float(sd["state"][2]["step"]) == 8.0


# --- the update counter under partial steps ---------------------------------------------------------------------


def _decay(count):
    return 0.1 * 0.8 ** torch.as_tensor(count, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["step", "step_param", "step_params"])
def test_schedule_advances_once_per_optimizer_step(mode):
    """A schedule of the update count sees one count per optimizer step, however the step is split.

    Reference: torch.optim.SGD with LambdaLR stepped once per iteration (lr_k = 0.1 * 0.8**k).
    """
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    theirs = [p.clone().requires_grad_(True) for p in init]
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda k: 0.8**k)
    mine = [p.clone() for p in init]
    opt = FunctionalOptimizer(mine, pureopt.sgd(lr=_decay, momentum=0.9))
    for it in range(8):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in init]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        ref.step()
        sched.step()
        _drive(opt, mine, grads, mode)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
        assert int(opt.opt_state.num_updates) == it + 1


def test_end_step_separates_steps_that_touch_disjoint_parameters():
    """Without end_step, alternating disjoint subsets merge into one optimizer step; with it they do not."""
    params = [torch.zeros(2), torch.zeros(2)]
    opt = FunctionalOptimizer(params, pureopt.sgd(lr=_decay))
    opt.step_param(params[0], torch.ones(2))
    opt.step_param(params[1], torch.ones(2))  # same optimizer step: both at count 0
    torch.testing.assert_close(params[0], params[1])
    assert int(opt.opt_state.num_updates) == 1
    opt.end_step()
    opt.step_param(params[1], torch.ones(2))  # count 1: lr 0.08
    torch.testing.assert_close(params[1], torch.full((2,), -0.1 - 0.08))
    opt.step_param(params[1], torch.ones(2))  # stepped twice: a new optimizer step begins (count 2)
    torch.testing.assert_close(params[1], torch.full((2,), -0.1 - 0.08 - 0.064))
    assert int(opt.opt_state.num_updates) == 3


# --- threads ------------------------------------------------------------------------------------------------------


def test_threads_stepping_disjoint_params_equal_a_sequential_torch_run():
    """4 trainer threads, each owning 3 parameters, step concurrently; torch.optim.Adam sequentially is the reference.

    Gradients are separable per parameter (g = p - target + noise[step]), so the result does not depend on how
    the threads interleave; the lock must keep every update.
    """
    gen = torch.Generator().manual_seed(0)
    n_threads, per_thread, iters = 4, 3, 30
    shapes = [(5, 4), (7,), (3, 3)] * n_threads
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    noise = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(iters)]

    def grad(i, k, p):
        return p - targets[i] + 0.1 * noise[k][i]

    theirs = [p.clone().requires_grad_(True) for p in init]
    ref = torch.optim.Adam(theirs, lr=0.05, weight_decay=0.01)
    for k in range(iters):
        for i, t in enumerate(theirs):
            t.grad = grad(i, k, t.detach())
        ref.step()

    mine = [p.clone() for p in init]
    opt = FunctionalOptimizer(mine, pureopt.adam(lr=0.05, weight_decay=0.01))
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def trainer(t: int) -> None:
        try:
            idx = list(range(t * per_thread, (t + 1) * per_thread))
            start.wait(timeout=30)
            for k in range(iters):
                if k % 2:
                    opt.step_params([mine[i] for i in idx], [grad(i, k, mine[i]) for i in idx])
                else:
                    for i in idx:
                        opt.step_param(mine[i], grad(i, k, mine[i]))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=trainer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    for p, t in zip(mine, theirs):
        assert float(opt.state[p]["step"]) == float(ref.state[t]["step"]) == iters


# --- checkpoints ------------------------------------------------------------------------------------------------


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_roundtrip_mid_run_matches_uninterrupted_torch():
    """10 steps, save (torch.save / weights_only load), a new optimizer on copies of the params loads it, 10 more:
    equal to torch.optim.AdamW's 20 steps."""
    dtype = torch.float64
    data = make_data(dtype)
    init = make_params(dtype)
    theirs = [v.clone().requires_grad_(True) for v in init.values()]
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, amsgrad=True)
    mine = [v.clone() for v in init.values()]
    opt = FunctionalOptimizer(mine, pureopt.adamw(lr=0.01, weight_decay=0.1, amsgrad=True))
    for step in range(20):
        if step == 10:
            saved = _roundtrip(opt.state_dict())
            mine = [p.clone() for p in mine]
            opt = FunctionalOptimizer(mine, pureopt.adamw(lr=0.01, weight_decay=0.1, amsgrad=True))
            opt.load_state_dict(saved)
            assert int(opt.opt_state.num_updates) == 10
        tg = grads_at({k: t.detach() for k, t in zip(NAMES, theirs)}, step, data)
        for k, t in zip(NAMES, theirs):
            t.grad = tg[k]
        ref.step()
        mg = grads_at(dict(zip(NAMES, mine)), step, data)
        opt.step([mg[k] for k in NAMES])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b.detach(), **tolerances(dtype))


def test_loads_a_torch_optim_checkpoint():
    """torch.optim.Adam's state dict (no pureopt section) loads; the update counter is rebuilt from the steps."""
    dtype = torch.float64
    data = make_data(dtype)
    init = make_params(dtype)
    theirs = [v.clone().requires_grad_(True) for v in init.values()]
    ref = torch.optim.Adam(theirs, lr=0.01)
    for step in range(12):
        if step == 6:
            mine = [t.detach().clone() for t in theirs]
            opt = FunctionalOptimizer(mine, pureopt.adam(lr=0.01))
            opt.load_state_dict(_roundtrip(ref.state_dict()))
            assert int(opt.opt_state.num_updates) == 6
        tg = grads_at({k: t.detach() for k, t in zip(NAMES, theirs)}, step, data)
        for k, t in zip(NAMES, theirs):
            t.grad = tg[k]
        ref.step()
        if step >= 6:
            mg = grads_at(dict(zip(NAMES, mine)), step, data)
            opt.step([mg[k] for k in NAMES])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b.detach(), **tolerances(dtype))


def _stepped(factory, shapes, steps=3):
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    opt = FunctionalOptimizer(params, factory)
    for _ in range(steps):
        opt.step([torch.randn_like(p) for p in params])
    return opt


@pytest.mark.parametrize(
    "source,match",
    [
        (lambda: _stepped(pureopt.sgd(lr=0.1, momentum=0.9), [(3, 2), (4,)]), "records"),
        (lambda: _stepped(pureopt.adam(lr=0.1, amsgrad=True), [(3, 2), (4,)]), "does not keep"),
        (lambda: _stepped(pureopt.adam(lr=0.1), [(2, 3), (4,)]), "has shape"),
        (lambda: _stepped(pureopt.adam(lr=0.1), [(3, 2), (4,), (1,)]), "3 parameters"),
        (lambda: _stepped(pureopt.chain(pureopt.clip(1.0), pureopt.adam(lr=0.1)), [(3, 2), (4,)]), "records"),
    ],
    ids=["other-optimizer", "other-options", "other-shapes", "other-count", "other-structure"],
)
def test_mismatched_checkpoint_raises_and_changes_nothing(source, match):
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    opt = FunctionalOptimizer(params, pureopt.adam(lr=0.1))
    opt.step([torch.randn_like(p) for p in params])
    snap = _snapshot(opt)
    checkpoint = _roundtrip(source().state_dict())
    kept = pureopt.tree.tree_clone(checkpoint)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(checkpoint)
    _assert_unchanged(opt, snap)
    for a, b in zip(pureopt.tree.leaves(checkpoint), pureopt.tree.leaves(kept)):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_wrong_dtype_kind_in_checkpoint_raises():
    params = [torch.randn(3, 2), torch.randn(4)]
    opt = FunctionalOptimizer(params, pureopt.adam(lr=0.1))
    opt.step([torch.randn_like(p) for p in params])
    checkpoint = opt.state_dict()
    checkpoint["state"][0] = {**checkpoint["state"][0], "exp_avg": torch.zeros(3, 2, dtype=torch.int64)}
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match="dtype"):
        opt.load_state_dict(checkpoint)
    _assert_unchanged(opt, snap)


def test_loaded_state_does_not_alias_the_checkpoint():
    params = [torch.randn(3, 2), torch.randn(4)]
    opt = FunctionalOptimizer(params, pureopt.adam(lr=0.1))
    opt.step([torch.randn_like(p) for p in params])
    checkpoint = pureopt.tree.tree_clone(opt.state_dict())
    kept = pureopt.tree.tree_clone(checkpoint)
    opt.load_state_dict(checkpoint)
    opt.step([torch.randn_like(p) for p in params])
    for a, b in zip(pureopt.tree.leaves(checkpoint), pureopt.tree.leaves(kept)):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


# --- DDP: torch's optimizer-overlap hook ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo",
        rank=0,
        world_size=1,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        gc.collect()  # free DDP reducers (reference cycles) and their gloo work while the group is alive
        dist.destroy_process_group()


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 2))  # fmt: skip


@pytest.mark.parametrize("subset", [False, True], ids=["all-params", "params-to-optimize"])
def test_runs_inside_ddp_optimizer_overlap_hook(gloo_group, subset):
    """FunctionalOptimizer as the functional_optimizer of torch's _OptimizerHookState with _hook_then_optimizer:
    the optimizer runs on each bucket after its all-reduce, during backward. Reference: torch.optim.AdamW (on the
    last layer only with ``params_to_optimize``; the other parameters stay put)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.algorithms.ddp_comm_hooks.optimizer_overlap_hooks import (
        _hook_then_optimizer,
        _OptimizerHookState,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp(0)
    reference = _mlp(0)
    ddp = DDP(model, bucket_cap_mb=0.001)  # tiny buckets: several hook calls per backward
    chosen = list(model[-1].parameters()) if subset else list(model.parameters())
    opt = FunctionalOptimizer(chosen, pureopt.adamw(lr=0.01, weight_decay=0.1))
    state = _OptimizerHookState(opt, params=chosen if subset else None)
    ddp.register_comm_hook(None, _hook_then_optimizer(allreduce_hook, state))
    ref = torch.optim.AdamW(reference[-1].parameters() if subset else reference.parameters(), lr=0.01,
                            weight_decay=0.1)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    iters = 6
    for _ in range(iters):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)
        ((ddp(x) - y) ** 2).mean().backward()  # steps the parameters
        ddp.zero_grad()
        ref.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        ref.step()
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert int(opt.opt_state.num_updates) == iters  # one optimizer step per backward
    for p in chosen:
        assert float(opt.state[p]["step"]) == iters
