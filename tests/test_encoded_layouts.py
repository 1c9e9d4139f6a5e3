"""Encoded state loaded in the layout a checkpoint saved it in (pureopt.adapters._layouts): a sharded run (FSDP2,
tensor parallelism) stores an encoded field by rows (2-D codes and scales, blocks within rows) or, where rows are
too short to block, as a float32 tensor; an optimizer over unsharded parameters takes either as it comes.

The checkpoints here are written by hand with the codec reference of tests/test_state_encoding.py (each block
scaled by its absolute maximum, each element the index of the nearest code value) and one step is checked against
torch.optim.AdamW's update rule written out below, run on the decoded state. The 2-rank FSDP2 checkpoints are in
tests/test_fsdp_encoded.py.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import pureopt
from pureopt.kernels.encoding import NAMED

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1
ROWS, WIDTH = 4, 64


def encode_rows(x: torch.Tensor, name: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows x width) as 2-D codes and scales, blocks of ``block`` within each row: the reference codec."""
    table = torch.tensor(NAMED[name].code, dtype=torch.float64)
    blocks = x.double().reshape(x.shape[0], -1, block)
    absmax = blocks.abs().amax(dim=2, keepdim=True)
    idx = ((blocks / absmax)[..., None] - table).abs().argmin(dim=-1)
    return idx.reshape(x.shape).to(torch.uint8), absmax.reshape(x.shape[0], -1).float()


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    table = torch.tensor(NAMED[name].code, dtype=torch.float32)
    block = codes.shape[1] // scale.shape[1]
    return (table[codes.long()].reshape(codes.shape[0], -1, block) * scale[..., None]).reshape(codes.shape)


