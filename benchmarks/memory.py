"""Optimizer memory per parameter (issue 16): stored state, the transient peak of one step, and the step time.

For Adam, AdamW, Lion, SGD-momentum and Adafactor with their state stored as fp32 / bf16 / fp8 / q8 (8-bit
block-wise) / q4 (4-bit block-wise) (``state_dtype=``, :mod:`pureopt.kernels.encoding`), side by side in one run
with ``torch.optim.AdamW(fused=True)`` (fp32 state) and, where they are installed, torchao's low-bit AdamW
(``torchao.optim.AdamW8bit`` / ``AdamW4bit`` / ``AdamWFp8``) and bitsandbytes' ``AdamW8bit``, on a ~10M-parameter
set shaped like a 16-layer transformer (``benchmarks/step.py``'s "medium": 196 fp32 tensors, 10.2M parameters).

Reported per row:

- **state B/param**: bytes of the stored optimizer state (every tensor of the state tree; encoded fields as their
  codes plus scales, :func:`pureopt.kernels.encoding.stored_bytes`; step counters included) / parameters. For the
  torch.optim-style optimizers: every tensor in ``optimizer.state`` (tensor subclasses by their inner tensors,
  shared tensors counted once).
- **donated transient**: the most memory one donated step holds at once in tensors it allocates, beyond what
  existed before it (``pureopt.inplace_step``; ``optimizer.step()`` for the stateful ones), after one warm-up
  step. Measured on the CPU allocator with ``torch.profiler.profile(profile_memory=True)``: the profiler records
  every allocation and free of torch's CPU allocator during the call (``[memory]`` events with address and size,
  read from its chrome trace); replayed in time order, frees of blocks that existed before the call ignored, the
  running sum's maximum is the peak. Memory allocated outside torch's allocator (a C library's ``malloc``) would
  not be seen.
- **pure transient**: the same for the pure step ``updates, new_state = tx.update(grads, state, params);
  new_params = apply_updates(params, updates)``, whose outputs (a new state and new parameters) are necessarily
  fresh memory; "pure scratch" is that peak minus the outputs still alive at the end.
- **step ms** (``--time``): the donated step, interleaved rounds in shuffled order, median and quartiles.

    python benchmarks/memory.py                               # everything (torchao's first steps compile: minutes)
    python benchmarks/memory.py --quick                       # a 1M-parameter set, few rounds: a smoke run
    python benchmarks/memory.py --json benchmarks/results/memory.json --markdown
    python benchmarks/memory.py --device cuda --algos adamw --skip torchao   # on a GPU (benchmarks/gpu_check.sh)

With ``--device cuda`` the tensors live on the GPU, the transient is the CUDA caching allocator's peak of allocated
bytes during the call beyond what was allocated before it (``torch.cuda.max_memory_allocated``), and each timed
step ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import optree
import torch

import pureopt
from pureopt.algorithms.storage import CHUNK_ELEMENTS
from pureopt.kernels.encoding import FloatEncoding, Quantized, stored_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import param_shapes  # (the parameter sets of the step benchmark)

MIB = 2**20
DEVICE = torch.device("cpu")
"""Where the parameters, gradients and states live (``--device``)."""

STORAGES: dict[str, Any] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp8": "fp8",
    "q8": "q8",
    "q4": "q4",
    # bf16 through the chunked encoding path (decode to fp32, step, round back); a bare torch.bfloat16 takes the
    # same path for float32 parameters (it ran the math in bf16 on whole tensors before)
    "bf16-enc": FloatEncoding(torch.bfloat16),
    # the same, written with stochastic rounding (random bits hashed per element and step)
    "bf16-sr": "bf16-sr",
}

ALGOS: dict[str, Callable[[Any], pureopt.GradientTransformation]] = {
    "adam": lambda sd: pureopt.adam(lr=1e-3, state_dtype=sd),
    "adamw": lambda sd: pureopt.adamw(lr=1e-3, weight_decay=0.01, state_dtype=sd),
    "lion": lambda sd: pureopt.lion(lr=1e-4, weight_decay=0.01, state_dtype=sd),
    "sgd-momentum": lambda sd: pureopt.sgd(lr=1e-2, momentum=0.9, state_dtype=sd),
    "adafactor": lambda sd: pureopt.adafactor(lr=1e-2, state_dtype=sd),
}


@dataclass
class Row:
    name: str
    algo: str
    storage: str
    state_bytes: int | None = None
    donated_peak: int | None = None
    pure_peak: int | None = None
    pure_outputs: int | None = None
    times: list[float] = field(default_factory=list)
    note: str = ""


# --- measuring ----------------------------------------------------------------------------------------------------


def transient_peak(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, still alive at the end) bytes of the tensors one call of ``fn`` allocates: the CPU allocator's
    allocation / free events recorded by ``torch.profiler`` (``profile_memory=True``), replayed in time order;
    frees of blocks allocated before the call are ignored. On a CUDA ``DEVICE``: the caching allocator's peak of
    allocated bytes during the call, beyond those allocated before it."""
    import json
    import tempfile

    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        del out
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    mine: dict[int, int] = {}
    live = peak = 0
    for e in mem:
        addr, size = e["args"]["Addr"], e["args"]["Bytes"]
        if size > 0:
            mine[addr] = size
            live += size
        elif addr in mine:
            live -= mine.pop(addr)
        peak = max(peak, live)
    return peak, live


