"""MAML on few-shot sine regression (Finn, Abbeel & Levine, ICML 2017), with pureopt in the inner and outer loop.

Each task is a sine wave ``y = A sin(x - phase)`` (``A`` in [0.1, 5], ``phase`` in [0, pi], ``x`` in [-5, 5]).
The model sees ``--shots`` points of a new task, takes ``--inner-steps`` optimizer steps on them, and is then
scored on other points of the same task. MAML learns the initial parameters that make this adaptation work.

The inner loop is a plain pureopt loop (``tx.update`` + ``apply_updates``) and the meta-gradient is
``torch.func.grad`` of the whole unrolled loop (second-order MAML: gradients flow through every update and
through the inner gradients themselves). Tasks of a meta-batch are adapted in parallel with ``torch.func.vmap``.
Under these transforms pureopt's kernels take their per-tensor, out-of-place path automatically. The outer
optimizer is ``pureopt.adam``. With ``--learn-inner-lr`` the inner learning rate is a 0-d tensor trained by the
meta-gradient as well (as in Meta-SGD, Li et al. 2017, with one scalar).

    python examples/maml.py                                  # 1000 meta-steps; ~40 s on 2 cores
    python examples/maml.py --meta-steps 200 --log-every 50  # quick smoke run
    python examples/maml.py --inner adam --inner-lr 0.01 --inner-steps 5  # Adam in the inner loop (slower)
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

import pureopt


def sample_tasks(n: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sine tasks with ``points`` samples each: x and y of shape (n, points, 1)."""
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=generator)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator)
    x = 10 * torch.rand(n, points, 1, generator=generator) - 5
    return x, amplitude * torch.sin(x - phase)


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=1000)
    parser.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
    parser.add_argument("--shots", type=int, default=10, help="support points per task (K in K-shot)")
    parser.add_argument("--queries", type=int, default=10, help="query points per task")
    parser.add_argument("--inner", choices=["sgd", "adam"], default="sgd", help="inner-loop optimizer")
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--inner-lr", type=float, default=0.02)
    parser.add_argument("--learn-inner-lr", action="store_true", help="meta-learn the inner learning rate too")
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=40)
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    # Tanh rather than Finn et al.'s ReLU: differentiating through Adam's sqrt(v) gives NaN where a dead ReLU
    # unit makes a gradient entry exactly zero (--inner adam); tanh units never give exact zeros.
    model = nn.Sequential(nn.Linear(1, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(),
                          nn.Linear(args.hidden, 1))  # fmt: skip
    skeleton = copy.deepcopy(model).to("meta")

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(skeleton, params, (x,)) - y) ** 2).mean()

    def inner_optimizer(lr: float | torch.Tensor) -> pureopt.GradientTransformation:
        return pureopt.sgd(lr=lr) if args.inner == "sgd" else pureopt.adam(lr=lr)

    def adapt(params, inner_tx, x_support, y_support):
        """The inner loop: a few pureopt steps on one task's support set, differentiable end to end."""
        state = inner_tx.init(params)
        for _ in range(args.inner_steps):
            grads = grad(loss_fn)(params, x_support, y_support)
            updates, state = inner_tx.update(grads, state, params)
            params = pureopt.apply_updates(params, updates)
        return params

    def meta_loss(meta_params, tasks):
        """Mean query loss after adaptation over a batch of tasks (vmapped over the tasks)."""
        params, log_lr = meta_params["model"], meta_params["log_inner_lr"]
        inner_tx = inner_optimizer(log_lr.exp() if args.learn_inner_lr else args.inner_lr)

        def task_loss(x_s, y_s, x_q, y_q):
            return loss_fn(adapt(params, inner_tx, x_s, y_s), x_q, y_q)

        return vmap(task_loss)(*tasks).mean()

    def split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x[:, : args.shots], y[:, : args.shots], x[:, args.shots :], y[:, args.shots :]

    meta_params = {
        "model": {name: p.detach() for name, p in model.named_parameters()},
        "log_inner_lr": torch.tensor(math.log(args.inner_lr)),
    }
    # the inner learning rate is trained only with --learn-inner-lr (its gradient is zero otherwise)
    outer_tx = pureopt.adam(lr=args.meta_lr)
    outer_state = outer_tx.init(meta_params)
    meta_step = grad_and_value(meta_loss)

    eval_tasks = split(*sample_tasks(args.eval_tasks, args.shots + args.queries, torch.Generator().manual_seed(123)))

    def evaluate(meta_params) -> tuple[float, float]:
        """Query loss on held-out tasks before and after adaptation."""
        before = vmap(loss_fn, in_dims=(None, 0, 0))(meta_params["model"], eval_tasks[2], eval_tasks[3]).mean()
        return before.item(), meta_loss(meta_params, eval_tasks).item()

    initial_before, initial_meta = evaluate(meta_params)
    print(f"inner loop: {args.inner_steps} x {args.inner}(lr={args.inner_lr}) on {args.shots} shots; "
          f"meta-batch {args.meta_batch}; outer: adam(lr={args.meta_lr})")  # fmt: skip
    print(f"initial meta-loss (held-out tasks) {initial_meta:.4f}")
    running = None
    for step in range(1, args.meta_steps + 1):
        tasks = split(*sample_tasks(args.meta_batch, args.shots + args.queries, gen))
        meta_grads, loss = meta_step(meta_params, tasks)
        updates, outer_state = outer_tx.update(meta_grads, outer_state, meta_params)
        meta_params = pureopt.apply_updates(meta_params, updates)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.meta_steps:
            lr_note = f"  inner lr {meta_params['log_inner_lr'].exp().item():.4f}" if args.learn_inner_lr else ""
            print(f"meta-step {step:5d}  meta-loss {loss.item():.4f}  (running mean {running:.4f}){lr_note}")

    final_before, final_meta = evaluate(meta_params)
    print(f"held-out tasks: query loss before adaptation {initial_before:.4f} -> {final_before:.4f}; "
          f"after adaptation {initial_meta:.4f} -> {final_meta:.4f}")  # fmt: skip
    print(f"final: meta-loss {initial_meta:.4f} -> {final_meta:.4f} ({final_meta / initial_meta:.1%} of initial)")
    return {"initial_meta_loss": initial_meta, "final_meta_loss": final_meta}


if __name__ == "__main__":
    main()
