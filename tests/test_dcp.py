"""TorchOptimizer through torch.distributed.checkpoint (DCP) on FSDP2, 2 gloo ranks on 127.0.0.1.

Each rank shards a float64 model with ``fully_shard``, trains ``RESUME_AT`` steps, saves model and optimizer
(``get_state_dict``, then ``dcp.save``, or a full state dict that rank 0 saves with ``torch.save``), builds a *fresh*
model and TorchOptimizer, loads the checkpoint (``dcp.load`` + ``set_state_dict``) and trains on to ``STEPS``. The
model has a frozen layer (``requires_grad=False``) and a layer that gets its first gradient only after the
checkpoint (``LATE``), so the checkpoint holds parameters that never stepped.

References: the resumed trajectory equals the uninterrupted sharded run bit for bit (same kernels on the same
shards), and the single-process unsharded run of torch.optim (Lion: its paper's rule, written here) to 1e-10.
Single-process tests below cover the state-dict format itself: format-1 checkpoints (a top-level ``"pureopt"``
entry) still load, and counters of a checkpoint that torch.optim stepped further are rebuilt from its step counts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, full_load, full_save, launch
from _dist import assert_trajectory_close as assert_close
from torch import nn

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer

STEPS = 7
RESUME_AT = 3  # steps before the checkpoint
LATE = 4  # the step at which the late layer first gets a gradient (after the checkpoint)
LR = 2.0**-5
GLOBAL_BATCH = 8
RTOL64, ATOL64 = 1e-10, 1e-12

# name -> what it exercises
CONFIGS = {
    "adamw": "per-parameter step counts (bias corrections)",
    "sgd-schedule": "no per-parameter step count; a step_lr schedule read at num_updates",
    "lion": "no per-parameter step count, not in torch.optim",
}
MODES = ("sharded", "full")


class Net(nn.Module):
    """fc1 (5 rows: uneven shards), fc2, a frozen layer, a head and a layer used from step ``LATE`` on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)
        self.frozen = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        self.late = nn.Linear(3, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        h = h + self.frozen(h)
        out = self.head(h)
        return out + self.late(h) if step >= LATE else out


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().to(torch.float64)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64)


def make_optimizer(name: str, params: Any) -> TorchOptimizer:
    if name == "adamw":
        return TorchOptimizer(params, pureopt.adamw, lr=LR, weight_decay=0.1)
    if name == "sgd-schedule":  # lr = LR * 0.5 ** (num_updates // 2)
        return TorchOptimizer(params, pureopt.sgd(lr=pureopt.schedules.step_lr(LR, 2, 0.5), momentum=0.9))
    return TorchOptimizer(params, pureopt.lion, lr=LR, weight_decay=0.5)


# --- rank side ----------------------------------------------------------------------------------------------------


