"""pureopt on FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters), 2 gloo ranks on 127.0.0.1.

Each rank shards the same float64 model with ``fully_shard`` (``Shard(0)``), trains it for ``STEPS`` steps on its
half of every global batch (FSDP2 averages the gradients) and gathers the parameters after each step. The test
process compares those trajectories with a single-process, unsharded reference: torch.optim on the whole batch
(or, for Lion, which torch.optim lacks, the paper's rule written here). The model's layers shard unevenly (5 and 3
rows over 2 ranks) and leave rank 1 an empty local shard (a layer with 1 output row).

Elementwise algorithms run torch's foreach/fused kernels on the local shards (``pureopt.kernels.dtensor``); the
test records the aten ops of a step with the profiler to check that ``impl="auto"`` takes them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, launch
from _dist import assert_trajectory_close as assert_close
from torch import nn
from torch.distributed.tensor import Replicate, Shard

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer

STEPS = 8
LR = 2.0**-5
GLOBAL_BATCH = 8
RTOL64 = 1e-10
ATOL64 = 1e-12

# name -> (pureopt factory or transformation builder, its kwargs, torch.optim class or None, torch kwargs)
CONFIGS: dict[str, tuple[Any, dict[str, Any], Any, dict[str, Any]]] = {
    "sgd": (pureopt.sgd, {"lr": LR}, torch.optim.SGD, {"lr": LR}),
    "sgd-momentum": (
        pureopt.sgd,
        {"lr": LR, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        torch.optim.SGD,
        {"lr": LR, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
    "adamw": (pureopt.adamw, {"lr": LR, "weight_decay": 0.1}, torch.optim.AdamW, {"lr": LR, "weight_decay": 0.1}),
    "adam-amsgrad": (
        pureopt.adam,
        {"lr": LR, "amsgrad": True, "weight_decay": 0.05},
        torch.optim.Adam,
        {"lr": LR, "amsgrad": True, "weight_decay": 0.05},
    ),
    "adagrad": (
        pureopt.adagrad,
        {"lr": LR, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
        torch.optim.Adagrad,
        {"lr": LR, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
    ),
    "rmsprop": (
        pureopt.rmsprop,
        {"lr": LR, "momentum": 0.9, "centered": True, "weight_decay": 0.1},
        torch.optim.RMSprop,
        {"lr": LR, "momentum": 0.9, "centered": True, "weight_decay": 0.1},
    ),
    "lion": (pureopt.lion, {"lr": LR, "weight_decay": 0.5}, None, {"lr": LR, "weight_decay": 0.5}),
    "clip-adamw": (None, {"lr": LR, "weight_decay": 0.1}, torch.optim.AdamW, {"lr": LR, "weight_decay": 0.1}),
    "adamw-schedule": (None, {}, torch.optim.AdamW, {"lr": LR, "weight_decay": 0.1}),  # StepLR(3, 0.5): DCP only
    # not elementwise (factored moments, norms): runs on the DTensors, reductions across the shards
    "adafactor": (
        pureopt.adafactor,
        {"lr": LR, "weight_decay": 0.1},
        torch.optim.Adafactor,
        {"lr": LR, "weight_decay": 0.1},
    ),
}
# the impls each configuration runs with (``"fused"`` where the algorithm has a torch fused kernel)
# (Adagrad's fused kernel takes a float lr only, and TorchOptimizer passes a tensor lr: foreach there)
FUSED = {"sgd", "sgd-momentum", "adamw", "adam-amsgrad"}
IMPLS = {
    name: ("auto", "foreach", "loop", *(("fused",) if name in FUSED else ()))
    for name in CONFIGS
    if name != "adamw-schedule"
}
IMPLS["adafactor"] = ("auto", "loop")
TORCH_ON_FSDP2 = [n for n in IMPLS if CONFIGS[n][2] is not None and n != "adafactor"]  # torch's Adafactor fails
HSDP = ("adamw", "lion", "adafactor")  # also run on HSDP's 2-D mesh
# the aten op that shows ``impl="auto"`` ran torch's fused or foreach kernel
AUTO_OP = {
    "sgd": "aten::_fused_sgd_",
    "sgd-momentum": "aten::_fused_sgd_",
    "adamw": "aten::_fused_adamw_",
    "adam-amsgrad": "aten::_fused_adam_",
    "adagrad": "aten::_foreach_addcmul_",
    "rmsprop": "aten::_foreach_addcmul_",
    "lion": "aten::_foreach_lerp",
    "clip-adamw": "aten::_fused_adamw_",
}
LOSS_SCALE = {"clip-adamw": 20.0}  # gradients whose global norm exceeds 1, so the clipping acts


class Net(nn.Module):
    """fc1: 5 rows (3 + 2 per rank), fc2: 3 rows (2 + 1), head: 1 row (rank 1's shard is empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().to(torch.float64)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), torch.randn(
        GLOBAL_BATCH, 1, generator=g, dtype=torch.float64
    )


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return LOSS_SCALE.get(name, 1.0) * ((out - y) ** 2).mean()


