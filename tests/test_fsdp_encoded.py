"""Encoded optimizer state (``state_dtype="q8"`` / ``"q4"`` / ``"bf16-sr"``) on FSDP2 parameters: 2 gloo ranks on
127.0.0.1, each shards the same float32 MLP with ``fully_shard`` (rows split 2 ways; the head's single row leaves
rank 1 an empty shard; the first layer's rows, 16 elements, are too short for a block: float32 state) and trains it
on its half of every global batch.

References, in the test process: torch.optim.AdamW's unsharded fp32 run (within the quantisation bound), and the
unsharded run of the same encodings with the same blocks, one pure AdamW per parameter (blocks within rows of a
2-D parameter are its flat blocks when the block is the row width; 1-D parameters keep float32 state; bf16-sr's
random bits keyed by each element's place in the whole parameter), which the sharded run matches up to the
gradients' summation order (FSDP2 reduces two half-batch gradients). A DCP
checkpoint taken after ``RESUME_AT`` steps, and a full state dict gathered onto rank 0, resume the uninterrupted
sharded run bitwise; the DCP one resumes it on one rank (world size 1, whole batches) up to the summation order, and
both load into the plain, unsharded model in one process, their layout kept (``SavedLayoutLoadPlanner``, torch's
``dcp_to_torch_save``), going on as the sharded run did up to the summation order.

Matrices sharded by columns (FSDP2's ``shard_placement_fn``: ``Shard(1)``, as tensor parallelism's row-wise layers):
a wider MLP whose middle matrix (8 x 256) leaves each rank runs of 128 elements per row, so the blocks are 128 (q8:
not the 256 of the whole row; q4: its own 128); the same references, and at world size 1 the q4 checkpoint (the same
blocks) resumes while the q8 one (256-element blocks there) is refused by DCP for its scales' shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import WORLD, dcp_load, dcp_save, full_load, full_save, launch, unsharded_trajectory
from _encoded import SPECS, TOL_FP32, TOL_SAME, TOL_SR_REALIZATIONS, distance
from torch import nn

import pureopt
from pureopt.adapters.torch_optim import TorchOptimizer
from pureopt.kernels.encoding import NAMED, BlockEncoding

STEPS = 6
RESUME_AT = 3
LR = 1e-2
GLOBAL_BATCH = 16
COLUMN_SPECS = ["q8", "q4", "bf16"]


def spec_of(run: str) -> str:
    """The state_dtype of a run ("q8-hsdp", "q4-columns", "bf16-sr", ...; "bare-bf16": a bare torch.bfloat16,
    the same storage as "bf16" for these float32 parameters)."""
    if run == "bare-bf16":
        return "bf16"
    return run.split("-")[0] if run.startswith("q") or run.endswith("columns") else run


def make_net(columns: bool = False) -> nn.Sequential:
    """The MLP; ``columns``: the one whose matrices are sharded by columns (wider: its middle rows can be blocked)."""
    torch.manual_seed(0)
    if columns:
        return nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 8), nn.Tanh(), nn.Linear(8, 1))
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))


def column_blocks(spec: str, shape: tuple[int, ...]) -> int | None:
    """The block of ``spec`` for a parameter of the column-sharded MLP over 2 ranks, by hand: the 8 x 256 matrix
    has runs of 128 elements per row (q8's rule for 256-element rows gives 256, which does not divide them: 128;
    q4's gives 128); the other matrices' runs are 8 and 4 elements (under 32: float32), vectors are float32."""
    return 128 if shape == (8, 256) and spec in ("q8", "q4") else None


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


# --- rank side ----------------------------------------------------------------------------------------------------


def sharded_net(columns: bool = False, hsdp: bool = False) -> nn.Sequential:
    """FSDP2 over the 2 ranks (HSDP: a 1 x 2 mesh, placements (Replicate, Shard(0))); ``columns``: the matrices
    sharded by columns instead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")) if hsdp else None
    model = make_net(columns)
    by_columns = (lambda p: Shard(1) if p.dim() == 2 else Shard(0)) if columns else None
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, shard_placement_fn=by_columns)
    fully_shard(model, mesh=mesh)
    return model


