"""The pure core: tree helpers, structure errors, apply_updates, identity/stateless/set_to_zero, chain."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch

import pureopt
from pureopt import tree


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


CONTAINERS = {
    "dict": lambda: {"w": torch.ones(2, 3), "b": torch.zeros(3)},
    "named_parameters": lambda: dict(torch.nn.Linear(3, 2).named_parameters()),
    "ordered_dict": lambda: OrderedDict(w=torch.ones(2), b=torch.ones(1)),
    "tuple": lambda: (torch.ones(2), torch.ones(3, 1)),
    "list": lambda: [torch.ones(2), [torch.ones(1), torch.ones(())]],
    "namedtuple": lambda: Pair(torch.ones(2), torch.ones(4)),
    "nested": lambda: {"enc": [torch.ones(2), Pair(torch.ones(1), torch.ones(2))], "head": (torch.ones(3),)},
}


@pytest.mark.parametrize("make", CONTAINERS.values(), ids=CONTAINERS.keys())
def test_sgd_step_on_every_container_matches_closed_form(make):
    params = make()
    grads = tree.tree_map(lambda p: torch.full_like(p, 2.0), params)
    tx = pureopt.sgd(lr=0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = pureopt.apply_updates(params, updates)
    assert type(new) is type(params)
    for p, n in zip(tree.leaves(params), tree.leaves(new)):
        torch.testing.assert_close(n, p - 1.0)


def test_grads_missing_a_key_names_the_path():
    params = {"layer": {"weight": torch.ones(2), "bias": torch.ones(1)}}
    tx = pureopt.adam()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\].*missing"):
        tx.update({"layer": {"weight": torch.ones(2)}}, state, params)


def test_grads_not_matching_state_names_the_path_without_params():
    params = {"a": torch.ones(2), "b": [torch.ones(1), torch.ones(1)]}
    tx = pureopt.adam()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"optimizer state.*\['b'\]"):
        tx.update({"a": torch.ones(2), "b": [torch.ones(1)]}, state)


def test_grads_with_an_extra_key_is_an_error():
    params = {"a": torch.ones(2)}
    tx = pureopt.sgd(momentum=0.9)
    with pytest.raises(ValueError, match=r"\['c'\].*unexpected"):
        tx.update({"a": torch.ones(2), "c": torch.ones(1)}, tx.init(params), params)


def test_structure_error_leaves_inputs_untouched():
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    tx = pureopt.adam()
    state = tx.init(params)
    before = [t.clone() for t in tree.leaves(state)]
    with pytest.raises(ValueError):
        tx.update({"a": torch.ones(2)}, state, params)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(state), before))


def test_first_difference_reports_leaf_vs_container():
    diff = tree.first_difference({"a": [1, 2]}, {"a": 3})
    assert diff is not None
    path, message = diff
    assert path == ("a",) and "expected a list" in message


def test_apply_updates_casts_back_and_passes_none_through():
    params = {"w": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2), "frozen": torch.ones(1)}
    updates = {"w": torch.full((3,), 0.5, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float64), "frozen": None}
    new = pureopt.apply_updates(params, updates)
    assert new["w"].dtype == torch.bfloat16 and new["b"].dtype == torch.float32
    torch.testing.assert_close(new["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))
    torch.testing.assert_close(new["b"], torch.full((2,), 2.0))
    assert new["frozen"] is params["frozen"]
    torch.testing.assert_close(params["w"], torch.ones(3, dtype=torch.bfloat16))  # not mutated


def test_apply_updates_structure_mismatch():
    with pytest.raises(ValueError, match=r"updates do not match the parameters"):
        pureopt.apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_identity_stateless_set_to_zero():
    params = {"a": torch.randn(3), "b": torch.randn(2)}
    grads = {"a": torch.randn(3), "b": None}
    u, s = pureopt.identity().update(grads, pureopt.identity().init(params))
    assert u["a"] is grads["a"] and u["b"] is None and s == pureopt.EmptyState()
    double = pureopt.stateless(lambda g, p: tree.tree_map(lambda x, y: None if x is None else 2 * x + y, g, p))
    u, _ = double.update(grads, double.init(params), params)
    torch.testing.assert_close(u["a"], 2 * grads["a"] + params["a"])
    u, _ = pureopt.set_to_zero().update(grads, pureopt.EmptyState())
    assert torch.count_nonzero(u["a"]) == 0 and u["b"] is None


def test_chain_equals_composition_written_out():
    """chain(clip, trace, scale) == torch's clip_grad_norm_ then SGD momentum, step by step."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64)}
    tp = params["w"].clone().requires_grad_(True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.trace(0.9), pureopt.scale(-0.1))
    state = tx.init(params)
    assert isinstance(state, tuple) and len(state) == 3
    for _ in range(10):
        g = 3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
        tp.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([tp], 1.0)
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = pureopt.apply_updates(params, updates)
        torch.testing.assert_close(params["w"], tp.detach(), rtol=1e-12, atol=1e-14)


def test_chain_wraps_user_transformations_written_over_trees():
    def init(params):
        return pureopt.EmptyState()

    def update(updates, state, params=None):
        return tree.tree_map(lambda u: None if u is None else u + 1.0, updates), state

    user = pureopt.GradientTransformation(init, update)
    tx = pureopt.chain(user, pureopt.scale(2.0))
    params = {"a": torch.zeros(2), "b": torch.zeros(1)}
    u, _ = tx.update({"a": torch.ones(2), "b": None}, tx.init(params), params)
    torch.testing.assert_close(u["a"], torch.full((2,), 4.0))
    assert u["b"] is None


def test_chain_rejects_non_transformations_and_wrong_state():
    with pytest.raises(TypeError, match="argument 1 is a int"):
        pureopt.chain(pureopt.identity(), 3)
    tx = pureopt.chain(pureopt.identity(), pureopt.identity())
    with pytest.raises(ValueError, match="chain of 2 transformations got a tuple of 1 states"):
        tx.update({"a": torch.ones(1)}, (pureopt.EmptyState(),))


def test_extra_args_reach_user_transformations_in_a_chain():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    tx = pureopt.chain(pureopt.GradientTransformation(lambda p: (), update), pureopt.identity())
    tx.update({"a": torch.ones(1)}, tx.init({"a": torch.ones(1)}), value_fn="marker")
    assert seen == {"value_fn": "marker"}


def test_counters_are_tensors():
    tx = pureopt.adam()
    state = tx.init({"a": torch.ones(2)})
    assert isinstance(state.num_updates, torch.Tensor) and state.num_updates.dim() == 0
    assert isinstance(state.step["a"], torch.Tensor) and state.step["a"].dim() == 0
