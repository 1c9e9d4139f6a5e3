"""Muon (momentum orthogonalised by a Newton-Schulz iteration, for 2-D parameters), as torch.optim.Muon.

Update rule, per 2-D parameter ``P`` of shape ``A x B`` with gradient ``G`` (``M`` starts at zero)::

    M <- M + (1 - momentum) * (G - M)                         (lerp)
    U  = G + momentum * (M - G)   if nesterov   else   M      (lerp)
    O  = NS(U)        Newton-Schulz (:mod:`pureopt.kernels.muon`): X = U / max(||U||_F, eps) (transposed if
                      A > B), then ns_steps times  S = X X^T;  X <- a X + (b S + c S S) X,  (a, b, c) = ns_coefficients
    P <- P * (1 - lr * weight_decay) - adjusted_lr * O
    adjusted_lr = lr * sqrt(max(1, A / B))        adjust_lr_fn None or "original" (Keller Jordan's)
                = lr * 0.2 * sqrt(max(A, B))      adjust_lr_fn "match_rms_adamw" (Moonshot's: reuse AdamW's lr)

As in torch, the iteration runs in bfloat16 whatever the parameter dtype (``ns_dtype`` changes that). Where the step
applies itself (the adapters, ``inplace_step``) each parameter is stepped in place by torch's own two operations, a
few matrices at a time on the CPU (the iteration's temporaries exist for one chunk). The pure update is returned as
``P_new - P`` with ``P_new`` computed by those operations, so that :func:`pureopt.apply_updates` gives torch's
parameter bit for bit wherever the step changes an entry by less than a factor of two (Sterbenz), which keeps
trajectories through the bfloat16 iteration identical. The ``scale_by_muon``
form returns ``O * adjusted_lr / lr``. On FSDP2 (DTensor parameters) the momentum and the update run on the local
shards and each whole matrix is orthogonalised on one owner rank (:mod:`pureopt.kernels.owner`, ``sharded=``).

Differences from torch 2.13: for bfloat16 parameters with ``nesterov=False``, torch's iteration divides its
momentum buffer in place (the bfloat16 cast is a no-op, so the buffer aliases the iterate); pureopt leaves the
buffer as the rule above says. All other cases match torch.optim.Muon step for step.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024
(https://kellerjordan.github.io/posts/muon/); Liu et al., "Muon is Scalable for LLM Training", 2025
(arXiv:2502.16982).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import Algorithm, Check, Field, Hyper, Impl, Kernel, StateDtype
from pureopt.base import GradientTransformation, ScalarOrSchedule, add_inplace
from pureopt.hyperparams import is_schedule, number
from pureopt.kernels import muon as ns_kernels  # (the iteration, called through its module: tests count the calls)
from pureopt.kernels.muon import (
    ADJUST_LR_FNS,
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    adjusted_lr_ratio,
    check_ns_coefficients,
    check_ns_steps,
    check_sharded,
)
from pureopt.kernels.owner import map_whole, spec_of

__all__ = ["MUON", "MuonState", "muon", "scale_by_muon"]


# --- torch.optim.Muon's checks, in its order and wording (the iteration's at construction, not at the step) ------


def _lr(lr: Any, name: str) -> Any:
    if is_schedule(lr):
        return lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    value = number(lr)
    if value == value and not 0.0 <= value:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def _at_least_zero(label: str) -> Check:
    def fn(value: Any, name: str) -> Any:
        if not 0.0 <= value:
            raise ValueError(f"{label} should be >= 0 but is: {value}")
        return value

    return Check(fn)


def _adjust_lr_fn(value: Any, name: str) -> Any:
    if value is not None and value not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {value} is not supported")
    return value


MuonLR = Annotated[ScalarOrSchedule, Check(_lr)]
Momentum = Annotated[float, _at_least_zero("momentum")]
WeightDecay = Annotated[float, _at_least_zero("weight decay")]
AdjustLrFn = Annotated[str | None, Check(_adjust_lr_fn)]
NsSteps = Annotated[int, Check(lambda value, name: check_ns_steps(value))]
NsCoefficients = Annotated[tuple[float, float, float], Check(lambda value, name: check_ns_coefficients(value))]
Sharded = Annotated[str, Check(lambda value, name: check_sharded(value))]


def _buffer(h: Hyper, dtype: torch.dtype | None) -> Any:
    def init(p: Tensor) -> Tensor:  # torch.optim.Muon's constructor checks, at init here
        if p.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        if p.is_complex():
            raise RuntimeError("Muon does not support complex parameters")
        return torch.zeros_like(p, dtype=dtype)

    return init


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Tensor]]]:
    ops, h = k.ops, k.h
    if any(g.ndim != 2 for g in k.g):
        raise ValueError("Param gradient must be a 2D matrix")
    bufs = ops.lerp(k.momentum_buffer, k.g, 1 - h.momentum, inplace=k.donate)
    ns = (h.ns_coefficients, h.ns_steps, h.eps, h.ns_dtype)
    new = {"momentum_buffer": bufs}
    if k.dtensors is not None:  # local shards: each whole matrix orthogonalised on one rank, scattered back
        directions = ops.lerp(k.g, bufs, h.momentum) if h.nesterov else bufs
        specs = [spec_of(g) for g in k.dtensors]
        whole = map_whole(directions, specs, lambda x: ns_kernels.newton_schulz_batch(x, *ns), h.ns_dtype, h.sharded)
        ortho: Iterator[Tensor] = iter(whole)
        shapes = [spec.shape for spec in specs]
    else:  # (lazily, matrix by matrix: applied, each is stepped before the next one's direction is made)
        lazy = (torch.lerp(g, b, h.momentum) for g, b in zip(k.g, bufs)) if h.nesterov else iter(bufs)
        ortho = (ns_kernels.newton_schulz(u, *ns) for u in lazy)
        shapes = [g.shape for g in k.g]
    ratios = [adjusted_lr_ratio(shape, h.adjust_lr_fn) for shape in shapes]
    if k.target is not None:
        for p, g, o, r in zip(k.target, k.g, ortho, ratios):
            if h.lr is None:  # (scale_by_muon: the update the caller would add)
                add_inplace([p], [o.to(g.dtype) * r])
            else:
                _step_param(p, o, h, r)
        return None, new
    if h.lr is None:
        return [o.to(g.dtype) * r for o, g, r in zip(ortho, k.g, ratios)], new
    # replayed out of place on a copy we own: the update is the new parameter minus the old
    new_params = ops.clone(k.p)
    for p, o, r in zip(new_params, ortho, ratios):
        _step_param(p, o, h, r)
    return ops.sub(new_params, k.p, inplace=True), new


def _step_param(p: Tensor, o: Tensor, h: Hyper, ratio: float) -> None:
    """torch.optim.Muon's step of one parameter, in place: ``p.mul_(1 - lr * wd); p.add_(O, alpha=-lr * ratio)``."""
    p.mul_(1 - h.lr * h.weight_decay)
    adjusted = h.lr * ratio
    if isinstance(adjusted, Tensor):  # a tensor alpha would cost a host sync: multiply instead
        p.add_(o.to(p.dtype) * -adjusted)
    else:
        p.add_(o, alpha=-adjusted)


