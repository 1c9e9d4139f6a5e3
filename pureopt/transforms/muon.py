"""Muon's orthogonalised momentum (``scale_by_muon``), Newton-Schulz ``orthogonalize`` and the Muon transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import (
    EmptyState,
    GradientTransformation,
    LeafList,
    OptState,
    ScalarOrSchedule,
    UpdateContext,
    leaf_transformation,
)
from pureopt.hyperparams import resolve
from pureopt.kernels.dtensor import dtensor_type, is_dtensor, local_shard_problem, run_on_local_shards
from pureopt.kernels.muon import (
    ADJUST_LR_FNS,
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    muon,
    newton_schulz,
    newton_schulz_batch,
)
from pureopt.kernels.owner import MODES, map_whole, map_whole_dtensors, spec_of
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform

__all__ = [
    "MuonState",
    "check_muon_args",
    "check_sharded",
    "check_2d_params",
    "muon_transform",
    "scale_by_muon",
    "orthogonalize",
]


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon` and :func:`pureopt.optimizers.muon.muon`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      momentum_buffer: per-parameter momentum buffers (torch.optim.Muon's ``momentum_buffer``), zeros at first.
    """

    num_updates: Tensor
    momentum_buffer: Any


def check_muon_args(
    momentum: float, weight_decay: float, ns_coefficients: Sequence[float], ns_steps: int, adjust_lr_fn: str | None
) -> None:
    """torch.optim.Muon's checks on its non-lr hyperparameters, in its order and wording.

    torch checks ``ns_steps`` and ``ns_coefficients`` only when it steps; pureopt checks them at construction.
    """
    if not 0.0 <= momentum:
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
    if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def check_sharded(sharded: str) -> None:
    """``sharded`` must name a way to orthogonalise sharded matrices (:data:`pureopt.kernels.owner.MODES`)."""
    if sharded not in MODES:
        raise ValueError(f"sharded must be one of {MODES}, got {sharded!r}")


def check_2d_params(leaves: Sequence[Any]) -> None:
    """Muon works on matrices only: torch.optim.Muon's error for any other parameter (and for complex ones)."""
    for p in leaves:
        if p is None:
            continue
        if p.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        if p.is_complex():
            raise RuntimeError("Muon does not support complex parameters")


