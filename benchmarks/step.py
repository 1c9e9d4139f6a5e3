"""Time one optimizer step, pureopt side by side with torch.optim, in one process.

For each parameter set and algorithm, every implementation takes one step per round, in a shuffled order
(interleaved, so that machine noise hits all of them alike); the median over the timed rounds is reported.

Implementations:
  torch-loop / torch-foreach / torch-fused   torch.optim.<Algo>(foreach=False / foreach=True / fused=True)
  pureopt-pure                               updates, state = tx.update(...); params = apply_updates(...)
  pureopt-step                               params, state = pureopt.step(tx, grads, state, params): as pure
                                             (inputs untouched), on copies with the donated kernels
  pureopt-step-copies                        only the copies of params and state pureopt-step makes before its
                                             in-place step (not a step: the floor of the copy-then-step road)
  pureopt-step-donate-state                  pureopt.step(..., donate="state"): the old state is handed over and
                                             reused (in place); only the parameters are copied
  pureopt-flatparams-step                    pureopt.step over pureopt.FlatParams buffers (one flat buffer per
                                             (device, dtype) for parameters, gradients and state), eager
  pureopt-flatparams-donated                 the same with donate=("params", "state") (in place)
  pureopt-donated                            state = pureopt.inplace_step(tx, grads, state, params)
                                             (what the stateful adapters run: buffers owned, updated in place)
  pureopt-flat                               TorchOptimizer(params, tx, flat=True).step(), gradients already
                                             views of its flat buffers (zero_grad(set_to_none=False))
  pureopt-flat-gather                        the same with gradients in their own tensors (one gather copy)
  pureopt-graph / torch-fused-graph          (--device cuda) the donated step / torch's fused step captured once
                                             in a torch.cuda.CUDAGraph and replayed (lr a device tensor)
  pureopt-compiled                           (--compiled) pureopt-pure under torch.compile(fullgraph=True) (inductor),
                                             lr a 0-d tensor; the first call's time is reported as compile_s
  pureopt-compiled-donated                   (--compiled) the same with donate=("params", "state"): written in place
  pureopt-compiled-flat                      (--compiled) the same for pureopt.flatten(tx): one vector per group
  pureopt-compiled-flatparams                (--compiled) pureopt-flatparams-step under torch.compile(fullgraph=True)
  pureopt-compiled-flatparams-donated        (--compiled) the same with donate=("params", "state")
  torch-compiled                             (--compiled with torch-compiled in --compiled-rows) torch.optim's
                                             foreach step under torch.compile, lr a tensor (torch's recipe)

On CUDA (``--device cuda``) each timing is CUDA events around ``--inner`` back-to-back steps of one
implementation (so launch-bound steps are timed as they run in a training loop, without a host sync per step),
and the bandwidth is a device-to-device copy.

Reported per row: median ms (and quartiles in the JSON), ratio to torch's fastest implementation of the same
algorithm, the fraction of the memory-bandwidth bound (bytes the algorithm must move per step / measured copy
bandwidth), the cold compile time of compiled rows, on the CPU the median minor page faults per step, the 1-minute
load average as the rounds went, and with ``--memory`` the peak transient memory of one step. ``--repeats R`` cuts
the timed rounds into R blocks and also reports each row's ratio per block (median and range over the blocks):
on a shared machine the spread of those ratios says more than one median.

    python benchmarks/step.py                      # all sets, SGD-momentum / Adam / AdamW / Adagrad
    python benchmarks/step.py --quick              # small sizes, a few rounds: a smoke run
    python benchmarks/step.py --algos all --json benchmarks/results/latest.json
    python benchmarks/step.py --device cuda --json benchmarks/results/latest-cuda.json
    python benchmarks/step.py --compiled --memory --sets small,medium,many-small --algos adamw \\
        --json benchmarks/results/compiled-flatparams.json
    python benchmarks/step.py --sets small,medium,many-small --algos adamw --threads 1 --repeats 5 --compiled \\
        --compiled-rows pureopt-compiled-flatparams,pureopt-compiled-flatparams-donated \\
        --rows pureopt-flatparams-step,pureopt-flatparams-donated --flatparams-max-mib 0,4,8,16,32,64  # sizes
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import pureopt


@dataclass
class Algo:
    """An algorithm: its torch.optim class and kwargs, the pureopt factory, and the bytes it moves per param."""

    name: str
    torch_cls: str | None
    kwargs: dict[str, Any]
    factory: str  # "module:function" (the public names: "pureopt:adamw")
    state_tensors: int  # per-parameter state tensors read and written each step
    fused: bool = False

    def bytes_per_param(self, itemsize: int) -> int:
        # read param, grad and every state tensor; write param and every state tensor
        return itemsize * (2 + self.state_tensors + 1 + self.state_tensors)

    def build_pureopt(self, impl: str, **overrides: Any) -> pureopt.GradientTransformation:
        module, fn = self.factory.split(":")
        return getattr(importlib.import_module(module), fn)(impl=impl, **{**self.kwargs, **overrides})


ALGOS = {
    "sgd": Algo("sgd-momentum", "SGD", {"lr": 0.01, "momentum": 0.9}, "pureopt:sgd", 1, True),
    "adam": Algo("adam", "Adam", {"lr": 1e-3}, "pureopt:adam", 2, True),
    "adamw": Algo("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 0.01}, "pureopt:adamw", 2, True),
    "adagrad": Algo("adagrad", "Adagrad", {"lr": 1e-2}, "pureopt:adagrad", 1, True),
    "rmsprop": Algo("rmsprop", "RMSprop", {"lr": 1e-3}, "pureopt:rmsprop", 1),
    "adamax": Algo("adamax", "Adamax", {"lr": 1e-3}, "pureopt:adamax", 2),
    "nadam": Algo("nadam", "NAdam", {"lr": 1e-3}, "pureopt:nadam", 2),
    "radam": Algo("radam", "RAdam", {"lr": 1e-3}, "pureopt:radam", 2),
    "adadelta": Algo("adadelta", "Adadelta", {"lr": 1.0}, "pureopt:adadelta", 2),
    "rprop": Algo("rprop", "Rprop", {"lr": 1e-2}, "pureopt:rprop", 2),
    "asgd": Algo("asgd", "ASGD", {"lr": 1e-2}, "pureopt:asgd", 1),
    # not in torch.optim: pureopt's rows only (the flat rows against the per-tensor donated one)
    "lamb": Algo("lamb", None, {"lr": 1e-3, "weight_decay": 0.01}, "pureopt:lamb", 2),
    "lars": Algo("lars", None, {"lr": 0.1, "momentum": 0.9}, "pureopt:lars", 1),
}
DEFAULT_ALGOS = ["sgd", "adam", "adamw", "adagrad"]


def param_shapes(name: str, scale: float = 1.0) -> list[tuple[int, ...]]:
    """The parameter sets: few large tensors, a GPT-like model (and a small one), many small tensors."""
    if name == "large":  # 10 tensors, 10M params
        return [(int(1_000_000 * scale),)] * 10
    if name == "medium":  # 196 tensors, ~10M params, shaped like a 16-layer transformer
        d = max(8, int(224 * math.sqrt(scale)))
        layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        return [(1000, d), (256, d)] + layer * 16 + [(d,), (d,)]
    if name == "small":  # 100 tensors, ~1M params, shaped like an 8-layer transformer
        d = max(8, int(96 * math.sqrt(scale)))
        layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        return [(512, d), (128, d)] + layer * 8 + [(d,), (d,)]
    if name == "many-small":  # 2000 tensors of 1k params
        return [(int(1000 * scale),)] * 2000
    raise ValueError(f"unknown parameter set {name!r}")


DEVICE = torch.device("cpu")
MaxBytes = int | str | None  # FlatParams(max_buffer_bytes=...): bytes, "auto" or None (one buffer per group)
FLATPARAMS_MAX_BYTES: list[MaxBytes] = ["auto"]
"""--flatparams-max-mib: the ``FlatParams(max_buffer_bytes=...)`` values of the FlatParams rows (one row each)."""


def flat_label(label: str, max_bytes: MaxBytes) -> str:
    """The FlatParams row ``label`` with ``max_buffer_bytes=max_bytes``: ``label@16MiB``, ``label@one`` (one buffer
    per group), ``label@auto``; as is for the default ("auto") when it is the only value."""
    if max_bytes == "auto":
        return label + "@auto" if len(FLATPARAMS_MAX_BYTES) > 1 else label
    if max_bytes is None:
        return label + "@one"
    return f"{label}@{int(max_bytes) / 2**20:g}MiB"


def make_tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_bandwidth(nbytes: int = 2 * 2**30, repeats: int = 20) -> float:
    """Measured HBM bandwidth in bytes/s: a device-to-device copy of ``nbytes`` (read + written), CUDA events."""
    a, c = torch.ones(nbytes // 4, device=DEVICE), torch.empty(nbytes // 4, device=DEVICE)
    c.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        c.copy_(a)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, c
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Achievable memory bandwidth in bytes/s: the best of a copy (2 streams), an add (3) and an in-place scale
    (2) over ``nbytes``-sized float32 tensors, each the median of ``repeats`` runs with torch's default threads."""
    if DEVICE.type == "cuda":
        return cuda_bandwidth()
    a, b, c = torch.ones(nbytes // 4), torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    kernels = {
        "copy": (lambda: c.copy_(a), 2),
        "add": (lambda: torch.add(a, b, out=c), 3),
        "scale": (lambda: b.mul_(1.0), 2),
    }
    best = 0.0
    for fn, streams in kernels.values():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best = max(best, streams * nbytes / statistics.median(times))
    return best


