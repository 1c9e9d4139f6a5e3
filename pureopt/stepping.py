"""``step``: one pure optimizer step that returns the new parameters, fast where nothing is traced."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import GradientTransformation, OptState, Params, Updates, apply_updates, inplace_step
from pureopt.kernels.select import functorch_active, grad_hyperparameter_probe

__all__ = ["step"]


def step(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params, **extra_args: Any
) -> tuple[Params, OptState]:
    """One optimizer step as a pure function: returns ``(new_params, new_state)``; nothing passed in is modified.

    It is::

        updates, new_state = tx.update(grads, state, params, **extra_args)
        new_params = pureopt.apply_updates(params, updates)

    computed the fast way when nothing traces the step: outside ``torch.func`` transforms and ``torch.compile``,
    and with no tensor among ``grads``, ``state``, ``params`` or the hyperparameters that autograd would record
    (grad mode on and ``requires_grad``). There ``params`` and ``state`` are copied and :func:`inplace_step` runs
    on the copies, so torch's fused kernels apply the update in the pass that computes it: Adam moves about 52
    bytes per parameter instead of 60 and allocates three new tensors per parameter instead of four (see
    docs/benchmarks.md). Its numbers are then those of the donated path, i.e. of torch's in-place kernels; with
    AdamW's decoupled decay, for instance, the parameter is scaled first as torch does, and ``update`` +
    ``apply_updates`` agrees to rounding. Everywhere else (``vmap``, ``grad``, differentiating through the
    step, compiling) it is exactly the two lines above.

    Args:
      tx: the gradient transformation.
      grads: gradients shaped like ``params``; a ``None`` leaf leaves that parameter (and its state) as it is.
      state: the current state (``tx.init(params)`` on the first step).
      params: the current parameters.
      **extra_args: passed on to ``update`` (e.g. L-BFGS's ``value_fn``, which then sees the new parameters'
        tensors while the step runs: it must be a function of the parameters it is given).

    Returns:
      The new parameters (new tensors, same dtypes) and the new state.

    Example::

        state = tx.init(params)
        for batch in data:
            grads = torch.func.grad(loss_fn)(params, batch)
            params, state = pureopt.step(tx, grads, state, params)
    """
    if _traced(grads, state, params):
        return _reference_step(tx, grads, state, params, extra_args)
    new_params, new_state = _tree.tree_clone(params), _tree.tree_clone(state)
    with grad_hyperparameter_probe() as probe:
        new_state = inplace_step(tx, grads, new_state, new_params, **extra_args)
    if probe.seen and torch.is_grad_enabled():  # a hyperparameter takes part in autograd: redo it differentiably
        return _reference_step(tx, grads, state, params, extra_args)
    return new_params, new_state


def _reference_step(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params, extra_args: dict[str, Any]
) -> tuple[Params, OptState]:
    updates, new_state = tx.update(grads, state, params, **extra_args)
    return apply_updates(params, updates), new_state


def _traced(*trees: object) -> bool:
    """Whether the step must stay on the pure path: a transform or the compiler traces it, or autograd records
    through one of the tensors of ``trees``."""
    if functorch_active() or torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(x, Tensor) and x.requires_grad for t in trees for x in _tree.leaves(t))
