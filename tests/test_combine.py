"""Composition: chain, named_chain, partition, masked, freeze.

References: torch.optim.AdamW with param_groups (and a torch lr_scheduler) for partition; the update rules written
out with plain torch ops; and, for the algebraic properties (associativity, all-True masks, one-label
partitions), the transformations applied one after the other by hand.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import NamedTuple

import optree
import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import NONE_GRADS, grads_at, make_data, make_params, tolerances
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import pureopt
from pureopt import schedules, tree
from pureopt.base import UpdateContext, leaf_transformation
from pureopt.combine import (
    MaskedNode,
    MaskedState,
    PartitionState,
    chain,
    freeze,
    masked,
    named_chain,
    partition,
    set_to_none,
)
from pureopt.transforms.block_rms import clip_by_block_rms
from pureopt.transforms.centralize import centralize

# --- helpers ---------------------------------------------------------------------------------------------------


def assert_trees_equal(a, b, **tol):
    la, sa = tree.flatten(a)
    lb, sb = tree.flatten(b)
    assert sa == sb, f"{sa} != {sb}"
    for x, y in zip(la, lb):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, **(tol or {"rtol": 0, "atol": 0}), equal_nan=True)


def tensor_leaves(t):
    return [x for x in tree.leaves(t) if isinstance(x, torch.Tensor)]


def no_decay(name):
    return name.startswith("b") or name == "gain"


# --- partition == torch.optim.AdamW with param_groups ------------------------------------------------------------

GROUPS = {  # label -> (lr, weight_decay, betas)
    "decay": (0.01, 0.1, (0.9, 0.999)),
    "no_decay": (0.02, 0.0, (0.8, 0.99)),
}


def _labels(params):
    return {k: "no_decay" if no_decay(k) else "decay" for k in params}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant_lr", "cosine_annealing"])
def test_partition_matches_torch_adamw_param_groups(dtype, scheduled):
    tol = tolerances(dtype)
    data = make_data(dtype)
    init = make_params(dtype)
    names = list(init)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    groups = [
        {
            "params": [torch_params[k] for k in names if _labels(init)[k] == label],
            "lr": lr,
            "weight_decay": wd,
            "betas": betas,
        }
        for label, (lr, wd, betas) in GROUPS.items()
    ]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4) if scheduled else None

    def lr_for(lr):
        return schedules.cosine_annealing(lr, T_max=10, eta_min=1e-4) if scheduled else lr

    tx = partition(
        {
            label: pureopt.adamw(lr=lr_for(lr), weight_decay=wd, betas=betas)
            for label, (lr, wd, betas) in GROUPS.items()
        },
        _labels,
    )
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    for step in range(25):
        tg = grads_at({k: t.detach() for k, t in torch_params.items()}, step, data)
        for k, t in torch_params.items():
            t.grad = None if tg[k] is None else tg[k].clone()
        opt.step()
        if sched is not None:
            sched.step()
        g = grads_at(params, step, data)
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        for k in names:
            torch.testing.assert_close(
                params[k], torch_params[k].detach(), **tol, msg=lambda m, k=k, s=step: f"{k}@{s}: {m}"
            )
            label = _labels(init)[k]
            inner = state.inner_states[label]
            tstate = opt.state.get(torch_params[k], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in tstate:
                    torch.testing.assert_close(getattr(inner, key)[k], tstate[key], **tol)
            other = "decay" if label == "no_decay" else "no_decay"
            assert isinstance(state.inner_states[other].exp_avg[k], MaskedNode)


def test_partition_allocates_state_only_for_its_leaves_and_keeps_paths():
    params = {"backbone": {"w": torch.ones(3, 2), "b": torch.ones(3)}, "head": {"w": torch.ones(2, 3)}}
    tx = partition(
        {"slow": pureopt.adam(1e-4), "fast": pureopt.sgd(0.1, momentum=0.9)}, {"backbone": "slow", "head": "fast"}
    )
    state = tx.init(params)
    assert isinstance(state, PartitionState)
    slow, fast = state.inner_states["slow"], state.inner_states["fast"]
    assert slow.exp_avg["backbone"]["w"].shape == (3, 2)
    assert isinstance(slow.exp_avg["head"], MaskedNode)  # a whole masked-out sub-tree is one MaskedNode
    assert isinstance(fast.momentum_buffer["backbone"], MaskedNode)
    assert fast.momentum_buffer["head"]["w"].shape == (2, 3)
    # memory: exactly one buffer per owned parameter and state kind
    assert sum(t.numel() for t in tensor_leaves(slow.exp_avg)) == 9
    assert sum(t.numel() for t in tensor_leaves(fast.momentum_buffer)) == 6


def test_partition_with_a_frozen_label_written_out():
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    tx = partition(
        {"train": pureopt.sgd(0.1, momentum=0.9), "frozen": pureopt.set_to_zero()}, {"w": "train", "b": "frozen"}
    )
    state = tx.init(params)
    assert state.inner_states["frozen"] == pureopt.EmptyState()
    buf = torch.zeros_like(params["w"])
    w = params["w"].clone()
    for _ in range(5):
        g = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        buf = 0.9 * buf + g["w"]
        w = w - 0.1 * buf
        torch.testing.assert_close(params["w"], w, rtol=1e-14, atol=1e-15)
        assert torch.equal(updates["b"], torch.zeros(3, dtype=torch.float64))


def test_partition_label_function_gets_params_and_prefix_labels_work():
    params = {"enc": [torch.ones(2, 2), torch.ones(2)], "dec": (torch.ones(3),)}
    seen = []

    def labels(p):
        seen.append(tree.tree_map(lambda x: tuple(x.shape), p))
        return {"enc": ["m", "v"], "dec": "v"}  # a prefix: one label for the whole tuple

    tx = partition({"m": pureopt.scale(2.0), "v": pureopt.scale(-1.0)}, labels)
    state = tx.init(params)
    u, _ = tx.update(params, state, params)
    assert seen[0] == {"enc": [(2, 2), (2,)], "dec": ((3,),)}
    assert torch.equal(u["enc"][0], torch.full((2, 2), 2.0))
    assert torch.equal(u["enc"][1], torch.full((2,), -1.0))
    assert torch.equal(u["dec"][0], torch.full((3,), -1.0))


def test_partition_without_params_uses_the_updates_for_the_labels():
    g = {"a": torch.ones(2), "b": torch.ones(3)}
    tx = partition(
        {"x": pureopt.scale(3.0), "y": pureopt.identity()}, lambda t: {k: "x" if t[k].numel() == 2 else "y" for k in t}
    )
    u, _ = tx.update(g, tx.init(g))
    assert torch.equal(u["a"], torch.full((2,), 3.0)) and u["b"] is g["b"]


def test_partition_errors_name_the_label():
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(ValueError, match=r"no transformation for label 'bias' \(parameter \['b'\]\)"):
        partition({"weight": pureopt.sgd()}, {"w": "weight", "b": "bias"}).init(params)
    with pytest.raises(ValueError, match=r"no parameter is labelled 'extra'"):
        partition({"weight": pureopt.sgd(), "extra": pureopt.adam()}, {"w": "weight", "b": "weight"}).init(params)
    with pytest.raises(ValueError, match=r"labels do not match the parameters: at \['b'\] labels is missing"):
        partition({"weight": pureopt.sgd()}, {"w": "weight"}).init(params)
    with pytest.raises(TypeError, match="not a GradientTransformation"):
        partition({"weight": 3}, {"w": "weight", "b": "weight"})
    with pytest.raises(TypeError, match="non-empty dict"):
        partition({}, {"w": "weight"})
    # at update too, before anything is computed
    tx = partition({"weight": pureopt.sgd(0.1)}, lambda p: {k: k for k in p})
    with pytest.raises(ValueError, match="no transformation for label 'b'"):
        tx.update(params, PartitionState({"weight": pureopt.sgd().init(params)}), params)


def test_partition_rejects_a_state_for_other_labels():
    params = {"w": torch.ones(2)}
    tx = partition({"a": pureopt.sgd(0.1)}, {"w": "a"})
    with pytest.raises(ValueError, match="no state for 'a'"):
        tx.update(params, PartitionState({"b": ()}), params)
    with pytest.raises(ValueError, match="expects a PartitionState"):
        tx.update(params, (), params)


# --- masked and freeze -------------------------------------------------------------------------------------------


def test_masked_applies_inner_only_where_true_and_passes_the_rest_through():
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}
    tx = masked(pureopt.add_decayed_weights(0.1), mask)
    state = tx.init(params)
    assert isinstance(state, MaskedState)
    g = {k: torch.randn_like(v) for k, v in params.items()}
    u, _ = tx.update(g, state, params)
    torch.testing.assert_close(u["w"], g["w"] + 0.1 * params["w"], rtol=0, atol=0)
    assert u["b"] is g["b"]  # unchanged: the very same tensor


def test_masked_allocates_no_state_for_masked_out_leaves():
    params = {"w": torch.ones(3, 2), "b": torch.ones(3), "n": {"g": torch.ones(2)}}
    state = masked(pureopt.adam(0.1), {"w": True, "b": False, "n": False}).init(params)
    inner = state.inner_state
    assert isinstance(inner.exp_avg["b"], MaskedNode) and isinstance(inner.exp_avg["n"], MaskedNode)
    assert [t.shape for t in tensor_leaves(inner.exp_avg)] == [(3, 2)]


def test_masked_mask_errors():
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    with pytest.raises(TypeError, match=r"mask leaves must be Python bools, got a Tensor at \['b'\]"):
        masked(pureopt.sgd(), {"w": True, "b": torch.tensor(True)}).init(params)
    with pytest.raises(ValueError, match=r"mask do not match the parameters: at \['c'\] mask is unexpected"):
        masked(pureopt.sgd(), {"w": True, "b": True, "c": True}).init(params)


def test_freeze_zeroes_frozen_updates_after_an_optimizer():
    params = make_params(torch.float64)
    frozen = {k: k.startswith("w") for k in params}
    tx = chain(pureopt.adamw(0.1, weight_decay=0.5), freeze(frozen))
    state = tx.init(params)
    start = {k: v.clone() for k, v in params.items()}
    ref = pureopt.adamw(0.1, weight_decay=0.5)  # the unfrozen parameters follow plain AdamW
    ref_params, ref_state = {k: v.clone() for k, v in params.items()}, ref.init(params)
    for step in range(5):
        g = {k: torch.randn_like(v) for k, v in params.items()}
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        ru, ref_state = ref.update(g, ref_state, ref_params)
        ref_params = pureopt.apply_updates(ref_params, ru)
        for k in params:
            if frozen[k]:
                assert torch.equal(updates[k], torch.zeros_like(params[k]))
                assert torch.equal(params[k], start[k])
            else:
                assert torch.equal(params[k], ref_params[k]), (k, step)


def test_freeze_with_none_skips_the_frozen_params_like_torch():
    """freeze(use_none=True) first in a chain == torch.optim.AdamW where the frozen params have no grad."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    tp = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(tp.values(), lr=0.05, weight_decay=0.3)
    tx = chain(freeze({"w": False, "b": True}, use_none=True), pureopt.adamw(0.05, weight_decay=0.3))
    state = tx.init(params)
    for _ in range(10):
        g = {k: torch.randn_like(v) for k, v in params.items()}
        tp["w"].grad = g["w"].clone()  # b has no grad: torch skips it (no decay, no state)
        opt.step()
        updates, state = tx.update(g, state, params)
        assert updates["b"] is None
        new = pureopt.apply_updates(params, updates)
        assert new["b"] is params["b"]
        params = new
        torch.testing.assert_close(params["w"], tp["w"].detach(), rtol=1e-10, atol=1e-12)
    assert float(state[1].step["b"]) == 0.0 and float(state[1].step["w"]) == 10.0


