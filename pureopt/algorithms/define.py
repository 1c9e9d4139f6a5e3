"""One definition per algorithm: hyperparameters, state fields and math, from which every path follows.

An algorithm module declares three things, each once:

* **Hyperparameters** — in the signature of its public function: names, defaults, and torch.optim's validation as
  ``Annotated`` types (:data:`LR`, :data:`Betas`, :data:`Eps`, :data:`NonNeg`, :data:`Impl`, or
  ``Annotated[float, nonneg("label")]``); the docstring documents them (:meth:`Algorithm.public` fills in the
  arguments every algorithm shares, ``lr``, ``maximize``, ``impl`` and ``state_dtype``, where its ``Args:``
  section leaves them out). The function body is
  ``return ALGO.build(locals())``; :meth:`Algorithm.public` validates (in signature order, with torch's wording)
  before the body runs. A ``scale_by_*`` primitive is the same with fewer arguments: the others take the
  algorithm's *neutral* values (``lr=None``: return the positive direction, no weight decay, ...).
* **State** — a dict of :class:`Field` (torch.optim's key names; how each is initialised; which flags keep it).
  The state record (a NamedTuple: ``num_updates`` and the fields) is generated from it.
* **Math** — ``math(k)`` over lists, written against the :class:`~pureopt.kernels.listops.ListOps` in ``k.ops``;
  optionally ``scalars(k, steps)`` (per-tensor values from the advanced step counts, computed once per step, outside
  the chunked elementwise pass) and ``fused(k, plan)`` (torch's fused kernel, where torch has one).

:class:`Algorithm` turns that into the transformation (pure, donated, flat, DTensor-local, vmap/grad/compile) via
:func:`pureopt.transforms._util.kernel_transform`, choosing the path (fused > foreach > loop, overridable with
``impl=``), viewing complex tensors as real pairs, casting to the state dtype, advancing ``step``, running the math
in cache-sized chunks when the donated step applies its update to the parameters
(:func:`pureopt.kernels.common.elementwise`), and handling GradScaler's ``grad_scale`` / ``found_inf``.

A new elementwise algorithm is one module: see ``pureopt/algorithms/lion.py`` for the smallest complete example, and
docs/architecture.md ("How to add an algorithm").
"""

from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import math
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt import tree
from pureopt.algorithms.storage import compute_dtype, parse_state_dtype, run_chunks
from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext, mark_takes_grad_factor, scaled_by
from pureopt.hyperparams import check_betas, check_lr, check_nonneg, resolve
from pureopt.kernels import fused as _fused
from pureopt.kernels import onepass, step_op
from pureopt.kernels import select as _select
from pureopt.kernels.common import as_complex_like, as_real, can_apply, cast_like, elementwise
from pureopt.kernels.dtensor import (
    as_plain_scalar,
    blocks_fit_runs,
    from_local_like,
    is_dtensor,
    row_run_widths,
    row_runs_problem,
    row_sharding_problem,
    run_on_local_shards,
)
from pureopt.kernels.encoding import BlockEncoding, Encoding, FloatEncoding, Quantized, compiling
from pureopt.kernels.listops import FOREACH, ListOps, ops_for
from pureopt.kernels.select import check_impl, choose_impl
from pureopt.transforms._util import copy_of, full, kernel_transform, step_init, zeros

__all__ = [
    "Algorithm",
    "Field",
    "Global",
    "Kernel",
    "Hyper",
    "Check",
    "LR",
    "Betas",
    "Eps",
    "NonNeg",
    "Impl",
    "StateDtype",
    "nonneg",
    "AS_FLOAT",
    "scalar_state",
    "state",
    "step_count",
    "filled",
    "param_copy",
]

