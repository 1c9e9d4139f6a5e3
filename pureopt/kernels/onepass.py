"""One pass over encoded state (CPU): an algorithm's own elementwise math, traced into a native loop that decodes,
steps and encodes each tile of a tensor's state in cache.

The chunked path (:func:`pureopt.algorithms.storage.run_chunks`) makes a separate pass per codec and per op of the
math over each ~128K-element chunk, with a Python round per chunk. Here the math is traced instead: the algorithm's
``math`` runs once per step on :class:`Sym` values (one per input: parameter, gradient, each state field), whose
``__torch_function__`` records every torch call it makes into a graph of elementwise operations. Numbers and 0-d
tensors become *slots* (the values of this step, passed at run time), per-tensor values (bias corrections) one slot
per tensor, so the generated code depends only on the math's structure and is built once per structure (C++ through
inductor's toolchain, as :mod:`pureopt.kernels.native`). The kernel (``onepass.cpp``) then runs, per tile of up to
4096 elements: decode the fields the math reads, the math over the tile (8 lanes at a time on AVX2), encode the
fields it wrote; tiles are spread over torch's intra-op threads.

Each recorded op is written out as the IEEE operations torch's CPU kernels use for it (``lerp``:
``fma(w, y - x, x)`` for ``|w| < 0.5`` else ``fma(w - 1, y - x, y)``; ``add(x, y, alpha)``: ``fma(y, alpha, x)``;
``addcmul``: ``fma(v * y, z, x)``; ``addcdiv``: ``x + v * y / z``; scalars rounded to float32 first), so the result
is the torch-op path's within rounding of the last bit where a kernel differs (the tests hold it to that), on every
CPU the same (the AVX2 and the portable loop compute the same operations). This is a kernel choice, like fused vs
foreach: the math stays the algorithm's one definition. A math the tracer cannot follow (an op it does not know, a
branch on values, reductions) raises :class:`Untraceable` and the step takes the chunked path.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from pureopt.kernels import native
from pureopt.kernels.dtensor import shard_starts
from pureopt.kernels.encoding import BlockEncoding, Encoding, FloatEncoding, shaped_like
from pureopt.kernels.rounding import plain_seeds

__all__ = ["Column", "Sym", "Untraceable", "eligible", "run", "trace"]

_log = logging.getLogger(__name__)

MAX_TILE = 4096
"""Largest tile (elements): the least common multiple of a tensor's field blocks must fit (the kernel's buffers)."""


class Untraceable(Exception):
    """The math does something the tracer does not follow (the step then takes the chunked path)."""


# --- the trace -------------------------------------------------------------------------------------------------------


class _Graph:
    """Nodes ``(op, *operands)``: operands are node ids, except in the leaves ``("in", k)`` (input ``k``) and
    ``("slot", k)`` (slot ``k`` broadcast), and ``lerp``'s weight (``("lerp", x, y, slot)``)."""

    def __init__(self, inputs: int) -> None:
        self.nodes: list[tuple[Any, ...]] = [("in", k) for k in range(inputs)]
        self.slots: list[float] = []  # per slot: this step's value (a column's slot: filled per tensor by run)

    def node(self, *op: Any) -> int:
        self.nodes.append(op)
        return len(self.nodes) - 1

    def slot(self, value: Any) -> int:
        """A node broadcasting the scalar ``value`` (a number, 0-d tensor or :class:`Column`)."""
        if isinstance(value, Column):
            if value.graph is not self:
                raise Untraceable("a value from another trace")
            return self.node("slot", value.slot)
        return self.node("slot", self.const(value))

    def const(self, value: Any) -> int:
        if isinstance(value, Tensor):
            if value.dim() != 0 or value.is_complex() or value.device.type != "cpu":
                raise Untraceable("a tensor that is not a real 0-d CPU scalar")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Untraceable(f"a scalar of type {type(value).__name__}")
        self.slots.append(float(value))
        return len(self.slots) - 1


class Column:
    """A per-tensor scalar (one value per tensor: a bias correction, a step size) in the trace."""

    __slots__ = ("graph", "slot")

    def __init__(self, graph: _Graph, slot: int) -> None:
        self.graph, self.slot = graph, slot

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        return _dispatch(func, args, kwargs or {})