def test_set_to_none_replaces_every_update():
    g = {"a": torch.ones(2)}
    u, _ = set_to_none().update(g, set_to_none().init(g))
    assert u == {"a": None}


# --- chain and named_chain -------------------------------------------------------------------------------------


def test_named_chain_state_is_a_dict_and_matches_torch_sgd():
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, dtype=torch.float64, generator=gen)}
    tp = params["w"].clone().requires_grad_(True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    tx = named_chain(("clip", pureopt.clip_by_global_norm(1.0)), ("sgd", pureopt.sgd(0.1, momentum=0.9)))
    state = tx.init(params)
    assert list(state) == ["clip", "sgd"]
    for _ in range(10):
        g = torch.randn(5, dtype=torch.float64, generator=gen) * 3
        tp.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([tp], 1.0)
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = pureopt.apply_updates(params, updates)
        torch.testing.assert_close(params["w"], tp.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["sgd"].momentum_buffer["w"], opt.state[tp]["momentum_buffer"])


def test_named_chain_errors():
    with pytest.raises(ValueError, match="the name 'a' is used twice"):
        named_chain(("a", pureopt.identity()), ("a", pureopt.identity()))
    with pytest.raises(TypeError, match=r"\(name, transformation\) pair"):
        named_chain(pureopt.identity())
    tx = named_chain(("a", pureopt.identity()))
    with pytest.raises(ValueError, match="no state for 'a'"):
        tx.update({"w": torch.ones(1)}, {"b": ()})


def test_only_the_last_transformation_of_a_chain_may_apply_in_place():
    if "apply" not in {f.name for f in dataclasses.fields(UpdateContext)}:
        pytest.skip("UpdateContext has no apply flag")
    seen = []

    def recorder():
        def update_leaves(updates, state, params, ctx):
            seen.append(ctx.apply)
            return updates, state

        return leaf_transformation(lambda leaves, spec: (), update_leaves)

    params = [torch.ones(2)]
    leaves, spec = tree.flatten(params)
    ctx = UpdateContext(spec, apply=True)
    tx = chain(recorder(), named_chain(("x", recorder()), ("y", recorder())), partition({"a": recorder()}, ["a"]))
    state = tx.init(params)
    tx.update.update_leaves(leaves, state, leaves, ctx)
    # (a partition's or a mask's inner owns its parameters alone: last in the chain, it may apply)
    assert seen == [False, False, False, True]
    seen.clear()
    chain(recorder(), recorder()).update.update_leaves(leaves, ((), ()), leaves, ctx)
    assert seen == [False, True]
    seen.clear()
    tx = chain(partition({"a": recorder()}, ["a"]), masked(recorder(), [True]))
    tx.update.update_leaves(leaves, tx.init(params), leaves, ctx)
    assert seen == [False, True]


# --- property tests over random pytrees ----------------------------------------------------------------------------


class Pair(NamedTuple):
    left: object
    right: object


leaf_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)  # 0-d and empty tensors included
trees = st.recursive(
    leaf_shapes,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcdef"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.tuples(children, children),
        st.builds(Pair, children, children),
        st.dictionaries(st.sampled_from("xyz"), children, min_size=1, max_size=2).map(OrderedDict),
    ),
    max_leaves=6,
)


