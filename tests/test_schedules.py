"""Tests for pureopt.schedules.

Every value is checked against an independent reference:

* schedules with a ``torch.optim.lr_scheduler`` counterpart against the real torch scheduler, driven
  with a dummy SGD optimizer for 1000 steps (``param_groups[0]['lr']`` recorded before each
  ``optimizer.step(); scheduler.step()``);
* optax-only schedules against their formula written out here with Python ``math``.
"""

from __future__ import annotations

import doctest
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from torch.optim import lr_scheduler as lrs

import pureopt.schedules as S
from pureopt.schedules import Schedule

N_STEPS = 1000
# float64 everywhere; torch's recursive updates (products of ratios) drift from the closed forms by at most
# a few 1e-13 relative over 1000 steps (worst case: CosineAnnealingLR with a small T_max, many periods).
RTOL_TORCH = 1e-10
# optax-style schedules against the same formula computed with Python floats: only rounding differs.
RTOL_FORMULA = 1e-12
ATOL_FORMULA = 1e-15

MakeScheduler = Callable[[torch.optim.Optimizer], Any]


def torch_lrs(make_scheduler: MakeScheduler, lr: float, n_steps: int = N_STEPS) -> list[float]:
    """Learning rates used by ``n_steps`` optimizer steps under a real torch scheduler."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make_scheduler(opt)
        out = []
        for _ in range(n_steps):
            out.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            scheduler.step()
    return out


def evaluate(schedule: Schedule, n_steps: int) -> torch.Tensor:
    """The schedule at counts ``0 .. n_steps - 1`` (schedules are elementwise in the count)."""
    out = schedule(torch.arange(n_steps))
    assert out.shape == (n_steps,)
    assert out.dtype == torch.float64
    return out


def assert_matches(actual: torch.Tensor, expected: Sequence[float], rtol: float, atol: float = 0.0) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# parity with torch.optim.lr_scheduler
# --------------------------------------------------------------------------------------------------

LR = 0.1


def _one_cycle_case(
    total: int, pct: float, strategy: str, three: bool, div: float = 25.0, final_div: float = 1e4
) -> tuple[MakeScheduler, Schedule]:
    def make(o: torch.optim.Optimizer) -> Any:
        return lrs.OneCycleLR(
            o,
            max_lr=1.5,
            total_steps=total,
            pct_start=pct,
            anneal_strategy=strategy,  # type: ignore[arg-type]
            div_factor=div,
            final_div_factor=final_div,
            three_phase=three,
            cycle_momentum=False,
        )

    return make, S.one_cycle(1.5, total, pct, strategy, div, final_div, three)  # type: ignore[arg-type]


# id -> (torch scheduler factory, pureopt schedule). All use init lr LR.
TORCH_CASES: dict[str, tuple[MakeScheduler, Schedule]] = {
    # StepLR
    "step-7-0.9": (lambda o: lrs.StepLR(o, 7, 0.9), S.step_lr(LR, 7, 0.9)),
    "step-1-0.99": (lambda o: lrs.StepLR(o, 1, 0.99), S.step_lr(LR, 1, 0.99)),
    "step-300-default": (lambda o: lrs.StepLR(o, 300), S.step_lr(LR, 300)),
    "step-2000-0.5": (lambda o: lrs.StepLR(o, 2000, 0.5), S.step_lr(LR, 2000, 0.5)),
    # MultiStepLR (a repeated milestone multiplies twice)
    "multistep-dup": (
        lambda o: lrs.MultiStepLR(o, [10, 300, 300, 800], 0.5),
        S.multi_step_lr(LR, [10, 300, 300, 800], 0.5),
    ),
    "multistep-default": (lambda o: lrs.MultiStepLR(o, [0, 1, 999]), S.multi_step_lr(LR, [0, 1, 999])),
    "multistep-empty": (lambda o: lrs.MultiStepLR(o, [], 0.5), S.multi_step_lr(LR, [], 0.5)),
    "multistep-gamma2": (lambda o: lrs.MultiStepLR(o, [100, 200], 2.0), S.multi_step_lr(LR, [100, 200], 2.0)),
    # ExponentialLR
    "exp-0.99": (lambda o: lrs.ExponentialLR(o, 0.99), S.exponential_lr(LR, 0.99)),
    "exp-0.9": (lambda o: lrs.ExponentialLR(o, 0.9), S.exponential_lr(LR, 0.9)),
    "exp-1.001": (lambda o: lrs.ExponentialLR(o, 1.001), S.exponential_lr(LR, 1.001)),
    # CosineAnnealingLR, including T_max < 1000 (periodic continuation past T_max)
    "cos-10": (lambda o: lrs.CosineAnnealingLR(o, 10), S.cosine_annealing(LR, 10)),
    "cos-37-etamin": (lambda o: lrs.CosineAnnealingLR(o, 37, 1e-3), S.cosine_annealing(LR, 37, 1e-3)),
    "cos-300": (lambda o: lrs.CosineAnnealingLR(o, 300), S.cosine_annealing(LR, 300)),
    "cos-700-etamin": (lambda o: lrs.CosineAnnealingLR(o, 700, 1e-4), S.cosine_annealing(LR, 700, 1e-4)),
    "cos-999": (lambda o: lrs.CosineAnnealingLR(o, 999), S.cosine_annealing(LR, 999)),
    "cos-1000": (lambda o: lrs.CosineAnnealingLR(o, 1000), S.cosine_annealing(LR, 1000)),
    "cos-1": (lambda o: lrs.CosineAnnealingLR(o, 1), S.cosine_annealing(LR, 1)),
    "cos-2-etamin": (lambda o: lrs.CosineAnnealingLR(o, 2, 0.01), S.cosine_annealing(LR, 2, 0.01)),
    # CosineAnnealingWarmRestarts
    "cawr-10-1": (lambda o: lrs.CosineAnnealingWarmRestarts(o, 10), S.cosine_annealing_warm_restarts(LR, 10)),
    "cawr-1-1": (lambda o: lrs.CosineAnnealingWarmRestarts(o, 1), S.cosine_annealing_warm_restarts(LR, 1)),
    "cawr-7-2-etamin": (
        lambda o: lrs.CosineAnnealingWarmRestarts(o, 7, 2, 1e-3),
        S.cosine_annealing_warm_restarts(LR, 7, 2, 1e-3),
    ),
    "cawr-1-2": (lambda o: lrs.CosineAnnealingWarmRestarts(o, 1, 2), S.cosine_annealing_warm_restarts(LR, 1, 2)),
    "cawr-3-3": (lambda o: lrs.CosineAnnealingWarmRestarts(o, 3, 3), S.cosine_annealing_warm_restarts(LR, 3, 3)),
    "cawr-5-7": (lambda o: lrs.CosineAnnealingWarmRestarts(o, 5, 7), S.cosine_annealing_warm_restarts(LR, 5, 7)),
    "cawr-50-2": (
        lambda o: lrs.CosineAnnealingWarmRestarts(o, 50, 2, 1e-5),
        S.cosine_annealing_warm_restarts(LR, 50, 2, 1e-5),
    ),
    # LinearLR
    "linear-default": (lambda o: lrs.LinearLR(o), S.linear_lr(LR)),
    "linear-warmup-500": (lambda o: lrs.LinearLR(o, 0.1, 1.0, 500), S.linear_lr(LR, 0.1, 1.0, 500)),
    "linear-decay-999": (lambda o: lrs.LinearLR(o, 1.0, 0.01, 999), S.linear_lr(LR, 1.0, 0.01, 999)),
    "linear-to-zero-1000": (lambda o: lrs.LinearLR(o, 1.0, 0.0, 1000), S.linear_lr(LR, 1.0, 0.0, 1000)),
    "linear-flat": (lambda o: lrs.LinearLR(o, 0.5, 0.5, 10), S.linear_lr(LR, 0.5, 0.5, 10)),
    "linear-total0": (lambda o: lrs.LinearLR(o, 0.25, 1.0, 0), S.linear_lr(LR, 0.25, 1.0, 0)),
    # PolynomialLR
    "poly-default": (lambda o: lrs.PolynomialLR(o), S.polynomial_lr(LR)),
    "poly-500-2": (lambda o: lrs.PolynomialLR(o, 500, 2.0), S.polynomial_lr(LR, 500, 2.0)),
    "poly-999-0.5": (lambda o: lrs.PolynomialLR(o, 999, 0.5), S.polynomial_lr(LR, 999, 0.5)),
    "poly-1000-3": (lambda o: lrs.PolynomialLR(o, 1000, 3.0), S.polynomial_lr(LR, 1000, 3.0)),
    "poly-total0": (lambda o: lrs.PolynomialLR(o, 0), S.polynomial_lr(LR, 0)),
    # OneCycleLR (total_steps >= 1000: torch raises when stepped past total_steps)
    "onecycle-cos": _one_cycle_case(1000, 0.3, "cos", False),
    "onecycle-linear": _one_cycle_case(1234, 0.25, "linear", False, 10.0, 100.0),
    "onecycle-cos-3phase": _one_cycle_case(1000, 0.3, "cos", True),
    "onecycle-linear-3phase": _one_cycle_case(3000, 0.45, "linear", True, 5.0, 1e3),
    "onecycle-cos-pct0": _one_cycle_case(1001, 0.0, "cos", False),
    "onecycle-cos-pct1": _one_cycle_case(1200, 1.0, "cos", False),
    "onecycle-cos-3phase-pct0.5": _one_cycle_case(1000, 0.5, "cos", True),
    "cosine_onecycle": (
        lambda o: lrs.OneCycleLR(
            o, max_lr=2.0, total_steps=1500, pct_start=0.2, div_factor=20.0, final_div_factor=50.0, cycle_momentum=False
        ),
        S.cosine_onecycle(1500, 2.0, pct_start=0.2, div_factor=20.0, final_div_factor=50.0),
    ),
    # SequentialLR
    "seq-linear-exp": (
        lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.1, 1.0, 50), lrs.ExponentialLR(o, 0.995)], [50]),
        S.sequential([S.linear_lr(LR, 0.1, 1.0, 50), S.exponential_lr(LR, 0.995)], [50]),
    ),
    "seq-linear-cos": (
        lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.1, 1.0, 30), lrs.CosineAnnealingLR(o, 200, 1e-4)], [40]),
        S.sequential([S.linear_lr(LR, 0.1, 1.0, 30), S.cosine_annealing(LR, 200, 1e-4)], [40]),
    ),
    "seq-three": (
        lambda o: lrs.SequentialLR(
            o, [lrs.StepLR(o, 10, 0.5), lrs.MultiStepLR(o, [5, 50], 0.3), lrs.PolynomialLR(o, 400, 2.0)], [100, 300]
        ),
        S.sequential(
            [S.step_lr(LR, 10, 0.5), S.multi_step_lr(LR, [5, 50], 0.3), S.polynomial_lr(LR, 400, 2.0)], [100, 300]
        ),
    ),
    "seq-linear-warm-restarts": (
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, 0.5, 1.0, 10), lrs.CosineAnnealingWarmRestarts(o, 20, 2, 1e-4)], [10]
        ),
        S.sequential([S.linear_lr(LR, 0.5, 1.0, 10), S.cosine_annealing_warm_restarts(LR, 20, 2, 1e-4)], [10]),
    ),
    "seq-milestone0": (
        lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.5, 1.0, 10), lrs.ExponentialLR(o, 0.99)], [0]),
        S.sequential([S.linear_lr(LR, 0.5, 1.0, 10), S.exponential_lr(LR, 0.99)], [0]),
    ),
}

_REFERENCE_CACHE: dict[str, list[float]] = {}


def torch_reference(case: str) -> list[float]:
    if case not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[case] = torch_lrs(TORCH_CASES[case][0], LR)
    return _REFERENCE_CACHE[case]


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_matches_torch_scheduler(case: str) -> None:
    expected = torch_reference(case)
    assert_matches(evaluate(TORCH_CASES[case][1], N_STEPS), expected, rtol=RTOL_TORCH)


@pytest.mark.parametrize("case", ["step-7-0.9", "cos-37-etamin", "cawr-7-2-etamin", "onecycle-cos", "seq-three"])
def test_scalar_counts_match_torch(case: str) -> None:
    expected = torch_reference(case)
    schedule = TORCH_CASES[case][1]
    for k in (0, 1, 6, 7, 36, 37, 123, 500, 999):
        for count in (k, torch.tensor(k), torch.tensor(k, dtype=torch.int32), torch.tensor(float(k))):
            value = schedule(count)
            assert value.shape == () and value.dtype == torch.float64 and value.device.type == "cpu"
            assert math.isclose(value.item(), expected[k], rel_tol=RTOL_TORCH, abs_tol=0.0), (case, k, count)


@pytest.mark.parametrize(
    ("total", "pct", "three"),
    [
        (10, 0.3, False),
        (10, 0.3, True),
        (7, 0.5, False),
        (7, 0.5, True),
        (3, 0.3, False),
        (2, 0.3, True),
        (1, 0.3, False),
    ],
)
def test_one_cycle_short_cycles_match_torch(total: int, pct: float, three: bool) -> None:
    """Short cycles (total_steps < 1000) where phase ends are fractional or negative; driven for total_steps."""
    make, schedule = _one_cycle_case(total, pct, "cos", three)
    expected = torch_lrs(make, LR, n_steps=total)
    assert_matches(evaluate(schedule, total), expected, rtol=RTOL_TORCH)
    # past the cycle the schedule stays at min_lr = max_lr / div_factor / final_div_factor
    assert schedule(total + 5).item() == pytest.approx(1.5 / 25.0 / 1e4, rel=1e-14)


def _warm_restarts_reference(count: int, lr: float, t_0: int, t_mult: int, eta_min: float) -> float:
    """Exact integer bookkeeping of the restarts, as torch's step() does it."""
    t_cur, t_i = count, t_0
    while t_cur >= t_i:
        t_cur -= t_i
        t_i *= t_mult
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


