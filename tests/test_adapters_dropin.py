"""TorchOptimizer in the places where torch.optim's own classes stand: what a client of ``torch.optim.Optimizer``
can observe, each checked against the torch.optim class doing the same thing.

Param groups from generators and ``named_parameters()``, duplicate parameters, torch's error types and messages,
``torch.compile(opt.step)`` following lr changes without recompiling, ``step(closure)`` for L-BFGS, a live
``opt.state`` (clients' keys, re-assigned tensors, Lookahead), ``deepcopy`` / ``pickle``, checkpoints of older
torch versions, and ``torch.amp.GradScaler`` with and without ``unscale_`` + clipping.
"""

from __future__ import annotations

import collections
import copy
import io
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _parity import tolerances

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer

F64 = tolerances(torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(torch.nn.Module):
    """A two-part model, as in torch's per-parameter-options example (``base`` and ``head``)."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.base = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
        self.head = torch.nn.Linear(5, 2)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x)))


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(12, 4, generator=gen, dtype=dtype), torch.randn(12, 2, generator=gen, dtype=dtype)


def _loss(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return ((model(x) - y) ** 2).mean()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, data: Any = None) -> list[float]:
    data = data if data is not None else _data(next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, data)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _assert_models_close(mine: torch.nn.Module, theirs: torch.nn.Module, tol: dict[str, float] = F64) -> None:
    for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- 1. param groups ---------------------------------------------------------------------------------------------


def test_torch_docs_per_parameter_options_with_generators_match_torch():
    """The torch docs' example: groups whose "params" are generators (consumed once, as torch does)."""
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(
        [{"params": mine.base.parameters()}, {"params": mine.head.parameters(), "lr": 1e-3}],
        pureopt.sgd,
        lr=1e-2,
        momentum=0.9,
    )
    t_opt = torch.optim.SGD(
        [{"params": theirs.base.parameters()}, {"params": theirs.head.parameters(), "lr": 1e-3}], lr=1e-2, momentum=0.9
    )
    assert [len(g["params"]) for g in m_opt.param_groups] == [len(g["params"]) for g in t_opt.param_groups] == [4, 2]
    assert [g["lr"] for g in m_opt.param_groups] == [g["lr"] for g in t_opt.param_groups]
    assert _train(mine, m_opt, 6) == pytest.approx(_train(theirs, t_opt, 6), rel=1e-12)
    _assert_models_close(mine, theirs)


def test_named_parameters_and_add_param_group_with_generators_match_torch():
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(mine.base.named_parameters(), pureopt.adam, lr=1e-2)
    t_opt = torch.optim.Adam(theirs.base.named_parameters(), lr=1e-2)
    _train(mine, m_opt, 2)
    _train(theirs, t_opt, 2)
    m_opt.add_param_group({"params": mine.head.named_parameters(), "lr": 5e-3})
    t_opt.add_param_group({"params": theirs.head.named_parameters(), "lr": 5e-3})
    assert [g["param_names"] for g in m_opt.param_groups] == [g["param_names"] for g in t_opt.param_groups]
    _train(mine, m_opt, 4)
    _train(theirs, t_opt, 4)
    _assert_models_close(mine, theirs)
    m_sd, t_sd = m_opt.state_dict(), t_opt.state_dict()
    assert [g["params"] for g in m_sd["param_groups"]] == [g["params"] for g in t_sd["param_groups"]]
    assert [g["param_names"] for g in m_sd["param_groups"]] == [g["param_names"] for g in t_sd["param_groups"]]
    with pytest.raises(ValueError) as theirs_err:  # mixing named and unnamed groups: torch's error
        t_opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ValueError) as mine_err:
        m_opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    assert str(mine_err.value) == str(theirs_err.value)
    assert len(m_opt.param_groups) == 2