def sharded_net() -> Net:
    from torch.distributed.fsdp import fully_shard

    model = make_net()
    for layer in (model.fc1, model.fc2, model.frozen, model.head, model.late):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def train_step(model: Net, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    n = GLOBAL_BATCH // WORLD
    x, y = global_batch(step)
    opt.zero_grad(set_to_none=True)
    ((model(x[rank * n : (rank + 1) * n], step) - y[rank * n : (rank + 1) * n]) ** 2).mean().backward()
    opt.step()


def counters(opt: TorchOptimizer) -> list[int]:
    return [int(v) for group in opt.param_groups for v in group["pureopt"]["globals"].values()]


def resume(name: str, mode: str, rank: int, path: Path) -> dict[str, Any]:
    """Train, checkpoint, load into a fresh model and optimizer, train on; the trajectory after the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = sharded_net()
    opt = make_optimizer(name, model.parameters())
    for step in range(RESUME_AT):
        train_step(model, opt, rank, step)
    saved_counters = counters(opt)
    if mode == "sharded":
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    else:  # a full state dict on rank 0's CPU, saved there
        full_save(model, opt, path)
    del model, opt

    model = sharded_net()
    opt = make_optimizer(name, model.parameters())
    before = full_params(model)
    if mode == "sharded":
        model_sd, optim_sd = get_state_dict(model, opt)  # the template: a fresh optimizer's state, every parameter
        template_keys = sorted(optim_sd["state"])
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(path))
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    else:
        template_keys = []
        full_load(model, opt, path)
    loaded_counters = counters(opt)
    trajectory = []
    for step in range(RESUME_AT, STEPS):
        train_step(model, opt, rank, step)
        trajectory.append(full_params(model))
    return {
        "trajectory": trajectory,
        "counters": (saved_counters, loaded_counters),
        "template_keys": template_keys,
        "fresh_params": before,
    }


def uninterrupted(name: str, rank: int) -> list[list[torch.Tensor]]:
    model = sharded_net()
    opt = make_optimizer(name, model.parameters())
    trajectory = []
    for step in range(STEPS):
        train_step(model, opt, rank, step)
        trajectory.append(full_params(model))
    return trajectory


def fake_step_changes_nothing(rank: int) -> dict[str, Any]:
    """get_state_dict / set_state_dict on a fresh optimizer (DCP would run its zero-gradient, zero-lr "fake step"
    on an optimizer without state): nothing observable changes."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = sharded_net()
    opt = make_optimizer("adamw", model.parameters())
    before = (full_params(model), counters(opt), [g.get("lr") for g in opt.param_groups])
    model_sd, optim_sd = get_state_dict(model, opt)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    after = (full_params(model), counters(opt), [g.get("lr") for g in opt.param_groups])
    return {
        "params_same": all(torch.equal(a, b) for a, b in zip(before[0], after[0])),
        "counters": (before[1], after[1]),
        "lrs": (before[2], after[2]),
        "grads": [p.grad is None for p in model.parameters()],
        "steps": sorted({float(e["step"]) for e in optim_sd["state"].values() if "step" in e}),
    }


def template_from_a_fresh_state_dict_is_refused(rank: int, path: Path) -> str:
    """dcp.load into a fresh optimizer's own state_dict() (not DSD's template): it asks for no per-parameter
    state, and load_state_dict then says so instead of loading nothing."""
    import torch.distributed.checkpoint as dcp

    model = sharded_net()
    opt = make_optimizer("adamw", model.parameters())
    train_step(model, opt, rank, 0)
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(path))
    fresh = make_optimizer("adamw", sharded_net().parameters())
    loaded = {"optim": fresh.state_dict()}
    dcp.load(loaded, checkpoint_id=str(path))
    try:
        fresh.load_state_dict(loaded["optim"])
    except ValueError as e:
        return str(e)
    return "no error"


