"""Kernel legality for memory layouts: every impl gives the per-tensor numbers on any strided layout.

torch's fused CPU kernels walk each tensor's memory as one dense vector from its first element: on a parameter
that is a view with gaps, or whose gradient or state is laid out differently (channels_last against contiguous,
a transpose, an expanded zero-stride gradient), they pair the wrong elements and compute wrong updates. pureopt
must run them only where they give the per-tensor numbers (``impl="auto"`` falls back to foreach or the loop;
an explicit ``impl="fused"`` that cannot run raises an error naming the tensor and what is wrong with it).

References, per drawn example (float64, 3 steps):

* torch.optim's for-loop implementation (``foreach=False``) stepping tensors laid out as drawn: torch's
  single-tensor ops honour strides, so it is right on every layout;
* pureopt's per-tensor loop (``impl="loop"``, pure ``update``) on contiguous copies of the same values.

Tolerance: rtol 1e-12 / atol 1e-14 (fused, foreach and loop kernels round fp64 differently by an ulp or so; a
mis-paired element is off by orders of magnitude more). Elements outside a view (the gaps) are NaN, so a kernel
that reads them shows NaNs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pureopt

DTYPE = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)

# --- layouts ----------------------------------------------------------------------------------------------------------

# memory order classes: tensors of one class share their strides (offsets do not change them); "gaps", "expanded"
# and "overlapping" are not dense, so torch's fused kernels can never take them
DENSE_CLASS = {"contiguous": "c", "offset": "c", "transposed": "t", "channels_last": "cl"}
PARAM_LAYOUTS = ["contiguous", "offset", "gaps", "rows", "transposed", "channels_last"]  # writable in place
GRAD_LAYOUTS = [*PARAM_LAYOUTS, "expanded", "overlapping"]  # gradients are only read
STATE_LAYOUTS = ["contiguous", "offset", "gaps", "transposed", "channels_last"]


def lay_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor of ``values``' shape in the named memory layout, holding ``values`` (for "expanded" and
    "overlapping", whose elements share memory, values derived from them: compare against the result)."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "offset":  # contiguous, starting 5 elements into its storage
        buf = torch.full((values.numel() + 5,), float("nan"), dtype=values.dtype, device=values.device)
        buf[5:] = values.reshape(-1)
        return buf[5:].view(shape)
    if layout == "gaps":  # every other element along the last dimension: e.g. strides (10, 2) for shape (3, 5)
        buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=values.dtype, device=values.device)
        buf[..., ::2] = values
        return buf[..., ::2]
    if layout == "rows":  # every other row: contiguous rows, a gap between them
        buf = torch.full((2 * shape[0], *shape[1:]), float("nan"), dtype=values.dtype, device=values.device)
        buf[::2] = values
        return buf[::2]
    if layout == "transposed":  # dense, first and last dimensions swapped in memory
        return values.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":  # zero stride along the last dimension
        return values[..., :1].expand(shape)
    if layout == "overlapping":  # element (i, j, ...) at offset i + j + ...: neighbours share memory
        base = values.reshape(-1)[: sum(shape) - len(shape) + 1].clone()
        return base.as_strided(shape, (1,) * len(shape))
    raise AssertionError(layout)


def is_dense_class(layout: str) -> bool:
    return layout in DENSE_CLASS


# --- algorithms -------------------------------------------------------------------------------------------------------

# (id, pureopt factory, torch.optim class, kwargs, has a torch fused kernel for these kwargs)
ALGOS: list[tuple[str, Callable[..., Any], str, dict[str, Any], bool]] = [
    ("sgd", pureopt.sgd, "SGD", dict(lr=0.1), True),
    ("sgd-momentum", pureopt.sgd, "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1), True),
    ("sgd-nesterov", pureopt.sgd, "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), True),
    ("sgd-dampening", pureopt.sgd, "SGD", dict(lr=0.1, momentum=0.9, dampening=0.3), False),
    ("adam", pureopt.adam, "Adam", dict(lr=0.01, weight_decay=0.1), True),
    ("adam-amsgrad", pureopt.adam, "Adam", dict(lr=0.01, amsgrad=True, maximize=True), True),
    ("adamw", pureopt.adamw, "AdamW", dict(lr=0.01, weight_decay=0.1), True),
    ("adagrad", pureopt.adagrad, "Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1), True),
    ("adadelta", pureopt.adadelta, "Adadelta", dict(lr=1.0, weight_decay=0.1), False),
    ("adamax", pureopt.adamax, "Adamax", dict(lr=0.01), False),
    ("asgd", pureopt.asgd, "ASGD", dict(lr=0.01, t0=1.0), False),
    ("nadam", pureopt.nadam, "NAdam", dict(lr=0.01, weight_decay=0.1), False),
    ("radam", pureopt.radam, "RAdam", dict(lr=0.01), False),
    ("rmsprop", pureopt.rmsprop, "RMSprop", dict(lr=0.01, momentum=0.9, centered=True), False),
    ("rprop", pureopt.rprop, "Rprop", dict(lr=0.01), False),
]
FUSED_ALGOS = [a for a in ALGOS if a[4]]


@st.composite
def layouts(draw: st.DrawFn, param_layouts: list[str] = PARAM_LAYOUTS) -> dict[str, Any]:
    """A shape (2-d, or 4-d for channels_last) and a layout for the parameter, its gradient and its state."""
    four_d = draw(st.booleans())
    dims = draw(st.lists(st.integers(2, 4), min_size=4 if four_d else 2, max_size=4 if four_d else 2))
    allowed = [lay for lay in GRAD_LAYOUTS if four_d or lay != "channels_last"]
    return {
        "shape": tuple(dims),
        "param": draw(st.sampled_from([lay for lay in param_layouts if lay in allowed])),
        "grad": draw(st.sampled_from(allowed)),
        "state": draw(st.sampled_from([lay for lay in STATE_LAYOUTS if lay in allowed])),
        "seed": draw(st.integers(0, 2**16)),
    }


def draw_values(case: dict[str, Any], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The parameter's values and one gradient per step (as laid out: expanded ones are constant along a dim)."""
    g = torch.Generator().manual_seed(case["seed"])
    device = torch.get_default_device()  # the suite's device (tests/_device.py); the generator is a CPU one
    param = torch.randn(case["shape"], generator=g, dtype=DTYPE).to(device)
    grads = [
        lay_out(torch.randn(case["shape"], generator=g, dtype=DTYPE).to(device), case["grad"]) for _ in range(steps)
    ]
    return param, grads