@pytest.mark.parametrize(
    "torch_class,factory,kwargs",
    [("SGD", pureopt.sgd, dict(lr=0.1)), ("Adam", pureopt.adam, dict(lr=0.05)),
     ("RMSprop", pureopt.rmsprop, dict(lr=0.01, momentum=0.5))],
    ids=["sgd", "adam", "rmsprop"],
)  # fmt: skip
def test_parameter_listed_twice_warns_and_steps_like_torch(torch_class, factory, kwargs):
    """torch warns and its per-parameter loop steps such a parameter once per listing, sharing the state.

    (Not SGD with momentum: on the first step torch gives each listing its own fresh momentum buffer.)"""
    cls = getattr(torch.optim, torch_class)
    mine, theirs = Net(), Net()
    m_list = [*mine.head.parameters(), mine.head.weight]
    t_list = [*theirs.head.parameters(), theirs.head.weight]
    with warnings.catch_warnings(record=True) as t_warn:
        warnings.simplefilter("always")
        t_opt = cls(t_list, foreach=False, **kwargs)
    with warnings.catch_warnings(record=True) as m_warn:
        warnings.simplefilter("always")
        m_opt = TorchOptimizer(m_list, factory, **kwargs)
    assert [(w.category, str(w.message)) for w in m_warn] == [(w.category, str(w.message)) for w in t_warn]
    assert len(t_warn) == 1 and "duplicate parameters" in str(t_warn[0].message)
    assert len(m_opt.param_groups[0]["params"]) == len(t_opt.param_groups[0]["params"]) == 3
    _train(mine, m_opt, 4)
    _train(theirs, t_opt, 4)
    _assert_models_close(mine, theirs)
    m_sd, t_sd = m_opt.state_dict(), t_opt.state_dict()
    assert m_sd["param_groups"][0]["params"] == t_sd["param_groups"][0]["params"] == [2, 1, 2]
    assert sorted(m_sd["state"]) == sorted(t_sd["state"])
    for pid, entry in t_sd["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(m_sd["state"][pid][key].to(value.dtype), value, **F64)
    fresh = TorchOptimizer(m_list, factory, **kwargs)  # and it loads back
    fresh.load_state_dict(_roundtrip(m_sd))


def test_parameter_in_two_groups_is_torchs_value_error():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError) as mine:
        TorchOptimizer([{"params": [p]}, {"params": [p]}], pureopt.sgd, lr=0.1)
    assert str(mine.value) == str(theirs.value)


BAD_PARAMS: list[Callable[[], Any]] = [
    lambda: None,
    lambda: 3,
    lambda: torch.zeros(2, requires_grad=True),
    lambda: "ab",
    lambda: [1.0],
    lambda: [None],
    lambda: {torch.zeros(2, requires_grad=True)},
    lambda: [{"params": {torch.zeros(2, requires_grad=True)}}],
    lambda: [],
    lambda: [torch.zeros(2, requires_grad=True) * 2],
]


def _outcome(build: Callable[[], Any]) -> tuple[type, str] | None:
    try:
        build()
    except Exception as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("make", BAD_PARAMS, ids=range(len(BAD_PARAMS)))
@pytest.mark.parametrize("torch_class,factory", [("SGD", pureopt.sgd), ("Adam", pureopt.adam)], ids=["sgd", "adam"])
@pytest.mark.parametrize("lr", [0.1, -1.0, -2], ids=["good-lr", "bad-lr", "bad-int-lr"])
def test_bad_params_raise_what_torch_raises(make, torch_class, factory, lr):
    """Same type and message as torch (or accepted where torch accepts, e.g. a set of tensors at the top level);
    a bad lr wins over bad params, as in torch, which checks hyperparameters first."""
    theirs = _outcome(lambda: getattr(torch.optim, torch_class)(make(), lr=lr))
    mine = _outcome(lambda: TorchOptimizer(make(), factory, lr=lr))
    assert mine == theirs
    if lr < 0:
        assert theirs == (ValueError, f"Invalid learning rate: {lr}")


@pytest.mark.parametrize("torch_class,factory", [("Adam", pureopt.adam), ("AdamW", pureopt.adamw)])
@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)], ids=["f-t", "t-f"])
def test_mixed_float_and_tensor_betas_are_refused_as_in_torch(torch_class, factory, betas):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, torch_class)([p], betas=betas)
    with pytest.raises(ValueError) as mine:
        TorchOptimizer([p], factory, betas=betas)
    assert str(mine.value) == str(theirs.value)
    opt = TorchOptimizer([p], factory)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "betas": betas})
    assert len(opt.param_groups) == 1


