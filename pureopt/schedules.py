"""Learning-rate and hyperparameter schedules as pure functions of the step count.

A *schedule* is a callable ``schedule(count) -> Tensor``. ``count`` is the number of updates
done so far: a Python ``int`` or an integer/floating tensor, as kept in an optimizer state. The
result is a floating tensor with the shape of ``count`` (0-d for a scalar count) on the count's
device (CPU for Python ints), computed in ``float64`` (``float32`` on Apple ``mps`` devices, which
have no ``float64``).

Every schedule is built only from elementwise tensor operations (``torch.where``, ``clamp``,
``cos``, ``pow`` ...). There is no Python branching on the count and no host synchronisation, so
schedules

* can be called inside ``torch.compile(..., fullgraph=True)`` without graph breaks and without
  recompiling when the count changes;
* work under ``torch.func.vmap`` over a batch of counts, and also directly on a 1-D tensor of
  counts (the result then has one value per count).

Python-level decisions are only taken on the hyperparameters given at construction time, which
are validated eagerly (``ValueError`` naming the offending argument).

Two families are provided:

* optax-style schedules (same names and arguments as ``optax.schedules``, without the
  ``_schedule`` suffix): :func:`constant`, :func:`linear`, :func:`polynomial`,
  :func:`exponential_decay`, :func:`cosine_decay`, :func:`warmup_cosine_decay`,
  :func:`piecewise_constant`, :func:`linear_onecycle`, :func:`cosine_onecycle`, :func:`sgdr`,
  :func:`join_schedules`;
* closed forms of the ``torch.optim.lr_scheduler`` classes, evaluated at ``count`` =
  the scheduler's ``last_epoch`` (i.e. the learning rate used by the ``count``-th
  ``optimizer.step()``, counting from 0): :func:`step_lr`, :func:`multi_step_lr`,
  :func:`exponential_lr`, :func:`cosine_annealing`, :func:`cosine_annealing_warm_restarts`,
  :func:`linear_lr`, :func:`polynomial_lr`, :func:`one_cycle`, :func:`sequential`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "constant",
    "linear",
    "polynomial",
    "exponential_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "piecewise_constant",
    "linear_onecycle",
    "cosine_onecycle",
    "sgdr",
    "join_schedules",
    "step_lr",
    "multi_step_lr",
    "exponential_lr",
    "cosine_annealing",
    "cosine_annealing_warm_restarts",
    "linear_lr",
    "polynomial_lr",
    "one_cycle",
    "sequential",
]

Schedule = Callable[[torch.Tensor | int], torch.Tensor]
"""A function of the step count returning a floating tensor."""

ScalarOrSchedule = float | torch.Tensor | Schedule
"""A hyperparameter given either as a fixed value or as a :data:`Schedule`."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _to_float_count(count: torch.Tensor | int) -> torch.Tensor:
    """Return ``count`` as a floating tensor (float64, or float32 on mps) on the count's device."""
    if isinstance(count, torch.Tensor):
        dtype = torch.float32 if count.device.type == "mps" else torch.float64
        return count.to(dtype)
    return torch.as_tensor(count, dtype=torch.float64)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return out


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {out}")
    return out


def _check_non_decreasing(name: str, values: Sequence[float]) -> None:
    for a, b in itertools.pairwise(values):
        if b < a:
            raise ValueError(f"`{name}` must be non-decreasing, got {list(values)!r}")


def _piecewise_constant(c: torch.Tensor, boundaries: Sequence[float], values: Sequence[float]) -> torch.Tensor:
    """``values[k]`` where ``k`` is the number of ``boundaries`` that are ``<= c``."""
    out = torch.full_like(c, values[0])
    for boundary, value in zip(boundaries, values[1:]):
        out = torch.where(c >= boundary, value, out)
    return out


def _piecewise_linear(c: torch.Tensor, knots: Sequence[float], values: Sequence[float]) -> torch.Tensor:
    """Linear interpolation through ``(knots[k], values[k])``, constant outside the knots.

    ``knots`` must be non-decreasing; zero-width segments are jumps (the right value is taken at
    the knot).
    """
    out = torch.full_like(c, values[-1])
    for k in range(len(knots) - 2, -1, -1):
        x0, x1, v0, v1 = knots[k], knots[k + 1], values[k], values[k + 1]
        if x1 <= x0:
            continue
        segment = (v1 - v0) * ((c - x0) / (x1 - x0)) + v0
        out = torch.where(c < x1, segment, out)
    return torch.where(c < knots[0], values[0], out)


