"""TorchOptimizer against torch.optim itself: param groups, closures, schedulers, checkpoints, GradScaler, hooks.

The cases are data: each names a torch.optim class, the pureopt optimizer module and factory, shared
hyperparameters (same names on both sides) and a second param group's overrides. A case whose pureopt module is
not there yet is skipped; add a line to CASES for a new optimizer.
"""

from __future__ import annotations

import copy
import datetime
import gc
import importlib
import io
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _parity import loss_fn as parity_loss
from _parity import make_data as parity_data
from _parity import make_params as parity_params
from _parity import tolerances
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- problems -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    make_params: Callable[[torch.dtype], dict[str, torch.Tensor]]
    make_data: Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[..., torch.Tensor]
    groups: tuple[tuple[str, ...], tuple[str, ...]]
    none_grads: dict[int, tuple[str, ...]]


def _matrix_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"w_in": (8, 4), "w_mid": (8, 8), "w_out": (3, 8)}
    return {k: (0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for k, s in shapes.items()}


def _matrix_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def _matrix_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(torch.tanh(x @ params["w_in"].T) @ params["w_mid"].T)
    return ((h @ params["w_out"].T - y) ** 2).mean()


# the parity problem (a 0-d and an empty parameter included); without the empty one for torch.optim.Adafactor
# (which divides by its size); a matrices-only one for Muon
DEFAULT = Problem(
    parity_params, parity_data, parity_loss, (("w1", "w2", "gain"), ("b1", "b2", "empty")),
    {0: ("b2",), 3: ("b1", "w2"), 4: ("gain",), 13: ("w1",), 17: ("b1",)},
)  # fmt: skip
NO_EMPTY = Problem(parity_params, parity_data, parity_loss, (("w1", "w2", "gain"), ("b1", "b2")), DEFAULT.none_grads)
MATRICES = Problem(_matrix_params, _matrix_data, _matrix_loss, (("w_in", "w_out"), ("w_mid",)), {3: ("w_mid",)})


@dataclass(frozen=True)
class Case:
    id: str
    torch_class: str
    module: str  # pureopt.optimizers.<module>
    factory: str
    kwargs: dict[str, Any]
    group1: dict[str, Any] = field(default_factory=dict)
    problem: Problem = DEFAULT
    state_tol: dict[str, dict[str, float]] = field(default_factory=dict)  # per state key, where torch differs
    extra_keys: tuple[str, ...] = ()  # state pureopt keeps and torch does not (torch carries it along unchanged)

    @property
    def sign(self) -> float:
        """Maximizing: the objective is -loss, so that it stays bounded."""
        return -1.0 if self.kwargs.get("maximize") else 1.0


CASES = [
    Case("sgd", "SGD", "sgd", "sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
         dict(lr=0.02, weight_decay=0.0)),
    Case("sgd-dampening-max", "SGD", "sgd", "sgd", dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True),
         dict(lr=0.1), extra_keys=("step",)),
    Case("adam", "Adam", "adam", "adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01),
         dict(lr=0.005, weight_decay=0.0)),
    Case("adamw", "AdamW", "adam", "adamw", dict(lr=0.01, weight_decay=0.1), dict(lr=0.02, weight_decay=0.0)),
    Case("adagrad", "Adagrad", "adagrad", "adagrad",
         dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01), dict(lr=0.1)),
    Case("adadelta", "Adadelta", "adadelta", "adadelta", dict(lr=1.0, rho=0.8, weight_decay=0.01), dict(lr=0.5)),
    Case("adafactor", "Adafactor", "adafactor", "adafactor", dict(lr=0.01, weight_decay=0.01), dict(lr=0.02),
         NO_EMPTY),
    Case("adamax", "Adamax", "adamax", "adamax", dict(lr=0.01, weight_decay=0.01), dict(lr=0.02)),
    Case("asgd", "ASGD", "asgd", "asgd", dict(lr=0.01, t0=5.0, weight_decay=0.01), dict(lr=0.02)),
    # torch.optim.NAdam keeps mu_product in float32 but its load_state_dict casts it to the parameter dtype:
    # after the reload its product runs in float64, pureopt's stays in float32
    Case("nadam", "NAdam", "nadam", "nadam", dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
         dict(lr=0.02), state_tol={"mu_product": {"rtol": 1e-6, "atol": 1e-12}}),
    Case("radam", "RAdam", "radam", "radam", dict(lr=0.01, weight_decay=0.01), dict(lr=0.02, weight_decay=0.0)),
    Case("rmsprop", "RMSprop", "rmsprop", "rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
         dict(lr=0.02)),
    Case("rprop", "Rprop", "rprop", "rprop", dict(lr=0.01), dict(lr=0.02)),
    Case("muon", "Muon", "muon", "muon", dict(lr=0.02, weight_decay=0.1), dict(lr=0.05), MATRICES),
]  # fmt: skip
IDS = [c.id for c in CASES]