def _is_shape(x):
    return type(x) is tuple and all(isinstance(i, int) for i in x)


def make_tree(shape_tree, seed):
    """Random float64 tensors in the places of the shapes of ``shape_tree``."""
    gen = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda s: torch.randn(s, dtype=torch.float64, generator=gen), shape_tree, is_leaf=_is_shape)


POOL = {
    "scale": lambda: pureopt.scale(0.5),
    "clip_global": lambda: pureopt.clip_by_global_norm(1.0),
    "trace": lambda: pureopt.trace(0.9),
    "adam": lambda: pureopt.scale_by_adam(),
    "decay": lambda: pureopt.add_decayed_weights(0.1),
    "centralize": centralize,
    "block_rms": lambda: clip_by_block_rms(0.5),
    "sgd": lambda: pureopt.sgd(0.1, momentum=0.5, nesterov=True),
}
pool_names = st.sampled_from(sorted(POOL))
SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_steps(tx, params, grads_list):
    state = tx.init(params)
    outs = []
    for g in grads_list:
        u, state = tx.update(g, state, params)
        outs.append(u)
        params = pureopt.apply_updates(params, u)
    return outs, state


def by_hand(txs, params, grads_list):
    """The transformations applied one after the other, each with its own state (the definition of chain)."""
    states = [tx.init(params) for tx in txs]
    outs = []
    for g in grads_list:
        u = g
        for i, tx in enumerate(txs):
            u, states[i] = tx.update(u, states[i], params)
        outs.append(u)
        params = pureopt.apply_updates(params, u)
    return outs