def build_runners(algo: Algo, shapes: list[tuple[int, ...]]) -> dict[str, Callable[[], None]]:
    """One closure per implementation, each with its own parameters, gradients and state."""
    runners: dict[str, Callable[[], None]] = {}
    grads_data = make_tensors(shapes, seed=1)
    if algo.torch_cls is not None:
        cls = getattr(torch.optim, algo.torch_cls)
        variants = {"torch-loop": {"foreach": False}, "torch-foreach": {"foreach": True}}
        if algo.fused:
            variants["torch-fused"] = {"fused": True}
        for label, flags in variants.items():
            ps = [p.requires_grad_(True) for p in make_tensors(shapes, seed=0)]
            for p, g in zip(ps, grads_data):
                p.grad = g.clone()
            opt = cls(ps, **algo.kwargs, **flags)
            runners[label] = opt.step

    tx = algo.build_pureopt("auto")
    pure = {"params": {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}}
    pure_grads = {str(i): g.clone() for i, g in enumerate(grads_data)}
    pure["state"] = tx.init(pure["params"])

    def pure_step() -> None:
        updates, pure["state"] = tx.update(pure_grads, pure["state"], pure["params"])
        pure["params"] = pureopt.apply_updates(pure["params"], updates)

    runners["pureopt-pure"] = pure_step

    stepped = {"params": {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}}
    stepped["state"] = tx.init(stepped["params"])

    def pure_fast_step() -> None:
        stepped["params"], stepped["state"] = pureopt.step(tx, pure_grads, stepped["state"], stepped["params"])

    runners["pureopt-step"] = pure_fast_step

    def copies_only() -> None:  # what pureopt.step does before its in-place step: copy the parameters and the state
        stepped["copies"] = (pureopt.tree.tree_clone(stepped["params"]), pureopt.tree.tree_clone(stepped["state"]))

    runners["pureopt-step-copies"] = copies_only

    # the same with the state donated (the caller never reads the old state again): only the parameters are copied
    half = {"params": {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}}
    half["state"] = tx.init(half["params"])

    def donate_state_step() -> None:
        half["params"], half["state"] = pureopt.step(tx, pure_grads, half["state"], half["params"], donate="state")

    runners["pureopt-step-donate-state"] = donate_state_step

    own_params = {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}
    own_grads = {str(i): g.clone() for i, g in enumerate(grads_data)}
    own = {"state": tx.init(own_params)}

    def donated_step() -> None:
        own["state"] = pureopt.inplace_step(tx, own_grads, own["state"], own_params)

    runners["pureopt-donated"] = donated_step

    # flat buffers: the adapter owns the parameters (views of one buffer) and, for "pureopt-flat", the gradients
    for label, views in (("pureopt-flat", True), ("pureopt-flat-gather", False)):
        ps = [p.requires_grad_(True) for p in make_tensors(shapes, seed=0)]
        opt = pureopt.TorchOptimizer(ps, algo.build_pureopt("auto"), flat=True)
        if views:
            opt.zero_grad(set_to_none=False)
            for p, g in zip(ps, grads_data):
                p.grad.copy_(g)
        else:
            for p, g in zip(ps, grads_data):
                p.grad = g.clone()
        runners[label] = opt.step
    if pureopt.is_segmentwise(tx):
        for max_bytes in FLATPARAMS_MAX_BYTES:
            run = flatparams_step(algo, shapes, grads_data, (), compiled=False, max_bytes=max_bytes)[0]
            runners[flat_label("pureopt-flatparams-step", max_bytes)] = run
            run = flatparams_step(algo, shapes, grads_data, ("params", "state"), compiled=False, max_bytes=max_bytes)[0]
            runners[flat_label("pureopt-flatparams-donated", max_bytes)] = run
    if DEVICE.type == "cuda":
        runners.update(graph_runners(algo, shapes, grads_data))
    return runners