def _factory(case: Case) -> Callable[..., pureopt.GradientTransformation]:
    for package in ("pureopt.algorithms", "pureopt.optimizers"):
        try:
            module = importlib.import_module(f"{package}.{case.module}")
            break
        except ImportError:
            continue
    else:
        pytest.skip(f"pureopt.optimizers.{case.module} is not there (yet)")
    return getattr(module, case.factory)


def _torch_class(case: Case) -> type[torch.optim.Optimizer]:
    cls = getattr(torch.optim, case.torch_class, None)
    if cls is None:
        pytest.skip(f"torch.optim.{case.torch_class} is not in this torch")
    return cls


# --- the harness ----------------------------------------------------------------------------------------------


class Side:
    """One optimizer (torch's or ours) with its parameters, scheduler and the gradients its closure produced."""

    def __init__(
        self,
        case: Case,
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        dtype: torch.dtype,
        scheduler: bool = True,
    ):
        self.case = case
        self.make = make
        self.scheduler = scheduler
        init = case.problem.make_params(dtype)
        self.params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        self.data = case.problem.make_data(dtype)
        self.opt, self.sched = self.build()
        self.grads: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def groups(self) -> list[dict[str, Any]]:
        names0, names1 = self.case.problem.groups
        return [
            {"params": [self.params[k] for k in names0]},
            {"params": [self.params[k] for k in names1], **self.case.group1},
        ]

    def build(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        opt = self.make(self.groups())
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5) if self.scheduler else None

    def closure(self, step: int) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            self.opt.zero_grad()
            loss = self.case.sign * self.case.problem.loss(self.params, *self.data)
            loss.backward()
            for name in self.case.problem.none_grads.get(step, ()):
                self.params[name].grad = None
            self.grads = [(p, None if p.grad is None else p.grad.clone()) for p in self.params.values()]
            return loss

        return closure

    def step(self, step: int) -> torch.Tensor:
        loss = self.opt.step(self.closure(step))
        if self.sched is not None:
            self.sched.step()
        for p, g in self.grads:  # .grad is only read
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
        return loss

    def save_and_reload(self) -> None:
        """Checkpoint through torch.save / torch.load(weights_only=True); a new optimizer and scheduler load it."""
        assert self.sched is not None
        saved = _roundtrip({"opt": self.opt.state_dict(), "sched": self.sched.state_dict()})
        self.opt, self.sched = self.build()
        assert self.sched is not None
        self.sched.load_state_dict(saved["sched"])  # torch's order: the scheduler first, then the optimizer
        self.opt.load_state_dict(saved["opt"])


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _compare(mine: Side, theirs: Side, tol: dict[str, float], where: str) -> None:
    """Parameters, and every state entry the torch.optim side keeps (``theirs`` may be either adapter)."""
    torch_side = theirs if not isinstance(theirs.opt, TorchOptimizer) else mine
    for name in theirs.params:
        torch.testing.assert_close(
            mine.params[name].detach(), theirs.params[name].detach(), **tol, msg=lambda m, n=name: f"{n} {where}: {m}"
        )
        my_state = mine.opt.state.get(mine.params[name], {})
        their_state = theirs.opt.state.get(theirs.params[name], {})
        for key, value in torch_side.opt.state.get(torch_side.params[name], {}).items():
            if not isinstance(value, torch.Tensor) or key in mine.case.extra_keys:
                continue
            assert key in my_state and key in their_state, f"state {key!r} of {name} missing {where}"
            key_tol = mine.case.state_tol.get(key, tol)
            torch.testing.assert_close(
                my_state[key].to(value.dtype),
                their_state[key].to(value.dtype),
                **key_tol,
                msg=lambda m, n=name, k=key: f"{k} of {n} {where}: {m}",
            )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch_optim_with_groups_scheduler_closure_and_checkpoint(case):
    """25 steps, 2 param groups, StepLR, a closure, None gradients, a save/load in the middle: equal to torch."""
    dtype = torch.float64
    tol = tolerances(dtype)
    factory, cls = _factory(case), _torch_class(case)
    theirs = Side(case, lambda groups: cls(groups, **case.kwargs), dtype)
    mine = Side(case, lambda groups: TorchOptimizer(groups, factory, **case.kwargs), dtype)
    for step in range(25):
        if step == 12:
            theirs.save_and_reload()
            mine.save_and_reload()
        their_loss = theirs.step(step)
        my_loss = mine.step(step)
        torch.testing.assert_close(my_loss, their_loss, **tol)
        _compare(mine, theirs, tol, f"@ {step}")
    assert [g["lr"] for g in mine.opt.param_groups] == [g["lr"] for g in theirs.opt.param_groups]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_checkpoints_port_both_ways(case):
    """torch.optim -> TorchOptimizer and TorchOptimizer -> torch.optim, each continued for 8 steps beside the
    optimizer that wrote the checkpoint. The loading side starts from other hyperparameters: the checkpoint's win."""
    dtype = torch.float64
    tol = tolerances(dtype)
    factory, cls = _factory(case), _torch_class(case)
    other_lr = {"lr": case.kwargs["lr"] * 3}
    for writer_is_torch in (True, False):
        if writer_is_torch:
            writer = Side(case, lambda groups: cls(groups, **case.kwargs), dtype)
            make_reader = lambda groups: TorchOptimizer(groups, factory, **other_lr)
        else:
            writer = Side(case, lambda groups: TorchOptimizer(groups, factory, **case.kwargs), dtype)
            make_reader = lambda groups: cls(groups, **other_lr)
        for step in range(8):
            writer.step(step)
        saved = _roundtrip({"opt": writer.opt.state_dict(), "sched": writer.sched.state_dict()})
        reader = Side(case, make_reader, dtype)
        for name, p in reader.params.items():
            with torch.no_grad():
                p.copy_(writer.params[name])
        reader.sched.load_state_dict(saved["sched"])
        reader.opt.load_state_dict(saved["opt"])
        if writer_is_torch:  # the same per-parameter entries and keys as torch's own state dict
            mine = reader.opt.state_dict()
            assert sorted(mine["state"]) == sorted(saved["opt"]["state"])
            for pid, entry in saved["opt"]["state"].items():
                assert set(entry) <= set(mine["state"][pid])
        for step in range(8, 16):
            writer.step(step)
            reader.step(step)
            _compare(reader, writer, tol, f"@ {step} (writer is torch: {writer_is_torch})")