def tree_state_bytes(state: Any) -> int:
    """Bytes of a pureopt state: every tensor leaf, encoded fields (``Quantized``) as codes plus scales."""
    leaves = optree.tree_leaves(state, is_leaf=lambda x: isinstance(x, Quantized), none_is_leaf=False)
    return sum(stored_bytes(x) for x in leaves if isinstance(x, torch.Tensor | Quantized))


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    attrs = getattr(type(t), "tensor_attrs", None)  # torchao's optimizer-state subclasses
    if attrs is None and hasattr(t, "__tensor_flatten__"):
        attrs = t.__tensor_flatten__()[0]
    if attrs:
        return [x for a in attrs for x in _inner_tensors(getattr(t, a))]
    return [t]


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of a torch.optim-style optimizer's state: its tensors (inner tensors of subclasses), each storage
    counted once (bitsandbytes shares its code maps)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in opt.state.values():
        for value in st.values():
            if not isinstance(value, torch.Tensor):
                continue
            for t in _inner_tensors(value):
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key in seen and key[0] != 0:
                    continue
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


# --- the rows -----------------------------------------------------------------------------------------------------


def make_set(shapes: list[tuple[int, ...]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen) * 0.02).to(DEVICE) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(DEVICE) for s in shapes]
    return params, grads


def compiled_row(
    row: Row, tx: Any, params: list[torch.Tensor], grads: list[torch.Tensor], state: Any
) -> tuple[Row, Callable]:
    """The donated step of ``row``'s optimizer under ``torch.compile(fullgraph=True)`` (inductor), as a row of its
    own (compiled on its first call, a warm-up round; its own copy of the parameters and state)."""
    params = [p.clone() for p in params]
    state = pureopt.tree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)
    fn = torch.compile(lambda g, s, p: pureopt.inplace_step(tx, g, s, p), fullgraph=True)
    holder = {"state": state}

    def compiled() -> None:
        holder["state"] = fn(grads, holder["state"], params)

    out = Row(f"{row.name} compiled", row.algo, row.storage, state_bytes=row.state_bytes)
    out.note = "torch.compile(fullgraph=True), inductor; donated step"
    return out, compiled


def pureopt_row(
    algo: str, storage: str, shapes: list[tuple[int, ...]], memory: bool, compiled: bool = False
) -> tuple[Row, Callable | None, tuple[Row, Callable] | None]:
    """Measure a pureopt row; return it, its donated step (for timing; None if refused) and, with ``compiled``,
    the compiled donated step's row and step."""
    row = Row(f"pureopt {algo} {storage}", algo, storage)
    try:
        tx = ALGOS[algo](STORAGES[storage])
    except (ValueError, TypeError) as exc:
        row.note = f"refused: {exc}"
        return row, None, None
    params, grads = make_set(shapes, 0)
    state = tx.init(params)
    row.state_bytes = tree_state_bytes(state)
    traced = compiled_row(row, tx, params, grads, state) if compiled else None
    holder = {"state": pureopt.inplace_step(tx, grads, state, params)}  # warm-up step

    def donated() -> None:
        holder["state"] = pureopt.inplace_step(tx, grads, holder["state"], params)

    if memory:
        row.donated_peak, _ = transient_peak(donated)

        def pure() -> Any:
            updates, new_state = tx.update(grads, holder["state"], params)
            return pureopt.apply_updates(params, updates), new_state

        row.pure_peak, row.pure_outputs = transient_peak(pure)
    return row, donated, traced


