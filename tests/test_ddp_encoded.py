"""Encoded optimizer state (``state_dtype="q8"`` / ``"q4"`` / ``"bf16-sr"``) inside DDP's backward pass: 2 gloo
ranks on 127.0.0.1, each with the same float32 MLP under ``DistributedDataParallel`` (buckets of ~1 KB: several per
model) and its half of every global batch.

* ``register_optimizer_hook`` (each bucket stepped after its all-reduce; also ``flat=True``, buffers laid out like
  the buckets) against DDP followed by ``TorchOptimizer.step()`` with the same encoding in the same rank: the same
  reduced gradients, and a per-tensor state whose one-pass kernel takes each tensor alone, so the same bits.
* Both against the single-process run of the same optimizer on the whole batch (up to the gradients' summation
  order: a code may flip), and against ``torch.optim.AdamW``'s fp32 run within the quantisation bound.
* The hook optimizer's checkpoint (``state_dict`` after ``RESUME_AT`` steps) loaded into a new DDP model and hook
  resumes the uninterrupted run bitwise.
* ``optimizer_in_backward`` (each parameter stepped as its gradient is accumulated, no DDP) against
  ``TorchOptimizer.step()`` after backward on the same rank-local batches, bitwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, launch, unsharded_trajectory
from _encoded import SPECS, TOL_FP32, TOL_SAME, TOL_SR_REALIZATIONS, distance
from torch import nn

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer

STEPS = 6
RESUME_AT = 3
LR = 1e-2
GLOBAL_BATCH = 16


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    n = GLOBAL_BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def adamw(spec: str) -> pureopt.GradientTransformation:
    return pureopt.adamw(lr=LR, weight_decay=0.1, state_dtype=spec)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- rank side ----------------------------------------------------------------------------------------------------


def ddp_of(model: nn.Module) -> Any:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, bucket_cap_mb=0.001)


def hook_run(rank: int, spec: str, flat: bool) -> dict[str, Any]:
    """The hook optimizer's trajectory, and its resumption from a checkpoint taken after ``RESUME_AT`` steps."""
    from pureopt.adapters.ddp import register_optimizer_hook

    def train(ddp: Any, steps: range) -> list[list[torch.Tensor]]:
        out = []
        for step in steps:
            ddp.zero_grad(set_to_none=True)
            x, y = batch_of(rank, step)
            loss_fn(ddp(x), y).backward()
            out.append(snapshot(ddp.module))
        return out

    model = make_net()
    ddp = ddp_of(model)
    opt = register_optimizer_hook(ddp, adamw(spec), flat=flat)
    trajectory = train(ddp, range(RESUME_AT))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    trajectory += train(ddp, range(RESUME_AT, STEPS))
    model2 = make_net()
    model2.load_state_dict(saved[0])
    ddp2 = ddp_of(model2)
    opt2 = register_optimizer_hook(ddp2, adamw(spec), flat=flat)
    opt2.load_state_dict(saved[1])
    encoded = [t.dtype for entry in saved[1]["state"].values() for t in entry.values() if isinstance(t, torch.Tensor)]
    return {"trajectory": trajectory, "resumed": train(ddp2, range(RESUME_AT, STEPS)), "dtypes": encoded}


def twin_run(rank: int, spec: str) -> list[list[torch.Tensor]]:
    """DDP, then TorchOptimizer.step() after backward, with the same encoding."""
    model = make_net()
    ddp = ddp_of(model)
    opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec)
    out = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = batch_of(rank, step)
        loss_fn(ddp(x), y).backward()
        opt.step()
        out.append(snapshot(model))
    return out


def in_backward_runs(rank: int, spec: str) -> dict[str, list[list[torch.Tensor]]]:
    """optimizer_in_backward and TorchOptimizer.step() after backward on this rank's batches (no DDP)."""
    from pureopt.adapters.ddp import optimizer_in_backward

    runs: dict[str, list[list[torch.Tensor]]] = {}
    for mode in ("in_backward", "after"):
        model = make_net()
        if mode == "in_backward":
            optimizer_in_backward(model, adamw(spec))
            opt = None
        else:
            opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec)
        out = []
        for step in range(STEPS):
            x, y = batch_of(rank, step)
            loss_fn(model(x), y).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            out.append(snapshot(model))
        runs[mode] = out
    return runs


