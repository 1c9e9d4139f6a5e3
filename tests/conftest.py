"""Test-session settings."""

from __future__ import annotations

import torch

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
    import os

    _hypothesis_settings.register_profile("deterministic", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