def external_rows(
    shapes: list[tuple[int, ...]], memory: bool, skip: set[str], torchao_eager: bool
) -> list[tuple[Row, Callable | None]]:
    """torch.optim.AdamW(fused=True) fp32, and torchao's / bitsandbytes' low-bit AdamW where they import.

    torchao compiles its per-parameter step with ``torch.compile``; with ``torchao_eager`` its rows run that same
    step eagerly (``torch.compile`` replaced by the identity, ``torch._dynamo`` disabled): the state is the same,
    the transient is the eager one, and they are not timed."""
    eager: set[str] = set()
    makers: list[tuple[str, str, Callable[[list[torch.Tensor]], torch.optim.Optimizer] | str]] = []
    if "torch" not in skip:
        fused = lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)
        makers.append(("torch.optim.AdamW fused", "fp32", fused))
    if "torchao" not in skip:
        try:
            import torchao.optim as tao

            def ao(cls: Any) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
                # lr a tensor, as torchao asks, so that a changed lr does not recompile
                return lambda ps: cls(ps, lr=torch.tensor(1e-3), weight_decay=0.01)

            makers += [
                ("torchao AdamW8bit", "q8", ao(tao.AdamW8bit)),
                ("torchao AdamW4bit", "q4", ao(tao.AdamW4bit)),
                ("torchao AdamWFp8", "fp8", ao(tao.AdamWFp8)),
            ]
            if torchao_eager:
                eager |= {"torchao AdamW8bit", "torchao AdamW4bit", "torchao AdamWFp8"}
        except Exception as exc:  # not installed / does not import
            makers.append(("torchao AdamW8bit", "q8", f"not available: {type(exc).__name__}: {exc}"))
    if "bnb" not in skip:
        try:
            import bitsandbytes as bnb

            makers.append(
                ("bitsandbytes AdamW8bit", "q8", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01))
            )
        except Exception as exc:
            makers.append(("bitsandbytes AdamW8bit", "q8", f"not available: {type(exc).__name__}: {exc}"))
    rows = []
    for name, storage, make in makers:
        row = Row(name, "adamw", storage)
        if isinstance(make, str):
            row.note = make
            rows.append((row, None))
            continue
        params, grads = make_set(shapes, 0)
        ps = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        no_compile = name in eager
        ctx = contextlib.ExitStack()
        if no_compile:  # torchao's torch.compile(single_param_adam, fullgraph=True) -> the function itself
            identity = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
            ctx.enter_context(mock.patch("torch.compile", identity))
            ctx.enter_context(torch._dynamo.config.patch(disable=True))  # (its helpers compiled at import)
        with ctx:
            try:
                opt = make(ps)
                t0 = time.perf_counter()
                opt.step()  # warm-up (creates the state; torchao compiles here unless eager)
                opt.step()
                warm = time.perf_counter() - t0
            except Exception as exc:
                row.note = f"fails on {DEVICE.type}: {type(exc).__name__}: {str(exc)[:160]}"
                rows.append((row, None))
                continue
            if no_compile:
                row.note = "eager (torch.compile disabled): transient of the eager step; not timed"
            elif warm > 10:
                row.note = f"first two steps {warm:.0f} s"
            row.state_bytes = optimizer_state_bytes(opt)
            if memory:
                row.donated_peak, _ = transient_peak(opt.step)
        rows.append((row, None if no_compile else opt.step))
        print(f"  {name}: ready ({warm:.1f} s warm-up), {row.state_bytes} state bytes, transient {row.donated_peak}",
              flush=True)  # fmt: skip
    return rows


def time_rows(steps: dict[str, Callable[[], Any]], rows: dict[str, Row], rounds: int, warmup: int) -> None:
    """Donated steps, one per round each, in a shuffled order every round; seconds appended to each row."""
    names = list(steps)
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if r >= warmup:
                rows[name].times.append(dt)


