"""Sharded training with FSDP2, a pureopt optimizer and torch.distributed.checkpoint (DCP).

Each rank holds a shard of every parameter (``fully_shard``: parameters, gradients and optimizer state are
``DTensor``s). ``TorchOptimizer`` steps the local shards with torch's fused AdamW kernel; its learning rate follows
a warm-up + cosine schedule read at the optimizer's update counter, which the checkpoint carries. Every
``--save-every`` steps the model and optimizer are saved with DCP, sharded (each rank writes its own shards), into
``<checkpoint-dir>/step-<N>``; then rank 0 points ``<checkpoint-dir>/latest`` at it (atomically), so a job killed
while saving resumes from the previous complete checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp_train.py --steps 200                     # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp_train.py --steps 400 --resume            # from <dir>/latest

The data of step ``s`` depends only on ``(seed, s)``, so a resumed run sees the batches the uninterrupted run
would have seen and ends with the same parameters and optimizer state, bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import pureopt
from pureopt.adapters import TorchOptimizer

IN_FEATURES = 16


def make_model(seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(IN_FEATURES, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)]
    return nn.Sequential(*layers).to(dtype)


def make_schedule(args: argparse.Namespace) -> pureopt.schedules.Schedule:
    return pureopt.schedules.warmup_cosine_decay(
        init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup, decay_steps=args.decay_steps
    )


def batch(seed: int, step: int, global_batch: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The global batch of ``step``: a noisy smooth function of the inputs."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(global_batch, IN_FEATURES, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.5 * x[:, 4:5] * x[:, 5:6]
    y = y + 0.05 * torch.randn(global_batch, 1, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    """A sharded DCP checkpoint of ``step``, then (rank 0) the ``latest`` pointer, replaced atomically."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / f"step-{step:06d}"))
    dist.barrier()  # every rank's shards are written
    if rank == 0:
        tmp = directory / "latest.tmp"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, directory / "latest")


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the checkpoint ``latest`` points at into ``model`` and ``optimizer``; returns its step.

    The template comes from ``get_state_dict`` on the new model and optimizer: it asks for every shard and every
    parameter's optimizer state, which ``dcp.load`` fills in place; ``set_state_dict`` puts them in.
    """
    step = int((directory / "latest").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory / f"step-{step:06d}"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return step


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    """The training loop; FSDP's state lives only in here, so that it is freed before ``main`` destroys the group."""
    dtype = getattr(torch, args.dtype)
    model = make_model(args.seed, dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = TorchOptimizer(model.parameters(), pureopt.adamw(lr=make_schedule(args), weight_decay=0.01))
    start = 0
    if args.resume:
        start = load(args.checkpoint_dir, model, optimizer)
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir / f'step-{start:06d}'} at step {start}", flush=True)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    per_rank = args.global_batch // world
    for step in range(start, args.steps):
        x, y = batch(args.seed, step, args.global_batch, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(
            model(x[rank * per_rank : (rank + 1) * per_rank]), y[rank * per_rank : (rank + 1) * per_rank]
        )
        loss.backward()  # FSDP2 reduce-scatters (averages) the gradients: each rank keeps its shard
        optimizer.step()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {done:5d}  loss {mean_loss.item() / world:.6f}", flush=True)
        if args.save_every and done % args.save_every == 0:
            save(args.checkpoint_dir, model, optimizer, done, rank)
    if not args.save_every or args.steps % args.save_every:
        save(args.checkpoint_dir, model, optimizer, max(start, args.steps), rank)
    if rank == 0:
        print(f"saved to {args.checkpoint_dir} at step {max(start, args.steps)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="train until this global step")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps (rank 0)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps of the schedule")
    parser.add_argument("--decay-steps", type=int, default=1000, help="length of the cosine schedule (steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("fsdp_checkpoint"))
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="resume from <checkpoint-dir>/latest")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # torchrun sets RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    try:
        train(args, rank, world)
    finally:
        gc.collect()  # FSDP state sits in reference cycles: free it (and its gloo work) while the group is alive
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
