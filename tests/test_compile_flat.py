"""The flat parameter layout (``pureopt.FlatParams``) for torch.func loops, eager and compiled with inductor.

References: torch.optim's own classes (for-loop implementation, ``torch.nn.utils.clip_grad_norm_`` for the
clipped chain) stepping the per-layer tensors, with the learning rate changed before every step; for the
algorithms torch.optim lacks, the per-tensor pure step (``tx.update`` + ``apply_updates`` on the parameter tree),
which tests/test_optimizers_beyond.py checks against each paper's update rule; closed forms for the views and
their gradients. Recompiles are counted: a changing lr (0-d tensor) and advancing step counts reuse one graph.

Tolerances: fp32 rtol 1e-5 where inductor compiled the step (it fuses and reorders the elementwise math, and the
flat buffer moves elements between the vector body and the scalar tail of torch's kernels); fp64 1e-12 for the
eager flat step against the per-tensor one (same ops on a concatenation; only the vector-body/tail rounding
of fused multiply-adds differs).

Compile time: the registry's configurations that can run flat are stepped by a few compiled functions, each
stepping several optimizers at once (one graph per group, not one per optimizer), so the file stays near a
minute on 2 cores.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _checks import assert_unchanged, snapshot
from _parity import grads_at, make_data, make_params
from _registry import CONFIGS, OPTIMIZERS
from torch._dynamo.utils import counters

import pureopt
from pureopt.flat_params import FlatParams

STEPS = 4
LRS = [1.0 - 0.2 * i for i in range(STEPS)]  # multipliers of each configuration's lr, one per step
SHAPES = [(7, 5), (5,), (3, 7), (), (11,)]

# torch.optim classes for the registry's CONFIGS ids (the rest are compared with the per-tensor pure step)
TORCH_CLASS = {
    "sgd": "SGD",
    "sgd-dampening": "SGD",
    "adam": "Adam",
    "adam-amsgrad": "Adam",
    "adamw": "AdamW",
    "adagrad": "Adagrad",
    "adadelta": "Adadelta",
    "adamax": "Adamax",
    "asgd": "ASGD",
    "nadam": "NAdam",
    "radam": "RAdam",
    "rmsprop": "RMSprop",
    "rprop": "Rprop",
    "chain-clip-adamw": "AdamW",
}


def _tree(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for i, s in enumerate(SHAPES)}


def _flat_ok(factory: Any, kw: dict) -> bool:
    return pureopt.is_segmentwise(factory(**kw))


# the registry's algorithms that CONFIGS has no entry for (OPTIMIZERS has them with a float lr)
EXTRA = [
    ("sign_sgd", pureopt.sign_sgd, dict(lr=0.01)),
    ("schedule_free_sgd", pureopt.schedule_free_sgd, dict(lr=0.1)),
]
FLAT_CONFIGS = [c for c in [*CONFIGS, *EXTRA] if _flat_ok(c[1], c[2])]
NOT_FLAT = [c for c in CONFIGS if not _flat_ok(c[1], c[2])]
# three compiled graphs: torch.optim's algorithms in two, the others in one
GROUPS = {
    "torch-a": [c for c in FLAT_CONFIGS if c[0] in TORCH_CLASS][:7],
    "torch-b": [c for c in FLAT_CONFIGS if c[0] in TORCH_CLASS][7:],
    "beyond": [c for c in FLAT_CONFIGS if c[0] not in TORCH_CLASS],
}


def test_every_flat_config_is_in_a_compiled_group() -> None:
    grouped = [c[0] for g in GROUPS.values() for c in g]
    assert sorted(grouped) == sorted(c[0] for c in FLAT_CONFIGS)
    names = {opt_id.split("{")[0] for opt_id, _ in OPTIMIZERS}  # every algorithm of the flag grid
    assert names - {c[0] for c in CONFIGS} - {c[0] for c in EXTRA} == set()
    assert {c[0] for c in NOT_FLAT} >= {"adafactor", "novograd"}


class _Torch:
    """torch.optim stepping the per-layer tensors with gradients given per step (and the clip for the chain)."""

    def __init__(self, opt_id: str, kw: dict, init: dict[str, torch.Tensor]) -> None:
        self.params = [t.clone().requires_grad_(True) for t in init.values()]
        self.clip = opt_id.startswith("chain-clip")
        self.lr = kw["lr"]
        self.opt = getattr(torch.optim, TORCH_CLASS[opt_id])(self.params, foreach=False, **kw)

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=False)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()


@pytest.mark.parametrize("group", list(GROUPS), ids=list(GROUPS))
def test_compiled_flat_step_matches_torch_and_the_per_tensor_step(group: str) -> None:
    """One inductor graph steps every configuration of the group on its own flat buffers, lr changed each step."""
    configs = GROUPS[group]
    torch._dynamo.reset()
    counters.clear()
    init = _tree(0)
    lrs, txs, flats, buffers, states, refs, pure = [], [], [], [], [], [], []
    for opt_id, factory, kw in configs:
        lr = torch.tensor(kw["lr"], dtype=torch.float64)
        flat = FlatParams(init)
        tx = flat.wrap(factory(**{**kw, "lr": lr}))
        lrs.append(lr)
        flats.append(flat)
        txs.append(tx)
        buffers.append(flat.buffers)
        states.append(tx.init(flat.buffers))
        refs.append(_Torch(opt_id, kw, init) if opt_id in TORCH_CLASS else None)
        ptx = factory(**{**kw, "lr": lr})  # the per-tensor pure step, eager, reading the same lr tensor
        pure.append([ptx, dict(init), ptx.init(init)])

    def step_all(grads: list, states: list, buffers: list) -> Any:
        out = [pureopt.step(tx, g, s, b) for tx, g, s, b in zip(txs, grads, states, buffers)]
        return [o[0] for o in out], [o[1] for o in out]

    compiled = torch.compile(step_all, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(STEPS):
            g_tree = _tree(100 + t)
            for lr, (_, _, kw) in zip(lrs, configs):
                lr.fill_(kw["lr"] * LRS[t])
            grads = [flat.flatten(g_tree) for flat in flats]
            buffers, states = compiled(grads, states, buffers)
            for i, (opt_id, _, kw) in enumerate(configs):
                ptx, p, s = pure[i]
                updates, s = ptx.update(g_tree, s, p)
                pure[i] = [ptx, pureopt.apply_updates(p, updates), s]
                if refs[i] is not None:
                    refs[i].step(list(g_tree.values()), kw["lr"] * LRS[t])
                mine = flats[i].views(buffers[i])
                for j, k in enumerate(init):
                    msg = f"{opt_id} {k} @ {t}"
                    torch.testing.assert_close(mine[k], pure[i][1][k], rtol=1e-5, atol=1e-6, msg=msg)
                    if refs[i] is not None:
                        theirs = refs[i].params[j].detach()
                        torch.testing.assert_close(mine[k], theirs, rtol=1e-5, atol=1e-6, msg=msg)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_donated_flat_step_runs_in_place_and_matches_torch() -> None:
    """``donate=("params", "state")`` under inductor: the step writes into the given buffers (two groups: fp32 and
    fp64), matches torch.optim.AdamW, and a changing lr does not recompile."""
    torch._dynamo.reset()
    counters.clear()
    init = {**_tree(0), "d": torch.randn(6, 3, dtype=torch.float64)}
    flat = FlatParams(init)
    assert flat.num_groups == 2
    lr = torch.tensor(0.01, dtype=torch.float64)
    tx = flat.wrap(pureopt.adamw(lr=lr, weight_decay=0.1))
    buffers, state = flat.buffers, tx.init(flat.buffers)
    ptrs = [b.data_ptr() for b in buffers]
    ref = _Torch("adamw", dict(lr=0.01, weight_decay=0.1), init)

    @torch.compile(fullgraph=True)
    def step(grads: Any, state: Any, buffers: Any) -> Any:
        return pureopt.step(tx, grads, state, buffers, donate=("params", "state"))

    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(STEPS):
            g_tree = {**_tree(100 + t), "d": torch.randn(6, 3, dtype=torch.float64)}
            lr.fill_(0.01 * LRS[t])
            new_buffers, state = step(flat.flatten(g_tree), state, buffers)
            assert [b.data_ptr() for b in new_buffers] == ptrs  # written in place
            buffers = new_buffers
            ref.step(list(g_tree.values()), 0.01 * LRS[t])
            for j, (k, mine) in enumerate(flat.views(buffers).items()):
                theirs = ref.params[j].detach()
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=f"{k} @ {t}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("opt_id,factory", OPTIMIZERS, ids=[o for o, _ in OPTIMIZERS])
def test_eager_flat_step_equals_the_per_tensor_step(opt_id: str, factory: Any) -> None:
    """Every registry configuration that is elementwise/segmentwise, fp64, eager: ``pureopt.step`` on the flat
    buffers (and the flat ``update`` + ``apply_updates``) equals the per-tensor pure step; the others refuse."""
    if not pureopt.is_segmentwise(factory("auto")):
        with pytest.raises(ValueError, match="elementwise"):
            FlatParams(_tree(0)).wrap(factory("auto"))
        return
    dtype = torch.float64
    data = make_data(dtype)
    params = make_params(dtype)
    flat = FlatParams(params, max_buffer_bytes=160)  # three buffers (cut between tensors)
    assert flat.num_groups == 3
    tx, ptx = flat.wrap(factory("auto")), factory("auto")
    buffers, state = flat.buffers, tx.init(flat.buffers)
    u_buffers, u_state = flat.buffers, tx.init(flat.buffers)
    p_state = ptx.init(params)
    for t in range(5):
        g = grads_at(params, t, data)
        g = {k: torch.zeros_like(params[k]) if v is None else v for k, v in g.items()}  # a flat gradient has all
        flat_g = flat.flatten(g)
        before = snapshot((flat_g, state, buffers))
        new_buffers, state_next = pureopt.step(tx, flat_g, state, buffers)
        assert_unchanged((flat_g, state, buffers), before, "inputs")
        buffers, state = new_buffers, state_next
        updates, u_state = tx.update(flat_g, u_state, u_buffers)
        u_buffers = pureopt.apply_updates(u_buffers, updates)
        updates, p_state = ptx.update(g, p_state, params)
        params = pureopt.apply_updates(params, updates)
        for name, got in (("step", buffers), ("update", u_buffers)):
            for k, v in flat.views(got).items():
                torch.testing.assert_close(v, params[k], rtol=1e-12, atol=1e-14, msg=f"{opt_id} {name} {k} @ {t}")


def test_views_and_their_gradients() -> None:
    """Views are the original tensors (bitwise) in one buffer per dtype; the gradient with respect to the buffers
    is the per-tensor gradient laid out flat (reference: torch.func.grad on the tree)."""
    init = {"a": torch.randn(3, 4), "b": torch.randn(2, dtype=torch.float64), "c": torch.randn(5), "s": torch.randn(())}
    flat = FlatParams(init)
    assert [b.dtype for b in flat.buffers] == [torch.float32, torch.float64]
    assert [b.shape[0] for b in flat.buffers] == [18, 2]
    assert flat.segments == [(12, 5, 1), (2,)]
    for k, v in flat.views().items():
        assert v.shape == init[k].shape and torch.equal(v, init[k]), k
        assert v.untyped_storage().data_ptr() == flat.buffers[0 if k != "b" else 1].untyped_storage().data_ptr()
    chunked = FlatParams(init, max_buffer_bytes=48)  # a (48 bytes) alone, c and s together, b (float64) apart
    assert chunked.segments == [(12,), (5, 1), (2,)]
    assert [b.dtype for b in chunked.buffers] == [torch.float32, torch.float32, torch.float64]
    for k, v in chunked.views().items():
        assert torch.equal(v, init[k]), k

    def loss(tree: dict[str, torch.Tensor]) -> torch.Tensor:
        return (tree["a"].sin().sum() + tree["c"].pow(2).sum() * tree["s"]) * tree["b"].double().sum().float()

    per_tensor = torch.func.grad(loss)(init)
    flat_grads = torch.func.grad(lambda bufs: loss(flat.views(bufs)))(flat.buffers)
    for k, v in flat.views(flat_grads).items():
        torch.testing.assert_close(v, per_tensor[k], rtol=1e-6, atol=1e-7, msg=k)
    assert all(torch.equal(x, y) for x, y in zip(flat.flatten(per_tensor), flat_grads))


def test_default_buffer_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_buffer_bytes="auto"`` (default): a CPU group above ``AUTO_BUFFER_BYTES`` is cut between tensors into
    buffers of at most ``max(AUTO_BUFFER_BYTES, group bytes / AUTO_MAX_BUFFERS)``; smaller groups, and other devices,
    stay whole. The constants are shrunk here so that small tensors exercise each case (closed-form layouts)."""
    import pureopt.flat_params as fp

    tree = {f"t{i}": torch.zeros(4) for i in range(8)}  # 8 float32 tensors of 16 bytes: 128 bytes
    assert FlatParams(tree).segments == [(4,) * 8]  # 128 bytes: far below 16 MiB, one buffer
    assert fp.AUTO_BUFFER_BYTES == 16 << 20 and fp.AUTO_MAX_BUFFERS == 16
    monkeypatch.setattr(fp, "AUTO_BUFFER_BYTES", 32)
    assert FlatParams(tree).segments == [(4, 4)] * 4  # 32-byte buffers (4 <= 16 of them)
    assert FlatParams(tree, max_buffer_bytes=None).num_groups == 1
    assert FlatParams(tree, max_buffer_bytes=64).segments == [(4,) * 4] * 2
    monkeypatch.setattr(fp, "AUTO_MAX_BUFFERS", 2)
    assert FlatParams(tree).segments == [(4,) * 4] * 2  # 64-byte buffers: at most 2
    mixed = {**tree, "z": torch.zeros(2, dtype=torch.float64)}  # the float64 group (16 bytes) stays whole
    assert FlatParams(mixed).segments == [(4,) * 4, (4,) * 4, (2,)]
    on_meta = {k: v.to("meta") for k, v in tree.items()}  # not a CPU group: not cut
    assert FlatParams(on_meta).num_groups == 1


