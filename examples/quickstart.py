"""Quickstart: train a small MLP on two-moons with torch.func and pureopt.adamw.

The model is an ordinary ``nn.Module``; its parameters live in a plain dict, gradients come from
``torch.func.grad`` over ``torch.func.functional_call``, and the optimizer is a pure ``(init, update)`` pair.

    python examples/quickstart.py            # ~10 s on 2 CPU cores
    python examples/quickstart.py --steps 50 # quick smoke run
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

import pureopt


def two_moons(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles, labels 0 and 1."""
    half = n // 2
    t = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([torch.cos(t[:half]), torch.sin(t[:half])], dim=1)
    lower = torch.stack([1 - torch.cos(t[half:]), 0.5 - torch.sin(t[half:])], dim=1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=generator)
    y = torch.cat([torch.zeros(half), torch.ones(n - half)]).long()
    return x, y


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x_train, y_train = two_moons(1024, 0.1, gen)
    x_test, y_test = two_moons(512, 0.1, gen)

    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y)

    schedule = pureopt.schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=50, decay_steps=args.steps)
    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=schedule, weight_decay=1e-4))
    state = tx.init(params)
    grad_fn = grad_and_value(loss_fn)

    batch = 128
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (batch,), generator=gen)
        grads, loss = grad_fn(params, x_train[idx], y_train[idx])
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {float(schedule(step - 1)):.2e}")

    with torch.no_grad():
        test_logits = functional_call(model, params, (x_test,))
        test_loss = nn.functional.cross_entropy(test_logits, y_test).item()
        accuracy = (test_logits.argmax(dim=1) == y_test).float().mean().item()
    print(f"final: test loss {test_loss:.4f}  test accuracy {accuracy:.1%}")
    return {"test_loss": test_loss, "accuracy": accuracy}


if __name__ == "__main__":
    main()