# --------------------------------------------------------------------------------------------------
# optax-style schedules
# --------------------------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """Constant schedule: ``value`` at every step.

    Args:
        value: the value returned for every count.

    Example:
        >>> float(constant(0.1)(1000))
        0.1
    """
    v = _check_real("value", value)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return torch.full_like(_to_float_count(count), v)

    return schedule


def polynomial(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value`` (optax ``polynomial_schedule``).

    Formula, with ``t = clip(count - transition_begin, 0, transition_steps)``::

        (init_value - end_value) * (1 - t / transition_steps) ** power + end_value

    The value is ``init_value`` before ``transition_begin`` and ``end_value`` from
    ``transition_begin + transition_steps`` on. As in optax, ``transition_steps == 0`` gives the
    constant schedule ``init_value``.

    Args:
        init_value: value at the start of the transition.
        end_value: value at and after the end of the transition.
        power: exponent of the polynomial (``>= 0``; 1 is linear).
        transition_steps: length of the transition in steps (``>= 0``).
        transition_begin: number of steps the schedule stays at ``init_value`` first (``>= 0``).

    Example:
        >>> sched = polynomial(1.0, 0.0, power=2.0, transition_steps=10)
        >>> float(sched(5))
        0.25
    """
    init = _check_real("init_value", init_value)
    end = _check_real("end_value", end_value)
    p = _check_real("power", power)
    if p < 0:
        raise ValueError(f"`power` must be >= 0, got {power!r}")
    steps = _check_int("transition_steps", transition_steps, minimum=0)
    begin = _check_int("transition_begin", transition_begin, minimum=0)
    if steps == 0:
        return constant(init)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_to_float_count(count) - begin, 0.0, float(steps))
        frac = 1.0 - t / steps
        return (init - end) * torch.pow(frac, p) + end

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value`` (optax ``linear_schedule``).

    Formula, with ``t = clip(count - transition_begin, 0, transition_steps)``::

        init_value + (end_value - init_value) * t / transition_steps

    (evaluated as :func:`polynomial` with ``power=1``). ``transition_steps == 0`` gives the
    constant schedule ``init_value``, as in optax.

    Args:
        init_value: value up to ``transition_begin``.
        end_value: value from ``transition_begin + transition_steps`` on.
        transition_steps: length of the transition in steps (``>= 0``).
        transition_begin: number of steps spent at ``init_value`` first (``>= 0``).

    Example:
        >>> sched = linear(0.0, 1.0, transition_steps=4)
        >>> [float(sched(i)) for i in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return polynomial(init_value, end_value, 1.0, transition_steps, transition_begin)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay (optax ``exponential_decay``).

    Formula, with ``t = count - transition_begin``::

        init_value                                         if t <= 0
        init_value * decay_rate ** (t / transition_steps)  otherwise

    With ``staircase=True`` the exponent is floored. If ``end_value`` is given the result is
    clipped to it: from below when ``decay_rate < 1``, from above otherwise.
    ``transition_steps == 0`` gives the constant schedule ``init_value``, as in optax.

    Args:
        init_value: initial value.
        transition_steps: number of steps over which the value is multiplied by ``decay_rate``
            (``>= 0``).
        decay_rate: decay factor per ``transition_steps`` (``> 0``).
        transition_begin: number of steps spent at ``init_value`` first (``>= 0``).
        staircase: decay in discrete jumps every ``transition_steps`` steps.
        end_value: optional bound on the value.

    Example:
        >>> sched = exponential_decay(1.0, transition_steps=10, decay_rate=0.5)
        >>> float(sched(20))
        0.25
    """
    init = _check_real("init_value", init_value)
    steps = _check_int("transition_steps", transition_steps, minimum=0)
    rate = _check_real("decay_rate", decay_rate)
    if rate <= 0:
        raise ValueError(f"`decay_rate` must be > 0, got {decay_rate!r}")
    begin = _check_int("transition_begin", transition_begin, minimum=0)
    end = None if end_value is None else _check_real("end_value", end_value)
    if steps == 0:
        return constant(init)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = _to_float_count(count) - begin
        p = t / steps
        if staircase:
            p = torch.floor(p)
        value = torch.where(t <= 0, init, init * torch.pow(rate, p))
        if end is not None:
            value = torch.clamp(value, min=end) if rate < 1.0 else torch.clamp(value, max=end)
        return value

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` (optax ``cosine_decay_schedule``).

    Formula, with ``t = clip(count, 0, decay_steps)``::

        init_value * ((1 - alpha) * (0.5 * (1 + cos(pi * t / decay_steps))) ** exponent + alpha)

    The value stays at ``alpha * init_value`` after ``decay_steps`` (unlike
    :func:`cosine_annealing`, which follows torch and keeps oscillating).

    Args:
        init_value: value at step 0.
        decay_steps: number of steps to decay over (``> 0``).
        alpha: final value as a fraction of ``init_value``.
        exponent: exponent applied to the cosine factor.

    Example:
        >>> sched = cosine_decay(1.0, decay_steps=10)
        >>> round(float(sched(5)), 12), float(sched(10)), float(sched(50))
        (0.5, 0.0, 0.0)
    """
    init = _check_real("init_value", init_value)
    steps = _check_int("decay_steps", decay_steps, minimum=1)
    a = _check_real("alpha", alpha)
    e = _check_real("exponent", exponent)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_to_float_count(count), 0.0, float(steps))
        cos_factor = 0.5 * (1.0 + torch.cos(math.pi * t / steps))
        return init * ((1.0 - a) * torch.pow(cos_factor, e) + a)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Chain schedules at given boundaries (optax ``join_schedules``).

    ``schedules[0]`` is used for ``count < boundaries[0]``; ``schedules[i]`` is used for
    ``boundaries[i-1] <= count < boundaries[i]`` and receives ``count - boundaries[i-1]``, so each
    schedule restarts from its own step 0.

    Args:
        schedules: ``n >= 1`` schedules.
        boundaries: ``n - 1`` non-decreasing step counts.

    Example:
        >>> sched = join_schedules([constant(1.0), linear(1.0, 0.0, 10)], boundaries=[5])
        >>> float(sched(4)), float(sched(10))
        (1.0, 0.5)
    """
    scheds = list(schedules)
    bounds = [_check_int("boundaries", b) for b in boundaries]
    if not scheds:
        raise ValueError("`schedules` must contain at least one schedule")
    for i, s in enumerate(scheds):
        if not callable(s):
            raise ValueError(f"`schedules[{i}]` must be callable, got {s!r}")
    if len(bounds) != len(scheds) - 1:
        raise ValueError(f"`boundaries` must have len(schedules) - 1 = {len(scheds) - 1} entries, got {len(bounds)}")
    _check_non_decreasing("boundaries", bounds)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _to_float_count(count)
        out = scheds[0](c)
        for boundary, s in zip(bounds, scheds[1:]):
            out = torch.where(c < boundary, out, s(c - boundary))
        return out

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup followed by cosine decay (optax ``warmup_cosine_decay_schedule``).

    Formula::

        count < warmup_steps:  init_value + (peak_value - init_value) * count / warmup_steps
        otherwise:             cosine_decay(peak_value, decay_steps - warmup_steps,
                                            alpha=end_value / peak_value, exponent)
                               evaluated at count - warmup_steps

    ``decay_steps`` includes the warmup; the value stays at ``end_value`` after ``decay_steps``.
    As in optax, ``alpha`` is 0 when ``peak_value == 0``.

    Args:
        init_value: value at step 0.
        peak_value: value reached at the end of the warmup.
        warmup_steps: warmup length (``>= 0``).
        decay_steps: total length of warmup plus decay (``> warmup_steps``).
        end_value: final value.
        exponent: exponent applied to the cosine factor.

    Example:
        >>> sched = warmup_cosine_decay(0.0, 1.0, warmup_steps=10, decay_steps=30)
        >>> float(sched(5)), float(sched(10)), round(float(sched(20)), 12), float(sched(30))
        (0.5, 1.0, 0.5, 0.0)
    """
    init = _check_real("init_value", init_value)
    peak = _check_real("peak_value", peak_value)
    warmup = _check_int("warmup_steps", warmup_steps, minimum=0)
    total = _check_int("decay_steps", decay_steps)
    end = _check_real("end_value", end_value)
    if total <= warmup:
        raise ValueError(
            f"`decay_steps` must be greater than `warmup_steps` (it includes the warmup), "
            f"got decay_steps={total}, warmup_steps={warmup}"
        )
    alpha = 0.0 if peak == 0.0 else end / peak
    return join_schedules(
        [linear(init, peak, warmup), cosine_decay(peak, total - warmup, alpha, exponent)],
        [warmup],
    )