def test_bad_input_is_refused_with_a_clear_error() -> None:
    flat = FlatParams(_tree(0))
    with pytest.raises(TypeError, match=r"\['x'\] is None"):
        FlatParams({"w": torch.zeros(2), "x": None})
    with pytest.raises(ValueError, match="no tensors"):
        FlatParams({})
    with pytest.raises(ValueError, match="elementwise"):
        flat.wrap(pureopt.adafactor(lr=0.01))
    with pytest.raises(ValueError, match="elementwise"):
        flat.wrap(pureopt.stateless(lambda u, p: u))
    tx = flat.wrap(pureopt.adam(lr=0.01))
    state = tx.init(flat.buffers)
    with pytest.raises(ValueError, match=r"flat gradients\[0\] is torch.float32 \(3,\) on cpu; the layout has "):
        tx.update((torch.zeros(3),), state, flat.buffers)
    with pytest.raises(ValueError, match="has 2 entries, the layout has 1"):
        tx.update((flat.buffers[0], flat.buffers[0]), state)
    for bad in (0, -1, True, 1.5, "16MiB"):
        with pytest.raises(ValueError, match=r"max_buffer_bytes must be a positive int, None or 'auto'"):
            FlatParams(_tree(0), max_buffer_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not have the parameters' layout"):
        flat.flatten({**_tree(0), "p1": torch.zeros(4)})


def test_a_flat_training_loop_trains_a_module_like_torch_optim() -> None:
    """The documented loop: ``functional_call`` on the views, ``torch.func.grad`` with respect to the buffers, the
    step compiled with inductor (as users compile it), the state and
    parameters donated; against torch.optim.AdamW training the same module on the same batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref_model = copy.deepcopy(model)
    batches = [(torch.randn(16, 6), torch.randn(16, 2)) for _ in range(5)]
    flat = FlatParams({k: v.detach() for k, v in model.named_parameters()})
    tx = flat.wrap(pureopt.adamw(lr=torch.tensor(0.01, dtype=torch.float64), weight_decay=0.1))
    buffers, state = flat.buffers, tx.init(flat.buffers)

    def loss_of(buffers: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((torch.func.functional_call(model, flat.views(buffers), (x,)) - y) ** 2).mean()

    @torch.compile(fullgraph=True)
    def opt_step(grads: Any, state: Any, buffers: Any) -> Any:
        return pureopt.step(tx, grads, state, buffers, donate=("params", "state"))

    opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    for x, y in batches:
        grads = torch.func.grad(loss_of)(buffers, x, y)
        buffers, state = opt_step(grads, state, buffers)
        opt.zero_grad()
        ((ref_model(x) - y) ** 2).mean().backward()
        opt.step()
    for (k, mine), theirs in zip(flat.views(buffers).items(), ref_model.parameters()):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-6, msg=k)
