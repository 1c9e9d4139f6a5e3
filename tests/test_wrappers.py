"""Wrappers: inject_hyperparams, MultiSteps, apply_if_finite, lookahead, ema, ema_params / polyak_average.

References: torch.optim (Adam, SGD, AdamW) and torch.optim.lr_scheduler driven the same way, AveragedModel,
and the rules (gradient averaging, Lookahead, EMA) written out with plain torch ops.
"""

from __future__ import annotations

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _memory import transient_peak
from _parity import grads_at, make_data, make_params, tolerances
from torch._dynamo.utils import counters

import pureopt
from pureopt import schedules, tree
from pureopt.combine import partition
from pureopt.wrappers import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    ema,
    ema_params,
    inject_hyperparams,
    lookahead,
    polyak_average,
)

F64 = torch.float64


def close_trees(a, b, rtol=1e-12, atol=1e-14):
    la, sa = tree.flatten(a)
    lb, sb = tree.flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)


class Stepper:
    """torch.optim on the parity problem of tests/_parity.py (same params, data, None-gradient pattern)."""

    def __init__(self, opt_factory, dtype):
        self.data = make_data(dtype)
        init = make_params(dtype)
        self.names = list(init)
        self.tp = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        self.opt = opt_factory(list(self.tp.values()))
        self.init = init

    def step(self, step, grads=None):
        g = grads if grads is not None else grads_at(self.detached(), step, self.data)
        for k, t in self.tp.items():
            t.grad = None if g[k] is None else g[k].clone()
        self.opt.step()

    def detached(self):
        return {k: t.detach() for k, t in self.tp.items()}


# --- inject_hyperparams ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_inject_adam_lr_matches_torch_and_a_state_change_takes_effect_next_step(dtype):
    tol = tolerances(dtype)
    ref = Stepper(lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True), dtype)
    tx = inject_hyperparams(pureopt.adam, hyperparam_dtype=dtype)(lr=0.01, amsgrad=True)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    assert isinstance(state, InjectHyperparamsState)
    assert state.hyperparams["lr"].dtype == dtype and state.hyperparams["lr"].ndim == 0
    for step in range(25):
        if step == 10:
            ref.opt.param_groups[0]["lr"] = 0.003
            state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(0.003, dtype=dtype)})
        ref.step(step)
        g = grads_at(params, step, ref.data)
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        for k in ref.names:
            torch.testing.assert_close(params[k], ref.tp[k].detach(), **tol)
        torch.testing.assert_close(state.inner_state.exp_avg_sq["w1"], ref.opt.state[ref.tp["w1"]]["exp_avg_sq"], **tol)
    assert float(state.hyperparams["lr"]) == pytest.approx(0.003)
    assert int(state.num_updates) == 25


@pytest.mark.parametrize(
    "name,kwargs", [("sgd", {"momentum": 0.9, "nesterov": True}), ("adamw", {"weight_decay": 0.1})], ids=str
)
def test_inject_lr_of_other_optimizers_matches_torch(name, kwargs):
    ref = Stepper(lambda p: getattr(torch.optim, {"sgd": "SGD", "adamw": "AdamW"}[name])(p, lr=0.05, **kwargs), F64)
    tx = inject_hyperparams(getattr(pureopt, name), hyperparam_dtype=F64)(lr=0.05, **kwargs)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    assert list(state.hyperparams) == ["lr", *[k for k, v in kwargs.items() if not isinstance(v, bool)]]
    for step in range(25):
        if step == 7:
            ref.opt.param_groups[0]["lr"] = 0.02
            state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(0.02, dtype=F64)})
        ref.step(step)
        updates, state = tx.update(grads_at(params, step, ref.data), state, params)
        params = pureopt.apply_updates(params, updates)
        for k in ref.names:
            torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))