def batch_of(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    n = GLOBAL_BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def one_step(rank: int, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    x, y = batch_of(rank, step)
    loss_fn(model(x), y).backward()
    opt.step()


def full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def describe(opt: TorchOptimizer, model: nn.Module) -> list[dict[str, Any]]:
    """Per parameter: how each field is stored (type, global shapes, placed like the parameter)."""
    out = []
    for p in model.parameters():
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            # torch's per-parameter state names an encoded field's parts "<field>.codes" / "<field>.scale"
            parts = [opt.state[p][k] for k in (key, f"{key}.codes", f"{key}.scale") if k in opt.state[p]]
            entry[key] = {
                "parts": len(parts),
                "dtypes": [str(t.dtype) for t in parts],
                "shapes": [tuple(t.shape) for t in parts],
                "placed": all(type(t).__name__ == "DTensor" and t.placements == p.placements for t in parts),
            }
        out.append(entry)
    return out


def trained(
    rank: int, spec: Any, path: Path, hsdp: bool = False, flat: bool = False, columns: bool = False
) -> dict[str, Any]:
    def make() -> tuple[nn.Module, TorchOptimizer]:
        model = sharded_net(columns=columns, hsdp=hsdp)
        opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec, flat=flat)
        return model, opt

    model, opt = make()
    trajectory = []
    for step in range(STEPS):
        if step == RESUME_AT:
            optim_sd = dcp_save(model, opt, path)
            keys = sorted(k for entry in optim_sd["state"].values() for k in entry)
            full_save(model, opt, path.with_suffix(".pt"))  # (also gathered whole, torch.save'd on rank 0)
        one_step(rank, model, opt, step)
        trajectory.append(full(model))
    resumed: dict[str, list[list[torch.Tensor]]] = {}
    for how, load in [("dcp", dcp_load), ("full", full_load)]:
        model2, opt2 = make()
        load(model2, opt2, path if how == "dcp" else path.with_suffix(".pt"))
        resumed[how] = []
        for step in range(RESUME_AT, STEPS):
            one_step(rank, model2, opt2, step)
            resumed[how].append(full(model2))
    return {"trajectory": trajectory, "resumed": resumed, "layout": describe(opt, model), "keys": keys}


def pure_steps(rank: int) -> list[list[torch.Tensor]]:
    """``pureopt.step`` (pure: new parameters and state each step) over the DTensor parameters, q8."""
    model = sharded_net()
    params = dict(model.named_parameters())
    tx = pureopt.adamw(lr=LR, weight_decay=0.1, state_dtype="q8")
    state = tx.init(params)
    trajectory = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        x, y = batch_of(rank, step)
        loss_fn(model(x), y).backward()
        with torch.no_grad():  # (autograd would record the step: encoded state refuses that)
            new, state = pureopt.step(tx, {k: p.grad for k, p in params.items()}, state, params)
            for k, p in params.items():
                p.copy_(new[k])
        trajectory.append(full(model))
    return trajectory


SR_SHAPES = [(5, 8), (1, 16), (7,)]  # rows split 3 + 2, one row (rank 1's shard empty), 1-D split 4 + 3
SR_STEPS = 4


def sr_problem() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """bf16 parameters and float32 gradients (whole tensors) whose SGD steps are about a bf16 gap."""
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(shape, generator=g).to(torch.bfloat16) for shape in SR_SHAPES]
    grads = [[torch.randn(shape, generator=g) for shape in SR_SHAPES] for _ in range(SR_STEPS)]
    return params, grads


def sr_transform() -> Any:
    return pureopt.stochastic_rounding(pureopt.sgd(lr=2e-3), seed=7)