# --- 2. torch.compile -------------------------------------------------------------------------------------------


def _compiled_run(
    factory: Callable[..., Any],
    cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    backend: str,
    fullgraph: bool = False,
) -> list[int]:
    """Seven steps of a compiled ``opt.step`` beside the same TorchOptimizer run eagerly and torch.optim. The
    scheduler keeps lr for two steps (warm-up: a kernel may compile once more at its second call for reasons of
    its own) and then changes it at every step; returns the compiled side's graph count after each step."""
    torch._dynamo.reset()
    sides = {}
    for name in ("compiled", "eager", "torch"):
        model = Net(torch.float32)
        opt = (
            cls(model.parameters(), **kwargs)
            if name == "torch"
            else TorchOptimizer(model.parameters(), factory, **kwargs)
        )
        # compiled before the scheduler wraps opt.step (dynamo skips the scheduler's wrapper)
        step = torch.compile(opt.step, backend=backend, fullgraph=fullgraph) if name == "compiled" else opt.step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor)
        sides[name] = (model, opt, sched, step)
    data = _data(torch.float32)
    graphs = []
    for _ in range(7):
        for model, opt, sched, step in sides.values():
            opt.zero_grad()
            _loss(model, data).backward()
            with warnings.catch_warnings():  # the scheduler warns: its wrapper of step is not the one called
                warnings.simplefilter("ignore")
                step()
                sched.step()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # a few ulps from the eager run (inductor fuses and reorders the elementwise math), parity tolerance from torch
    _assert_models_close(sides["compiled"][0], sides["eager"][0], dict(rtol=1e-6, atol=1e-7))
    _assert_models_close(sides["compiled"][0], sides["torch"][0], tolerances(torch.float32))
    assert sides["compiled"][1].param_groups[0]["lr"] == pytest.approx(kwargs["lr"] * _factor(7))
    return graphs


def _factor(step: int) -> float:
    return 1.0 if step < 2 else 0.7**step


@pytest.mark.parametrize(
    "factory,cls,kwargs",
    [(pureopt.sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
     (pureopt.adamw, torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1))],
    ids=["sgd", "adamw"],
)  # fmt: skip
def test_compiled_step_inductor_follows_the_scheduler_without_recompiling(factory, cls, kwargs):
    """The default backend, one graph (fullgraph=True) for the whole step, equal to the eager step."""
    graphs = _compiled_run(factory, cls, kwargs, "inductor", fullgraph=True)
    assert graphs[0] >= 1 and graphs[1:] == [graphs[1]] * (len(graphs) - 1), graphs


