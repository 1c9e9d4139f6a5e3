"""CUDA: torch.optim parity on the GPU, fused kernels bitwise against torch's, no host syncs, CUDA graphs.

Every test here creates its tensors on ``cuda`` explicitly (the default device stays what the run chose), so a
tensor that pureopt creates on the wrong device shows up. The whole suite also runs on the GPU with
``PUREOPT_TEST_DEVICE=cuda`` (tests/_device.py); ``benchmarks/gpu_check.sh`` runs both and the GPU benchmarks.
Without a CUDA device every test here skips.

References: torch.optim's own classes on the same CUDA tensors (foreach, its CUDA default, and ``fused=True``);
for the CUDA-graph replays, the same steps run eagerly (whose numbers the parity tests tie to torch.optim).
Tolerances: fused against torch's fused kernels is bitwise (the same kernel on the same inputs); foreach parity
is fp32 rtol 1e-5 / fp64 1e-10 as on the CPU (torch's CUDA pow/sqrt may round differently from pureopt's op order).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _device import requires_cuda
from _parity import grads_at, loss_fn, make_data, make_params, tolerances
from _registry import CONFIGS

import pureopt

pytestmark = requires_cuda
CUDA = torch.device("cuda")

# torch.optim class -> (pureopt factory, kwargs grid); the grid covers each class's flags once
TORCH_GRID: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    *[
        ("SGD", pureopt.sgd, dict(lr=0.05, momentum=m, nesterov=n, weight_decay=wd, maximize=mx, dampening=d))
        for m, n, wd, mx, d in itertools.product([0.0, 0.9], [False, True], [0.0, 0.1], [False, True], [0.0, 0.2])
        if not (n and (m == 0 or d != 0))
    ],
    *[
        ("Adam", pureopt.adam, dict(lr=0.01, amsgrad=a, weight_decay=wd, maximize=mx))
        for a, wd, mx in itertools.product([False, True], [0.0, 0.1], [False, True])
    ],
    ("AdamW", pureopt.adamw, dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", pureopt.adamw, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adagrad", pureopt.adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.1)),
    ("Adadelta", pureopt.adadelta, dict(lr=1.0, weight_decay=0.1)),
    ("Adamax", pureopt.adamax, dict(lr=0.01, weight_decay=0.1)),
    ("ASGD", pureopt.asgd, dict(lr=0.01, t0=3.0)),
    ("NAdam", pureopt.nadam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", pureopt.radam, dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", pureopt.rmsprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
    ("Rprop", pureopt.rprop, dict(lr=0.01)),
    ("Adafactor", pureopt.adafactor, dict(lr=0.01)),
]
FUSED_CUDA = ("SGD", "Adam", "AdamW")  # the classes torch has CUDA fused kernels for
GRID_IDS = [f"{name}{kw}" for name, _, kw in TORCH_GRID]


def _cuda_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(CUDA) for k, v in make_params(dtype).items()}


def _cuda_data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(dtype)
    return x.to(CUDA), y.to(CUDA)


def _run_pair(
    torch_opt: torch.optim.Optimizer,
    torch_params: list[torch.Tensor],
    mine: torch.optim.Optimizer,
    my_params: list[torch.Tensor],
    names: list[str],
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    check: Callable[[torch.Tensor, torch.Tensor, str], None],
    lrs: list[float] | None = None,
    none_grads: bool = True,
) -> None:
    """Step both optimizers on their own gradients (the parity harness's None pattern; the objective is negated
    for ``maximize``, so both still converge); ``check`` every param."""
    sign = -1.0 if torch_opt.param_groups[0].get("maximize", False) else 1.0
    for step in range(steps):
        for opt, params in ((torch_opt, torch_params), (mine, my_params)):
            tree = {k: p.detach() for k, p in zip(names, params)}
            grads = grads_at(tree, step if none_grads else -1, data, sign)
            for k, p in zip(names, params):
                p.grad = None if grads[k] is None else grads[k].clone()
            if lrs is not None:
                for group in opt.param_groups:
                    if isinstance(group["lr"], torch.Tensor):
                        group["lr"].fill_(lrs[step])
                    else:
                        group["lr"] = lrs[step]
            opt.step()
        for k, a, b in zip(names, my_params, torch_params):
            check(a.detach(), b.detach(), f"{k} @ {step}")


def _make_pair(
    cls_name: str, factory: Callable[..., Any], kw: dict[str, Any], dtype: torch.dtype, **torch_flags: Any
) -> tuple[torch.optim.Optimizer, list[torch.Tensor], torch.optim.Optimizer, list[torch.Tensor], list[str]]:
    init = _cuda_params(dtype)
    names = list(init)
    torch_params = [t.clone().requires_grad_(True) for t in init.values()]
    my_params = [t.clone().requires_grad_(True) for t in init.values()]
    torch_opt = getattr(torch.optim, cls_name)(torch_params, **kw, **torch_flags)
    mine = pureopt.TorchOptimizer(my_params, factory, **kw)
    return torch_opt, torch_params, mine, my_params, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("cls_name", "factory", "kw"), TORCH_GRID, ids=GRID_IDS)
def test_torch_optim_parity_on_cuda(cls_name: str, factory: Callable[..., Any], kw: dict, dtype: torch.dtype) -> None:
    """TorchOptimizer on CUDA parameters against torch.optim's CUDA default (foreach), 20 steps."""
    torch_opt, tp, mine, mp, names = _make_pair(cls_name, factory, kw, dtype)
    tol = tolerances(dtype)

    def check(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        assert a.device.type == "cuda"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{where}: {m}")

    _run_pair(torch_opt, tp, mine, mp, names, _cuda_data(dtype), 20, check)
    for p in mp:  # every state tensor stays on the parameter's device
        for value in mine.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cuda", f"state on {value.device}"


def _bitwise(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    assert torch.equal(a, b), f"{where}: max diff {(a - b).abs().max().item():.3g}"


FUSED_GRID = [(n, f, kw) for n, f, kw in TORCH_GRID if n in FUSED_CUDA and kw.get("dampening", 0.0) == 0.0]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize(("cls_name", "factory", "kw"), FUSED_GRID, ids=[f"{n}{kw}" for n, _, kw in FUSED_GRID])
def test_auto_is_torch_fused_bitwise(cls_name: str, factory: Callable[..., Any], kw: dict, tensor_lr: bool) -> None:
    """``impl="auto"`` on CUDA runs torch's fused kernel: bitwise equal to ``fused=True`` over 10 steps, with the lr
    changed every step (a float, or a CUDA tensor refilled in place)."""
    kw = dict(kw)
    if tensor_lr:
        kw["lr"] = torch.tensor(kw["lr"], device=CUDA)
    init = _cuda_params(torch.float32)
    names = list(init)
    tp = [t.clone().requires_grad_(True) for t in init.values()]
    mp = [t.clone().requires_grad_(True) for t in init.values()]
    torch_kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    torch_opt = getattr(torch.optim, cls_name)(tp, fused=True, **torch_kw)
    mine = pureopt.TorchOptimizer(mp, factory, **kw)
    lrs = [float(kw["lr"]) * (1.0 - 0.07 * i) for i in range(10)]
    # every parameter has a gradient at every step: torch's fused SGD fails (TypeError) on a parameter whose first
    # gradient comes after its first step (its momentum buffer is still None when is_first_step is False)
    _run_pair(torch_opt, tp, mine, mp, names, _cuda_data(torch.float32), 10, _bitwise, lrs=lrs, none_grads=False)


def test_mixed_devices_and_dtypes_in_one_group() -> None:
    """One group holding CPU fp32, CUDA fp32, CUDA bf16 and CUDA fp64 parameters: every (device, dtype) group
    steps as torch.optim.Adam steps it (each compared within its dtype's tolerance)."""
    gen = torch.Generator().manual_seed(0)
    specs = [("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float64)]
    init = [torch.randn(7, 5, generator=gen, dtype=torch.float64).to(d, t) for d, t in specs]
    tp = [t.clone().requires_grad_(True) for t in init]
    mp = [t.clone().requires_grad_(True) for t in init]
    torch_opt = torch.optim.Adam(tp, lr=0.01, weight_decay=0.1)
    mine = pureopt.TorchOptimizer(mp, pureopt.adam, lr=0.01, weight_decay=0.1)
    for step in range(10):
        for params, opt in ((tp, torch_opt), (mp, mine)):
            for i, p in enumerate(params):
                p.grad = (torch.sin(p.detach() * (step + 1) + i)).to(p.dtype)
            opt.step()
    for (d, t), a, b in zip(specs, mp, tp):
        tol = {"rtol": 1e-2, "atol": 1e-2} if t == torch.bfloat16 else tolerances(t)
        assert a.device.type == d and a.dtype == t
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m, d=d, t=t: f"{d}/{t}: {m}")


# --- no host synchronisation -------------------------------------------------------------------------------------

_NO_SYNC = CONFIGS
NO_SYNC_IDS = [name for name, _, _ in _NO_SYNC]


class _SyncsAreErrors:
    """``torch.cuda.set_sync_debug_mode("error")`` while active: any host synchronisation raises."""

    def __enter__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")


def _tensor_lr(factory: Callable[..., Any], kw: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    lr = torch.tensor(float(kw["lr"]), device=CUDA)
    return factory(**{**kw, "lr": lr}), lr


@pytest.mark.parametrize(("name", "factory", "kw"), _NO_SYNC, ids=NO_SYNC_IDS)
def test_steps_do_not_sync_with_the_host(name: str, factory: Callable[..., Any], kw: dict) -> None:
    """The adapter's step, the donated step, the pure update and ``pureopt.step`` run without a host sync."""
    params = {k: v.requires_grad_(False) for k, v in _cuda_params(torch.float32).items() if v.dim() == 2}
    grads = {k: torch.sin(v * 3.0) for k, v in params.items()}
    tx, lr = _tensor_lr(factory, kw)
    # pure API
    state = tx.init(params)
    with _SyncsAreErrors():
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
            params = pureopt.apply_updates(params, updates)
            params, state = pureopt.step(tx, grads, state, params)
            state = pureopt.inplace_step(tx, grads, state, params)
            lr.mul_(0.9)
    # the adapter (float lr, refilled from param_groups each step)
    ps = [p.clone().requires_grad_(True) for p in params.values()]
    opt = pureopt.TorchOptimizer(ps, factory, **kw)
    for p in ps:
        p.grad = torch.cos(p.detach())
    opt.step()  # the first step builds the state
    with _SyncsAreErrors():
        for i in range(3):
            opt.param_groups[0]["lr"] = float(kw["lr"]) * 0.9**i
            opt.step()


# --- CUDA graphs ------------------------------------------------------------------------------------------------


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in pureopt.tree.leaves(tree) if isinstance(t, torch.Tensor)]


def _graph_step(tx: Any, grads: Any, state: Any, params: Any) -> None:
    """One donated step that leaves its results in ``state``'s own buffers (a replayable graph must write to the
    same memory every time): state tensors the step returns as new tensors are copied back."""
    new = pureopt.inplace_step(tx, grads, state, params)
    for old, fresh in zip(_leaves(state), _leaves(new)):
        if fresh is not old:
            old.copy_(fresh)


GRAPH_STEPS = 10


def _lrs(base: float) -> list[float]:
    return [base * (1.0 + 0.5 * (i % 3)) / (1 + i) for i in range(GRAPH_STEPS)]


# CONFIGS ids with a torch.optim counterpart (same keyword names): the CUDA-graph replays are compared with it
TORCH_CLASS = {
    "sgd": "SGD", "sgd-dampening": "SGD", "adam": "Adam", "adam-amsgrad": "Adam", "adamw": "AdamW",
    "adagrad": "Adagrad", "adadelta": "Adadelta", "adamax": "Adamax", "asgd": "ASGD", "nadam": "NAdam",
    "radam": "RAdam", "rmsprop": "RMSprop", "rprop": "Rprop", "adafactor": "Adafactor",
}  # fmt: skip


def torch_reference(
    cls_name: str,
    kw: dict[str, Any],
    init: dict[str, torch.Tensor],
    grad_seq: list[dict[str, torch.Tensor]],
    lrs: list[float],
) -> dict[str, torch.Tensor]:
    """torch.optim's for-loop implementation over ``grad_seq``: the first ``len(grad_seq) - len(lrs)`` steps at
    ``kw["lr"]``, then one step per entry of ``lrs``."""
    ps = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = getattr(torch.optim, cls_name)(list(ps.values()), foreach=False, **kw)
    warm = len(grad_seq) - len(lrs)
    for i, grads in enumerate(grad_seq):
        opt.param_groups[0]["lr"] = kw["lr"] if i < warm else lrs[i - warm]
        for k, p in ps.items():
            p.grad = grads[k].clone()
        opt.step()
    return {k: p.detach() for k, p in ps.items()}


@pytest.mark.parametrize(("name", "factory", "kw"), _NO_SYNC, ids=NO_SYNC_IDS)
def test_donated_step_captured_in_a_cuda_graph(name: str, factory: Callable[..., Any], kw: dict) -> None:
    """The donated step is captured once in a ``torch.cuda.CUDAGraph`` and replayed 10 times with new gradients and
    a new lr (a CUDA tensor refilled between replays). Reference: torch.optim stepped eagerly on the same gradients
    and lrs where it has the algorithm (fp32 parity tolerance), else the same pureopt steps run eagerly (whose
    numbers tests/test_optimizers_beyond.py ties to each paper's rule)."""
    init = {k: v for k, v in _cuda_params(torch.float32).items() if v.numel() > 0}
    grad_seq = [{k: torch.sin(v * (i + 1.0)) + 0.1 * i for k, v in init.items()} for i in range(GRAPH_STEPS + 2)]
    lrs = _lrs(float(kw["lr"]))

    # eager reference
    tx_ref, lr_ref = _tensor_lr(factory, kw)
    p_ref = {k: v.clone() for k, v in init.items()}
    s_ref = tx_ref.init(p_ref)
    for i in range(2):  # the same two warm-up steps the graph run takes before capture
        s_ref = pureopt.inplace_step(tx_ref, grad_seq[i], s_ref, p_ref)
    for i in range(GRAPH_STEPS):
        lr_ref.fill_(lrs[i])
        s_ref = pureopt.inplace_step(tx_ref, grad_seq[i + 2], s_ref, p_ref)

    # captured
    tx, lr = _tensor_lr(factory, kw)
    params = {k: v.clone() for k, v in init.items()}
    grads = {k: g.clone() for k, g in grad_seq[0].items()}
    state = tx.init(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            for k in grads:
                grads[k].copy_(grad_seq[i][k])
            _graph_step(tx, grads, state, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _graph_step(tx, grads, state, params)
    for i in range(GRAPH_STEPS):
        lr.fill_(lrs[i])
        for k in grads:
            grads[k].copy_(grad_seq[i + 2][k])
        graph.replay()
    torch.cuda.synchronize()
    if name in TORCH_CLASS:
        p_ref = torch_reference(TORCH_CLASS[name], kw, init, grad_seq, lrs)
    for k in init:
        torch.testing.assert_close(params[k], p_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "AdamW"])
def test_torch_optimizer_step_captured_in_a_cuda_graph(cls_name: str) -> None:
    """``TorchOptimizer.step()`` itself captured and replayed, lr a CUDA tensor in ``param_groups`` changed in place
    between replays, against torch.optim's ``capturable=True`` optimizer captured the same way."""
    factory = {"SGD": pureopt.sgd, "Adam": pureopt.adam, "AdamW": pureopt.adamw}[cls_name]
    kw: dict[str, Any] = {"momentum": 0.9} if cls_name == "SGD" else {"weight_decay": 0.1}
    init = {k: v for k, v in _cuda_params(torch.float32).items() if v.numel() > 0}
    grad_seq = [[torch.cos(v * (i + 1.0)) for v in init.values()] for i in range(GRAPH_STEPS + 2)]
    lrs = _lrs(0.01)
    results = []
    for side_name in ("torch", "pureopt"):
        ps = [v.clone().requires_grad_(True) for v in init.values()]
        lr = torch.tensor(0.01, device=CUDA)
        if side_name == "torch":
            flags = {"fused": True} if cls_name == "SGD" else {"capturable": True}
            opt: torch.optim.Optimizer = getattr(torch.optim, cls_name)(ps, lr=lr, **kw, **flags)
        else:
            opt = pureopt.TorchOptimizer(ps, factory, lr=lr, **kw)
        for p, g in zip(ps, grad_seq[0]):
            p.grad = g.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(2):
                for p, g in zip(ps, grad_seq[i]):
                    p.grad.copy_(g)
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for i in range(GRAPH_STEPS):
            lr.fill_(lrs[i])
            for p, g in zip(ps, grad_seq[i + 2]):
                p.grad.copy_(g)
            graph.replay()
        torch.cuda.synchronize()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compiled_train_step_reduce_overhead() -> None:
    """A whole pure training step (grad + update + apply) under ``torch.compile(mode="reduce-overhead")`` (CUDA
    graphs through inductor), lr a CUDA tensor changed every step: matches torch.optim.AdamW on the same loss."""
    init = _cuda_params(torch.float32)
    data = _cuda_data(torch.float32)
    lr = torch.tensor(0.01, device=CUDA)
    tx = pureopt.adamw(lr=lr, weight_decay=0.1)

    def train_step(params: dict[str, torch.Tensor], state: Any) -> tuple[dict[str, torch.Tensor], Any]:
        grads = torch.func.grad(loss_fn)(params, *data)
        updates, state = tx.update(grads, state, params)
        return pureopt.apply_updates(params, updates), state

    compiled = torch.compile(train_step, mode="reduce-overhead", fullgraph=True)
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    tp = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    ref = torch.optim.AdamW(list(tp.values()), lr=0.01, weight_decay=0.1)
    lrs = _lrs(0.01)
    for i in range(GRAPH_STEPS):
        lr.fill_(lrs[i])
        torch.compiler.cudagraph_mark_step_begin()
        params, state = compiled(params, state)
        params = {k: v.clone() for k, v in params.items()}  # outlive the next replay
        state = copy.deepcopy(state)
        ref.param_groups[0]["lr"] = lrs[i]
        ref.zero_grad()
        loss_fn(tp, *data).backward()
        ref.step()
    for k in init:
        torch.testing.assert_close(params[k], tp[k].detach(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --- GradScaler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW", "SGD"])
def test_grad_scaler_through_cuda_fused_kernels(cls_name: str) -> None:
    """``torch.amp.GradScaler("cuda")`` with an overflow on some steps: bitwise equal to torch's ``fused=True``."""
    factory = {"SGD": pureopt.sgd, "Adam": pureopt.adam, "AdamW": pureopt.adamw}[cls_name]
    kw: dict[str, Any] = {"lr": 0.01, "momentum": 0.9} if cls_name == "SGD" else {"lr": 0.01, "weight_decay": 0.1}
    init = {k: v for k, v in _cuda_params(torch.float32).items() if v.numel() > 0}
    data = _cuda_data(torch.float32)
    results = []
    for side_name in ("torch", "pureopt"):
        ps = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        if side_name == "torch":
            opt: torch.optim.Optimizer = getattr(torch.optim, cls_name)(list(ps.values()), fused=True, **kw)
        else:
            opt = pureopt.TorchOptimizer(list(ps.values()), factory, **kw)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
        for step in range(8):
            opt.zero_grad()
            loss = loss_fn(ps, *data)
            if step in (2, 5):
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in ps.values()])
    for a, b in zip(*results):
        _bitwise(b, a, "param")