# --- hyperparameters: validation declared in the signature ---------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A hyperparameter's validation, declared as ``Annotated[type, Check(fn)]`` in a public signature.

    ``fn(value, name)`` raises torch.optim's error for a bad value and returns the value to use (e.g. a 1-element
    tensor ``lr`` as a 0-d tensor, tensor betas as Python floats)."""

    fn: Callable[[Any, str], Any]


def _lr(value: Any, name: str) -> Any:
    check_lr(value)
    return value.reshape(()) if isinstance(value, Tensor) else value


def _betas(value: Any, name: str) -> tuple[float, float]:
    check_betas(value)
    return float(value[0]), float(value[1])


def nonneg(label: str | None = None) -> Check:
    """``Invalid {label} value: {value}`` unless ``value >= 0`` (torch's wording; ``label`` defaults to the
    argument's name)."""

    def fn(value: Any, name: str) -> Any:
        check_nonneg(value, label or name)
        return value

    return Check(fn)


def _float(value: Any, name: str) -> float:
    return float(value)


AS_FLOAT = Check(_float)
"""After the checks: pass the value on as a Python float (a tensor is read once, at construction)."""


def _impl(value: Any, name: str) -> Any:
    check_impl(value)
    return value


LR = Annotated[ScalarOrSchedule, Check(_lr)]
"""A learning rate: float, 0-d (or 1-element) tensor, or schedule; ``Invalid learning rate: ...``."""
Betas = Annotated[tuple[float | Tensor, float | Tensor], Check(_betas)]
"""Two decay rates in ``[0, 1)``: ``Invalid beta parameter at index i: ...``; passed on as Python floats."""
Eps = Annotated[float, nonneg("epsilon")]
"""A non-negative epsilon: ``Invalid epsilon value: ...``."""
NonNeg = Annotated[float, nonneg()]
"""A non-negative number named by its argument: ``Invalid weight_decay value: ...``."""
Impl = Annotated[str, Check(_impl)]
"""The kernel path: ``"auto" | "loop" | "foreach" | "fused"``."""
StateDtype = torch.dtype | None
"""The dtype of the per-parameter state (``None``: the parameter's)."""


class Hyper:
    """A namespace of values by name (hyperparameters, a kernel's arguments); plain attributes, so that
    ``torch.compile`` traces building one."""

    def __init__(self, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)

    def __getattr__(self, key: str) -> Any:  # (typing: any declared name; a missing one raises as usual)
        raise AttributeError(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _bind(fn: str, spec: Sequence[tuple[str, bool, Any]], args: Sequence[Any], kw: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments by name, in signature order, defaults filled in (``inspect.Signature.bind`` in plain Python
    over precomputed ``(name, positional, default)`` triples, so that torch.compile traces it)."""
    slots = [name for name, pos, _ in spec if pos]
    if len(args) > len(slots):
        raise TypeError(f"{fn}() takes {len(slots)} positional arguments but {len(args)} were given")
    given = dict(zip(slots, args))
    names = {name for name, _, _ in spec}
    for key, value in kw.items():
        if key not in names:
            raise TypeError(f"{fn}() got an unexpected keyword argument '{key}'")
        if key in given:
            raise TypeError(f"{fn}() got multiple values for argument '{key}'")
        given[key] = value
    values = {}
    for name, _, default in spec:
        if name not in given and default is inspect.Parameter.empty:
            raise TypeError(f"{fn}() missing required argument: '{name}'")
        values[name] = given.get(name, default)
    return values


# --- state fields ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One per-parameter state field.

    Attributes:
      doc: what it holds (goes into the state record's docstring).
      init: ``init(h, state_dtype) -> (param -> tensor)``: how the field starts, given the hyperparameters.
      when: the hyperparameters for which the field is kept (``None``: always); otherwise it is stored as ``()``.
      per_tensor: one 0-d value per parameter (step counts, NAdam's ``mu_product``), not one per element; such
        fields are updated by ``scalars``, outside the elementwise pass.
      nonneg: the field never holds negative values (second moments, sums of squares, step sizes):
        ``state_dtype="q8"`` / ``"q4"`` / ``"fp8"`` then store it with an unsigned code that never decodes to zero
        (see :mod:`pureopt.kernels.encoding`); a signed code would, making ``m / sqrt(v)`` steps of ``m / eps``.
        Declare it for every such field (tests/test_state_encoding.py checks the registry's against their runs).
      copies_param: the field holds parameter values (a copy, an iterate: schedule-free's ``z``, DoG's ``x0``):
        ``state_dtype="q8"`` & co. leave it in the parameter's dtype and a block encoding named for it is refused
        (codes with a scale per block would move the weights it stands for by up to a code step); a bare float
        ``state_dtype`` narrower than the parameters leaves it in theirs too.
      like_param: the field is shaped like its parameter. ``False`` for state of other shapes (Adafactor's row and
        column factors; ``()`` where a parameter keeps none): such lists reach ``scalars`` and ``math`` as they are
        stored (no real views, casts or slices: chunks of whole tensors only, for ``tensorwise`` math; the math
        handles their dtypes) and the math returns their new lists.
    """

    doc: str
    init: Callable[[Hyper, torch.dtype | None], Callable[[Tensor], Tensor]]
    when: Callable[[Hyper], bool] | None = None
    per_tensor: bool = False
    nonneg: bool = False
    like_param: bool = True
    copies_param: bool = False


def state(doc: str, when: Callable[[Hyper], bool] | None = None, *, nonneg: bool = False) -> Field:
    """A state field that starts at zero, in the state dtype (e.g. Adam's ``exp_avg``; ``nonneg`` for a field that
    is never negative, e.g. ``exp_avg_sq``)."""
    return Field(doc, lambda h, dtype: zeros(dtype), when, nonneg=nonneg)


def filled(
    value: Callable[[Hyper], float], doc: str, when: Callable[[Hyper], bool] | None = None, *, nonneg: bool = False
) -> Field:
    """A state field that starts at ``value(h)`` everywhere (e.g. Yogi's ``initial_accumulator_value``; ``nonneg``
    as for :func:`state`)."""
    return Field(doc, lambda h, dtype: full(value(h), dtype), when, nonneg=nonneg)


def param_copy(doc: str, when: Callable[[Hyper], bool] | None = None) -> Field:
    """A state field that starts as a copy of the parameter (e.g. ASGD's ``ax``)."""
    return Field(doc, lambda h, dtype: copy_of(dtype), when, copies_param=True)


@dataclass(frozen=True)
class Global:
    """A state value kept once per transformation (not per parameter): a 0-d tensor made by ``init(h, device)``,
    read by the math as ``k.<name>`` and replaced by returning a new value under its name."""

    doc: str
    init: Callable[[Hyper, torch.device], Tensor]
    when: Callable[[Hyper], bool] | None = None
    per_tensor: bool = False


def step_count(
    doc: str = "per-parameter step counts (0-d float tensors; only parameters with a gradient advance).",
) -> Field:
    """torch.optim's ``state['step']``: a 0-d count per parameter, advanced by one before the math runs."""
    return Field(doc, lambda h, dtype: step_init, per_tensor=True)


def scalar_state(init: Callable[[Tensor], Tensor], doc: str) -> Field:
    """A per-tensor state field (one 0-d value per parameter, e.g. NAdam's ``mu_product``), made by ``init(param)``
    and updated by the algorithm's ``scalars`` function."""
    return Field(doc, lambda h, dtype: init, per_tensor=True)


def _encoded_init(enc: Encoding, init: Callable[[Tensor], Tensor] | None, whole: str | None, p: Tensor) -> Any:
    """A field's initial value, stored in ``enc`` (computed in the compute dtype, then encoded); ``whole``: the
    name of an algorithm whose math is not elementwise (its encoded step decodes whole tensors: no DTensors)."""
    if is_dtensor(p):
        if whole is not None:
            raise ValueError(
                f"encoded optimizer state (state_dtype=) on DTensor parameters needs elementwise math; {whole}'s "
                "reaches over whole parameters: give a float dtype, e.g. state_dtype=torch.bfloat16"
            )
        return _sharded_encoded_init(enc, init, p)
    stored = enc.empty(p)
    if init is not None:
        enc.encode_into(stored, 0, init(p.detach().to(compute_dtype(p))).reshape(-1))
    return stored


_Plan = tuple[str, tuple[str, ...]]
"""(an encoded step's key for :mod:`pureopt.kernels.step_op`, the names of its hyperparameters passed per call)"""

_STEPS_BEFORE = "_steps_before"
"""(a column of the encoded step: the step counts before it, for torch's fused kernel)"""


def _scaled_math(math: Callable[[Kernel], Any], factor: Tensor, k: Kernel) -> Any:
    """``math`` on the gradients times ``factor`` (``UpdateContext.grad_factor``, traced by the one-pass kernel)."""
    k.g = k.ops.mul(k.g, factor)
    return math(k)


_FUSED_CHUNKS = 4
"""(torch's fused kernel on plain state with a folded gradient factor, see :meth:`Algorithm.run`: chunks this many
times the encoded ones, 2 MiB of scaled float32 gradients: a fused call per chunk is light, the calls cost)"""


def _with_totals(body: Callable[..., Any], totals: Mapping[str, Tensor], *args: Any) -> Any:
    """A chunk body of :meth:`Algorithm._run_encoded` whose math gets ``k.totals`` (see ``Algorithm(reduce=...)``)."""
    return body(*args, totals=totals)


_INDEX = "_index"
"""(a column of the encoded step of tensorwise math: each tensor's position, to gather its chunk's results)"""


def _sharded_encoded_init(enc: Encoding, init: Callable[[Tensor], Tensor] | None, p: Any) -> Any:
    """The initial value of an encoded field of DTensor parameter ``p`` (sharded by rows: FSDP2, HSDP; or, a
    matrix, by runs of columns: tensor parallelism's row-wise layers, FSDP2's ``shard_placement_fn``).

    Made on the local shard and placed like ``p``: a float encoding's tensor shaped like ``p``; a block encoding's
    codes and scales as 2-D DTensors with one row per row of ``p`` (blocks within rows, see :func:`_row_block`),
    so that every rank holds whole blocks and DCP reshards the checkpoint to any world size that keeps the block;
    a 1-D parameter, or rows that cannot be blocked, keeps the field in the compute dtype (a plain DTensor)."""
    if isinstance(enc, FloatEncoding) and enc.stochastic:
        if (problem := row_sharding_problem(p)) is not None:
            raise ValueError(
                f"stochastically rounded optimizer state (state_dtype={enc.name!r}) on DTensor parameters needs "
                f"them sharded by rows (Shard(0), as FSDP2 does): its random bits are keyed by each element's place "
                f"in the whole parameter; {problem}: give state rounded to nearest instead, e.g. state_dtype='bf16'"
            )
    elif isinstance(enc, BlockEncoding) and (problem := row_runs_problem(p)) is not None:
        raise ValueError(
            "encoded optimizer state (state_dtype=) on DTensor parameters needs each rank's shard to hold whole "
            f"rows or, for a matrix, whole runs of its rows (Shard(0), Shard(1)); {problem}: give a float dtype, "
            "e.g. state_dtype=torch.bfloat16"
        )
    local = p.to_local().detach()
    value = init(local.to(compute_dtype(local))).reshape(-1) if init is not None else None
    if not isinstance(enc, BlockEncoding):  # a float encoding: a tensor shaped like the parameter
        stored = enc.empty(local)
        if value is not None:
            enc.encode_into(stored, 0, value)
        return from_local_like(stored, p, p.shape)
    block = _row_block(enc, p)
    if block is None:  # kept in the compute dtype
        kept = torch.zeros_like(local, dtype=compute_dtype(local)) if value is None else value.view(local.shape)
        return from_local_like(kept.contiguous(), p, p.shape)
    stored = block.empty(local)
    if value is not None:
        block.encode_into(stored, 0, value)
    rows, run = local.shape[0], math.prod(local.shape[1:])
    width = p.numel() // p.shape[0]
    half = block.bits == 4
    return type(stored)(
        from_local_like(
            stored.codes.view(rows, run // 2 if half else run), p, (p.shape[0], width // 2 if half else width)
        ),
        from_local_like(stored.scale.view(rows, run // block.block), p, (p.shape[0], width // block.block)),
    )


def _row_block(enc: BlockEncoding, p: Any) -> BlockEncoding | None:
    """``enc`` with the blocks of DTensor parameter ``p``'s encoded fields (``None``: kept in the compute dtype):
    those of :meth:`~pureopt.kernels.encoding.BlockEncoding.for_rows` for ``p``'s rows (the first dimension, the
    others flattened; a 1-D parameter has none) where they divide every rank's run of a row, else those for the
    greatest common divisor of the runs (a matrix sharded by columns). DTensor must split the codes and the scales
    (shaped ``rows x width``, ``rows x width / block``) as it splits ``p``, else the field is kept too."""
    if p.dim() < 2 or not p.numel():
        return None
    width = p.numel() // p.shape[0]
    runs = row_run_widths(p)
    common = math.gcd(width, *runs)
    block = enc.for_rows(width)
    if block is None or common % block.block:
        block = enc.for_rows(common) if common < width else None
    if block is None or blocks_fit_runs(p, block.block, 2 if block.bits == 4 else 1):
        return block
    return None


def _parts(entry: Any) -> tuple[Tensor, ...]:
    """The tensors of a state entry: a record's parts, or the tensor itself."""
    return tuple(entry) if isinstance(entry, Quantized) else (entry,)


def _records(entries: Sequence[str], tensors: Sequence[Tensor]) -> dict[str, list[Any]]:
    """State lists rebuilt from their tensors in order (:func:`_parts` of each entry, field after field), by
    ``entries`` of the opaque step's layout: ``"<field>:<marks>"``, a mark per tensor, ``q`` for an encoded record
    (codes, scale), ``t`` for a tensor."""
    out: dict[str, list[Any]] = {}
    rest = iter(tensors)
    for entry in entries:
        key, marks = entry.split(":")
        out[key] = [Quantized(next(rest), next(rest)) if mark == "q" else next(rest) for mark in marks]
    return out


def _static(value: Any) -> bool:
    """Whether a hyperparameter's value is a constant that names itself by ``repr`` (a number, flag, string,
    dtype, ``None``, or a tuple of those)."""
    if isinstance(value, tuple):
        return all(map(_static, value))
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _in_dtype(tensors: list[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    """Real ``tensors`` in ``dtype``'s real counterpart (unchanged for ``None``)."""
    if dtype is None:
        return tensors
    real = dtype.to_real()
    return [t if t.dtype == real else t.to(real) for t in tensors]


def _record(name: str, module: str, fields: Mapping[str, Field | Global], doc: str) -> type:
    """The state NamedTuple: ``num_updates`` then ``fields``, with a docstring listing them."""
    make: Callable[..., type] = collections.namedtuple
    cls = make(name, ["num_updates", *fields], module=module)
    lines = [
        doc,
        "",
        "Attributes:",
        "  num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.",
    ]
    for key, f in fields.items():
        lines.append(f"  {key}: {f.doc}" + ("" if f.when is None else " (``()`` when not kept for these flags)."))
    cls.__doc__ = "\n".join(lines)
    return cls


def _complete_args(doc: str | None, names: Sequence[str], standard: Mapping[str, str]) -> str | None:
    """``doc`` with its ``Args:`` section listing ``names`` in order: each as the docstring documents it, else as
    ``standard`` does (arguments every algorithm shares: ``lr``, ``maximize``, ``impl``, ``state_dtype``). A
    docstring without an ``Args:`` section is returned as it is."""
    lines = (doc or "").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if doc is None or start is None:
        return doc
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())] + "  "
    entries: dict[str, list[str]] = {}
    end = start + 1
    while end < len(lines) and lines[end].startswith(indent):
        if lines[end][len(indent)] != " ":  # an entry (continuation lines are indented further)
            key = lines[end].strip().split(":", 1)[0]
            entries[key] = []
        entries[key].append(lines[end])
        end += 1
    body = []
    for name in [*names, *(key for key in entries if key not in names)]:
        if name in entries:
            body += entries[name]
        elif name in standard:
            body += textwrap.wrap(f"{name}: {standard[name]}", 116 - len(indent), initial_indent=indent,
                                  subsequent_indent=indent + "  ", break_on_hyphens=False)  # fmt: skip
    return "\n".join([*lines[: start + 1], *body, *lines[end:]])


# --- what the math sees ---------------------------------------------------------------------------------------------


class Kernel(Hyper):
    """The arguments of an algorithm's ``math``, ``scalars`` and ``fused`` functions.

    Attributes:
      ops: the list backend to compute with (per-tensor, foreach, or scratch-memory ops on a chunk).
      h: the hyperparameters by name (``h.lr`` resolved at this update; ``None`` in the ``scale_by_*`` form).
      p: the parameters (viewed as real, in the state dtype); ``None`` when ``update`` got no params, which the
        engine refuses first where a hyperparameter in ``needs_params`` is nonzero.
      g: the gradients (viewed as real, in the state dtype). Read-only: never write into them.
      donate: the state lists may be overwritten in place (never on the pure path or while autograd records).
      own: the kernel's own temporaries may be overwritten in place (false while autograd records).
      apply: add the update into ``p`` in place (its last op, as torch) and return ``None`` updates.
      target: ``p`` when ``apply`` else ``None`` (the first argument of :func:`~pureopt.kernels.common.add_update`).
      coef: ``-lr``, or ``1.0`` in the ``scale_by_*`` form (the sign and scale of the returned update).
      <field>: each kept state field's list (per-element fields in ``math``; all of them in ``scalars``/``fused``).
      <scalar>: each per-tensor value list that ``scalars`` returned.
      steps: the advanced step counts (``scalars`` and ``fused`` only).
      segments: ``UpdateContext.segments`` (flat buffers holding several parameters; see ``segmentwise``).
      extra: the keyword arguments given to ``update`` (e.g. Sophia's Hessian estimate), as a dict.
      <global>: each global field's 0-d tensor (see :class:`Global`).
      dtensors: with ``Algorithm(local_shards=True)``, the gradients as DTensors while the step runs on their local
        shards (for the math's own collectives over whole tensors); else ``None``.
    """

    ops: ListOps
    h: Hyper
    p: list[Tensor]  # (None when update got no params: the engine then refuses what ``needs_params`` names)
    g: list[Tensor]
    steps: list[Tensor]
    donate: bool
    own: bool
    apply: bool
    target: list[Tensor] | None
    coef: float | Tensor
    dtensors: list[Tensor] | None = None


MathFn = Callable[[Kernel], tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]]
"""``math(k) -> (updates, new_state)``: the elementwise step. ``updates`` is ``None`` when it applied them
(``k.apply``); ``new_state`` maps the per-element fields it changed to their new lists."""
ScalarsFn = Callable[[Kernel, list[Tensor]], Mapping[str, list[Any]]]
"""``scalars(k, steps) -> values``: per-tensor values (new per-tensor state fields, or columns the math reads)."""
FusedFn = Callable[[Kernel, _fused.Plan], tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]]
"""``fused(k, plan) -> (updates, new_state)``: the step through torch's fused kernel (whole lists)."""
SparseFn = Callable[..., tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]]
"""``sparse(run, h, impl, params, grads, state, ctx) -> (updates, new_state)``: a step where some gradients are
sparse (COO), e.g. densify them or split the lists, calling ``run`` (:meth:`Algorithm.run`, same arguments) for the
dense ones."""


class Algorithm:
    """An algorithm's definition: builds its transformations and runs its kernel on every path.

    Args:
      name: the torch.optim class name where torch has the algorithm (``"Adam"``), else the algorithm's name; it is
        used in error messages.
      record: the state record's class name (``"LionState"``).
      module: the record's home module, so that it pickles (default: the module ``math`` is defined in).
      fields: the per-parameter state fields in torch's key order (see :class:`Field`).
      math: the elementwise math (see :data:`MathFn`).
      scalars: per-tensor values from the advanced step counts (see :data:`ScalarsFn`).
      fused: torch's fused kernel (see :data:`FusedFn`); ``fused_state``: the fields it takes, first the one in the
        compute dtype; ``fused_devices``: where torch has it; ``fused_cpu_dtypes``: the dtypes its CPU kernel
        computes right (``None``: all); ``fused_when``: the flags it supports.
      neutral: values of the hyperparameters a shorter signature (``scale_by_*``) leaves out (``lr=None``,
        ``maximize=False`` and ``weight_decay=0.0`` unless given here).
      needs_params: hyperparameters that need the parameters when nonzero (``weight_decay``).
      params_required: the algorithm always needs the parameters (e.g. its trust ratio reads their norms): the name
        its error gives (``"lamb needs the parameters: ..."``), raised before anything changes;
        ``params_required_when``: only for these hyperparameters.
      dtensor: ``False``: DTensor parameters are refused with a clear error (math not yet written for them).
      real_only: complex gradients are refused (``"<name> does not support complex parameters"``, torch's wording).
      sparse: whether sparse gradients are accepted (torch's RuntimeError otherwise); or the algorithm's own
        handling of a step with sparse (COO) gradients (see :data:`SparseFn`).
      dense_error: for an algorithm of sparse gradients only (SparseAdam): the RuntimeError message for a dense
        gradient; ``sparse`` then runs every step.
      amp_native: the kernel honours GradScaler's ``grad_scale`` / ``found_inf`` (see
        :func:`pureopt.kernels.fused.mark_amp_native`): in torch's fused call where it runs on the parameters,
        else by unscaling out of place.
      chunked: run ``math`` chunk by chunk on the applied CPU path (see
        :func:`pureopt.kernels.common.elementwise`); ``False`` runs it once over the whole lists. ``chunk_scale``:
        chunks that many times the default size (light math without temporaries: fewer calls).
      elementwise: each element's update depends only on that element (and per-tensor / global values); ``False``
        for math with reductions over a tensor or over all tensors (norms, projections, Prodigy's ``d``), which then
        runs once over the whole lists (on DTensors: on the DTensors, so that reductions are global).
      segmentwise: the math honours ``k.segments`` (per-parameter reductions on flat buffers, see
        :func:`pureopt.base.is_segmentwise`).
      tensorwise: (with ``elementwise=False``) the math's reductions are each within one tensor (a norm per tensor,
        not over all tensors): on the applied CPU path it then runs chunk by chunk over whole tensors (never cut),
        fields of any shape (Adafactor's factors) taken per tensor, and must add its updates into ``k.target``.
      global_fields: state kept once per transformation (see :class:`Global`), e.g. Prodigy's ``d``.
      updates_globals: the math returns new values of the global fields (once per step: it then runs unchunked);
        ``False`` where they are only read, or advanced outside the math (schedule-free's, by its wrapper).
      local_shards: (with ``elementwise=False``) the math reaches across shards itself: on DTensor parameters the
        step runs on their local shards where it can (:func:`~pureopt.kernels.dtensor.run_on_local_shards`), with
        the DTensor gradients in ``k.dtensors`` for its collectives over whole tensors (e.g.
        :func:`~pureopt.kernels.dtensor.shard_norms`); elsewhere it sees the DTensors themselves.
      local_chunks: (with ``local_shards`` and ``tensorwise``) the math may run chunk by chunk on local shards;
        ``False`` where it talks to the other ranks per tensor (Muon's owner-rank orthogonalisation: ranks holding
        shards of other sizes would chunk them otherwise).
      leaf_args: keyword arguments of ``update`` that are trees like the gradients (Sophia's ``hessian``); the math
        reads each in ``k.extra`` as a list over the leaves it steps (``None`` when not given).
      check_order: the hyperparameters validated first, in torch's order (the rest follow in signature order).
      doc: first line of the state record's docstring.
      scalars_read_grads: ``scalars`` reads the gradients' values (NovoGrad's per-tensor norms), not only their
        dtypes and devices: a gradient factor folded in by :func:`pureopt.chain` is then applied to the whole
        gradients first (see ``UpdateContext.grad_factor``).
      reduce: (with ``elementwise=False``) ``reduce(k) -> {name: 0-d total}``: the sums over all tensors the math
        needs (D-Adaptation's ``d`` estimate), computed from the step's inputs without writing anything, over the
        tensors given; with it, the math is elementwise given ``k.totals`` (the sums over all tensors, added over
        chunks), and encoded state is stepped chunk by chunk in two passes (sums, then the math) instead of being
        decoded whole. Without ``k.totals`` (the plain path, whole lists) the math sums itself, as it did.
    """

    def __init__(
        self,
        name: str,
        *,
        record: str,
        module: str | None = None,
        fields: Mapping[str, Field],
        math: MathFn,
        scalars: ScalarsFn | None = None,
        fused: FusedFn | None = None,
        fused_state: Sequence[str] = (),
        fused_devices: Sequence[str] = _fused.FUSED_DEVICES,
        fused_cpu_dtypes: Sequence[torch.dtype] | None = None,
        fused_when: Callable[[Hyper], bool] | None = None,
        neutral: Mapping[str, Any] | None = None,
        needs_params: Sequence[str] = ("weight_decay",),
        params_required: str | None = None,
        params_required_when: Callable[[Hyper], bool] | None = None,
        real_only: bool = False,
        dtensor: bool = True,
        sparse: bool | SparseFn = False,
        dense_error: str | None = None,
        amp_native: bool = False,
        chunked: bool = True,
        chunk_scale: int = 1,
        elementwise: bool = True,
        segmentwise: bool = False,
        tensorwise: bool = False,
        global_fields: Mapping[str, Global] | None = None,
        updates_globals: bool = True,
        local_shards: bool = False,
        local_chunks: bool = True,
        leaf_args: Sequence[str] = (),
        check_order: Sequence[str] = ("lr",),
        doc: str = "",
        scalars_read_grads: bool = False,
        reduce: Callable[[Kernel], Mapping[str, Tensor]] | None = None,
    ) -> None:
        self.name = name
        self.scalars_read_grads = scalars_read_grads
        self.reduce = reduce
        self.fields = dict(fields)
        self.math = math
        self.scalars = scalars
        self.fused = fused
        self.fused_state = tuple(fused_state)
        self.fused_devices = tuple(fused_devices)
        self.fused_cpu_dtypes = None if fused_cpu_dtypes is None else tuple(fused_cpu_dtypes)
        self.fused_when = fused_when
        self.neutral = {"lr": None, "maximize": False, "weight_decay": 0.0, **(neutral or {})}
        self.needs_params = tuple(needs_params)
        self.params_required = params_required
        self.params_required_when = params_required_when
        self.real_only = real_only
        self.dtensor = dtensor
        self.sparse = sparse
        self.dense_error = dense_error
        self.amp_native = amp_native
        self.globals = dict(global_fields or {})
        self.chunked = chunked and (elementwise or tensorwise) and not (self.globals and updates_globals)
        # (chunks of whole tensors take fields of any shape, one entry per tensor; slices need them like the params)
        self.chunked = self.chunked and (tensorwise or all(f.like_param for f in self.fields.values()))
        self.chunk_scale = chunk_scale
        self.elementwise = elementwise
        self.segmentwise = segmentwise
        self.local_shards = local_shards
        self.local_chunks = local_chunks
        self.leaf_args = tuple(leaf_args)
        self.check_order = list(check_order)
        home = module or math.__module__
        self.state = _record(record, home, {**self.fields, **self.globals}, doc or f"State of the {name} algorithm.")

    # --- public functions -----------------------------------------------------------------------------------------

    def public(self, fn: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
        """Decorate a public function: its arguments are validated by their ``Annotated`` checks (in signature
        order, torch's wording) before its body (``return ALGO.build(locals())``) runs."""
        signature = inspect.signature(fn)
        fn.__doc__ = _complete_args(fn.__doc__, list(signature.parameters), self._standard_args())
        checks: list[tuple[str, Check]] | None = None
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        spec = [(p.name, p.kind in positional, p.default) for p in signature.parameters.values()]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> GradientTransformation:
            nonlocal checks
            if checks is None:
                hints = typing.get_type_hints(fn, include_extras=True)
                first = {name: i for i, name in enumerate(self.check_order)}
                names = sorted(signature.parameters, key=lambda n: (n not in first, first.get(n, 0)))
                checks = [
                    (name, meta)
                    for name in names
                    for meta in getattr(hints.get(name), "__metadata__", ())
                    if isinstance(meta, Check)
                ]
            values = _bind(fn.__name__, spec, args, kwargs)
            for name, check in checks:
                values[name] = check.fn(values[name], name)
            return fn(**values)

        wrapper.algorithm = self  # type: ignore[attr-defined]
        return wrapper

    def _standard_args(self) -> dict[str, str]:
        """The docs of the arguments every algorithm shares, for the public functions' ``Args:`` sections."""
        paths = " | ".join(f'"{path}"' for path in ("auto", "loop", "foreach", "fused")[: 4 if self.fused else 3])
        kept = [f"``{key}``" for key, f in self.fields.items() if not f.per_tensor and f.like_param]
        what = f"the state ({', '.join(kept)})" if kept else "the computation (no per-element state)"
        return {
            "lr": "learning rate (float, 0-d tensor or schedule).",
            "maximize": "maximize the objective instead of minimizing.",
            "impl": f"kernel path, ``{paths}``.",
            "state_dtype": f"dtype of {what}; default: the parameter's, e.g. ``torch.float32`` for bf16 params"
            + ('; or an encoding (``"q8"``, ``"q4"``, ``"fp8"``, a dict per field; docs/memory.md).' if kept else "."),
        }

    def build(self, values: Mapping[str, Any], **fixed: Any) -> GradientTransformation:
        """The transformation for a public function's (validated) arguments; ``fixed`` overrides some of them, and
        hyperparameters the signature leaves out take their neutral values."""
        given = {**self.neutral, **values, **fixed}
        impl = given.pop("impl", "auto")
        state_dtype = given.pop("state_dtype", None)
        check_impl(impl)
        h = Hyper(**given)
        lr = h.lr
        kept = [key for key, f in self.fields.items() if not f.per_tensor and (f.when is None or f.when(h))]
        nonneg = {key: f.nonneg for key, f in self.fields.items()}
        copies = {key for key, f in self.fields.items() if f.copies_param}
        state_dtype, encodings = parse_state_dtype(state_dtype, kept, nonneg, copies)
        blocked = [key for key in copies if isinstance(encodings.get(key), BlockEncoding)]
        if blocked:
            raise ValueError(
                f"{self.name}'s {blocked[0]} holds parameter values: block codes (q8 / q4 / fp8) would move the "
                "weights it stands for by up to a code step; give it a float dtype (e.g. torch.bfloat16) or leave it "
                "out of state_dtype"
            )
        odd = [key for key in encodings if not self.fields[key].like_param]
        if odd:
            raise ValueError(
                f"{self.name}'s {odd[0]} is not shaped like its parameter: state_dtype can only be a dtype"
            )
        inits = {
            key: (f.init(h, state_dtype) if f.when is None or f.when(h) else None) for key, f in self.fields.items()
        }
        for key, enc in encodings.items():
            inits[key] = functools.partial(_encoded_init, enc, inits[key], None if self.elementwise else self.name)
        # a bare float dtype narrower than the parameters stores the state in it and runs the math in theirs, as
        # the float encodings do (the math in bf16 rounds fp32 parameters it reads to bf16: ASGD's and Adadelta's
        # steps vanished, DoG's and D-Adaptation's step sizes went wrong by orders of magnitude); fields holding
        # parameter values stay as wide as the parameters
        narrow = (
            {k: FloatEncoding(state_dtype) for k in kept if k not in copies and self.fields[k].like_param}
            if state_dtype is not None
            else {}
        )
        for key in copies:
            if state_dtype is not None and inits[key] is not None:
                inits[key] = functools.partial(self._copy_init, h, key, state_dtype)
        # (built while dynamo traces, e.g. inside inject_hyperparams: no opaque step, whose key is hashed)
        eager = not torch.compiler.is_compiling()
        opaque = self._opaque_plan(given, encodings) if encodings and impl == "auto" and eager else None
        narrow_opaque = self._opaque_plan(given, narrow) if narrow and impl == "auto" and eager else None

        def step(
            params: list[Tensor] | None,
            grads: list[Tensor],
            s: dict[str, list[Tensor]],
            num_updates: Tensor,
            ctx: UpdateContext,
        ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
            hs = h if lr is None else Hyper(**{**given, "lr": resolve(lr, num_updates)})
            if narrow and self._stores_narrower(state_dtype, params, grads):
                return self.run(hs, impl, params, grads, s, ctx, narrow, counter=num_updates, opaque=narrow_opaque)
            compute = None if kept else state_dtype
            if self.local_shards and any(map(is_dtensor, grads)):  # (local shards where they can; see __init__)

                def local(p: list[Tensor] | None, g: list[Tensor], st: dict[str, list[Tensor]]) -> Any:
                    dtensors = None if any(map(is_dtensor, g)) else grads
                    return self.run(hs, impl, p, g, st, ctx, encodings, compute_dtype=compute, dtensors=dtensors)

                return run_on_local_shards(local, params, grads, s)
            return self.run(
                hs, impl, params, grads, s, ctx, encodings, compute_dtype=compute, counter=num_updates, opaque=opaque
            )

        shared: dict[str, Callable[[torch.device], Tensor]] = {
            key: functools.partial(f.init, h) for key, f in self.globals.items()
        }
        tx = kernel_transform(
            self.state,
            inits,
            step,
            elementwise=self.elementwise,
            segmentwise=self.segmentwise,
            global_fields=shared,
            leaf_args=self.leaf_args,
        )
        mark_takes_grad_factor(tx)  # (see run: folded into the chunks, or applied to the gradients first)
        return _fused.mark_amp_native(tx) if self.amp_native else tx

    def _folds_factor(
        self, factor: Tensor, params: list[Tensor] | None, grads: list[Tensor], ctx: UpdateContext
    ) -> bool:
        """Whether this step multiplies the gradients by ``UpdateContext.grad_factor`` chunk by chunk where it
        reads them (else the whole gradients are multiplied first): eagerly, outside any torch.func transform and
        autograd, on plain dense float32 CPU gradients (the product then is the one the folded transformation would
        have made; the chunks are CPU-sized: on a GPU each would be kernel launches), without GradScaler
        arguments, and where ``scalars`` does not read the gradients."""
        return (
            not compiling()
            and all(g.device.type == "cpu" for g in grads)
            and not self.scalars_read_grads
            and ctx.grad_scale is None
            and ctx.found_inf is None
            and not is_dtensor(factor)
            and factor.dtype == torch.float32
            and all(g.dtype == torch.float32 and g.layout == torch.strided and not is_dtensor(g) for g in grads)
            and not _select.autograd_recording([factor, *grads, *(params or [])])
        )

    def _narrow_dtype(self, p: Tensor, state_dtype: torch.dtype) -> bool:
        """Whether ``state_dtype`` (bare) is stored narrower than parameter ``p`` and the math runs in ``p``'s
        dtype (:meth:`build`): real floating parameters, DTensors only for elementwise math (whose encoded step
        runs on their local shards)."""
        return (
            p.dtype.is_floating_point
            and state_dtype.is_floating_point
            and state_dtype.itemsize < p.dtype.itemsize
            and (self.elementwise or not is_dtensor(p))
        )

    def _copy_init(self, h: Hyper, key: str, state_dtype: torch.dtype, p: Tensor) -> Tensor:
        """The initial value of field ``key`` (holding parameter values) under a bare ``state_dtype``: in the
        parameter's dtype where that is wider and the step runs the math in it (:meth:`_narrow_dtype`)."""
        dtype = p.dtype if self._narrow_dtype(p, state_dtype) else state_dtype
        return self.fields[key].init(h, dtype)(p)

    def _stores_narrower(self, state_dtype: torch.dtype, params: list[Tensor] | None, grads: list[Tensor]) -> bool:
        """Whether this step keeps a bare ``state_dtype`` as storage only (:meth:`build`): some parameter is wider
        and none is refused by :meth:`_narrow_dtype`, and autograd is not recording through the step (the encoded
        step cannot be differentiated: there the math runs in the state's dtype, as it always did)."""
        if not grads or any(g.is_complex() for g in grads):
            return False
        if _select.autograd_recording([*grads, *(params or [])]):
            return False
        if any(is_dtensor(g) for g in grads) and not self.elementwise:
            return False
        return any(self._narrow_dtype(g, state_dtype) for g in grads)

    # --- the kernel -----------------------------------------------------------------------------------------------

    def _opaque_plan(self, given: Mapping[str, Any], encodings: Mapping[str, Encoding]) -> _Plan | None:
        """The encoded step of these hyperparameters and encodings registered as an opaque op's plan
        (:mod:`pureopt.kernels.step_op`), named by everything static in them, and the names of the hyperparameters
        given as tensors or schedules (their values travel with each call). ``None`` where some hyperparameter is
        neither (the step is then traced)."""
        static: dict[str, Any] = {}
        dynamic: list[str] = []
        for key, value in given.items():
            if isinstance(value, Tensor) or callable(value):
                dynamic.append(key)
            elif _static(value):
                static[key] = value
            else:
                return None
        names = sorted((key, getattr(enc, "key", enc.name)) for key, enc in encodings.items())
        math_name = f"{self.math.__module__}.{self.math.__qualname__}"
        digest = hashlib.sha256(repr((math_name, sorted(static.items()), dynamic, names)).encode()).hexdigest()[:16]
        body = functools.partial(self._opaque_body, static, dict(encodings))
        return step_op.register(f"{self.name}/{digest}", body), tuple(dynamic)

    def _opaque_step(
        self,
        plan: _Plan,
        h: Hyper,
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: Mapping[str, list[Any]],
        ctx: UpdateContext,
        elem: list[str],
        shared: Mapping[str, Any],
        counter: Tensor | None,
    ) -> tuple[list[Tensor] | None, dict[str, list[Any]]] | None:
        """Under ``torch.compile``: the encoded step as one opaque op (:mod:`pureopt.kernels.step_op`), which runs
        the eager step (one native pass per tile where :mod:`pureopt.kernels.onepass` takes the math): donated and
        applied, overwriting the parameters and the state; pure (float32 parameters), returning the updates and
        the new state. ``None`` where the step must be traced instead (donated but not applied, a torch.func
        transform, autograd, GradScaler, whole-tensor math, global state, leaf arguments, DTensors, other
        devices)."""
        if not (params is not None and self.elementwise and not shared) or ctx.donate != ctx.apply:
            return None
        if self.leaf_args or ctx.extra_args or ctx.grad_scale is not None or ctx.found_inf is not None:
            return None
        if torch._C._functorch.maybe_current_level() is not None or _select.autograd_recording([*grads, *params]):
            return None  # (recorded by autograd: the traced step refuses it)
        tensors = [*params, *grads] + ([counter] if counter is not None else [])
        if any(is_dtensor(t) or t.device.type != "cpu" for t in tensors):
            return None
        if not ctx.donate and any(t.dtype != torch.float32 for t in (*params, *grads)):
            return None  # (pure: the op's outputs are shaped as its inputs; updates of float32 parameters only)
        plan_key, dynamic = plan
        extras: list[Tensor] = []
        kinds = []
        for key in dynamic:
            value = getattr(h, key)
            if isinstance(value, Tensor):
                extras.append(value)
                kinds.append(f"{key}:t")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                extras.append(torch.tensor(value, dtype=torch.float64))
                kinds.append(f"{key}:f")
            else:
                return None
        if counter is not None:
            extras.append(counter)
        if not all(isinstance(v, (Tensor, Quantized)) for values in s.values() for v in values):
            return None
        state = [t for values in s.values() for v in values for t in _parts(v)]
        entries = [
            f"{key}:{''.join('q' if isinstance(v, Quantized) else 't' for v in values)}" for key, values in s.items()
        ]
        streams = ",".join(map(str, ctx.streams if ctx.streams is not None else range(len(grads))))
        layout = "|".join([",".join(kinds), str(int(counter is not None)), ",".join(elem), ",".join(entries), streams])
        if ctx.donate:
            step_op.inplace_step(plan_key, layout, params, grads, state, extras)
            return None, dict(s)
        outs = step_op.step(plan_key, layout, params, grads, state, extras)
        return outs[: len(params)], _records(entries, outs[len(params) :])

    def _opaque_body(
        self,
        static: dict[str, Any],
        encodings: dict[str, Encoding],
        layout: str,
        params: list[Tensor],
        grads: list[Tensor],
        state: list[Tensor],
        extras: list[Tensor],
        donate: bool = True,
    ) -> list[Tensor] | None:
        """The opaque op's eager step: the records rebuilt from ``layout`` (see :meth:`_opaque_step`) and the
        encoded step run; donated, whatever it returned as new tensors is written into the ones passed in; pure,
        the updates and the new state's tensors (in ``state``'s order, none of them an input) are returned."""
        kinds, has_counter, elem_names, entries, streams = layout.split("|")
        values = dict(static)
        for spec, value in zip(filter(None, kinds.split(",")), extras):
            key, kind = spec.split(":")
            values[key] = value if kind == "t" else value.item()
        counter = extras[-1] if has_counter == "1" else None
        s = _records(list(filter(None, entries.split(","))), state)
        ctx = UpdateContext(
            tree.flatten(params)[1],
            donate=donate,
            apply=donate,
            streams=[int(i) for i in filter(None, streams.split(","))],
        )
        elem = list(filter(None, elem_names.split(",")))
        updates, new = self._run_encoded(Hyper(**values), "auto", params, grads, s, ctx, encodings, elem, {}, counter)
        if any(key not in s for key in new):
            raise RuntimeError(
                f"{self.name}'s encoded step returned a field its state does not keep ({set(new) - set(s)})"
            )
        if not donate:
            assert updates is not None
            inputs = {id(t) for t in (*params, *grads, *state)}
            outs = [*updates, *(t for key in s for entry in new.get(key, s[key]) for t in _parts(entry))]
            return [t.clone() if id(t) in inputs else t for t in outs]  # (an op's outputs never alias its inputs)
        if updates is not None:
            torch._foreach_add_(params, updates)
        for key, news in new.items():
            for old, now in zip(s[key], news):
                for a, b in zip(_parts(old), _parts(now)):
                    if b is not a:
                        a.copy_(b)
        return None

    def _run_encoded(
        self,
        h: Hyper,
        impl: str,
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: Mapping[str, list[Any]],
        ctx: UpdateContext,
        encodings: Mapping[str, Encoding],
        elem: list[str],
        shared: dict[str, Any],
        counter: Tensor | None,
        factor: Tensor | None = None,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        """The step with some fields encoded: the math traced into one native pass per tensor where
        :mod:`pureopt.kernels.onepass` can take it, else chunk by chunk on decoded state (:func:`run_chunks`);
        ``factor``: a gradient factor folded in (``UpdateContext.grad_factor``), each chunk's gradients multiplied
        by it as they are read (with no encodings: torch's fused kernel chunk by chunk, see :meth:`run`)."""
        if _select.autograd_recording([*grads, *(params or [])]):
            raise RuntimeError("encoded optimizer state (state_dtype=) cannot be differentiated through")
        ops = ops_for(choose_impl(impl, grads))
        donate, apply = ctx.donate, ctx.apply and ctx.donate and params is not None
        coef: float | Tensor = 1.0 if h.lr is None else -h.lr
        out: dict[str, list[Tensor]] = {}
        scalar_state = {key: s[key] for key in s if key not in elem and key not in shared}
        stand_ins = {key: grads for key in elem}  # (scalars read only dtypes and devices of the fields)
        k0 = Kernel(ops=ops, h=h, p=params, g=grads, donate=donate, own=True, apply=apply, coef=coef, target=None,
                    segments=None, extra=ctx.extra_args, **scalar_state, **shared, **stand_ins)  # fmt: skip
        if "step" in s:
            out["step"] = k0.steps = ops.add_scalar(s["step"], 1, inplace=donate)
        columns: dict[str, list[Any]] = {}
        for key, values in (self.scalars(k0, out.get("step", [])) if self.scalars is not None else {}).items():
            (out if key in self.fields else columns)[key] = values
        globals_out: dict[str, Any] = {}
        fields = {key: s[key] for key in elem}
        # fields not shaped like the parameters (CAME's factors: kept as stored, never encoded) ride as per-tensor
        # columns; the math runs once over whole tensors then (elementwise=False), so their new lists are whole
        odd = [key for key, f in self.fields.items() if key in s and not f.like_param]
        if odd and self.elementwise:
            raise NotImplementedError(f"{self.name}: encoded state with fields not shaped like the parameters")
        columns.update({key: list(s[key]) for key in odd})
        # tensorwise math runs chunk by chunk over whole tensors (each chunk's odd fields gathered back by index)
        tensorwise = (
            not self.elementwise and self.chunked and not shared and not self.leaf_args and ctx.segments is None
        )
        odd_out = {key: list(s[key]) for key in odd}
        if tensorwise:
            columns[_INDEX] = list(range(len(grads)))
        if impl == "auto" and self.elementwise and not shared and not self.leaf_args and ctx.grad_scale is None \
                and ctx.found_inf is None and encodings:  # fmt: skip
            # the math traced into one native pass per tensor (decode, step, encode each tile in cache), where it can
            make = functools.partial(Kernel, ops=FOREACH, h=h, donate=True, own=True, coef=coef,
                                     segments=None, extra=ctx.extra_args)  # fmt: skip
            math = self.math if factor is None else functools.partial(_scaled_math, self.math, factor)
            done = onepass.run(math, make, params, grads, fields, encodings, columns, donate=donate, apply=apply,
                               counter=counter, streams=ctx.streams)  # fmt: skip
            if done is not None:
                return done[0], {**out, **done[1]}
        # torch's fused kernel on each chunk's decoded state where it would run on plain state (one call instead of
        # a dozen list ops); it advances the step counts itself, so it gets the ones before this step
        counts = self.fields.get("step")  # (kept: the fused kernel gets the counts before this step)
        fused = (
            self.fused is not None and impl == "auto" and (self.fused_when is None or self.fused_when(h))
            and ("step" in s or counts is None or (counts.when is not None and not counts.when(h)))
            and not shared and ctx.grad_scale is None and ctx.found_inf is None
        )  # fmt: skip
        if fused and "step" in s:
            columns[_STEPS_BEFORE] = s["step"] if not donate else list(torch._foreach_sub(out["step"], 1))

        def body(
            ops: ListOps, p: list[Tensor], g: list[Tensor], fields: dict[str, list[Tensor]],
            cols: dict[str, list[Any]], applies: bool, totals: Mapping[str, Tensor] | None = None,
        ) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:  # fmt: skip
            before = cols.pop(_STEPS_BEFORE, None)
            index = cols.pop(_INDEX, None)
            if factor is not None:  # (the chunk's gradients scaled as it reads them)
                g = ops.mul(g, factor)
            if fused and self.fused is not None:
                lists = [fields[key] for key in self.fused_state if key in fields] or [g]  # (no state: on grads)
                plan = _fused.fused_plan(
                    [*g, *(p or [])], *lists, devices=self.fused_devices, cpu_dtypes=self.fused_cpu_dtypes
                )
                if plan is not None:
                    steps = {} if before is None else {"step": [t.clone() for t in before]}
                    k = Kernel(h=h, p=p, g=g, donate=True, apply=applies, coef=coef, ctx=ctx, **steps,
                               **fields)  # fmt: skip
                    updates, new = self.fused(k, plan)
                    return updates, {key: v for key, v in new.items() if key in fields}
            target = p if applies else None
            given = {} if totals is None else {"totals": totals}
            k = Kernel(ops=ops, h=h, p=p, g=g, donate=True, own=True, apply=applies, coef=coef, target=target,
                       segments=None, extra=ctx.extra_args, **shared, **fields, **cols, **given)  # fmt: skip
            updates, new = self.math(k)
            globals_out.update({key: new[key] for key in shared if key in new})
            for key in odd:
                if key in new:
                    for j, i in enumerate(index if index is not None else range(len(g))):
                        odd_out[key][i] = new[key][j]
            return updates, {key: v for key, v in new.items() if key in fields}

        phased = self.reduce is not None and not odd and not self.leaf_args and ctx.segments is None
        if phased:  # (the sums over all tensors first, chunk by chunk, writing nothing; then the math on each chunk)
            assert self.reduce is not None
            reduce = self.reduce
            totals: dict[str, Tensor] = {}

            def sums(
                ops: ListOps, p: list[Tensor], g: list[Tensor], fields: dict[str, list[Tensor]],
                cols: dict[str, list[Any]], applies: bool,
            ) -> tuple[None, dict[str, list[Tensor]]]:  # fmt: skip
                cols = {key: value for key, value in cols.items() if key not in (_STEPS_BEFORE, _INDEX)}
                g = g if factor is None else ops.mul(g, factor)
                k = Kernel(ops=ops, h=h, p=p, g=g, donate=False, own=False, apply=False, coef=coef, target=None,
                           segments=None, extra=ctx.extra_args, **shared, **fields, **cols)  # fmt: skip
                for key, value in reduce(k).items():
                    totals[key] = value if key not in totals else totals[key] + value
                return None, {}

            # (as if donated and applied: no output buffers; the chunks' decoded fields are dropped)
            run_chunks(sums, ops, params, grads, fields, encodings, columns, donate=True, apply=True, elementwise=True)
            body = functools.partial(_with_totals, body, totals)
        updates, new_fields = run_chunks(
            body, ops, params, grads, fields, encodings, columns, donate=donate, apply=apply,
            elementwise=self.elementwise or phased, tensorwise=tensorwise, counter=counter, streams=ctx.streams,
            chunk_scale=1 if encodings else _FUSED_CHUNKS,
        )  # fmt: skip
        return updates, {**out, **new_fields, **globals_out, **odd_out}

    def run(
        self,
        h: Hyper,
        impl: str,
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: Mapping[str, list[Tensor]],
        ctx: UpdateContext,
        encodings: Mapping[str, Encoding] | None = None,
        compute_dtype: torch.dtype | None = None,
        dtensors: list[Tensor] | None = None,
        counter: Tensor | None = None,
        opaque: _Plan | None = None,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        """One step over the leaves that have a gradient (``s``: the kept state fields' lists; ``encodings``: how
        the encoded ones are stored, see :mod:`pureopt.algorithms.storage`; ``compute_dtype``: the dtype to compute
        in where no per-element field fixes it, i.e. ``state_dtype`` of an algorithm that keeps none; ``dtensors``:
        see ``local_shards``; ``counter``: the update count, keying stochastically rounded state; ``opaque``: the
        plan of the encoded step as one opaque op under ``torch.compile``, see :meth:`_opaque_plan`)."""
        if not self.dtensor and any(map(is_dtensor, grads)):
            raise NotImplementedError(
                f"{self.name} does not support DTensor (FSDP2 / tensor-parallel) parameters yet: its math mixes "
                "per-tensor or global values kept as plain tensors with the sharded ones"
            )
        factor = ctx.grad_factor  # (a scaling folded in by chain: see _folds_factor)
        if factor is not None:
            ctx = ctx.but(grad_factor=None)
            if is_dtensor(factor) and not any(map(is_dtensor, grads)):  # (stepping local shards: its value)
                factor = as_plain_scalar(factor)
            if not self._folds_factor(factor, params, grads, ctx):
                grads, factor = scaled_by(grads, factor), None
        if self.dense_error is not None and not all(g.is_sparse for g in grads):
            raise RuntimeError(self.dense_error)
        if self.sparse is not True and (self.dense_error is not None or any(g.is_sparse for g in grads)):
            if callable(self.sparse):
                dense_run = functools.partial(
                    self.run, encodings=encodings, compute_dtype=compute_dtype, counter=counter
                )
                updates, new = self.sparse(dense_run, h, impl, params, grads, s, ctx)
                return updates, dict(new)
            raise RuntimeError(f"{self.name} does not support sparse gradients")
        if (
            params is None
            and self.params_required is not None
            and (self.params_required_when is None or self.params_required_when(h))
        ):
            raise ValueError(f"{self.params_required} needs the parameters: call update(grads, state, params)")
        for key in self.needs_params:
            if params is None and getattr(h, key, 0) != 0:
                raise ValueError(f"{key} needs the parameters: call update(grads, state, params)")
        if self.real_only and any(g.is_complex() for g in grads):
            raise RuntimeError(f"{self.name} does not support complex parameters")
        elem = [key for key, f in self.fields.items() if key in s and not f.per_tensor and f.like_param]
        odd = {key: s[key] for key, f in self.fields.items() if key in s and not f.like_param}
        shared = {key: s[key] for key in self.globals}
        donate, apply = ctx.donate, ctx.apply and ctx.donate and params is not None
        plan = None
        if encodings:
            if impl == "fused":
                raise RuntimeError("impl='fused' is not available with encoded state (state_dtype=); use 'auto'")
            if opaque is not None and torch.compiler.is_compiling():
                taken = self._opaque_step(opaque, h, params, grads, s, ctx, elem, shared, counter)
                if taken is not None:
                    return taken
            return self._run_encoded(h, impl, params, grads, s, ctx, encodings, elem, shared, counter, factor)
        if self.fused is not None and impl in ("auto", "fused") and (self.fused_when is None or self.fused_when(h)):
            lists = [s[key] for key in self.fused_state if key in s] or [grads]  # (no state kept: plan on grads)
            inputs = [*grads, *(params or [])]
            plan = _fused.fused_plan(
                inputs, *lists, impl=impl, devices=self.fused_devices, cpu_dtypes=self.fused_cpu_dtypes
            )
        path = choose_impl(impl, [*grads, *s[elem[0]]] if elem else grads, fused_available=plan is not None)
        if factor is not None and path == "fused":
            if apply and self.elementwise and not self.leaf_args and not shared:
                # torch's fused kernel chunk by chunk on the scaled gradients (see _run_encoded, no encodings)
                return self._run_encoded(h, impl, params, grads, s, ctx, {}, elem, shared, counter, factor)
            grads, factor = scaled_by(grads, factor), None
        coef: float | Tensor = 1.0 if h.lr is None else -h.lr
        if self.amp_native and (ctx.grad_scale is not None or ctx.found_inf is not None):
            ref = next((s[key] for key in (*self.fused_state, *elem) if key in s), grads)
            if not (path == "fused" and apply and _fused.same_dtypes(params, ref)):  # not torch's own fused call
                unscaled = _fused.amp_unscale(grads, ctx.grad_scale, ctx.found_inf)
                if unscaled is None:  # a skipped step: nothing changes
                    return _fused.skipped_updates(grads, apply), dict(s)
                grads, ctx = unscaled, ctx.but(grad_scale=None, found_inf=None)
        if path == "fused":
            assert plan is not None and self.fused is not None
            k = Kernel(h=h, p=params, g=grads, donate=donate, apply=apply, coef=coef, ctx=ctx, **s)
            updates, new = self.fused(k, plan)
            return updates, {**s, **new}
        ops = ops_for(path)
        lists = [ts for key, ts in s.items() if key not in shared]
        own = not _select.autograd_recording([t for ts in (params or [], grads, *lists) for t in ts])
        donate = donate and own
        like = grads
        real = {key: as_real(s[key]) for key in elem}
        math_dtypes = [t.dtype for t in real[elem[0]]] if elem else [compute_dtype or g.dtype for g in grads]
        if factor is not None and any(dt != torch.float32 for dt in math_dtypes):
            grads, factor = scaled_by(grads, factor), None  # (cast below: scale first)
        ref = real[elem[0]] if elem else _in_dtype(as_real(grads), compute_dtype)
        g = cast_like(as_real(grads), ref) if elem else ref  # state may be kept in another dtype (state_dtype=)
        p = cast_like(as_real(params), ref) if params is not None else None
        apply = can_apply(ops, apply and donate, params, p)
        out: dict[str, list[Tensor]] = {}
        scalar_state = {key: s[key] for key in s if key not in real and key not in shared}
        k0 = Kernel(ops=ops, h=h, p=p, g=g, donate=donate, own=own, apply=apply, coef=coef, target=None,
                    segments=ctx.segments, extra=ctx.extra_args, dtensors=dtensors, **scalar_state, **shared,
                    **real)  # fmt: skip
        if "step" in s:
            out["step"] = k0.steps = ops.add_scalar(s["step"], 1, inplace=donate)
        extra: dict[str, list[Any]] = {}
        if self.scalars is not None:
            for key, values in self.scalars(k0, out.get("step", [])).items():
                if key in self.fields:
                    out[key] = values
                else:
                    extra[key] = values
        names, cols = [*extra, "dtensors"], list(extra.values())  # (the DTensors: the last column, per chunk too)
        fields = [*elem, *odd]  # (fields not shaped like the parameters: chunked whole tensors only, see __init__)

        def body(ops: ListOps, p: list[Tensor] | None, g: list[Tensor], *columns: Any) -> tuple[Any, ...]:
            named = {**dict(zip(fields, columns)), **dict(zip(names, columns[len(fields) :]))}
            if factor is not None:  # (the chunk's gradients scaled as it reads them)
                g = ops.mul(g, factor)
            target = p if apply else None
            k = Kernel(ops=ops, h=h, p=p, g=g, donate=donate, own=own, apply=apply, coef=coef, target=target,
                       segments=ctx.segments, extra=ctx.extra_args, **shared, **named)  # fmt: skip
            updates, new = self.math(k)
            out.update({key: new[key] for key in shared if key in new})  # (chunked: never updates_globals)
            return (updates, *(new.get(key) for key in fields))

        writes = (None, *range(2, 2 + len(fields)))
        # tensorwise chunks: not over flat buffers' segments, nor with per-leaf arguments (they come whole), nor on
        # local shards where the math talks to the other ranks (each rank would chunk its shards otherwise)
        tensorwise = ctx.segments is None and not self.leaf_args and (dtensors is None or self.local_chunks)
        results = elementwise(
            body, ops, (p, g, *(real[key] for key in elem), *(odd[key] for key in odd), *cols, dtensors), writes,
            in_place=apply and self.chunked and (self.elementwise or tensorwise), chunk_scale=self.chunk_scale,
            split=self.elementwise,
        )  # fmt: skip
        updates = results[0]
        for key, result in zip(fields, results[1:]):
            out[key] = s[key] if result is None else as_complex_like(result, like) if key in real else result
        return (None if updates is None else as_complex_like(updates, like)), out
