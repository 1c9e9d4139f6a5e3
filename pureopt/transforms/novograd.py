"""NovoGrad's layer-wise normalised momentum (``scale_by_novograd``) and the NovoGrad algorithm transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from pureopt.base import GradientTransformation, ScalarOrSchedule, UpdateContext
from pureopt.hyperparams import check_betas, check_nonneg, resolve
from pureopt.kernels.dtensor import dtensor_type, is_dtensor, local_shard_problem, run_on_local_shards, shard_norms
from pureopt.kernels.novograd import novograd as novograd_kernel
from pureopt.kernels.select import check_impl
from pureopt.transforms._util import kernel_transform, step_init, zeros

__all__ = ["NovoGradState", "novograd_transform", "scale_by_novograd"]


class NovoGradState(NamedTuple):
    """State of :func:`scale_by_novograd` and :func:`pureopt.optimizers.novograd.novograd`.

    Attributes:
      num_updates: number of updates so far (0-d int64 tensor), the argument of a learning-rate schedule.
      step: per-parameter step counts (the first step initialises the layer moment).
      exp_avg: per-parameter momentum of the normalised gradients.
      exp_avg_sq: the layer-wise second moment: one 0-d (real) tensor per parameter.
    """

    num_updates: Tensor
    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def _layer_scalar(state_dtype: torch.dtype | None) -> Any:
    return lambda p: torch.zeros((), dtype=(state_dtype or p.dtype).to_real(), device=p.device)


def novograd_transform(
    lr: ScalarOrSchedule | None,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_averaging: bool,
    maximize: bool,
    impl: str,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """The NovoGrad step (see :mod:`pureopt.kernels.novograd`); ``lr=None`` is ``scale_by_novograd``."""
    check_impl(impl)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        if any(map(is_dtensor, grads)):
            return sharded_step(params, grads, s, num_updates, ctx)
        return local_step(params, grads, s, num_updates, ctx)

    def sharded_step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        # DTensors (FSDP2): the layer norms over all shards (one all-reduce per mesh group), the rest on the local
        # shards; where the tensors cannot run on their local shards, on the DTensors with the norms made plain
        problem = local_shard_problem(dtensor_type(), params, grads, s)
        dtypes = [v.dtype for v in s["exp_avg_sq"]]  # the kernel's norm dtype (the real state dtype)
        work = dtypes[0] if len(set(dtypes)) == 1 else None
        if problem is not None:
            norms = [n if work is None else n.to(work) for n in shard_norms(grads)]
            return local_step(params, grads, s, num_updates, ctx, norms)
        norms = shard_norms(grads, work)

        def with_norms(
            p: list[Tensor] | None, g: list[Tensor], st: dict[str, list[Tensor]], *_: Any
        ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
            return local_step(p, g, st, num_updates, ctx, norms)

        return run_on_local_shards(with_norms, params, grads, s)

    def local_step(
        params: list[Tensor] | None,
        grads: list[Tensor],
        s: dict[str, list[Tensor]],
        num_updates: Tensor,
        ctx: UpdateContext,
        grad_norms: list[Tensor] | None = None,
    ) -> tuple[list[Tensor] | None, dict[str, list[Tensor]]]:
        res = novograd_kernel(
            params,
            grads,
            s["exp_avg"],
            s["exp_avg_sq"],
            s["step"],
            lr=None if lr is None else resolve(lr, num_updates),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            maximize=maximize,
            impl=impl,
            donate=ctx.donate,
            apply=ctx.apply,
            grad_norms=grad_norms,
        )
        return res.updates, {"step": res.step, "exp_avg": res.exp_avg, "exp_avg_sq": res.exp_avg_sq}

    fields = {"step": step_init, "exp_avg": zeros(state_dtype), "exp_avg_sq": _layer_scalar(state_dtype)}
    return kernel_transform(NovoGradState, fields, step)


def scale_by_novograd(
    betas: tuple[float, float] = (0.95, 0.98),
    eps: float = 1e-8,
    grad_averaging: bool = False,
    *,
    impl: str = "auto",
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Replace updates by NovoGrad's momentum of layer-wise normalised gradients.

    Update rule, per parameter tensor (``v`` one scalar per tensor; on the tensor's first step ``v = ||g||**2``)::

        v <- beta2 * v + (1 - beta2) * ||g||**2
        m <- beta1 * m + g / (sqrt(v) + eps)          ((1 - beta1) * g / ... with grad_averaging)
        u = m

    Args:
      betas: momentum factor and decay of the layer-wise second moment.
      eps: added to the denominator.
      grad_averaging: scale the new term by ``1 - beta1`` (an EMA instead of a plain momentum sum).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the moments (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_novograd(), pureopt.scale_by_learning_rate(1e-2))

    Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep
    Networks", 2019.
    """
    check_nonneg(eps, "epsilon")
    check_betas(betas)
    return novograd_transform(None, betas, eps, 0.0, grad_averaging, False, impl, state_dtype)