COMPILE_CASES = [
    (pureopt.adam, torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
    (pureopt.adagrad, torch.optim.Adagrad, dict(lr=0.1)),
    (pureopt.rmsprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    (pureopt.nadam, torch.optim.NAdam, dict(lr=0.05)),
    (pureopt.radam, torch.optim.RAdam, dict(lr=0.05)),
    (pureopt.adamax, torch.optim.Adamax, dict(lr=0.05)),
    (pureopt.adadelta, torch.optim.Adadelta, dict(lr=1.0)),
    (pureopt.asgd, torch.optim.ASGD, dict(lr=0.05)),
    (pureopt.rprop, torch.optim.Rprop, dict(lr=0.01)),
]


@pytest.mark.parametrize("factory,cls,kwargs", COMPILE_CASES, ids=[c[1].__name__ for c in COMPILE_CASES])
def test_compiled_step_aot_eager_follows_the_scheduler_without_recompiling(factory, cls, kwargs):
    graphs = _compiled_run(factory, cls, kwargs, "aot_eager")
    assert graphs[0] >= 1 and graphs[1:] == [graphs[1]] * (len(graphs) - 1), graphs


# --- 3. step(closure) for L-BFGS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_step_closure_matches_torch(line_search_fn):
    """The closure drives L-BFGS's re-evaluations (counted), and step returns the first loss, as torch."""
    kwargs = dict(lr=1.0 if line_search_fn else 0.2, max_iter=5, history_size=4, line_search_fn=line_search_fn)
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(mine.parameters(), pureopt.lbfgs, **kwargs)
    t_opt = torch.optim.LBFGS(theirs.parameters(), **kwargs)
    data = _data()
    for _ in range(4):
        results = []
        for model, opt in ((mine, m_opt), (theirs, t_opt)):
            calls = []

            def closure(model=model, opt=opt, calls=calls):
                opt.zero_grad()
                loss = _loss(model, data)
                loss.backward()
                calls.append(float(loss))
                return loss

            results.append((opt.step(closure), calls))
        (m_loss, m_calls), (t_loss, t_calls) = results
        torch.testing.assert_close(m_loss, t_loss, **F64)
        assert len(m_calls) == len(t_calls) > 1
        assert m_calls == pytest.approx(t_calls, rel=1e-9)
        _assert_models_close(mine, theirs, dict(rtol=1e-9, atol=1e-11))
    with pytest.raises(ValueError, match=r"step\(closure\)"):
        m_opt.step()


# --- 4. a live opt.state ------------------------------------------------------------------------------------------


class Lookahead:
    """A minimal Lookahead (Zhang et al., 2019) that keeps its slow weights in the inner optimizer's state, as
    third-party wrappers do: every ``k`` steps, ``slow += alpha * (fast - slow)`` and ``fast = slow``."""

    def __init__(self, opt: torch.optim.Optimizer, k: int = 3, alpha: float = 0.5) -> None:
        self.opt, self.k, self.alpha, self.count = opt, k, alpha, 0

    def step(self) -> None:
        self.opt.step()
        self.count += 1
        if self.count % self.k:
            return
        with torch.no_grad():
            for group in self.opt.param_groups:
                for p in group["params"]:
                    state = self.opt.state[p]
                    if "slow" not in state:
                        state["slow"] = p.detach().clone()
                    state["slow"].add_(p - state["slow"], alpha=self.alpha)
                    p.copy_(state["slow"])


@pytest.mark.parametrize("flat", [False, True])
def test_lookahead_keeping_slow_weights_in_opt_state_matches_torch(flat):
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(mine.parameters(), pureopt.adam, lr=0.05, flat=flat)
    t_opt = torch.optim.Adam(theirs.parameters(), lr=0.05)
    m_la, t_la = Lookahead(m_opt), Lookahead(t_opt)
    data = _data()
    for step in range(10):
        if step == 7:  # a checkpoint carries the slow weights both ways
            saved = _roundtrip(m_opt.state_dict())
            assert all("slow" in entry for entry in saved["state"].values())
            m_opt = TorchOptimizer(mine.parameters(), pureopt.adam, lr=0.05, flat=flat)
            m_opt.load_state_dict(saved)
            m_la.opt = m_opt
            t_saved = _roundtrip(t_opt.state_dict())
            t_opt = torch.optim.Adam(theirs.parameters(), lr=0.05)
            t_opt.load_state_dict(t_saved)
            t_la.opt = t_opt
        for model, la in ((mine, m_la), (theirs, t_la)):
            la.opt.zero_grad()
            _loss(model, data).backward()
            la.step()
        _assert_models_close(mine, theirs)
    for p, q in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(m_opt.state[p]["slow"], t_opt.state[q]["slow"], **F64)
    # a torch checkpoint with the client's key loads into pureopt, and pureopt's into torch
    cross = TorchOptimizer(mine.parameters(), pureopt.adam, lr=0.05, flat=flat)
    cross.load_state_dict(_roundtrip(t_opt.state_dict()))
    back = torch.optim.Adam(theirs.parameters(), lr=0.05)
    back.load_state_dict(_roundtrip(m_opt.state_dict()))
    for p, q in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(cross.state[p]["slow"], t_opt.state[q]["slow"], **F64)
        torch.testing.assert_close(back.state[q]["slow"], m_opt.state[p]["slow"], **F64)


@pytest.mark.parametrize("flat", [False, True])
def test_reassigned_state_tensors_take_effect_like_torch(flat):
    """``opt.state[p][key] = t`` and Lightning's ``opt.state[p] = {...}`` (moving state to a device) at step 3."""
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(mine.parameters(), pureopt.adamw, lr=0.05, flat=flat)
    t_opt = torch.optim.AdamW(theirs.parameters(), lr=0.05)
    data = _data()
    for step in range(7):
        if step == 3:
            for opt, model in ((m_opt, mine), (t_opt, theirs)):
                for i, p in enumerate(model.parameters()):
                    if i % 2:
                        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone() * 0.5
                    else:
                        opt.state[p] = {k: v.to("cpu", copy=True) * (2.0 if k == "exp_avg_sq" else 1.0)
                                        for k, v in opt.state[p].items()}  # fmt: skip
        _train(mine, m_opt, 1, data)
        _train(theirs, t_opt, 1, data)
        _assert_models_close(mine, theirs)
    p = next(mine.parameters())
    t = torch.full_like(p, 0.25)
    m_opt.state[p]["exp_avg"] = t
    assert torch.equal(m_opt.state[p]["exp_avg"], t)
    if not flat:  # the very tensor, as in torch (with flat=True it is copied into the flat buffer)
        assert m_opt.state[p]["exp_avg"] is t


def test_bad_state_writes_are_refused_and_change_nothing():
    model = Net()
    opt = TorchOptimizer(model.parameters(), pureopt.adam, lr=0.05)
    _train(model, opt, 2)
    p = next(model.parameters())
    before = {k: v.clone() for k, v in opt.state[p].items()}
    bad = [
        ("exp_avg", torch.zeros(3), ValueError, "shape"),
        ("exp_avg", torch.zeros_like(p, dtype=torch.int64), ValueError, "dtype"),
        ("exp_avg", "zeros", ValueError, "should be a tensor"),
        ("step", torch.zeros(2), ValueError, "shape"),
    ]
    for key, value, error, match in bad:
        with pytest.raises(error, match=match):
            opt.state[p][key] = value
        with pytest.raises(error, match=match):
            opt.state[p].update({"note": 1, key: value})
    assert "note" not in opt.state[p]
    with pytest.raises(ValueError, match="lacks 'exp_avg_sq'"):
        opt.state[p] = {"step": before["step"], "exp_avg": before["exp_avg"]}
    for action in (lambda: opt.state[p].pop("exp_avg"), lambda: opt.state.pop(p), lambda: opt.state[p].clear()):
        with pytest.raises(ValueError, match="cannot"):
            action()
    with pytest.raises(ValueError, match="cannot"):
        del opt.state[p]["exp_avg"]
    assert {k: v for k, v in opt.state[p].items()}.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value)
    opt.state[p]["note"] = "kept"  # a client's entries: anything, kept across steps and in state_dict
    opt.state[p]["count"] = 3
    _train(model, opt, 1)
    assert opt.state[p]["note"] == "kept" and opt.state_dict()["state"][0]["count"] == 3
    del opt.state[p]["note"]
    assert "note" not in opt.state_dict()["state"][0]


def test_non_tensor_extras_and_other_keys_round_trip_like_torch():
    """Entries clients add (numbers, strings, tensors; under a parameter or under another key) are in
    state_dict() and come back from load_state_dict(), as with torch.optim."""
    sides = []
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: TorchOptimizer(ps, pureopt.sgd, lr=0.1, momentum=0.9)):  # fmt: skip
        model = Net()
        opt = make(model.parameters())
        _train(model, opt, 2)
        p = next(model.parameters())
        opt.state[p]["tag"] = (1, 2)  # (not a string: torch's load_state_dict turns one into a generator's repr)
        opt.state[p]["seen"] = 2
        opt.state["global_counter"] = {"n": 5}
        sd = _roundtrip(opt.state_dict())
        fresh = make(model.parameters())
        fresh.load_state_dict(sd)
        sides.append((sd, fresh, p))
    (t_sd, t_fresh, tp), (m_sd, m_fresh, mp) = sides
    assert t_sd["state"]["global_counter"] == m_sd["state"]["global_counter"] == {"n": 5}
    for key in ("tag", "seen"):
        assert t_sd["state"][0][key] == m_sd["state"][0][key]
        assert t_fresh.state[tp][key] == m_fresh.state[mp][key]
    assert m_fresh.state["global_counter"] == {"n": 5}
    m_fresh.load_state_dict(t_sd)  # torch's checkpoint with the extras, into pureopt
    assert m_fresh.state[mp]["tag"] == (1, 2)
    m_fresh.state[mp]["name"] = "fast"
    again = TorchOptimizer(m_fresh.param_groups[0]["params"], pureopt.sgd, lr=0.1, momentum=0.9)
    again.load_state_dict(_roundtrip(m_fresh.state_dict()))
    assert again.state[mp]["name"] == "fast"


