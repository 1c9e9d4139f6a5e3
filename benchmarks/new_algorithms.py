"""Time the donated step of ADOPT, LaProp, MADGRAD and MARS against their reference implementations' own step.

Rows per parameter set (``benchmarks/step.py``'s sets: small, medium, many-small; fp32 on the CPU) and algorithm:

  pureopt-donated        state = pureopt.inplace_step(tx, grads, state, params): the kernels update the parameters
                         and the state in place (what the stateful adapters run)
  pureopt-TorchOptimizer pureopt.TorchOptimizer(params, pureopt.<algo>, ...).step() with ``p.grad`` set
  pureopt-flat           the same with ``flat=True``, ``p.grad`` views of its flat gradient buffer (one kernel call
                         per group for elementwise algorithms; per tensor, inside the buffers, for the others)
  ref                    the reference's ``optimizer.step()`` with its default path (pytorch-optimizer: ``foreach``
                         where it supports the group; the ``madgrad`` package: its per-parameter loop)
  ref-per-param          pytorch-optimizer's class with ``foreach=False`` (its per-parameter loop)

Each implementation takes one step per round in a shuffled order (interleaved, so that machine noise hits all of
them alike); the median and quartiles over the timed rounds are reported, and the ratio of each median to the
fastest reference row of the same algorithm and set. Hyperparameters are each reference's defaults.

    python benchmarks/new_algorithms.py                                  # all sets and algorithms
    python benchmarks/new_algorithms.py --quick                          # a smoke run
    python benchmarks/new_algorithms.py --json benchmarks/results/new-algorithms.json
    python benchmarks/new_algorithms.py --clock cpu --threads 1    # CPU time of one thread: on a loaded machine
    python benchmarks/new_algorithms.py --algos adamp,sgdp,came,sophia_g,prodigy,dadapt_adam,dadapt_sgd,dog
                                         # AdamP, SGDP, CAME, Sophia-G, Prodigy, D-Adaptation, DoG (their authors'
                                         # packages' ``step`` as the reference)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import param_shapes

import pureopt

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _references() -> dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Factory]]]:
    """algo -> (pureopt factory, its keyword arguments, reference rows)."""
    import madgrad
    import pytorch_optimizer as pto

    return {
        "adopt": (
            pureopt.adopt,
            dict(lr=1e-3),
            {
                "ref": lambda ps: pto.ADOPT(ps, lr=1e-3),
                "ref-per-param": lambda ps: pto.ADOPT(ps, lr=1e-3, foreach=False),
            },
        ),
        "laprop": (
            pureopt.laprop,
            dict(lr=4e-4),
            {
                "ref": lambda ps: pto.LaProp(ps, lr=4e-4),
                "ref-per-param": lambda ps: pto.LaProp(ps, lr=4e-4, foreach=False),
            },
        ),
        "madgrad": (
            pureopt.madgrad,
            dict(lr=1e-2),
            {
                "ref": lambda ps: madgrad.MADGRAD(ps, lr=1e-2),
                "ref-pytorch-optimizer": lambda ps: pto.MADGRAD(ps, lr=1e-2),
            },
        ),
        "mars": (
            pureopt.mars,
            dict(lr=3e-3),
            {"ref": lambda ps: pto.MARS(ps, lr=3e-3), "ref-per-param": lambda ps: pto.MARS(ps, lr=3e-3, foreach=False)},
        ),
    }


def _global_references() -> dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Factory]]]:
    """AdamP, SGDP, CAME, Sophia-G, Prodigy, D-Adaptation and DoG against their authors' packages (the reference's
    defaults; ``lr`` where it has none). Sophia-G is timed on its ordinary steps (no Hessian estimate given)."""
    import adamp
    import came_pytorch
    import dadaptation
    import dog
    import prodigyopt
    import sophia_opt

    return {
        "adamp": (pureopt.adamp, dict(lr=1e-3), {"ref": lambda ps: adamp.AdamP(ps, lr=1e-3)}),
        "sgdp": (pureopt.sgdp, dict(lr=0.1), {"ref": lambda ps: adamp.SGDP(ps, lr=0.1)}),
        "came": (pureopt.came, dict(lr=2e-4), {"ref": lambda ps: came_pytorch.CAME(ps, lr=2e-4)}),
        "sophia_g": (pureopt.sophia_g, dict(lr=1e-4), {"ref": lambda ps: sophia_opt.SophiaG(ps, lr=1e-4)}),
        "prodigy": (pureopt.prodigy, dict(lr=1.0), {"ref": lambda ps: prodigyopt.Prodigy(ps, lr=1.0)}),
        "dadapt_adam": (pureopt.dadapt_adam, dict(lr=1.0), {"ref": lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0)}),
        "dadapt_sgd": (pureopt.dadapt_sgd, dict(lr=1.0), {"ref": lambda ps: dadaptation.DAdaptSGD(ps, lr=1.0)}),
        "dog": (pureopt.dog, dict(lr=1.0), {"ref": lambda ps: dog.DoG(ps, lr=1.0)}),
    }


GLOBAL_ALGOS = "adamp,sgdp,came,sophia_g,prodigy,dadapt_adam,dadapt_sgd,dog"


def _tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def runners(algo: str, shapes: list[tuple[int, ...]]) -> dict[str, Callable[[], None]]:
    factory, kwargs, refs = (_global_references() if algo in GLOBAL_ALGOS.split(",") else _references())[algo]
    grads = _tensors(shapes, seed=1)
    grads = [g * 1e-2 for g in grads]
    out: dict[str, Callable[[], None]] = {}

    params = {str(i): t for i, t in enumerate(_tensors(shapes, seed=0))}
    tx = factory(**kwargs)
    box = {"state": tx.init(params)}
    grad_tree = {str(i): g for i, g in enumerate(grads)}

    def donated() -> None:
        box["state"] = pureopt.inplace_step(tx, grad_tree, box["state"], params)

    out["pureopt-donated"] = donated

    def with_grads(make: Factory) -> Callable[[], None]:
        ps = [torch.nn.Parameter(t) for t in _tensors(shapes, seed=0)]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = make(ps)
        return lambda: opt.step()

    out["pureopt-TorchOptimizer"] = with_grads(lambda ps: pureopt.TorchOptimizer(ps, factory, **kwargs))

    flat_params = [torch.nn.Parameter(t) for t in _tensors(shapes, seed=0)]
    flat_opt = pureopt.TorchOptimizer(flat_params, factory, flat=True, **kwargs)
    flat_opt.zero_grad(set_to_none=False)  # p.grad: views of the group's flat gradient buffer
    for p, g in zip(flat_params, grads):
        p.grad.copy_(g)
    out["pureopt-flat"] = lambda: flat_opt.step()
    for label, make in refs.items():
        out[label] = with_grads(make)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time (all its threads), which other processes' load on a
shared machine inflates far less (a step's cache misses and memory stalls still count; time waiting for a core
does not)."""