class Sym:
    """A traced elementwise value (of every tensor at once): the math sees one-element lists of these. In-place
    torch ops rebind it to the op's result, as they would overwrite a tensor."""

    __slots__ = ("graph", "node")
    dtype = torch.float32
    device = torch.device("cpu")
    is_sparse = False

    def __init__(self, graph: _Graph, node: int) -> None:
        self.graph, self.node = graph, node

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        return _dispatch(func, args, kwargs or {})

    def dim(self) -> int:
        return 1

    def is_complex(self) -> bool:
        return False

    def clone(self) -> Sym:
        return Sym(self.graph, self.node)

    def __bool__(self) -> bool:
        raise Untraceable("a branch on tensor values")

    def _compare(self, other: Any) -> Any:  # (a tensor comparison: values, not identity; not traced)
        raise Untraceable("a comparison of tensor values")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _compare
    __hash__ = object.__hash__


def _value(graph: _Graph, x: Any) -> int:
    """The node of an operand: a traced value, or a scalar broadcast."""
    if isinstance(x, Sym):
        if x.graph is not graph:
            raise Untraceable("a value from another trace")
        return x.node
    return graph.slot(x)


def _scalar(x: Any) -> Any:
    """A scalar argument: a number, 0-d tensor or Column (a one-element per-tensor list: its element)."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise Untraceable("a per-tensor list of another length")
        x = x[0]
    if isinstance(x, Sym):
        raise Untraceable("a traced value where torch takes a scalar")
    return x


def _lerp(g: _Graph, x: int, y: int, w: Any) -> int:
    w = _scalar(w)
    if isinstance(w, Column):
        if w.graph is not g:
            raise Untraceable("a value from another trace")
        return g.node("lerp", x, y, w.slot)
    return g.node("lerp", x, y, g.const(w))


def _pow(g: _Graph, x: int, e: Any) -> int:
    e = _scalar(e)
    if isinstance(e, Tensor) or not isinstance(e, (int, float)):
        raise Untraceable("pow with a tensor exponent")
    e = float(e)
    one = g.slot(1.0)
    if e == 1.0:
        return x
    if e == 2.0:  # (torch's pow special cases: products, sqrt, reciprocals)
        return g.node("mul", x, x)
    if e == 3.0:
        return g.node("mul", g.node("mul", x, x), x)
    if e == 0.5:
        return g.node("sqrt", x)
    if e == -0.5:
        return g.node("div", one, g.node("sqrt", x))
    if e == -1.0:
        return g.node("div", one, x)
    if e == -2.0:
        return g.node("div", one, g.node("mul", x, x))
    raise Untraceable(f"pow with exponent {e}")


def _binary(op: str) -> Callable[..., int]:
    def fn(g: _Graph, x: Any, y: Any, alpha: Any = 1.0) -> int:
        a = _value(g, x)
        b = _value(g, y if isinstance(y, Sym) else _scalar(y))
        if op in ("add", "sub"):
            alpha = _scalar(alpha)
            if isinstance(alpha, Tensor) or alpha != 1:  # x + alpha * y as one fma (torch's add kernel)
                if not isinstance(y, Sym):
                    raise Untraceable("add with a scalar and alpha")
                return g.node("fma", b, g.slot(alpha if op == "add" else -alpha), a)
        return g.node(op, a, b)

    return fn


def _addc(op: str) -> Callable[..., int]:
    def fn(g: _Graph, x: Any, y: Any, z: Any, value: Any = 1.0) -> int:
        if not isinstance(x, Sym):
            raise Untraceable(f"{op} into a scalar")
        a = _value(g, x)
        b, c = (_value(g, v if isinstance(v, Sym) else _scalar(v)) for v in (y, z))
        scaled = g.node("mul", g.slot(_scalar(value)), b)
        if op == "addcmul":  # fma(value * y, z, x); addcdiv: x + value * y / z
            return g.node("fma", scaled, c, a)
        return g.node("add", a, g.node("div", scaled, c))

    return fn


def _unary(op: str) -> Callable[..., int]:
    def fn(g: _Graph, x: Any) -> int:
        if not isinstance(x, Sym):
            raise Untraceable(f"{op} of a scalar")
        a = _value(g, x)
        if op == "reciprocal":
            return g.node("div", g.slot(1.0), a)
        return g.node(op, a)

    return fn


def _clamp(op: str) -> Callable[..., int]:
    def fn(g: _Graph, x: Any, bound: Any) -> int:
        if isinstance(bound, Sym):
            raise Untraceable(f"{op} with a tensor bound")
        return g.node(op, _value(g, x), g.slot(_scalar(bound)))

    return fn


def _maximum(g: _Graph, x: Any, y: Any) -> int:
    if not (isinstance(x, Sym) and isinstance(y, Sym)):
        raise Untraceable("maximum with a scalar")
    return g.node("maximum", x.node, y.node)


_OPS: dict[str, Callable[..., int]] = {
    "add": _binary("add"),
    "sub": _binary("sub"),
    "mul": _binary("mul"),
    "div": _binary("div"),
    "lerp": lambda g, x, y, w: _lerp(g, _value(g, x), _value(g, y), w),
    "addcmul": _addc("addcmul"),
    "addcdiv": _addc("addcdiv"),
    "maximum": _maximum,
    "neg": _unary("neg"),
    "sqrt": _unary("sqrt"),
    "abs": _unary("abs"),
    "sign": _unary("sign"),
    "reciprocal": _unary("reciprocal"),
    "pow": lambda g, x, e: _pow(g, _value(g, x), e),
    "clamp_min": _clamp("clamp_min"),
    "clamp_max": _clamp("clamp_max"),
}


def _dispatch(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """A torch call on traced values: recorded (foreach calls element by element over one-element lists)."""
    name = getattr(func, "__name__", "")
    foreach = name.startswith("_foreach_")
    base = name[len("_foreach_") :] if foreach else name
    inplace = base.endswith("_") and not base.startswith("_")
    base = base.rstrip("_")
    out = kwargs.get("out")
    kwargs = {k: v for k, v in kwargs.items() if k != "out"}
    first = args[0] if args else None
    items = first if foreach else [first]
    if not isinstance(items, (list, tuple)) or len(items) != 1 or not isinstance(items[0], Sym):
        raise Untraceable(f"{name} on something other than one traced value")
    target: Sym = items[0]
    graph = target.graph
    if base in ("copy", "clone", "detach", "contiguous"):
        src = target if base != "copy" else (args[1][0] if foreach else args[1])
        if not isinstance(src, Sym):
            raise Untraceable(f"{name} from a non-traced value")
        node = src.node
    else:
        fn = _OPS.get(base)
        if fn is None:
            raise Untraceable(f"torch.{name} is not traced")
        rest = [a[0] if foreach and isinstance(a, (list, tuple)) and len(a) == 1 else a for a in args[1:]]
        if base in ("addcmul", "addcdiv") and foreach and len(rest) == 3:  # (foreach: the values positionally)
            kwargs = {**kwargs, "value": rest.pop()}
        try:
            node = fn(graph, target, *rest, **kwargs)
        except TypeError as exc:
            raise Untraceable(f"{name}: {exc}") from exc
    if inplace:
        target.node = node
        return None if foreach else target
    if out is not None:
        if not isinstance(out, Sym):
            raise Untraceable(f"{name} into a non-traced out=")
        out.node = node
        return out
    result = Sym(graph, node)
    return [result] if foreach else result


class Traced:
    """A traced step: its graph, which inputs it reads and which fields it writes, and its C++ source."""

    def __init__(self, graph: _Graph, nfields: int, outputs: list[int | None]) -> None:
        self.graph, self.outputs = graph, outputs
        self.source = _emit(graph, nfields, outputs)


def trace(
    math_fn: Callable[[Any], tuple[Any, Mapping[str, Any]]],
    make_kernel: Callable[..., Any],
    fields: Sequence[str],
    columns: Sequence[str],
    has_params: bool,
    apply: bool,
) -> Traced:
    """Trace ``math_fn(make_kernel(p=..., g=..., <field>=..., <column>=..., target=...))``: the kernel's lists are
    one-element lists of :class:`Sym` (fields) / :class:`Column` (columns). Output 0: the new parameter (``apply``)
    or the update; then each field's new value (``None``: not written)."""
    graph = _Graph(2 + len(fields))
    p = Sym(graph, 0) if has_params else None
    g = Sym(graph, 1)
    syms = {key: Sym(graph, 2 + j) for j, key in enumerate(fields)}
    cols = {name: [Column(graph, graph.const(0.0))] for name in columns}  # (slot values filled per tensor)
    k = make_kernel(
        p=None if p is None else [p], g=[g], apply=apply, target=[p] if apply and p is not None else None,
        **{key: [s] for key, s in syms.items()}, **cols,
    )  # fmt: skip
    try:
        updates, new = math_fn(k)
    except Untraceable:
        raise
    except Exception as exc:  # (an attribute or call a Sym does not have: the math needs real tensors)
        raise Untraceable(f"{type(exc).__name__}: {exc}") from exc
    if apply:
        if updates is not None or p is None:
            raise Untraceable("the math returned updates while applying them")
        first = p.node
    else:
        if updates is None or len(updates) != 1 or not isinstance(updates[0], Sym):
            raise Untraceable("the math returned no traced update")
        first = updates[0].node
    outputs: list[int | None] = [first]
    for key in fields:
        value = new.get(key)
        if value is None:
            outputs.append(None)
        elif len(value) == 1 and isinstance(value[0], Sym) and value[0].graph is graph:
            outputs.append(value[0].node)
        else:
            raise Untraceable(f"the new {key} is not a traced value")
    extra = [key for key in new if key not in fields]
    if extra:
        raise Untraceable(f"the math changes {extra[0]}, which is not a per-element field")
    return Traced(graph, len(fields), outputs)