COMPILED_ROWS = (
    "pureopt-compiled",
    "pureopt-compiled-donated",
    "pureopt-compiled-flat",
    "pureopt-compiled-flatparams",
    "pureopt-compiled-flatparams-donated",
    "torch-compiled",
)
EAGER_FLATPARAMS_ROWS = ("pureopt-flatparams-step", "pureopt-flatparams-donated")


COMPILE_CPU_S: dict[int, float] = {}
"""CPU seconds of the last cold call of each function (by id): this process and its reaped children."""


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CompileTimeout(Exception):
    """A first call (the cold compile) ran past ``--compile-timeout``."""


def cold_call(fn: Callable[[], None], timeout: float) -> float:
    """Seconds taken by the first call of ``fn`` (a compile), in a fresh inductor cache directory so that nothing
    compiled before is reused; raises :class:`CompileTimeout` after ``timeout`` CPU seconds of this process
    (SIGPROF; CPU runs only)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pureopt-bench-inductor-")

    def expire(signum: int, frame: Any) -> None:
        raise CompileTimeout

    # the limit counts this process's CPU seconds (compiles run in-process: --compile-threads 1), so that a
    # machine shared with other work does not turn a slow compile into a timeout
    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, timeout)
    try:
        t, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        sync()
        COMPILE_CPU_S[id(fn)] = _cpu_seconds() - cpu
        return time.perf_counter() - t
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def warm_compiler() -> float:
    """Compile and run a one-op function (in a fresh cache directory), so that inductor's one-time start-up (imports,
    worker pool, C++ toolchain probe) is not charged to the first row's cold compile; returns its seconds."""
    x = torch.ones(8, device=DEVICE)
    return cold_call(lambda: torch.compile(lambda t: t * 2.0 + 1.0, fullgraph=True)(x), 600.0)


