"""The applied step of algorithms whose math reduces within each tensor (Adafactor, CAME, LAMB, LARS, SGDP, Muon:
``tensorwise``) runs over a few whole tensors at a time on the CPU, adding their updates before the next tensors'
are made, and so does schedule-free's (elementwise, its global scalars advanced outside the math): their
full-size temporaries exist for one chunk, not for every parameter at once (before, in bytes per parameter:
Adafactor 4, CAME 4.3, LAMB 8, LARS 4, SGDP 2, schedule-free AdamW 8).

Memory is measured by ``benchmarks/memory.py``'s ``transient_peak`` (the CPU allocator's events recorded by
``torch.profiler``); the steps are checked against torch.optim.Adafactor, came_pytorch's CAME, the ``adamp``
package's SGDP, and the update rules of LAMB (You et al. 2020, Algorithm 2), LARS (You, Gitman & Ginsburg 2017,
Algorithm 1, with an exclusion mask) and schedule-free AdamW (Defazio et al. 2024, with ``x``, ``y`` and ``z`` kept
explicitly) written out here in float64; Muon (its Newton-Schulz iteration per matrix; before: 10 bytes per
parameter) against torch.optim.Muon.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _encoded import distance
from _memory import transient_peak
from _registry import CONFIGS

import pureopt
from pureopt.kernels.common import CHUNK_BYTES

SHAPES = [(256, 256)] * 24 + [(256,)] * 24  # 1.6M elements, 6 MiB of float32
# Muon: matrices only, fewer (its bfloat16 iteration is slow on the CPU): 2 MiB, 5 MiB of transient before
MATRICES = [(256, 256)] * 8
STEPS = 3


def _problem(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(STEPS)]
    return params, grads


class LambRule(torch.optim.Optimizer):
    """LAMB as You et al. 2020 write it (Algorithm 2, phi the identity), in float64."""

    def __init__(self, params: Any, lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        b1, b2, eps = 0.9, 0.999, 1e-6
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                t = st["t"] = st.get("t", 0) + 1
                g, x = p.grad.double(), p.double()
                m = st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
                v = st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
                u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + group["weight_decay"] * x
                pn, un = x.norm(), u.norm()
                ratio = pn / un if pn > 0 and un > 0 else 1.0
                p.copy_(x - group["lr"] * ratio * u)


class LarsRule(torch.optim.Optimizer):
    """LARS with momentum (the buffer includes the learning rate); vectors excluded: plain momentum SGD."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                g, x = p.grad.double(), p.double()
                if p.dim() > 1:
                    wn, gn = x.norm(), g.norm()
                    local = 1e-3 * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
                    d = g + wd * x
                else:
                    local, d = 1.0, g
                v = self.state[p]["v"] = mom * self.state[p].get("v", torch.zeros_like(x)) + lr * local * d
                p.copy_(x - v)


class ScheduleFreeRule(torch.optim.Optimizer):
    """Schedule-free AdamW with the three sequences kept (no warmup, r = 0, weight_lr_power = 2)."""

    def __init__(self, params: Any, lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.k, self.weight_sum = 0, 0.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        beta, b2, eps = 0.9, 0.999, 1e-8
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            weight = lr**2
            self.weight_sum += weight
            c = weight / self.weight_sum
            for p in group["params"]:
                st, y = self.state[p], p.double()
                z, x = st.get("z", y), st.get("x", y)
                t = st["t"] = st.get("t", 0) + 1
                g = p.grad.double()
                v = st["v"] = b2 * st.get("v", torch.zeros_like(y)) + (1 - b2) * g * g
                d = g / ((v / (1 - b2**t)).sqrt() + eps) + wd * y
                z = st["z"] = z - lr * d
                x = st["x"] = (1 - c) * x + c * z
                p.copy_((1 - beta) * z + beta * x)
        self.k += 1


def _sgdp(ps: list[torch.Tensor], **kw: Any) -> torch.optim.Optimizer:
    return pytest.importorskip("adamp").SGDP(ps, **kw)


def _lars(**kw: Any) -> Any:
    return pureopt.lars(**kw, mask=lambda params: type(params)(p.dim() > 1 for p in params))


def _came(ps: list[torch.Tensor], **kw: Any) -> torch.optim.Optimizer:
    came_pytorch = pytest.importorskip("came_pytorch")
    return came_pytorch.CAME(ps, **kw)


CASES = {
    # name: (pureopt factory, kwargs, reference optimizer, parameters' tolerance)
    "adafactor": (pureopt.adafactor, {"lr": 1e-2, "weight_decay": 0.1}, torch.optim.Adafactor, 1e-6),
    "came": (pureopt.came, {"lr": 1e-3, "weight_decay": 0.1}, _came, 1e-5),
    "lamb": (pureopt.lamb, {"lr": 1e-3, "weight_decay": 0.1}, LambRule, 1e-5),
    "lars": (_lars, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, LarsRule, 1e-5),
    "sgdp": (pureopt.sgdp, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, "delta": 1.0}, _sgdp, 1e-5),
    "schedule_free_adamw": (pureopt.schedule_free_adamw, {"lr": 1e-2, "weight_decay": 0.1}, ScheduleFreeRule, 1e-5),
    # (matrices only; each stepped in place by torch.optim.Muon's own two operations; the bfloat16 iteration is
    # pureopt's: a few ulps, as tests/test_muon.py allows in float32)
    "muon": (pureopt.muon, {"lr": 1e-2, "weight_decay": 0.1}, torch.optim.Muon, 1e-5),
}


