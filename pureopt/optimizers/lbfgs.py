"""``lbfgs``: torch.optim.LBFGS with its argument names, defaults, validation and numerics, in pure form."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.lbfgs import lbfgs_transform

__all__ = ["lbfgs"]


def lbfgs(
    lr: ScalarOrSchedule = 1,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
    line_search_fn: str | None = None,
    *,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """L-BFGS, as ``torch.optim.LBFGS``: one ``update`` runs one whole ``step(closure)`` (up to ``max_iter``
    quasi-Newton iterations), re-evaluating the objective through ``value_fn``.

    Usage differs from the other optimizers in one way: ``update`` needs the objective::

        updates, state = tx.update(grads, state, params, value_fn=f)   # f(params) -> (loss, grads)
        updates, state = tx.update(grads, state, params, loss_fn=h)    # h(params) -> loss (torch.func.grad)
        updates, state = tx.update(grads, state, params, value_fn=f, loss=loss)   # skip the first evaluation

    Without ``loss=``, the objective is first evaluated at ``params`` (torch's first closure call) and
    ``grads`` only give the tree structure; with it, ``(loss, grads)`` must be the values at ``params``. Either way
    that evaluation counts in ``func_evals`` as in torch. ``f`` must not mutate its argument.

    Update rule (on the flat vector ``x`` of all parameters, complex ones as real pairs), per inner iteration::

        y = g - g_prev,  s = t * d;  keep (s, y) if y.s > 1e-10 (at most history_size pairs), H0 = y.s / y.y
        d = -H g                          two-loop recursion (d = -g on the very first iteration)
        t = lr   (first iteration ever: min(1, 1 / |g|_1) * lr);  strong_wolfe: line search from t
        x <- x + t d;  (f, g) = value_fn(x)
        stop: max_iter / max_eval reached, max|g| <= tolerance_grad, max|t d| <= tolerance_change,
              |f - f_prev| < tolerance_change, or g.d > -tolerance_change

    The returned updates are ``x_new - x`` per parameter. **Host syncs**: the termination tests and the line
    search branch on tensor values, on the host, as torch does; this ``update`` cannot run under
    ``torch.func.vmap`` or ``torch.compile(fullgraph=True)`` (it is the one pureopt optimizer that syncs).

    Args:
      lr: learning rate (float, 0-d tensor or schedule of the update count).
      max_iter: maximal number of iterations per ``update``.
      max_eval: maximal number of objective evaluations per ``update`` (default ``max_iter * 5 // 4``).
      tolerance_grad: termination tolerance on first-order optimality (``max|g|``).
      tolerance_change: termination tolerance on loss / parameter changes.
      history_size: number of ``(s, y)`` pairs remembered (the state holds two ``(history_size, n)`` buffers,
        allocated at ``init``).
      line_search_fn: ``None`` (fixed steps) or ``"strong_wolfe"``.
      state_dtype: dtype of the flat vectors and the history (default: the parameters' (promoted) dtype, as torch).

    Example::

        def value_fn(p):                                   # (loss, grads) at p
            grads, loss = torch.func.grad_and_value(loss_fn)(p)
            return loss, grads

        tx = pureopt.lbfgs(line_search_fn="strong_wolfe")
        state = tx.init(params)
        for _ in range(10):
            loss, grads = value_fn(params)
            updates, state = tx.update(grads, state, params, value_fn=value_fn, loss=loss)
            params = pureopt.apply_updates(params, updates)

    Nocedal, "Updating Quasi-Newton Matrices with Limited Storage", 1980; Liu & Nocedal, "On the limited memory
    BFGS method for large scale optimization", 1989; Nocedal & Wright, "Numerical Optimization" (2006).
    """
    lr = checked_lr(lr)
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    if line_search_fn is not None and line_search_fn != "strong_wolfe":
        raise ValueError("only 'strong_wolfe' is supported")
    if history_size < 1:
        raise ValueError(f"Invalid history_size value: {history_size}")
    return lbfgs_transform(
        lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn, state_dtype
    )