def scenario(rank: int, world: int, out: Path) -> dict[str, Any]:
    del world, out
    res: dict[str, Any] = {}
    for spec in SPECS:
        res[spec] = {
            "hook": hook_run(rank, spec, flat=False),
            "hook-flat": hook_run(rank, spec, flat=True),
            "twin": twin_run(rank, spec),
            "backward": in_backward_runs(rank, spec),
        }
    return res


# --- test side ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(__name__, "scenario", tmp_path_factory.mktemp("ddp_encoded"), timeout=180)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _same_run(got: list[torch.Tensor], want: list[torch.Tensor], spec: str, run: str) -> bool:
    """Bitwise, but for stochastically rounded state in flat buffers: its random bits are keyed by each element's
    place in its buffer (laid out like DDP's buckets, which DDP rebuilds after the first iteration), not in its
    parameter, so roundings differ from the unflattened optimizer's (and from a run that starts at another
    iteration): within the distance of two such realizations then."""
    if spec == "bf16-sr" and run.endswith("flat"):
        return distance(got, want) <= TOL_SR_REALIZATIONS * distance(want, snapshot(make_net()))
    return _equal(got, want)


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("run", ["hook", "hook-flat"])
def test_optimizer_hook_with_encoded_state_steps_as_ddp_then_the_optimizer(
    job: list[dict[str, Any]], spec: str, run: str
) -> None:
    # the same reduced gradients; each tensor's state stepped alone and stochastic rounding keyed by the parameter's
    # position among all (UpdateContext.streams), not in the bucket's call: the same bits as one step over all
    for rank in range(WORLD):
        got, want = job[rank][spec][run]["trajectory"], job[rank][spec]["twin"]
        for step in range(STEPS):
            assert _same_run(got[step], want[step], spec, run), (spec, run, rank, step)
    assert all(_equal(a, b) for a, b in zip(job[0][spec][run]["trajectory"], job[1][spec][run]["trajectory"]))


@pytest.mark.parametrize("spec", SPECS)
def test_optimizer_hook_with_encoded_state_tracks_the_single_process_runs(job: list[dict[str, Any]], spec: str) -> None:
    start = snapshot(make_net())
    fp32 = unsharded_trajectory(
        make_net(), lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1), global_batch, loss_fn, STEPS
    )
    same = unsharded_trajectory(
        make_net(),
        lambda ps: TorchOptimizer(ps, pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec),
        global_batch,
        loss_fn,
        STEPS,
    )
    got = job[0][spec]["hook"]["trajectory"]
    for step in range(STEPS):
        moved = distance(fp32[step], start)
        assert distance(got[step], fp32[step]) <= TOL_FP32[spec] * moved, (spec, step)
        assert distance(got[step], same[step]) <= TOL_SAME[spec] * moved, (spec, step)


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("run", ["hook", "hook-flat"])
def test_optimizer_hook_checkpoint_with_encoded_state_resumes_bitwise(
    job: list[dict[str, Any]], spec: str, run: str
) -> None:
    for rank in range(WORLD):
        res = job[rank][spec][run]
        for got, want in zip(res["resumed"], res["trajectory"][RESUME_AT:]):
            assert _same_run(got, want, spec, run), (spec, run, rank)
        if spec != "bf16-sr":  # (the checkpoint holds the codes, not float32 state)
            assert torch.uint8 in res["dtypes"]


@pytest.mark.bitwise
@pytest.mark.parametrize("spec", SPECS)
def test_optimizer_in_backward_with_encoded_state_steps_as_the_optimizer_after_backward(
    job: list[dict[str, Any]], spec: str
) -> None:
    start = snapshot(make_net())
    for rank in range(WORLD):
        runs = job[rank][spec]["backward"]
        # (the independent reference: torch.optim.AdamW's fp32 run on this rank's batches, within the encoding's bound)
        fp32 = unsharded_trajectory(
            make_net(), lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1), lambda k, r=rank: batch_of(r, k),
            loss_fn, STEPS,
        )  # fmt: skip
        for step in range(STEPS):
            assert _equal(runs["in_backward"][step], runs["after"][step]), (spec, rank, step)
            moved = distance(fp32[step], start)
            assert distance(runs["in_backward"][step], fp32[step]) <= TOL_FP32[spec] * moved, (spec, rank, step)