def scenario(rank: int, world: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in CONFIGS:
        results[name, "uninterrupted"] = uninterrupted(name, rank)
        for mode in MODES:
            results[name, mode] = resume(name, mode, rank, out / f"ckpt-{name}-{mode}")
    results["fake-step"] = fake_step_changes_nothing(rank)
    results["refused"] = template_from_a_fresh_state_dict_is_refused(rank, out / "ckpt-plain")
    return results


# --- test side ----------------------------------------------------------------------------------------------------


def reference(name: str) -> list[list[torch.Tensor]]:
    """The unsharded single-process run on the whole batch: torch.optim, or Lion's rule (Chen et al., 2023)."""
    model = make_net()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer | None = None
    sched = None
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    elif name == "sgd-schedule":
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    momenta = {id(p): torch.zeros_like(p) for p in params}
    out = []
    for step in range(STEPS):
        x, y = global_batch(step)
        model.zero_grad(set_to_none=True)
        ((model(x, step) - y) ** 2).mean().backward()
        if opt is not None:
            opt.step()
            if sched is not None:
                sched.step()
        else:  # Lion: c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p); m = b2 m + (1 - b2) g; b1 = 0.9, b2 = 0.99
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        continue
                    m = momenta[id(p)]
                    c = 0.9 * m + 0.1 * p.grad
                    p.sub_(LR * (torch.sign(c) + 0.5 * p))
                    m.mul_(0.99).add_(0.01 * p.grad)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("test_dcp", "scenario", tmp_path_factory.mktemp("dcp"), timeout=180)


CASES = [(name, mode) for name in CONFIGS for mode in MODES]


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_resumed_run_equals_the_unsharded_torch_run(job: list[dict[str, Any]], name: str, mode: str) -> None:
    want = reference(name)
    for rank in range(WORLD):
        got = job[rank][name, mode]
        assert_close(got["trajectory"], want[RESUME_AT:], f"{name} {mode} rank {rank}", rtol=RTOL64, atol=ATOL64)
        saved, loaded = got["counters"]
        assert saved == loaded == [RESUME_AT], "the update counter (what schedules read) did not survive"


@pytest.mark.bitwise
@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_resumed_run_equals_the_uninterrupted_run_bitwise(job: list[dict[str, Any]], name: str, mode: str) -> None:
    for rank in range(WORLD):
        got = job[rank][name, mode]["trajectory"]
        assert_close(got, job[rank][name, "uninterrupted"][RESUME_AT:], f"{name} {mode}", rtol=0, atol=0)


def test_the_uninterrupted_sharded_run_equals_torch(job: list[dict[str, Any]]) -> None:
    for name in CONFIGS:
        assert_close(job[0][name, "uninterrupted"], reference(name), name, rtol=RTOL64, atol=ATOL64)


def test_dcp_template_of_a_fresh_optimizer_asks_for_every_trainable_parameter(job: list[dict[str, Any]]) -> None:
    """Stepped or not: the late layer had not stepped at the checkpoint; the frozen layer has no state."""
    want = ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "head.bias", "head.weight", "late.bias", "late.weight"]
    for rank in range(WORLD):
        for name in CONFIGS:
            assert job[rank][name, "sharded"]["template_keys"] == want


def test_dcp_on_a_fresh_optimizer_changes_nothing_observable(job: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        got = job[rank]["fake-step"]
        assert got["params_same"]
        assert got["counters"] == ([0], [0])
        assert got["lrs"] == ([LR], [LR])
        assert got["steps"] == [0.0]  # every trainable parameter's entry, at its initial state
        assert all(got["grads"]), "gradients were created"


def test_loading_through_a_template_without_entries_is_refused(job: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        message = job[rank]["refused"]
        assert "none was loaded" in message and "get_state_dict" in message, message


# --- single process: the state-dict format -------------------------------------------------------------------------


def _params() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)]


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    opt.step()


def test_counters_are_kept_in_each_param_group_of_the_state_dict() -> None:
    params = _params()
    opt = TorchOptimizer(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], pureopt.adamw, lr=LR, weight_decay=0.1
    )
    for step in range(3):
        _step(opt, params, step)
    sd = opt.state_dict()
    assert sorted(sd) == ["param_groups", "state"]  # torch's top-level keys only
    for group in sd["param_groups"]:
        record = group["pureopt"]
        assert int(record["globals"]["num_updates"]) == 3
        assert record["kind"] == "adamw" and record["stepped"] == [0] and record["step_sum"] == 3.0
    assert [int(g["pureopt"]["globals"]["num_updates"]) for g in opt.param_groups] == [3, 3]


def test_format_1_checkpoint_with_a_top_level_entry_still_loads() -> None:
    """A checkpoint written before the records moved into the param groups (format 1)."""
    params = _params()
    sched = pureopt.schedules.step_lr(LR, 2, 0.5)
    opt = TorchOptimizer(params, pureopt.sgd(lr=sched, momentum=0.9))
    for step in range(3):
        _step(opt, params, step)
    sd = copy.deepcopy(opt.state_dict())
    record = sd["param_groups"][0].pop("pureopt")
    old = {
        "state": sd["state"],
        "param_groups": sd["param_groups"],
        "pureopt": {"version": 1, "groups": [{k: record[k] for k in ("kind", "types", "globals")}]},
    }
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    resumed = TorchOptimizer(resumed_params, pureopt.sgd(lr=sched, momentum=0.9))
    resumed.load_state_dict(old)
    assert int(resumed.param_groups[0]["pureopt"]["globals"]["num_updates"]) == 3
    # the reference: torch.optim.SGD with the same schedule, from the same state
    ref_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ref = torch.optim.SGD(ref_params, lr=LR * 0.5, momentum=0.9)  # lr at step 3: LR * 0.5 ** (3 // 2)
    for i, p in enumerate(ref_params):
        ref.state[p]["momentum_buffer"] = old["state"][i]["momentum_buffer"].clone()
    _step(resumed, resumed_params, 3)
    _step(ref, ref_params, 3)
    for a, b in zip(resumed_params, ref_params):
        torch.testing.assert_close(a, b, rtol=RTOL64, atol=ATOL64)


