"""Starting real 2-rank gloo process groups on 127.0.0.1 for a test (the pattern of tests/test_adapters_ddp.py).

``launch(module, function, out, *args)`` forks one process per rank from a forkserver that has imported torch,
torch.distributed and pureopt; each rank joins a gloo group (``tcp://127.0.0.1:<port>``, 60 s timeout), calls
``module.function(rank, world, out, *args)`` and saves its result under ``out``. A rank that fails or does not
finish in ``timeout`` seconds fails the test with the ranks' logs; every process is killed at the end. Garbage
(FSDP/DDP state with reference cycles holding gloo work) is collected before the group is destroyed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2

_MP = multiprocessing.get_context("forkserver")
_MP.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.fsdp", "pureopt"])


def _result_path(out: Path, function: str, rank: int) -> Path:
    return out / f"{function}-rank{rank}.pt"


@contextlib.contextmanager
def joined_group(rank: int, port: int, log: str, world: int = WORLD) -> Iterator[None]:
    """Inside a rank process: output to ``log``, one intra-op thread, a gloo group of ``world`` processes on
    127.0.0.1 (60 s timeout).

    On exit, garbage (DDP reducers and FSDP state sit in reference cycles holding gloo work) is collected while the
    group is still alive, then the group is destroyed.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        gc.collect()
        dist.destroy_process_group()


def _rank_main(
    module: str, function: str, rank: int, port: int, out: str, args: tuple[Any, ...], log: str, world: int
) -> None:
    with joined_group(rank, port, log, world):
        fn = getattr(importlib.import_module(module), function)
        result = fn(rank, world, Path(out), *args)
        torch.save(result, _result_path(Path(out), function, rank))


def assert_trajectory_close(
    got: list[list[torch.Tensor]], want: list[list[torch.Tensor]], what: str = "", *, rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:  # fmt: skip
    """Two runs' parameters after every step (lists of steps of lists of tensors) agree; the message names the step
    and the parameter. The defaults are the fp64 tolerances of the distributed tests."""
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            where = f"{what}: step {step}, parameter {i}"
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, w=where: f"{w}: {m}")


def unsharded_trajectory(
    model: Any, make_opt: Any, batch: Any, loss_fn: Any, steps: int, before: Any = None
) -> list[list[Any]]:
    """The single-process reference: ``steps`` optimizer steps of ``make_opt(params)`` on ``model``, the whole
    ``batch(step)`` each (``before(model, step)`` first, if given); the parameters after every step."""
    opt = make_opt(list(model.parameters()))
    out = []
    for step in range(steps):
        if before is not None:
            before(model, step)
        opt.zero_grad()
        x, y = batch(step)
        loss_fn(model(x), y).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def dcp_save(model: Any, opt: Any, path: Path) -> dict[str, Any]:
    """Inside a rank: the model and optimizer saved with DCP (sharded) through torch's state-dict API; returns the
    optimizer state dict it saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    return optim_sd


def dcp_load(model: Any, opt: Any, path: Path, planner: Any = None) -> None:
    """Inside a rank: a DCP checkpoint of :func:`dcp_save` loaded into ``model`` and ``opt`` (fresh ones), read by
    ``planner`` (DCP's default when ``None``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path), planner=planner)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])


def full_save(model: Any, opt: Any, path: Path) -> None:
    """Inside a rank: the model and optimizer gathered whole onto rank 0's CPU (``full_state_dict``,
    ``cpu_offload``) and saved there with ``torch.save``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"model": model_sd, "optim": optim_sd}, path)
    dist.barrier()


def full_load(model: Any, opt: Any, path: Path) -> None:
    """Inside a rank: a file of :func:`full_save` loaded into ``model`` and ``opt`` (fresh ones).

    On gloo, ``full_state_dict`` + ``cpu_offload`` needs ``broadcast_from_rank0`` (rank 0 alone holds the values),
    or ``set_state_dict`` hangs; model and optimizer are set by two calls, because ``set_state_dict`` skips the
    model on the ranks whose model state dict is empty (and the ranks' collectives then differ)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    loaded = torch.load(path, weights_only=True) if dist.get_rank() == 0 else {"model": {}, "optim": {}}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    set_model_state_dict(model, loaded["model"], options=options)
    set_optimizer_state_dict(model, opt, loaded["optim"], options=options)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def launch(module: str, function: str, out: Path, *args: Any, timeout: float = 240.0, world: int = WORLD) -> list[Any]:
    """Run ``module.function(rank, world, out, *args)`` on ``world`` rank processes (2; 1 to load a 2-rank
    checkpoint at another world size); return each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs = [out / f"{function}-rank{rank}.log" for rank in range(world)]
    procs = [
        _MP.Process(
            target=_rank_main, args=(module, function, rank, port, str(out), args, str(logs[rank]), world), daemon=True
        )
        for rank in range(world)
    ]
    for p in procs:
        p.start()

    def logs_text() -> str:
        return "\n".join(f"--- rank {r} ---\n{_tail(logs[r])}" for r in range(world))

    deadline = time.monotonic() + timeout
    try:
        while any(p.exitcode is None for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2.0)  # let the other rank report its side, then stop it
                break
            if time.monotonic() > deadline:
                hung = [r for r, p in enumerate(procs) if p.exitcode is None]
                raise AssertionError(f"rank(s) {hung} of {function} did not finish in {timeout:.0f} s:\n{logs_text()}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join(timeout=30)
    for rank, p in enumerate(procs):
        assert p.exitcode == 0, f"rank {rank} of {function} exited with {p.exitcode}:\n{logs_text()}"
    return [torch.load(_result_path(out, function, rank), weights_only=False) for rank in range(world)]