def test_inject_schedule_matches_torch_lr_scheduler_and_is_visible_in_the_state():
    ref = Stepper(lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.05), F64)
    sched = torch.optim.lr_scheduler.StepLR(ref.opt, step_size=4, gamma=0.5)
    tx = inject_hyperparams(pureopt.adamw, static_args="weight_decay", hyperparam_dtype=F64)(
        lr=schedules.step_lr(0.02, step_size=4, gamma=0.5), weight_decay=0.05
    )
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    assert list(state.hyperparams) == ["lr"]  # weight_decay is static
    for step in range(25):
        used = ref.opt.param_groups[0]["lr"]
        ref.step(step)
        sched.step()
        updates, state = tx.update(grads_at(params, step, ref.data), state, params)
        params = pureopt.apply_updates(params, updates)
        assert float(state.hyperparams["lr"]) == pytest.approx(used, rel=1e-12)
        for k in ref.names:
            torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))


def test_inject_other_numeric_hyperparameters_eagerly():
    """eps and weight_decay injected as tensors: changing them in the state == changing torch's param_groups."""
    ref = Stepper(lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8, weight_decay=0.0), F64)
    tx = inject_hyperparams(pureopt.adam, hyperparam_dtype=F64)(lr=0.01, eps=1e-8, weight_decay=0.0)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    for step in range(12):
        if step == 5:
            ref.opt.param_groups[0].update(eps=1e-3, weight_decay=0.2)
            state = state._replace(
                hyperparams={
                    **state.hyperparams,
                    "eps": torch.tensor(1e-3, dtype=F64),
                    "weight_decay": torch.tensor(0.2, dtype=F64),
                }
            )
        ref.step(step)
        updates, state = tx.update(grads_at(params, step, ref.data), state, params)
        params = pureopt.apply_updates(params, updates)
        for k in ref.names:
            torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))


def test_inject_hyperparam_dtypes():
    params = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    state = inject_hyperparams(pureopt.adam)(lr=1e-3).init(params)
    assert state.hyperparams["lr"].dtype == torch.get_default_dtype() == torch.float32
    state = inject_hyperparams(pureopt.adam, hyperparam_dtype=F64)(lr=1e-3).init(params)
    assert state.hyperparams["lr"].dtype == F64
    state = inject_hyperparams(pureopt.sgd)(lr=torch.tensor(0.5, dtype=F64)).init(params)
    assert state.hyperparams["lr"].dtype == F64  # a tensor keeps its dtype
    u, _ = inject_hyperparams(pureopt.sgd)(lr=0.5).update({"w": torch.ones(3, dtype=torch.bfloat16)}, state, params)
    assert pureopt.apply_updates(params, u)["w"].dtype == torch.bfloat16


def test_inject_user_factory_with_positional_args_and_learning_rate_name():
    def my_opt(learning_rate, momentum=0.9, nesterov=False):
        return pureopt.chain(pureopt.trace(momentum, nesterov=nesterov), pureopt.scale_by_learning_rate(learning_rate))

    tx = inject_hyperparams(my_opt, hyperparam_dtype=F64)(0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    params = (torch.randn(4, dtype=F64, generator=gen),)
    tp = params[0].clone().requires_grad_(True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=True)
    state = tx.init(params)
    assert sorted(state.hyperparams) == ["learning_rate", "momentum"]
    for _ in range(10):
        g = torch.randn(4, dtype=F64, generator=gen)
        tp.grad = g.clone()
        opt.step()
        u, state = tx.update((g,), state, params)
        params = pureopt.apply_updates(params, u)
        torch.testing.assert_close(params[0], tp.detach(), rtol=1e-12, atol=1e-14)


def test_inject_validates_with_torch_wording_before_anything_runs():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match=str(theirs.value)):
        inject_hyperparams(pureopt.adam)(lr=-1.0)
    tx = inject_hyperparams(pureopt.adam)(lr=0.1)
    state = tx.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="no entry 'lr'"):
        tx.update({"w": torch.ones(2)}, state._replace(hyperparams={}), {"w": torch.ones(2)})


# --- MultiSteps ------------------------------------------------------------------------------------------------


