"""Options that hold dtypes and encodings (``state_dtype=torch.float32``, a per-field ``FloatEncoding``, Muon's
``ns_dtype``, which every Muon group holds) are saved in a form torch's state-dict tools carry.

``torch.distributed.checkpoint.state_dict.get_state_dict(..., full_state_dict=True)`` (torchtune's and
accelerate's way of saving FSDP2 models) type-checks every value of the optimizer's state dict and raises
``ValueError: Unexpected value type <class 'torch.dtype'>`` on anything but tensors, numbers, strings, bytes,
``None`` and lists / tuples / dicts of them (its docstring lists them; the FSDP2 run with a bare
``state_dtype=torch.bfloat16`` in tests/test_fsdp_encoded.py goes through it on two ranks). The reference here:
that list, and the uninterrupted run, which a resumed run must equal bitwise.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import pureopt
from pureopt.adapters import TorchOptimizer
from pureopt.kernels.encoding import NAMED, BlockEncoding, FloatEncoding

_CARRIED = (torch.Tensor, int, float, str, bytes, type(None))  # (bool is an int)


def _carried(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _carried(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_carried(v) for v in value)
    return isinstance(value, _CARRIED)


CUSTOM_Q8 = BlockEncoding("q8u", bits=8, code=list(NAMED["q8u"].code or []), block=64)
OPTIONS = {
    "float32-state": (pureopt.adamw, dict(lr=0.01, state_dtype=torch.float32)),
    "per-field": (
        pureopt.adamw,
        dict(
            lr=0.01,
            state_dtype={"exp_avg": FloatEncoding(torch.bfloat16, stochastic=True, seed=3), "exp_avg_sq": CUSTOM_Q8},
        ),
    ),
    "named": (pureopt.adamw, dict(lr=0.01, state_dtype={"exp_avg": NAMED["q4"], "exp_avg_sq": "q8"})),
    "muon": (pureopt.muon, dict(lr=0.02)),  # (ns_dtype=torch.bfloat16)
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_resumed(model: torch.nn.Module, opt: torch.optim.Optimizer, uninterrupted: torch.nn.Module, steps: range):
    """``model`` / ``opt``, loaded from a checkpoint, stepped through ``steps``: bitwise the uninterrupted run's."""
    _steps(model, opt, steps)
    for a, b in zip(uninterrupted.parameters(), model.parameters()):
        assert torch.equal(a, b)


def _make(name: str) -> tuple[torch.nn.Module, TorchOptimizer]:
    factory, kw = OPTIONS[name]
    model = _model()
    params = [p for p in model.parameters() if p.dim() == 2] if factory is pureopt.muon else model.parameters()
    return model, TorchOptimizer(params, factory, **kw)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_saved_param_groups_hold_only_what_torch_state_dict_tools_carry(name: str) -> None:
    model, opt = _make(name)
    _steps(model, opt, range(2))
    groups = opt.state_dict()["param_groups"]
    assert all(_carried({k: v for k, v in g.items() if k != "params"}) for g in groups)
    # the live options are the objects given
    assert opt.param_groups[0]["state_dtype"] is OPTIONS[name][1].get("state_dtype")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_checkpoint_through_torch_save_resumes_bitwise_with_the_options_it_was_given(name: str) -> None:
    model, opt = _make(name)
    _steps(model, opt, range(2))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _steps(model, opt, range(2, 5))
    buf.seek(0)
    saved = torch.load(buf)  # (weights_only: plain values only)
    model2, opt2 = _make(name)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    for key in ("state_dtype", "ns_dtype"):
        if key in opt.param_groups[0]:
            assert opt2.param_groups[0][key] == opt.param_groups[0][key]
    _assert_resumed(model2, opt2, model, range(2, 5))


def test_checkpoints_holding_the_objects_still_load() -> None:
    # (written before the options were saved as plain values: torch.save pickled the dtype itself)
    model, opt = _make("float32-state")
    _steps(model, opt, range(2))
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["state_dtype"] = torch.float32
    model2, opt2 = _make("float32-state")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["state_dtype"] is torch.float32
    _steps(model, opt, range(2, 4))
    _assert_resumed(model2, opt2, model, range(2, 4))


def test_an_unknown_saved_option_is_refused_before_anything_changes() -> None:
    model, opt = _make("float32-state")
    _steps(model, opt, range(2))
    sd = opt.state_dict()
    sd["param_groups"][0]["state_dtype"] = {"pureopt_option": "dtype", "name": "float99"}
    before = [t.clone() for t in opt.state_dict()["state"][0].values() if isinstance(t, torch.Tensor)]
    with pytest.raises(ValueError, match="float99"):
        opt.load_state_dict(sd)
    after = [t for t in opt.state_dict()["state"][0].values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt.param_groups[0]["state_dtype"] is torch.float32


def _stepped_lamb(state_dtype: Any, factory: Any = pureopt.lamb) -> tuple[torch.nn.Module, TorchOptimizer]:
    model = _model()
    opt = TorchOptimizer(model.parameters(), factory, lr=0.01, state_dtype=state_dtype)
    _steps(model, opt, range(2))
    return model, opt


@pytest.mark.parametrize(
    "factory,state_dtype,refused",
    [(pureopt.lamb, "q8", True), (pureopt.lamb, "q4", True), (pureopt.lamb, "bf16", False),
     (pureopt.adamw, "q8", False)],
)  # fmt: skip
def test_codes_written_with_the_earlier_code_tables_are_refused_by_field(factory, state_dtype, refused):
    # before 2026-12-08 LAMB's exp_avg_sq (and 21 other non-negative fields) took signed codes; Adam's always took
    # unsigned ones, and bf16 values are no codes: those checkpoints read the same and still load
    _, opt = _stepped_lamb(state_dtype, factory)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["pureopt"]["codes"]  # (as written before: no "codes" marker)
    _, fresh = _stepped_lamb(state_dtype, factory)
    before = {k: v.clone() for k, v in fresh.state_dict()["state"][0].items()}
    if not refused:
        fresh.load_state_dict(sd)
        return
    with pytest.raises(ValueError, match="LambState's exp_avg_sq as signed 8-/4-bit codes"):
        fresh.load_state_dict(sd)
    after = fresh.state_dict()["state"][0]
    assert all(torch.equal(before[k], after[k]) for k in before)
