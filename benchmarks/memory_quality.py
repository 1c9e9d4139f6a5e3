"""Training quality with encoded optimizer state and bf16 parameters (issue 16): final loss against fp32 AdamW.

A student MLP learns a fixed random teacher MLP (synthetic regression; fresh inputs every step, nothing
downloaded) with AdamW on the donated path (``pureopt.inplace_step``, as the adapters run it), a warm-up and a
cosine decay of the learning rate. Runs, all from the same initial weights and the same batches:

- ``fp32``: fp32 parameters, fp32 state (the reference);
- ``bf16-state``, ``fp8``, ``q8``, ``q4``: fp32 parameters, both moments stored so (``state_dtype=``);
- ``bf16-params-nearest``: bf16 parameters written with round-to-nearest, fp32 state;
- ``bf16-params-sr``: bf16 parameters written with ``pureopt.stochastic_rounding`` (fp32 state).

The forward pass computes in fp32 from the stored parameters in every run (bf16 ones are cast), so the runs differ
only in how parameters and state are stored. The loss reported is the mean squared error on a fixed held-out set
of teacher inputs, evaluated every ``--eval-every`` steps; "final" is the mean of the last five evaluations.
The learning rate decays to ``lr / 100``: late updates (about ``lr`` per step under Adam) then fall below half a
bf16 gap of typical weights, and round-to-nearest stops moving them.

    python benchmarks/memory_quality.py --plot docs/memory.png --json benchmarks/results/memory_quality.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pureopt

Params = list[torch.Tensor]


def init_mlp(sizes: list[int], gen: torch.Generator, scale: float = 1.0) -> Params:
    """Weights and biases of an MLP (uniform in +-1/sqrt(fan_in), as torch.nn.Linear), fp32."""
    params: Params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = scale / math.sqrt(fan_in)
        params.append((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound)
        params.append((torch.rand(fan_out, generator=gen) * 2 - 1) * bound)
    return params


def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """MLP with GELU hidden layers, computed in fp32 whatever the parameters' dtype."""
    h = x
    n = len(params) // 2
    for i in range(n):
        h = torch.nn.functional.linear(h, params[2 * i].float(), params[2 * i + 1].float())
        if i < n - 1:
            h = torch.nn.functional.gelu(h)
    return h


def make_optimizer(name: str, schedule: Callable[[Any], Any], wd: float) -> tuple[pureopt.GradientTransformation, str]:
    """(transformation, parameter dtype name) for a run."""
    kw: dict[str, Any] = {"lr": schedule, "weight_decay": wd, "betas": (0.9, 0.999)}
    if name == "fp32":
        return pureopt.adamw(**kw), "fp32"
    if name == "bf16-state":
        return pureopt.adamw(**kw, state_dtype=torch.bfloat16), "fp32"
    if name in ("fp8", "q8", "q4"):
        return pureopt.adamw(**kw, state_dtype=name), "fp32"
    if name == "bf16-params-nearest":
        return pureopt.adamw(**kw, state_dtype=torch.float32), "bf16"
    if name == "bf16-params-sr":
        return pureopt.stochastic_rounding(pureopt.adamw(**kw, state_dtype=torch.float32), seed=0), "bf16"
    raise ValueError(name)


RUNS = ["fp32", "bf16-state", "fp8", "q8", "q4", "bf16-params-nearest", "bf16-params-sr"]


