"""lbfgs against torch.optim.LBFGS itself: Rosenbrock (2-D, 10-D), least squares, fixed steps and strong Wolfe.

Three levels of comparison:

* the kernel (``pureopt.kernels.lbfgs.lbfgs``, whose new parameters are fed back as they are) against torch over
  several outer steps: parameters and the whole state bit for bit, fp64 and fp32;
* the public API (``tx.update`` + ``apply_updates``) started from the state torch would have (converted from
  pureopt's state) at every step of a pureopt trajectory: torch's step from there gives pureopt's next state bit
  for bit and its next parameters up to the rounding of ``params + (new - params)``;
* the public API free-running next to torch (fp64 rtol 1e-10, fp32 rtol 1e-5) for as many outer steps as L-BFGS
  takes to amplify that last-bit rounding past the tolerance, which depends on the problem: fixed steps on
  Rosenbrock grow a 1e-16 difference to 1e-9 within one outer step once the iterates reach the valley floor
  (torch itself behaves the same way under a 1-ulp perturbation of its parameters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pureopt.base import UpdateContext, apply_updates
from pureopt.kernels.lbfgs import init_memory
from pureopt.kernels.lbfgs import lbfgs as lbfgs_kernel
from pureopt.optimizers.lbfgs import lbfgs
from pureopt.transforms.lbfgs import LBFGSState
from pureopt.tree import flatten


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: intra-op threads only add contention on a shared machine (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


Params = dict[str, torch.Tensor]


# --- problems -----------------------------------------------------------------------------------------------------


def rosenbrock(params: Params) -> torch.Tensor:
    x = torch.cat([p.reshape(-1) for p in params.values()])
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _rosen_start(n: int) -> torch.Tensor:
    x = torch.ones(n, dtype=torch.float64)
    x[0::2] = -1.2
    return x


def _least_squares_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    return x, y


def least_squares(params: Params) -> torch.Tensor:
    x, y = _least_squares_data()
    x, y = x.to(params["W"].dtype), y.to(params["W"].dtype)
    return ((x @ params["W"].T + params["b"] - y) ** 2).mean()


@dataclass
class Problem:
    name: str
    loss: Callable[[Params], torch.Tensor]
    start: Callable[[], Params]

    def init(self, dtype: torch.dtype) -> Params:
        return {k: v if v.is_complex() else v.to(dtype) for k, v in self.start().items()}


PROBLEMS = {
    "rosen2": Problem("rosen2", rosenbrock, lambda: {"x": _rosen_start(2)}),
    # 10-D, split over two parameters of different shapes (the flat vector is their concatenation)
    "rosen10": Problem(
        "rosen10",
        rosenbrock,
        lambda: {"head": _rosen_start(10)[:4].clone(), "tail": _rosen_start(10)[4:].reshape(3, 2)},
    ),
    "lsq": Problem(
        "lsq",
        least_squares,
        lambda: {
            "W": torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4),
            "b": torch.tensor([0.5, -0.5, 0.25], dtype=torch.float64),
        },
    ),
}


@dataclass
class Config:
    problem: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.problem + ":" + ",".join(f"{k}={v}" for k, v in self.kwargs.items())


CONFIGS = [
    Config("rosen2", {"lr": 0.1}),
    Config("rosen2", {"line_search_fn": "strong_wolfe"}),
    Config("rosen10", {"lr": 0.05}),
    Config("rosen10", {"line_search_fn": "strong_wolfe"}),
    # small history: the ring buffer wraps around; small max_iter / max_eval: the budget tests fire
    Config("rosen10", {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 7}),
    Config("rosen10", {"lr": 0.05, "history_size": 4, "max_iter": 9, "max_eval": 6}),
    Config("lsq", {}),
    Config("lsq", {"line_search_fn": "strong_wolfe", "history_size": 2}),
]
DTYPES = [torch.float64, torch.float32]
STEPS = 6


def value_and_grad(loss: Callable[[Params], torch.Tensor]) -> Callable[[Params], tuple[torch.Tensor, Params]]:
    def fn(params: Params) -> tuple[torch.Tensor, Params]:
        grads, value = torch.func.grad_and_value(loss)(params)
        return value, grads

    return fn


class TorchSide:
    """torch.optim.LBFGS on its own copy of the parameters, with a closure that uses autograd."""

    def __init__(self, problem: Problem, params: Params, **kwargs: Any) -> None:
        self.names = list(params)
        self.tensors = [p.clone().requires_grad_(True) for p in params.values()]
        self.opt = torch.optim.LBFGS(self.tensors, **kwargs)
        self.problem = problem

    def closure(self) -> torch.Tensor:
        self.opt.zero_grad()
        value = self.problem.loss(dict(zip(self.names, self.tensors)))
        value.backward()
        return value

    def step(self) -> None:
        self.opt.step(self.closure)

    @property
    def params(self) -> Params:
        return {k: t.detach() for k, t in zip(self.names, self.tensors)}

    @property
    def state(self) -> dict[str, Any]:
        return self.opt.state[self.tensors[0]]


def torch_kwargs(cfg: Config) -> dict[str, Any]:
    return dict(cfg.kwargs)


def kernel_kwargs(cfg: Config) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100
    )
    kw["line_search_fn"] = None
    kw.update(cfg.kwargs)
    if kw["max_eval"] is None:
        kw["max_eval"] = kw["max_iter"] * 5 // 4
    return kw


def history(state: LBFGSState | Any) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """pureopt's ring buffers as torch's lists (oldest first)."""
    size = state.old_dirs.shape[0]
    count = int(state.history_count)
    num_old = min(count, size)
    slots = [(count - num_old + k) % size for k in range(num_old)]
    return (
        [state.old_dirs[j] for j in slots],
        [state.old_stps[j] for j in slots],
        [state.ro[j] for j in slots],
    )


def to_torch_state(state: LBFGSState) -> dict[str, Any]:
    """The state torch.optim.LBFGS would hold, built from pureopt's (what an adapter's state_dict does)."""
    out: dict[str, Any] = {"func_evals": int(state.func_evals), "n_iter": int(state.n_iter)}
    if int(state.n_iter) == 0:
        return out
    dirs, stps, ro = history(state)
    out.update(
        d=state.d.clone(),
        t=float(state.t),
        old_dirs=[v.clone() for v in dirs],
        old_stps=[v.clone() for v in stps],
        ro=[v.clone() for v in ro],
        H_diag=state.H_diag.clone(),
        prev_flat_grad=state.prev_flat_grad.clone(),
        prev_loss=float(state.prev_loss),
    )
    return out


def assert_state_equal(mine: Any, theirs: dict[str, Any], where: str) -> None:
    """pureopt's state equals torch's, bit for bit."""
    assert int(mine.func_evals) == theirs["func_evals"], where
    assert int(mine.n_iter) == theirs["n_iter"], where
    if theirs["n_iter"] == 0:
        return

    def same(a: Any, b: Any, what: str) -> None:
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{what} @ {where}: {m}")

    same(mine.d, theirs["d"], "d")
    same(mine.t, theirs["t"], "t")
    same(mine.prev_flat_grad, theirs["prev_flat_grad"], "prev_flat_grad")
    same(mine.prev_loss, theirs["prev_loss"], "prev_loss")
    same(mine.H_diag, theirs["H_diag"], "H_diag")
    dirs, stps, ro = history(mine)
    assert len(dirs) == len(theirs["old_dirs"]), where
    for i in range(len(dirs)):
        same(dirs[i], theirs["old_dirs"][i], f"old_dirs[{i}]")
        same(stps[i], theirs["old_stps"][i], f"old_stps[{i}]")
        same(ro[i], theirs["ro"][i], f"ro[{i}]")


# --- the kernel: bit for bit ----------------------------------------------------------------------------------------


@pytest.mark.bitwise
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_kernel_matches_torch_bitwise(cfg, dtype):
    problem = PROBLEMS[cfg.problem]
    init = problem.init(dtype)
    ref = TorchSide(problem, init, **torch_kwargs(cfg))
    kw = kernel_kwargs(cfg)
    names = list(init)
    params = [v.clone() for v in init.values()]
    numel = sum(p.numel() for p in params)
    memory = init_memory(numel, kw["history_size"], dtype, torch.device("cpu"))

    def vg(leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        value, grads = value_and_grad(problem.loss)(dict(zip(names, leaves)))
        return value, [grads[k] for k in names]

    for step in range(STEPS):
        ref.step()
        value, grads = vg(params)
        res = lbfgs_kernel(params, value, grads, memory, vg, **kw)
        params, memory = res.params, res.memory
        for k, p in zip(names, params):
            torch.testing.assert_close(p, ref.params[k], rtol=0, atol=0, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
        assert_state_equal(memory, ref.state, f"step {step}")
    assert float(problem.loss(dict(zip(names, params)))) < float(problem.loss(init))


@pytest.mark.bitwise
def test_kernel_with_donated_memory_matches_torch_and_writes_in_place():
    problem = PROBLEMS["rosen10"]
    cfg = Config("rosen10", {"line_search_fn": "strong_wolfe", "history_size": 3})
    init = problem.init(torch.float64)
    ref = TorchSide(problem, init, **torch_kwargs(cfg))
    names = list(init)
    params = list(init.values())
    memory = init_memory(10, 3, torch.float64, torch.device("cpu"))
    buffers = (memory.old_dirs, memory.old_stps, memory.ro)

    def vg(leaves):
        value, grads = value_and_grad(problem.loss)(dict(zip(names, leaves)))
        return value, [grads[k] for k in names]

    for _ in range(3):
        ref.step()
        value, grads = vg(params)
        res = lbfgs_kernel(params, value, grads, memory, vg, donate=True, **kernel_kwargs(cfg))
        params, memory = res.params, res.memory
        assert all(a is b for a, b in zip((memory.old_dirs, memory.old_stps, memory.ro), buffers))
        for k, p in zip(names, params):
            torch.testing.assert_close(p, ref.params[k], rtol=0, atol=0)
        assert_state_equal(memory, ref.state, "donated")


# --- the public API, replayed by torch from pureopt's own state at every step -----------------------------------------

REPLAY_TOL = {torch.float64: {"rtol": 1e-14, "atol": 1e-15}, torch.float32: {"rtol": 1e-6, "atol": 1e-7}}


@pytest.mark.bitwise
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_update_is_torchs_step_from_the_same_state(cfg, dtype):
    problem = PROBLEMS[cfg.problem]
    params = problem.init(dtype)
    tx = lbfgs(**cfg.kwargs)
    state = tx.init(params)
    fn = value_and_grad(problem.loss)
    for step in range(STEPS):
        ref = TorchSide(problem, params, **torch_kwargs(cfg))
        ref.opt.state[ref.tensors[0]].update(to_torch_state(state))
        ref.step()
        value, grads = fn(params)
        updates, state = tx.update(grads, state, params, value_fn=fn, loss=value)
        params = apply_updates(params, updates)
        for k in params:
            torch.testing.assert_close(
                params[k], ref.params[k], **REPLAY_TOL[dtype], msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}"
            )
        assert_state_equal(state, ref.state, f"step {step}")
        assert int(state.num_updates) == step + 1


# --- the public API, free-running next to torch -------------------------------------------------------------------

# (config, outer steps before the amplified last-bit rounding of apply_updates could reach fp64's tolerance)
FREE_RUNNING = [
    (Config("rosen2", {"lr": 0.1}), 5),
    (Config("rosen2", {"line_search_fn": "strong_wolfe"}), 8),
    (Config("rosen10", {"lr": 0.05}), 6),
    (Config("rosen10", {"line_search_fn": "strong_wolfe"}), 8),
    (Config("rosen10", {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 7}), 6),
    (Config("rosen10", {"lr": 0.05, "history_size": 4, "max_iter": 9, "max_eval": 6}), 8),
    (Config("lsq", {}), 8),
    (Config("lsq", {"line_search_fn": "strong_wolfe", "history_size": 2}), 8),
]
FREE_RUNNING_FP32 = [FREE_RUNNING[1], FREE_RUNNING[5], FREE_RUNNING[6]]


def run_free(
    cfg: Config,
    dtype: torch.dtype,
    call: str = "value_fn",
    steps: int = STEPS,
    tx_kwargs: dict[str, Any] | None = None,
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    tol: dict[str, float] | None = None,
) -> Params:
    problem = PROBLEMS[cfg.problem]
    init = problem.init(dtype)
    ref = TorchSide(problem, init, **torch_kwargs(cfg))
    tx = lbfgs(**{**cfg.kwargs, **(tx_kwargs or {})})
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    fn = value_and_grad(problem.loss)
    tol = tol or ({"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6})
    for step in range(steps):
        if before_step is not None:
            before_step(step, ref.opt)
        ref.step()
        if call == "value_fn":  # the first evaluation happens inside update; grads only give the structure
            updates, state = tx.update(params, state, params, value_fn=fn)
        elif call == "loss_fn":  # gradients by torch.func.grad inside update
            updates, state = tx.update(params, state, params, loss_fn=problem.loss)
        else:  # the caller hands over the loss and grads it already has
            value, grads = fn(params)
            updates, state = tx.update(grads, state, params, value_fn=fn, loss=value)
        params = apply_updates(params, updates)
        for k in params:
            torch.testing.assert_close(params[k], ref.params[k], **tol, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
        assert int(state.func_evals) == ref.state["func_evals"]
        assert int(state.n_iter) == ref.state["n_iter"]
    return params


def _free_id(item: Any) -> str:
    return item.id if isinstance(item, Config) else str(item)


@pytest.mark.parametrize("cfg,steps", FREE_RUNNING, ids=_free_id)
def test_lbfgs_matches_torch_fp64(cfg, steps):
    run_free(cfg, torch.float64, "value_fn", steps=steps)


@pytest.mark.parametrize("call", ["loss_fn", "loss"])
@pytest.mark.parametrize("cfg,steps", [FREE_RUNNING[1], FREE_RUNNING[3], FREE_RUNNING[6]], ids=_free_id)
def test_loss_fn_and_given_loss_match_torch(cfg, steps, call):
    run_free(cfg, torch.float64, call, steps=steps)


@pytest.mark.parametrize("cfg,steps", FREE_RUNNING_FP32, ids=_free_id)
def test_lbfgs_matches_torch_fp32(cfg, steps):
    run_free(cfg, torch.float32, steps=steps)


def test_defaults_match_torch():
    run_free(Config("lsq", {}), torch.float64, steps=3)
    tx_state = lbfgs().init({"w": torch.zeros(3)})
    assert tx_state.old_dirs.shape == (100, 3)  # history_size=100


def test_tensor_lr_matches_torch():
    lr = torch.tensor(0.1, dtype=torch.float64)
    run_free(Config("rosen2", {"lr": lr}), torch.float64, steps=5)


def test_schedule_lr_matches_torch_with_manual_lr():
    def schedule(count):
        return 0.2 * 0.5 ** torch.as_tensor(count, dtype=torch.float64)

    def before(step, opt):
        opt.param_groups[0]["lr"] = schedule(torch.tensor(step))

    run_free(Config("lsq", {"lr": 0.2}), torch.float64, tx_kwargs={"lr": schedule}, before_step=before)


def test_complex_params_match_torch():
    target = torch.tensor([1.0 + 2.0j, -0.5 + 0.25j, 0.3 - 1.0j], dtype=torch.complex128)

    def loss(params):
        z, w = params["z"], params["w"]
        return ((z - target).abs() ** 4).sum() + (w**2).sum() + (z.real * w[0]).sum()

    problem = Problem("complex", loss, lambda: {"z": torch.zeros(3, dtype=torch.complex128), "w": torch.ones(2)})
    PROBLEMS["complex"] = problem
    try:
        for ls in [None, "strong_wolfe"]:
            params = run_free(Config("complex", {"line_search_fn": ls, "lr": 0.5}), torch.float64)
            assert params["z"].dtype == torch.complex128
    finally:
        del PROBLEMS["complex"]


def test_state_after_init():
    params = {"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.complex64)}
    state = lbfgs(history_size=7).init(params)
    assert isinstance(state, LBFGSState) and state._fields[0] == "num_updates"
    assert state.d.shape == (14,) and state.d.dtype == torch.float32  # complex entries count twice
    assert state.old_dirs.shape == (7, 14) and state.old_stps.shape == (7, 14) and state.ro.shape == (7,)
    assert state.t.dtype == torch.float64 and state.prev_loss.dtype == torch.float64
    assert int(state.func_evals) == 0 and int(state.n_iter) == 0 and int(state.history_count) == 0
    assert lbfgs(state_dtype=torch.float64).init(params).d.dtype == torch.float64


@pytest.mark.bitwise
def test_none_gradient_counts_as_zeros_like_torch():
    """A parameter the loss does not use: torch leaves its .grad None and treats it as zeros; so do we."""

    def loss(params):
        return rosenbrock({"x": params["x"]})

    def fn(params):
        value, grads = value_and_grad(loss)(params)
        return value, {"x": grads["x"], "unused": None}

    init = {"x": _rosen_start(2), "unused": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    ref = TorchSide(Problem("p", loss, lambda: init), init, line_search_fn="strong_wolfe")
    tx = lbfgs(line_search_fn="strong_wolfe")
    params = dict(init)
    state = tx.init(params)
    for _ in range(3):
        ref.step()
        assert ref.tensors[1].grad is None
        updates, state = tx.update(params, state, params, value_fn=fn)
        params = apply_updates(params, updates)
        torch.testing.assert_close(params["x"], ref.params["x"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(params["unused"], init["unused"], rtol=0, atol=0)


# --- closed form: least squares -------------------------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_least_squares_converges_to_the_normal_equations(line_search_fn):
    x, y = _least_squares_data()
    design = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (5, 3): W^T stacked over b
    # no loss-change test: the loss only resolves the distance to the optimum to sqrt(machine eps)
    tx = lbfgs(line_search_fn=line_search_fn, tolerance_grad=1e-13, tolerance_change=0.0)
    params = PROBLEMS["lsq"].init(torch.float64)
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update(params, state, params, loss_fn=least_squares)
        params = apply_updates(params, updates)
    torch.testing.assert_close(params["W"], solution[:4].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(params["b"], solution[4], rtol=1e-8, atol=1e-10)


def test_fp64_state_for_fp32_params_reaches_fp32_precision():
    x, y = _least_squares_data()
    design = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    tx = lbfgs(line_search_fn="strong_wolfe", state_dtype=torch.float64, tolerance_grad=0.0, tolerance_change=0.0)
    params = PROBLEMS["lsq"].init(torch.float32)
    state = tx.init(params)
    assert state.old_dirs.dtype == torch.float64
    for _ in range(5):
        updates, state = tx.update(params, state, params, loss_fn=least_squares)
        params = apply_updates(params, updates)
    assert params["W"].dtype == torch.float32
    # the fp32 loss and gradients resolve the optimum to ~1e-6
    torch.testing.assert_close(params["W"].double(), solution[:4].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params["b"].double(), solution[4], rtol=1e-4, atol=1e-5)


# --- purity and errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_update_never_mutates_inputs(line_search_fn):
    problem = PROBLEMS["rosen10"]
    params = problem.init(torch.float64)
    tx = lbfgs(line_search_fn=line_search_fn, history_size=3, lr=0.05 if line_search_fn is None else 1)
    state = tx.init(params)
    fn = value_and_grad(problem.loss)
    for _ in range(4):
        value, grads = fn(params)
        snaps = [[t.clone() for t in flatten(tree)[0]] for tree in (params, grads, state)]
        updates, new_state = tx.update(grads, state, params, value_fn=fn, loss=value)
        for tree, snap in zip((params, grads, state), snaps):
            for now, before in zip(flatten(tree)[0], snap):
                assert torch.equal(now, before)
        params, state = apply_updates(params, updates), new_state


def test_donated_update_writes_history_in_place():
    """What the stateful adapters do: ctx.donate lets the update reuse the history buffers."""
    problem = PROBLEMS["rosen2"]
    params = problem.init(torch.float64)
    tx = lbfgs(history_size=4, lr=0.1)
    state = tx.init(params)
    ref = TorchSide(problem, params, history_size=4, lr=0.1)
    leaves, spec = flatten(params)
    fn = value_and_grad(problem.loss)
    for _ in range(2):
        ref.step()
        buffers = (state.old_dirs, state.old_stps)
        ctx = UpdateContext(spec, {"value_fn": fn}, donate=True)
        new_leaves, state = tx.update.update_leaves(leaves, state, leaves, ctx)
        assert state.old_dirs is buffers[0] and state.old_stps is buffers[1]
        leaves = [p + u for p, u in zip(leaves, new_leaves)]
        torch.testing.assert_close(leaves[0], ref.params["x"], rtol=1e-14, atol=1e-15)


def test_missing_value_fn_is_a_clear_error():
    params = {"x": torch.zeros(2)}
    tx = lbfgs()
    state = tx.init(params)
    with pytest.raises(ValueError, match="value_fn=f"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="not both"):
        tx.update(params, state, params, value_fn=lambda p: (0, p), loss_fn=lambda p: p["x"].sum())
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, state, value_fn=lambda p: (0, p))


def test_value_fn_grads_must_match_the_parameters():
    params = {"x": torch.zeros(2), "y": torch.zeros(1)}
    tx = lbfgs()
    state = tx.init(params)
    with pytest.raises(ValueError, match=re.escape("['y']")):
        tx.update(params, state, params, value_fn=lambda p: (p["x"].sum(), {"x": torch.ones(2)}))


BAD_ARGS = [
    dict(lr=-1.0),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(lr=torch.tensor(-0.5)),
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=str)
def test_invalid_hyperparameters_use_torch_wording(kwargs):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.LBFGS([p], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        lbfgs(**kwargs)


def test_unknown_line_search_uses_torch_wording_at_construction():
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([p], line_search_fn="armijo")
    with pytest.raises(RuntimeError) as theirs:  # torch only notices when it steps
        opt.step(lambda: (p - 1).pow(2).sum().backward() or (p - 1).pow(2).sum())
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        lbfgs(line_search_fn="armijo")


def test_history_size_must_be_positive():
    with pytest.raises(ValueError, match="Invalid history_size value: 0"):
        lbfgs(history_size=0)