def run_against(
    shapes: list[tuple[int, ...]], factory: Any, reference: Any, kw: dict[str, Any], tol: float, what: str
) -> None:
    """``STEPS`` steps of ``TorchOptimizer(factory, **kw)`` and of the ``reference`` optimizer side by side, the
    parameters compared after each (``tol``, relative); the last step's transient bounded: two float32
    temporaries per element of a chunk (1 MiB of parameters: 4 of the matrices), e.g. Adafactor's estimate V and
    direction U, and the small ones (a step over all tensors at once makes 3-12 MiB here)."""
    params, grads = _problem(shapes)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = reference(ref, **kw)
    mine = [p.clone().requires_grad_() for p in params]
    opt = pureopt.TorchOptimizer(mine, factory, **kw)
    for step, gs in enumerate(grads):
        for p, r, g in zip(mine, ref, gs):
            p.grad, r.grad = g.clone(), g.clone()
        ref_opt.step()
        if step == STEPS - 1:
            peak, live = transient_peak(opt.step)
            bound = 2 * CHUNK_BYTES + (256 << 10)
            assert peak - live <= bound, f"{what}: transient {(peak - live) / 2**20:.2f} MiB > {bound / 2**20:.2f}"
        else:
            opt.step()
        for p, r in zip(mine, ref):
            torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_applied_step_of_tensorwise_math_holds_one_chunk_of_temporaries(name: str) -> None:
    factory, kw, reference, tol = CASES[name]
    run_against(MATRICES if name == "muon" else SHAPES, factory, reference, kw, tol, name)


