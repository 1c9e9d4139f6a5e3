"""Data-parallel training with DDP and a pureopt optimizer stepped inside DDP's communication hook.

Each rank trains the same MLP on its shard of every global batch; DDP averages the gradients bucket by bucket and
``register_optimizer_hook`` steps each bucket's parameters with ``pureopt.adamw`` as soon as that bucket's
all-reduce is done, overlapping the optimizer with the rest of the backward pass. There is no ``optimizer.step()``.

    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 200                  # CPU, gloo
    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 400 --resume ddp_checkpoint.pt

The data of step ``s`` depends only on ``(seed, s)``, so a run resumed from a checkpoint sees the batches the
uninterrupted run would have seen and ends with the same parameters and optimizer state, bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pureopt
from pureopt.adapters.ddp import register_optimizer_hook

IN_FEATURES = 16


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(seed: int, step: int, global_batch: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch of ``step``: a noisy smooth function of the inputs."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(global_batch, IN_FEATURES, generator=g)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.5 * x[:, 4:5] * x[:, 5:6]
    y = y + 0.05 * torch.randn(global_batch, 1, generator=g)
    per_rank = global_batch // world
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def save_checkpoint(path: Path, model: nn.Module, optimizer_state: dict, step: int) -> None:
    """Write atomically (a temporary file, then a rename): a crash while saving leaves the old checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optim": optimizer_state, "step": step}, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    """The training loop; DDP and the optimizer hook live only in here, so that they are torn down (their
    gloo work and hook futures released) before ``main`` destroys the process group."""
    model = make_model(args.seed)
    start = 0
    checkpoint = None
    if args.resume is not None:
        # every rank reads the checkpoint; DDP would broadcast rank 0's parameters anyway, but the optimizer
        # state is each rank's own
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        start = int(checkpoint["step"])
    ddp = DistributedDataParallel(model)
    schedule = pureopt.schedules.warmup_cosine_decay(
        init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup, decay_steps=args.decay_steps
    )
    optimizer = register_optimizer_hook(ddp, pureopt.adamw(lr=schedule, weight_decay=0.01))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optim"])
        if rank == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)

    for step in range(start, args.steps):
        x, y = batch(args.seed, step, args.global_batch, rank, world)
        ddp.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # all-reduce + optimizer step, bucket by bucket; parameters are updated on return
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                lr = float(schedule(step))
                print(f"step {done:5d}  loss {mean_loss.item() / world:.6f}  lr {lr:.2e}", flush=True)
        if args.save_every and done % args.save_every == 0 and done != args.steps and rank == 0:
            save_checkpoint(args.save, model, optimizer.state_dict(), done)
    if rank == 0:
        save_checkpoint(args.save, model, optimizer.state_dict(), max(start, args.steps))
        print(f"saved model and optimizer state to {args.save} at step {max(start, args.steps)}", flush=True)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="train until this global step")
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps (rank 0)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps of the schedule")
    parser.add_argument("--decay-steps", type=int, default=1000, help="length of the cosine schedule (steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=Path("ddp_checkpoint.pt"), help="checkpoint written at the end")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # torchrun sets RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
    try:
        train(args, rank, world)
    finally:
        gc.collect()  # DDP's reducer sits in reference cycles: free it (and its gloo work) while the group is alive
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