def relay_state(state: Any, shape: tuple[int, ...], layout: str) -> Any:
    """``state`` with every per-parameter tensor of ``shape`` copied into ``layout`` (same values)."""
    return pureopt.tree.tree_map(
        lambda t: lay_out(t, layout) if isinstance(t, torch.Tensor) and tuple(t.shape) == shape else t, state
    )


BIAS_SHAPE = (3,)  # a second, contiguous parameter in the same step (its shape differs from any drawn one)


def torch_reference(torch_class: str, kwargs: dict[str, Any], case: dict[str, Any], steps: int) -> torch.Tensor:
    """torch.optim's for-loop step on a parameter and gradients laid out as drawn."""
    param, grads = draw_values(case, steps)
    w = lay_out(param, case["param"]).requires_grad_()
    b = torch.linspace(-1, 1, 3, dtype=DTYPE).requires_grad_()
    opt = getattr(torch.optim, torch_class)([w, b], foreach=False, **kwargs)
    for grad in grads:
        w.grad = grad.clone() if case["grad"] in ("expanded", "overlapping") else lay_out(grad, case["grad"])
        b.grad = torch.full(BIAS_SHAPE, 0.5, dtype=DTYPE)
        opt.step()
    return w.detach()


def loop_reference(factory: Callable[..., Any], kwargs: dict[str, Any], case: dict[str, Any], steps: int) -> Any:
    """pureopt's per-tensor loop (pure update) on contiguous copies."""
    param, grads = draw_values(case, steps)
    tx = factory(impl="loop", **kwargs)
    params = {"w": param.clone(), "b": torch.linspace(-1, 1, 3, dtype=DTYPE)}
    state = tx.init(params)
    for grad in grads:
        updates, state = tx.update(
            {"w": grad.contiguous(), "b": torch.full(BIAS_SHAPE, 0.5, dtype=DTYPE)}, state, params
        )
        params = pureopt.apply_updates(params, updates)
    return params["w"]


