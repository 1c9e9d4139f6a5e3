"""Time one optimizer step on a 2-rank FSDP2 model (CPU, gloo), pureopt against torch.optim.

Run: ``python benchmarks/fsdp_step.py [--algo adamw|rmsprop|muon] [--layers 100] [--width 316] [--rounds 30]``.
Each rank shards a stack of ``--layers`` ``nn.Linear(width, width)`` (2 tensors each: ~200 tensors, ~10M
parameters in all) with ``fully_shard``, computes gradients once and then times ``opt.step()`` alone, the
implementations interleaved round by round (shuffled the same way on both ranks); rank 0 reports the median over
the rounds and the ratio to torch's fastest: ``torch.optim.AdamW(fused=True)``, or for ``--algo rmsprop``
(momentum 0.9; torch has no fused RMSprop) ``torch.optim.RMSprop(foreach=True)``. Rows:

  torch-foreach / torch-fused     torch.optim.<Algo>(foreach=True / fused=True) on the DTensor parameters
  pureopt-auto                    TorchOptimizer(..., pureopt.<algo>): the local-shard kernels (fused for AdamW)
  pureopt-foreach                 the same with impl="foreach"
  pureopt-dtensor-loop            the step as it ran before the local-shard path (the per-tensor loop on the
                                  DTensors themselves, with the local-shard path switched off)
  pureopt-flat                    TorchOptimizer(..., flat=True): one kernel call per flat buffer of local shards
                                  (gradients gathered into it: one copy; parameters copied in and back)
  pureopt-flat-views              the same with zero_grad(set_to_none=False): FSDP2 accumulates the gradients
                                  into views of the flat gradient buffer (no gradient copy)

``--algo muon`` times Muon on a transformer-shaped stack of matrices instead (``--layers`` blocks of q, k, v, o
(``width x width``) and an MLP (``4 width x width``, ``width x 4 width``), no biases: 6 matrices per block):

  muon-owner                      pureopt.muon: each matrix gathered on one owner rank, orthogonalised there
                                  (same-shape matrices batched), shards sent back
  muon-all                        pureopt.muon(sharded="all"): every rank gathers every matrix (full_tensor)
                                  and orthogonalises all of them (the naive path)
  torch-muon                      torch.optim.Muon on the DTensor parameters (DTensor's own matmul strategies)

Times are wall-clock medians on a shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pureopt
import pureopt.transforms._util as _util
from pureopt.adapters.torch_optim import TorchOptimizer

LR, WD = 1e-3, 0.01


def build(layers: int, width: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


class Block(nn.Module):
    """A transformer-shaped block of bias-free matrices: q, k, v, o (``d x d``), up (``4d x d``), down."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))
        return x + attn + self.down(torch.relu(self.up(x)))


def build_blocks(blocks: int, d: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(d) for _ in range(blocks)])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model


def _local_off(step, *args):  # type: ignore[no-untyped-def]
    return step(*args)


def rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    try:
        if args.algo == "adamw":
            torch_cls, factory, kw = torch.optim.AdamW, pureopt.adamw, {"lr": LR, "weight_decay": WD}
        else:  # an algorithm without a torch fused kernel
            torch_cls, factory, kw = torch.optim.RMSprop, pureopt.rmsprop, {"lr": LR, "momentum": 0.9}
        makers = {
            "torch-foreach": lambda ps: torch_cls(ps, **kw, foreach=True),
            **({"torch-fused": lambda ps: torch_cls(ps, **kw, fused=True)} if args.algo == "adamw" else {}),
            "pureopt-auto": lambda ps: TorchOptimizer(ps, factory, **kw),
            "pureopt-foreach": lambda ps: TorchOptimizer(ps, factory, **kw, impl="foreach"),
            "pureopt-dtensor-loop": lambda ps: TorchOptimizer(ps, factory, **kw),
            "pureopt-flat": lambda ps: TorchOptimizer(ps, factory, **kw, flat=True),
            "pureopt-flat-views": lambda ps: TorchOptimizer(ps, factory, **kw, flat=True),
        }
        best = "torch-fused" if args.algo == "adamw" else "torch-foreach"
        build_model = build
        if args.algo == "muon":
            muon_kw = {"lr": 0.02, "weight_decay": WD, "momentum": 0.95}
            makers = {
                "muon-owner": lambda ps: TorchOptimizer(ps, pureopt.muon, **muon_kw),
                "muon-all": lambda ps: TorchOptimizer(ps, pureopt.muon, **muon_kw, sharded="all"),
                "torch-muon": lambda ps: torch.optim.Muon(ps, **muon_kw),
            }
            best, build_model = "muon-all", build_blocks
        runs = {}
        for name, make in makers.items():
            model = build_model(args.layers, args.width)
            opt = make(model.parameters())
            opt.zero_grad(set_to_none=name != "pureopt-flat-views")  # flat-views: p.grad views of the buffer
            model(torch.randn(4, args.width)).sum().backward()
            runs[name] = (model, opt)
        n_tensors = len(list(runs[best][0].parameters()))
        n_params = sum(p.numel() for p in runs[best][0].parameters())
        times: dict[str, list[float]] = {name: [] for name in makers}
        order = list(makers)
        rng = random.Random(0)
        original = _util.run_on_local_shards
        failed: dict[str, str] = {}
        for r in range(args.rounds + 3):
            rng.shuffle(order)
            for name in order:
                _util.run_on_local_shards = _local_off if name == "pureopt-dtensor-loop" else original  # type: ignore[assignment]
                opt = runs[name][1]
                if name in failed:
                    continue
                dist.barrier()
                t0 = time.perf_counter()
                try:
                    opt.step()
                except RuntimeError as e:  # the same on both ranks (before any collective of the step)
                    failed[name] = str(e).splitlines()[0][:100]
                    continue
                dt = time.perf_counter() - t0
                if r >= 3:  # warm-up rounds
                    times[name].append(dt)
        _util.run_on_local_shards = original
        if rank == 0:
            ref = statistics.median(times[best])
            print(
                f"{args.algo}, FSDP2, 2 ranks (gloo, CPU, {args.threads} thread(s) each): {n_tensors} tensors, "
                f"{n_params} params"
            )
            print(f"{'implementation':24s} {'median ms':>10s} {'x ' + best:>16s}")
            for name in makers:
                if name in failed:
                    print(f"{name:24s} fails: {failed[name]}")
                    continue
                med = statistics.median(times[name])
                print(f"{name:24s} {med * 1e3:10.2f} {med / ref:16.2f}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--width", type=int, default=316)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algo", choices=["adamw", "rmsprop", "muon"], default="adamw")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    mp.spawn(rank_main, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