def train(name: str, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed)
    teacher = init_mlp([args.dim, *[args.teacher_width] * args.teacher_depth, args.out], gen, scale=2.0)
    student = init_mlp([args.dim, *[args.width] * args.depth, args.out], gen)
    x_eval = torch.randn(args.eval_size, args.dim, generator=gen)
    with torch.no_grad():
        y_eval = forward(teacher, x_eval)
    data = torch.Generator().manual_seed(args.seed + 1)  # same batches in every run

    def lr_at(step: Any) -> Any:
        t = torch.as_tensor(step, dtype=torch.float32)
        warm = torch.clamp(t / args.warmup, max=1.0)
        frac = torch.clamp((t - args.warmup) / max(1, args.steps - args.warmup), 0.0, 1.0)
        floor = 0.01
        return args.lr * warm * (floor + (1 - floor) * 0.5 * (1 + torch.cos(math.pi * frac)))

    tx, pdtype = make_optimizer(name, lr_at, args.wd)
    params = [p.to(torch.bfloat16 if pdtype == "bf16" else torch.float32).requires_grad_(True) for p in student]
    state = tx.init([p.detach() for p in params])
    evals: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, args.dim, generator=data)
        with torch.no_grad():
            y = forward(teacher, x)
        loss = torch.nn.functional.mse_loss(forward(params, x), y)
        grads = torch.autograd.grad(loss, params)
        state = pureopt.inplace_step(tx, list(grads), state, [p.detach() for p in params])
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                evals.append((step, torch.nn.functional.mse_loss(forward(params, x_eval), y_eval).item()))
    seconds = time.perf_counter() - t0
    final = sum(v for _, v in evals[-5:]) / len(evals[-5:])
    print(f"  {name:22s} final eval loss {final:.5f}  ({seconds:.0f} s)", flush=True)
    return {"name": name, "evals": evals, "final": final, "seconds": seconds}


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "fp32": ("black", "-"),
        "bf16-state": ("tab:blue", "--"),
        "fp8": ("tab:purple", "--"),
        "q8": ("tab:green", "-"),
        "q4": ("tab:orange", "-"),
        "bf16-params-nearest": ("tab:red", "-"),
        "bf16-params-sr": ("tab:cyan", ":"),
    }
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = next(r for r in results if r["name"] == "fp32")
    for r in results:
        color, ls = styles.get(r["name"], ("gray", "-"))
        steps = [s for s, _ in r["evals"]]
        ax.plot(steps, [v for _, v in r["evals"]], color=color, ls=ls, lw=1.3, label=f"{r['name']} ({r['final']:.4g})")
        rel = [v / rv for (_, v), (_, rv) in zip(r["evals"], ref["evals"])]
        bx.plot(steps, rel, color=color, ls=ls, lw=1.3, label=r["name"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out MSE (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    bx.axhline(1.0, color="gray", lw=0.8)
    bx.axhline(1.01, color="gray", lw=0.6, ls=":")
    bx.axhline(1.03, color="gray", lw=0.6, ls=":")
    bx.set_ylim(0.9, 1.2)
    bx.set_xlabel("step")
    bx.set_ylabel("loss / fp32 AdamW's loss")
    bx.set_title("relative to fp32 (dotted: +1%, +3%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--out", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--teacher-width", type=int, default=64)
    parser.add_argument("--teacher-depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=4096)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ",".join(RUNS))
    parser.add_argument("--plot", help="save the figure here (needs matplotlib)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    nparams = sum(p.numel() for p in init_mlp([args.dim, *[args.width] * args.depth, args.out], torch.Generator()))
    print(f"student MLP {args.dim}-{'-'.join([str(args.width)] * args.depth)}-{args.out}: {nparams} params; "
          f"{args.steps} steps of batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)  # fmt: skip
    results = [train(name, args) for name in args.runs.split(",")]
    ref = next((r for r in results if r["name"] == "fp32"), None)
    print("\n| run | final held-out MSE | vs fp32 | time s |\n|---|---|---|---|")
    for r in results:
        rel = f"{(r['final'] / ref['final'] - 1) * 100:+.2f}%" if ref else "—"
        print(f"| {r['name']} | {r['final']:.5f} | {rel} | {r['seconds']:.0f} |")
    if args.plot and ref:
        plot(results, args.plot, f"student MLP ({nparams / 1e3:.0f}k params) on a teacher MLP, AdamW, cosine lr")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "params": nparams, "runs": results}) + "\n")


if __name__ == "__main__":
    main()
