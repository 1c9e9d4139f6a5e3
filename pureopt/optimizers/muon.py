"""``muon``: torch.optim.Muon with its argument names, defaults, validation and numerics."""

from __future__ import annotations

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import is_schedule, number
from pureopt.kernels.muon import DEFAULT_EPS, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS
from pureopt.transforms.muon import check_muon_args, muon_transform

__all__ = ["muon"]


def _check_muon_lr(lr: ScalarOrSchedule) -> ScalarOrSchedule:
    """torch.optim.Muon's own wording for a bad learning rate (it differs from the other optimizers')."""
    if is_schedule(lr):
        return lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    value = number(lr)  # type: ignore[arg-type]
    if value == value and not 0.0 <= value:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def muon(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    ns_steps: int = DEFAULT_NS_STEPS,
    adjust_lr_fn: str | None = None,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: str = "owner",
) -> GradientTransformation:
    """Muon, as ``torch.optim.Muon``: momentum orthogonalised by a Newton-Schulz iteration, for 2-D parameters.

    Update rule, per 2-D parameter ``P`` of shape ``A x B`` with gradient ``G`` (``M`` starts at zero)::

        M <- M + (1 - momentum) * (G - M)
        U  = G + momentum * (M - G)   if nesterov   else   M
        O  = NS(U)        Newton-Schulz: X = U / max(||U||_F, eps) (transposed if A > B), then ns_steps times
                          S = X X^T;  X <- a X + (b S + c S S) X      with (a, b, c) = ns_coefficients
        P <- P * (1 - lr * weight_decay) - adjusted_lr * O
        adjusted_lr = lr * sqrt(max(1, A / B))        adjust_lr_fn None or "original" (Keller Jordan's)
                    = lr * 0.2 * sqrt(max(A, B))      adjust_lr_fn "match_rms_adamw" (Moonshot's: reuse AdamW's lr)

    As in torch, the iteration runs in bfloat16 whatever the parameter dtype (``ns_dtype`` changes that).
    Every parameter must be a real 2-D matrix (checked at ``init`` with torch's message); optimize biases,
    embeddings and other parameters with e.g. :func:`pureopt.adamw` (see :func:`pureopt.partition`).

    Args:
      lr: learning rate (float, 0-d tensor or schedule).
      weight_decay: decoupled weight decay coefficient.
      momentum: momentum factor.
      nesterov: Nesterov-style momentum.
      ns_coefficients: coefficients ``(a, b, c)`` of the Newton-Schulz polynomial.
      eps: lower bound of the norm the direction is divided by.
      ns_steps: number of Newton-Schulz steps (< 100).
      adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"``.
      impl: kernel path for the elementwise parts, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's, as torch); e.g. ``torch.float32``
        for bf16 parameters. Updates are then computed in that dtype and cast back by ``apply_updates``.
      ns_dtype: dtype of the Newton-Schulz iteration (default bfloat16, torch's choice).
      sharded: for DTensor parameters (FSDP2): ``"owner"`` (default) gathers each matrix on one rank only
        (owners chosen by size, same-shape matrices batched), orthogonalises it there and sends every rank its
        shard back; ``"all"`` gathers every matrix on every rank (``full_tensor``: the naive path). The momentum
        and the parameter update run on the local shards either way. See docs/distributed.md.

    Example::

        tx = pureopt.muon(lr=0.02, momentum=0.95, weight_decay=0.01)
        state = tx.init({"w1": w1, "w2": w2})                 # 2-D weights only

    Differences from torch 2.13: for bfloat16 parameters with ``nesterov=False``, torch's iteration divides its
    momentum buffer in place (the bfloat16 cast is a no-op, so the buffer aliases the iterate); pureopt leaves the
    buffer as the update rule above says. All other cases match torch.optim.Muon step for step.

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
    (https://kellerjordan.github.io/posts/muon/); Liu et al., "Muon is Scalable for LLM Training", 2025.
    """
    lr = _check_muon_lr(lr)
    check_muon_args(momentum, weight_decay, ns_coefficients, ns_steps, adjust_lr_fn)
    return muon_transform(
        lr,
        weight_decay,
        momentum,
        nesterov,
        ns_coefficients,
        eps,
        ns_steps,
        adjust_lr_fn,
        impl,
        state_dtype,
        ns_dtype,
        sharded,
    )
