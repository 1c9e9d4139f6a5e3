"""Low-memory training: bf16 weights without an fp32 master copy, and 8-bit optimizer state.

A student MLP (bf16 parameters) learns a fixed random teacher MLP with a drop-in ``TorchOptimizer`` whose AdamW keeps
both moments in block-wise 8-bit codes (``state_dtype="q8"``: about 2 bytes per parameter instead of 8) and writes
the bf16 weights with stochastic rounding (``pureopt.stochastic_rounding``: updates smaller than half a bf16 gap
still move the weights on average). The same loop runs with ``torch.optim.AdamW`` on an fp32 copy of the student as
the baseline; the script prints both losses and the optimizer state's bytes per parameter.

    python examples/low_memory.py               # ~20 s on 2 CPU cores
    python examples/low_memory.py --steps 200   # quick smoke run

See docs/memory.md for the encodings, their memory and their accuracy.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

import pureopt
from pureopt.kernels.encoding import stored_bytes


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter optimizer state (step counts aside)."""
    return sum(stored_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, teacher: nn.Module, args: argparse.Namespace) -> float:
    gen = torch.Generator().manual_seed(args.seed + 1)
    dtype = next(model.parameters()).dtype
    test_x = torch.randn(1024, args.dim, generator=torch.Generator().manual_seed(args.seed + 2))
    with torch.no_grad():
        test_y = teacher(test_x)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.dim, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.log_every == 0:
            print(f"  step {step + 1:5d}  train loss {loss.item():.5f}", flush=True)
    with torch.no_grad():
        return nn.functional.mse_loss(model(test_x.to(dtype)).float(), test_y).item()


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    teacher = mlp([args.dim, 64, 64, 4], seed=args.seed + 100)
    sizes = [args.dim, args.width, args.width, 4]

    print("fp32 weights, torch.optim.AdamW (fp32 state):")
    baseline = mlp(sizes, args.seed)
    torch_opt = torch.optim.AdamW(baseline.parameters(), lr=args.lr, weight_decay=0.01)
    fp32_loss = train(baseline, torch_opt, teacher, args)
    n = sum(p.numel() for p in baseline.parameters())

    print("bf16 weights (stochastic rounding), pureopt AdamW with 8-bit state:")
    student = mlp(sizes, args.seed).to(torch.bfloat16)
    tx = pureopt.stochastic_rounding(pureopt.adamw(lr=args.lr, weight_decay=0.01, state_dtype="q8"), seed=args.seed)
    low_opt = pureopt.TorchOptimizer(student.parameters(), tx)
    low_loss = train(student, low_opt, teacher, args)

    results = {
        "fp32_loss": fp32_loss,
        "low_loss": low_loss,
        "fp32_state_bytes_per_param": state_bytes(torch_opt) / n,
        "low_state_bytes_per_param": state_bytes(low_opt) / n,
    }
    print(f"held-out loss: fp32 {fp32_loss:.5f}, bf16 + 8-bit state {low_loss:.5f} "
          f"({(low_loss / fp32_loss - 1) * 100:+.1f}%)")  # fmt: skip
    print(f"optimizer state: {results['fp32_state_bytes_per_param']:.2f} -> "
          f"{results['low_state_bytes_per_param']:.2f} bytes/param ({n} parameters)")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