@pytest.mark.bitwise
@pytest.mark.parametrize("k", [1, 3])
def test_multisteps_adam_equals_torch_adam_on_the_mean_gradient(k):
    dtype = F64
    data = make_data(dtype)
    init = make_params(dtype)
    tp = {n: v.clone().requires_grad_(True) for n, v in init.items()}
    opt = torch.optim.Adam(tp.values(), lr=0.01)
    ms = MultiSteps(pureopt.adam(lr=0.01), every_k=k)
    params = {n: v.clone() for n, v in init.items()}
    state = ms.init(params)
    gen = torch.Generator().manual_seed(3)
    acc = None
    for call in range(8 * k):
        noise = {n: torch.randn(v.shape, dtype=dtype, generator=gen) for n, v in init.items()}
        g = {n: x + 0.1 * noise[n] for n, x in grads_at(params, 1, data).items()}  # a different micro-batch
        # reference: sum k gradients (at torch's params), then one Adam step on the mean
        tg = {n: x + 0.1 * noise[n] for n, x in grads_at({n: t.detach() for n, t in tp.items()}, 1, data).items()}
        acc = tg if acc is None else {n: acc[n] + tg[n] for n in acc}
        if (call + 1) % k == 0:
            for n, t in tp.items():
                t.grad = acc[n] / k
            opt.step()
            acc = None
        snap = snapshot(params)
        updates, state = ms.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        final = (call + 1) % k == 0
        assert bool(MultiSteps.has_updated(state)) == final
        assert int(state.gradient_step) == (call + 1) // k
        if not final:
            assert all(torch.equal(u, torch.zeros_like(u)) for u in tree.leaves(updates))
            assert_unchanged(params, snap, "params")
        for n in init:
            torch.testing.assert_close(params[n], tp[n].detach(), **tolerances(dtype))


def test_multisteps_in_a_chain_and_with_a_schedule_of_k():
    def every_k(gradient_step):
        return torch.where(gradient_step < 2, 2, 3)

    ms = MultiSteps(pureopt.sgd(lr=1.0), every_k)
    tx = pureopt.chain(pureopt.scale(2.0), ms.gradient_transformation())
    params = {"w": torch.zeros(2, dtype=F64)}
    state = tx.init(params)
    seen = []
    for i in range(1, 11):
        u, state = tx.update({"w": torch.full((2,), float(i), dtype=F64)}, state, params)
        seen.append(float(u["w"][0]))
    # windows of 2, 2, 3, 3: updates are -2 * mean of each window's gradients
    assert seen == [0, -3.0, 0, -7.0, 0, 0, -12.0, 0, 0, -18.0]
    assert isinstance(state[1], MultiStepsState)


def test_multisteps_none_gradient_on_the_last_call_skips_that_parameter():
    ms = MultiSteps(pureopt.adam(0.1), 2)
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = ms.init(params)
    _, state = ms.update({"a": torch.ones(2), "b": torch.ones(2)}, state, params)
    u, state = ms.update({"a": torch.ones(2), "b": None}, state, params)
    assert u["b"] is None and float(state.inner_opt_state.step["b"]) == 0.0
    assert float(state.inner_opt_state.step["a"]) == 1.0
    assert torch.equal(state.acc_grads["b"], torch.zeros(2))


def test_multisteps_validation():
    with pytest.raises(ValueError, match="Invalid every_k value: 0"):
        MultiSteps(pureopt.sgd(), 0)
    with pytest.raises(TypeError, match="not a GradientTransformation"):
        MultiSteps("adam", 2)


# --- apply_if_finite -------------------------------------------------------------------------------------------


def test_apply_if_finite_skips_non_finite_steps_bitwise_and_counts():
    ref = Stepper(lambda p: torch.optim.Adam(p, lr=0.01), F64)
    tx = apply_if_finite(pureopt.adam(lr=0.01), max_consecutive_errors=2)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    bad = {3: "nan", 4: "inf", 9: "nan", 10: "nan", 11: "nan"}  # 11 is the 3rd in a row: applied anyway
    total = 0
    for step in range(15):
        g = grads_at(params, step, ref.data)
        if step in bad:
            g["w1"] = g["w1"].clone()
            g["w1"][0, 0] = float(bad[step])
            total += 1
        snaps = snapshot(params), snapshot(state.inner_state)
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        assert isinstance(state, ApplyIfFiniteState)
        assert int(state.total_notfinite) == total
        assert bool(state.last_finite) == (step not in bad)
        if step in bad and step != 11:
            assert_unchanged(params, snaps[0], "params")
            assert_unchanged(state.inner_state, snaps[1], "inner state")
            assert all(torch.equal(u, torch.zeros_like(u)) for u in tree.leaves(updates) if u is not None)
        elif step == 11:
            assert int(state.notfinite_count) == 3
            assert torch.isnan(params["w1"][0, 0])  # applied: the NaN went through
            break
        else:
            assert int(state.notfinite_count) == 0
            ref.step(step)  # torch steps only on the finite steps
            for k in ref.names:
                torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))


