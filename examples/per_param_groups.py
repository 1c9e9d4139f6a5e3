"""Per-parameter options with ``partition``: what torch.optim expresses with param_groups.

The model has a backbone (a "pretrained" input layer, then two hidden blocks with LayerNorm) and a
classification head. The optimizer gives

* the head a 10x larger learning rate than the backbone,
* no weight decay to biases and LayerNorm weights (decoupled weight decay on the matrices only),
* nothing at all to the frozen input layer: ``set_to_zero()`` (no optimizer state is allocated for it).

Labels are computed from the parameter names and shapes by a function, so the same optimizer works for any
model that follows the naming. The script trains on a three-spirals classification task and then reports which
parameters moved; the frozen ones are bitwise unchanged.

    python examples/per_param_groups.py                # 1500 steps; ~10 s on 2 cores
    python examples/per_param_groups.py --steps 200    # quick smoke run
    python examples/per_param_groups.py --save out.pt  # also save the initial and final parameters
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

import pureopt
from pureopt.combine import partition


def spirals(n: int, classes: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` interleaved spiral arms in the plane."""
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.1, 1.0, per)
        t = 1.75 * r * 2 * math.pi + 2 * math.pi * c / classes + noise * torch.randn(per, generator=generator)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], dim=1))
        ys.append(torch.full((per,), c))
    return torch.cat(xs), torch.cat(ys)


class Net(nn.Module):
    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(2, hidden),  # backbone.0: the "pretrained" input layer, frozen
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.Tanh(),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


FROZEN_PREFIX = "backbone.0."


def label(name: str, param: torch.Tensor) -> str:
    """One label per parameter: frozen / backbone or head / with or without weight decay."""
    if name.startswith(FROZEN_PREFIX):
        return "frozen"
    part = "head" if name.startswith("head.") else "backbone"
    return part if param.ndim > 1 else f"{part}_no_decay"  # biases and LayerNorm weights are vectors


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="backbone learning rate (the head gets 10x)")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save initial and final parameters and labels to this file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = spirals(1500, 3, 0.15, gen)
    x_test, y_test = spirals(600, 3, 0.15, gen)
    model = Net(args.hidden, 3)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    initial = {name: p.clone() for name, p in params.items()}

    labels = {name: label(name, p) for name, p in params.items()}
    lr, head_lr, wd = args.lr, 10 * args.lr, args.weight_decay
    tx = pureopt.chain(
        pureopt.clip_by_global_norm(1.0),
        partition(
            {
                "backbone": pureopt.adamw(lr=lr, weight_decay=wd),
                "backbone_no_decay": pureopt.adamw(lr=lr, weight_decay=0.0),
                "head": pureopt.adamw(lr=head_lr, weight_decay=wd),
                "head_no_decay": pureopt.adamw(lr=head_lr, weight_decay=0.0),
                "frozen": pureopt.set_to_zero(),
            },
            lambda p: {name: label(name, v) for name, v in p.items()},
        ),
    )
    state = tx.init(params)
    print("parameter groups:")
    for group in ("backbone", "backbone_no_decay", "head", "head_no_decay", "frozen"):
        print(f"  {group:18s} {', '.join(n for n, g in labels.items() if g == group)}")

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    grad_fn = grad_and_value(loss_fn)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (128,), generator=gen)
        grads, loss = grad_fn(params, x_train[idx], y_train[idx])
        updates, state = tx.update(grads, state, params)
        params = pureopt.apply_updates(params, updates)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}")

    with torch.no_grad():
        logits = functional_call(model, params, (x_test,))
        test_loss = nn.functional.cross_entropy(logits, y_test).item()
        accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()

    print("which parameters moved (max |change|):")
    frozen_ok, moved = True, 0
    for name, p in params.items():
        bitwise_same = torch.equal(p.view(torch.int32), initial[name].view(torch.int32))
        change = (p - initial[name]).abs().max().item()
        print(f"  {name:22s} {labels[name]:18s} {'unchanged' if bitwise_same else 'moved':9s}  {change:.3e}")
        if labels[name] == "frozen":
            frozen_ok &= bitwise_same
        else:
            moved += not bitwise_same
    trainable = sum(g != "frozen" for g in labels.values())
    if args.save:
        torch.save({"initial": initial, "final": params, "labels": labels}, args.save)
    print(f"final: test loss {test_loss:.4f}  test accuracy {accuracy:.1%}  "
          f"frozen unchanged: {'yes' if frozen_ok else 'NO'}  trained params moved: {moved}/{trainable}")  # fmt: skip
    return {"test_loss": test_loss, "accuracy": accuracy}


if __name__ == "__main__":
    main()
