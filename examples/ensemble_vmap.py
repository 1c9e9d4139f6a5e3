"""An ensemble of MLPs trained at once with torch.func.vmap: one model, one optimizer state per member.

The members' parameters are stacked with ``torch.func.stack_module_state`` (a leading dimension of size
``--models``), and every piece of the training step is vmapped over that dimension: the gradient
(``torch.func.grad`` of a ``functional_call``), ``tx.init`` and ``tx.update``. Each member has its own
initialisation, its own minibatches (bagging) and its own Adam moments and step counts; under vmap pureopt runs
its per-tensor kernel path automatically.

    python examples/ensemble_vmap.py                         # 10 models, 400 steps; ~10 s on 2 cores
    python examples/ensemble_vmap.py --models 4 --steps 100  # quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import pureopt


def target(x: torch.Tensor) -> torch.Tensor:
    """The function to learn: a smooth surface in two variables."""
    return torch.sin(2.0 * x[..., 0]) * torch.cos(1.5 * x[..., 1]) + 0.3 * x[..., 1]


def make_data(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 2, generator=generator) * 2 * math.pi - math.pi
    y = target(x) + noise * torch.randn(n, generator=generator)
    return x, y.unsqueeze(-1)


def main() -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10, help="ensemble size")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="minibatch size per model")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_data(2048, 0.05, gen)
    x_test, y_test = make_data(1024, 0.0, gen)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(2, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(),
                             nn.Linear(args.hidden, 1))  # fmt: skip

    models = [make_model() for _ in range(args.models)]  # different initialisations
    stacked, _ = stack_module_state(models)
    params = {name: p.detach() for name, p in stacked.items()}  # each leaf: (models, *shape)
    skeleton = copy.deepcopy(models[0]).to("meta")  # structure only; functional_call supplies the parameters

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(skeleton, params, (x,)) - y) ** 2).mean()

    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adam(lr=args.lr))
    state = vmap(tx.init)(params)  # one state per model: exp_avg etc. have the leading models dimension

    def train_step(params, state, x, y):  # written for ONE model; vmap runs it for all of them
        grads, loss = grad_and_value(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)  # clipping uses each model's own gradient norm
        return pureopt.apply_updates(params, updates), state, loss

    ensemble_step = vmap(train_step)
    ensemble_loss = vmap(loss_fn, in_dims=(0, None, None))  # every model on the same test set

    with torch.no_grad():
        initial = ensemble_loss(params, x_test, y_test)
    print(f"{args.models} models, {sum(v[0].numel() for v in params.values())} parameters each")
    print("initial per-model test losses: " + " ".join(f"{v:.4f}" for v in initial.tolist()))

    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (args.models, args.batch), generator=gen)  # own batch per model
        params, state, losses = ensemble_step(params, state, x_train[idx], y_train[idx])
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:5d}  mean train loss {losses.mean().item():.4f}  (min {losses.min().item():.4f}, "
                  f"max {losses.max().item():.4f})")  # fmt: skip

    with torch.no_grad():
        final = ensemble_loss(params, x_test, y_test)
        ensemble_prediction = vmap(functional_call, in_dims=(None, 0, None))(skeleton, params, (x_test,)).mean(0)
        ensemble_test = ((ensemble_prediction - y_test) ** 2).mean().item()
    print("final per-model test losses: " + " ".join(f"{v:.4f}" for v in final.tolist()))
    print(f"ensemble-mean prediction test loss {ensemble_test:.4f}")
    print(f"final: mean test loss {initial.mean().item():.4f} -> {final.mean().item():.4f} "
          f"(worst model {final.max().item():.4f}, ensemble {ensemble_test:.4f})")  # fmt: skip
    return {"initial": initial.tolist(), "final": final.tolist()}


if __name__ == "__main__":
    main()