@pytest.mark.parametrize("impl", ["auto", "foreach"])
def test_apply_if_finite_donated_skips_inside_the_inner_step(impl):
    # donated (inplace_step), the skip is GradScaler's found_inf flag handed to the inner AdamW: torch's fused kernel
    # skips on it without a host sync ("auto"), the foreach path reads it; no copy of the state to select from
    ref = Stepper(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), F64)
    tx = apply_if_finite(pureopt.adamw(lr=0.01, weight_decay=0.1, impl=impl), max_consecutive_errors=1)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    bad = {2: "nan", 5: "inf", 6: "nan"}  # 6 is the 2nd in a row: applied anyway
    for step in range(7):
        g = grads_at(params, step, ref.data)
        if step in bad:
            g["w1"] = g["w1"].clone()
            g["w1"][0, 0] = float(bad[step])
        snaps = snapshot(params), snapshot(state.inner_state)
        state = pureopt.inplace_step(tx, g, state, params)
        assert bool(state.last_finite) == (step not in bad)
        if step in (2, 5):
            assert_unchanged(params, snaps[0], "params")
            assert_unchanged(state.inner_state, snaps[1], "inner state")
        elif step == 6:
            assert int(state.notfinite_count) == 2 and torch.isnan(params["w1"][0, 0])
        else:
            ref.step(step)  # torch steps only on the finite steps
            for k in ref.names:
                torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))


def test_apply_if_finite_donated_step_holds_no_copy_of_the_state():
    # the select-based step held the inner's new state, its updates and their selections: 24 bytes a parameter
    params = [torch.randn(256, 256) for _ in range(8)]  # 2 MiB
    grads = [torch.randn(256, 256) * 1e-2 for _ in params]
    tx = apply_if_finite(pureopt.adamw(lr=1e-3), max_consecutive_errors=3)
    state = pureopt.inplace_step(tx, grads, tx.init(params), params)
    peak, live = transient_peak(lambda: pureopt.inplace_step(tx, grads, state, params))
    assert peak - live <= 1 << 20, f"{(peak - live) / 2**20:.2f} MiB"


def test_apply_if_finite_validation():
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        apply_if_finite(pureopt.sgd(), -1)


# --- lookahead ---------------------------------------------------------------------------------------------------


@pytest.mark.bitwise
@pytest.mark.parametrize("sync_period,alpha", [(1, 0.5), (5, 0.5), (3, 0.8)])
def test_lookahead_matches_the_rule_around_torch_adam(sync_period, alpha):
    ref = Stepper(lambda p: torch.optim.Adam(p, lr=0.02), F64)
    slow = {k: v.clone() for k, v in ref.init.items()}
    tx = lookahead(pureopt.adam(lr=0.02), sync_period=sync_period, alpha=alpha)
    params = {k: v.clone() for k, v in ref.init.items()}
    state = tx.init(params)
    for step in range(20):
        ref.step(step)
        if (step + 1) % sync_period == 0:  # Zhang et al.: phi <- phi + alpha (theta - phi); theta <- phi
            with torch.no_grad():
                for k, t in ref.tp.items():
                    slow[k] = slow[k] + alpha * (t - slow[k])
                    t.copy_(slow[k])
        updates, state = tx.update(grads_at(params, step, ref.data), state, params)
        params = pureopt.apply_updates(params, updates)
        for k in ref.names:
            torch.testing.assert_close(params[k], ref.tp[k].detach(), **tolerances(F64))
            torch.testing.assert_close(state.slow_params[k], slow[k], **tolerances(F64))
        if (step + 1) % sync_period == 0:
            assert all(torch.equal(params[k], state.slow_params[k]) for k in params)  # exactly the slow weights
        assert int(state.steps_since_sync) == (step + 1) % sync_period


def test_lookahead_validation():
    with pytest.raises(ValueError, match="sync_period"):
        lookahead(pureopt.sgd(), 0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        lookahead(pureopt.sgd(), 2, 1.5)
    tx = lookahead(pureopt.sgd(0.1), 2, 0.5)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))