def run_pureopt(
    factory: Callable[..., Any], kwargs: dict[str, Any], impl: str, path: str, case: dict[str, Any], steps: int
) -> torch.Tensor:
    """``steps`` steps of pureopt with ``impl`` through ``path`` ("update", "inplace_step" or "step") on the
    drawn layouts (the state re-laid after init)."""
    param, grads = draw_values(case, steps)
    tx = factory(impl=impl, **kwargs)
    params = {"w": lay_out(param, case["param"]), "b": torch.linspace(-1, 1, 3, dtype=DTYPE)}
    state = relay_state(tx.init(params), case["shape"], case["state"])
    for grad in grads:
        grads_t = {"w": grad, "b": torch.full(BIAS_SHAPE, 0.5, dtype=DTYPE)}
        if path == "update":
            updates, state = tx.update(grads_t, state, params)
            params = pureopt.apply_updates(params, updates)
        elif path == "inplace_step":
            state = pureopt.inplace_step(tx, grads_t, state, params)
        else:
            params, state = pureopt.step(tx, grads_t, state, params)
    return params["w"]


def fused_legal(case: dict[str, Any], has_state: bool) -> bool:
    """The test's own rule: every tensor dense and all in one memory order (the state counts where there is one)."""
    names = [case["param"], case["grad"], *([case["state"]] if has_state else [])]
    return all(is_dense_class(n) for n in names) and len({DENSE_CLASS[n] for n in names}) == 1


def has_state(algo_id: str) -> bool:
    return algo_id != "sgd"  # plain SGD keeps no per-parameter state


# --- property tests ---------------------------------------------------------------------------------------------------

STEPS = 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts(), algo=st.sampled_from(ALGOS), impl=st.sampled_from(["auto", "foreach", "loop"]))
def test_every_impl_matches_per_tensor_on_any_layout(case, algo, impl):
    """``impl="auto"`` (fused where legal), foreach and loop, pure and donated, on drawn layouts."""
    algo_id, factory, torch_class, kwargs, _ = algo
    expected = torch_reference(torch_class, kwargs, case, STEPS)
    torch.testing.assert_close(loop_reference(factory, kwargs, case, STEPS), expected, **TOL)
    for path in ("update", "inplace_step", "step"):
        got = run_pureopt(factory, kwargs, impl, path, case, STEPS)
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, p=path: f"{algo_id} {impl} {p} {case}: {m}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts(), algo=st.sampled_from(FUSED_ALGOS))
def test_explicit_fused_runs_exactly_where_legal(case, algo):
    """``impl="fused"`` runs (and is right) where every tensor is dense in one memory order, and otherwise raises
    an error naming the tensor, before anything is changed."""
    algo_id, factory, torch_class, kwargs, _ = algo
    if fused_legal(case, has_state(algo_id)):
        expected = torch_reference(torch_class, kwargs, case, STEPS)
        for path in ("update", "inplace_step"):
            got = run_pureopt(factory, kwargs, "fused", path, case, STEPS)
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m, p=path: f"{algo_id} {p} {case}: {m}")
        return
    param, grads = draw_values(case, 1)
    tx = factory(impl="fused", **kwargs)
    params = {"w": lay_out(param, case["param"]), "b": torch.linspace(-1, 1, 3, dtype=DTYPE)}
    state = relay_state(tx.init(params), case["shape"], case["state"])
    before = [t.clone() for t in pureopt.tree.leaves((params, state))]
    grads_t = {"w": grads[0], "b": torch.full(BIAS_SHAPE, 0.5, dtype=DTYPE)}
    for step in (lambda: tx.update(grads_t, state, params), lambda: pureopt.inplace_step(tx, grads_t, state, params)):
        with pytest.raises(
            RuntimeError,
            match=r"impl='fused' is not available for these tensors: the (gradient|parameter|state) of tensor ",
        ):
            step()
        after = pureopt.tree.leaves((params, state))
        assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(after, before)), "mutated"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layouts(), algo=st.sampled_from(ALGOS), impl=st.sampled_from(["auto", "foreach", "loop"]))
