"""``benchmarks/memory.py`` loaded for the tests, whose ``transient_peak`` measures there what its tables report:
the CPU allocator's events recorded by ``torch.profiler``, replayed in time order (the bytes a call allocates and
has not freed, at their peak)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any


@functools.cache
def benchmark_module() -> Any:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("pureopt_memory_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def transient_peak(fn: Any) -> tuple[int, int]:
    """(peak, still alive at the end) bytes of the tensors one call of ``fn`` allocates."""
    return benchmark_module().transient_peak(fn)