def piecewise_constant(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Piecewise constant schedule (optax ``piecewise_constant_schedule``).

    Starts at ``init_value``; whenever ``count`` reaches a boundary ``b`` (``count >= b``), the
    value is multiplied by ``boundaries_and_scales[b]``. So with boundaries ``b_1 < ... < b_n``::

        init_value * prod(scale_i for b_i <= count)

    Args:
        init_value: value before the first boundary.
        boundaries_and_scales: mapping from step count to a non-negative multiplicative factor.

    Example:
        >>> sched = piecewise_constant(1.0, {10: 0.5, 20: 0.5})
        >>> float(sched(9)), float(sched(10)), float(sched(25))
        (1.0, 0.5, 0.25)
    """
    init = _check_real("init_value", init_value)
    items = sorted((boundaries_and_scales or {}).items())
    values = [init]
    for boundary, scale in items:
        _check_real("boundaries_and_scales (boundary)", boundary)
        s = _check_real("boundaries_and_scales (scale)", scale)
        if s < 0:
            raise ValueError(f"`boundaries_and_scales` scales must be >= 0, got {scale!r} at {boundary!r}")
        values.append(values[-1] * s)
    bounds = [float(b) for b, _ in items]

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return _piecewise_constant(_to_float_count(count), bounds, values)

    return schedule


def linear_onecycle(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """Linear one-cycle schedule (optax ``linear_onecycle_schedule``).

    Piecewise linear through the points (``a = int(pct_start * transition_steps)``,
    ``b = int(pct_final * transition_steps)``, ``init = peak_value / div_factor``)::

        (0, init) -> (a, peak_value) -> (b, init) -> (transition_steps, init / final_div_factor)

    and constant at ``init / final_div_factor`` afterwards.

    Args:
        transition_steps: total length of the cycle (``> 0``).
        peak_value: maximum value, reached at step ``a``.
        pct_start: fraction of the cycle spent increasing.
        pct_final: fraction of the cycle at which the value is back at ``init``
            (``0 <= pct_start <= pct_final <= 1``).
        div_factor: ``init = peak_value / div_factor``.
        final_div_factor: final value is ``init / final_div_factor``.

    Example:
        >>> sched = linear_onecycle(100, peak_value=1.0, div_factor=10.0)
        >>> float(sched(0)), float(sched(30)), float(sched(85))
        (0.1, 1.0, 0.1)
    """
    steps = _check_int("transition_steps", transition_steps, minimum=1)
    peak = _check_real("peak_value", peak_value)
    ps = _check_real("pct_start", pct_start)
    pf = _check_real("pct_final", pct_final)
    if not 0.0 <= ps <= pf <= 1.0:
        raise ValueError(f"`pct_start` and `pct_final` must satisfy 0 <= pct_start <= pct_final <= 1, got {ps}, {pf}")
    div = _check_real("div_factor", div_factor)
    final_div = _check_real("final_div_factor", final_div_factor)
    if div <= 0:
        raise ValueError(f"`div_factor` must be > 0, got {div_factor!r}")
    if final_div <= 0:
        raise ValueError(f"`final_div_factor` must be > 0, got {final_div_factor!r}")
    init = peak / div
    knots = [0.0, float(int(ps * steps)), float(int(pf * steps)), float(steps)]
    values = [init, peak, init, init / final_div]

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return _piecewise_linear(_to_float_count(count), knots, values)

    return schedule


def sgdr(cycles: Sequence[Mapping[str, Any]]) -> Schedule:
    """SGDR: warm restarts made of :func:`warmup_cosine_decay` cycles (optax ``sgdr_schedule``).

    Cycle ``i`` is ``warmup_cosine_decay(**cycles[i])``; it starts at the sum of the
    ``decay_steps`` of the previous cycles. The last cycle holds its final value forever.

    Args:
        cycles: keyword-argument dicts for :func:`warmup_cosine_decay` (each must have
            ``decay_steps``).

    Example:
        >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10)
        >>> sched = sgdr([cycle, cycle])
        >>> float(sched(2)), float(sched(11)), float(sched(12))
        (1.0, 0.5, 1.0)
    """
    if not cycles:
        raise ValueError("`cycles` must contain at least one cycle")
    schedules: list[Schedule] = []
    boundaries: list[int] = []
    start = 0
    for i, kwargs in enumerate(cycles):
        if "decay_steps" not in kwargs:
            raise ValueError(f"`cycles[{i}]` must have a 'decay_steps' entry")
        schedules.append(warmup_cosine_decay(**kwargs))
        start += int(kwargs["decay_steps"])
        boundaries.append(start)
    return join_schedules(schedules, boundaries[:-1])


# --------------------------------------------------------------------------------------------------
# torch.optim.lr_scheduler closed forms
# --------------------------------------------------------------------------------------------------


def step_lr(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.StepLR``.

    Formula: ``init_value * gamma ** floor(count / step_size)``.

    Args:
        init_value: initial learning rate (the optimizer's ``lr``).
        step_size: period of the decay in steps (``> 0``).
        gamma: multiplicative factor applied every ``step_size`` steps.

    Example:
        >>> sched = step_lr(1.0, step_size=10, gamma=0.5)
        >>> float(sched(9)), float(sched(10)), float(sched(25))
        (1.0, 0.5, 0.25)
    """
    init = _check_real("init_value", init_value)
    size = _check_int("step_size", step_size, minimum=1)
    g = _check_real("gamma", gamma)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        n = torch.floor(torch.clamp(_to_float_count(count), min=0.0) / size)
        return init * torch.pow(g, n)

    return schedule


