"""State codecs as opaque torch ops, for a step traced by ``torch.compile``.

Inductor, given a block encoding's functional form (a gather from the code table, the block maxima, the nearest-code
search), fuses decode, math and encode of a whole tensor into one kernel, but it keeps the decoded state of every
tensor in full-precision buffers between the block-maximum reduction and the encode; given stochastic rounding's
hash, it keeps every piece's random bits alive to the end of the step. The compiled step then peaks at a float32
copy of the whole state (or more), the memory the encoding is there to save. So under dynamo the encoded step runs
chunk by chunk as in eager mode, and each chunk's decode and encode are the ops here (the eager codecs, called by
the compiled graph): only the chunk's math is fused. A token returned by each encode and passed to the next chunk's
decodes orders the chunks, so inductor cannot merge independent chunks into one kernel (which would make all their
temporaries live at once): the step's transient stays one chunk per encoded field.

The ops name the encoding by a key (an encoding is a Python object; an op's arguments are tensors and scalars): a
string made from the encoding's parameters, so that a compiled graph cached on disk names the same encoding in
another process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "block_decode", "block_encode", "float_decode", "float_encode", "add_at"]

_ENCODINGS: dict[str, Any] = {}


def register(key: str, encoding: Any) -> str:
    """Name ``encoding`` (a :class:`~pureopt.kernels.encoding.Encoding`) ``key`` for the ops below; ``key`` must
    be made from everything that decides its codes (equal keys: interchangeable encodings)."""
    _ENCODINGS[key] = encoding
    return key


def _quantized(codes: Tensor, scale: Tensor) -> Any:
    from pureopt.kernels.encoding import Quantized  # (that module imports this one)

    return Quantized(codes, scale)


@torch.library.custom_op("pureopt::block_decode", mutates_args=())
def _block_decode(codes: Tensor, scale: Tensor, after: list[Tensor], key: str, lo: int, hi: int) -> Tensor:
    return _ENCODINGS[key].decode(_quantized(codes, scale), lo, hi, torch.float32)


@_block_decode.register_fake
def _(codes: Tensor, scale: Tensor, after: list[Tensor], key: str, lo: int, hi: int) -> Tensor:
    return scale.new_empty(hi - lo, dtype=torch.float32)


@torch.library.custom_op("pureopt::block_encode", mutates_args=("codes", "scale"))
def _block_encode(codes: Tensor, scale: Tensor, x: Tensor, key: str, lo: int) -> Tensor:
    _ENCODINGS[key].encode_into(_quantized(codes, scale), lo, x)
    return scale.new_zeros(())


@_block_encode.register_fake
def _(codes: Tensor, scale: Tensor, x: Tensor, key: str, lo: int) -> Tensor:
    return scale.new_empty(())


@torch.library.custom_op("pureopt::float_decode", mutates_args=())
def _float_decode(stored: Tensor, after: list[Tensor], key: str, lo: int, hi: int) -> Tensor:
    return _ENCODINGS[key].decode(stored, lo, hi, torch.float32)


@_float_decode.register_fake
def _(stored: Tensor, after: list[Tensor], key: str, lo: int, hi: int) -> Tensor:
    return stored.new_empty(hi - lo, dtype=torch.float32)


@torch.library.custom_op("pureopt::float_encode", mutates_args=("stored",))
def _float_encode(stored: Tensor, x: Tensor, counter: Tensor, key: str, lo: int, stream: int, at: int) -> Tensor:
    _ENCODINGS[key].encode_into(stored, lo, x, counter, stream, at)
    return x.new_zeros(())


@_float_encode.register_fake
def _(stored: Tensor, x: Tensor, counter: Tensor, key: str, lo: int, stream: int, at: int) -> Tensor:
    return x.new_empty(())


@torch.library.custom_op("pureopt::add_at", mutates_args=("target",))
def _add_at(target: Tensor, lo: int, x: Tensor) -> None:
    target.view(-1)[lo : lo + x.numel()].add_(x.reshape(-1))


@_add_at.register_fake
def _(target: Tensor, lo: int, x: Tensor) -> None:
    return None


def block_decode(key: str, codes: Tensor, scale: Tensor, lo: int, hi: int, after: Sequence[Tensor]) -> Tensor:
    """Elements ``lo:hi`` of a block-encoded field, float32 (flat), read after the tensors ``after`` exist."""
    return torch.ops.pureopt.block_decode(codes, scale, list(after), key, lo, hi)


def block_encode(key: str, codes: Tensor, scale: Tensor, lo: int, x: Tensor) -> Tensor:
    """Write ``x`` (float32, flat) into elements ``lo:`` of a block-encoded field; returns the ordering token."""
    return torch.ops.pureopt.block_encode(codes, scale, x, key, lo)


def float_decode(key: str, stored: Tensor, lo: int, hi: int, after: Sequence[Tensor]) -> Tensor:
    """Elements ``lo:hi`` of a float-stored field, float32 (flat), read after the tensors ``after`` exist."""
    return torch.ops.pureopt.float_decode(stored, list(after), key, lo, hi)


def float_encode(key: str, stored: Tensor, lo: int, x: Tensor, counter: Tensor, stream: int, at: int = 0) -> Tensor:
    """Write ``x`` (float32, flat) into elements ``lo:`` of a stochastically rounded field (random bits keyed by
    ``counter``, ``stream`` and the places ``at + lo + k``); returns the ordering token."""
    return torch.ops.pureopt.float_encode(stored, x, counter, key, lo, stream, at)


def add_at(target: Tensor, lo: int, x: Tensor) -> None:
    """``target``'s flat elements ``lo:lo + x.numel()`` += ``x`` (rounded to ``target``'s dtype), in place: the
    parameters' update in a traced encoded step (inductor, given each chunk's in-place add on a slice of a
    parameter, may keep an updated copy of the whole parameter instead of writing into it)."""
    torch.ops.pureopt.add_at(target, lo, x)