# --- C++ -----------------------------------------------------------------------------------------------------------


def _operands(op: tuple[Any, ...]) -> tuple[int, ...]:
    kind = op[0]
    return () if kind in ("in", "slot") else op[1:3] if kind == "lerp" else op[1:]


def _emit(graph: _Graph, nfields: int, outputs: list[int | None]) -> str:
    """The generated part of onepass.cpp: constants and the math over a tile, as an AVX2 and a portable loop."""
    live: set[int] = set()
    stack = [n for n in outputs if n is not None]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack += _operands(graph.nodes[n])
    order = sorted(live)
    reads = [2 + j in live for j in range(nfields)]
    # (a field the math left as it was has its input as output: neither decoded for that nor encoded)
    writes = [o is not None and o != 2 + j for j, o in enumerate(outputs[1:])]
    inputs = [graph.nodes[n][1] for n in order if graph.nodes[n][0] == "in"]
    slots = sorted({graph.nodes[n][1] for n in order if graph.nodes[n][0] == "slot"})
    lerps = [n for n in order if graph.nodes[n][0] == "lerp"]
    names = {n: (f"i{graph.nodes[n][1]}" if graph.nodes[n][0] == "in" else f"S{graph.nodes[n][1]}") for n in order}
    body: list[str] = []
    for n in order:
        op = graph.nodes[n]
        if op[0] in ("in", "slot"):
            continue
        names[n] = f"t{n}"
        args = [names[a] for a in _operands(op)]
        if op[0] == "lerp":  # torch's: fma(w, y - x, x) for |w| < 0.5, else fma(w - 1, y - x, y)
            x, y = args
            body.append(f"const V d{n} = sub({y}, {x});")
            body.append(f"const V t{n} = small{n} ? fma(W{n}, d{n}, {x}) : fma(M{n}, d{n}, {y});")
        else:
            body.append(f"const V t{n} = {op[0]}({', '.join(args)});")
    stores = [(0, outputs[0])] + [(1 + j, o) for j, o in enumerate(outputs[1:]) if writes[j]]

    def flags(values: list[bool]) -> str:
        return ", ".join("true" if v else "false" for v in values) or "false"

    def loop(vector: bool) -> list[str]:
        bc = "bc8" if vector else "bc"
        out = [f"  const V S{k} = {bc}(s[{k}]);" for k in slots]
        for n in lerps:
            k = graph.nodes[n][3]
            out.append(f"  const bool small{n} = std::fabs(s[{k}]) < 0.5f;")
            out.append(f"  const V W{n} = {bc}(s[{k}]), M{n} = {bc}(s[{k}] - 1.0f);")
        out.append("  for (; e + 8 <= n; e += 8) {" if vector else "  for (; e < n; ++e) {")
        out += [f"    const V i{k} = {f'load8(in[{k}] + e)' if vector else f'in[{k}][e]'};" for k in inputs]
        out += [f"    {line}" for line in body]
        for slot, node in stores:
            assert node is not None
            out.append(
                f"    store8(out[{slot}] + e, {names[node]});" if vector else f"    out[{slot}][e] = {names[node]};"
            )
        return [*out, "  }"]

    signature = "(const float* const* in, float* const* out, int64_t e, int64_t n, const float* s)"
    return "\n".join([
        f"constexpr int64_t kFields = {nfields}, kSlots = {len(graph.slots)};",
        f"constexpr bool kReads[] = {{{flags(reads)}}};",
        f"constexpr bool kWrites[] = {{{flags(writes)}}};",
        "#ifdef PUREOPT_X86",
        "namespace avx {",
        "using V = F8;",
        f'__attribute__((target("avx2,fma"))) int64_t math{signature} {{',
        *loop(True),
        "  return e;",
        "}",
        "}  // namespace avx",
        "#endif",
        "namespace portable {",
        "using V = float;",
        f"void math{signature} {{",
        *loop(False),
        "}",
        "}  // namespace portable",
    ])  # fmt: skip