def compiled_runners(
    algo: Algo, shapes: list[tuple[int, ...]], grads_data: list[torch.Tensor], wanted: list[str], timeout: float
) -> tuple[dict[str, Callable[[], None]], dict[str, float], dict[str, str]]:
    """The ``--compiled`` rows, each already past its first call: (runners, compile seconds, failures)."""
    runners: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {"compiler-init": warm_compiler()}
    print(f"  compiler start-up (a one-op function, not charged to the rows): {compile_s['compiler-init']:.1f} s")
    failed: dict[str, str] = {}
    module, fn = algo.factory.split(":")
    factory = getattr(importlib.import_module(module), fn)

    def pure_compiled(flat: bool, donate: tuple[str, ...] = ()) -> Callable[[], None]:
        lr = torch.tensor(float(algo.kwargs["lr"]), dtype=torch.float64, device=DEVICE)
        tx = factory(impl="auto", **{**algo.kwargs, "lr": lr})
        if flat:
            tx = pureopt.flatten(tx)
        params = {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}
        grads = {str(i): g.clone() for i, g in enumerate(grads_data)}
        holder = {"params": params, "state": tx.init(params)}

        @torch.compile(fullgraph=True)
        def compiled(grads: Any, state: Any, params: Any) -> Any:
            return pureopt.step(tx, grads, state, params, donate=donate)  # update + apply_updates when not donated

        def run() -> None:
            holder["params"], holder["state"] = compiled(grads, holder["state"], holder["params"])

        return run

    def flatparams_compiled(donate: tuple[str, ...], max_bytes: MaxBytes) -> Callable[[], None]:
        run, _ = flatparams_step(algo, shapes, grads_data, donate, compiled=True, max_bytes=max_bytes)
        return run

    def torch_compiled() -> Callable[[], None]:
        # torch's recipe (tutorials: "Compiling the optimizer"): lr a tensor so that a scheduler does not recompile;
        # torch.optim refuses a tensor lr with foreach=True unless capturable=True (its device check is skipped
        # while compiling, so this also runs on the CPU)
        ps = [p.requires_grad_(True) for p in make_tensors(shapes, seed=0)]
        for p, g in zip(ps, grads_data):
            p.grad = g.clone()
        lr = torch.tensor(float(algo.kwargs["lr"]), device=DEVICE)
        cls = getattr(torch.optim, str(algo.torch_cls))
        opt = cls(ps, **{**algo.kwargs, "lr": lr}, foreach=True, capturable=True)

        @torch.compile(fullgraph=False)
        def run() -> None:
            opt.step()

        return run

    makers: dict[str, Callable[[], Callable[[], None]]] = {
        "pureopt-compiled": lambda: pure_compiled(False),
        "pureopt-compiled-donated": lambda: pure_compiled(False, ("params", "state")),
        "pureopt-compiled-flat": lambda: pure_compiled(True),
    }
    flat_rows = {"pureopt-compiled-flatparams": (), "pureopt-compiled-flatparams-donated": ("params", "state")}
    labels: list[str] = []
    for w in wanted:  # a FlatParams row: one per --flatparams-max-mib value
        sizes = FLATPARAMS_MAX_BYTES if w in flat_rows else ["auto"]
        for max_bytes in sizes:
            labels.append(flat_label(w, max_bytes) if w in flat_rows else w)
            if w in flat_rows:
                makers[labels[-1]] = lambda d=flat_rows[w], m=max_bytes: flatparams_compiled(d, m)
    if algo.torch_cls is not None:
        makers["torch-compiled"] = torch_compiled
    for label in labels:
        if label not in makers:
            continue
        run = makers[label]()
        try:
            compile_s[label] = cold_call(run, timeout)
            compile_s[label + ":cpu"] = COMPILE_CPU_S[id(run)]
            runners[label] = run
        except Exception as exc:  # report, keep the other rows
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, CompileTimeout):  # inductor wraps what it raises
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                failed[label] = f"did not finish in {timeout:.0f} s of CPU"
            else:
                failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            torch._dynamo.reset()
        print(f"  {label} {algo.name}: first call (compile) " + (
            f"{compile_s[label]:.1f} s ({compile_s[label + ':cpu']:.1f} s of CPU)" if label in compile_s
            else failed[label]), flush=True)  # fmt: skip
    return runners, compile_s, failed


