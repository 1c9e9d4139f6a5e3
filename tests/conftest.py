"""Test-session settings."""

from __future__ import annotations

import getpass
import os
import tempfile

import pytest
import torch
from _device import TEST_DEVICE, activate

# Inductor's on-disk kernel cache does not tell kernels built for one CPU vector width from another: a kernel
# compiled under ATEN_CPU_CAPABILITY=avx2 and reused in a run at the native width (or the reverse) computed garbage
# for half the elements, or crashed in free(), in this suite's compiled tests (torch 2.13). Each width gets its
# own cache directory, unless the caller chose one.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"pureopt-inductor-{getpass.getuser()}-{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}",
    ),
)

# The suite runs with pytest-xdist on small machines (CI: 2 cores, 2 workers): one intra-op thread per worker
# avoids oversubscription, which makes small tensor ops tens of times slower.
torch.set_num_threads(1)

# Property tests draw the same examples on every run (derived from each test), so that a run's outcome does not
# depend on chance; to explore new examples locally, run with HYPOTHESIS_PROFILE=explore.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    # on another device the first call of each kernel is slow (module loading): no per-example deadline there
    _deadline = {} if TEST_DEVICE.type == "cpu" else {"deadline": None}
    _hypothesis_settings.register_profile("deterministic", derandomize=True, print_blob=True, **_deadline)
    _hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


# PUREOPT_TEST_DEVICE=cuda runs the suite with CUDA as the default device of tensor factories (tests/_device.py).
activate()


@pytest.fixture
def device() -> torch.device:
    """The device this run of the suite tests on (``PUREOPT_TEST_DEVICE``, default CPU)."""
    return TEST_DEVICE
