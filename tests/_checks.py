"""Shared checks: purity (inputs bitwise unchanged after an update)."""

from __future__ import annotations

from typing import Any

import torch

import pureopt


def snapshot(tree: Any) -> list[torch.Tensor | None]:
    """Copies of every leaf of ``tree`` (``None`` kept), to compare against after a call."""
    return [None if t is None else t.clone() for t in pureopt.tree.leaves(tree)]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaNs and signed zeros compare as stored)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits: layout, shape, dtype and every byte (sparse: indices and values)."""
    if a.is_sparse or b.is_sparse:
        return (
            a.is_sparse == b.is_sparse and same_bits(a._indices(), b._indices()) and same_bits(a._values(), b._values())
        )
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_raw(a), _raw(b))


def assert_unchanged(tree: Any, snap: list[torch.Tensor | None], what: str) -> None:
    """Every leaf of ``tree`` is bitwise what :func:`snapshot` saw."""
    now = pureopt.tree.leaves(tree)
    assert len(now) == len(snap), f"{what}: structure changed"
    for a, b in zip(now, snap):
        if b is None:
            assert a is None, f"{what} was mutated"
        else:
            assert same_bits(a, b), f"{what} was mutated"