def flatparams_step(
    algo: Algo,
    shapes: list[tuple[int, ...]],
    grads_data: list[torch.Tensor],
    donate: tuple[str, ...],
    compiled: bool,
    max_bytes: MaxBytes = "auto",
) -> tuple[Callable[[], None], Any]:
    """``pureopt.step`` over a :class:`pureopt.FlatParams` layout: the parameters and the gradients are one flat
    buffer per (device, dtype) (in a training loop the gradient with respect to the buffers comes out flat), lr a
    0-d tensor; compiled with ``torch.compile(fullgraph=True)`` or eager; ``max_bytes`` is the layout's
    ``max_buffer_bytes``. Returns the step and the holder."""
    lr = torch.tensor(float(algo.kwargs["lr"]), dtype=torch.float64, device=DEVICE)
    tensors = {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}
    flat = pureopt.FlatParams(tensors, max_buffer_bytes=max_bytes)  # type: ignore[arg-type]
    tx = flat.wrap(algo.build_pureopt("auto", lr=lr))
    grads = flat.flatten({str(i): g for i, g in enumerate(grads_data)})
    holder = {"buffers": flat.buffers, "state": tx.init(flat.buffers)}

    def step(grads: Any, state: Any, buffers: Any) -> Any:
        return pureopt.step(tx, grads, state, buffers, donate=donate)

    if compiled:  # a code object of its own: dynamo caches (and limits recompiles) per code object, not per closure
        step.__code__ = step.__code__.replace()
    fn = torch.compile(step, fullgraph=True) if compiled else step

    def run() -> None:
        holder["buffers"], holder["state"] = fn(grads, holder["state"], holder["buffers"])

    return run, holder