# --- running it ------------------------------------------------------------------------------------------------------

_PLAIN, _CODE8, _CODE4, _FLOAT8, _BF16, _BF16_STOCHASTIC = 0, 1, 2, 3, 4, 5
_M32 = 0xFFFFFFFF
_F32_IN, _BF16_IN, _BF16_ADD = 0, 1, 2  # (how the parameter / gradient is stored: onepass.cpp's Tensors)
_MBITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
_BUILT: dict[str, Callable[..., Any] | None] = {}


@functools.cache
def _sources() -> tuple[str, str]:
    files = resources.files("pureopt.kernels")
    return files.joinpath("codecs.cpp").read_text(), files.joinpath("onepass.cpp").read_text()


def _kernel(source: str) -> Callable[..., Any] | None:
    """The built kernel for a generated math (``None`` where it does not build: the chunked path runs)."""
    if source in _BUILT:
        return _BUILT[source]
    fn = None
    if native._kernel() is not None:  # (PUREOPT_NATIVE=0, no toolchain: neither)
        codecs, driver = _sources()
        full = "#define PUREOPT_CODECS_ONLY 1\n" + codecs + "\n" + driver.replace("@MATH@", source)
        try:
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            fn = CppPythonBindingsCodeCache.load_pybinding(["const int64_t*", "const double*", "int64_t", "int64_t"],
                                                           full)  # fmt: skip
        except Exception as exc:
            _log.warning("pureopt: one-pass kernel did not build (%s); using the chunked path", exc)
    _BUILT[source] = fn
    return fn


