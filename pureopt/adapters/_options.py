"""Option values of a saved param group in forms torch's state-dict tools carry (internal to the adapters).

``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` with ``full_state_dict=True`` or ``cpu_offload``:
torchtune's and accelerate's way of saving FSDP2 models) accepts only tensors, numbers, strings, bytes, ``None``
and lists / tuples / dicts of them, and raises ``ValueError: Unexpected value type <class 'torch.dtype'>`` on
anything else. pureopt's options hold dtypes and encodings (``state_dtype=torch.float32``,
``state_dtype={"exp_avg_sq": FloatEncoding(torch.bfloat16, stochastic=True)}``, Muon's ``ns_dtype``), so a
saved group holds them as tagged dicts of plain values (:func:`saved_option`), turned back into the objects when a
checkpoint is loaded or a group's options are read (:func:`loaded_option`; untagged values, e.g. the objects
themselves in checkpoints written before, pass through).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pureopt.kernels.encoding import NAMED, BlockEncoding, FloatEncoding

TAG = "pureopt_option"
"""The key that marks a dict as a saved option value (its value names the kind: ``"dtype"``, ``"encoding"``)."""


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"a saved option names the dtype {name!r}, which this torch does not have")
    return value


def saved_option(value: Any) -> Any:
    """``value`` with every dtype and encoding in it replaced by a tagged dict of plain values."""
    if isinstance(value, torch.dtype):
        return {TAG: "dtype", "name": _dtype_name(value)}
    if isinstance(value, FloatEncoding):
        return {TAG: "float_encoding", "dtype": _dtype_name(value.dtype), "stochastic": value.stochastic,
                "seed": value.seed}  # fmt: skip
    if isinstance(value, BlockEncoding):
        if NAMED.get(value.name) is value:
            return {TAG: "named_encoding", "name": value.name}
        return {TAG: "block_encoding", "name": value.name, "bits": value.bits, "block": value.block,
                "code": None if value.code is None else list(value.code), "dtype": _dtype_name(value.dtype),
                "nonzero": value.least is not None}  # fmt: skip
    if isinstance(value, Mapping):
        return {k: saved_option(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # (plain ones: a NamedTuple is left as it is)
        return type(value)(saved_option(v) for v in value)
    return value


def loaded_option(value: Any) -> Any:
    """The inverse of :func:`saved_option` (other values unchanged)."""
    if isinstance(value, Mapping):
        kind = value.get(TAG)
        if kind is None:
            return {k: loaded_option(v) for k, v in value.items()}
        if kind == "dtype":
            return _dtype(value["name"])
        if kind == "float_encoding":
            dtype = _dtype(value["dtype"])
            assert dtype is not None
            return FloatEncoding(dtype, stochastic=bool(value["stochastic"]), seed=int(value["seed"]))
        if kind == "named_encoding":
            if value["name"] not in NAMED:
                raise ValueError(f"a saved option names the encoding {value['name']!r}, which pureopt does not have")
            return NAMED[value["name"]]
        if kind == "block_encoding":
            code = value["code"]
            return BlockEncoding(
                str(value["name"]), bits=int(value["bits"]), block=int(value["block"]),
                code=None if code is None else [float(c) for c in code], dtype=_dtype(value["dtype"]),
                nonzero=bool(value["nonzero"]),
            )  # fmt: skip
        raise ValueError(f"a saved option is tagged {kind!r}, which this version of pureopt cannot read")
    if type(value) in (list, tuple):
        return type(value)(loaded_option(v) for v in value)
    return value
