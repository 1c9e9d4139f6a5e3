"""pureopt.adapters.ddp with real gloo process groups (2 ranks on 127.0.0.1), against single-process references.

Multi-rank tests start one process per rank (forked from a forkserver that has imported torch and pureopt). Each
rank joins a gloo group (``tcp://127.0.0.1:<port>``, 60 s timeout), runs the scenario and saves what it saw
under ``out_dir``; the test process compares those files with a reference computed in one process (torch.optim on
the concatenated batch, or torch's own DDP machinery with torch.optim in the same rank). A rank that fails or
hangs fails the test with its log; every process is killed at the end. The models are float64 so that pureopt and
torch.optim agree to ~1e-13 over 10 steps (they round differently only in the last bits); the fault test runs in
float32 and asserts bitwise equality.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import free_port, joined_group
from torch import nn

import pureopt
from pureopt.adapters.ddp import (
    OptimizerInBackward,
    PeriodicAverager,
    optimizer_in_backward,
    periodic_average,
    register_optimizer_hook,
)
from pureopt.adapters.functional import FunctionalOptimizer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 10
LR = 2.0**-6  # exact in every float dtype, so schedules computed in float32 or float64 agree
GLOBAL_BATCH = 8
ATOL64 = 1e-12
RTOL64 = 1e-10


# --- shared by the rank processes and the test process ---------------------------------------------------------


class Net(nn.Module):
    """A small MLP; ``extra`` adds a layer only rank 0 uses and a layer no rank uses."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        self.extra = extra
        if extra:
            self.rank0_only = nn.Linear(16, 16)
            self.never_used = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        if self.extra and dist.is_initialized() and dist.get_rank() == 0:
            h = h + self.rank0_only(h)
        return self.head(h)


def make_net(dtype: torch.dtype = torch.float64, extra: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(extra).to(dtype)


def global_batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g).to(dtype), torch.randn(GLOBAL_BATCH, 2, generator=g).to(dtype)