@pytest.mark.parametrize(("t_0", "t_mult"), [(1, 2), (3, 2), (10, 3), (7, 5), (1, 10)])
def test_warm_restarts_exact_at_restarts_far_out(t_0: int, t_mult: int) -> None:
    """The log-based cycle index is corrected at every restart, for counts up to ~2**52.

    Exactness needs the cycle starts and lengths to be float64 integers, i.e. the length of the
    cycle after the current one below 2**53.
    """
    counts = []
    start, length = 0, t_0
    while length * t_mult < 2**53:
        counts += [c for c in (start - 1, start, start + 1, start + length // 2) if c >= 0]
        start, length = start + length, length * t_mult
    schedule = S.cosine_annealing_warm_restarts(1.0, t_0, t_mult, 0.01)
    actual = schedule(torch.tensor(counts))
    expected = [_warm_restarts_reference(c, 1.0, t_0, t_mult, 0.01) for c in counts]
    assert_matches(actual, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# optax-style schedules against their formulas
# --------------------------------------------------------------------------------------------------

COUNTS = [*list(range(0, 300)), 499, 500, 501, 999, 1000, 10**6]


def _check_formula(schedule: Schedule, formula: Callable[[int], float]) -> None:
    assert_matches(schedule(torch.tensor(COUNTS)), [formula(c) for c in COUNTS], RTOL_FORMULA, ATOL_FORMULA)


@pytest.mark.parametrize("value", [0.0, 0.1, -3.5, 1e-8])
def test_constant(value: float) -> None:
    _check_formula(S.constant(value), lambda c: value)


@pytest.mark.parametrize(
    ("init", "end", "power", "steps", "begin"),
    [
        (1.0, 0.0, 1.0, 100, 0),
        (0.0, 2.0, 1.0, 37, 20),
        (1.0, 0.1, 2.0, 250, 0),
        (0.5, 1e-3, 0.5, 10, 5),
        (3.0, 1.0, 0.0, 5, 0),
    ],
)
def test_polynomial_and_linear(init: float, end: float, power: float, steps: int, begin: int) -> None:
    def formula(c: int) -> float:
        t = min(max(c - begin, 0), steps)
        return (init - end) * (1 - t / steps) ** power + end

    _check_formula(S.polynomial(init, end, power, steps, begin), formula)
    if power == 1.0:

        def linear_formula(c: int) -> float:
            return init + (end - init) * min(max(c - begin, 0), steps) / steps

        _check_formula(S.linear(init, end, steps, begin), linear_formula)


def test_zero_transition_steps_is_constant_like_optax() -> None:
    _check_formula(S.linear(0.3, 1.0, 0), lambda c: 0.3)
    _check_formula(S.polynomial(0.3, 1.0, 2.0, 0, transition_begin=4), lambda c: 0.3)
    _check_formula(S.exponential_decay(0.3, 0, 0.5), lambda c: 0.3)


@pytest.mark.parametrize(
    ("init", "steps", "rate", "begin", "staircase", "end"),
    [
        (1.0, 10, 0.5, 0, False, None),
        (1.0, 10, 0.5, 0, True, None),
        (0.1, 7, 0.9, 13, True, 0.01),
        (0.1, 100, 0.3, 5, False, 0.05),
        (1e-3, 20, 1.5, 3, False, 5e-3),
        (1e-3, 20, 2.0, 0, True, None),
    ],
)
def test_exponential_decay(
    init: float, steps: int, rate: float, begin: int, staircase: bool, end: float | None
) -> None:
    def formula(c: int) -> float:
        t = c - begin
        if t <= 0:
            value = init
        else:
            p = math.floor(t / steps) if staircase else t / steps
            try:
                value = init * rate**p
            except OverflowError:  # IEEE overflow, as torch computes it
                value = math.inf
        if end is not None:
            value = max(value, end) if rate < 1 else min(value, end)
        return value

    _check_formula(S.exponential_decay(init, steps, rate, begin, staircase, end), formula)


@pytest.mark.parametrize(
    ("init", "steps", "alpha", "exponent"), [(1.0, 100, 0.0, 1.0), (0.1, 37, 0.1, 1.0), (2.0, 500, 0.01, 2.0)]
)
def test_cosine_decay(init: float, steps: int, alpha: float, exponent: float) -> None:
    def formula(c: int) -> float:
        t = min(c, steps)
        return init * ((1 - alpha) * (0.5 * (1 + math.cos(math.pi * t / steps))) ** exponent + alpha)

    _check_formula(S.cosine_decay(init, steps, alpha, exponent), formula)


def _warmup_cosine_formula(
    c: int, init: float, peak: float, warmup: int, decay_steps: int, end: float, exponent: float
) -> float:
    if c < warmup:
        return init + (peak - init) * c / warmup
    t = min(c - warmup, decay_steps - warmup)
    cos = 0.5 * (1 + math.cos(math.pi * t / (decay_steps - warmup)))
    return end + (peak - end) * cos**exponent


@pytest.mark.parametrize(
    ("init", "peak", "warmup", "decay_steps", "end", "exponent"),
    [
        (0.0, 1.0, 10, 100, 0.0, 1.0),
        (1e-4, 0.1, 50, 500, 1e-3, 1.0),
        (0.0, 0.5, 0, 200, 0.01, 2.0),
        (0.2, 0.3, 99, 100, 0.1, 1.0),
    ],
)
def test_warmup_cosine_decay(
    init: float, peak: float, warmup: int, decay_steps: int, end: float, exponent: float
) -> None:
    _check_formula(
        S.warmup_cosine_decay(init, peak, warmup, decay_steps, end, exponent),
        lambda c: _warmup_cosine_formula(c, init, peak, warmup, decay_steps, end, exponent),
    )


@pytest.mark.parametrize(
    ("init", "boundaries_and_scales"),
    [(1.0, {10: 0.5, 20: 0.5}), (0.1, {100: 0.1, 5: 3.0, 250: 0.0}), (2.0, {}), (2.0, None), (1.0, {0: 0.25})],
)
def test_piecewise_constant(init: float, boundaries_and_scales: dict[int, float] | None) -> None:
    def formula(c: int) -> float:
        value = init
        for boundary, scale in sorted((boundaries_and_scales or {}).items()):
            if c >= boundary:
                value *= scale
        return value

    _check_formula(S.piecewise_constant(init, boundaries_and_scales), formula)


@pytest.mark.parametrize(
    ("steps", "peak", "pct_start", "pct_final", "div", "final_div"),
    [
        (100, 1.0, 0.3, 0.85, 25.0, 1e4),
        (250, 0.1, 0.25, 0.75, 10.0, 100.0),
        (7, 2.0, 0.3, 0.85, 25.0, 1e4),
        (1000, 0.5, 0.1, 0.9, 5.0, 10.0),
    ],
)
def test_linear_onecycle(
    steps: int, peak: float, pct_start: float, pct_final: float, div: float, final_div: float
) -> None:
    init = peak / div
    a, b = int(pct_start * steps), int(pct_final * steps)

    def formula(c: int) -> float:
        if c < a:
            return init + (peak - init) * c / a
        if c < b:
            return peak + (init - peak) * (c - a) / (b - a)
        if c < steps:
            return init + (init / final_div - init) * (c - b) / (steps - b)
        return init / final_div

    _check_formula(S.linear_onecycle(steps, peak, pct_start, pct_final, div, final_div), formula)


def test_join_schedules() -> None:
    schedule = S.join_schedules([S.constant(1.0), S.linear(1.0, 0.0, 100), S.exponential_lr(0.5, 0.99)], [10, 60])

    def formula(c: int) -> float:
        if c < 10:
            return 1.0
        if c < 60:
            return 1.0 - (c - 10) / 100
        return 0.5 * 0.99 ** (c - 60)

    _check_formula(schedule, formula)


def test_join_schedules_equal_boundaries_skip_a_schedule() -> None:
    schedule = S.join_schedules([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [5, 5])
    _check_formula(schedule, lambda c: 1.0 if c < 5 else 3.0)


def test_sgdr() -> None:
    cycles = [
        dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=100),
        dict(init_value=0.01, peak_value=0.5, warmup_steps=0, decay_steps=50, end_value=0.001),
        dict(init_value=0.0, peak_value=0.25, warmup_steps=20, decay_steps=200, exponent=2.0),
    ]

    def formula(c: int) -> float:
        start = 0
        for i, cyc in enumerate(cycles):
            if c < start + int(cyc["decay_steps"]) or i == len(cycles) - 1:
                return _warmup_cosine_formula(
                    c - start,
                    float(cyc["init_value"]),
                    float(cyc["peak_value"]),
                    int(cyc["warmup_steps"]),
                    int(cyc["decay_steps"]),
                    float(cyc.get("end_value", 0.0)),
                    float(cyc.get("exponent", 1.0)),
                )
            start += int(cyc["decay_steps"])
        raise AssertionError

    _check_formula(S.sgdr(cycles), formula)


def test_docstring_examples() -> None:
    result = doctest.testmod(S, verbose=False)
    assert result.attempted > 20
    assert result.failed == 0


# --------------------------------------------------------------------------------------------------
# compile, vmap, input types
# --------------------------------------------------------------------------------------------------

ALL_SCHEDULES: dict[str, Schedule] = {
    "constant": S.constant(0.1),
    "linear": S.linear(0.0, 1.0, 100, 5),
    "polynomial": S.polynomial(1.0, 0.0, 2.0, 100, 5),
    "exponential_decay": S.exponential_decay(1.0, 10, 0.5, 3, True, 0.01),
    "cosine_decay": S.cosine_decay(1.0, 100, 0.1, 2.0),
    "warmup_cosine_decay": S.warmup_cosine_decay(0.0, 1.0, 10, 100, 0.01, 2.0),
    "piecewise_constant": S.piecewise_constant(1.0, {10: 0.5, 20: 0.1}),
    "linear_onecycle": S.linear_onecycle(100, 1.0),
    "cosine_onecycle": S.cosine_onecycle(100, 1.0),
    "sgdr": S.sgdr([dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10)] * 3),
    "join_schedules": S.join_schedules([S.constant(1.0), S.cosine_decay(1.0, 10)], [5]),
    "step_lr": S.step_lr(1.0, 7),
    "multi_step_lr": S.multi_step_lr(1.0, [3, 9]),
    "exponential_lr": S.exponential_lr(1.0, 0.9),
    "cosine_annealing": S.cosine_annealing(1.0, 10),
    "cosine_annealing_warm_restarts": S.cosine_annealing_warm_restarts(1.0, 5, 1),
    "cosine_annealing_warm_restarts_mult": S.cosine_annealing_warm_restarts(1.0, 5, 2),
    "linear_lr": S.linear_lr(1.0),
    "polynomial_lr": S.polynomial_lr(1.0),
    "one_cycle_linear_3phase": S.one_cycle(1.0, 100, anneal_strategy="linear", three_phase=True),
    "sequential": S.sequential([S.linear_lr(1.0), S.exponential_lr(1.0, 0.9)], [5]),
}


def test_every_public_schedule_is_covered() -> None:
    public = [name for name in S.__all__ if name not in ("Schedule", "ScalarOrSchedule")]
    missing = [name for name in public if not any(k == name or k.startswith(name + "_") for k in ALL_SCHEDULES)]
    assert not missing


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_compile_fullgraph_no_recompile(name: str) -> None:
    schedule = ALL_SCHEDULES[name]
    counts = [0, 3, 4, 17, 250, 999, 123456]
    # eager reference computed from Python ints, before compiling
    expected = [schedule(k).item() for k in counts]
    torch._dynamo.reset()
    counters.clear()

    def step(count: torch.Tensor) -> torch.Tensor:
        return schedule(count) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [compiled(torch.tensor(k)).item() for k in counts]
    assert got == [2.0 * e for e in expected]
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["recompiles"]
    torch._dynamo.reset()


def test_vmap_over_counts_matches_torch() -> None:
    counts = torch.arange(N_STEPS)
    for case in ("cawr-7-2-etamin", "onecycle-cos-3phase", "seq-linear-cos"):
        actual = torch.func.vmap(TORCH_CASES[case][1])(counts)
        assert_matches(actual, torch_reference(case), rtol=RTOL_TORCH)


def test_python_int_and_tensor_inputs() -> None:
    schedule = S.warmup_cosine_decay(0.0, 1.0, 10, 110)
    expected = _warmup_cosine_formula(60, 0.0, 1.0, 10, 110, 0.0, 1.0)
    for count in (60, torch.tensor(60), torch.tensor(60, dtype=torch.int32), torch.tensor(60.0, dtype=torch.float32)):
        value = schedule(count)
        assert isinstance(value, torch.Tensor)
        assert value.shape == () and value.dtype == torch.float64 and value.device == torch.device("cpu")
        assert value.item() == pytest.approx(expected, rel=1e-14)
    # the count is not modified and the result does not alias it
    count = torch.tensor(60.0, dtype=torch.float64)
    out = S.constant(0.5)(count)
    out.add_(1.0)
    assert count.item() == 60.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_result_on_count_device() -> None:
    for name, schedule in ALL_SCHEDULES.items():
        value = schedule(torch.tensor(42, device="cuda"))
        assert value.device.type == "cuda" and value.dtype == torch.float64, name
        assert value.item() == pytest.approx(schedule(42).item(), rel=1e-12), name


# --------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[Callable[[], object], str]] = [
    (lambda: S.constant("0.1"), "value"),  # type: ignore[arg-type]
    (lambda: S.linear(1.0, 0.0, -1), "transition_steps"),
    (lambda: S.linear(1.0, 0.0, 10, -2), "transition_begin"),
    (lambda: S.linear(1.0, 0.0, 10.5), "transition_steps"),  # type: ignore[arg-type]
    (lambda: S.polynomial(1.0, 0.0, -1.0, 10), "power"),
    (lambda: S.polynomial(float("nan"), 0.0, 1.0, 10), "init_value"),
    (lambda: S.exponential_decay(1.0, -5, 0.5), "transition_steps"),
    (lambda: S.exponential_decay(1.0, 5, 0.0), "decay_rate"),
    (lambda: S.cosine_decay(1.0, 0), "decay_steps"),
    (lambda: S.warmup_cosine_decay(0.0, 1.0, 10, 10), "decay_steps"),
    (lambda: S.warmup_cosine_decay(0.0, 1.0, -1, 10), "warmup_steps"),
    (lambda: S.piecewise_constant(1.0, {10: -0.5}), "boundaries_and_scales"),
    (lambda: S.linear_onecycle(0, 1.0), "transition_steps"),
    (lambda: S.linear_onecycle(100, 1.0, pct_start=0.9, pct_final=0.5), "pct_start"),
    (lambda: S.linear_onecycle(100, 1.0, div_factor=0.0), "div_factor"),
    (lambda: S.cosine_onecycle(-3, 1.0), "transition_steps"),
    (lambda: S.sgdr([]), "cycles"),
    (lambda: S.sgdr([dict(init_value=0.0, peak_value=1.0, warmup_steps=2)]), "decay_steps"),
    (lambda: S.join_schedules([], []), "schedules"),
    (lambda: S.join_schedules([S.constant(1.0), S.constant(2.0)], []), "boundaries"),
    (lambda: S.join_schedules([S.constant(1.0)] * 3, [10, 5]), "boundaries"),
    (lambda: S.join_schedules([S.constant(1.0), 2.0], [10]), "schedules"),  # type: ignore[list-item]
    (lambda: S.step_lr(1.0, 0), "step_size"),
    (lambda: S.multi_step_lr(1.0, [10, 5]), "milestones"),
    (lambda: S.exponential_lr(1.0, float("inf")), "gamma"),
    (lambda: S.cosine_annealing(1.0, 0), "T_max"),
    (lambda: S.cosine_annealing_warm_restarts(1.0, 0), "T_0"),
    (lambda: S.cosine_annealing_warm_restarts(1.0, 10, 0), "T_mult"),
    (lambda: S.cosine_annealing_warm_restarts(1.0, 10, 1.5), "T_mult"),  # type: ignore[arg-type]
    (lambda: S.linear_lr(1.0, start_factor=0.0), "start_factor"),
    (lambda: S.linear_lr(1.0, end_factor=1.5), "end_factor"),
    (lambda: S.linear_lr(1.0, total_iters=-1), "total_iters"),
    (lambda: S.polynomial_lr(1.0, total_iters=-1), "total_iters"),
    (lambda: S.polynomial_lr(1.0, power=-1.0), "power"),
    (lambda: S.one_cycle(1.0, 0), "total_steps"),
    (lambda: S.one_cycle(1.0, 100, pct_start=1.5), "pct_start"),
    (lambda: S.one_cycle(1.0, 100, anneal_strategy="exp"), "anneal_strategy"),  # type: ignore[arg-type]
    (lambda: S.sequential([S.constant(1.0)], [3]), "milestones"),
    (lambda: S.sequential([S.constant(1.0)] * 3, [30, 20]), "milestones"),
    (lambda: S.sequential([], []), "schedules"),
]


@pytest.mark.parametrize(
    ("make", "argument"), BAD_ARGUMENTS, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_arguments(make: Callable[[], object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make()
