"""Every registered optimizer configuration (tests/_registry.py ``CONFIGS``) on FSDP2 against the unsharded run.

Each of 2 gloo ranks shards test_fsdp's float64 model with ``fully_shard`` (uneven shards, one empty local shard),
trains it with ``TorchOptimizer`` (``impl="auto"``: torch's fused/foreach kernels on the local shards where the
algorithm is elementwise, DTensor ops where it reduces) on its half of each global batch, and gathers the parameters
after every step. The reference is the same optimizer in one process on the unsharded model with the whole batch.
All configurations run in one 2-rank job. Tolerances: fp64 rtol 1e-10, except the algorithms whose update depends
on sums over all elements of a tensor or of the model (the order of a sharded reduction differs from the unsharded
one, and these algorithms divide by such sums or take their signs): 1e-8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, assert_trajectory_close, launch
from _registry import CONFIGS
from test_fsdp import GLOBAL_BATCH, STEPS, full_params, global_batch, make_net, sharded_net

from pureopt.adapters.torch_optim import TorchOptimizer

NAMES = [name for name, _, _ in CONFIGS]
_BY_NAME = {name: (factory, kwargs) for name, factory, kwargs in CONFIGS}
# reductions over a whole tensor or the whole model feed the update (norm ratios, d estimates, projections)
REFUSED = {"adamp", "sgdp", "came"}  # refuse DTensor parameters, saying so (not yet written)
LOOSER = {"lamb", "lars", "novograd", "adafactor", "came", "adamp", "sgdp", "prodigy", "dadapt_adam", "dadapt_sgd",
          "dog", "chain-clip-adamw", "mars"}  # fmt: skip


def _optimizer(name: str, params: Any) -> TorchOptimizer:
    factory, kwargs = _BY_NAME[name]
    if factory.__name__ == "_clipped_adamw":
        return TorchOptimizer(params, factory(**kwargs))
    return TorchOptimizer(params, factory, **kwargs)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 20.0 * ((out - y) ** 2).mean()  # gradients big enough that clipping acts


def _train(name: str, rank: int) -> list[list[torch.Tensor]] | str:
    model = sharded_net()
    try:
        opt = _optimizer(name, model.parameters())
        n = GLOBAL_BATCH // WORLD
        out = []
        for step in range(STEPS):
            x, y = global_batch(step)
            opt.zero_grad(set_to_none=True)
            _loss(model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
            opt.step()
            out.append(full_params(model))
        return out
    except Exception as e:  # reported per configuration on the test side
        return f"{type(e).__name__}: {e}"


def scenario_registry(rank: int, world: int, out: Path) -> dict[str, Any]:
    return {name: _train(name, rank) for name in NAMES}


def _reference(name: str) -> list[list[torch.Tensor]]:
    model = make_net()
    opt = _optimizer(name, model.parameters())
    out = []
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        _loss(model(x), y).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("test_fsdp_registry", "scenario_registry", tmp_path_factory.mktemp("fsdp-registry"))


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_optimizer_on_fsdp2_equals_the_unsharded_run(job: list[dict[str, Any]], name: str) -> None:
    if name in REFUSED:
        for rank in range(WORLD):
            assert job[rank][name].startswith("NotImplementedError: ") and "DTensor" in job[rank][name]
        return
    want = _reference(name)
    rtol = 1e-8 if name in LOOSER else 1e-10
    for rank in range(WORLD):
        got = job[rank][name]
        assert not isinstance(got, str), f"rank {rank}: {got}"
        assert not torch.equal(want[-1][0], make_net().fc1.weight)  # the run moved
        assert_trajectory_close(got, want, f"{name} rank {rank}", rtol=rtol)


def test_the_registry_is_covered() -> None:
    assert {"adam", "prodigy", "came", "lion", "chain-clip-adamw"} <= set(NAMES)