MUON = Algorithm(
    "Muon",
    record="MuonState",
    fields={
        "momentum_buffer": Field(
            "per-parameter momentum buffers (torch.optim.Muon's ``momentum_buffer``), zeros at first.", _buffer
        )
    },
    math=_math,
    params_required="muon",
    params_required_when=lambda h: h.lr is not None,
    real_only=True,
    elementwise=False,
    tensorwise=True,  # (applied on the CPU: a few matrices at a time, each stepped in place as torch does)
    local_shards=True,
    local_chunks=False,  # (on local shards each matrix goes to its owner rank: every rank steps all at once)
    check_order=("lr", "momentum", "weight_decay", "adjust_lr_fn", "ns_steps", "ns_coefficients"),
    doc="State of :func:`scale_by_muon` and :func:`muon`.",
)
MuonState = MUON.state


@MUON.public
def muon(
    lr: MuonLR = 1e-3,
    weight_decay: WeightDecay = 0.1,
    momentum: Momentum = 0.95,
    nesterov: bool = True,
    ns_coefficients: NsCoefficients = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    ns_steps: NsSteps = DEFAULT_NS_STEPS,
    adjust_lr_fn: AdjustLrFn = None,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: Sharded = "owner",
) -> GradientTransformation:
    """Muon, as ``torch.optim.Muon``: momentum orthogonalised by a Newton-Schulz iteration, for 2-D parameters (the
    rule is in the module docstring).

    Every parameter must be a real 2-D matrix (checked at ``init`` with torch's message); optimize biases,
    embeddings and other parameters with e.g. :func:`pureopt.adamw` (see :func:`pureopt.partition`).

    Args:
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

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024; Liu et al., "Muon is
    Scalable for LLM Training", 2025.
    """
    return MUON.build(locals())


@MUON.public
def scale_by_muon(
    momentum: Momentum = 0.95,
    nesterov: bool = True,
    ns_coefficients: NsCoefficients = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    ns_steps: NsSteps = DEFAULT_NS_STEPS,
    adjust_lr_fn: AdjustLrFn = None,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: Sharded = "owner",
) -> GradientTransformation:
    """Muon's direction as a building block: momentum, then Newton-Schulz orthogonalisation, then shape scaling
    (``NS(U) * sqrt(max(1, A / B))``, or ``NS(U) * 0.2 * sqrt(max(A, B))`` for ``"match_rms_adamw"``).

    No learning rate and no sign flip: ``chain(scale_by_muon(), add_decayed_weights(wd),
    scale_by_learning_rate(lr))`` is Muon (up to rounding; :func:`muon` replays torch's exact operations). The
    arguments are :func:`muon`'s.

    Example::

        tx = pureopt.chain(pureopt.scale_by_muon(), pureopt.scale_by_learning_rate(0.02))
    """
    return MUON.build(locals())