def test_param_groups_and_state_dict_look_like_torchs():
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(2, requires_grad=True)]
    named = list(zip(["w", "b"], params))
    theirs = torch.optim.AdamW(named, lr=1e-3, weight_decay=0.01)
    mine = TorchOptimizer(named, pureopt.adamw, lr=1e-3, weight_decay=0.01)
    for opt in (theirs, mine):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    t_sd, m_sd = theirs.state_dict(), mine.state_dict()
    impl_keys = {"foreach", "fused", "capturable", "differentiable"}
    for tg, mg in zip(t_sd["param_groups"], m_sd["param_groups"]):
        for key, value in tg.items():
            if key not in impl_keys:
                assert mg[key] == value, key
    assert {k: sorted(v) for k, v in t_sd["state"].items()} == {k: sorted(v) for k, v in m_sd["state"].items()}
    assert int(m_sd["param_groups"][0]["pureopt"]["globals"]["num_updates"]) == 1


def test_parameters_without_gradients_are_skipped_and_have_no_saved_state():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = TorchOptimizer([a, b], pureopt.adam, lr=0.1)
    a.grad = torch.ones(3)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert list(opt.state_dict()["state"]) == [0]  # as torch: no entry for a parameter never stepped
    assert float(opt.state[b]["step"]) == 0.0