@settings(**SETTINGS)
@given(shape_tree=trees, names=st.tuples(pool_names, pool_names, pool_names), seed=st.integers(0, 2**16))
def test_chain_is_associative(shape_tree, names, seed):
    params = make_tree(shape_tree, seed)
    grads = [make_tree(shape_tree, seed + 1 + i) for i in range(3)]
    a, b, c = (POOL[n] for n in names)
    left, _ = run_steps(chain(a(), chain(b(), c())), params, grads)
    right, _ = run_steps(chain(chain(a(), b()), c()), params, grads)
    flat, _ = run_steps(chain(a(), b(), c()), params, grads)
    reference = by_hand([a(), b(), c()], params, grads)
    for x, y, z, r in zip(left, right, flat, reference):
        assert_trees_equal(x, r)
        assert_trees_equal(y, r)
        assert_trees_equal(z, r)


@settings(**SETTINGS)
@given(shape_tree=trees, name=pool_names, seed=st.integers(0, 2**16))
def test_masked_all_true_is_the_transformation(shape_tree, name, seed):
    params = make_tree(shape_tree, seed)
    grads = [make_tree(shape_tree, seed + 1 + i) for i in range(3)]
    all_true = tree.tree_map(lambda _: True, params)
    got, state = run_steps(masked(POOL[name](), all_true), params, grads)
    want, want_state = run_steps(POOL[name](), params, grads)
    for x, y in zip(got, want):
        assert_trees_equal(x, y)
    assert_trees_equal(state.inner_state, want_state)