def muon_transform(
    lr: ScalarOrSchedule | None,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: Sequence[float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    impl: str,
    state_dtype: torch.dtype | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: str = "owner",
) -> GradientTransformation:
    """The Muon step (see :mod:`pureopt.kernels.muon`) as a transformation; ``lr=None`` is ``scale_by_muon``.

    ``sharded``: how DTensor (FSDP2) matrices are orthogonalised: ``"owner"`` gathers each on one rank
    (:func:`pureopt.kernels.owner.map_whole`), ``"all"`` on every rank (``full_tensor``, the naive path).
    """
    check_impl(impl)
    check_sharded(sharded)
    coefficients = tuple(float(c) for c in ns_coefficients)

    def ns_batch(x: Tensor) -> Tensor:
        return newton_schulz_batch(x, coefficients, ns_steps, eps, ns_dtype)

    def _step_fn(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        if any(map(is_dtensor, grads)) and local_shard_problem(dtensor_type(), params, grads, s) is None:
            # FSDP2: momentum and the parameter update on the local shards; each whole matrix orthogonalised
            # on one rank and scattered back
            specs = [spec_of(g) for g in grads]
            shapes = [spec.shape for spec in specs]

            def ortho(directions: list[Tensor]) -> list[Tensor]:
                return map_whole(directions, specs, ns_batch, ns_dtype, sharded)

            def local_step(
                p: list[Tensor] | None, g: list[Tensor], st: dict[str, list[Tensor]], *_: Any
            ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
                return kernel_step(p, g, st, num_updates, ctx, ortho, shapes)

            return run_on_local_shards(local_step, params, grads, s)  # type: ignore[return-value]
        return kernel_step(params, grads, s, num_updates, ctx, None, None)

    def kernel_step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
        ortho: Any,
        shapes: Any,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        res = muon(
            params,
            grads,
            s["momentum_buffer"],
            lr=None if lr is None else resolve(lr, num_updates),
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=coefficients,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            impl=impl,
            donate=ctx.donate,
            orthogonalize=ortho,
            shapes=shapes,
        )
        return res.updates, {"momentum_buffer": res.momentum_buffer}

    def buffer_init(p: Tensor) -> Tensor:
        check_2d_params([p])  # torch.optim.Muon's constructor check, at init here
        return torch.zeros_like(p, dtype=state_dtype)

    return kernel_transform(MuonState, {"momentum_buffer": buffer_init}, _step_fn)


def scale_by_muon(
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
    """Muon's direction as a building block: momentum, then Newton-Schulz orthogonalisation, then shape scaling.

    Update rule, per 2-D parameter of shape ``A x B`` (``M`` starts at zero)::

        M <- M + (1 - momentum) * (G - M)
        U  = G + momentum * (M - G)   if nesterov   else   M
        u  = NS(U) * sqrt(max(1, A / B))          (adjust_lr_fn None / "original")
           = NS(U) * 0.2 * sqrt(max(A, B))        (adjust_lr_fn "match_rms_adamw")

    No learning rate and no sign flip: ``chain(scale_by_muon(), add_decayed_weights(wd),
    scale_by_learning_rate(lr))`` is Muon (up to rounding; :func:`pureopt.optimizers.muon.muon` replays torch's
    exact operations).

    Args:
      momentum: momentum factor.
      nesterov: Nesterov-style momentum.
      ns_coefficients: coefficients ``(a, b, c)`` of the Newton-Schulz polynomial.
      eps: lower bound of the norm the direction is divided by before the iteration.
      ns_steps: number of Newton-Schulz steps (< 100).
      adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"``: the per-shape scale.
      impl: kernel path for the elementwise parts, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the momentum buffers (default: the parameter's).
      ns_dtype: dtype of the Newton-Schulz iteration (bfloat16, as torch.optim.Muon).
      sharded: DTensor (FSDP2) matrices: ``"owner"`` orthogonalises each on one rank (gathered there and scattered
        back, :mod:`pureopt.kernels.owner`), ``"all"`` on every rank (``full_tensor``).

    Example::

        tx = pureopt.chain(scale_by_muon(), pureopt.scale_by_learning_rate(0.02))

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024.
    """
    check_muon_args(momentum, 0.0, ns_coefficients, ns_steps, adjust_lr_fn)
    return muon_transform(
        None,
        0.0,
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


def orthogonalize(
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    ns_steps: int = DEFAULT_NS_STEPS,
    *,
    ns_dtype: torch.dtype = torch.bfloat16,
    sharded: str = "owner",
) -> GradientTransformation:
    """Replace each 2-D update by its Newton-Schulz orthogonalisation (stateless).

    Update rule, per 2-D update ``U`` (``X`` is ``U``, or ``U^T`` if ``U`` is taller than wide)::

        X <- X / max(||X||_F, eps)
        repeat ns_steps times:  S = X X^T;  X <- a X + (b S + c S S) X

    The result approximates the polar factor ``U V^T`` of ``U = U S V^T`` and is cast back to the update's dtype.
    Updates that are not 2-D raise a ValueError; ``None`` stays ``None``.

    Args:
      ns_coefficients: ``(a, b, c)``; ``(1.5, -0.5, 0.0)`` is the classic cubic iteration, which converges to
        ``U V^T`` exactly; the default quintic is faster but only lands the singular values near one.
      eps: lower bound of the norm the update is divided by.
      ns_steps: number of iterations (< 100).
      ns_dtype: dtype of the iteration (bfloat16, as torch.optim.Muon).
      sharded: DTensor (FSDP2) updates: ``"owner"`` orthogonalises each on one rank, ``"all"`` on every rank.

    Example::

        tx = pureopt.chain(pureopt.trace(0.95), orthogonalize(), pureopt.scale_by_learning_rate(0.02))
    """
    check_muon_args(0.0, 0.0, ns_coefficients, ns_steps, None)
    check_sharded(sharded)
    coefficients = tuple(float(c) for c in ns_coefficients)

    def ns_batch(x: Tensor) -> Tensor:
        return newton_schulz_batch(x, coefficients, ns_steps, eps, ns_dtype)

    def update_leaves(
        updates: LeafList, state: OptState, params: LeafList | None, ctx: UpdateContext
    ) -> tuple[LeafList, OptState]:
        del params, ctx
        for u in updates:
            if u is not None and u.ndim != 2:
                raise ValueError(f"orthogonalize only supports 2D updates, got one of size: {u.size()}")
        out = [
            None if u is None or is_dtensor(u) else newton_schulz(u, coefficients, ns_steps, eps, ns_dtype).to(u.dtype)
            for u in updates
        ]
        sharded_idx = [i for i, u in enumerate(updates) if is_dtensor(u)]
        if sharded_idx:  # FSDP2: each whole matrix on one rank (a collective: the same updates on every rank)
            results = map_whole_dtensors([updates[i] for i in sharded_idx], ns_batch, ns_dtype, sharded)
            for i, r in zip(sharded_idx, results):
                out[i] = r.to(updates[i].dtype)
        return out, state

    return leaf_transformation(lambda leaves, spec: EmptyState(), update_leaves)