def _capture(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` warmed up on a side stream, captured in a CUDA graph; returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graph_runners(algo: Algo, shapes: list[tuple[int, ...]], grads_data: list[torch.Tensor]) -> dict[str, Any]:
    """The CUDA-graph rows: pureopt's donated step and (where torch has one) torch's fused step, lr a device
    tensor so that a scheduler could change it between replays."""
    runners: dict[str, Callable[[], None]] = {}
    module, fn = algo.factory.split(":")
    lr = torch.tensor(float(algo.kwargs["lr"]), device=DEVICE)
    tx = getattr(importlib.import_module(module), fn)(impl="auto", **{**algo.kwargs, "lr": lr})
    params = {str(i): p for i, p in enumerate(make_tensors(shapes, seed=0))}
    grads = {str(i): g.clone() for i, g in enumerate(grads_data)}
    holder = {"state": tx.init(params)}

    def donated() -> None:
        new = pureopt.inplace_step(tx, grads, holder["state"], params)
        for old, fresh in zip(pureopt.tree.leaves(holder["state"]), pureopt.tree.leaves(new)):
            if isinstance(old, torch.Tensor) and fresh is not old:
                old.copy_(fresh)

    try:
        runners["pureopt-graph"] = _capture(donated)
    except Exception as exc:  # report, keep the other rows
        print(f"  pureopt-graph {algo.name}: capture failed: {type(exc).__name__}: {exc}")
    if algo.torch_cls is not None and algo.fused:
        ps = [p.requires_grad_(True) for p in make_tensors(shapes, seed=0)]
        for p, g in zip(ps, grads_data):
            p.grad = g.clone()
        t_lr = torch.tensor(float(algo.kwargs["lr"]), device=DEVICE)
        opt = getattr(torch.optim, algo.torch_cls)(ps, **{**algo.kwargs, "lr": t_lr}, fused=True)
        try:
            runners["torch-fused-graph"] = _capture(opt.step)
        except Exception as exc:
            print(f"  torch-fused-graph {algo.name}: capture failed: {type(exc).__name__}: {exc}")
    return runners


def transient_bytes(fn: Callable[[], None]) -> int:
    """The most memory one call of ``fn`` holds at once in tensors it allocated (its new outputs included), from
    the profiler's memory timeline (``torch.profiler`` with ``profile_memory``): allocations made before the call
    are not counted, nor their release."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA if DEVICE.type == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
        sync()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            live += size
        elif name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


LAST_FAULTS = [0]
"""Minor page faults of this process during the last CPU call of :func:`time_once` (memory the step touched for
the first time since the kernel gave it to the process: fresh ``mmap``s, a heap grown again after a trim)."""


def time_once(fn: Callable[[], None], inner: int) -> float:
    """Seconds per call of ``fn``: one call on the CPU (its minor page faults in :data:`LAST_FAULTS`); on CUDA,
    events around ``inner`` calls."""
    if DEVICE.type != "cuda":
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t
        LAST_FAULTS[0] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return elapsed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def bench(
    algo: Algo,
    set_name: str,
    scale: float,
    rounds: int,
    warmup: int,
    bandwidth: float,
    inner: int = 1,
    compiled: list[str] | None = None,
    compile_timeout: float = 240.0,
    memory: bool = False,
    keep: list[str] | None = None,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    shapes = param_shapes(set_name, scale)
    n_params = sum(math.prod(s) for s in shapes)
    runners = build_runners(algo, shapes)
    if keep:  # --rows: these eager rows (a FlatParams label matches each of its sizes) and torch-fused
        runners = {k: v for k, v in runners.items() if k.split("@")[0] in keep or k == "torch-fused"}
    compile_s: dict[str, float] = {}
    failed: dict[str, str] = {}
    if compiled:
        extra, compile_s, failed = compiled_runners(
            algo, shapes, make_tensors(shapes, seed=1), compiled, compile_timeout
        )
        runners.update(extra)
    times: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[int]] = {k: [] for k in runners}
    rng = random.Random(0)
    load = [os.getloadavg()[0]]  # 1-minute load average at the start and after each repeat
    for r in range(warmup + rounds):
        order = list(runners)
        rng.shuffle(order)
        for label in order:
            elapsed = time_once(runners[label], inner)
            if r >= warmup:
                times[label].append(elapsed)
                faults[label].append(LAST_FAULTS[0])
        if r >= warmup and (r - warmup + 1) % max(1, rounds // repeats) == 0:
            load.append(os.getloadavg()[0])
    transient = {k: transient_bytes(fn) for k, fn in runners.items()} if memory else {}
    medians = {k: statistics.median(v) for k, v in times.items()}
    quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for k, v in times.items()}
    torch_best = min((v for k, v in medians.items() if k.startswith("torch")), default=float("nan"))
    best_label = min((k for k in medians if k.startswith("torch")), key=medians.__getitem__, default=None)
    # --repeats: the timed rounds cut into consecutive blocks; in each, the ratio of the row's median to the median
    # of torch's best row over the same rounds (interleaved, so both saw the same load)
    block = max(1, rounds // repeats)
    repeat_ratios: dict[str, list[float]] = {}
    if best_label is not None and repeats > 1:
        for k, v in times.items():
            base = times[best_label]
            repeat_ratios[k] = [
                statistics.median(v[i : i + block]) / statistics.median(base[i : i + block])
                for i in range(0, block * repeats, block)
                if v[i : i + block]
            ]
    bound = algo.bytes_per_param(4) * n_params / bandwidth
    rows = []
    del runners
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()

    def row(label: str) -> dict[str, Any]:
        return {"set": set_name, "tensors": len(shapes), "params": n_params, "algo": algo.name, "impl": label}

    for label, t in medians.items():
        rows.append(
            {
                **row(label),
                "median_ms": t * 1e3,
                "ratio_to_torch_best": t / torch_best,
                "bandwidth_fraction": bound / t,
                "p25_ms": quartiles[label][0] * 1e3,
                "p75_ms": quartiles[label][2] * 1e3,
                "loadavg_1min": load,
            }
        )
        if DEVICE.type != "cuda":
            rows[-1]["page_faults_per_step"] = statistics.median(faults[label])
        if label in repeat_ratios:
            rows[-1]["repeat_ratios"] = repeat_ratios[label]
            rows[-1]["ratio_median_of_repeats"] = statistics.median(repeat_ratios[label])
        if label in compile_s:
            rows[-1]["compile_s"] = compile_s[label]
            rows[-1]["compile_cpu_s"] = compile_s.get(label + ":cpu")
            rows[-1]["compiler_init_s"] = compile_s.get("compiler-init")
        if label in transient:
            rows[-1]["transient_bytes"] = transient[label]
    for label, why in failed.items():
        rows.append(
            {
                **row(label),
                "median_ms": None,
                "ratio_to_torch_best": None,
                "bandwidth_fraction": None,
                "compile_s": None,
                "error": why,
            }
        )
    return rows


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "loadavg_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="large,medium,many-small", help="also: small")
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma list, or 'all'")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply tensor sizes (smoke runs)")
    parser.add_argument("--quick", action="store_true", help="--scale 0.01 --rounds 3 --warmup 1")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--inner", type=int, default=10, help="(cuda) steps per timed measurement")
    parser.add_argument("--compiled", action="store_true", help="add the torch.compile rows (inductor)")
    parser.add_argument(
        "--compiled-rows",
        default="pureopt-compiled,pureopt-compiled-flatparams,pureopt-compiled-flatparams-donated",
        help=f"with --compiled: comma list of {', '.join(COMPILED_ROWS)}",
    )
    parser.add_argument("--compile-timeout", type=float, default=240.0, help="CPU seconds allowed for one cold compile")
    parser.add_argument(
        "--compile-threads",
        type=int,
        default=1,
        help="inductor's compile workers (TORCHINDUCTOR_COMPILE_THREADS); 1 (default) compiles in this process, so "
        "that the CPU seconds of a compile are measured (on a shared machine they say more than wall time)",
    )
    parser.add_argument(
        "--flatparams-max-mib",
        default="auto",
        help="FlatParams rows: FlatParams(max_buffer_bytes=...) in MiB (0: one buffer per group; auto: the default); "
        "a comma list gives one row per value (labels label@one, label@16MiB, label@auto), all interleaved",
    )
    parser.add_argument(
        "--rows",
        default="",
        help="keep only these eager rows (comma list of labels; torch-fused is always kept as the baseline)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="cut the timed rounds into this many consecutive blocks and report each row's ratio to torch's best "
        "per block (median and spread over the blocks), with the load average after each block",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch's intra-op threads (0: torch's default); 1 keeps timings meaningful on a machine shared with "
        "other work, where a parallel kernel waits for its slowest, descheduled thread",
    )
    parser.add_argument(
        "--memory", action="store_true", help="also report each row's peak transient memory (one profiled call)"
    )
    parser.add_argument(
        "--no-materialize",
        action="store_true",
        help="the compiled step as before issue 17's fix: per-tensor scalars not passed through pureopt::materialize",
    )
    args = parser.parse_args()
    if args.no_materialize:
        import pureopt.kernels.common as common

        common.materialize_when_compiling = lambda values: values  # type: ignore[assignment]
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(args.compile_threads))
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = [r for r in args.compiled_rows.split(",") if r] if args.compiled else None
    for r in compiled or ():
        if r not in COMPILED_ROWS:
            parser.error(f"unknown compiled row {r!r}")
    global DEVICE, FLATPARAMS_MAX_BYTES
    DEVICE = torch.device(args.device)
    FLATPARAMS_MAX_BYTES = [
        "auto" if m == "auto" else int(float(m) * 2**20) or None for m in args.flatparams_max_mib.split(",")
    ]
    if args.quick:
        args.scale, args.rounds, args.warmup = 0.01, 3, 1
    algos = list(ALGOS) if args.algos == "all" else args.algos.split(",")
    bandwidth = memory_bandwidth()
    info = machine()
    print(
        f"# {info['processor']}, {info['cpus']} CPUs, {info['device']}, torch {info['torch']}, "
        f"memory {bandwidth / 1e9:.1f} GB/s"
    )
    header = f"{'set':<11} {'algo':<13} {'impl':<36} {'ms':>9} {'x torch best':>13} {'of bw bound':>12}"
    print(header)
    print("-" * len(header))
    results = []
    for set_name in args.sets.split(","):
        for key in algos:
            algo = ALGOS[key]
            try:
                inner = args.inner if DEVICE.type == "cuda" else 1
                rows = bench(
                    algo, set_name, args.scale, args.rounds, args.warmup, bandwidth, inner, compiled,
                    args.compile_timeout, args.memory, [r for r in args.rows.split(",") if r], args.repeats,
                )  # fmt: skip
            except (ImportError, AttributeError) as exc:  # an algorithm this checkout does not have yet
                print(f"{set_name:<11} {algo.name:<13} skipped: {exc}")
                continue
            for row in rows:
                if "error" in row:
                    print(f"{row['set']:<11} {row['algo']:<13} {row['impl']:<36} {row['error']}")
                    continue
                print(
                    f"{row['set']:<11} {row['algo']:<13} {row['impl']:<36} {row['median_ms']:9.2f} "
                    f"{row['ratio_to_torch_best']:13.2f} {row['bandwidth_fraction']:12.0%}"
                    + (f"  (compile {row['compile_s']:.1f} s)" if row.get("compile_s") is not None else "")
                    + (f"  [{row['transient_bytes'] / 2**20:.1f} MiB]" if "transient_bytes" in row else "")
                    + (f"  faults {row['page_faults_per_step']:.0f}" if "page_faults_per_step" in row else "")
                    + (
                        f"  repeats {min(row['repeat_ratios']):.2f}-{max(row['repeat_ratios']):.2f}"
                        if "repeat_ratios" in row
                        else ""
                    )
                )
            results.extend(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "bandwidth_bytes_per_s": bandwidth, "args": vars(args), "rows": results}, fh,
                      indent=1)  # fmt: skip
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
