"""The device the suite runs on: CPU by default, or ``PUREOPT_TEST_DEVICE`` (e.g. ``cuda``) for the whole suite.

``PUREOPT_TEST_DEVICE=cuda pytest`` makes every tensor a test creates without an explicit ``device=`` (parameters,
gradients, data, ``nn.Module`` weights, torch.optim's reference state) live on that device, so the parity, purity,
kernel, adapter, flat, AMP and torch.func tests run there unchanged. Tensors drawn from a CPU ``torch.Generator``
are drawn on the CPU (the same numbers as a CPU run) and then moved. Tests that must pin a device say so
(``device="cpu"``) or skip with :data:`on_cpu_only`.

tests/test_cuda.py holds the CUDA-specific checks (fused kernels bitwise against torch's, no host syncs, CUDA
graphs); they create their tensors on ``cuda`` explicitly and skip without a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.utils._device import DeviceContext, _device_constructors

__all__ = ["TEST_DEVICE", "activate", "on_cpu_only", "requires_cuda"]

TEST_DEVICE = torch.device(os.environ.get("PUREOPT_TEST_DEVICE", "cpu"))

on_cpu_only = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="checks CPU-specific kernels or bits")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _TestDevice(DeviceContext):
    """torch's default-device mode, except that a factory given a generator of another device draws there first."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != self.device.type:
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def activate() -> None:
    """Make :data:`TEST_DEVICE` the default device of tensor factories for the rest of the process."""
    if TEST_DEVICE.type == "cpu":
        return
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PUREOPT_TEST_DEVICE=cuda but torch sees no CUDA device")
    _TestDevice(TEST_DEVICE).__enter__()
