"""FSDP2 (DTensor parameters, 2 gloo ranks on 127.0.0.1): ``flat=True``, ``pureopt.flatten``, NovoGrad and Muon.

Each rank shards the same float64 model with ``fully_shard`` and trains it for ``STEPS`` steps on its half of every
global batch (FSDP2 averages the gradients); the test process compares the gathered parameters after each step
with a single-process, unsharded reference: torch.optim where it has the algorithm (AdamW, Muon), else the update
rule written out here (NovoGrad, Muon with a float64 Newton-Schulz iteration) or, for LAMB, pureopt's unsharded
run. Layers shard unevenly (5 and 3 rows over 2 ranks) and one leaves rank 1 an empty shard (1 row); the Muon
model shards one matrix by columns (``Shard(1)``) and has four same-shape matrices (batched on their owners).

Tolerances: float64 1e-10 (sharded norms are sums of per-shard squares: a few ulps from the unsharded norm).
Muon's default bfloat16 iteration is compared with torch.optim.Muon on matrices of distinct shapes: an owner rank
batches same-shape matrices (``baddbmm``), whose rounding may differ from torch's per-matrix ``addmm`` by an ulp
of bfloat16 now and then, and a tiny model's trajectory amplifies such an ulp; batches are tested with a float64
iteration, and their bfloat16 rounding against per-matrix calls in a single process (below).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, dcp_load, dcp_save, launch, unsharded_trajectory
from _dist import assert_trajectory_close as assert_close
from torch import nn

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer

STEPS = 6
LR = 2.0**-5
GLOBAL_BATCH = 8
RTOL64, ATOL64 = 1e-10, 1e-12
NOVOGRAD = {"lr": LR, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.1, "grad_averaging": True}
MUON = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}


class Net(nn.Module):
    """fc1: 5 rows (3 + 2 per rank), fc2: 3 rows (2 + 1), head: 1 row (rank 1's shard is empty)."""

    def __init__(self, bias: bool = True, square: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5, bias=bias)
        self.mid = nn.ModuleList(nn.Linear(5, 5, bias=bias) for _ in range(square))
        self.fc2 = nn.Linear(5, 3, bias=bias)
        self.head = nn.Linear(3, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc1(x))
        for layer in self.mid:
            x = torch.tanh(layer(x))
        return self.head(torch.tanh(self.fc2(x)))


def make_net(kind: str) -> Net:
    """ "layers": with biases; "matrices": 7 matrices, 4 of one shape; "distinct": 3 matrices of distinct shapes."""
    torch.manual_seed(0)
    net = {"matrices": Net(bias=False, square=4), "distinct": Net(bias=False)}.get(kind, Net())
    return net.to(torch.float64)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


# --- rank side ----------------------------------------------------------------------------------------------------


def sharded_net(kind: str, hsdp: bool = False) -> Net:
    """FSDP2 over the 2 ranks (HSDP: a 1 x 2 mesh); the "matrices" model shards fc1 by columns (``Shard(1)``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")) if hsdp else None
    model = make_net(kind)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            by_columns = kind != "layers" and name == "fc1"
            fully_shard(layer, mesh=mesh, shard_placement_fn=(lambda p: Shard(1)) if by_columns else None)
    fully_shard(model, mesh=mesh)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    n = GLOBAL_BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


EDIT_AT = 3  # ``edit=True``: the parameters are halved in place before this step (outside the optimizer)


def train(
    rank: int, kind: str, make_opt: Any, set_to_none: bool = True, hsdp: bool = False, edit: bool = False
) -> dict[str, Any]:
    model = sharded_net(kind, hsdp)
    opt = make_opt(model.parameters())
    trajectory = []
    for step in range(STEPS):
        if edit and step == EDIT_AT:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)
        opt.zero_grad(set_to_none=set_to_none)
        loss_fn(model(batch_of(rank, step)[0]), batch_of(rank, step)[1]).backward()
        if step == 1:  # which kernels a step calls
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                opt.step()
            fused = sum(e.name == "aten::_fused_adamw_" for e in prof.events())
        else:
            opt.step()
        trajectory.append(full_params(model))
    placed = all(
        type(v).__name__ == "DTensor" and tuple(v.placements) == tuple(p.placements)
        for p in model.parameters()
        for v in opt.state[p].values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    # the storages holding the parameters' exp_avg shards (flat=True: one buffer per group), and their sizes
    bases = {
        id(v._local_tensor._base): v._local_tensor._base.numel()
        for p in model.parameters()
        for k, v in opt.state[p].items()
        if k == "exp_avg" and v._local_tensor._base is not None
    }
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    return {
        "trajectory": trajectory,
        "state_placed_like_params": placed,
        "fused_adamw_calls": fused,
        "exp_avg_buffers": sorted(bases.values()),
        "local_numel": local_numel,
    }


def count_orthogonalised(run: Any) -> tuple[Any, int]:
    """``run()`` while counting the matrices this rank orthogonalises (the result and the count)."""
    import pureopt.kernels.muon as muon_kernels

    muon_transforms = muon_kernels  # (Muon and orthogonalize call the iteration through pureopt.kernels.muon)

    count = [0]
    single, batch = muon_kernels.newton_schulz, muon_transforms.newton_schulz_batch

    def counted_single(g: torch.Tensor, *args: Any) -> torch.Tensor:
        count[0] += 1
        return single(g, *args)

    def counted_batch(g: torch.Tensor, *args: Any) -> torch.Tensor:
        count[0] += g.shape[0] - (1 if g.shape[0] == 1 else 0)  # a batch of one calls newton_schulz
        return batch(g, *args)

    muon_kernels.newton_schulz = counted_single  # type: ignore[assignment]
    muon_transforms.newton_schulz_batch = counted_batch  # type: ignore[assignment]
    try:
        return run(), count[0]
    finally:
        muon_kernels.newton_schulz = single  # type: ignore[assignment]
        muon_transforms.newton_schulz_batch = batch  # type: ignore[assignment]


def pure_flatten(rank: int) -> dict[str, Any]:
    """``pureopt.flatten(adamw)`` over the DTensor parameters (update + apply_updates); LAMB is refused."""
    model = sharded_net("layers")
    params = dict(model.named_parameters())
    tx = pureopt.flatten(pureopt.adamw(lr=LR, weight_decay=0.1))
    state = tx.init(params)
    trajectory = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch_of(rank, step)[0]), batch_of(rank, step)[1]).backward()
        updates, state = tx.update({k: p.grad for k, p in params.items()}, state, params)
        with torch.no_grad():
            new = pureopt.apply_updates(params, updates)
            for k, p in params.items():
                p.copy_(new[k])
        trajectory.append(full_params(model))
    local_numel = sum(p.to_local().numel() for p in params.values())
    out: dict[str, Any] = {
        "trajectory": trajectory,
        "state_numels": sorted(t.numel() for t in pureopt.tree.leaves(state) if t.dim() > 0),
        "local_numel": local_numel,
        "update_types": sorted({type(u).__name__ for u in updates.values()}),
    }
    try:
        pureopt.flatten(pureopt.lamb(lr=LR)).init(params)
        out["lamb_error"] = None
    except ValueError as e:
        out["lamb_error"] = str(e)
    return out


def orthogonalize_chain() -> Any:
    return pureopt.chain(
        pureopt.trace(0.9), pureopt.orthogonalize(ns_dtype=torch.float64), pureopt.scale_by_learning_rate(0.02)
    )


def pure_orthogonalize(rank: int) -> list[list[torch.Tensor]]:
    """The stateless ``orthogonalize`` in a pure chain over the DTensor matrices (owner path)."""
    model = sharded_net("matrices")
    params = dict(model.named_parameters())
    tx = orthogonalize_chain()
    state = tx.init(params)
    trajectory = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch_of(rank, step)[0]), batch_of(rank, step)[1]).backward()
        new, state = pureopt.step(tx, {k: p.grad for k, p in params.items()}, state, params)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(new[k])
        trajectory.append(full_params(model))
    return trajectory


RESUME_AT = 3


def dcp_flat(rank: int, path: Path) -> dict[str, Any]:
    """``flat=True`` AdamW: ``RESUME_AT`` steps, DCP save (sharded), load into a fresh model and optimizer, go on."""

    def one_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        opt.zero_grad(set_to_none=False)
        loss_fn(model(batch_of(rank, step)[0]), batch_of(rank, step)[1]).backward()
        opt.step()

    def make() -> tuple[nn.Module, TorchOptimizer]:
        model = sharded_net("layers")
        return model, TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, flat=True)

    model, opt = make()
    for step in range(RESUME_AT):
        one_step(model, opt, step)
    dcp_save(model, opt, path)
    model2, opt2 = make()
    dcp_load(model2, opt2, path)
    trajectory = []
    for step in range(RESUME_AT, STEPS):
        one_step(model2, opt2, step)
        trajectory.append(full_params(model2))
    return {"trajectory": trajectory}


def scenario(rank: int, world: int, out: Path) -> dict[str, Any]:
    del world
    res: dict[str, Any] = {}

    def adamw(flat: bool) -> Any:
        return lambda ps: TorchOptimizer(ps, pureopt.adamw, lr=LR, weight_decay=0.1, flat=flat)

    res["adamw-flat"] = train(rank, "layers", adamw(True))
    res["adamw-flat-views"] = train(rank, "layers", adamw(True), set_to_none=False)  # FSDP2 accumulates into them
    res["adamw-flat-edited"] = train(rank, "layers", adamw(True), set_to_none=False, edit=True)
    res["adamw-flat-hsdp"] = train(rank, "layers", adamw(True), hsdp=True)
    res["adamw-per-tensor"] = train(rank, "layers", adamw(False))
    res["lamb-flat"] = train(rank, "layers", lambda ps: TorchOptimizer(ps, pureopt.lamb, lr=LR, flat=True))
    for impl in ("auto", "loop"):
        res[f"novograd-{impl}"] = train(
            rank, "layers", lambda ps, i=impl: TorchOptimizer(ps, pureopt.novograd, **NOVOGRAD, impl=i)
        )
    res["novograd-flat"] = train(rank, "layers", lambda ps: TorchOptimizer(ps, pureopt.novograd, **NOVOGRAD, flat=True))
    for sharded in ("owner", "all"):
        kwargs = {**MUON, "ns_dtype": torch.float64, "sharded": sharded}
        res[f"muon-{sharded}-float64"] = count_orthogonalised(
            lambda k=kwargs: train(rank, "matrices", lambda ps: TorchOptimizer(ps, pureopt.muon, **k))
        )
        res[f"muon-{sharded}-bfloat16"] = train(
            rank, "distinct", lambda ps, sh=sharded: TorchOptimizer(ps, pureopt.muon, **MUON, sharded=sh)
        )
    res["muon-owner-hsdp"] = count_orthogonalised(
        lambda: train(
            rank, "matrices", lambda ps: TorchOptimizer(ps, pureopt.muon, **MUON, ns_dtype=torch.float64), hsdp=True
        )
    )
    res["muon-flat"] = train(
        rank, "matrices", lambda ps: TorchOptimizer(ps, pureopt.muon, **MUON, ns_dtype=torch.float64, flat=True)
    )
    res["pure-flatten"] = pure_flatten(rank)
    res["dcp-flat"] = dcp_flat(rank, out / "dcp-flat")
    res["pure-orthogonalize"] = count_orthogonalised(lambda: pure_orthogonalize(rank))
    return res


# --- test side ----------------------------------------------------------------------------------------------------


def reference(kind: str, make_opt: Any, edit: bool = False) -> list[list[torch.Tensor]]:
    """The unsharded single-process run on the whole batch."""

    def halve(model: nn.Module, step: int) -> None:
        if edit and step == EDIT_AT:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)

    return unsharded_trajectory(make_net(kind), make_opt, global_batch, loss_fn, STEPS, halve)


class NovoGradRule(torch.optim.Optimizer):
    """NovoGrad written out from the paper (Ginsburg et al. 2019, Algorithm 1; decoupled from pureopt's code)."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 grad_averaging: bool) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "wd": weight_decay, "avg": grad_averaging})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                s = self.state[p]
                g2 = float(p.grad.square().sum())
                s["v"] = g2 if "v" not in s else b2 * s["v"] + (1 - b2) * g2
                d = p.grad / (math.sqrt(s["v"]) + group["eps"]) + group["wd"] * p
                if group["avg"]:
                    d = d * (1 - b1)
                s["m"] = d if "m" not in s else b1 * s["m"] + d
                p.sub_(group["lr"] * s["m"])


class MuonRule(torch.optim.Optimizer):
    """Muon written out (Jordan 2024; torch.optim.Muon's defaults) with a float64 Newton-Schulz iteration."""

    def __init__(self, params: Any, lr: float, weight_decay: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "wd": weight_decay, "mu": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        a, b, c = 3.4445, -4.7750, 2.0315
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.lerp_(p.grad, 1 - group["mu"])
                u = p.grad.lerp(m, group["mu"])  # nesterov
                x = u.T if u.shape[0] > u.shape[1] else u
                x = x / max(float(x.norm()), 1e-7)
                for _ in range(5):
                    s = x @ x.T
                    x = a * x + (b * s + c * s @ s) @ x
                o = x.T if u.shape[0] > u.shape[1] else x
                p.mul_(1 - group["lr"] * group["wd"])
                p.sub_(group["lr"] * math.sqrt(max(1.0, p.shape[0] / p.shape[1])) * o)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(__name__, "scenario", tmp_path_factory.mktemp("fsdp_extra"), timeout=120)


ADAMW_REF = {"lr": LR, "weight_decay": 0.1}


@pytest.mark.parametrize("run", ["adamw-flat", "adamw-flat-views", "adamw-flat-edited", "adamw-flat-hsdp"])
def test_flat_adamw_on_fsdp2_equals_the_unsharded_run(job: list[dict[str, Any]], run: str) -> None:
    # "edited": parameters changed in place between steps reach the flat step (its buffer is reloaded)
    want = reference("layers", lambda ps: torch.optim.AdamW(ps, **ADAMW_REF), edit=run.endswith("edited"))
    for rank in range(WORLD):
        assert_close(job[rank][run]["trajectory"], want, rtol=RTOL64, atol=ATOL64)
        assert job[rank][run]["state_placed_like_params"]


@pytest.mark.parametrize("run", ["adamw-flat", "adamw-flat-views"])
def test_flat_on_fsdp2_keeps_state_in_one_local_buffer_stepped_by_one_fused_call(
    job: list[dict[str, Any]], run: str
) -> None:
    for rank in range(WORLD):  # 6 parameters, one (mesh, placements, dtype) group: one buffer of the local shards
        res = job[rank][run]
        assert res["fused_adamw_calls"] == 1
        assert res["exp_avg_buffers"] == [res["local_numel"]]
    assert job[0]["adamw-per-tensor"]["exp_avg_buffers"] == []  # flat=False: a tensor per parameter


def test_flat_state_on_fsdp2_resumes_through_dcp(job: list[dict[str, Any]]) -> None:
    want = reference("layers", lambda ps: torch.optim.AdamW(ps, **ADAMW_REF))[RESUME_AT:]
    for rank in range(WORLD):
        assert_close(job[rank]["dcp-flat"]["trajectory"], want, rtol=RTOL64, atol=ATOL64)


def test_flat_adamw_on_fsdp2_equals_the_per_tensor_sharded_step(job: list[dict[str, Any]]) -> None:
    # flat and per-tensor kernels round their vector body and scalar tail differently: a few ulps
    for rank in range(WORLD):
        assert_close(
            job[rank]["adamw-flat"]["trajectory"], job[rank]["adamw-per-tensor"]["trajectory"], rtol=1e-13, atol=1e-15
        )


def test_flat_lamb_on_fsdp2_keeps_norms_over_whole_parameters(job: list[dict[str, Any]]) -> None:
    want = reference("layers", lambda ps: TorchOptimizer(ps, pureopt.lamb, lr=LR))
    assert_close(job[0]["lamb-flat"]["trajectory"], want, rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("run", ["novograd-auto", "novograd-loop", "novograd-flat"])
def test_novograd_on_fsdp2_equals_the_paper_rule_unsharded(job: list[dict[str, Any]], run: str) -> None:
    want = reference("layers", lambda ps: NovoGradRule(ps, **NOVOGRAD))
    for rank in range(WORLD):
        assert_close(job[rank][run]["trajectory"], want, rtol=RTOL64, atol=ATOL64)
        assert job[rank][run]["state_placed_like_params"]


@pytest.mark.parametrize("run", ["muon-owner-float64", "muon-all-float64", "muon-owner-hsdp", "muon-flat"])
def test_muon_on_fsdp2_equals_the_rule_unsharded(job: list[dict[str, Any]], run: str) -> None:
    want = reference("matrices", lambda ps: MuonRule(ps, **MUON))
    for rank in range(WORLD):
        result = job[rank][run]
        trajectory = result[0]["trajectory"] if isinstance(result, tuple) else result["trajectory"]
        assert_close(trajectory, want, rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("sharded", ["owner", "all"])
def test_muon_bfloat16_on_fsdp2_equals_torch_unsharded(job: list[dict[str, Any]], sharded: str) -> None:
    # matrices of distinct shapes: no batch on an owner, so each is orthogonalised with torch's own operations
    want = reference("distinct", lambda ps: torch.optim.Muon(ps, **MUON))
    for rank in range(WORLD):
        assert_close(job[rank][f"muon-{sharded}-bfloat16"]["trajectory"], want, rtol=RTOL64, atol=ATOL64)


def test_orthogonalize_on_fsdp2_equals_the_unsharded_chain(job: list[dict[str, Any]]) -> None:
    def unsharded(ps: list[torch.Tensor]) -> Any:  # the same chain, one process, plain tensors
        class Pure(torch.optim.Optimizer):
            def __init__(self) -> None:
                super().__init__(ps, {})
                self.tx = orthogonalize_chain()
                self.s = self.tx.init(ps)

            @torch.no_grad()
            def step(self, closure: Any = None) -> None:  # type: ignore[override]
                new, self.s = pureopt.step(self.tx, [p.grad for p in ps], self.s, ps)
                for p, n in zip(ps, new):
                    p.copy_(n)

        return Pure()

    want = reference("matrices", unsharded)
    counts = []
    for rank in range(WORLD):
        trajectory, count = job[rank]["pure-orthogonalize"]
        assert_close(trajectory, want, rtol=RTOL64, atol=ATOL64)
        counts.append(count)
    assert sum(counts) == 7 * STEPS and all(counts), counts


@pytest.mark.parametrize("run", ["muon-owner-float64", "muon-owner-hsdp"])
def test_sharded_muon_orthogonalises_each_matrix_on_one_rank(job: list[dict[str, Any]], run: str) -> None:
    matrices = 7 * STEPS
    counts = [job[rank][run][1] for rank in range(WORLD)]
    assert sum(counts) == matrices, counts
    assert all(0 < c < matrices for c in counts), counts  # shared between the ranks
    naive = [job[rank]["muon-all-float64"][1] for rank in range(WORLD)]
    assert naive == [matrices] * WORLD  # the naive path: every matrix on every rank


def test_flatten_over_dtensors_lays_out_local_shards(job: list[dict[str, Any]]) -> None:
    want = reference("layers", lambda ps: torch.optim.AdamW(ps, **ADAMW_REF))
    for rank in range(WORLD):
        res = job[rank]["pure-flatten"]
        assert_close(res["trajectory"], want, rtol=RTOL64, atol=ATOL64)
        assert res["state_numels"] == [res["local_numel"]] * 2  # exp_avg, exp_avg_sq: local shards, not full size
        assert res["update_types"] == ["DTensor"]
        assert "DTensors split across ranks" in res["lamb_error"]


# --- single process: the owner plan and the batched iteration ---------------------------------------------------


def test_owners_balance_by_cost_deterministically() -> None:
    from pureopt.kernels.owner import owners

    assert owners([4.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1]
    assert owners([1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 0, 1]
    assert owners([], 2) == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_batched_newton_schulz_equals_per_matrix_up_to_rounding(dtype: torch.dtype) -> None:
    from pureopt.kernels.muon import newton_schulz, newton_schulz_batch

    g = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for batch in (g, g.mT):  # wide and tall
        got = newton_schulz_batch(batch, ns_dtype=dtype).double()
        want = torch.stack([newton_schulz(m, ns_dtype=dtype) for m in batch]).double()
        # bfloat16: baddbmm may round an entry differently from addmm (an ulp of values below 2: 2**-7)
        tol = 1e-12 if dtype == torch.float64 else 2.0**-6
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_muon_sharded_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="sharded must be one of"):
        pureopt.muon(sharded="everywhere")
