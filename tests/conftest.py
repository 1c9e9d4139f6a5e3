"""Test-session settings."""

from __future__ import annotations

import torch

# The suite runs with pytest-xdist on small machines (CI: 2 cores, 2 workers): one intra-op thread per worker
# avoids oversubscription, which makes small tensor ops tens of times slower.
torch.set_num_threads(1)