def sr_params(rank: int) -> dict[str, Any]:
    """``stochastic_rounding`` over bf16 DTensor parameters (Shard(0)), donated and pure; a Shard(1) one refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full_params, full_grads = sr_problem()
    tx = sr_transform()
    runs: dict[str, Any] = {}
    for mode in ("donated", "pure"):
        params = [distribute_tensor(p.clone(), mesh, [Shard(0)]) for p in full_params]
        state = tx.init(params)
        trajectory = []
        for grads in full_grads:
            dgrads = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
            if mode == "donated":
                state = pureopt.inplace_step(tx, dgrads, state, params)
            else:
                params, state = pureopt.step(tx, dgrads, state, params)
            trajectory.append([p.full_tensor() for p in params])
        runs[mode] = trajectory
    columns = [distribute_tensor(full_params[0].clone(), mesh, [Shard(0)]),
               distribute_tensor(full_params[1].clone(), mesh, [Shard(1)])]  # fmt: skip
    before = [p.full_tensor() for p in columns]
    try:
        grads = [distribute_tensor(full_grads[0][0], mesh, [Shard(0)]),
                 distribute_tensor(full_grads[0][1], mesh, [Shard(1)])]  # fmt: skip
        pureopt.inplace_step(tx, grads, tx.init(columns), columns)
        runs["columns_error"] = None
    except ValueError as e:
        runs["columns_error"] = str(e)
    runs["columns_unchanged"] = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, columns))
    return runs


def scenario(rank: int, world: int, out: Path) -> dict[str, Any]:
    del world
    res: dict[str, Any] = {spec: trained(rank, spec, out / f"dcp-{spec}") for spec in SPECS}
    res["q8-hsdp"] = trained(rank, "q8", out / "dcp-q8-hsdp", hsdp=True)
    res["q8-flat"] = trained(rank, "q8", out / "dcp-q8-flat", flat=True)
    # a bare dtype narrower than the float32 parameters: bf16 storage, the math in float32 on the local shards
    res["bare-bf16"] = trained(rank, torch.bfloat16, out / "dcp-bare-bf16")
    res["pure-q8"] = pure_steps(rank)
    res["sr-params"] = sr_params(rank)
    for spec in COLUMN_SPECS:
        res[f"{spec}-columns"] = trained(rank, spec, out / f"dcp-{spec}-columns", columns=True)
    res["refused"] = refused(rank)
    res["strided-norm"] = strided_norm(rank)
    try:  # NovoGrad's math reaches over whole parameters (per-tensor norms): refused at init
        TorchOptimizer(sharded_net().parameters(), pureopt.novograd, lr=LR, state_dtype="q8")
        res["novograd_error"] = None
    except ValueError as e:
        res["novograd_error"] = str(e)
    return res


def refused(rank: int) -> dict[str, str | None]:
    """What encoded state refuses on DTensors (at init, before anything is made): stochastically rounded state on
    matrices sharded by columns (its random bits are keyed by places in the whole parameter), and block encodings
    on a tensor split within its rows other than by a matrix's columns (a 3-D tensor by its last dimension); and
    what it takes there (float state on any split, rows strided over the ranks, rows of no elements)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    out: dict[str, str | None] = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    cube = distribute_tensor(torch.randn(4, 6, 64), mesh, [Shard(2)])
    empty = distribute_tensor(torch.randn(4, 0), mesh, [Shard(0)])
    # rows split as FSDP2 splits a tensor-parallel Shard(0) matrix: each rank's rows are not consecutive, so rows
    # are whole (blocks work) but the elements' places are not one run (stochastic rounding cannot key them)
    strided = _StridedShard(0, split_factor=2)
    rows = distribute_tensor(torch.randn(8, 64), mesh, [strided])
    bf16_rows = distribute_tensor(torch.randn(8, 64).to(torch.bfloat16), mesh, [strided])
    sr = pureopt.stochastic_rounding(pureopt.sgd(lr=1e-3), seed=0)
    cases = {
        "q8-strided-rows": lambda: pureopt.adamw(lr=LR, state_dtype="q8").init([rows]),
        "sr-strided-rows": lambda: pureopt.inplace_step(
            sr, [distribute_tensor(torch.randn(8, 64), mesh, [strided])], sr.init([bf16_rows]), [bf16_rows]
        ),
        "bf16-sr-columns": lambda: TorchOptimizer(
            sharded_net(columns=True).parameters(), pureopt.adamw, lr=LR, state_dtype="bf16-sr"
        ),
        "q8-last-dim": lambda: pureopt.adamw(lr=LR, state_dtype="q8").init([cube]),
        "bf16-last-dim": lambda: pureopt.adamw(lr=LR, state_dtype="bf16").init([cube]),  # (elementwise: taken)
        "q8-empty-rows": lambda: pureopt.adamw(lr=LR, state_dtype="q8").init([empty]),  # (rows of no elements)
    }
    for name, make in cases.items():
        try:
            make()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def strided_norm(rank: int) -> list[float]:
    """The norm of a matrix whose rows are split as FSDP2 splits a tensor-parallel ``Shard(0)`` one (a strided shard:
    not a ``Shard`` to torch), through ``shard_norms`` (NovoGrad's per-layer norms on sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from pureopt.kernels.dtensor import shard_norms

    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6) / 7
    rows = distribute_tensor(full, mesh, [_StridedShard(0, split_factor=2)])
    return [float(shard_norms([rows])[0]), float(rows.to_local().norm())]


def resumed_on_one_rank(rank: int, world: int, out: Path) -> dict[str, Any]:
    """World size 1: FSDP2 over one rank loads each 2-rank DCP checkpoint of :func:`trained` (taken after
    ``RESUME_AT`` steps) and runs the remaining steps on whole global batches."""
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

    from pureopt.adapters import SavedLayoutLoadPlanner

    assert rank == 0 and world == 1
    res: dict[str, Any] = {}
    runs = [*SPECS, "q8-flat", *(f"{spec}-columns" for spec in COLUMN_SPECS), "q8-columns-planner"]
    for run in runs:
        model = sharded_net(columns="columns" in run)
        opt = TorchOptimizer(
            model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec_of(run),
            flat=run.endswith("flat"),
        )  # fmt: skip
        planner = SavedLayoutLoadPlanner() if run.endswith("planner") else None
        try:
            dcp_load(model, opt, out / f"dcp-{run.removesuffix('-planner')}", planner)
        except CheckpointException as e:  # (DCP's planner refuses a record of another shape)
            res[run] = f"{type(e).__name__}: {e}"
            continue
        res[run] = resumed_steps(model, opt, full)
        res[f"{run}-layout"] = describe(opt, model)
        if run.endswith("planner"):  # scales of 16-element blocks (under 32: no encoding writes them) are refused
            from pureopt.kernels.dtensor import from_local_like

            sd, matrix = opt.state_dict(), list(model.parameters())[2]
            sd["state"][2]["exp_avg.scale"] = from_local_like(torch.ones(8, 16), matrix, (8, 16))
            try:
                opt.load_state_dict(sd)
                res["bad-blocks"] = None
            except ValueError as e:
                res["bad-blocks"] = str(e)
    return res


def resumed_steps(model: nn.Module, opt: torch.optim.Optimizer, snapshot: Any) -> list[list[torch.Tensor]]:
    """The steps after ``RESUME_AT`` on whole global batches: ``snapshot(model)`` after each."""
    out = []
    for step in range(RESUME_AT, STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = global_batch(step)
        loss_fn(model(x), y).backward()
        opt.step()
        out.append(snapshot(model))
    return out


# --- test side ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp_encoded")


@pytest.fixture(scope="module")
def job(job_dir: Path) -> list[dict[str, Any]]:
    return launch(__name__, "scenario", job_dir, timeout=180)


@pytest.fixture(scope="module")
def one_rank(job: list[dict[str, Any]], job_dir: Path) -> dict[str, Any]:
    return launch(__name__, "resumed_on_one_rank", job_dir, timeout=120, world=1)[0]


def unsharded(make_opt: Any, columns: bool = False) -> list[list[torch.Tensor]]:
    return unsharded_trajectory(make_net(columns), make_opt, global_batch, loss_fn, STEPS)


def row_blocks(spec: str, shape: tuple[int, ...]) -> int | None:
    """The block of ``spec`` for a parameter of the row-sharded MLP, by hand: every matrix's rows (16, 32, 64
    elements) are shorter than the block, so a row is one block where it is 32 elements or more; vectors float32."""
    return shape[1] if len(shape) == 2 and shape[1] >= 32 else None


class RowBlockedAdamW(torch.optim.Optimizer):
    """The reference: one pure pureopt AdamW per parameter, unsharded; a 2-D parameter's fields in ``spec``'s
    encoding with the blocks ``blocks(spec, shape)`` gives (flat blocks that lie within rows, as the sharded ones),
    the others in float32 ("bf16-sr", "bf16": one AdamW over all the parameters, whose positions key the random
    bits as in the sharded optimizer)."""

    def __init__(self, params: Any, spec: str, blocks: Any = row_blocks) -> None:
        super().__init__(params, {})
        self.txs, self.states = [], []
        if spec.startswith("bf16"):
            self.txs.append(pureopt.adamw(lr=LR, weight_decay=0.1, state_dtype=spec))
            self.states.append(self.txs[0].init([p.detach() for p in self.param_groups[0]["params"]]))
            return
        for p in self.param_groups[0]["params"]:
            block = blocks(spec, tuple(p.shape))
            if block is not None:
                first, second = (BlockEncoding(name, bits=NAMED[name].bits, code=list(NAMED[name].code or []),
                                               block=block) for name in (spec, spec + "u"))  # fmt: skip
                state_dtype: Any = {"exp_avg": first, "exp_avg_sq": second}
            else:  # rows under 32 elements and 1-D parameters: float32
                state_dtype = None
            tx = pureopt.adamw(lr=LR, weight_decay=0.1, state_dtype=state_dtype)
            self.txs.append(tx)
            self.states.append(tx.init([p.detach()]))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        ps = self.param_groups[0]["params"]
        if len(self.txs) == 1 and len(ps) > 1:
            new, self.states[0] = pureopt.step(
                self.txs[0], [p.grad for p in ps], self.states[0], [p.detach() for p in ps]
            )
            for p, q in zip(ps, new):
                p.copy_(q)
            return
        for i, p in enumerate(ps):
            new, self.states[i] = pureopt.step(self.txs[i], [p.grad], self.states[i], [p.detach()])
            p.copy_(new[0])


RUNS = [*SPECS, "q8-hsdp", "q8-flat", "bare-bf16", *(f"{spec}-columns" for spec in COLUMN_SPECS)]


@pytest.mark.parametrize("run", RUNS)
def test_encoded_state_on_fsdp2_tracks_the_unsharded_runs(job: list[dict[str, Any]], run: str) -> None:
    spec, columns = spec_of(run), run.endswith("columns")
    start = [p.detach().clone() for p in make_net(columns).parameters()]
    fp32 = unsharded(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1), columns)
    blocks = column_blocks if columns else row_blocks
    same_blocks = unsharded(lambda ps: RowBlockedAdamW(ps, spec, blocks), columns)
    for rank in range(WORLD):
        got = job[rank][run]["trajectory"]
        for step in range(STEPS):
            moved = distance(fp32[step], start)
            assert distance(got[step], fp32[step]) <= TOL_FP32[spec] * moved, (spec, step)
            # the same encodings unsharded: only the gradients' summation order differs (a code may flip; stochastic
            # rounding's bits are keyed by each element's place in the whole parameter, as unsharded)
            assert distance(got[step], same_blocks[step]) <= TOL_SAME[spec] * moved, (spec, step)


@pytest.mark.parametrize("spec", SPECS)
def test_encoded_state_on_fsdp2_is_stored_by_rows_and_placed_like_the_parameters(
    job: list[dict[str, Any]], spec: str
) -> None:
    shapes = [(32, 16), (32,), (64, 32), (64,), (1, 64), (1,)]
    for rank in range(WORLD):
        layout = job[rank][spec]["layout"]
        for shape, entry in zip(shapes, layout):
            for key, stored in entry.items():
                assert stored["placed"], (spec, shape, key)
                if spec == "bf16-sr":
                    assert stored["dtypes"] == ["torch.bfloat16"] and stored["shapes"] == [shape]
                elif len(shape) == 1 or shape[1] < 32:  # 1-D, or rows too short for a block: kept in float32
                    assert stored["dtypes"] == ["torch.float32"] and stored["shapes"] == [shape]
                else:  # codes (one byte per element, two at 4 bits) and one scale per row (the row is one block)
                    cols = shape[1] // 2 if spec == "q4" else shape[1]
                    assert stored["shapes"] == [(shape[0], cols), (shape[0], 1)]
                    assert stored["dtypes"] == ["torch.uint8", "torch.float32"]
        if spec != "bf16-sr":
            assert {"exp_avg.codes", "exp_avg.scale", "exp_avg_sq.codes", "exp_avg_sq.scale"} <= set(
                job[rank][spec]["keys"]
            )


@pytest.mark.parametrize("spec", COLUMN_SPECS)
def test_encoded_state_of_matrices_sharded_by_columns_is_stored_by_runs_of_rows(
    job: list[dict[str, Any]], spec: str
) -> None:
    shapes = [(256, 16), (256,), (8, 256), (8,), (1, 8), (1,)]
    for rank in range(WORLD):
        layout = job[rank][f"{spec}-columns"]["layout"]
        for shape, entry in zip(shapes, layout):
            block = column_blocks(spec, shape)
            for key, stored in entry.items():
                assert stored["placed"], (spec, shape, key)  # (Shard(1) for the matrices, as their parameters)
                if spec == "bf16":
                    assert stored["dtypes"] == ["torch.bfloat16"] and stored["shapes"] == [shape]
                elif block is None:
                    assert stored["dtypes"] == ["torch.float32"] and stored["shapes"] == [shape]
                else:  # codes by rows, and per row one scale per block: two blocks of 128, one on each rank
                    cols = shape[1] // 2 if spec == "q4" else shape[1]
                    assert stored["shapes"] == [(shape[0], cols), (shape[0], shape[1] // block)], (spec, shape)
                    assert stored["dtypes"] == ["torch.uint8", "torch.float32"]


def test_norms_of_strided_shards_reduce_over_the_ranks(job: list[dict[str, Any]]) -> None:
    # the whole matrix's norm (written out: the same values as the rank made), not the rank's own rows'
    want = float((torch.arange(8 * 6, dtype=torch.float32) / 7).square().sum().sqrt())
    for rank in range(WORLD):
        got, local = job[rank]["strided-norm"]
        assert abs(got - want) <= 1e-6 * want and local < 0.99 * want, (got, local, want)


def test_encoded_state_refusals_on_dtensors_name_the_placement(job: list[dict[str, Any]]) -> None:
    for rank in range(WORLD):
        refusals = job[rank]["refused"]
        assert "keyed by each element's place" in refusals["bf16-sr-columns"]
        assert "Shard(dim=1)" in refusals["bf16-sr-columns"] and "'bf16'" in refusals["bf16-sr-columns"]
        assert "split within its rows" in refusals["q8-last-dim"] and "Shard(dim=2)" in refusals["q8-last-dim"]
        assert refusals["q8-strided-rows"] is None and refusals["bf16-last-dim"] is None
        assert refusals["q8-empty-rows"] is None
        assert "not sharded by rows" in (refusals["sr-strided-rows"] or ""), refusals["sr-strided-rows"]
        assert "NovoGrad's reaches over whole parameters" in job[rank]["novograd_error"]


@pytest.mark.parametrize("how", ["dcp", "full"])
@pytest.mark.parametrize("run", RUNS)
def test_encoded_state_on_fsdp2_resumes_through_dcp_bitwise(job: list[dict[str, Any]], run: str, how: str) -> None:
    # a sharded DCP checkpoint, and a full state dict (gathered onto rank 0, broadcast back on load: torchtune's and
    # accelerate's way): the resumed run is the uninterrupted one
    for rank in range(WORLD):
        res = job[rank][run]
        for got, want in zip(res["resumed"][how], res["trajectory"][RESUME_AT:]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("run", [*SPECS, "q8-flat", "q4-columns", "bf16-columns"])
def test_encoded_state_checkpoint_from_two_ranks_resumes_on_one(
    job: list[dict[str, Any]], one_rank: dict[str, Any], run: str
) -> None:
    # DCP reshards the row-blocked records (codes, scales: DTensors placed like the parameters) from 2 ranks to 1;
    # the resumed run follows the uninterrupted 2-rank one up to the gradients' summation order (whole batches here,
    # two half-batch means there)
    spec = spec_of(run)
    start = [p.detach().clone() for p in make_net(run.endswith("columns")).parameters()]
    want = job[0][run]["trajectory"][RESUME_AT:]
    for got, ref in zip(one_rank[run], want):
        assert distance(got, ref) <= TOL_SAME[spec] * distance(ref, start), run


def test_column_sharded_checkpoint_with_other_blocks_at_one_rank_is_refused(one_rank: dict[str, Any]) -> None:
    # q8 blocks the 256-element rows whole at world size 1 (the 2-rank runs were 128): the scales' shapes differ
    # ((8, 1) there, (8, 2) saved) and DCP's default planner refuses the load rather than read other blocks' scales
    refusal = one_rank["q8-columns"]
    assert isinstance(refusal, str) and "Size mismatch" in refusal and "exp_avg.scale" in refusal, refusal


def test_column_sharded_checkpoint_with_other_blocks_resumes_with_the_saved_layout_planner(
    job: list[dict[str, Any]], one_rank: dict[str, Any]
) -> None:
    # with SavedLayoutLoadPlanner the saved scales (8, 2) are read as they are, placed as the parameter, and the
    # optimizer keeps the saved blocks of 128 (they lie within the one rank's 256-element rows): the run resumes,
    # following the 2-rank one up to the gradients' summation order
    start = [p.detach().clone() for p in make_net(True).parameters()]
    want = job[0]["q8-columns"]["trajectory"][RESUME_AT:]
    for got, ref in zip(one_rank["q8-columns-planner"], want):
        assert distance(got, ref) <= TOL_SAME["q8"] * distance(ref, start)
    middle = one_rank["q8-columns-planner-layout"][2]["exp_avg"]  # (the 8 x 256 matrix)
    assert middle["shapes"] == [(8, 256), (8, 2)] and middle["placed"], middle
    refusal = one_rank["bad-blocks"]
    assert refusal is not None and "blocks of 16 elements (scales (8, 16)) do not lie within" in refusal, refusal


def test_pure_step_with_encoded_state_on_fsdp2_tracks_the_unsharded_run(job: list[dict[str, Any]]) -> None:
    start = [p.detach().clone() for p in make_net().parameters()]
    same_blocks = unsharded(lambda ps: RowBlockedAdamW(ps, "q8"))
    for rank in range(WORLD):
        for step, got in enumerate(job[rank]["pure-q8"]):
            assert distance(got, same_blocks[step]) <= 1e-3 * distance(same_blocks[step], start)


@pytest.mark.parametrize(
    "name,width,block",
    [
        ("q8", 4096, 2048),  # a multiple of the block: the block
        ("q8", 768, 768),  # shorter rows: one block per row
        ("q8", 3000, 1500),  # the largest divisor down to block / 4
        ("q8", 4099, None),  # prime: no divisor in range
        ("q8", 16, None),  # under 32 elements
        ("q4", 4096, 128),
        ("q4", 200, 100),
        ("q4", 96, 96),
        ("q4", 33, None),  # 4-bit blocks are even
        ("q4", 130, None),  # 65 is odd, 26 under 32
        ("fp8", 6144, 2048),
    ],
)
def test_row_blocks_divide_the_rows(name: str, width: int, block: int | None) -> None:
    enc = NAMED[name].for_rows(width)
    assert (None if enc is None else enc.block) == block
    if enc is not None:
        assert width % enc.block == 0 and enc.name == name and enc.code == NAMED[name].code


@pytest.mark.bitwise
def test_stochastic_rounding_of_sharded_bf16_parameters_equals_the_unsharded_rounding(
    job: list[dict[str, Any]],
) -> None:
    # each rank rounds its shard with the random bits of its elements' places in the whole parameter: the sharded
    # run (uneven rows, an empty shard, a 1-D parameter) is the unsharded run bit for bit, donated and pure
    full_params, full_grads = sr_problem()
    tx = sr_transform()
    params, state = [p.clone() for p in full_params], tx.init(full_params)
    want = []
    for grads in full_grads:
        params, state = pureopt.step(tx, grads, state, params)
        want.append(params)
    assert any(not torch.equal(a, b) for a, b in zip(want[-1], full_params))
    for rank in range(WORLD):
        for mode in ("donated", "pure"):
            for step, (got, ref) in enumerate(zip(job[rank]["sr-params"][mode], want)):
                assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(got, ref)), (mode, step)
        assert "not sharded by rows" in job[rank]["sr-params"]["columns_error"]
        assert job[rank]["sr-params"]["columns_unchanged"]


def resumed_unsharded(
    load: Any, spec: str, flat: bool
) -> tuple[list[dict[str, torch.Tensor]], list[list[torch.Tensor]]]:
    """A plain (unsharded) model and optimizer loaded from a checkpoint of :func:`trained` by ``load(model, opt)``:
    the optimizer's state right after loading (torch's per-parameter entries) and the parameters after each of the
    remaining steps on whole global batches."""
    model = make_net()
    opt = TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=0.1, state_dtype=spec, flat=flat)
    load(model, opt)
    loaded = [{n: t.clone() for n, t in v.items()} for v in opt.state_dict()["state"].values()]
    return loaded, resumed_steps(model, opt, lambda m: [p.detach().clone() for p in m.parameters()])


def gathered_load(path: Path, tmp: Path) -> Any:
    """Loading by torch's offline route: the DCP checkpoint gathered into one file (``dcp_to_torch_save``), then
    torch's ``set_state_dict``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp / "gathered.pt")
    return saved_load(torch.load(tmp / "gathered.pt", weights_only=False))


