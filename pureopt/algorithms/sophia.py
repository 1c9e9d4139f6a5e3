"""Sophia-G: clipped, Hessian-preconditioned momentum, as the ``sophia-opt`` package's ``SophiaG``.

Update rule (Liu et al. 2023, Algorithm 3, in the reference's form), per parameter ``p`` with gradient ``g``::

    g <- -g                                              if maximize
    h <- beta2 * h + (1 - beta2) * hessian               only when ``update`` is given ``hessian=``
    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    p <- p - lr * sign(m) * min(|m| / (rho * h + eps), 1)

``hessian`` is a tree like the gradients holding the estimate of the Hessian's diagonal, passed as
``tx.update(grads, state, params, hessian=hessian)`` on the steps that have one (every ``k`` steps in the paper's
loop; between them ``h`` stays). For Sophia-G it is the Gauss-Newton-Bartlett estimate ``B * g_hat * g_hat``, with
``g_hat`` the gradient of the loss on labels sampled from the model and ``B`` the batch size (in tokens); a
Hutchinson estimate ``u * (H u)`` gives Sophia-H. The reference squares ``g_hat`` itself
(``optimizer.update_hessian()`` after a backward pass on sampled labels) and multiplies by ``B`` in the step
(``step(bs=B)``: ``rho * B * h``): pass ``hessian = B * g_hat**2`` for the same numbers. Its order is ``step`` then
``update_hessian`` (for the next step); here the estimate given to an update is used by that update, so pass the
one the reference would have accumulated before that step.

Elementwise (given the estimate), so it runs on flat buffers too when no ``hessian`` is passed (a ``hessian`` tree
must be structured like the gradients given to ``update``; ``pureopt.flatten`` refuses one, and ``hessian=`` on
DTensor (FSDP2) parameters is not handled yet: the step runs on local shards, the estimate's leaves would not). The
per-parameter step counts are kept for the state format (the rule does not use them). The ``scale_by_sophia``
form returns ``sign(m) * min(|m| / (rho h + eps), 1)``.
Oracle: ``sophia_opt.SophiaG``.

Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training",
ICLR 2024 (arXiv 2305.14342).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pureopt.algorithms.define import LR, Algorithm, Betas, Eps, Impl, Kernel, NonNeg, StateDtype, state, step_count
from pureopt.base import GradientTransformation
from pureopt.kernels.common import add_decay, add_update, as_real, cast_like, decay_params

__all__ = ["SOPHIA", "SophiaGState", "sophia_g", "scale_by_sophia"]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, Any]:
    # the estimate rides along with the per-element columns, so that the chunked applied path slices it too
    given = k.extra.get("hessian")
    return {"estimate": None if given is None else cast_like(as_real(given), k.g)}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h, own = k.ops, k.h, k.own
    beta1, beta2 = h.betas
    g = ops.neg(k.g) if h.maximize else k.g
    new: dict[str, list[Tensor]] = {}
    hess = k.hessian
    if k.estimate is not None:
        hess = new["hessian"] = ops.add(
            ops.mul(hess, beta2, inplace=k.donate), k.estimate, alpha=1 - beta2, inplace=k.donate
        )
    decay = h.weight_decay != 0 and h.lr is not None
    if decay and k.apply:  # the reference's p.mul_(1 - lr * weight_decay), first
        decay_params(ops, k.p, h.lr, h.weight_decay)
    m = new["exp_avg"] = ops.add(ops.mul(k.exp_avg, beta1, inplace=k.donate), g, alpha=1 - beta1, inplace=k.donate)
    ratio = ops.div_list(ops.abs(m), ops.add_scalar(ops.mul(hess, h.rho), h.eps, inplace=own), inplace=own)
    ratio = ops.clamp(ratio, hi=1.0, inplace=own)
    direction = ops.mul_list(ops.sign(m), ratio, inplace=own)  # (exact: a sign times the ratio)
    if k.apply:  # the reference's p.addcmul_(sign(m), ratio, value=-lr)
        return add_update(ops, k.p, direction, k.coef, owned=own), new
    updates = add_update(ops, None, direction, k.coef, owned=own)
    assert updates is not None
    if decay:
        updates = add_decay(ops, updates, k.p, h.lr, h.weight_decay, inplace=own)
    return updates, new


SOPHIA = Algorithm(
    "SophiaG",
    record="SophiaGState",
    fields={
        "step": step_count(),
        "exp_avg": state("first moments."),
        "hessian": state("the running average of the Hessian-diagonal estimates."),
    },
    math=_math,
    scalars=_scalars,
    leaf_args=("hessian",),
    check_order=("lr", "betas", "rho", "weight_decay"),
    doc="State of :func:`sophia_g` and :func:`scale_by_sophia` (``sophia_opt.SophiaG``'s state keys).",
)
SophiaGState = SOPHIA.state


@SOPHIA.public
def sophia_g(
    lr: LR = 1e-4,
    betas: Betas = (0.965, 0.99),
    rho: NonNeg = 0.04,
    weight_decay: NonNeg = 0.1,
    *,
    eps: Eps = 1e-15,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Sophia-G, as ``sophia_opt.SophiaG`` (the rule is in the module docstring; the same defaults).

    Args:
      betas: decay of the momentum and of the Hessian estimate's running average.
      rho: scale of the preconditioner (the paper's ``gamma``; the reference multiplies it by ``bs`` too).
      weight_decay: decoupled weight decay ``p <- p * (1 - lr * weight_decay)``.
      eps: guard of the denominator (the reference's constant ``1e-15``).

    Example::

        tx = pureopt.sophia_g(lr=2e-4, rho=0.05)
        updates, state = tx.update(grads, state, params)                     # most steps
        updates, state = tx.update(grads, state, params, hessian=estimate)   # every k steps

    Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training", ICLR 2024.
    """
    return SOPHIA.build(locals())


@SOPHIA.public
def scale_by_sophia(
    betas: Betas = (0.965, 0.99),
    rho: NonNeg = 0.04,
    *,
    eps: Eps = 1e-15,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Replace updates by Sophia's clipped direction ``sign(m) * min(|m| / (rho * h + eps), 1)``; takes
    ``hessian=`` in ``update`` as :func:`sophia_g`.

    Example::

        tx = pureopt.chain(pureopt.scale_by_sophia(), pureopt.scale_by_learning_rate(1e-4))
    """
    return SOPHIA.build(locals())