def test_torch_optimizer_on_any_layout(case, algo, impl):
    """The adapter (its state is made by ``init``: the parameter's layout where dense, else contiguous)."""
    algo_id, factory, torch_class, kwargs, _ = algo
    expected = torch_reference(torch_class, kwargs, case, STEPS)
    param, grads = draw_values(case, STEPS)
    w = torch.nn.Parameter(lay_out(param, case["param"]))
    b = torch.nn.Parameter(torch.linspace(-1, 1, 3, dtype=DTYPE))
    opt = pureopt.TorchOptimizer([w, b], factory, impl=impl, **kwargs)
    for grad in grads:
        w.grad, b.grad = grad, torch.full(BIAS_SHAPE, 0.5, dtype=DTYPE)
        opt.step()
    torch.testing.assert_close(w.detach(), expected, **TOL, msg=lambda m: f"{algo_id} {impl} {case}: {m}")


# --- the reported cases, spelled out ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", FUSED_ALGOS, ids=[a[0] for a in FUSED_ALGOS])
def test_strided_parameter_view_takes_a_legal_path(algo):
    """A parameter that is a view with strides (10, 2), contiguous gradient and state: torch's fused CPU kernel
    pairs the wrong elements here; ``impl="auto"`` must not take it."""
    _, factory, torch_class, kwargs, _ = algo
    case = {"shape": (4, 5), "param": "gaps", "grad": "contiguous", "state": "contiguous", "seed": 7}
    assert lay_out(torch.zeros(4, 5), "gaps").stride() == (10, 2)
    expected = torch_reference(torch_class, kwargs, case, STEPS)
    for path in ("update", "inplace_step", "step"):
        torch.testing.assert_close(run_pureopt(factory, kwargs, "auto", path, case, STEPS), expected, **TOL)


def test_explicit_fused_error_names_the_tensor_and_the_problem():
    tx = pureopt.adam(lr=0.1, impl="fused")
    params = {"a": torch.zeros(3), "w": lay_out(torch.randn(4, 5), "gaps")}
    grads = {"a": torch.ones(3), "w": torch.ones(4, 5)}
    with pytest.raises(RuntimeError, match=r"the parameter of tensor 1 is not dense in memory \(shape \(4, 5\), "):
        pureopt.inplace_step(tx, grads, tx.init(params), params)
    params = {"w": torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)}
    with pytest.raises(RuntimeError, match=r"the parameter of tensor 0 has strides \(48, 1, 12, 3\) but its gradient"):
        pureopt.inplace_step(tx, {"w": torch.ones(2, 3, 4, 4)}, tx.init(params), params)
    with pytest.raises(RuntimeError, match=r"the gradient of tensor 0 is not dense in memory .*strides \(1, 0\)"):
        p = {"w": torch.zeros(2, 3)}
        tx.update({"w": torch.ones(2, 1).expand(2, 3)}, tx.init(p), p)


def test_foreach_refusal_names_the_tensor_type_not_differentiation():
    """An explicit foreach on a tensor subclass: the reason is the tensor type (it used to speak of
    differentiation)."""

    class Tagged(torch.Tensor):
        pass

    tx = pureopt.adamax(lr=0.1, impl="foreach")
    p = {"w": torch.zeros(3).as_subclass(Tagged)}
    with pytest.raises(RuntimeError, match=r"impl='foreach' cannot run here because tensor 0 is a Tagged, not a "):
        tx.update({"w": torch.ones(3).as_subclass(Tagged)}, tx.init(p), p)
