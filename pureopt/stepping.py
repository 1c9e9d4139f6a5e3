"""``step``: one pure optimizer step that returns the new parameters, fast where nothing is traced; ``donate``
lets a caller hand its buffers over to be reused, as ``jax.jit(..., donate_argnums=...)`` does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from pureopt import tree as _tree
from pureopt.base import GradientTransformation, OptState, Params, Updates, apply_updates, inplace_step
from pureopt.kernels.select import functorch_active, grad_hyperparameter_probe

__all__ = ["step", "DONATABLE"]

DONATABLE = ("params", "state")
"""What :func:`step` can take over (``donate=``): gradients stay read-only in every step pureopt runs."""


def step(
    tx: GradientTransformation,
    grads: Updates,
    state: OptState,
    params: Params,
    *,
    donate: str | Iterable[str] = (),
    **extra_args: Any,
) -> tuple[Params, OptState]:
    """One optimizer step as a pure function: returns ``(new_params, new_state)``; nothing passed in is modified
    (unless donated, below).

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

    **Donation.** ``donate=("params", "state")`` (or one of them) hands those trees over: the caller promises
    never to read them again, and the step may then reuse their buffers for its outputs instead of copying them,
    as JAX's ``donate_argnums`` does. Donating both is :func:`inplace_step`: no copy, no new tensor, torch's
    fused kernels in place (the returned trees hold the donated tensors, updated); donating one copies only the
    other. Donation is a permission, not a promise: where the step cannot run in place (inside ``vmap``/``grad``,
    or while autograd records through a tensor that requires grad) it runs the pure way and leaves the donated
    trees unchanged. Under ``torch.compile`` a donated step is traced in place, so inductor writes the outputs into
    the donated inputs' memory (no new buffers, no copy back). Before anything is changed the step checks that no
    donated tensor appears twice (e.g. one step-count tensor shared by two parameters, which an in-place kernel
    would advance twice) and that no gradient is a donated tensor; either raises a ``ValueError``. A donated
    step is not differentiable: a hyperparameter that requires grad (with grad mode on) raises a
    ``RuntimeError`` after the donated buffers were used.

    Args:
      tx: the gradient transformation.
      grads: gradients shaped like ``params``; a ``None`` leaf leaves that parameter (and its state) as it is.
      state: the current state (``tx.init(params)`` on the first step).
      params: the current parameters.
      donate: ``"params"``, ``"state"``, both (a tuple) or ``()`` (default: nothing donated, inputs untouched).
      **extra_args: passed on to ``update`` (e.g. L-BFGS's ``value_fn``, which then sees the new parameters'
        tensors while the step runs: it must be a function of the parameters it is given).

    Returns:
      The new parameters (same dtypes) and the new state.

    Example::

        state = tx.init(params)
        for batch in data:
            grads = torch.func.grad(loss_fn)(params, batch)
            params, state = pureopt.step(tx, grads, state, params, donate=("params", "state"))
    """
    donated = _donated(donate)
    if functorch_active() or _recording(grads, state, params):
        return _reference_step(tx, grads, state, params, extra_args)
    if torch.compiler.is_compiling():
        if not donated:
            return _reference_step(tx, grads, state, params, extra_args)
        # traced in place: functionalisation turns the mutations into writes into the donated inputs
        new_params = params if "params" in donated else _tree.tree_clone(params)
        new_state = state if "state" in donated else _tree.tree_clone(state)
        return new_params, inplace_step(tx, grads, new_state, new_params, **extra_args)
    if donated:
        _check_donation(grads, state, params, donated)
    new_params = params if "params" in donated else _tree.tree_clone(params)
    new_state = state if "state" in donated else _tree.tree_clone(state)
    with grad_hyperparameter_probe() as probe:
        new_state = inplace_step(tx, grads, new_state, new_params, **extra_args)
    if probe.seen and torch.is_grad_enabled():  # a hyperparameter takes part in autograd
        if donated:
            raise RuntimeError(
                "pureopt.step: a hyperparameter of this transformation requires grad, so the step should be "
                f"differentiable, but {' and '.join(sorted(donated))} were donated and have been updated in place "
                "(not differentiably). Call step without donate= to differentiate through it"
            )
        return _reference_step(tx, grads, state, params, extra_args)  # redo it differentiably
    return new_params, new_state


def _donated(donate: str | Iterable[str]) -> frozenset[str]:
    names = (donate,) if isinstance(donate, str) else tuple(donate)
    for name in names:
        if name not in DONATABLE:
            raise ValueError(
                f"pureopt.step: cannot donate {name!r}; donate= takes {' and '.join(repr(d) for d in DONATABLE)} "
                "(gradients are read-only)"
            )
    return frozenset(names)


def _check_donation(grads: Updates, state: OptState, params: Params, donated: frozenset[str]) -> None:
    """Refuse a donation that an in-place step would get wrong: a donated tensor reachable twice, or a gradient
    that is a donated tensor (it would be read after being overwritten). One ``data_ptr`` per tensor; paths are
    only worked out for the error message."""
    trees = {"params": params, "state": state}
    seen: dict[int, tuple[str, int]] = {}
    for name in sorted(donated):
        for i, leaf in enumerate(_tree.leaves(trees[name])):
            if isinstance(leaf, Tensor) and leaf.numel():
                ptr = leaf.data_ptr()
                if ptr in seen:
                    raise ValueError(
                        f"pureopt.step: donated {_where(trees, name, i)} is the same memory as "
                        f"{_where(trees, *seen[ptr])}; an in-place step would update it twice (give each a tensor "
                        "of its own, or do not donate)"
                    )
                seen[ptr] = (name, i)
    for i, leaf in enumerate(_tree.leaves(grads)):
        if isinstance(leaf, Tensor) and leaf.numel() and leaf.data_ptr() in seen:
            raise ValueError(
                f"pureopt.step: the gradient at {_tree.format_path(_tree.tree_paths(grads)[i])} is the same memory "
                f"as donated {_where(trees, *seen[leaf.data_ptr()])}; it would be overwritten before it is read"
            )


def _where(trees: dict[str, Any], name: str, index: int) -> str:
    return name + _tree.format_path(_tree.tree_paths(trees[name])[index])


def _reference_step(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params, extra_args: dict[str, Any]
) -> tuple[Params, OptState]:
    updates, new_state = tx.update(grads, state, params, **extra_args)
    return apply_updates(params, updates), new_state


def _recording(*trees: object) -> bool:
    """Whether autograd records through one of the tensors of ``trees`` (grad mode on and ``requires_grad``)."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(x, Tensor) and x.requires_grad for t in trees for x in _tree.leaves(t))
