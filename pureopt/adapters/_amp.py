"""``torch.amp.GradScaler`` support for the stateful adapters: one donated step with ``grad_scale`` / ``found_inf``.

GradScaler does not unscale the gradients of an optimizer with ``_step_supports_amp_scaling = True``:
``scaler.step(opt)`` sets ``opt.grad_scale`` (the loss scale, or ``None`` if ``scaler.unscale_(opt)`` was called)
and ``opt.found_inf`` (1.0 if some gradient is inf/NaN) and calls ``opt.step()``. :func:`donated_step` then runs
the update:

* a transformation registered with :func:`pureopt.kernels.fused.mark_amp_native` (SGD, Adam/AdamW, Adagrad:
  one kernel that reads the raw gradients) receives both in its :class:`~pureopt.base.UpdateContext`; where
  its step is torch's own fused call they go to the kernel, which divides the gradients by ``grad_scale``
  (writing them back unscaled) and skips the whole update when ``found_inf`` is set, without a host sync:
  bitwise torch.optim's ``fused=True``. On its other paths (another ``impl``, a ``state_dtype``, sparse
  gradients, ...) the kernel falls back to the generic handling itself;
* anything else (chains, wrappers, algorithms without a fused kernel) takes the generic path: the gradients are
  divided by ``grad_scale`` out of place (``p.grad`` stays scaled) and ``found_inf`` is read on the host to skip
  the step, as GradScaler does itself for optimizers without fused kernels.

A skipped step changes nothing: parameters, per-parameter state and ``num_updates`` stay as they were.

``TorchOptimizer`` advertises ``_step_supports_amp_scaling`` only when every group runs torch's fused kernel by
request (``impl="fused"`` with an amp-native transformation), as torch's ``fused=True`` optimizers do; otherwise
GradScaler unscales the gradients itself and this module only sees unscaled ones. The other adapters (and tests)
that set ``grad_scale`` / ``found_inf`` themselves get the handling above for any transformation.
"""

from __future__ import annotations

import torch

from pureopt.base import LeafList, LeafUpdateFn, OptState, UpdateContext, add_inplace
from pureopt.kernels.fused import amp_unscale, is_amp_native

__all__ = ["donated_step"]


def donated_step(
    update_leaves: LeafUpdateFn, grads: LeafList, state: OptState, params: LeafList, ctx: UpdateContext
) -> OptState:
    """Run one donated update, honouring ``ctx.grad_scale`` / ``ctx.found_inf``; returns the new state.

    The parameters are updated in place (the transformation's own in-place pass, or its returned updates added
    with :func:`pureopt.base.add_inplace`) and the state's buffers are reused, as in
    :func:`pureopt.inplace_step`. Without ``grad_scale`` and ``found_inf`` this is exactly that step.

    Args:
      update_leaves: the leaf-level update (``pureopt.base.as_leaf_update(tx)``).
      grads: the gradient leaves (``None`` for parameters without a gradient). Read only, except that torch's
        fused kernels write the unscaled values back when they run (as torch.optim's ``fused=True`` does).
      state: the current state; its buffers are overwritten.
      params: the parameter leaves, updated in place.
      ctx: the context, with ``donate=True`` (and ``apply=True`` as the adapters pass it), ``grad_scale`` and
        ``found_inf`` as GradScaler set them on the optimizer.

    Returns:
      The new state (the old one is returned unchanged when the generic path skips the step).

    Example::

        ctx = UpdateContext(spec, donate=True, apply=True, grad_scale=opt.grad_scale, found_inf=opt.found_inf)
        state = donated_step(as_leaf_update(tx), grads, state, params, ctx)
    """
    if (ctx.grad_scale is not None or ctx.found_inf is not None) and not ctx.donate:
        raise ValueError("grad_scale/found_inf are only passed to a donated step (donate=True)")
    with torch.no_grad():
        if ctx.grad_scale is not None or ctx.found_inf is not None:
            if is_amp_native(update_leaves):
                if ctx.found_inf is not None:  # GradScaler sums per-device flags; the kernels skip on exactly 1.0
                    ctx = ctx.but(found_inf=(ctx.found_inf != 0).to(torch.float32))
            else:
                unscaled = amp_unscale(grads, ctx.grad_scale, ctx.found_inf)
                if unscaled is None:  # inf/NaN: the step is skipped
                    return state
                grads, ctx = unscaled, ctx.but(grad_scale=None, found_inf=None)
        updates, new_state = update_leaves(grads, state, params, ctx)
        if updates is not None:
            add_inplace(params, updates)
    return new_state