def saved_load(saved: dict[str, Any]) -> Any:
    """Loading a whole checkpoint in memory (``{"model": ..., "optim": ...}``) with torch's ``set_state_dict``."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    def load(model: nn.Module, opt: TorchOptimizer) -> None:
        set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"])

    return load


def planned_load(path: Path, planner: Any) -> Any:
    """Loading in place with ``dcp.load`` into the unsharded model's template (``get_state_dict``), read by
    ``planner``, then ``set_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def load(model: nn.Module, opt: TorchOptimizer) -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path), planner=planner)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return load


def saved_entries(path: Path, tmp: Path) -> list[dict[str, torch.Tensor]]:
    """Each parameter's optimizer entry as the checkpoint holds it (gathered to whole tensors), in model order."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, tmp / "entries.pt")
    state = torch.load(tmp / "entries.pt", weights_only=False)["optim"]["state"]
    return [state[name] for name, _ in make_net().named_parameters()]


@pytest.mark.parametrize("how", ["full", "gathered", "planner", "planner-flat"])
@pytest.mark.parametrize("run", [*SPECS, "q8-hsdp", "q8-flat"])
def test_fsdp2_checkpoint_loads_into_unsharded_parameters_in_its_layout(
    job: list[dict[str, Any]], job_dir: Path, tmp_path: Path, run: str, how: str
) -> None:
    # A 2-rank DCP checkpoint loads into an optimizer over the plain model, gathered into one file (torch's
    # dcp_to_torch_save) or in place with dcp.load and pureopt's SavedLayoutLoadPlanner: each encoded field keeps
    # the layout it was saved in (codes and scales by rows; the vectors' and short rows' float32 state), bitwise, and
    # the run goes on as the 2-rank one did (up to the gradients' summation order; with flat=True, bf16-sr state's
    # random bits are keyed by places in the flat buffers: another realization of the rounding) and within the
    # quantisation bound of torch.optim.AdamW's fp32 run
    from pureopt.adapters import SavedLayoutLoadPlanner

    spec, path, flat = spec_of(run), job_dir / f"dcp-{run}", how.endswith("flat")
    if how == "full":  # the full state dict the ranks gathered onto rank 0 (full_save)
        load = saved_load(torch.load(path.with_suffix(".pt"), weights_only=True))
    elif how == "gathered":
        load = gathered_load(path, tmp_path)
    else:
        load = planned_load(path, SavedLayoutLoadPlanner())
    loaded, resumed = resumed_unsharded(load, spec, flat)
    for entry, want in zip(loaded, saved_entries(path, tmp_path)):
        assert sorted(entry) == sorted(want)
        assert all(entry[k].shape == v.shape and torch.equal(entry[k], v) for k, v in want.items())
    start = [p.detach().clone() for p in make_net().parameters()]
    fp32 = unsharded(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1))
    for k, got in enumerate(resumed):
        ref = job[0][run]["trajectory"][RESUME_AT + k]
        moved = distance(fp32[RESUME_AT + k], start)
        same = TOL_SR_REALIZATIONS if flat and spec == "bf16-sr" else TOL_SAME[spec]
        assert distance(got, ref) <= same * distance(ref, start), (run, k)
        assert distance(got, fp32[RESUME_AT + k]) <= TOL_FP32[spec] * moved, (run, k)


def test_fsdp2_checkpoint_into_unsharded_parameters_needs_the_planner(job_dir: Path) -> None:
    # DCP's default planner reads the template's keys and shapes: the unsharded q8 state's flat blocks are neither
    # the checkpoint's rows nor its float32 fields (the first matrix's 16-element rows), and it refuses the load
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match=r"Missing key in checkpoint state_dict: optim\.state\.0\.weight"):
        resumed_unsharded(planned_load(job_dir / "dcp-q8", DefaultLoadPlanner()), "q8", False)