def adamw_rule(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, betas: Any) -> Any:
    """torch.optim.AdamW's step (decoupled weight decay, bias corrections) on float32 state: the new parameter."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v.sqrt() / math.sqrt(1 - b2**t)) + EPS
    return p * (1 - LR * WD) - (LR / (1 - b1**t)) * m / denom


def sharded_checkpoint(opt: torch.optim.Optimizer, steps: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """``opt``'s state dict with the weight's fields stored by rows (blocks of ``WIDTH // 2``: two a row) and the
    bias's in float32, as a column- or row-sharded run keeps them, and the float32 values they stand for."""
    torch.manual_seed(1)
    m, v = torch.randn(ROWS, WIDTH) * 1e-2, torch.rand(ROWS, WIDTH) * 1e-4 + 1e-6
    mb, vb = torch.randn(ROWS) * 1e-2, torch.rand(ROWS) * 1e-4
    sd = opt.state_dict()
    m_codes, m_scale = encode_rows(m, "q8", WIDTH // 2)
    v_codes, v_scale = encode_rows(v, "q8u", WIDTH // 2)
    step = torch.tensor(float(steps))
    sd["state"] = {
        0: {"step": step.clone(), "exp_avg.codes": m_codes, "exp_avg.scale": m_scale,
            "exp_avg_sq.codes": v_codes, "exp_avg_sq.scale": v_scale},
        1: {"step": step.clone(), "exp_avg": mb, "exp_avg_sq": vb},
    }  # fmt: skip
    for group in sd["param_groups"]:  # (a torch-style checkpoint: counters from the step counts)
        group.pop("pureopt", None)
    values = {
        "m": decode_rows(m_codes, m_scale, "q8"), "v": decode_rows(v_codes, v_scale, "q8u"), "mb": mb, "vb": vb,
    }  # fmt: skip
    return sd, values


def make(flat: bool = False) -> tuple[torch.nn.Linear, pureopt.TorchOptimizer]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(WIDTH, ROWS)
    opt = pureopt.TorchOptimizer(
        lin.parameters(), pureopt.adamw, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype="q8", flat=flat
    )
    return lin, opt


def step_on(lin: torch.nn.Linear, opt: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    x = torch.randn(8, WIDTH)
    opt.zero_grad()
    lin(x).square().mean().backward()
    grads = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    return grads


@pytest.mark.parametrize("flat", [False, True])
def test_state_saved_by_rows_loads_as_saved_and_steps_as_adamw(flat: bool) -> None:
    lin, opt = make(flat)
    sd, ref = sharded_checkpoint(opt)
    opt.load_state_dict(copy.deepcopy(sd))
    weight = opt.state[lin.weight]
    assert weight["exp_avg.codes"].shape == (ROWS, WIDTH) and weight["exp_avg.scale"].shape == (ROWS, 2)
    assert set(opt.state[lin.bias]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[lin.bias]["exp_avg"].dtype == torch.float32
    for i, entry in sd["state"].items():
        saved = opt.state_dict()["state"][i]
        assert all(torch.equal(saved[k], v) for k, v in entry.items()), i
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gw, gb = step_on(lin, opt)
    # the update in float32 (the step's own arithmetic may order its operations otherwise: a few ulps)
    want_w = adamw_rule(w0, gw, ref["m"], ref["v"], 4, BETAS)
    want_b = adamw_rule(b0, gb, ref["mb"], ref["vb"], 4, BETAS)
    torch.testing.assert_close(lin.weight.detach(), want_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.bias.detach(), want_b, rtol=1e-6, atol=1e-7)
    after = opt.state[lin.weight]
    assert after["exp_avg.codes"].shape == (ROWS, WIDTH)  # (still by rows: the blocks it was saved with)
    m_new = BETAS[0] * ref["m"] + (1 - BETAS[0]) * gw
    got = decode_rows(after["exp_avg.codes"], after["exp_avg.scale"], "q8")
    step = (m_new.abs().reshape(ROWS, 2, -1).amax(-1, keepdim=True) * 0.02).expand(-1, -1, WIDTH // 2)
    assert ((got - m_new).abs() <= step.reshape(ROWS, WIDTH)).all()  # within the code's step near the values


def test_state_saved_by_rows_survives_a_rebuild_for_new_options() -> None:
    # betas changed in param_groups rebuilds the group's transformation: the loaded fields carry over as they are
    lin, opt = make()
    sd, ref = sharded_checkpoint(opt)
    opt.load_state_dict(sd)
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    w0 = lin.weight.detach().clone()
    gw, _ = step_on(lin, opt)
    torch.testing.assert_close(
        lin.weight.detach(), adamw_rule(w0, gw, ref["m"], ref["v"], 4, (0.8, 0.99)), rtol=1e-6, atol=1e-7
    )


def test_functional_optimizer_loads_state_saved_by_rows() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(WIDTH, ROWS)
    tx = pureopt.adamw(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype="q8")
    fopt = pureopt.adapters.FunctionalOptimizer(list(lin.parameters()), tx)
    template = pureopt.TorchOptimizer(lin.parameters(), pureopt.adamw, lr=LR, state_dtype="q8")
    sd, ref = sharded_checkpoint(template)
    sd.pop("pureopt", None)
    fopt.load_state_dict({"state": sd["state"], "param_groups": [{"params": [0, 1]}]})
    w0 = lin.weight.detach().clone()
    torch.manual_seed(2)
    gw = torch.randn(ROWS, WIDTH) * 1e-2
    fopt.step([gw, torch.zeros(ROWS)])
    torch.testing.assert_close(
        lin.weight.detach(), adamw_rule(w0, gw, ref["m"], ref["v"], 4, BETAS), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"exp_avg.scale": torch.ones(ROWS, 3)}, r"\[0\]\['exp_avg'\] is stored by rows, but .* not rows of whole"),
        ({"exp_avg.scale": torch.ones(ROWS, 4)}, r"scales \(4, 4\) are not rows of whole blocks of 32"),  # 16 a block
        ({"exp_avg.codes": torch.zeros(2, WIDTH, dtype=torch.uint8)}, r"do not hold the parameter's 256 elements"),
        ({"exp_avg.codes": torch.zeros(ROWS, WIDTH)}, r"exp_avg\.codes'\] has shape \(4, 64\), expected \(256,\)"),
        ({"exp_avg_sq": torch.ones(ROWS, WIDTH)}, r"'exp_avg_sq', which this optimizer does not keep"),
    ],
)
def test_layouts_the_step_cannot_read_are_refused_before_anything_changes(bad: dict[str, Any], message: str) -> None:
    lin, opt = make()
    step_on(lin, opt)
    before = copy.deepcopy(opt.state_dict())
    sd, _ = sharded_checkpoint(opt)
    sd["state"][0].update(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for i, entry in before["state"].items():
        assert sorted(after["state"][i]) == sorted(entry)
        assert all(torch.equal(after["state"][i][k], v) for k, v in entry.items())