@pytest.mark.parametrize(
    "torch_class,module,factory,kwargs",
    [("SparseAdam", "sparse_adam", "sparse_adam", dict(lr=0.05)), ("SGD", "sgd", "sgd", dict(lr=0.1)),
     ("Adagrad", "adagrad", "adagrad", dict(lr=0.1))],
    ids=["sparse_adam", "sgd", "adagrad"],
)  # fmt: skip
def test_sparse_gradients_match_torch(torch_class, module, factory, kwargs):
    """nn.Embedding(sparse=True) gradients through TorchOptimizer, with a checkpoint that torch loads back."""
    make = _factory(Case("sparse", torch_class, module, factory, kwargs))
    cls = getattr(torch.optim, torch_class)
    torch.manual_seed(0)
    theirs = torch.nn.Embedding(12, 4, sparse=True, dtype=torch.float64)
    mine = torch.nn.Embedding(12, 4, sparse=True, dtype=torch.float64)
    mine.load_state_dict(theirs.state_dict())
    t_opt, m_opt = cls(theirs.parameters(), **kwargs), TorchOptimizer(mine.parameters(), make, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        if step == 5:  # torch continues from pureopt's checkpoint
            t_opt = cls(theirs.parameters(), **kwargs)
            t_opt.load_state_dict(_roundtrip(m_opt.state_dict()))
        idx = torch.randint(0, 12, (7,), generator=gen)
        for emb, opt in ((theirs, t_opt), (mine, m_opt)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()
        # torch.optim.SparseAdam keeps its step count as a Python int; given a checkpoint's tensor step (float32,
        # as every other torch optimizer keeps it) it computes its bias corrections in float32
        tol = tolerances(torch.float32 if torch_class == "SparseAdam" and step >= 5 else torch.float64)
        torch.testing.assert_close(mine.weight.detach(), theirs.weight.detach(), **tol)


# --- GradScaler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_grad_scaler_unscales_and_skips_inf_steps_like_torch(flat, fused):
    """torch.amp.GradScaler (CPU) against torch's AdamW doing the same. With ``impl="fused"`` (torch:
    ``fused=True``) the optimizer supports AMP scaling: step() gets scaled gradients with grad_scale/found_inf,
    unscales them in the kernel and runs on the skipped step too; otherwise GradScaler unscales the gradients
    before step() and does not call it on a step with inf gradients."""
    sides = []
    for make in (
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=fused or None, foreach=False),
        lambda ps: TorchOptimizer(
            ps, pureopt.adamw, lr=0.01, weight_decay=0.1, flat=flat, impl="fused" if fused else "auto"
        ),
    ):
        init = parity_params(torch.float32)
        params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        opt = make(list(params.values()))
        calls: list[int] = []
        opt.register_step_post_hook(lambda o, args, kwargs, calls=calls: calls.append(1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        sides.append((params, opt, scaler, calls))
    assert sides[1][1]._step_supports_amp_scaling is fused
    data = parity_data(torch.float32)
    for step in range(8):
        unscaled = []
        for params, opt, scaler, _ in sides:
            opt.zero_grad(set_to_none=not flat)  # flat: p.grad are views the kernel unscales in place
            loss = parity_loss(params, *data)
            expected = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            scaler.scale(loss).backward()
            if step == 3:
                params["w1"].grad[0, 0] = float("inf")
            before = {k: v.detach().clone() for k, v in params.items()}
            scaler.step(opt)
            scaler.update()
            unscaled.append((params, expected, before))
        (tp, _, _), (mp, expected, before) = unscaled
        for k in tp:
            torch.testing.assert_close(mp[k].detach(), tp[k].detach(), rtol=1e-5, atol=1e-6)
        if step == 3:  # skipped: nothing moved
            assert all(torch.equal(mp[k].detach(), before[k]) for k in mp)
        else:  # the optimizer saw unscaled gradients
            for g, p in zip(expected, mp.values()):
                torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    (_, _, t_scaler, t_calls), (mparams, m_opt, m_scaler, m_calls) = sides
    assert len(m_calls) == len(t_calls) == (8 if fused else 7)  # fused: step() runs on the skipped step too
    assert m_scaler.get_scale() == t_scaler.get_scale()
    assert float(m_opt.state[mparams["w2"]]["step"]) == 7.0


# --- hyperparameters --------------------------------------------------------------------------------------------


def _pair(make_torch, make_mine, dtype=torch.float64, scheduler=True):
    case = Case("pair", "Adam", "adam", "adam", {})
    return Side(case, make_mine, dtype, scheduler), Side(case, make_torch, dtype, scheduler)


def test_one_cycle_schedule_changing_betas_every_step_matches_torch():
    """OneCycleLR with cycle_momentum edits lr and betas[0] of Adam's groups each step: rebuilt, state kept."""
    mine, theirs = _pair(
        lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.01),
        lambda g: TorchOptimizer(g, pureopt.adam, lr=0.01, weight_decay=0.01),
    )
    for side in (mine, theirs):
        side.sched = torch.optim.lr_scheduler.OneCycleLR(side.opt, max_lr=0.05, total_steps=20, cycle_momentum=True)
    for step in range(15):
        theirs.step(step)
        mine.step(step)
        _compare(mine, theirs, tolerances(torch.float64), f"@ {step}")
    assert mine.opt.param_groups[0]["betas"] == theirs.opt.param_groups[0]["betas"]


def test_changing_weight_decay_and_switching_amsgrad_on_mid_run():
    """weight_decay is read at the next step; amsgrad switched on starts max_exp_avg_sq at zero. Reference: torch
    Adam, given the zero max_exp_avg_sq it would need (it raises KeyError without one)."""
    mine, theirs = _pair(lambda g: torch.optim.Adam(g, lr=0.01), lambda g: TorchOptimizer(g, pureopt.adam, lr=0.01))
    for step in range(16):
        if step == 5:
            for side in (mine, theirs):
                side.opt.param_groups[1]["weight_decay"] = 0.1
        if step == 9:
            for side in (mine, theirs):
                side.opt.param_groups[0]["amsgrad"] = True
            for p in theirs.opt.param_groups[0]["params"]:
                if p in theirs.opt.state:
                    theirs.opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
        theirs.step(step)
        mine.step(step)
        _compare(mine, theirs, tolerances(torch.float64), f"@ {step}")
    assert "max_exp_avg_sq" in mine.opt.state[mine.params["w1"]]


def test_bad_hyperparameter_change_raises_at_step_and_changes_nothing():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = TorchOptimizer([{"params": params[:1]}, {"params": params[1:]}], pureopt.adam, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = ([p.detach().clone() for p in params], pureopt.tree.tree_clone(opt.opt_states))
    opt.param_groups[1]["betas"] = (1.5, 0.9)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 0: 1\.5"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before[0]))
    for a, b in zip(pureopt.tree.leaves(opt.opt_states), pureopt.tree.leaves(before[1])):
        assert torch.equal(a, b)
    opt.param_groups[0]["decoupled_weight_decay"] = True  # pureopt.adam takes it: rebuilt as AdamW
    opt.param_groups[1]["betas"] = (0.9, 0.99)
    opt.step()


def test_add_param_group_mid_run_matches_torch():
    mine, theirs = _pair(lambda g: torch.optim.AdamW(g[:1], lr=0.01), lambda g: TorchOptimizer(g[:1], pureopt.adamw))
    mine.opt.param_groups[0]["lr"] = 0.01
    for step in range(10):
        if step == 4:
            for side in (mine, theirs):
                side.opt.add_param_group({"params": side.groups()[1]["params"], "lr": 0.03, "weight_decay": 0.0})
        theirs.step(step)
        mine.step(step)
        _compare(mine, theirs, tolerances(torch.float64), f"@ {step}")


def test_construction_errors_use_torchs_wording_and_add_nothing():
    params = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    for kwargs in (dict(lr=-1.0), dict(betas=(1.5, 0.9)), dict(weight_decay=-0.1), dict(eps=-1.0)):
        with pytest.raises(ValueError) as theirs:
            torch.optim.AdamW(params, **kwargs)
        with pytest.raises(ValueError) as mine:
            TorchOptimizer(params, pureopt.adamw, **kwargs)
        assert str(mine.value) == str(theirs.value)
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW([], lr=0.1)
    with pytest.raises(ValueError) as mine:
        TorchOptimizer([], pureopt.adamw, lr=0.1)
    assert str(mine.value) == str(theirs.value)
    opt = TorchOptimizer(params[:1], pureopt.adamw, lr=0.1)
    t_opt = torch.optim.AdamW(params[:1], lr=0.1)
    for o, cls in ((opt, ValueError), (t_opt, ValueError)):
        with pytest.raises(cls, match="some parameters appear in more than one parameter group"):
            o.add_param_group({"params": params})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": params[1:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="no hyperparameter 'momentum'"):
        TorchOptimizer(params, pureopt.adamw, momentum=0.9)


# --- hooks ------------------------------------------------------------------------------------------------------


def test_step_and_state_dict_hooks_run_as_in_torch():
    p = torch.randn(3, requires_grad=True)
    opt = TorchOptimizer([p], pureopt.sgd, lr=0.1, momentum=0.9)
    events: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: events.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: events.append("post"))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: events.append("global-pre"))
    try:
        p.grad = torch.ones(3)
        opt.step()
    finally:
        handle.remove()
    assert events == ["global-pre", "pre", "post"]

    opt.register_state_dict_pre_hook(lambda o: events.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    sd = opt.state_dict()
    assert sd["extra"] == 1 and events[-1] == "sd-pre"

    def halve_lr(o, state_dict):
        state_dict["param_groups"] = [{**g, "lr": g["lr"] / 2} for g in state_dict["param_groups"]]
        return state_dict

    opt.register_load_state_dict_pre_hook(halve_lr)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load-post"))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.05 and events[-1] == "load-post"


def test_zero_grad_and_repr():
    p = torch.randn(3, requires_grad=True)
    opt = TorchOptimizer([p], pureopt.adamw, lr=0.1)
    p.grad = torch.ones(3)
    opt.zero_grad()
    assert p.grad is None
    assert "adamw" in repr(opt) and "lr: 0.1" in repr(opt)


# --- torch's PostLocalSGDOptimizer -----------------------------------------------------------------------------


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed is not available, or a process group is already initialised")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}", timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield
    finally:
        gc.collect()  # free DDP reducers (reference cycles) and their gloo work while the group is alive
        dist.destroy_process_group()


def test_inside_torchs_post_local_sgd_optimizer(gloo_group):
    """PostLocalSGDOptimizer wraps a TorchOptimizer like a torch.optim one (steps, averaging, its checkpoint)."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    sides = []
    for make in (
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        lambda ps: TorchOptimizer(ps, pureopt.adamw, lr=0.01, weight_decay=0.1),
    ):
        params = {k: v.clone().requires_grad_(True) for k, v in parity_params(torch.float64).items()}
        opt = PostLocalSGDOptimizer(make(list(params.values())), PeriodicModelAverager(period=2, warmup_steps=2))
        sides.append((params, opt))
    data = parity_data(torch.float64)
    for step in range(8):
        for params, opt in sides:
            if step == 4:
                saved = _roundtrip(opt.state_dict())
                opt.load_state_dict(saved)
                assert saved["step"] == 4
            opt.zero_grad()
            parity_loss(params, *data).backward()
            opt.step()
        (tp, _), (mp, _) = sides
        for k in tp:
            torch.testing.assert_close(mp[k].detach(), tp[k].detach(), **tolerances(torch.float64))


# --- a ready transformation -------------------------------------------------------------------------------------


def test_ready_transformation_matches_torch_clip_then_adam():
    """TorchOptimizer(params, chain(clip_by_global_norm, adam)) == clip_grad_norm_ + torch.optim.Adam."""
    tx = pureopt.chain(pureopt.clip_by_global_norm(0.5), pureopt.adam(lr=0.01))
    init = parity_params(torch.float64)
    data = parity_data(torch.float64)
    mp = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    tp = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    mine = TorchOptimizer(list(mp.values()), tx)
    theirs = torch.optim.Adam(list(tp.values()), lr=0.01)
    for step in range(12):
        if step == 6:
            saved = _roundtrip(mine.state_dict())
            mine = TorchOptimizer(list(mp.values()), tx)
            mine.load_state_dict(saved)
        for params, opt in ((mp, mine), (tp, theirs)):
            opt.zero_grad()
            parity_loss(params, *data).backward()
            if opt is theirs:
                torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
            opt.step()
        for k in tp:
            torch.testing.assert_close(mp[k].detach(), tp[k].detach(), **tolerances(torch.float64))
    sd = mine.state_dict()
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert set(sd["param_groups"][0]["pureopt"]["globals"]) == {"1.num_updates"}
    assert "lr" not in sd["param_groups"][0]


def test_ready_transformation_names_colliding_fields_by_path():
    p = torch.randn(3, requires_grad=True)
    opt = TorchOptimizer([p], pureopt.chain(pureopt.scale_by_adam(), pureopt.scale_by_adam(), pureopt.scale(-0.1)))
    p.grad = torch.ones(3)
    opt.step()
    assert sorted(opt.state_dict()["state"][0]) == [
        "0.exp_avg", "0.exp_avg_sq", "0.step", "1.exp_avg", "1.exp_avg_sq", "1.step"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="one param group"):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)]})
    with pytest.raises(TypeError, match="ready transformation"):
        TorchOptimizer([p], pureopt.adam(), lr=0.1)


# --- checkpoint mismatches -------------------------------------------------------------------------------------


def _trained(make, shapes=((3, 2), (4,)), groups=1, steps=3):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    arg: Any = params if groups == 1 else [{"params": params[:1]}, {"params": params[1:]}]
    opt = make(arg)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def _with_int_state(sd):
    sd = copy.deepcopy(sd)
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.int64)
    return sd


def _with_stray_state(sd):
    sd = copy.deepcopy(sd)
    sd["state"][7] = sd["state"][0]
    return sd


MISMATCHES = [
    ("torch-sgd-momentum", lambda: _trained(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)).state_dict(),
     "different optimizer"),
    ("torch-sgd-stateless", lambda: _trained(lambda p: torch.optim.SGD(p, lr=0.1)).state_dict(), "betas"),
    ("torch-adam", lambda: _trained(lambda p: torch.optim.Adam(p, lr=0.1)).state_dict(), "decoupled_weight_decay"),
    ("pureopt-adam", lambda: _trained(lambda p: TorchOptimizer(p, pureopt.adam, lr=0.1)).state_dict(),
     "decoupled_weight_decay"),
    ("pureopt-adam-decoupled",  # numerically AdamW, but another factory
     lambda: _trained(lambda p: TorchOptimizer(p, pureopt.adam, decoupled_weight_decay=True)).state_dict(),
     "saved by adam"),
    ("pureopt-sgd", lambda: _trained(lambda p: TorchOptimizer(p, pureopt.sgd, lr=0.1)).state_dict(),
     "different optimizer"),
    ("other-shapes", lambda: _trained(lambda p: torch.optim.AdamW(p), shapes=((2, 3), (4,))).state_dict(),
     "has shape"),
    ("other-count", lambda: _trained(lambda p: torch.optim.AdamW(p), shapes=((3, 2), (4,), (1,))).state_dict(),
     "doesn't match the size"),
    ("other-groups", lambda: _trained(lambda p: torch.optim.AdamW(p), groups=2).state_dict(),
     "different number of parameter groups"),
    ("int-state", lambda: _with_int_state(_trained(lambda p: torch.optim.AdamW(p)).state_dict()), "dtype"),
    ("stray-state", lambda: _with_stray_state(_trained(lambda p: torch.optim.AdamW(p)).state_dict()),
     "parameter id 7"),
]  # fmt: skip


@pytest.mark.parametrize("make_checkpoint,match", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_mismatched_checkpoint_raises_and_changes_nothing(make_checkpoint, match):
    opt = _trained(lambda p: TorchOptimizer(p, pureopt.adamw, lr=0.01))
    params = opt.param_groups[0]["params"]
    before_params = [p.detach().clone() for p in params]
    before_groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    before_state = pureopt.tree.tree_clone(opt.opt_states)
    checkpoint = _roundtrip(make_checkpoint())
    kept = copy.deepcopy(checkpoint)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(checkpoint)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before_params))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before_groups
    for a, b in zip(pureopt.tree.leaves(opt.opt_states), pureopt.tree.leaves(before_state)):
        assert torch.equal(a, b)
    for a, b in zip(pureopt.tree.leaves(checkpoint), pureopt.tree.leaves(kept)):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    opt.step()  # still usable


# --- torch.compile ----------------------------------------------------------------------------------------------


def test_compiled_step_fullgraph_matches_torch():
    """torch.compile(opt.step, fullgraph=True, backend="eager") traces the whole step; lr edits take effect."""
    torch._dynamo.reset()
    mine, theirs = _pair(
        lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1),
        lambda g: TorchOptimizer(g, pureopt.adamw, lr=0.01, weight_decay=0.1),
        dtype=torch.float32,
        scheduler=False,  # an lr scheduler wraps step in a function dynamo skips (torch.optim's optimizers too)
    )
    compiled = torch.compile(lambda: mine.opt.step(), backend="eager", fullgraph=True)
    for step in range(6):
        for side, run in ((theirs, theirs.opt.step), (mine, compiled)):
            side.closure(step)()
            run()
            for group in side.opt.param_groups:
                group["lr"] *= 0.8
        _compare(mine, theirs, tolerances(torch.float32), f"@ {step}")


def test_compiled_train_step_with_scheduler_matches_torch():
    """A compiled train step (forward, backward, step) with an lr scheduler; the scheduler's wrapper of step is
    skipped by dynamo (a graph break, for torch.optim's optimizers too), so fullgraph is not possible there."""
    torch._dynamo.reset()
    mine, theirs = _pair(
        lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1),
        lambda g: TorchOptimizer(g, pureopt.adamw, lr=0.01, weight_decay=0.1),
        dtype=torch.float32,
    )

    def train_step(side: Side) -> torch.Tensor:
        side.opt.zero_grad()
        loss = parity_loss(side.params, *side.data)
        loss.backward()
        side.opt.step()
        return loss

    compiled = torch.compile(train_step, backend="eager")
    for step in range(6):
        their_loss = train_step(theirs)
        my_loss = compiled(mine)
        for side in (mine, theirs):
            assert side.sched is not None
            side.sched.step()
        torch.testing.assert_close(my_loss, their_loss, **tolerances(torch.float32))
        _compare(mine, theirs, tolerances(torch.float32), f"@ {step}")