def test_counters_of_a_checkpoint_torch_stepped_further_are_rebuilt_from_its_step_counts() -> None:
    """pureopt saves at 3 updates; torch.optim.AdamW loads it, steps twice and saves: its param groups still hold
    pureopt's record (torch keeps unknown group keys), but the step counts moved on, so the counter is 5."""
    params = _params()
    opt = TorchOptimizer(params, pureopt.adamw, lr=LR)
    for step in range(3):
        _step(opt, params, step)
    torch_opt = torch.optim.AdamW(params, lr=LR)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 5):
        _step(torch_opt, params, step)
    sd = torch_opt.state_dict()
    assert int(sd["param_groups"][0]["pureopt"]["globals"]["num_updates"]) == 3  # stale
    again = TorchOptimizer(params, pureopt.adamw, lr=LR)
    again.load_state_dict(sd)
    assert int(again.param_groups[0]["pureopt"]["globals"]["num_updates"]) == 5


def test_a_record_put_into_param_groups_is_adopted_at_the_next_step() -> None:
    """What ZeroRedundancyOptimizer.load_state_dict does (it copies the saved groups' keys into the local
    optimizer's): the counter is taken over, checked first."""
    params = _params()
    opt = TorchOptimizer(params, pureopt.sgd(lr=pureopt.schedules.step_lr(LR, 2, 0.5)))
    opt.param_groups[0]["pureopt"] = {"globals": {"num_updates": torch.tensor(4)}}
    before = params[0].detach().clone()
    _step(opt, params, 0)
    torch.testing.assert_close(params[0], before - LR * 0.25 * params[0].grad, rtol=0, atol=0)  # lr at 4: LR/4
    assert int(opt.param_groups[0]["pureopt"]["globals"]["num_updates"]) == 5
    opt.param_groups[0]["pureopt"] = {"globals": {"num_updates": torch.tensor(1.5)}}
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['pureopt'\]\['globals'\]\['num_updates'\] has dtype"):
        _step(opt, params, 1)


def test_state_of_a_parameter_frozen_after_it_stepped_is_not_dropped_silently(tmp_path: Path) -> None:
    """DCP's set_state_dict loads no optimizer state for a parameter that does not require grad: a checkpoint in
    which such a parameter had stepped is refused, with the remedy (unfreeze it while loading), which works."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def model_and_opt() -> tuple[nn.Module, TorchOptimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)).to(torch.float64)
        return model, TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR)

    model, opt = model_and_opt()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    model[0].requires_grad_(False)  # frozen after it stepped
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    saved = copy.deepcopy(opt.state_dict()["state"])

    def load(unfreeze: bool) -> TorchOptimizer:
        model2, opt2 = model_and_opt()
        model2[0].requires_grad_(unfreeze)
        model_sd2, optim_sd2 = get_state_dict(model2, opt2)
        state = {"model": model_sd2, "optim": optim_sd2}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        model2[0].requires_grad_(False)
        return opt2

    with pytest.raises(ValueError, match=r"parameter 0\.weight, but none was loaded.*requires_grad=True"):
        load(unfreeze=False)
    restored = load(unfreeze=True).state_dict()["state"]
    for pid, entry in saved.items():
        for key, value in entry.items():
            assert torch.equal(restored[pid][key], value), (pid, key)
