"""Encoded state: an algorithm's math run chunk by chunk over state stored in another encoding (issue 16).

``state_dtype`` chooses, per state field, how it is stored (:mod:`pureopt.kernels.encoding`): a float dtype, fp8
with a scale per block, or block-wise 8-bit / 4-bit codes. The math is the algorithm's own, unchanged (its
``math``, or its ``fused`` kernel call where the plain-state step would make it: see
``Algorithm._run_encoded``): each chunk of about :data:`CHUNK_ELEMENTS` elements is decoded into the compute dtype
(float32 for 16-bit parameters, else the parameter's), stepped, and encoded back, so no full-precision copy of a
whole state field exists at any time. Eagerly the decoded chunks of a field share one scratch buffer.
On the CPU, eagerly, ``Algorithm._run_encoded`` first offers the step to :mod:`pureopt.kernels.onepass` (the math
traced into one native pass per tensor, tile by tile); this chunked path runs wherever that cannot.
Big parameters are cut into flat slices at block boundaries; small ones are grouped whole. Math with reductions
over a tensor or over all tensors (``elementwise=False``) runs on whole tensors in one chunk instead (its state is
then decoded whole).

On the pure path the new state is written into fresh encoded buffers (the inputs stay bitwise unchanged); on the
donated path into the stored buffers themselves, and, with ``apply``, the update goes into the parameters' own memory
chunk by chunk.

Traced by ``torch.compile``, the chunks stay and block or stochastically rounded fields are decoded and encoded by
opaque ops (:mod:`pureopt.kernels.codec_ops`), so the compiled step keeps this memory bound; under ``torch.func``
transforms the codecs take functional forms over whole tensors. Each tensor's stored record says how it is read
(:meth:`~pureopt.kernels.encoding.Encoding.local`): flat codes, codes by rows (a DTensor parameter's local shard,
blocks within rows), or a plain tensor (rows too short to block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pureopt.kernels import codec_ops
from pureopt.kernels.dtensor import is_dtensor, shard_starts
from pureopt.kernels.encoding import Encoding, FloatEncoding, compiling, encoding_for, opaque_codecs, shaped_like
from pureopt.kernels.listops import ListOps

__all__ = ["CHUNK_ELEMENTS", "compute_dtype", "parse_state_dtype", "run_chunks"]

CHUNK_ELEMENTS = 1 << 17
"""Elements per chunk (0.5 MiB of float32 per decoded field): a chunk's decoded state and temporaries stay in cache,
and the step's peak transient memory is about one decoded chunk per encoded field whatever the model's size."""


def compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype the math runs in for encoded state: float32 for 16-bit (and 8-bit) parameters, else the
    parameter's."""
    return torch.float32 if p.dtype.itemsize < 4 and p.dtype.is_floating_point else p.dtype


def parse_state_dtype(
    spec: Any, fields: Sequence[str], nonneg: Mapping[str, bool], copies: Collection[str] = ()
) -> tuple[torch.dtype | None, dict[str, Encoding]]:
    """``state_dtype`` -> (the one dtype every field is kept in, as before; the encodings per field).

    ``None`` or a float dtype: all fields in that dtype (no encoding). A name (``"q8"``, ``"q4"``, ``"fp8"``), an
    fp8 dtype or an :class:`~pureopt.kernels.encoding.Encoding`: every per-element field encoded so but those in
    ``copies`` (fields holding parameter values: kept in the parameter's dtype). A dict from field names to any of
    these (or to float dtypes): per field; fields it does not name keep the parameter's dtype.
    """
    if spec is None:
        return None, {}
    if not isinstance(spec, Mapping):
        if isinstance(spec, torch.dtype) and encoding_for(spec) is None:
            return spec, {}
        spec = {key: spec for key in fields if key not in copies}
    unknown = [key for key in spec if key not in fields]
    if unknown:
        raise ValueError(f"state_dtype names {unknown[0]!r}, which is not a state field here; fields: {list(fields)}")
    encodings: dict[str, Encoding] = {}
    for key, value in spec.items():
        if value is None:
            continue
        enc = encoding_for(value, nonneg=nonneg.get(key, False))
        encodings[key] = enc if enc is not None else FloatEncoding(value)
    return None, encodings