def multi_step_lr(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.MultiStepLR``.

    Formula: ``init_value * gamma ** (number of milestones <= count)``. A milestone listed twice
    counts twice, as in torch.

    Args:
        init_value: initial learning rate.
        milestones: non-decreasing step counts at which the rate is multiplied by ``gamma``.
        gamma: multiplicative factor.

    Example:
        >>> sched = multi_step_lr(1.0, milestones=[2, 5], gamma=0.5)
        >>> [float(sched(i)) for i in (0, 2, 4, 5)]
        [1.0, 0.5, 0.5, 0.25]
    """
    init = _check_real("init_value", init_value)
    ms = [_check_int("milestones", m) for m in milestones]
    _check_non_decreasing("milestones", ms)
    g = _check_real("gamma", gamma)
    values = [init * g**k for k in range(len(ms) + 1)]

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return _piecewise_constant(_to_float_count(count), [float(m) for m in ms], values)

    return schedule


def exponential_lr(init_value: float, gamma: float) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.ExponentialLR``.

    Formula: ``init_value * gamma ** count``.

    Args:
        init_value: initial learning rate.
        gamma: multiplicative factor per step.

    Example:
        >>> float(exponential_lr(1.0, gamma=0.5)(3))
        0.125
    """
    init = _check_real("init_value", init_value)
    g = _check_real("gamma", gamma)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        return init * torch.pow(g, torch.clamp(_to_float_count(count), min=0.0))

    return schedule


def cosine_annealing(init_value: float, T_max: int, eta_min: float = 0.0) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    Formula::

        eta_min + (init_value - eta_min) * (1 + cos(pi * count / T_max)) / 2

    Past ``T_max`` the formula is *not* clamped: the value rises again and the schedule is periodic
    with period ``2 * T_max`` (back at ``init_value`` at ``count = 2 * T_max``). This is what
    torch's recursive ``CosineAnnealingLR`` does when stepped past ``T_max``; use
    :func:`cosine_decay` for a schedule that stays at its minimum.

    Torch updates the rate recursively (multiplying by ratios of cosines, with a special case at
    each minimum); mathematically that is this closed form, and numerically the two agree to a few
    ``1e-13`` relative over 1000 steps, including many periods when ``T_max`` is small.

    Args:
        init_value: initial (maximum) learning rate.
        T_max: half-period in steps (``> 0``).
        eta_min: minimum learning rate.

    Example:
        >>> sched = cosine_annealing(1.0, T_max=10)
        >>> float(sched(0)), round(float(sched(5)), 12), float(sched(10)), float(sched(20))
        (1.0, 0.5, 0.0, 1.0)
    """
    init = _check_real("init_value", init_value)
    t_max = _check_int("T_max", T_max, minimum=1)
    eta = _check_real("eta_min", eta_min)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = _to_float_count(count)
        return eta + (init - eta) * (1.0 + torch.cos(c * math.pi / t_max)) / 2.0

    return schedule


def cosine_annealing_warm_restarts(
    init_value: float,
    T_0: int,
    T_mult: int = 1,
    eta_min: float = 0.0,
) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``.

    Cycle ``i`` (from 0) has length ``T_i = T_0 * T_mult ** i`` and starts at
    ``S_i = T_0 * (T_mult ** i - 1) / (T_mult - 1)`` (``S_i = i * T_0`` when ``T_mult == 1``).
    With ``i`` the cycle containing ``count`` and ``T_cur = count - S_i``::

        eta_min + (init_value - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

    For ``T_mult > 1`` the cycle index is ``floor(log(count / T_0 * (T_mult - 1) + 1) / log(T_mult))``,
    corrected by one step in either direction against the exact (integer) cycle starts so that
    rounding in ``log`` cannot misplace a restart. Restarts are placed exactly as long as the cycle
    after the current one is shorter than ``2**53`` steps (``2**24`` on mps), i.e. for any
    realistic count.

    Args:
        init_value: initial (maximum) learning rate.
        T_0: length of the first cycle (``> 0``).
        T_mult: integer growth factor of the cycle length (``>= 1``).
        eta_min: minimum learning rate.

    Example:
        >>> sched = cosine_annealing_warm_restarts(1.0, T_0=10, T_mult=2)
        >>> float(sched(0)), round(float(sched(5)), 12), float(sched(10)), round(float(sched(20)), 12)
        (1.0, 0.5, 1.0, 0.5)
    """
    init = _check_real("init_value", init_value)
    t0 = float(_check_int("T_0", T_0, minimum=1))
    mult = _check_int("T_mult", T_mult, minimum=1)
    eta = _check_real("eta_min", eta_min)
    m = float(mult)
    log_m = math.log(m) if mult > 1 else 1.0

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = torch.clamp(_to_float_count(count), min=0.0)
        if mult == 1:
            t_cur = torch.remainder(c, t0)
            t_i: torch.Tensor | float = t0
        else:

            def cycle_start(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                m_pow = torch.round(torch.pow(m, i))
                return t0 * (m_pow - 1.0) / (m - 1.0), m_pow

            i = torch.floor(torch.log(c / t0 * (m - 1.0) + 1.0) / log_m)
            start, _ = cycle_start(i)
            i = torch.where(c < start, i - 1.0, i)
            next_start, _ = cycle_start(i + 1.0)
            i = torch.where(c >= next_start, i + 1.0, i)
            start, m_pow = cycle_start(i)
            t_cur = c - start
            t_i = t0 * m_pow
        return eta + (init - eta) * (1.0 + torch.cos(t_cur * math.pi / t_i)) / 2.0

    return schedule


def linear_lr(
    init_value: float,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.LinearLR``.

    Formula::

        init_value * (start_factor + (end_factor - start_factor) * min(count, total_iters) / total_iters)

    ``total_iters == 0`` gives the constant ``init_value * start_factor``, which is what torch's
    recursive update produces in that case.

    Args:
        init_value: base learning rate.
        start_factor: factor at step 0 (``0 < start_factor <= 1``, as torch requires).
        end_factor: factor from ``total_iters`` on (``0 <= end_factor <= 1``).
        total_iters: number of steps of the linear change (``>= 0``).

    Example:
        >>> sched = linear_lr(1.0, start_factor=0.5, end_factor=1.0, total_iters=4)
        >>> [float(sched(i)) for i in range(6)]
        [0.5, 0.625, 0.75, 0.875, 1.0, 1.0]
    """
    init = _check_real("init_value", init_value)
    sf = _check_real("start_factor", start_factor)
    ef = _check_real("end_factor", end_factor)
    if not 0.0 < sf <= 1.0:
        raise ValueError(f"`start_factor` must be in (0, 1], got {start_factor!r}")
    if not 0.0 <= ef <= 1.0:
        raise ValueError(f"`end_factor` must be in [0, 1], got {end_factor!r}")
    total = _check_int("total_iters", total_iters, minimum=0)
    if total == 0:
        return constant(init * sf)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_to_float_count(count), 0.0, float(total))
        return init * (sf + (ef - sf) * t / total)

    return schedule


def polynomial_lr(init_value: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.PolynomialLR``.

    Formula: ``init_value * (1 - min(count, total_iters) / total_iters) ** power`` (so 0 from
    ``total_iters`` on). ``total_iters == 0`` gives the constant ``init_value``, as torch's
    recursive update does.

    Args:
        init_value: base learning rate.
        total_iters: number of decay steps (``>= 0``).
        power: exponent (``>= 0``).

    Example:
        >>> sched = polynomial_lr(1.0, total_iters=4, power=2.0)
        >>> [float(sched(i)) for i in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    init = _check_real("init_value", init_value)
    total = _check_int("total_iters", total_iters, minimum=0)
    p = _check_real("power", power)
    if p < 0:
        raise ValueError(f"`power` must be >= 0, got {power!r}")
    if total == 0:
        return constant(init)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        t = torch.clamp(_to_float_count(count), 0.0, float(total))
        return init * torch.pow(1.0 - t / total, p)

    return schedule


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.OneCycleLR`` (learning rate only).

    With ``initial = max_lr / div_factor`` and ``min_lr = initial / final_div_factor``, the phases
    (two, or three if ``three_phase``) end at steps::

        two phases:    pct_start * total_steps - 1  (initial -> max_lr),
                       total_steps - 1              (max_lr  -> min_lr)
        three phases:  pct_start * total_steps - 1  (initial -> max_lr),
                       2 * pct_start * total_steps - 2 (max_lr -> initial),
                       total_steps - 1              (initial -> min_lr)

    ``count`` belongs to the first phase whose end is ``>= count`` and, with ``pct`` the position
    of ``count`` between the phase start (previous end, or 0) and end, the value is::

        cos:     end + (start - end) / 2 * (1 + cos(pi * pct))
        linear:  start + (end - start) * pct

    torch raises once stepped past ``total_steps``; here the count is clipped to
    ``[0, total_steps - 1]``, so the schedule stays at ``min_lr`` from step ``total_steps - 1`` on.
    (torch's value at exactly ``total_steps``, reached only after the last ``optimizer.step()``,
    is an extrapolation slightly above ``min_lr``; it is the only value that differs.)

    Only the learning rate is produced (torch's ``cycle_momentum`` option, which also rewrites the
    optimizer's momentum, has no counterpart here).

    Args:
        max_lr: peak learning rate.
        total_steps: number of steps in the cycle (``> 0``).
        pct_start: fraction of the cycle spent increasing (``0 <= pct_start <= 1``).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: ``initial = max_lr / div_factor``.
        final_div_factor: ``min_lr = initial / final_div_factor``.
        three_phase: use the three-phase variant.

    Example:
        >>> sched = one_cycle(1.0, total_steps=10, pct_start=0.5, div_factor=10.0)
        >>> round(float(sched(0)), 12), float(sched(4)), float(sched(9))
        (0.1, 1.0, 1e-05)
    """
    peak = _check_real("max_lr", max_lr)
    total = _check_int("total_steps", total_steps, minimum=1)
    ps = _check_real("pct_start", pct_start)
    if not 0.0 <= ps <= 1.0:
        raise ValueError(f"`pct_start` must be in [0, 1], got {pct_start!r}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"`anneal_strategy` must be 'cos' or 'linear', got {anneal_strategy!r}")
    div = _check_real("div_factor", div_factor)
    final_div = _check_real("final_div_factor", final_div_factor)
    if div == 0:
        raise ValueError("`div_factor` must be non-zero")
    if final_div == 0:
        raise ValueError("`final_div_factor` must be non-zero")
    initial = peak / div
    min_lr = initial / final_div
    # (end_step, start_value, end_value) per phase, with torch's float arithmetic.
    phases: list[tuple[float, float, float]]
    if three_phase:
        phases = [
            (float(ps * total) - 1, initial, peak),
            (float(2 * ps * total) - 2, peak, initial),
            (float(total - 1), initial, min_lr),
        ]
    else:
        phases = [(float(ps * total) - 1, initial, peak), (float(total - 1), peak, min_lr)]
    cosine = anneal_strategy == "cos"

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if cosine:
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1.0)
        return (end - start) * pct + start

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        c = torch.clamp(_to_float_count(count), 0.0, float(total - 1))

        def phase_value(k: int) -> torch.Tensor:
            end_step, start_value, end_value = phases[k]
            start_step = 0.0 if k == 0 else phases[k - 1][0]
            width = end_step - start_step
            # torch would divide by zero where width == 0; such a phase only ever sees its start.
            return anneal(start_value, end_value, (c - start_step) / (width if width != 0 else 1.0))

        # the first phase whose end is >= count wins; the last phase takes everything else.
        out = phase_value(len(phases) - 1)
        for k in range(len(phases) - 2, -1, -1):
            out = torch.where(c <= phases[k][0], phase_value(k), out)
        return out

    return schedule


def cosine_onecycle(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """Cosine one-cycle schedule, matching torch's ``OneCycleLR(anneal_strategy='cos')``.

    Same as :func:`one_cycle` ``(peak_value, transition_steps, pct_start, "cos", div_factor,
    final_div_factor)``: cosine rise from ``peak_value / div_factor`` to ``peak_value`` until step
    ``pct_start * transition_steps - 1``, then cosine decay to
    ``peak_value / div_factor / final_div_factor`` at step ``transition_steps - 1``, constant after.

    Note: optax's ``cosine_onecycle_schedule`` places the phase ends at
    ``int(pct_start * transition_steps)`` and ``transition_steps``; this function follows torch
    instead.

    Args:
        transition_steps: number of steps in the cycle (``> 0``).
        peak_value: maximum value.
        pct_start: fraction of the cycle spent increasing.
        div_factor: initial value is ``peak_value / div_factor``.
        final_div_factor: final value is ``peak_value / div_factor / final_div_factor``.

    Example:
        >>> sched = cosine_onecycle(10, peak_value=1.0, pct_start=0.5, div_factor=10.0)
        >>> round(float(sched(0)), 12), float(sched(4)), round(float(sched(2)), 12)
        (0.1, 1.0, 0.55)
    """
    steps = _check_int("transition_steps", transition_steps, minimum=1)
    return one_cycle(peak_value, steps, pct_start, "cos", div_factor, final_div_factor)


def sequential(schedules: Sequence[Schedule], milestones: Sequence[int]) -> Schedule:
    """Closed form of ``torch.optim.lr_scheduler.SequentialLR``.

    ``schedules[i]`` runs from ``milestones[i-1]`` (or 0) and sees the count relative to its own
    start, exactly like :func:`join_schedules`. Each sub-schedule should be the closed form of the
    corresponding torch scheduler built on the same optimizer (hence with the same
    ``init_value``).

    Args:
        schedules: ``n >= 1`` schedules.
        milestones: ``n - 1`` non-decreasing step counts.

    Example:
        >>> warmup = linear_lr(1.0, start_factor=0.5, total_iters=2)
        >>> sched = sequential([warmup, exponential_lr(1.0, gamma=0.5)], milestones=[3])
        >>> [float(sched(i)) for i in range(6)]
        [0.5, 0.75, 1.0, 1.0, 0.5, 0.25]
    """
    scheds = list(schedules)
    ms = list(milestones)
    if not scheds:
        raise ValueError("`schedules` must contain at least one schedule")
    if len(ms) != len(scheds) - 1:
        raise ValueError(f"`milestones` must have len(schedules) - 1 = {len(scheds) - 1} entries, got {len(ms)}")
    for m in ms:
        _check_int("milestones", m)
    _check_non_decreasing("milestones", ms)
    return join_schedules(scheds, ms)
