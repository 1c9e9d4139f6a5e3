"""L-BFGS with torch.optim.LBFGS's inner loop, termination tests and strong-Wolfe line search, in pure form.

One call runs what one ``torch.optim.LBFGS.step(closure)`` runs, on the flat concatenation of all parameters
(complex ones as real pairs), with the objective given as a function ``value_and_grad(param_list) -> (loss,
grad_list)`` instead of a closure that mutates ``.grad``:

* start from the loss ``f`` and flat gradient ``g`` at the parameters; stop at once if ``max|g| <= tolerance_grad``;
* up to ``max_iter`` times: update the curvature memory with ``y = g - g_prev``, ``s = t * d`` (kept only if
  ``y.s > 1e-10``; oldest pair dropped past ``history_size``), compute the direction ``d = -H g`` with the
  two-loop recursion (``H_0 = (y.s / y.y) I``; plain ``d = -g`` on the very first iteration), take a step ``t``
  (``lr``, or ``min(1, 1/|g|_1) * lr`` on the first iteration) — with ``line_search_fn="strong_wolfe"``, the
  step from torch's bracketing / cubic-interpolation zoom search (c1 = 1e-4, c2 = 0.9) — and stop when the
  iteration or evaluation budget is spent, ``max|g| <= tolerance_grad``, ``max|t d| <= tolerance_change``,
  ``|f - f_prev| < tolerance_change``, or the directional derivative ``g.d > -tolerance_change``.

Every scalar is computed with the same operations and the same Python-float / 0-d tensor types as torch, and
parameters move with the same per-tensor ``add(d_view, alpha=t)``, so trajectories agree with torch.optim.LBFGS
bit for bit (up to the final ``updates = new_params - params``).

**Host syncs.** L-BFGS's control flow depends on values (termination tests, the line search's branches,
``y.s > 1e-10``): like torch, this kernel reads such scalars on the host (``float(loss)``, ``if tensor``). It
cannot run under ``torch.func.vmap`` or be captured by ``torch.compile(fullgraph=True)``.

**Memory.** The ``history_size`` most recent ``(s, y)`` pairs are kept in two fixed-size ``(history_size, n)``
tensors used as a ring buffer (``history_count`` pairs stored so far; the newest is at ``(history_count - 1) %
history_size``), with ``ro = 1 / (y.s)`` alongside. Their rows start on 64-byte boundaries (each buffer is a
``[:, :n]`` view of a slightly wider one), as torch's separately allocated vectors do, because BLAS dot products
round differently on misaligned data. The pure API copies them once per call before writing; with ``donate=True``
they are written in place.

Nocedal, "Updating Quasi-Newton Matrices with Limited Storage", Math. Comp. 1980; Liu & Nocedal, "On the limited
memory BFGS method for large scale optimization", Math. Prog. 1989; Nocedal & Wright, "Numerical Optimization",
2006 (algorithms 3.5-3.6 and 7.4, the strong Wolfe line search).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import torch
from torch import Tensor

__all__ = ["LBFGSState", "LBFGSResult", "ValueAndGrad", "init_memory", "lbfgs", "strong_wolfe", "cubic_interpolate"]

Number: TypeAlias = Any  # a Python float / int or a 0-d tensor, exactly as torch's own code carries it
ValueAndGrad = Callable[[list[Tensor]], tuple[Any, Sequence[Tensor | None]]]
"""``value_and_grad(params) -> (loss, grads)`` over a list of parameters; a ``None`` gradient counts as zeros."""


class LBFGSState(NamedTuple):
    """L-BFGS's state: torch.optim.LBFGS's global state (its keys; torch stores them under its first parameter), as
    tensors, for the whole flat parameter vector of ``n`` real entries (complex parameters count twice).

    Attributes:
      num_updates: number of ``update`` calls (0-d int64), the argument of a learning-rate schedule (the kernel
        leaves it as it is).
      func_evals: objective evaluations so far (torch's ``func_evals``; 0-d int64).
      n_iter: inner iterations so far (torch's ``n_iter``; 0-d int64); the very first one is a steepest-descent step.
      d: the last search direction, shape ``(n,)``.
      t: the last step length (0-d float64).
      old_dirs: ``(history_size, n)`` ring buffer of gradient differences ``y`` (torch's ``old_dirs`` list).
      old_stps: ``(history_size, n)`` ring buffer of steps ``s`` (torch's ``old_stps`` list).
      ro: ``(history_size,)`` ring buffer of ``1 / (y.s)`` (torch's ``ro`` list).
      H_diag: scale ``y.s / y.y`` of the initial inverse-Hessian approximation (0-d).
      prev_flat_grad: the flat gradient at the start of the last iteration, ``(n,)``.
      prev_loss: the loss at the start of the last iteration (0-d float64).
      history_count: ``(s, y)`` pairs stored so far (0-d int64); torch's lists are the last ``min(history_count,
        history_size)`` of them, oldest first, the newest at slot ``(history_count - 1) % history_size``.
    """

    num_updates: Tensor
    func_evals: Tensor
    n_iter: Tensor
    d: Tensor
    t: Tensor
    old_dirs: Tensor
    old_stps: Tensor
    ro: Tensor
    H_diag: Tensor
    prev_flat_grad: Tensor
    prev_loss: Tensor
    history_count: Tensor


class LBFGSResult(NamedTuple):
    """The updates (``new_params - params``), the new parameters, the new state and the loss at the start."""

    updates: list[Tensor]
    params: list[Tensor]
    memory: LBFGSState
    loss: float


_ALIGN_BYTES = 64  # what torch's CPU allocator guarantees for a fresh tensor


def _history_buffer(rows: int, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero ``(rows, numel)`` buffer whose rows start on 64-byte boundaries, like freshly allocated tensors.

    BLAS dot products can round differently depending on the alignment of their operands; torch keeps each
    history vector in its own allocation, so aligned rows keep this kernel's results bitwise equal to torch's.
    """
    per = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    stride = -(-numel // per) * per
    return torch.zeros(rows, stride, dtype=dtype, device=device)[:, :numel]


def _aligned(buf: Tensor) -> bool:
    size = buf.element_size()
    return buf.data_ptr() % _ALIGN_BYTES == 0 and (buf.shape[0] <= 1 or (buf.stride(0) * size) % _ALIGN_BYTES == 0)


def _own_history(buf: Tensor) -> Tensor:
    """A copy of a history buffer with aligned rows (see :func:`_history_buffer`)."""
    out = _history_buffer(buf.shape[0], buf.shape[1], buf.dtype, buf.device)
    return out.copy_(buf)


def init_memory(numel: int, history_size: int, dtype: torch.dtype, device: torch.device) -> LBFGSState:
    """An empty L-BFGS state for ``numel`` (real) parameter entries, flat vectors in ``dtype``."""

    def count() -> Tensor:
        return torch.zeros((), dtype=torch.int64, device=device)

    return LBFGSState(
        num_updates=count(),
        func_evals=count(),
        n_iter=count(),
        d=torch.zeros(numel, dtype=dtype, device=device),
        t=torch.zeros((), dtype=torch.float64, device=device),
        old_dirs=_history_buffer(history_size, numel, dtype, device),
        old_stps=_history_buffer(history_size, numel, dtype, device),
        ro=torch.zeros(history_size, dtype=dtype, device=device),
        H_diag=torch.ones((), dtype=dtype, device=device),
        prev_flat_grad=torch.zeros(numel, dtype=dtype, device=device),
        prev_loss=torch.zeros((), dtype=torch.float64, device=device),
        history_count=count(),
    )


# --- strong Wolfe line search ------------------------------------------------------------------------------------


def cubic_interpolate(
    x1: Number, f1: Number, g1: Number, x2: Number, f2: Number, g2: Number, bounds: tuple[Number, Number] | None = None
) -> Number:
    """Minimiser of the cubic through ``(x1, f1)``, ``(x2, f2)`` with slopes ``g1``, ``g2``, clamped to ``bounds``.

    Without ``bounds`` the interval between the two points is used; with no real minimiser, its midpoint.
    (Nocedal & Wright, eq. 3.59.)
    """
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1**2 - g1 * g2
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = disc.sqrt()
    if x1 <= x2:
        minimiser = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        minimiser = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(minimiser, lo), hi)


class _Point(NamedTuple):
    t: Number
    f: float
    g: Tensor
    gtd: Tensor


def strong_wolfe(
    evaluate: Callable[[Number], tuple[float, Tensor]],
    t: Number,
    d: Tensor,
    f: float,
    g: Tensor,
    gtd: Tensor,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, Tensor, Number, int]:
    """A step length satisfying the strong Wolfe conditions along ``d`` (torch.optim.LBFGS's line search).

    ``evaluate(t)`` returns the loss and the flat gradient at ``x + t d``. The search first brackets an interval
    (growing the step by cubic extrapolation within ``[t + 0.01 (t - t_prev), 10 t]``), then zooms into it with
    safeguarded cubic interpolation until ``f(t) <= f + c1 t g.d`` and ``|g(t).d| <= -c2 g.d``, the interval is
    shorter than ``tolerance_change / max|d|``, or ``max_ls`` evaluations are spent.

    Returns ``(loss, flat_grad, t, evaluations)`` at the step chosen (the best point found).
    """
    d_norm = d.abs().max()
    f_new, g_new = evaluate(t)
    evals = 1
    gtd_new = g_new.dot(d)
    prev = _Point(0, f, g, gtd)
    bracket: list[_Point] = []
    done = False
    ls_iter = 0
    # bracketing phase
    while ls_iter < max_ls:
        here = _Point(t, f_new, g_new, gtd_new)
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= prev.f):
            bracket = [prev, here]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket = [here]
            done = True
            break
        if gtd_new >= 0:
            bracket = [prev, here]
            break
        lo_step = t + 0.01 * (t - prev.t)
        hi_step = t * 10
        t_next = cubic_interpolate(prev.t, prev.f, prev.gtd, t, f_new, gtd_new, bounds=(lo_step, hi_step))
        prev = here
        t = t_next
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter >= max_ls:  # budget spent while bracketing: choose between the start and the last trial
        bracket = [_Point(0, f, g, gtd), _Point(t, f_new, g_new, gtd_new)]

    # zoom phase
    low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    insufficient_progress = False
    while not done and ls_iter < max_ls:
        if abs(bracket[1].t - bracket[0].t) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(bracket[0].t, bracket[0].f, bracket[0].gtd, bracket[1].t, bracket[1].f, bracket[1].gtd)
        # keep the trial away from the ends of the interval unless progress is sufficient
        b_max = max(bracket[0].t, bracket[1].t)
        b_min = min(bracket[0].t, bracket[1].t)
        margin = 0.1 * (b_max - b_min)
        if min(b_max - t, t - b_min) < margin:
            if insufficient_progress or t >= b_max or t <= b_min:
                t = b_max - margin if abs(t - b_max) < abs(t - b_min) else b_min + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False

        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        here = _Point(t, f_new, g_new, gtd_new)

        if f_new > (f + c1 * t * gtd) or f_new >= bracket[low].f:
            bracket[high] = here  # sufficient decrease fails, or no better than the low end: shrink from above
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = here

    best = bracket[low]
    return best.f, best.g, best.t, evals


# --- the L-BFGS step ---------------------------------------------------------------------------------------------


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _flatten_grads(grads: Sequence[Tensor | None], real_params: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    views = []
    for g, p in zip(grads, real_params):
        if g is None:
            view = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        else:
            if g.is_sparse:
                g = g.to_dense()
            view = _real(g).reshape(-1)
        views.append(view.to(dtype))
    return torch.cat(views, 0)


def _moved(xs: Sequence[Tensor], t: Number, d: Tensor) -> list[Tensor]:
    """``x + t * d`` for each (real-viewed) parameter, with torch.optim.LBFGS's per-tensor ``add(alpha=t)``."""
    out = []
    offset = 0
    for x in xs:
        n = x.numel()
        new = torch.add(x, d[offset : offset + n].view_as(x), alpha=t)
        out.append(new if new.dtype == x.dtype else new.to(x.dtype))
        offset += n
    return out


@torch.no_grad()
def lbfgs(
    params: list[Tensor],
    loss: Any,
    grads: Sequence[Tensor | None],
    memory: LBFGSState,
    value_and_grad: ValueAndGrad,
    *,
    lr: float | Tensor,
    max_iter: int,
    max_eval: int,
    tolerance_grad: float,
    tolerance_change: float,
    history_size: int,
    line_search_fn: str | None,
    donate: bool = False,
) -> LBFGSResult:
    """One ``torch.optim.LBFGS.step`` in pure form (see module docstring).

    Args:
      params: the parameters (real or complex tensors, on one device).
      loss: the loss at ``params`` (a float or a 0-d tensor).
      grads: the gradients at ``params`` (``None`` counts as zeros).
      memory: the state from :func:`init_memory` or a previous call; its ``d.dtype`` is the dtype of the flat
        vectors.
      value_and_grad: ``(params) -> (loss, grads)``, evaluated at trial points (never mutates its inputs here).
      lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn: as torch.optim.LBFGS.
      donate: the caller owns ``memory``: its history buffers are written in place.

    Returns the updates, the new memory and ``float(loss)``; nothing passed in is modified (unless ``donate``).
    """
    if line_search_fn not in (None, "strong_wolfe"):
        raise ValueError("only 'strong_wolfe' is supported")
    if memory.old_dirs.shape[0] != history_size:
        raise ValueError(
            f"the L-BFGS state holds {memory.old_dirs.shape[0]} history slots but history_size is {history_size}"
        )
    dtype = memory.d.dtype
    device = memory.d.device
    real_params = [_real(p) for p in params]
    numel = sum(p.numel() for p in real_params)
    if numel != memory.d.numel():
        raise ValueError(f"the L-BFGS state is for {memory.d.numel()} parameter entries, got {numel}")

    def evaluate(xs: Sequence[Tensor]) -> tuple[float, Tensor]:
        trial = [torch.view_as_complex(x) if p.is_complex() else x for x, p in zip(xs, params)]
        with torch.enable_grad():
            value, gs = value_and_grad(trial)
        return float(value), _flatten_grads(gs, real_params, dtype)

    loss = float(loss)
    flat_grad = _flatten_grads(grads, real_params, dtype)
    func_evals = int(memory.func_evals) + 1
    state_n_iter = int(memory.n_iter)
    current_evals = 1

    def result(xs: Sequence[Tensor], **fields: Any) -> LBFGSResult:
        new_params = [torch.view_as_complex(x) if p.is_complex() else x for x, p in zip(xs, params)]
        updates = [new - p for new, p in zip(new_params, params)]
        counts = {
            "func_evals": torch.tensor(func_evals, dtype=torch.int64, device=device),
            "n_iter": torch.tensor(state_n_iter, dtype=torch.int64, device=device),
        }
        return LBFGSResult(updates, new_params, memory._replace(**counts, **fields), loss_at_start)

    loss_at_start = loss
    xs: list[Tensor] = list(real_params)
    if flat_grad.abs().max() <= tolerance_grad:  # already optimal: torch returns before touching anything else
        return result(xs)

    d = memory.d
    t: Number = memory.t
    h_diag: Tensor = memory.H_diag
    prev_flat_grad = memory.prev_flat_grad
    prev_loss: Any = memory.prev_loss
    old_dirs, old_stps, ro = memory.old_dirs, memory.old_stps, memory.ro
    count = int(memory.history_count)
    owned = donate
    if not (_aligned(old_dirs) and _aligned(old_stps)):  # e.g. a state loaded from a checkpoint
        old_dirs, old_stps, ro = _own_history(old_dirs), _own_history(old_stps), ro.clone()
        owned = True

    opt_cond: Any = False
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state_n_iter += 1

        # --- search direction ----------------------------------------------------------------------------------
        if state_n_iter == 1:
            d = flat_grad.neg()
            count = 0
            h_diag = torch.ones((), dtype=dtype, device=device)
        else:
            y = flat_grad.sub(prev_flat_grad)
            s = d.mul(t)
            ys = y.dot(s)
            if ys > 1e-10:  # curvature condition holds: remember the pair (the oldest one drops out)
                if not owned:
                    old_dirs, old_stps, ro = _own_history(old_dirs), _own_history(old_stps), ro.clone()
                    owned = True
                slot = count % history_size
                old_dirs[slot] = y
                old_stps[slot] = s
                ro[slot] = 1.0 / ys
                count += 1
                h_diag = ys / y.dot(y)
            num_old = min(count, history_size)
            slots = [(count - num_old + k) % history_size for k in range(num_old)]  # oldest first
            # two-loop recursion: d = -H g
            q = flat_grad.neg()
            alphas: list[Any] = [None] * num_old  # 0-d tensors; a tensor alpha is read like torch reads it
            for k in range(num_old - 1, -1, -1):
                j = slots[k]
                alphas[k] = old_stps[j].dot(q) * ro[j]
                q.add_(old_dirs[j], alpha=-alphas[k])
            d = torch.mul(q, h_diag)
            for k in range(num_old):
                j = slots[k]
                beta = old_dirs[j].dot(d) * ro[j]
                d.add_(old_stps[j], alpha=alphas[k] - beta)

        prev_flat_grad = flat_grad
        prev_loss = loss

        # --- step length ---------------------------------------------------------------------------------------
        if state_n_iter == 1:
            first: Any = min(1.0, 1.0 / flat_grad.abs().sum())
            t = first * lr
        else:
            t = lr
        gtd = flat_grad.dot(d)
        if gtd > -tolerance_change:  # not a descent direction (numerically)
            break

        ls_func_evals = 0
        if line_search_fn is not None:

            def trial(step: Number, x_init: list[Tensor] = xs, direction: Tensor = d) -> tuple[float, Tensor]:
                return evaluate(_moved(x_init, step, direction))

            loss, flat_grad, t, ls_func_evals = strong_wolfe(
                trial,
                t,
                d,
                loss,
                flat_grad,
                gtd,
                max_ls=max_eval - current_evals,
            )
            xs = _moved(xs, t, d)
            opt_cond = flat_grad.abs().max() <= tolerance_grad
        else:
            xs = _moved(xs, t, d)
            opt_cond = False
            if n_iter != max_iter:  # torch skips the evaluation after the last iteration
                loss, flat_grad = evaluate(xs)
                opt_cond = flat_grad.abs().max() <= tolerance_grad
                ls_func_evals = 1

        current_evals += ls_func_evals
        func_evals += ls_func_evals

        # --- termination ---------------------------------------------------------------------------------------
        if n_iter == max_iter or current_evals >= max_eval or opt_cond:
            break
        if d.mul(t).abs().max() <= tolerance_change:
            break
        if abs(loss - prev_loss) < tolerance_change:
            break

    return result(
        xs,
        d=d,
        t=torch.as_tensor(t, dtype=torch.float64, device=device).reshape(()),
        old_dirs=old_dirs,
        old_stps=old_stps,
        ro=ro,
        H_diag=h_diag if h_diag.dtype == dtype else h_diag.to(dtype),
        prev_flat_grad=prev_flat_grad,
        prev_loss=torch.as_tensor(prev_loss, dtype=torch.float64, device=device).reshape(()),
        history_count=torch.tensor(count, dtype=torch.int64, device=device),
    )