# --- ema of updates, averages of parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False])
def test_ema_of_updates_matches_the_rule(debias):
    gen = torch.Generator().manual_seed(0)
    tx = ema(0.9, debias=debias)
    g0 = {"a": torch.zeros(3, dtype=F64), "b": torch.zeros(2, 2, dtype=F64)}
    state = tx.init(g0)
    m = {k: torch.zeros_like(v) for k, v in g0.items()}
    for t in range(1, 11):
        g = {k: torch.randn(v.shape, dtype=F64, generator=gen) for k, v in g0.items()}
        u, state = tx.update(g, state)
        for k in g:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            want = m[k] / (1 - 0.9**t) if debias else m[k]
            torch.testing.assert_close(u[k], want, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(state.ema[k], m[k], rtol=1e-13, atol=1e-15)


def _module_pair(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    return model


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_param_averages_match_averaged_model(kind):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _module_pair()
    if kind == "ema":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        avg = ema_params(0.9)
    else:
        averaged = AveragedModel(model)
        avg = polyak_average()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = avg.init(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, dtype=F64, generator=gen) * 0.1)
        averaged.update_parameters(model)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        state = avg.update(params, state)
        for k, p_avg in averaged.module.named_parameters():
            torch.testing.assert_close(state.average[k], p_avg.detach(), rtol=1e-12, atol=1e-14)
        assert int(state.n_averaged) == int(averaged.n_averaged)


def test_polyak_average_with_decay_is_ema_params():
    p = {"w": torch.ones(2, dtype=F64)}
    a, b = polyak_average(0.5), ema_params(0.5)
    sa, sb = a.init(p), b.init(p)
    for i in range(4):
        q = {"w": torch.full((2,), float(i), dtype=F64)}
        sa, sb = a.update(q, sa), b.update(q, sb)
    torch.testing.assert_close(sa.average["w"], sb.average["w"], rtol=0, atol=0)
    # the first update copies (0); then 0.5 * 0 + 0.5 * 1, 0.5 * 0.5 + 0.5 * 2, 0.5 * 1.25 + 0.5 * 3
    torch.testing.assert_close(sa.average["w"], torch.full((2,), 2.125, dtype=F64), rtol=0, atol=0)


# --- purity ------------------------------------------------------------------------------------------------------


def _wrapped():
    return {
        "inject": inject_hyperparams(pureopt.adam)(lr=0.1),
        "inject_schedule": inject_hyperparams(pureopt.sgd, static_args="momentum")(
            lr=schedules.exponential_decay(0.1, 2, 0.5), momentum=0.9
        ),
        "multisteps": MultiSteps(pureopt.adam(0.1, weight_decay=0.1), 2).gradient_transformation(),
        "apply_if_finite": apply_if_finite(pureopt.adam(0.1), 1),
        "lookahead": lookahead(pureopt.sgd(0.1, momentum=0.9), 2, 0.5),
        "ema": ema(0.9),
        "partition_of_wrappers": partition(
            {
                "a": MultiSteps(pureopt.adam(0.1), 2).gradient_transformation(),
                "b": apply_if_finite(pureopt.sgd(0.1), 0),
            },
            lambda p: {k: "a" if k.startswith("w") else "b" for k in p},
        ),
    }


@pytest.mark.parametrize("name", list(_wrapped()))
def test_wrappers_are_pure(name):
    tx = _wrapped()[name]
    params = make_params(torch.float32)
    state = tx.init(params)
    for step in range(4):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        if step == 2:
            grads["w1"][0, 0] = float("nan")
        snaps = snapshot(params), snapshot(grads), snapshot(state)
        updates, new_state = tx.update(grads, state, params)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(grads, snaps[1], "grads")
        assert_unchanged(state, snaps[2], "state")
        params, state = pureopt.apply_updates(params, updates), new_state


def test_param_averagers_are_pure():
    for avg in (ema_params(0.9), polyak_average()):
        params = make_params(torch.float32)
        state = avg.init(params)
        snaps = snapshot(params), snapshot(state)
        avg.update(params, state)
        new = avg.update(tree.tree_map(lambda x: x + 1, params), state)
        assert_unchanged(params, snaps[0], "params")
        assert_unchanged(state, snaps[1], "state")
        assert new.average["w1"] is not params["w1"]


# --- vmap and torch.compile ------------------------------------------------------------------------------------------


def _batch(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(batch, 3, 2, dtype=F64, generator=gen),
        "b": torch.randn(batch, 3, dtype=F64, generator=gen),
    }


def _pick(t, i):
    return tree.tree_map(lambda x: x[i], t)


VMAP_CASES = ["inject", "multisteps", "apply_if_finite", "lookahead", "ema", "partition_of_wrappers"]


@pytest.mark.parametrize("name", VMAP_CASES)
def test_vmap_over_models_matches_each_model_alone(name):
    tx = _wrapped()[name]
    batch = 3
    params = _batch(batch, 0)
    state = torch.func.vmap(tx.init)(params)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return pureopt.apply_updates(p, u), s

    for i_step in range(4):
        grads = _batch(batch, 10 + i_step)
        if i_step == 1:
            grads["w"][1, 0, 0] = float("nan")  # only model 1 has a bad step
        new_params, new_state = torch.func.vmap(step)(grads, state, params)
        for i in range(batch):
            want_p, want_s = step(_pick(grads, i), _pick(state, i), _pick(params, i))
            close_trees(_pick(new_params, i), want_p)
            close_trees(_pick(new_state, i), want_s)
        params, state = new_params, new_state


def test_vmap_inject_with_one_learning_rate_per_model_matches_torch():
    batch = 3
    lrs = torch.tensor([0.1, 0.01, 0.001], dtype=F64)
    tx = inject_hyperparams(pureopt.adam, hyperparam_dtype=F64)(lr=0.1)
    params = _batch(batch, 0)
    state = torch.func.vmap(tx.init)(params)
    state = state._replace(hyperparams={"lr": lrs.clone()})
    tps = [{k: v[i].clone().requires_grad_(True) for k, v in params.items()} for i in range(batch)]
    opts = [torch.optim.Adam(tp.values(), lr=float(lrs[i])) for i, tp in enumerate(tps)]

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return pureopt.apply_updates(p, u), s

    for i_step in range(10):
        grads = _batch(batch, 10 + i_step)
        params, state = torch.func.vmap(step)(grads, state, params)
        for i in range(batch):
            for k, t in tps[i].items():
                t.grad = grads[k][i].clone()
            opts[i].step()
            for k, t in tps[i].items():
                torch.testing.assert_close(params[k][i], t.detach(), rtol=1e-10, atol=1e-12)


COMPILE_CASES = ["inject", "inject_schedule", "multisteps", "apply_if_finite", "lookahead", "ema"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiles_without_graph_breaks_and_no_recompile_when_lr_changes(name):
    tx = _wrapped()[name]
    params = make_params(F64)
    state = tx.init(params)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return pureopt.apply_updates(p, u), s

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    eager_p, eager_s = params, state
    with torch._dynamo.config.patch(error_on_recompile=name.startswith("inject")):
        for i in range(3):
            grads = {k: torch.randn_like(v) for k, v in params.items()}
            if i == 1:
                grads["w1"][0, 0] = float("nan")
            if name == "inject" and i == 2:
                state = state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(0.01)})
                eager_s = eager_s._replace(hyperparams={**eager_s.hyperparams, "lr": torch.tensor(0.01)})
            params, state = compiled(grads, state, params)
            eager_p, eager_s = step(grads, eager_s, eager_p)
            close_trees(params, eager_p, rtol=1e-12, atol=1e-14)
            close_trees(state, eager_s, rtol=1e-12, atol=1e-14)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_param_averager_under_vmap_and_compile():
    avg = ema_params(0.9)
    params = _batch(2, 0)
    state = torch.func.vmap(avg.init)(params)
    new = torch.func.vmap(avg.update)(_batch(2, 1), state)
    close_trees(_pick(new, 1), avg.update(_pick(_batch(2, 1), 1), _pick(state, 1)))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(avg.update, fullgraph=True, backend="eager")
    single = avg.init(_pick(params, 0))
    close_trees(compiled(_pick(params, 1), single), avg.update(_pick(params, 1), single))
    assert not counters["graph_break"]