def shard(step: int, rank: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s half of the global batch: DDP's average of the two half-batch means is the full mean."""
    x, y = global_batch(step, dtype)
    n = GLOBAL_BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data that differs between ranks (post-local SGD: the ranks drift apart between averagings)."""
    g = torch.Generator().manual_seed(5000 + 10 * step + rank)
    return torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# (name, DDP keyword arguments, optimizer, communication hook)
HOOK_CONFIGS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("adamw", {}, "adamw", None),
    ("adamw-bucket-view", {"gradient_as_bucket_view": True}, "adamw", None),
    ("adamw-static-graph", {"static_graph": True}, "adamw", None),
    ("sgd-momentum-bucket-view", {"gradient_as_bucket_view": True}, "sgd", None),
    ("adamw-schedule", {}, "adamw-schedule", None),
    ("adamw-fp16-compress", {}, "adamw", "fp16"),
    ("adamw-no-sync-accumulation", {}, "adamw", None),  # 2 micro-batches per step, the first under ddp.no_sync()
    # flat buffers laid out like the buckets (register_optimizer_hook(..., flat=True))
    ("adamw-flat", {}, "adamw", None),
    ("sgd-momentum-flat-bucket-view", {"gradient_as_bucket_view": True}, "sgd", None),
]


def pureopt_tx(kind: str) -> pureopt.GradientTransformation:
    if kind == "adamw":
        return pureopt.adamw(lr=LR, weight_decay=0.1)
    if kind == "adamw-schedule":
        return pureopt.adamw(lr=pureopt.schedules.step_lr(LR, step_size=3, gamma=0.5), weight_decay=0.1)
    return pureopt.sgd(lr=LR, momentum=0.9, nesterov=True, weight_decay=0.1)


def torch_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind.startswith("adamw"):
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    return torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.1)


def torch_lr(kind: str, step: int) -> float:
    """The learning rate torch.optim uses at ``step`` (StepLR(step_size=3, gamma=0.5) for the schedule)."""
    return LR * 0.5 ** (step // 3) if kind == "adamw-schedule" else LR


# --- rank-side scenarios ----------------------------------------------------------------------------------------


def _scenario_hooks(rank: int, world: int, out: Path) -> dict[str, Any]:
    """register_optimizer_hook over the configurations, unused parameters, and post-local SGD."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict[str, Any] = {}
    for name, ddp_kwargs, kind, hook_name in HOOK_CONFIGS:
        model = make_net()
        ddp = DDP(model, bucket_cap_mb=0.001, **ddp_kwargs)  # ~1 KB buckets: several per model
        hook = default_hooks.fp16_compress_hook if hook_name == "fp16" else None
        opt = register_optimizer_hook(ddp, pureopt_tx(kind), comm_hook=hook, flat="-flat" in name)
        twin = None
        if hook_name == "fp16":  # the same compressed gradients with torch.optim, in this process
            twin_model = make_net()
            twin_ddp = DDP(twin_model, bucket_cap_mb=0.001, **ddp_kwargs)
            twin_ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            twin = (twin_model, twin_ddp, torch_optimizer(kind, twin_model.parameters()))
        trajectory, twin_trajectory = [], []
        for step in range(STEPS):
            x, y = shard(step, rank)
            ddp.zero_grad(set_to_none=True)
            if name == "adamw-no-sync-accumulation":
                with ddp.no_sync():  # no communication, no optimizer step: the gradients accumulate
                    loss_fn(ddp(x[:2]), y[:2]).backward()
                assert torch.equal(snapshot(model)[0], trajectory[-1][0] if trajectory else make_net().fc1.weight)
                loss_fn(ddp(x[2:]), y[2:]).backward()
            else:
                loss_fn(ddp(x), y).backward()
            trajectory.append(snapshot(model))
            if twin is not None:
                twin_model, twin_ddp, twin_opt = twin
                twin_opt.zero_grad(set_to_none=True)
                loss_fn(twin_ddp(x), y).backward()
                twin_opt.step()
                twin_trajectory.append(snapshot(twin_model))
        try:
            register_optimizer_hook(ddp, pureopt_tx(kind))
            second = "no error"
        except RuntimeError as e:
            second = str(e)
        results[name] = {
            "trajectory": trajectory,
            "twin": twin_trajectory,
            "grads": [p.grad.clone() for p in model.parameters()],
            "state_dict": copy.deepcopy(opt.state_dict()),
            "num_buckets": len(ddp.reducer._get_zeros_like_grad_buckets()),
            "flat_groups": opt.flat_groups(),
            "flat_grad_copies": None if opt._flat is None else opt._flat.flat._grad_buffers is not None,
            "second_registration": second,
        }
    # bad input: a clear error and nothing registered (a valid registration still succeeds afterwards)
    ddp = DDP(make_net())
    errors = []
    for kwargs in ({"tx": pureopt.adamw}, {"comm_hook": 42}, {"comm_state": "group"}):
        arguments: dict[str, Any] = {"tx": pureopt.adamw(), **kwargs}
        try:
            register_optimizer_hook(ddp, **arguments)
            errors.append("no error")
        except TypeError as e:
            errors.append(str(e))
    register_optimizer_hook(ddp, pureopt.adamw())
    results["bad_input"] = errors
    results["unused"] = _unused_parameters(rank)
    results["post_local"] = _post_local_sgd(rank, world)
    results["fault_reference"] = _fault_training(rank, out, "full")
    return results


def _unused_parameters(rank: int) -> dict[str, Any]:
    """find_unused_parameters: pureopt's hook against DDP + torch.optim.AdamW in the same process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    for bucket_view in (False, True):
        model, ref_model = make_net(extra=True), make_net(extra=True)
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.001, gradient_as_bucket_view=bucket_view)
        ref_ddp = DDP(ref_model, find_unused_parameters=True, bucket_cap_mb=0.001, gradient_as_bucket_view=bucket_view)
        opt = register_optimizer_hook(ddp, pureopt.adamw(lr=LR, weight_decay=0.1))
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=0.1)
        mine, ref, grads, ref_grads = [], [], [], []
        for step in range(6):
            x, y = shard(step, rank)
            ddp.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()
            ref_opt.zero_grad(set_to_none=True)
            loss_fn(ref_ddp(x), y).backward()
            ref_opt.step()
            mine.append(snapshot(model))
            ref.append(snapshot(ref_model))
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            ref_grads.append([None if p.grad is None else p.grad.clone() for p in ref_model.parameters()])
        out[f"bucket_view={bucket_view}"] = {
            "mine": mine,
            "ref": ref,
            "grads": grads,
            "ref_grads": ref_grads,
            "initial": snapshot(make_net(extra=True)),
            "names": [n for n, _ in model.named_parameters()],
            "state_ids": sorted(opt.state_dict()["state"]),
        }
    return out


def _post_local_sgd(rank: int, world: int) -> dict[str, Any]:
    """Post-local SGD, 5 models side by side on different data per rank.

    A: register_optimizer_hook(post_localSGD_hook) + periodic_average; B: torch (DDP + post_localSGD_hook +
    PostLocalSGDOptimizer(AdamW, PeriodicModelAverager)); C: B with TorchOptimizer; D: torch with
    HierarchicalModelAverager; E: D with TorchOptimizer.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import HierarchicalModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pureopt.adapters import TorchOptimizer

    warmup, period = 3, 3
    subgroup, _ = dist.new_subgroups(group_size=1)  # after warm-up each rank reduces gradients with itself only

    def ddp_model() -> tuple[nn.Module, DDP, PostLocalSGDState]:
        model = make_net()
        return model, DDP(model, bucket_cap_mb=0.001), PostLocalSGDState(None, subgroup, warmup)

    models: dict[str, nn.Module] = {}
    ddps: dict[str, DDP] = {}
    opts: dict[str, Any] = {}
    for key in "ABCDE":
        models[key], ddps[key], state = ddp_model()
        if key == "A":
            opts[key] = register_optimizer_hook(
                ddps[key], pureopt.adamw(lr=LR, weight_decay=0.1), post_localSGD_hook, state
            )
            continue
        ddps[key].register_comm_hook(state, post_localSGD_hook)
        params = models[key].parameters()
        local = (
            torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
            if key in "BD"
            else TorchOptimizer(params, pureopt.adamw, lr=LR, weight_decay=0.1)
        )
        averager = (
            PeriodicModelAverager(period=period, warmup_steps=warmup)
            if key in "BC"
            # every 2 steps within groups of 1 (a no-op), every 4 steps across both ranks
            else HierarchicalModelAverager(collections.OrderedDict([(2, 1), (4, 2)]), warmup_steps=warmup)
        )
        opts[key] = PostLocalSGDOptimizer(local, averager)
    average = periodic_average(period, warmup_steps=warmup)
    trajectories: dict[str, list[list[torch.Tensor]]] = {key: [] for key in models}
    averaged: list[bool] = []
    for step in range(STEPS):
        x, y = local_batch(step, rank)
        for key in "ABCDE":
            ddps[key].zero_grad(set_to_none=True)
            loss_fn(ddps[key](x), y).backward()
            if key == "A":
                averaged.append(average(models[key], step))
            else:
                opts[key].step()
            trajectories[key].append(snapshot(models[key]))
    # PostLocalSGDOptimizer's checkpoint (optimizer state + the averager's step) with a TorchOptimizer inside
    saved = opts["C"].state_dict()
    fresh = make_net()
    reloaded = PostLocalSGDOptimizer(
        TorchOptimizer(fresh.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1),
        PeriodicModelAverager(period=period, warmup_steps=warmup),
    )
    reloaded.load_state_dict(copy.deepcopy(saved))
    return {
        "trajectories": trajectories,
        "averaged": averaged,
        "saved": copy.deepcopy(saved),
        "reloaded": copy.deepcopy(reloaded.state_dict()),
        "reloaded_averager_step": reloaded.averager.step,
        "warmup": warmup,
        "period": period,
    }


FAULT_STEPS, FAULT_SAVE_EVERY, FAULT_CRASH_STEP = 8, 2, 4


def _fault_training(rank: int, out: Path, mode: str) -> dict[str, Any]:
    """float32 training with register_optimizer_hook and a schedule; ``mode``: full, crash or resume.

    ``crash``: rank 0 writes a checkpoint (atomically) every 2 steps; rank 1 kills itself with SIGKILL in the
    middle of step 4's backward pass (after some buckets of that step were reduced and stepped). ``resume``: a new
    job loads the newest checkpoint on every rank and trains to the end.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_net(torch.float32)
    ckpt_dir = out / "checkpoints"
    start = 0
    checkpoint = None
    if mode == "resume":
        newest = max(ckpt_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        checkpoint = torch.load(newest, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        start = checkpoint["step"]
    ddp = DDP(model, bucket_cap_mb=0.001)
    tx = pureopt.adamw(lr=pureopt.schedules.cosine_decay(1e-2, decay_steps=FAULT_STEPS), weight_decay=0.1)
    opt = register_optimizer_hook(ddp, tx)
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["optim"])
    step_now = [start]
    if mode == "crash" and rank == 1:

        def die(param: torch.Tensor) -> None:
            if step_now[0] == FAULT_CRASH_STEP:
                # wait (bounded) for rank 0's checkpoint of the step before, so that the test knows which one is newest
                deadline = time.monotonic() + 30.0
                while not (ckpt_dir / f"step-{FAULT_CRASH_STEP}.pt").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        model.fc1.weight.register_post_accumulate_grad_hook(die)  # the last gradient of the backward pass
    for step in range(start, FAULT_STEPS):
        step_now[0] = step
        x, y = shard(step, rank, torch.float32)
        ddp.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        if mode == "crash" and rank == 0 and (step + 1) % FAULT_SAVE_EVERY == 0:
            ckpt_dir.mkdir(exist_ok=True)
            tmp = ckpt_dir / f".step-{step + 1}.tmp"
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt_dir / f"step-{step + 1}.pt")
    return {"params": snapshot(model), "optim": copy.deepcopy(opt.state_dict()), "start": start}


def _scenario_fault(rank: int, world: int, out: Path, mode: str) -> dict[str, Any]:
    return _fault_training(rank, out, mode)


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {"hooks": _scenario_hooks, "fault": _scenario_fault}


def _rank_main(scenario: str, rank: int, port: int, out: str, args: tuple[str, ...], log: str) -> None:
    """A rank process: its output goes to ``log``; its result is saved under ``out``."""
    with joined_group(rank, port, log):
        result = SCENARIOS[scenario](rank, WORLD, Path(out), *args)
        torch.save(result, Path(out) / f"{scenario}-{'-'.join(args)}-rank{rank}.pt")


# --- the test-process side: launching ranks ---------------------------------------------------------------------

# Rank processes are forked from a forkserver (a clean single-threaded process that has imported torch and pureopt
# once), so a launch costs no interpreter start-up and no imports.
_MP = multiprocessing.get_context("forkserver")
_MP.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.parallel", "pureopt", "pureopt.adapters.ddp"])


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def launch(
    scenario: str, out: Path, *args: str, timeout: float = 150.0, killed_rank: int | None = None
) -> list[dict[str, Any] | None]:
    """Run ``scenario`` on 2 rank processes; return each rank's saved result (None for a rank that died).

    Fails with the ranks' logs if a rank exits with an error or does not finish within ``timeout`` seconds.
    ``killed_rank``: that rank is expected to die by SIGKILL; the others are then given 15 s to exit (their
    collectives fail or block) and are killed.
    """
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs = [out / f"{scenario}-{'-'.join(args)}-rank{rank}.log" for rank in range(WORLD)]
    procs = [
        _MP.Process(target=_rank_main, args=(scenario, rank, port, str(out), args, str(logs[rank])), daemon=True)
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()

    def logs_text() -> str:
        return "\n".join(f"--- rank {r} ---\n{_tail(logs[r])}" for r in range(WORLD))

    deadline = time.monotonic() + timeout
    try:
        while any(p.exitcode is None for p in procs):
            now = time.monotonic()
            if killed_rank is not None and procs[killed_rank].exitcode is not None:
                deadline = min(deadline, now + 15.0)
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r != killed_rank]
            if failed and killed_rank is None:
                time.sleep(2.0)  # let the others report their side, then stop them
                break
            if now > deadline:
                if killed_rank is None:
                    hung = [r for r, p in enumerate(procs) if p.exitcode is None]
                    raise AssertionError(
                        f"rank(s) {hung} of {scenario} did not finish in {timeout:.0f} s:\n{logs_text()}"
                    )
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join(timeout=30)
    codes = [p.exitcode for p in procs]
    for rank, code in enumerate(codes):
        if rank == killed_rank:
            assert code == -signal.SIGKILL, f"rank {rank} should have been killed, exit code {code}:\n{logs_text()}"
        elif killed_rank is None:
            assert code == 0, f"rank {rank} of {scenario} exited with {code}:\n{logs_text()}"
    results: list[dict[str, Any] | None] = []
    for rank in range(WORLD):
        path = out / f"{scenario}-{'-'.join(args)}-rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() and codes[rank] == 0 else None)
    return results


@pytest.fixture(scope="module")
def hooks_job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    results = launch("hooks", tmp_path_factory.mktemp("ddp-hooks"))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def reference_trajectory(kind: str, loss_scale: float = 1.0) -> list[list[torch.Tensor]]:
    """torch.optim on the concatenated batch in this process."""
    model = make_net()
    opt = torch_optimizer(kind, model.parameters())
    out = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = torch_lr(kind, step)
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        (loss_scale * loss_fn(model(x), y)).backward()
        opt.step()
        out.append(snapshot(model))
    return out


def assert_trajectories_close(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]], **tol: float) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, msg=lambda m, s=step, i=i: f"step {s}, parameter {i}: {m}", **tol)


def assert_ranks_identical(results: list[dict[str, Any]], get: Callable[[dict[str, Any]], list[torch.Tensor]]) -> None:
    for i, (a, b) in enumerate(zip(get(results[0]), get(results[1]))):
        assert torch.equal(a, b), f"parameter {i} differs between the ranks"


# --- register_optimizer_hook ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c[0] for c in HOOK_CONFIGS if c[3] is None])
def test_optimizer_hook_equals_torch_optim_on_the_whole_batch(hooks_job: list[dict[str, Any]], name: str) -> None:
    kind = next(c[2] for c in HOOK_CONFIGS if c[0] == name)
    # accumulating two half-shard means sums them: twice the mean over the shard
    want = reference_trajectory(kind, loss_scale=2.0 if name == "adamw-no-sync-accumulation" else 1.0)
    for rank in range(WORLD):
        res = hooks_job[rank][name]
        assert res["num_buckets"] > 1, "the test should exercise several buckets"
        assert_trajectories_close(res["trajectory"], want, rtol=RTOL64, atol=ATOL64)
    for step in range(STEPS):
        assert_ranks_identical(hooks_job, lambda r, s=step: r[name]["trajectory"][s])
    # one optimizer step per iteration: the update counter (what schedules read) and every per-parameter step
    sd = hooks_job[0][name]["state_dict"]
    assert int(sd["pureopt"]["groups"][0]["globals"]["num_updates"]) == STEPS
    assert sorted(sd["state"]) == list(range(6))
    if "step" in sd["state"][0]:
        assert all(float(entry["step"]) == STEPS for entry in sd["state"].values())


def test_optimizer_hook_with_flat_buffers_follows_the_buckets(hooks_job: list[dict[str, Any]]) -> None:
    """flat=True: one flat buffer per DDP bucket, stepped on the reduced bucket in place (no gradient copy); the
    trajectories are checked against torch.optim by the test above."""
    for name in ("adamw-flat", "sgd-momentum-flat-bucket-view"):
        for rank in range(WORLD):
            res = hooks_job[rank][name]
            assert len(res["flat_groups"]) == res["num_buckets"] > 1
            assert sorted(i for group in res["flat_groups"] for i in group) == list(range(6))
            assert res["flat_grad_copies"] is False, "a bucket's gradients were copied instead of read in place"


def test_optimizer_hook_leaves_the_reduced_gradients_in_grad(hooks_job: list[dict[str, Any]]) -> None:
    """After backward ``.grad`` holds the averaged gradient (the optimizer only reads it), as with plain DDP."""
    for name in ("adamw", "adamw-bucket-view"):
        model = make_net()
        state = hooks_job[0][name]["trajectory"][STEPS - 2]
        with torch.no_grad():
            for p, v in zip(model.parameters(), state):
                p.copy_(v)
        x, y = global_batch(STEPS - 1)
        loss_fn(model(x), y).backward()
        for rank in range(WORLD):
            for g, p in zip(hooks_job[rank][name]["grads"], model.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=RTOL64, atol=ATOL64)


def test_optimizer_hook_with_fp16_compression(hooks_job: list[dict[str, Any]]) -> None:
    """fp16_compress_hook: the exact reference is met only to float16 precision; torch.optim fed the same
    compressed gradients (DDP + fp16_compress_hook + AdamW in the same rank) is met to float64 precision.

    The hook rounds every gradient to float16 (11 significant bits: relative error up to 2**-11, more near float16's
    subnormal range) before averaging. Adam normalises each step to about lr, so a relative gradient error e moves a
    parameter by about lr * e per step: 10 steps stay within 10 * lr * 2**-10 (measured: 3.6e-5, against 1.5e-4).
    """
    name = "adamw-fp16-compress"
    want = reference_trajectory("adamw")
    for rank in range(WORLD):
        res = hooks_job[rank][name]
        assert_trajectories_close(res["trajectory"], want, rtol=0.0, atol=STEPS * LR * 2**-10)
        assert_trajectories_close(res["trajectory"], res["twin"], rtol=RTOL64, atol=ATOL64)
    for step in range(STEPS):
        assert_ranks_identical(hooks_job, lambda r, s=step: r[name]["trajectory"][s])
    # the compression is real: the result is not the exact one
    assert any(
        not torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(hooks_job[0][name]["trajectory"][-1], want[-1])
    )


def test_optimizer_hook_cannot_be_registered_twice(hooks_job: list[dict[str, Any]]) -> None:
    message = hooks_job[0]["adamw"]["second_registration"]
    assert "only be called once" in message, message


@pytest.mark.parametrize("bucket_view", [False, True])
def test_optimizer_hook_with_unused_parameters_matches_ddp_with_torch_optim(
    hooks_job: list[dict[str, Any]], bucket_view: bool
) -> None:
    """find_unused_parameters: a layer only rank 0 uses is stepped with the reduced gradient on both ranks; a
    layer no rank uses is not stepped at all (its ``.grad`` stays None), as with torch.optim after DDP."""
    for rank in range(WORLD):
        res = hooks_job[rank]["unused"][f"bucket_view={bucket_view}"]
        assert_trajectories_close(res["mine"], res["ref"], rtol=RTOL64, atol=ATOL64)
        for mine, ref in zip(res["grads"], res["ref_grads"]):
            for g, r in zip(mine, ref):
                assert (g is None) == (r is None)
                if g is not None:
                    torch.testing.assert_close(g, r, rtol=RTOL64, atol=ATOL64)
        names = res["names"]
        for i, name in enumerate(names):
            if name.startswith("never_used"):
                assert torch.equal(res["mine"][-1][i], res["initial"][i]), name
                assert i not in res["state_ids"], f"{name} has optimizer state"
            if name.startswith("rank0_only"):
                assert not torch.equal(res["mine"][-1][i], res["initial"][i]), name
                assert i in res["state_ids"]
    for step in range(6):
        assert_ranks_identical(hooks_job, lambda r, s=step: r["unused"][f"bucket_view={bucket_view}"]["mine"][s])


def test_register_optimizer_hook_rejects_bad_input_before_registering(hooks_job: list[dict[str, Any]]) -> None:
    model = make_net()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_optimizer_hook(model, pureopt.adamw())  # type: ignore[arg-type]
    not_a_tx, not_a_hook, not_a_group = hooks_job[0]["bad_input"]
    assert "must be a GradientTransformation" in not_a_tx
    assert "comm_hook must be a DDP communication hook" in not_a_hook
    assert "process group" in not_a_group


# --- post-local SGD ---------------------------------------------------------------------------------------------


def _in_sync(results: list[dict[str, Any]], key: str, step: int) -> bool:
    a = results[0]["post_local"]["trajectories"][key][step]
    b = results[1]["post_local"]["trajectories"][key][step]
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_periodic_average_with_post_local_sgd_hook(hooks_job: list[dict[str, Any]]) -> None:
    """register_optimizer_hook(post_localSGD_hook) + periodic_average equals torch's DDP + post_localSGD_hook +
    PostLocalSGDOptimizer(AdamW, PeriodicModelAverager); the ranks agree bitwise exactly during warm-up and right
    after each averaging, and differ in between (each rank sees different data)."""
    res = hooks_job[0]["post_local"]
    warmup, period = res["warmup"], res["period"]
    due = [s >= warmup and (s - warmup) % period == 0 for s in range(STEPS)]
    for rank in range(WORLD):
        pl = hooks_job[rank]["post_local"]
        assert pl["averaged"] == due
        assert_trajectories_close(pl["trajectories"]["A"], pl["trajectories"]["B"], rtol=RTOL64, atol=ATOL64)
    assert due.count(True) == 3
    for step in range(STEPS):
        expected = step < warmup or due[step]
        assert _in_sync(hooks_job, "A", step) == expected, f"step {step}"
        assert _in_sync(hooks_job, "B", step) == expected, f"step {step} (torch)"


def test_torch_optimizer_inside_post_local_sgd_optimizer(hooks_job: list[dict[str, Any]]) -> None:
    """TorchOptimizer(pureopt.adamw) inside torch's PostLocalSGDOptimizer equals torch.optim.AdamW inside it, step
    for step, with PeriodicModelAverager (C vs B) and HierarchicalModelAverager (E vs D)."""
    warmup = hooks_job[0]["post_local"]["warmup"]
    for rank in range(WORLD):
        t = hooks_job[rank]["post_local"]["trajectories"]
        assert_trajectories_close(t["C"], t["B"], rtol=RTOL64, atol=ATOL64)
        assert_trajectories_close(t["E"], t["D"], rtol=RTOL64, atol=ATOL64)
    for step in range(STEPS):
        # hierarchical {2: 1, 4: 2}: only the 4-step level spans both ranks
        expected = step < warmup or step % 4 == 0
        assert _in_sync(hooks_job, "E", step) == expected, f"step {step}"
        assert _in_sync(hooks_job, "D", step) == expected, f"step {step} (torch)"


def test_post_local_sgd_optimizer_checkpoint_with_torch_optimizer(hooks_job: list[dict[str, Any]]) -> None:
    res = hooks_job[0]["post_local"]
    saved, reloaded = res["saved"], res["reloaded"]
    assert saved["step"] == STEPS and res["reloaded_averager_step"] == STEPS
    assert saved["state"].keys() == reloaded["state"].keys()
    for pid, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, reloaded["state"][pid][key]), (pid, key)


# --- checkpoint, kill, resume -----------------------------------------------------------------------------------


def test_killed_job_resumes_bitwise_identical(hooks_job: list[dict[str, Any]], tmp_path: Path) -> None:
    """A 2-rank job checkpoints every 2 steps; rank 1 is SIGKILLed in the middle of a backward pass (rank 0 has
    stepped some buckets of that step); a new job resumes from the newest checkpoint and ends bitwise identical
    (parameters and optimizer state) to the uninterrupted run."""
    launch("fault", tmp_path, "crash", killed_rank=1)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert checkpoints, "no checkpoint was written before the crash"
    resumed = launch("fault", tmp_path, "resume")
    full = [r["fault_reference"] for r in hooks_job]
    for rank in range(WORLD):
        res = resumed[rank]
        assert res is not None and res["start"] == FAULT_CRASH_STEP  # the newest checkpoint, written before the crash
        for i, (a, b) in enumerate(zip(res["params"], full[rank]["params"])):
            assert a.dtype == torch.float32 and torch.equal(a, b), f"rank {rank}, parameter {i}"
        _assert_state_dicts_equal(res["optim"], full[rank]["optim"])
    assert_ranks_identical(resumed, lambda r: r["params"])  # type: ignore[arg-type, index]


def _assert_state_dicts_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_state_dicts_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_dicts_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


# --- examples/ddp_train.py under torchrun -----------------------------------------------------------------------


def _torchrun(*args: str, timeout: float = 180.0) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "--monitor-interval",
        "0.1",
        str(ROOT / "examples" / "ddp_train.py"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun {' '.join(args)} did not finish in {timeout:.0f} s") from e
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("ddp_train_example", ROOT / "examples" / "ddp_train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_ddp_train_runs_under_torchrun_and_resumes(tmp_path: Path) -> None:
    """3 steps, then a new job resumes to step 6; compared with the same 6 steps in this process on whole batches.

    The reference averages the loss over the global batch while DDP averages the two ranks' half-batch gradients:
    the gradients agree to float32 rounding, hence the tolerance. (Bitwise resume is tested above.)
    """
    part, resumed = tmp_path / "part.pt", tmp_path / "resumed.pt"
    out = _torchrun("--steps", "3", "--log-every", "1", "--save", str(part))
    assert [int(m) for m in re.findall(r"step\s+(\d+)\s+loss", out)] == [1, 2, 3], out  # rank 0 prints, not rank 1
    out = _torchrun("--steps", "6", "--log-every", "2", "--resume", str(part), "--save", str(resumed))
    assert "resumed from" in out and re.findall(r"step\s+(\d+)\s+loss", out) == ["4", "6"], out
    checkpoint = torch.load(resumed, weights_only=True)
    assert checkpoint["step"] == 6

    example = _load_example()
    model = example.make_model(0)
    schedule = pureopt.schedules.warmup_cosine_decay(init_value=0.0, peak_value=3e-3, warmup_steps=10, decay_steps=1000)
    opt = FunctionalOptimizer(list(model.parameters()), pureopt.adamw(lr=schedule, weight_decay=0.01))
    for step in range(6):
        shards = [example.batch(0, step, 64, r, WORLD) for r in range(WORLD)]
        x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step([p.grad for p in model.parameters()])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            checkpoint["model"][name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert int(checkpoint["optim"]["pureopt"]["groups"][0]["globals"]["num_updates"]) == 6


# --- optimizer_in_backward (one process) ------------------------------------------------------------------------


def test_optimizer_in_backward_equals_torch_optim_step_for_step() -> None:
    model, ref = make_net(), make_net()
    handle = optimizer_in_backward(model, pureopt.adamw(lr=pureopt.schedules.step_lr(LR, 3, 0.5), weight_decay=0.1))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        for group in ref_opt.param_groups:
            group["lr"] = torch_lr("adamw-schedule", step)
        x, y = global_batch(step)
        loss_fn(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters()), "gradients should be freed in backward"
        ref_opt.zero_grad(set_to_none=True)
        loss_fn(ref(x), y).backward()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=RTOL64, atol=ATOL64)
    sd = handle.state_dict()
    assert int(sd["pureopt"]["groups"][0]["globals"]["num_updates"]) == STEPS  # one step per backward


def test_optimizer_in_backward_checkpoint_and_remove() -> None:
    model = make_net()
    handle = optimizer_in_backward(model, pureopt.adamw(lr=LR))
    assert isinstance(handle, OptimizerInBackward) and isinstance(handle.optimizer, FunctionalOptimizer)
    for step in range(3):
        loss_fn(model(global_batch(step)[0]), global_batch(step)[1]).backward()
    saved = copy.deepcopy(handle.state_dict())
    twin = make_net()
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    twin_handle = optimizer_in_backward(twin, pureopt.adamw(lr=LR))
    twin_handle.load_state_dict(saved)
    for step in range(3, 5):
        x, y = global_batch(step)
        loss_fn(model(x), y).backward()
        loss_fn(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    _assert_state_dicts_equal(twin_handle.state_dict(), handle.state_dict())

    handle.remove()
    assert handle.removed
    before = snapshot(model)
    loss_fn(model(global_batch(0)[0]), global_batch(0)[1]).backward()
    assert all(p.grad is not None for p in model.parameters())  # plain autograd again
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_optimizer_in_backward_steps_a_shared_parameter_once_per_backward() -> None:
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    ref = w.detach().clone().requires_grad_(True)
    optimizer_in_backward([w], pureopt.sgd(lr=0.1, momentum=0.9))
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    x = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(3):
        (x @ w @ w).sum().backward()  # w is used twice: its gradient is accumulated once, then stepped once
        ref_opt.zero_grad()
        (x @ ref @ ref).sum().backward()
        ref_opt.step()
        torch.testing.assert_close(w, ref, rtol=RTOL64, atol=ATOL64)
        assert w.grad is None


def test_optimizer_in_backward_rejects_bad_input_before_registering() -> None:
    frozen = torch.zeros(3, requires_grad=False)
    live = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not require grad"):
        optimizer_in_backward([live, frozen], pureopt.sgd(lr=0.1))
    (live * 2).sum().backward()
    assert live.grad is not None  # no hook was left on the first parameter
    with pytest.raises(ValueError, match="not a leaf"):
        optimizer_in_backward([live * 2], pureopt.sgd(lr=0.1))
    with pytest.raises(ValueError, match="more than once"):
        optimizer_in_backward([live, live], pureopt.sgd(lr=0.1))
    with pytest.raises(ValueError, match="no parameters"):
        optimizer_in_backward([], pureopt.sgd(lr=0.1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        optimizer_in_backward([live], pureopt.sgd)  # type: ignore[arg-type]


# --- periodic_average without a process group -------------------------------------------------------------------


def test_periodic_average_schedule_and_validation() -> None:
    average = periodic_average(4, warmup_steps=6)
    assert isinstance(average, PeriodicAverager)
    assert [s for s in range(20) if average.is_due(s)] == [6, 10, 14, 18]
    assert [s for s in range(5) if periodic_average(2).is_due(torch.tensor(s))] == [0, 2, 4]
    assert average([], 6) is False  # nothing to average: no collective
    with pytest.raises(ValueError, match=re.escape("Arg ``period`` must be a positive value.")):
        periodic_average(0)
    with pytest.raises(ValueError, match=re.escape("Arg ``warmup_steps`` must be a non-negative number.")):
        periodic_average(2, warmup_steps=-1)
    with pytest.raises(TypeError, match="integer"):
        periodic_average(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        average.is_due(-1)
    with pytest.raises(TypeError, match="integer"):
        average.is_due(torch.tensor(1.0))
