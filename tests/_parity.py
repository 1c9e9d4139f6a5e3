"""Harness that runs a pureopt optimizer and its torch.optim counterpart side by side.

Both sides start from the same parameters and compute their own gradients of the same loss at their own
parameters (so a trajectory that drifts is caught), with the same pattern of ``None`` gradients.
After every step the parameters and torch's per-parameter state (``momentum_buffer``, ``exp_avg``, ...)
are compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import pureopt

# name -> shape; includes a 0-d and an empty tensor
SHAPES: dict[str, tuple[int, ...]] = {
    "w1": (5, 3),
    "b1": (5,),
    "w2": (2, 5),
    "b2": (2,),
    "gain": (),
    "empty": (0, 3),
}
# step -> names whose gradient is None at that step
NONE_GRADS: dict[int, tuple[str, ...]] = {
    0: ("b2",),  # never-seen parameter on the first step: its state must stay at its initial value
    3: ("b1",),
    4: ("b1", "gain"),
    9: ("w2",),
    17: ("gain",),
}


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-6}


def make_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def make_data(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    out = (h @ params["w2"].T + params["b2"]) * params["gain"]
    return ((out - y) ** 2).mean() + (params["empty"] ** 2).sum() + 0.01 * params["gain"] ** 4


def grads_at(params: dict[str, torch.Tensor], step: int, data: tuple[torch.Tensor, torch.Tensor], sign: float = 1.0):
    g = torch.func.grad(lambda p, x, y: sign * loss_fn(p, x, y))(params, *data)
    for name in NONE_GRADS.get(step, ()):
        g[name] = None
    return g


def find_state_field(state: Any, key: str) -> Any:
    """The per-parameter tree stored under ``key`` (torch's state key) anywhere in a pureopt state."""
    if hasattr(state, "_fields"):
        if key in state._fields:
            return getattr(state, key)
        children = [getattr(state, f) for f in state._fields]
    elif isinstance(state, (tuple, list)):
        children = list(state)
    elif isinstance(state, dict):
        children = list(state.values())
    else:
        return None
    for child in children:
        found = find_state_field(child, key)
        if found is not None:
            return found
    return None


def run_parity(
    torch_factory: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer],
    tx: pureopt.GradientTransformation,
    dtype: torch.dtype,
    steps: int = 25,
    state_keys: Sequence[str] = (),
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    maximize: bool = False,
) -> None:
    """Run ``steps`` steps on both sides and compare params and state after every step.

    With ``maximize`` the objective is ``-loss`` (so maximizing it still converges).
    """
    sign = -1.0 if maximize else 1.0
    tol = tolerances(dtype)
    data = make_data(dtype)
    init = make_params(dtype)
    torch_params = [t.clone().requires_grad_(True) for t in init.values()]
    names = list(init)
    opt = torch_factory(torch_params)
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    for step in range(steps):
        # torch side: gradients at torch's own params
        tp = {k: t.detach() for k, t in zip(names, torch_params)}
        tg = grads_at(tp, step, data, sign)
        for k, t in zip(names, torch_params):
            t.grad = None if tg[k] is None else tg[k].clone()
        if before_step is not None:
            before_step(step, opt)
        opt.step()
        # pureopt side
        g = grads_at(params, step, data, sign)
        updates, state = tx.update(g, state, params)
        params = pureopt.apply_updates(params, updates)
        for k, t in zip(names, torch_params):
            torch.testing.assert_close(params[k], t.detach(), **tol, msg=lambda m, k=k, s=step: f"{k} @ {s}: {m}")
            assert params[k].dtype == dtype
            tstate = opt.state.get(t, {})
            for key in state_keys:
                if key not in tstate or tstate[key] is None:
                    continue
                field = find_state_field(state, key)
                assert field is not None, f"pureopt state has no field {key}"
                mine = field[k]
                theirs = tstate[key]
                torch.testing.assert_close(
                    mine.to(theirs.dtype),
                    theirs,
                    **tol,
                    msg=lambda m, k=k, s=step, key=key: f"state {key} of {k} @ {s}: {m}",
                )