# --- 5. deepcopy and pickle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True])
def test_deepcopy_steps_independently_like_torch(flat):
    mine, theirs = Net(), Net()
    m_opt = TorchOptimizer(mine.parameters(), pureopt.adam, lr=0.05, weight_decay=0.01, flat=flat)
    t_opt = torch.optim.Adam(theirs.parameters(), lr=0.05, weight_decay=0.01)
    data = _data()
    _train(mine, m_opt, 3, data)
    _train(theirs, t_opt, 3, data)
    m_opt.state[next(mine.parameters())]["tag"] = 1
    m_copy, t_copy = copy.deepcopy(m_opt), copy.deepcopy(t_opt)
    m_params, t_params = m_copy.param_groups[0]["params"], t_copy.param_groups[0]["params"]
    assert not any(a is b for a, b in zip(m_params, mine.parameters()))
    assert m_copy.state[m_params[0]]["tag"] == 1

    def loss_of(params: list[torch.Tensor]) -> torch.Tensor:
        model = Net()
        return torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), params)), data[0])

    for _ in range(4):
        for params, opt in ((m_params, m_copy), (t_params, t_copy)):
            opt.zero_grad()
            ((loss_of(params) - data[1]) ** 2).mean().backward()
            opt.step()
    _train(mine, m_opt, 2, data)  # the originals go on their own way
    _train(theirs, t_opt, 2, data)
    for a, b in zip(m_params, t_params):
        torch.testing.assert_close(a.detach(), b.detach(), **F64)
    _assert_models_close(mine, theirs)