def _dense(t: Any, dtypes: tuple[torch.dtype, ...], n: int | None = None, least: int | None = None) -> bool:
    """A plain, contiguous CPU tensor of one of ``dtypes`` that autograd does not record, with exactly ``n`` (or at
    least ``least``, flat) elements: what the kernel may read and write through a raw pointer."""
    return (
        type(t) is Tensor and t.layout == torch.strided and t.dtype in dtypes and t.is_cpu and t.is_contiguous()
        and not t.requires_grad and (n is None or t.numel() == n)
        and (least is None or (t.dim() == 1 and t.numel() >= least))
    )  # fmt: skip


_F32, _BF16_DTYPE = (torch.float32,), (torch.bfloat16,)


def _field_row(
    enc: Encoding | None, stored: Any, out: Any, n: int, rounding: tuple[int, int, int] | None
) -> tuple[list[int], list[float]] | None:
    """A field's kFieldInts and kFieldVals for one tensor (see onepass.cpp), or ``None`` if the kernel cannot take
    it. ``rounding``: for stochastically rounded bfloat16, ``(seed, mixed seed, place of element 0)``."""
    if isinstance(enc, FloatEncoding) and enc.dtype == torch.bfloat16:
        if not (_dense(stored, _BF16_DTYPE, n) and _dense(out, _BF16_DTYPE, n)):
            return None
        ptrs = [stored.data_ptr(), 0, out.data_ptr(), 0]
        if enc.stochastic and rounding is not None:
            return [_BF16_STOCHASTIC, 1, 0, *ptrs, *rounding], [0.0, 0.0]
        return [_BF16, 1, 0, *ptrs, 0, 0, 0], [0.0, 0.0]
    if enc is None or (isinstance(enc, FloatEncoding) and enc.dtype == torch.float32 and not enc.stochastic):
        if not (_dense(stored, _F32, n) and _dense(out, _F32, n)):
            return None
        return [_PLAIN, 1, 0, stored.data_ptr(), 0, out.data_ptr(), 0, 0, 0, 0], [0.0, 0.0]
    spec = _block_spec(enc) if isinstance(enc, BlockEncoding) else None
    if spec is None:
        return None
    kind, block, shift, dtype, tables, vals = spec
    codes, scale = stored
    ncodes, blocks = ((n + 1) // 2 if kind == _CODE4 else n), -(-n // block)
    if not (_dense(codes, (dtype,), least=ncodes) and _dense(scale, _F32, least=blocks)):
        return None
    if out is not stored and not (_dense(out[0], (dtype,), least=ncodes) and _dense(out[1], _F32, least=blocks)):
        return None
    return [kind, block, shift, codes.data_ptr(), scale.data_ptr(), out[0].data_ptr(), out[1].data_ptr(), *tables], vals


def _as_floats(values: Sequence[Any]) -> list[float]:
    """A column's per-tensor values (numbers or 0-d tensors) as Python floats, tensors read in one call."""
    if values and all(isinstance(v, Tensor) for v in values):
        return torch.stack([v.detach().to(device="cpu", dtype=torch.float64) for v in values]).tolist()
    return [float(v) for v in values]


_Spec = tuple[int, int, int, torch.dtype, list[int], list[float]]
_SPECS: weakref.WeakKeyDictionary[BlockEncoding, _Spec | None] = weakref.WeakKeyDictionary()


def _block_spec(enc: BlockEncoding) -> _Spec | None:
    """What the kernel needs of a block encoding (kind, block, shift, codes dtype, table pointers, top and low), or
    ``None`` where it cannot take it; once per encoding (the tables live as long as the process)."""
    if enc in _SPECS:
        return _SPECS[enc]
    spec: _Spec | None = None
    if enc._native_fits() and enc.block <= MAX_TILE:
        if enc.dtype is not None:
            spec = (_FLOAT8, enc.block, _MBITS[enc.dtype], enc.dtype, [0, 0, 0], [enc.top, enc._low])
        else:
            t = enc._tables(torch.device("cpu"))
            if t.lookup is not None:
                ptrs = [t.code.data_ptr(), t.lookup.data_ptr(), t.padded.data_ptr()]
                spec = (_CODE8 if enc.bits == 8 else _CODE4, enc.block, t.shift, torch.uint8, ptrs, [enc.top, 0.0])
    _SPECS[enc] = spec
    return spec


def eligible(params: list[Tensor] | None, grads: list[Tensor]) -> bool:
    """Whether a step over these tensors can take the one-pass kernel: float32 or bfloat16 CPU tensors, contiguous,
    eager (not traced by dynamo, not under a ``torch.func`` transform)."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    tensors = [*grads, *(params or [])]
    return all(_dense(t, (torch.float32, torch.bfloat16)) for t in tensors) and native.available(*tensors[:1])


def run(
    math_fn: Callable[[Any], tuple[Any, Mapping[str, Any]]],
    make_kernel: Callable[..., Any],
    params: list[Tensor] | None,
    grads: list[Tensor],
    fields: Mapping[str, list[Any]],
    encodings: Mapping[str, Encoding],
    columns: Mapping[str, list[Any]],
    *,
    donate: bool,
    apply: bool,
    counter: Tensor | None = None,
    streams: Sequence[int] | None = None,
) -> tuple[list[Tensor] | None, dict[str, list[Any]]] | None:
    """One step over encoded (and plain float32) per-element fields in one pass per tensor; ``None`` where the
    kernel cannot take it (the caller runs the chunked path). Same contract as
    :func:`pureopt.algorithms.storage.run_chunks`: the updates (``None`` when ``apply``: added into the parameters)
    and the new stored fields (the stored ones themselves when ``donate``); ``counter`` keys stochastic rounding
    (with the tensor's stream, ``streams[i]`` or its position, and each element's place, as there)."""
    if not eligible(params, grads) or (params is not None and len(params) != len(grads)):
        return None
    # bfloat16 parameters: the math returns the update, which the kernel adds and rounds to nearest (p.add_(u))
    low = params is not None and any(p.dtype == torch.bfloat16 for p in params)
    if low and apply and any(p.dtype != torch.bfloat16 for p in params or []):
        return None
    keys = list(fields)
    try:
        traced = trace(math_fn, make_kernel, keys, list(columns), params is not None, apply and not low)
    except Untraceable as exc:
        _log.debug("pureopt: one-pass kernel not used: %s", exc)
        return None
    fn = _kernel(traced.source)
    if fn is None:
        return None
    writes = [o is not None and o != 2 + j for j, o in enumerate(traced.outputs[1:])]
    base = list(traced.graph.slots)
    numbers = [_as_floats(values) for values in columns.values()]
    starts = shard_starts() or []
    starts = starts if len(starts) == len(grads) else [0] * len(grads)
    updates = None if apply else [torch.empty_like(g, dtype=torch.float32) for g in grads]
    new: dict[str, list[Any]] = {}
    desc: list[list[int]] = []
    vals: list[list[float]] = []
    for i, g in enumerate(grads):
        n = g.numel()
        row_ints: list[int] = []
        row_vals = list(base)
        for slot, values in enumerate(numbers):  # (the columns hold the first slots: see trace)
            row_vals[slot] = values[i]
        tiles = [1]
        for j, key in enumerate(keys):
            stored = fields[key][i]
            enc = encodings.get(key)
            local_enc, local = (None, stored) if enc is None else enc.local(stored)
            if donate or not writes[j]:
                out = local
            elif isinstance(local, Tensor) or local_enc is None:
                out = torch.empty_like(local)
            else:
                out = local_enc.like(local)
            rounding = None
            if isinstance(local_enc, FloatEncoding) and local_enc.stochastic and counter is not None:
                stream = streams[i] if streams is not None else i
                seeds = plain_seeds(torch.tensor(local_enc.stream_key(stream), dtype=torch.int64), counter)
                if seeds is None:
                    return None
                rounding = (*seeds, starts[i] & _M32)
            row = _field_row(local_enc, local, out, n, rounding)
            if row is None:
                return None
            row_ints += row[0]
            row_vals += row[1]
            tiles.append(row[0][1])
            new.setdefault(key, []).append(out if donate or not writes[j] else shaped_like(out, stored))
        tile = math.lcm(*tiles)
        tile = tile * max(1, 2048 // tile) if tile < 2048 else tile
        if tile > MAX_TILE:
            return None
        p = 0 if params is None else params[i].data_ptr()
        dst = params[i].data_ptr() if apply and params is not None else updates[i].data_ptr()  # type: ignore[index]
        bf16 = params is not None and params[i].dtype == torch.bfloat16
        kinds = [(_BF16_ADD if apply else _BF16_IN) if bf16 else _F32_IN, _BF16_IN if g.dtype == torch.bfloat16 else 0]
        desc.append([n, p, g.data_ptr(), dst, tile, *kinds, *row_ints])
        vals.append(row_vals)
    if not desc:
        return updates, {key: list(v) for key, v in fields.items()}
    portable = native._vector_flag() != 0
    fn(torch.tensor(desc, dtype=torch.int64), torch.tensor(vals, dtype=torch.float64), len(desc), int(portable))
    return updates, {key: (list(fields[key]) if donate or not writes[j] else new[key]) for j, key in enumerate(keys)}