def pureopt_optimizer(name: str, params: Any, impl: str) -> TorchOptimizer:
    factory, kwargs, _, _ = CONFIGS[name]
    if name == "clip-adamw":
        tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(**kwargs, impl=impl))
        return TorchOptimizer(params, tx)
    if name == "adamw-schedule":  # lr = LR * 0.5 ** (num_updates // 3)
        schedule = pureopt.schedules.step_lr(LR, step_size=3, gamma=0.5)
        return TorchOptimizer(params, pureopt.adamw(lr=schedule, weight_decay=0.1, impl=impl))
    return TorchOptimizer(params, factory, **kwargs, impl=impl)


# --- rank side ----------------------------------------------------------------------------------------------------


def sharded_net(hsdp: bool = False) -> Net:
    """FSDP2 over the 2 ranks; ``hsdp``: HSDP's 2-D mesh (1 replica x 2 shards: placements (Replicate, Shard(0)))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")) if hsdp else None
    model = make_net()
    for layer in (model.fc1, model.fc2, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def train(name: str, rank: int, make_opt: Any, hsdp: bool = False) -> dict[str, Any]:
    """``STEPS`` steps on this rank's half of each global batch; the gathered parameters after each."""
    model = sharded_net(hsdp)
    opt = make_opt(model.parameters())
    n = GLOBAL_BATCH // WORLD
    trajectory, ops = [], set()
    for step in range(STEPS):
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        loss_fn(name, model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
        if name == "clip-adamw" and not isinstance(opt, TorchOptimizer):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                opt.step()
            ops = {e.name for e in prof.events()}
        else:
            opt.step()
        trajectory.append(full_params(model))
    state = {}
    if isinstance(opt, TorchOptimizer):
        for i, p in enumerate(model.parameters()):
            state[i] = {
                k: (type(v).__name__, getattr(v, "placements", None), tuple(v.shape), v.dim() == p.dim())
                for k, v in opt.state[p].items()
                if isinstance(v, torch.Tensor)
            }
        sd = opt.state_dict()
        state["state_dict_types"] = sorted({type(v).__name__ for s in sd["state"].values() for v in s.values()})
    return {"trajectory": trajectory, "ops": ops, "state": state}


def scenario_optimizers(rank: int, world: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in CONFIGS:
        for impl in IMPLS.get(name, ()):
            results[name, impl] = train(name, rank, lambda ps, n=name, i=impl: pureopt_optimizer(n, ps, i))
        torch_cls, _, _, torch_kwargs = CONFIGS[name][2], None, None, CONFIGS[name][3]
        if name in TORCH_ON_FSDP2:  # torch.optim on the same sharded model
            results[name, "torch"] = train(name, rank, lambda ps, c=torch_cls, k=torch_kwargs: c(ps, **k))
    for name in HSDP:
        results[name, "hsdp"] = train(name, rank, lambda ps, n=name: pureopt_optimizer(n, ps, "auto"), hsdp=True)
    results["pure"] = pure_api(rank)
    results["dcp"] = {name: dcp_round_trip(name, rank, out / f"dcp-{name}") for name in DCP}
    results["errors"] = errors(rank)
    results["mismatched"] = mismatched_placements(rank)
    return results


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


PURE = ("adamw", "adafactor")


def pure_api(rank: int) -> dict[str, Any]:
    """The pure API over the DTensor parameters: ``update`` + ``apply_updates`` and ``pureopt.step``."""
    out: dict[str, Any] = {}
    for name, how in [(n, h) for n in PURE for h in ("update", "step")]:
        model = sharded_net()
        factory, kwargs = CONFIGS[name][0], CONFIGS[name][1]
        tx = factory(**kwargs)
        params = dict(model.named_parameters())
        state = tx.init(params)
        n = GLOBAL_BATCH // WORLD
        trajectory, unchanged = [], True
        for step in range(STEPS):
            x, y = global_batch(step)
            model.zero_grad(set_to_none=True)
            loss_fn(name, model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
            grads = {k: p.grad for k, p in params.items()}
            with torch.no_grad():
                before = [_local(t).clone() for t in pureopt.tree.leaves(state)]
                old_leaves = pureopt.tree.leaves(state)
                if how == "update":
                    updates, state = tx.update(grads, state, params)
                    new = pureopt.apply_updates(params, updates)
                else:
                    new, state = pureopt.step(tx, grads, state, params)
                unchanged &= all(torch.equal(a, _local(b)) for a, b in zip(before, old_leaves))
                for k, p in params.items():
                    p.copy_(new[k])
            trajectory.append(full_params(model))
        out[name, how] = {
            "trajectory": trajectory,
            "unchanged": unchanged,
            "state_types": sorted({type(t).__name__ for t in pureopt.tree.leaves(state)}),
        }
    return out


DCP = ("adamw", "adamw-schedule", "adafactor")
RESUME_AT = 3


def dcp_round_trip(name: str, rank: int, path: Path) -> dict[str, Any]:
    """Train ``RESUME_AT`` steps, save model and optimizer with DCP (sharded), load them into a new model and
    optimizer and train on to ``STEPS``. The new optimizer takes one step on other data first, so that its
    state_dict has an entry per parameter for DCP to load into (a fresh TorchOptimizer's has none: issue 13)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    n = GLOBAL_BATCH // WORLD

    def one_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        x, y = global_batch(step)
        opt.zero_grad(set_to_none=True)
        loss_fn(name, model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
        opt.step()

    model = sharded_net()
    opt = pureopt_optimizer(name, model.parameters(), "auto")
    for step in range(RESUME_AT):
        one_step(model, opt, step)
    model_sd, optim_sd = get_state_dict(model, opt)
    placements = sorted({str(getattr(v, "placements", None)) for s in optim_sd["state"].values() for v in s.values()})
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    saved_state = copy.deepcopy(opt.state_dict()["state"])

    model2 = sharded_net()
    opt2 = pureopt_optimizer(name, model2.parameters(), "auto")
    one_step(model2, opt2, 1000)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    restored = opt2.state_dict()["state"]
    same_state = all(
        torch.equal(_local(saved_state[k][key]), _local(restored[k][key]))
        for k in saved_state
        for key in saved_state[k]
    )
    trajectory = []
    for step in range(RESUME_AT, STEPS):
        one_step(model2, opt2, step)
        trajectory.append(full_params(model2))
    return {"placements": placements, "same_state": same_state, "trajectory": trajectory}


def mismatched_placements(rank: int) -> dict[str, Any]:
    """A donated step whose state is placed unlike its parameter (replicated moments) keeps to the DTensor path,
    where DTensor redistributes; on tensors big enough for the chunked CPU path (256 KiB local shards)."""
    out = {}
    for name in ("rmsprop", "adamw"):
        torch.manual_seed(0)
        big = nn.Linear(256, 256).to(torch.float64)
        twin = copy.deepcopy(big)
        from torch.distributed.fsdp import fully_shard

        fully_shard(big)
        x = torch.randn(4, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        big(x).square().mean().backward()
        factory, kwargs = CONFIGS[name][0], CONFIGS[name][1]
        tx = factory(**kwargs)
        params = dict(big.named_parameters())
        grads = {k: p.grad for k, p in params.items()}
        state = tx.init(params)
        key = "square_avg" if name == "rmsprop" else "exp_avg_sq"
        field = getattr(state, key)
        state = state._replace(**{key: {k: v.redistribute(placements=[Replicate()]) for k, v in field.items()}})
        with torch.no_grad():
            pureopt.inplace_step(tx, grads, state, params)
        # the reference: the gathered gradients on the unsharded twin, with torch.optim
        full = {k: g.full_tensor() for k, g in grads.items()}
        for k, p in twin.named_parameters():
            p.grad = full[k]
        CONFIGS[name][2](twin.parameters(), **CONFIGS[name][3]).step()
        out[name] = (full_params(big), [p.detach().clone() for p in twin.parameters()])
    return out


def errors(rank: int) -> dict[str, str]:
    """Explicit fast impls where the local-shard path does not apply (a non-elementwise algorithm)."""
    model = sharded_net()
    x, y = global_batch(0)
    loss_fn("lamb", model(x), y).backward()
    found = {}
    for impl in ("foreach",):
        opt = TorchOptimizer(model.parameters(), pureopt.lamb, lr=LR, impl=impl)
        before = full_params(model)
        try:
            opt.step()
            found[impl] = "no error"
        except RuntimeError as e:
            found[impl] = str(e)
        found[impl + "-unchanged"] = str(all(torch.equal(a, b) for a, b in zip(before, full_params(model))))
    return found


# --- test side ----------------------------------------------------------------------------------------------------


def reference(name: str) -> list[list[torch.Tensor]]:
    """The unsharded single-process run on the whole batch."""
    model = make_net()
    torch_cls, torch_kwargs = CONFIGS[name][2], CONFIGS[name][3]
    opt = torch_cls(model.parameters(), **torch_kwargs) if torch_cls is not None else None
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5) if name == "adamw-schedule" else None
    momenta = [torch.zeros_like(p) for p in model.parameters()]
    out = []
    for step in range(STEPS):
        x, y = global_batch(step)
        model.zero_grad(set_to_none=True)
        loss_fn(name, model(x), y).backward()
        if name == "clip-adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if opt is not None:
            opt.step()
            if sched is not None:
                sched.step()
        else:  # Lion (Chen et al. 2023), beta1=0.9, beta2=0.99, decoupled weight decay
            lr, wd = torch_kwargs["lr"], torch_kwargs["weight_decay"]
            with torch.no_grad():
                for p, m in zip(model.parameters(), momenta):
                    c = 0.9 * m + 0.1 * p.grad
                    p.sub_(lr * (torch.sign(c) + wd * p))
                    m.mul_(0.99).add_(0.01 * p.grad)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("test_fsdp", "scenario_optimizers", tmp_path_factory.mktemp("fsdp"))


CASES = [(name, impl) for name in CONFIGS for impl in IMPLS.get(name, ())]


@pytest.mark.parametrize(("name", "impl"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_fsdp2_torch_optimizer_equals_the_unsharded_run(job: list[dict[str, Any]], name: str, impl: str) -> None:
    want = reference(name)
    for rank in range(WORLD):
        assert_close(job[rank][name, impl]["trajectory"], want, f"{name} impl={impl} rank {rank}")


@pytest.mark.parametrize("name", HSDP)
def test_hsdp_2d_mesh_equals_the_unsharded_run(job: list[dict[str, Any]], name: str) -> None:
    for rank in range(WORLD):
        got = job[rank][name, "hsdp"]
        assert_close(got["trajectory"], reference(name), f"{name} HSDP rank {rank}")
        key = "row_var" if name == "adafactor" else "exp_avg"
        assert got["state"][0][key][:2] == ("DTensor", (Replicate(), Shard(0))), got["state"][0]
        if name in AUTO_OP:
            assert AUTO_OP[name] in got["ops"]


@pytest.mark.parametrize("name", TORCH_ON_FSDP2)
def test_fsdp2_torch_optim_on_the_same_sharded_model_agrees(job: list[dict[str, Any]], name: str) -> None:
    """torch.optim itself on the FSDP2 model: the reference the unsharded run stands for (gradients averaged)."""
    assert_close(job[0][name, "torch"]["trajectory"], reference(name), f"torch.optim {name}")
    assert_close(job[0][name, "auto"]["trajectory"], job[0][name, "torch"]["trajectory"], f"{name} vs torch")


@pytest.mark.parametrize("name", list(AUTO_OP))
def test_auto_runs_torch_kernels_on_the_local_shards(job: list[dict[str, Any]], name: str) -> None:
    for rank in range(WORLD):
        ops = job[rank][name, "auto"]["ops"]
        assert AUTO_OP[name] in ops, sorted(o for o in ops if "foreach" in o or "fused" in o)


@pytest.mark.parametrize("name", ["adamw", "adam-amsgrad", "adagrad", "rmsprop", "sgd-momentum"])
def test_state_of_a_sharded_parameter_is_sharded_like_it(job: list[dict[str, Any]], name: str) -> None:
    for rank in range(WORLD):
        state = job[rank][name, "auto"]["state"]
        for i in range(4):
            for key, (kind, placements, shape, like_param) in state[i].items():
                if like_param:  # moments & co.: DTensors placed like the parameter
                    assert kind == "DTensor" and placements is not None and "Shard(dim=0)" in str(placements), key
                else:  # 0-d step counts stay plain tensors, as in torch.optim
                    assert key == "step" and kind == "Tensor" and shape == ()
        assert "DTensor" in state["state_dict_types"]


def test_adafactor_factors_are_placed_by_the_dimension_they_reduce(job: list[dict[str, Any]]) -> None:
    """A weight sharded by rows keeps its row factor sharded like it and its column factor replicated."""
    for rank in range(WORLD):
        state = job[rank]["adafactor", "auto"]["state"]
        for i in (0, 2):  # fc1.weight (5 x 6), fc2.weight (3 x 5): Shard(0)
            assert state[i]["row_var"][:2] == ("DTensor", (Shard(0),)), state[i]
            assert state[i]["col_var"][:2] == ("DTensor", (Replicate(),)), state[i]
        assert state[1]["variance"][:2] == ("DTensor", (Shard(0),))  # a bias: unfactored, sharded like it
        assert state["state_dict_types"] == ["DTensor", "Tensor"]


@pytest.mark.parametrize("name", PURE)
@pytest.mark.parametrize("how", ["update", "step"])
def test_pure_api_on_dtensors_equals_the_unsharded_run(job: list[dict[str, Any]], name: str, how: str) -> None:
    for rank in range(WORLD):
        got = job[rank]["pure"][name, how]
        assert_close(got["trajectory"], reference(name), f"pure {name} {how} rank {rank}")
        assert "DTensor" in got["state_types"]
        assert got["unchanged"], "the pure path changed its input state"


@pytest.mark.parametrize("name", DCP)
def test_dcp_saves_sharded_state_and_a_loaded_optimizer_continues_the_run(job: list[dict[str, Any]], name: str) -> None:
    for rank in range(WORLD):
        got = job[rank]["dcp"][name]
        assert "(Shard(dim=0),)" in got["placements"], got["placements"]  # saved sharded like the parameters
        assert got["same_state"], "the loaded optimizer state differs from the saved one"
        assert_close(got["trajectory"], reference(name)[RESUME_AT:], f"{name} resumed, rank {rank}")


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
def test_state_placed_unlike_its_parameter_steps_on_the_dtensors(job: list[dict[str, Any]], name: str) -> None:
    for rank in range(WORLD):
        got, want = job[rank]["mismatched"][name]
        assert_close([got], [want], f"{name} with replicated moments, rank {rank}")


def test_explicit_fast_impl_on_a_non_elementwise_algorithm_is_refused_clearly(job: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        found = job[rank]["errors"]
        assert "DTensor" in found["foreach"] and "elementwise" in found["foreach"], found["foreach"]
        assert found["foreach-unchanged"] == "True"