def test_pickle_keeps_the_factory_by_reference_and_refuses_closures_clearly():
    model = Net()
    opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=0.05, weight_decay=0.1)
    _train(model, opt, 2)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored._factory is not None and restored._factory.fn is pureopt.adamw
    assert restored.param_groups[0]["weight_decay"] == 0.1
    sd, restored_sd = opt.state_dict(), restored.state_dict()
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored_sd["state"][pid][key], value)
    hand_built = TorchOptimizer(model.parameters(), pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adam()))
    with pytest.raises(TypeError, match="pickle stores functions by reference"):
        pickle.dumps(hand_built)
    copy.deepcopy(hand_built).step()  # a deep copy needs no pickling


# --- 6. checkpoints of older torch versions -------------------------------------------------------------------------


OLD_OPTIONS = ("maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay", "nesterov")


@pytest.mark.parametrize(
    "torch_class,factory,kwargs",
    [("Adam", pureopt.adam, dict(lr=0.05)), ("AdamW", pureopt.adamw, dict(lr=0.05, weight_decay=0.1)),
     ("SGD", pureopt.sgd, dict(lr=0.05, momentum=0.9)), ("RMSprop", pureopt.rmsprop, dict(lr=0.01))],
    ids=["adam", "adamw", "sgd", "rmsprop"],
)  # fmt: skip
def test_checkpoint_without_later_options_loads_with_torchs_defaults(torch_class, factory, kwargs):
    cls = getattr(torch.optim, torch_class)
    writer_model = Net()
    writer = cls(writer_model.parameters(), **kwargs)
    _train(writer_model, writer, 3)
    old = _roundtrip(writer.state_dict())
    for group in old["param_groups"]:
        for key in OLD_OPTIONS:
            group.pop(key, None)
    mine, theirs = Net(), Net()
    for model in (mine, theirs):
        model.load_state_dict(writer_model.state_dict())
    m_opt, t_opt = TorchOptimizer(mine.parameters(), factory, lr=0.5), cls(theirs.parameters(), lr=0.5)
    m_opt.load_state_dict(copy.deepcopy(old))
    t_opt.load_state_dict(copy.deepcopy(old))
    for key, value in t_opt.param_groups[0].items():
        if key != "params" and key in m_opt.param_groups[0]:
            assert m_opt.param_groups[0][key] == value, key
    _train(mine, m_opt, 4)
    _train(theirs, t_opt, 4)
    _assert_models_close(mine, theirs)