def bench(
    algo: str, set_name: str, scale: float, rounds: int, warmup: int, clock: str = "wall"
) -> list[dict[str, Any]]:
    shapes = param_shapes(set_name, scale)
    fns = runners(algo, shapes)
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    now = CLOCKS[clock]
    with torch.no_grad():
        for r in range(warmup + rounds):
            order = list(fns)
            rng.shuffle(order)
            for label in order:
                t = now()
                fns[label]()
                if r >= warmup:
                    times[label].append(now() - t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    best_ref = min(v for k, v in medians.items() if k.startswith("ref"))
    rows = []
    for label, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        rows.append(
            {
                "set": set_name,
                "tensors": len(shapes),
                "params": sum(math.prod(s) for s in shapes),
                "algo": algo,
                "impl": label,
                "median_ms": medians[label] * 1e3,
                "p25_ms": q[0] * 1e3,
                "p75_ms": q[2] * 1e3,
                "ratio_to_best_ref": medians[label] / best_ref,
                "clock": clock,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="small,medium,many-small")
    parser.add_argument("--algos", default="adopt,laprop,madgrad,mars")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply tensor sizes (smoke runs)")
    parser.add_argument("--quick", action="store_true", help="--scale 0.01 --rounds 3 --warmup 1")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="what a timing measures")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.scale, args.rounds, args.warmup = 0.01, 3, 1
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    rows: list[dict[str, Any]] = []
    print(f"{'set':<11} {'algo':<8} {'impl':<24} {'median ms':>10} {'p25':>9} {'p75':>9} {'x best ref':>10}")
    for set_name in args.sets.split(","):
        for algo in args.algos.split(","):
            for row in bench(algo, set_name, args.scale, args.rounds, args.warmup, args.clock):
                rows.append(row)
                print(
                    f"{row['set']:<11} {row['algo']:<8} {row['impl']:<24} {row['median_ms']:>10.2f} "
                    f"{row['p25_ms']:>9.2f} {row['p75_ms']:>9.2f} {row['ratio_to_best_ref']:>10.2f}",
                    flush=True,
                )
    info["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
