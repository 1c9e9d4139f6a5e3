"""``lars``: layer-wise adaptive rate scaling (momentum SGD with a per-layer trust ratio)."""

from __future__ import annotations

import torch

from pureopt.base import GradientTransformation, ScalarOrSchedule
from pureopt.hyperparams import check_nonneg
from pureopt.optimizers._common import checked_lr
from pureopt.transforms.lars import lars_transform
from pureopt.transforms.trust_ratio import MaskOrFn

__all__ = ["lars"]


def lars(
    lr: ScalarOrSchedule = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    nesterov: bool = False,
    *,
    mask: MaskOrFn = None,
    maximize: bool = False,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """LARS: momentum SGD where each tensor's step is scaled by ``eta * ||w|| / (||g|| + weight_decay * ||w||)``.

    Update rule, per parameter tensor ``w`` (paper's Algorithm 1; ``v`` starts at zero and includes ``lr``)::

        g <- -g if maximize
        local_lr = eta * ||w|| / (||g|| + weight_decay * ||w|| + eps)    (1 where ||w|| == 0 or ||g|| == 0)
        v <- momentum * v + lr * local_lr * (g + weight_decay * w)
        w <- w - v                        (nesterov: w <- w - (lr * local_lr * (g + wd * w) + momentum * v))

    Tensors excluded by ``mask`` (customarily biases and normalisation weights) take plain momentum SGD steps:
    ``local_lr = 1`` and no weight decay. Because the trust coefficient ``eta`` is small (1e-3), LARS's global
    learning rate is large (order 1-10).

    Args:
      lr: global learning rate (float, 0-d tensor or schedule).
      momentum: momentum factor (>= 0; 0 keeps no buffer).
      weight_decay: L2 weight decay, in the direction and in the trust ratio's denominator.
      trust_coefficient: ``eta``, the trust coefficient (>= 0).
      eps: added to the trust ratio's denominator (>= 0).
      nesterov: Nesterov momentum.
      mask: a tree of booleans shaped like the parameters, or a function ``params -> that tree``: ``True`` where
        LARS's adaptation and weight decay apply. ``None``: everywhere.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's).

    Example::

        no_bias = lambda p: {k: v.ndim > 1 for k, v in p.items()}
        tx = pureopt.lars(lr=5.0, momentum=0.9, weight_decay=1e-6, mask=no_bias)

    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017 (arXiv:1708.03888).
    """
    lr = checked_lr(lr)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    check_nonneg(weight_decay, "weight_decay")
    check_nonneg(trust_coefficient, "trust_coefficient")
    check_nonneg(eps, "epsilon")
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum")
    return lars_transform(
        lr, momentum, weight_decay, trust_coefficient, eps, nesterov, maximize, mask, impl, state_dtype
    )