# --- 7. torch.amp.GradScaler ------------------------------------------------------------------------------------------


def test_step_supports_amp_scaling_only_for_torchs_fused_kernels():
    params = list(Net(torch.float32).parameters())
    assert TorchOptimizer(params, pureopt.adamw)._step_supports_amp_scaling is False
    assert TorchOptimizer(params, pureopt.adamw, impl="foreach")._step_supports_amp_scaling is False
    assert TorchOptimizer(params, pureopt.rmsprop)._step_supports_amp_scaling is False
    assert TorchOptimizer(params, pureopt.chain(pureopt.adam()))._step_supports_amp_scaling is False
    for factory in (pureopt.adamw, pureopt.adam, pureopt.sgd, pureopt.adagrad):
        assert TorchOptimizer(params, factory, impl="fused")._step_supports_amp_scaling is True
    assert getattr(torch.optim.AdamW(params), "_step_supports_amp_scaling", False) is False  # torch's own rule
    assert torch.optim.AdamW(params, fused=True)._step_supports_amp_scaling is True


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "unscale-clip"])
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_grad_scaler_with_and_without_unscale_and_clipping_matches_torch(clip, fused):
    """What frameworks do: scale, backward, (unscale_ + clip_grad_norm_), scaler.step, update; an inf step is
    skipped. A step pre-hook sees the gradients step() is given: unscaled, except with fused kernels (scaled,
    unscaled inside the kernel), exactly as with torch's classes."""
    runs = []
    for make in (
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=fused or None, foreach=False),
        lambda ps: TorchOptimizer(ps, pureopt.adamw, lr=0.01, weight_decay=0.1, impl="fused" if fused else "auto"),
    ):
        model = Net(torch.float32)
        opt = make(list(model.parameters()))
        seen: list[float] = []
        opt.register_step_pre_hook(
            lambda o, a, k, seen=seen: seen.append(float(sum(p.grad.abs().sum() for p in o.param_groups[0]["params"])))
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        data = _data(torch.float32)
        for step in range(6):
            opt.zero_grad()
            scaler.scale(_loss(model, data)).backward()
            if step == 2:
                next(model.parameters()).grad[0, 0] = float("inf")
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        runs.append((model, seen, scaler.get_scale()))
    (theirs, t_seen, t_scale), (mine, m_seen, m_scale) = runs
    _assert_models_close(mine, theirs, tolerances(torch.float32))
    assert m_scale == t_scale
    assert len(m_seen) == len(t_seen)
    assert m_seen == pytest.approx(t_seen, rel=1e-5, nan_ok=True)


def test_copies_of_the_state_view_are_plain_dicts_and_assigning_state_writes_through():
    model = Net()
    opt = TorchOptimizer(model.parameters(), pureopt.sgd, lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    p = next(model.parameters())
    opt.state[p]["tag"] = 7
    snapshot = copy.deepcopy(opt.state)  # its keys are copies of the parameters too, as for torch's opt.state
    first = next(iter(snapshot.values()))
    assert type(snapshot) is collections.defaultdict and type(first) is dict and len(snapshot) == len(opt.state)
    assert first["tag"] == 7 and torch.equal(first["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert first["momentum_buffer"] is not opt.state[p]["momentum_buffer"]
    assert pickle.loads(pickle.dumps(opt.state[p]))["tag"] == 7
    # ``opt.state = mapping``: every entry written through, as opt.state[key] = value
    halved = {q: {k: v * 0.5 if isinstance(v, torch.Tensor) else v for k, v in opt.state[q].items()}
              for q in model.parameters()}  # fmt: skip
    reference = Net()
    reference.load_state_dict(model.state_dict())
    t_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    t_opt.load_state_dict(opt.state_dict())
    opt.state = halved
    assert opt.state[p]["tag"] == 7
    t_opt.state = collections.defaultdict(
        dict, {q: {k: v * 0.5 for k, v in t_opt.state[q].items()} for q in reference.parameters()}
    )
    _train(model, opt, 2)
    _train(reference, t_opt, 2)
    _assert_models_close(model, reference)