# --- report -------------------------------------------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def report(rows: list[Row], nparams: int, markdown: bool) -> list[dict[str, Any]]:
    ref = next((r for r in rows if r.name == "pureopt adamw fp32" and r.times), None)
    ref_ms = statistics.median(ref.times) * 1e3 if ref else None
    out = []
    for r in rows:
        d: dict[str, Any] = {"name": r.name, "algo": r.algo, "storage": r.storage, "note": r.note}
        if r.state_bytes is not None:
            d["state_bytes_per_param"] = r.state_bytes / nparams
        if r.donated_peak is not None:
            d["donated_transient_mib"] = r.donated_peak / MIB
            d["donated_total_bytes_per_param"] = (r.state_bytes + r.donated_peak) / nparams  # type: ignore[operator]
        if r.pure_peak is not None:
            d["pure_transient_mib"] = r.pure_peak / MIB
            d["pure_scratch_mib"] = (r.pure_peak - (r.pure_outputs or 0)) / MIB
        if r.times:
            q1, med, q3 = quartiles([t * 1e3 for t in r.times])
            d.update(step_ms_median=med, step_ms_q1=q1, step_ms_q3=q3)
            if ref_ms:
                d["vs_pureopt_adamw_fp32"] = med / ref_ms
        out.append(d)

    def f(d: dict[str, Any], key: str, fmt: str) -> str:
        return format(d[key], fmt) if key in d else "—"

    header = (
        "| optimizer | state | state B/param | donated transient MiB | state + transient B/param | "
        "pure transient MiB | pure scratch MiB | donated step ms (q1-q3) | x pureopt AdamW fp32 | note |"
    )
    lines = [header, "|" + "---|" * 10]
    for d in out:
        ms = (
            f"{d['step_ms_median']:.1f} ({d['step_ms_q1']:.1f}-{d['step_ms_q3']:.1f})" if "step_ms_median" in d else "—"
        )
        lines.append(
            f"| {d['name']} | {d['storage']} | {f(d, 'state_bytes_per_param', '.3f')} | "
            f"{f(d, 'donated_transient_mib', '.2f')} | {f(d, 'donated_total_bytes_per_param', '.3f')} | "
            f"{f(d, 'pure_transient_mib', '.1f')} | {f(d, 'pure_scratch_mib', '.1f')} | {ms} | "
            f"{f(d, 'vs_pureopt_adamw_fp32', '.2f')} | {d['note']} |"
        )
    text = "\n".join(lines)
    if markdown:
        print(text)
    else:
        for d in out:
            print(d)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1M-parameter set and few rounds (smoke run)")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated: " + ",".join(ALGOS))
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated: " + ",".join(STORAGES))
    parser.add_argument("--skip", default="", help="comma-separated external rows to leave out: torch,torchao,bnb")
    parser.add_argument(
        "--torchao-compiled", action="store_true",
        help="run torchao's rows compiled, as it ships (its first steps compile for minutes); default: eager, untimed",
    )  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled transient measurements")
    parser.add_argument(
        "--compiled", action="store_true", help="also time each AdamW row's donated step under torch.compile"
    )
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of the donated AdamW steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="skip the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a loaded machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU's allocator measures the transient)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)

    shapes = param_shapes("small" if args.quick else "medium")
    nparams = sum(torch.Size(s).numel() for s in shapes)
    rounds = 3 if args.quick else args.rounds
    memory = not args.no_memory
    print(
        f"{len(shapes)} tensors, {nparams / 1e6:.2f}M fp32 params; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
        f"{'; ' + torch.cuda.get_device_name() if DEVICE.type == 'cuda' else ''}; "
        f"chunk {CHUNK_ELEMENTS} elements ({CHUNK_ELEMENTS * 4 / MIB:.0f} MiB fp32)",
        flush=True,
    )
    rows: list[Row] = []
    steps: dict[str, Callable[[], Any]] = {}
    for algo in args.algos.split(","):
        for storage in args.storages.split(","):
            row, step, traced = pureopt_row(algo, storage, shapes, memory, args.compiled and algo == "adamw")
            rows.append(row)
            if step is not None and algo == "adamw":
                steps[row.name] = step
            if traced is not None:
                rows.append(traced[0])
                steps[traced[0].name] = traced[1]
            print(f"  {row.name}: {row.state_bytes} state bytes, transient donated {row.donated_peak} pure "
                  f"{row.pure_peak} (outputs {row.pure_outputs}) {row.note[:80]}", flush=True)  # fmt: skip
            gc.collect()
    for row, step in external_rows(shapes, memory, set(filter(None, args.skip.split(","))), not args.torchao_compiled):
        rows.append(row)
        if step is not None:
            steps[row.name] = step
    if not args.no_time:
        time_rows(steps, {r.name: r for r in rows}, rounds, args.warmup)
    results = report(rows, nparams, args.markdown)
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "params": nparams,
            "tensors": len(shapes),
            "chunk_elements": CHUNK_ELEMENTS,
            "rounds": rounds,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