@settings(**SETTINGS)
@given(shape_tree=trees, name=pool_names, seed=st.integers(0, 2**16))
def test_partition_with_one_label_is_the_transformation(shape_tree, name, seed):
    params = make_tree(shape_tree, seed)
    grads = [make_tree(shape_tree, seed + 1 + i) for i in range(3)]
    got, state = run_steps(partition({"only": POOL[name]()}, "only"), params, grads)
    want, want_state = run_steps(POOL[name](), params, grads)
    for x, y in zip(got, want):
        assert_trees_equal(x, y)
    assert_trees_equal(state.inner_states["only"], want_state)


PER_LEAF = sorted(set(POOL) - {"clip_global"})  # rules that treat every leaf on its own


@settings(**SETTINGS)
@given(
    shape_tree=trees,
    names=st.tuples(st.sampled_from(PER_LEAF), st.sampled_from(PER_LEAF)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_partition_gives_each_leaf_its_labels_update(shape_tree, names, seed, data):
    """Written out: at every step, a leaf's update is its label's transformation's (run on all the leaves)."""
    params = make_tree(shape_tree, seed)
    leaves, spec = tree.flatten(params)
    assume(len(leaves) > 1)
    flags = data.draw(st.lists(st.booleans(), min_size=len(leaves), max_size=len(leaves)))
    assume(any(flags) and not all(flags))
    labels = spec.unflatten(["p" if f else "q" for f in flags])
    p_tx, q_tx = (POOL[n]() for n in names)
    tx = partition({"p": POOL[names[0]](), "q": POOL[names[1]]()}, labels)
    state, p_state, q_state = tx.init(params), p_tx.init(params), q_tx.init(params)
    for i in range(3):
        g = make_tree(shape_tree, seed + 1 + i)
        u, state = tx.update(g, state, params)
        up, p_state = p_tx.update(g, p_state, params)
        uq, q_state = q_tx.update(g, q_state, params)
        want = [a if f else b for f, a, b in zip(flags, tree.leaves(up), tree.leaves(uq))]
        for got, w in zip(tree.leaves(u), want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
        params = pureopt.apply_updates(params, u)


@settings(**SETTINGS)
@given(shape_tree=trees, seed=st.integers(0, 2**16), data=st.data())
def test_combinators_are_pure(shape_tree, seed, data):
    params = make_tree(shape_tree, seed)
    n = len(tree.leaves(params))
    _, spec = tree.flatten(params)
    flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = spec.unflatten(flags)
    labels = spec.unflatten(["a" if f else "b" for f in flags])
    transforms = {"a": pureopt.adam(0.1, weight_decay=0.1), "b": pureopt.sgd(0.1, momentum=0.9)}
    used = {k: v for k, v in transforms.items() if k in {"a" if f else "b" for f in flags}}
    candidates = [
        chain(pureopt.clip_by_global_norm(1.0), pureopt.adam(0.1)),
        named_chain(("clip", pureopt.clip_by_global_norm(1.0)), ("sgd", pureopt.sgd(0.1, momentum=0.9))),
        partition(used, labels),
        masked(pureopt.adam(0.1), mask),
        freeze(mask),
    ]
    for tx in candidates:
        state = tx.init(params)
        p = params
        for i in range(2):
            g = make_tree(shape_tree, seed + 10 + i)
            snaps = snapshot(p), snapshot(g), snapshot(state)
            u, new_state = tx.update(g, state, p)
            assert_unchanged(p, snaps[0], "params")
            assert_unchanged(g, snaps[1], "grads")
            assert_unchanged(state, snaps[2], "state")
            p, state = pureopt.apply_updates(p, u), new_state


# --- vmap and torch.compile ------------------------------------------------------------------------------------------

NESTED = {"enc": {"w": (3, 2), "b": (3,)}, "head": {"w": (2, 3)}, "scale": ()}


def _nested(batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def mk(s):
        shape = s if batch is None else (batch, *s)
        return torch.randn(shape, dtype=torch.float64, generator=gen)

    return {
        "enc": {"w": mk((3, 2)), "b": mk((3,))},
        "head": {"w": mk((2, 3))},
        "scale": mk(()),
    }


def _combinators():
    labels = {"enc": "backbone", "head": "head", "scale": "head"}
    return {
        "partition": partition(
            {"backbone": pureopt.adamw(1e-2, weight_decay=0.1), "head": pureopt.sgd(0.1, momentum=0.9)}, labels
        ),
        "masked": masked(pureopt.adam(0.1), lambda p: tree.tree_map(lambda x: x.ndim > 1, p)),
        "freeze": chain(pureopt.adam(0.1), freeze({"enc": True, "head": False, "scale": False})),
        "named_chain": named_chain(("clip", pureopt.clip_by_global_norm(0.5)), ("adam", pureopt.adam(0.1))),
        "chain_of_partition": chain(
            pureopt.clip_by_global_norm(1.0),
            partition({"backbone": freeze(True), "head": pureopt.adam(0.1)}, labels),
        ),
    }


@pytest.mark.parametrize("name", list(_combinators()))
def test_vmap_over_a_batch_of_models_matches_each_model_alone(name):
    tx = _combinators()[name]
    batch = 3
    params, grads = _nested(batch, 0), _nested(batch, 1)
    state = torch.func.vmap(tx.init)(params)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return pureopt.apply_updates(p, u), s

    for _ in range(3):
        new_params, state_next = torch.func.vmap(step)(grads, state, params)
        for i in range(batch):
            pick = lambda t, i=i: tree.tree_map(lambda x: x[i], t)
            want_p, want_s = step(pick(grads), pick(state), pick(params))
            assert_trees_equal(pick(new_params), want_p, rtol=1e-12, atol=1e-14)
            assert_trees_equal(pick(state_next), want_s, rtol=1e-12, atol=1e-14)
        params, state = new_params, state_next


@pytest.mark.parametrize("name", list(_combinators()))
def test_compiles_without_graph_breaks(name):
    tx = _combinators()[name]
    params, grads = _nested(None, 0), _nested(None, 1)
    state = tx.init(params)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return pureopt.apply_updates(p, u), s

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got_p, got_s = compiled(grads, state, params)
    want_p, want_s = step(grads, state, params)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_trees_equal(got_p, want_p)
    assert_trees_equal(got_s, want_s)


def test_none_grads_reach_each_inner_transformation():
    params = make_params(torch.float64)
    tx = partition(
        {"d": pureopt.adam(0.1), "n": pureopt.sgd(0.1)}, lambda p: {k: "n" if no_decay(k) else "d" for k in p}
    )
    state = tx.init(params)
    g = {k: torch.ones_like(v) for k, v in params.items()}
    for k in NONE_GRADS[4]:
        g[k] = None
    u, new_state = tx.update(g, state, params)
    for k in NONE_GRADS[4]:
        assert u[k] is None
    assert float(new_state.inner_states["d"].step["w1"]) == 1.0