class MuonAndAdamW(torch.optim.Optimizer):
    """The usual Muon recipe in torch: torch.optim.Muon on the matrices, torch.optim.AdamW on the rest."""

    def __init__(self, params: Any, lr: float, weight_decay: float) -> None:
        params = list(params)
        super().__init__(params, {})
        self.muon = torch.optim.Muon([p for p in params if p.dim() == 2], lr=lr, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW([p for p in params if p.dim() != 2], lr=lr, weight_decay=weight_decay)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.muon.step()
        self.adamw.step()


def _muon_and_adamw(lr: float, weight_decay: float) -> Any:
    labels = lambda params: type(params)("muon" if p.dim() == 2 else "adamw" for p in params)
    inner = {
        "muon": pureopt.muon(lr=lr, weight_decay=weight_decay),
        "adamw": pureopt.adamw(lr, weight_decay=weight_decay),
    }
    return pureopt.partition(inner, labels)


def test_partitioned_step_applies_each_part_in_place() -> None:
    # partition's (and masked's) inner transformations own their parameters alone: where the caller applies the
    # step, each steps its own in place (Muon a matrix at a time), no whole tree of updates (before: 4 bytes a
    # parameter); against torch.optim.Muon and torch.optim.AdamW side by side
    shapes = [(256, 256)] * 8 + [(256,)] * 8
    run_against(shapes, _muon_and_adamw, MuonAndAdamW, {"lr": 1e-2, "weight_decay": 0.1}, 1e-5, "partition")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("state_dtype", ["q8", "bf16"])
def test_lars_with_encoded_state_tracks_its_rule(state_dtype: str, masked: bool) -> None:
    # LARS's per-tensor mask rides as a column of its scalars; without a mask there is none, also on the encoded
    # path (decoded whole tensors): within the quantisation bound of the float64 rule (0.1 of the distance moved)
    params, grads = _problem([(64, 64)] * 3 + [(64,)] * 3)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = LarsRule(ref, lr=0.1, momentum=0.9, weight_decay=1e-4)
    mine = [p.clone().requires_grad_() for p in params]
    make = _lars if masked else pureopt.lars
    opt = pureopt.TorchOptimizer(mine, make, lr=0.1, momentum=0.9, weight_decay=1e-4, state_dtype=state_dtype)
    for gs in grads:
        for p, r, g in zip(mine, ref, gs):
            p.grad, r.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    if not masked:  # (the rule excludes the vectors; unmasked LARS adapts them too: compare the matrices)
        mine, ref, params = mine[:3], ref[:3], params[:3]
    mine, ref = [p.detach() for p in mine], [r.detach() for r in ref]
    assert distance(mine, ref) <= 0.1 * distance(ref, params), (distance(mine, ref), distance(ref, params))


@pytest.mark.parametrize(
    "name, make, reference",
    [
        # CAME's factors are not shaped like the parameters (``()`` for vectors): its first moment alone is encoded
        ("came", lambda ps: pureopt.TorchOptimizer(ps, pureopt.came, lr=1e-3, state_dtype={"exp_avg": "q8"}),
         lambda ps: _came(ps, lr=1e-3)),
        # Sophia-G stepped without Hessian estimates: its estimate column is absent, also on the encoded path
        ("sophia_g", lambda ps: pureopt.TorchOptimizer(ps, pureopt.sophia_g, lr=1e-3, state_dtype="q8"),
         lambda ps: pureopt.TorchOptimizer(ps, pureopt.sophia_g, lr=1e-3)),
    ],
)  # fmt: skip
def test_encoded_state_of_algorithms_with_other_columns_tracks_the_float32_run(
    name: str, make: Any, reference: Any
) -> None:
    params, grads = _problem([(64, 64)] * 3 + [(64,)] * 3)
    mine, ref = [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]
    opt, ref_opt = make(mine), reference(ref)
    for gs in grads:
        for p, r, g in zip(mine, ref, gs):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    mine, ref = [p.detach() for p in mine], [r.detach() for r in ref]
    assert distance(mine, ref) <= 0.1 * distance(ref, params), name


def test_encodings_of_came_factors_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="CAME's exp_avg_sq_row is not shaped like its parameter"):
        pureopt.came(lr=1e-3, state_dtype="q8")


# D-Adapt SGD reduces over all tensors in the math with no `reduce` phase (its first step's gradient norm feeds
# the other sums): its encoded `s` is decoded whole (docs/memory.md); D-Adapt Adam and Prodigy sum chunk by chunk
# first (Algorithm(reduce=...); 12-16 bytes/param before)
_DECODED_WHOLE = {"dadapt_sgd"}


@pytest.mark.parametrize("name,factory,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_optimizer_with_8bit_state_holds_about_a_chunk_per_field(name: str, factory: Any, kw: Any) -> None:
    # 24 matrices of 256 x 256 and 24 vectors: decoding the state whole is 6 MiB per field; the bound is a few
    # chunks of decoded fields and temporaries (before the tensorwise encoded chunks: LAMB 20 bytes/param, 30 MiB)
    try:
        tx = factory(**kw, state_dtype="q8")
    except ValueError:  # (Adafactor's, CAME's factors: refused by name in test_state_encoding)
        return
    params, grads = _problem(SHAPES)
    state = tx.init(params)
    for gs in grads[:-1]:  # (first steps allocate what later ones reuse: DoG's scratch)
        state = pureopt.inplace_step(tx, gs, state, params)
    box = [state]

    def step() -> None:
        box[0] = pureopt.inplace_step(tx, grads[-1], box[0], params)

    peak, _ = transient_peak(step)
    whole = sum(p.numel() for p in params) * 4
    if name in _DECODED_WHOLE:
        assert peak >= whole, (name, peak)  # (the open end above: when this fails, move the name out)
        return
    assert peak <= 6 * CHUNK_BYTES < whole, (name, peak / 2**20)