def _view(t: Tensor, lo: int, hi: int, whole: bool) -> Tensor:
    return t if whole else t.view(-1)[lo:hi]


def _plan(
    sizes: Sequence[int],
    splittable: Sequence[bool],
    align: int | Sequence[int],
    elementwise: bool,
    elements: int = CHUNK_ELEMENTS,
) -> Iterator[list[tuple[int, int, int, bool]]]:
    """Chunks as lists of ``(tensor, lo, hi, whole)``: flat slices of big splittable tensors (at multiples of
    ``align``, one for all tensors or one each), small tensors grouped whole; everything in one chunk for
    non-elementwise math."""
    if not elementwise:
        yield [(i, 0, n, True) for i, n in enumerate(sizes)]
        return
    aligns = [align] * len(sizes) if isinstance(align, int) else list(align)
    chunk: list[tuple[int, int, int, bool]] = []
    acc = 0
    for i, n in enumerate(sizes):
        width = max(aligns[i], elements // aligns[i] * aligns[i])
        if n > width and splittable[i]:
            for lo in range(0, n, width):
                yield [(i, lo, min(n, lo + width), False)]
            continue
        if chunk and acc + n > elements:  # a chunk never grows past the width (but for one big tensor)
            yield chunk
            chunk, acc = [], 0
        chunk.append((i, 0, n, True))
        acc += n
    if chunk:
        yield chunk


Body = Callable[
    [ListOps, list[Tensor], list[Tensor], dict[str, list[Tensor]], dict[str, list[Any]], bool],
    tuple[list[Tensor] | None, Mapping[str, list[Tensor]]],
]
"""``body(ops, p, g, fields, columns, apply) -> (updates or None if applied, new fields)`` on one chunk; the field
lists are the chunk's own temporaries (may be overwritten)."""


def run_chunks(
    body: Body,
    ops: ListOps,
    params: list[Tensor] | None,
    grads: list[Tensor],
    fields: Mapping[str, list[Any]],
    encodings: Mapping[str, Encoding],
    columns: Mapping[str, list[Any]],
    *,
    donate: bool,
    apply: bool,
    elementwise: bool,
    tensorwise: bool = False,
    counter: Tensor | None = None,
    streams: Sequence[int] | None = None,
    chunk_scale: int = 1,
) -> tuple[list[Tensor] | None, dict[str, list[Any]]]:
    """One step over encoded (and plain) per-element state fields, chunk by chunk (see module docstring);
    ``tensorwise`` (math that is not elementwise but reduces within each tensor): chunks of whole tensors.

    ``fields``: each per-element field's stored values (encoded records for the fields in ``encodings``, tensors
    otherwise); ``columns``: per-tensor values (one per parameter); ``counter``: the transformation's update count
    (keys stochastically rounding encodings, with the tensor's stream: ``streams[i]``, else its position; see
    ``UpdateContext.streams``). Returns the updates (``None`` when ``apply``: added to the parameters) and the new
    stored fields.
    """
    tensors = [*grads, *(params or [])]
    if any(t.is_complex() for t in tensors):
        raise ValueError("encoded optimizer state (state_dtype=) does not support complex parameters")
    if any(map(is_dtensor, tensors)):
        raise ValueError(
            "encoded optimizer state (state_dtype=) steps DTensor parameters on their local shards, which is not "
            "possible here: under torch.compile or a torch.func transform, with Partial gradients, or with state "
            "placed unlike its parameter"
        )
    if any(g.is_sparse for g in grads):
        raise ValueError("encoded optimizer state (state_dtype=) does not support sparse gradients")
    like = params if params is not None else grads
    dtypes = [compute_dtype(t) for t in like]
    # each tensor's encoding (None: a plain tensor) and flat stored record, per field (see Encoding.local)
    encs: dict[str, list[Encoding | None]] = {}
    flat: dict[str, list[Any]] = {}
    for key, values in fields.items():
        enc = encodings.get(key)
        pairs = [(None, v) if enc is None else enc.local(v) for v in values]
        encs[key], flat[key] = [e for e, _ in pairs], [v for _, v in pairs]
    blocks = [[e.block if e is not None else 1 for e in column] for column in encs.values()]
    aligns = [math.lcm(2, *(column[i] for column in blocks)) for i in range(len(grads))]
    splittable = [
        g.is_contiguous() and (params is None or params[i].is_contiguous()) and all(
            flat[key][i].is_contiguous() for key in fields if encs[key][i] is None)
        for i, g in enumerate(grads)
    ]  # fmt: skip
    # (on local shards: each shard's place in its whole tensor, so stochastic rounding keys bits as unsharded)
    starts = (None if torch.compiler.is_compiling() else shard_starts()) or []  # (traced: never on local shards)
    starts = starts if len(starts) == len(grads) else [0] * len(grads)
    # outputs: the stored fields themselves when donated, else fresh buffers of the same encodings
    if donate:
        out_flat = flat
    else:
        out_flat = {
            key: [torch.empty_like(v) if e is None else e.like(v) for e, v in zip(encs[key], flat[key])]
            for key in fields
        }
    updates = None if apply else [torch.empty_like(g, dtype=dt) for g, dt in zip(grads, dtypes)]
    written: set[str] = set()
    # Traced by dynamo with block or stochastically rounded encodings: chunks as in eager mode, each one's decode /
    # encode an opaque op, ordered by the tokens the last chunk's encodes returned (see pureopt.kernels.codec_ops).
    # Under vmap, or with plain float encodings only: whole tensors in one chunk (inductor fuses decode, math and
    # encode into one elementwise pass).
    chunked = not compiling() or (opaque_codecs() and any(e.opaque for e in encodings.values()))
    traced = chunked and compiling()  # (traced by dynamo, chunk by chunk: the parameters written by an opaque op)
    after: list[Tensor] = []  # (traced: what the next chunk's decodes must follow, see pureopt.kernels.codec_ops)
    whole_only = [False] * len(grads)  # (tensorwise math: tensors are never cut)
    plan = list(
        _plan([g.numel() for g in grads], splittable if elementwise else whole_only, aligns,
              (elementwise or tensorwise) and chunked, CHUNK_ELEMENTS * chunk_scale)
    )  # fmt: skip
    # Eagerly, each field's chunks are decoded into one scratch buffer per compute dtype, reused chunk after chunk
    # (a fresh chunk-sized buffer per chunk costs page faults on every step where the allocator hands memory back)
    scratch = None if compiling() else _Scratch(plan, [(dt, g.device) for dt, g in zip(dtypes, grads)])
    in_place = {
        key for key, values in flat.items()
        if donate and all(e is None and v.dtype == dt for e, v, dt in zip(encs[key], values, dtypes))
    }  # fmt: skip
    for chunk in plan:
        g_c = [_in(_view(grads[i], lo, hi, whole), dtypes[i]) for i, lo, hi, whole in chunk]
        p_views = None if params is None else [_view(params[i], lo, hi, whole) for i, lo, hi, whole in chunk]
        p_c = None if p_views is None else [_in(v, dtypes[i]) for v, (i, *_) in zip(p_views, chunk)]
        own_p = p_views is not None and all(a is b for a, b in zip(p_c or [], p_views))  # parameters' own memory
        f_c: dict[str, list[Tensor]] = {}
        for k, (key, values) in enumerate(flat.items()):
            if key in in_place:  # (plain, in the compute dtype, donated: the math steps their own memory)
                f_c[key] = [_view(values[i], lo, hi, whole) for i, lo, hi, whole in chunk]
                continue
            bufs = scratch.buffers(k, chunk) if scratch is not None else [None] * len(chunk)
            f_c[key] = [
                _plain_copy(_view(values[i], lo, hi, whole), dtypes[i], buf)
                if (enc := encs[key][i]) is None
                else enc.decode(values[i], lo, hi, dtypes[i], after, buf).view(grads[i].shape if whole else (hi - lo,))
                for (i, lo, hi, whole), buf in zip(chunk, bufs)
            ]
        c_c = {name: None if col is None else [col[i] for i, *_ in chunk] for name, col in columns.items()}
        u, new = body(ops, p_c, g_c, f_c, c_c, apply and own_p and not traced)  # type: ignore[arg-type]
        written.update(new)
        after = []
        for j, ((i, lo, hi, whole), v) in enumerate(zip(chunk, u or [])):
            if updates is not None:
                _view(updates[i], lo, hi, whole).copy_(v)
            elif traced:  # (the parameters written by an opaque op: see codec_ops.add_at)
                assert params is not None
                codec_ops.add_at(params[i], lo, v)
            else:  # the math could not write into the parameters (another dtype): add here, rounded to theirs
                assert p_views is not None
                p_views[j].add_(v)
            after.append(v)
        for key, values in new.items():
            for (i, lo, hi, whole), v in zip(chunk, values):
                if (enc := encs[key][i]) is None:
                    target = _view(out_flat[key][i], lo, hi, whole)
                    if not (v.data_ptr() == target.data_ptr() and v.shape == target.shape):  # (stepped in place)
                        target.copy_(v)
                else:
                    stream = streams[i] if streams is not None else i
                    token = enc.encode_into(out_flat[key][i], lo, v.reshape(-1), counter, stream, starts[i])
                    after += [] if token is None else [token]
    out = {
        key: list(values)
        if donate or key not in written  # (a field this step left as it was: the same values)
        else [shaped_like(v, old) for v, old in zip(out_flat[key], values)]
        for key, values in fields.items()
    }
    return updates, out


def _in(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _plain_copy(t: Tensor, dtype: torch.dtype, buf: Tensor | None) -> Tensor:
    """A field kept as a plain tensor, copied in ``dtype`` (into the scratch slice ``buf`` when there is one): the
    chunk's math may write into it."""
    return t.to(dtype, copy=True) if buf is None else buf.view(t.shape).copy_(t)


class _Scratch:
    """Per field, compute dtype and device, one flat buffer as long as the longest chunk's elements of that kind,
    allocated on first use; :meth:`buffers` hands out a chunk's slices (one per tensor, in chunk order)."""

    def __init__(self, plan: list[list[tuple[int, int, int, bool]]], kinds: list[tuple[torch.dtype, Any]]) -> None:
        self.kinds = kinds
        self.need: dict[tuple[torch.dtype, Any], int] = {}
        for chunk in plan:
            per: dict[tuple[torch.dtype, Any], int] = {}
            for i, lo, hi, _ in chunk:
                per[kinds[i]] = per.get(kinds[i], 0) + hi - lo
            for kind, n in per.items():
                self.need[kind] = max(self.need.get(kind, 0), n)
        self.held: dict[tuple[int, torch.dtype, Any], Tensor] = {}

    def buffers(self, field: int, chunk: list[tuple[int, int, int, bool]]) -> list[Tensor]:
        out: list[Tensor] = []
        used: dict[tuple[torch.dtype, Any], int] = {}
        for i, lo, hi, _ in chunk:
            kind = self.kinds[i]
            buf = self.held.get((field, *kind))
            if buf is None:
                buf = self.held[(field, *kind)] = torch.empty(self.need[kind], dtype=kind[0], device=kind[1])
            start = used.get(kind, 0)
            out.append(buf[start : start + hi - lo])
            used[kind] = start + hi - lo
        return out
