"""Adafactor (factored second moments, relative step size, update clipping), as torch.optim.Adafactor.

Update rule, per parameter ``p`` with gradient ``g`` and its own step count ``t``::

    g <- -g                                              if maximize
    t <- t + 1
    w = t ** beta2_decay                                 (1 - beta2_t)
    rho = min(lr, 1 / sqrt(t))
    alpha = max(eps2, RMS(p)) * rho                      (RMS(x) = ||x||_2 / sqrt(numel(x)))
    if p has 2 or more dims (factored over the last two):
        R <- R + w * (mean(g * g, dim=-1) - R)           (row_var)
        C <- C + w * (mean(g * g, dim=-2) - C)           (col_var)
        V = (R @ C) / max(mean(R, dim=-2), eps1)
    else:
        V <- V + w * (g * g - V)                         (variance)
    U = g / sqrt(max(V, eps1 ** 2))
    update = -alpha / max(1, RMS(U) / d) * U
    update <- update - lr * weight_decay * p             if weight_decay != 0

``eps1=None`` is the machine epsilon of the dtype the update is computed in. The ``scale_by_factored_rms`` form
returns the clipped direction ``U / max(1, RMS(U) / d)`` without the relative step size or weight decay. As in
torch, which state keys a parameter has depends on its shape: one with two or more dimensions keeps ``row_var``
(the last dim set to 1) and ``col_var`` (the second-to-last set to 1), its ``variance`` entry is ``()``; a vector or
0-d parameter keeps ``variance`` and its ``row_var`` / ``col_var`` entries are ``()``. Complex parameters are refused.

torch reads ``step``, ``||p||`` and ``||U||`` back to the host with ``.item()``; here every such scalar stays a 0-d
tensor (stacked over the parameters), so an update never synchronises with the device. The row / column reductions
are per tensor on every path (as in torch's foreach implementation); the elementwise work runs through ``ListOps``.
Where the step applies its updates itself (the adapters, ``inplace_step``) on the CPU, it runs over a few whole
tensors at a time and adds their updates before the next ones' are made, so its full-size temporaries (the
second-moment estimate ``V``, the direction ``U``) exist for one chunk of tensors, not for every parameter at once.

DTensor parameters (FSDP2): the factors are DTensors placed like the parameter except along the dimension they
reduce (:func:`pureopt.kernels.dtensor.zeros_reduced`: a factor over a sharded dimension is replicated), the
reductions are DTensor ops (exact across shards: a row mean over a sharded dimension is a sum over the size), and
the norms come back as plain 0-d tensors (one all-reduce each) to be stacked with the step counts.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from pureopt.algorithms.define import Algorithm, Check, Field, Hyper, Impl, Kernel, StateDtype, step_count
from pureopt.base import GradientTransformation, ScalarOrSchedule, add_inplace
from pureopt.hyperparams import is_schedule, number
from pureopt.kernels.common import cast_like, map_scalars_n, scalar_dtype, scalars_for
from pureopt.kernels.dtensor import as_plain_scalar, is_dtensor, like_placed, zeros_reduced
from pureopt.kernels.listops import ListOps

__all__ = ["ADAFACTOR", "ScaleByFactoredRmsState", "adafactor", "is_factored", "scale_by_factored_rms"]


def is_factored(p: Tensor) -> bool:
    """Whether Adafactor factors this parameter's second moment (two or more dimensions, as torch)."""
    return p.dim() > 1


def _clamp_min(ops: ListOps, xs: list[Tensor], lo: float, inplace: bool) -> list[Tensor]:
    if ops.foreach:
        if inplace:
            torch._foreach_clamp_min_(xs, lo)
            return xs
        return list(torch._foreach_clamp_min(xs, lo))
    if inplace:
        return [x.clamp_min_(lo) for x in xs]
    return [torch.clamp_min(x, lo) for x in xs]


def _rsqrt(ops: ListOps, xs: list[Tensor], inplace: bool) -> list[Tensor]:
    if ops.foreach:
        if inplace:
            torch._foreach_rsqrt_(xs)
            return xs
        return list(torch._foreach_rsqrt(xs))
    if inplace:
        return [x.rsqrt_() for x in xs]
    return [torch.rsqrt(x) for x in xs]


def _like(x: Tensor, ref: Tensor) -> Tensor:
    return x if x.dtype == ref.dtype and x.device == ref.device else x.to(device=ref.device, dtype=ref.dtype)


def _dtypes(k: Kernel) -> list[torch.dtype]:
    """The dtype each update is computed in: the state's (state_dtype=) or the gradient's."""
    return [(v if is_factored(g) else s).dtype for g, v, s in zip(k.g, k.row_var, k.variance)]


def _in_dtypes(xs: list[Tensor], dtypes: list[torch.dtype]) -> list[Tensor]:
    return [x if x.dtype == dt else x.to(dt) for x, dt in zip(xs, dtypes)]


def _scalars(k: Kernel, steps: list[Tensor]) -> Mapping[str, list[Any]]:
    # per-tensor scalars: 1 - beta2_t and alpha (before any decay, as torch)
    h = k.h
    lr = h.lr
    if not steps:
        return {}

    def first(t: Tensor, param_rms: Tensor) -> tuple[Tensor, ...]:
        t = t.to(scalar_dtype(t.device))
        one_minus_beta2 = torch.pow(t, h.beta2_decay)
        if lr is None:
            return (one_minus_beta2,)
        inv_sqrt_t = 1 / torch.pow(t, 0.5)
        rho = torch.minimum(lr.to(t.dtype), inv_sqrt_t) if isinstance(lr, Tensor) else inv_sqrt_t.clamp_max(lr)
        alpha = torch.clamp_min(param_rms.to(t.dtype), h.eps2) * rho
        return one_minus_beta2, alpha

    if k.p is not None and lr is not None:  # (each parameter cast on its own: one copy at a time)
        param_rms = [
            as_plain_scalar(torch.linalg.vector_norm(_in_dtypes([p], [dt])[0])).to(scalar_dtype(s.device))
            / (max(p.numel(), 1) ** 0.5)
            for p, dt, s in zip(k.p, _dtypes(k), steps)
        ]
    else:
        param_rms = list(steps)  # unused
    scalars = map_scalars_n(first, steps, param_rms, outputs=1 if lr is None else 2, keep_dtype=True)
    return {"weights": scalars[0], "alphas": scalars[-1], "counts": steps}


def _math(k: Kernel) -> tuple[list[Tensor] | None, Mapping[str, list[Any]]]:
    ops, h, donate, tmp = k.ops, k.h, k.donate, k.own
    lr, eps1 = h.lr, h.eps1
    if not k.g:
        return [], {}
    grads, row_vars, col_vars, variances = k.g, k.row_var, k.col_var, k.variance
    g = _in_dtypes(k.g, _dtypes(k))
    if h.maximize:
        g = ops.neg(g)
    rparams = cast_like(k.p, g) if k.p is not None else None
    new_rows: list[Any] = list(row_vars)
    new_cols: list[Any] = list(col_vars)
    new_vars: list[Any] = list(variances)
    estimates: list[Tensor] = []
    # eps1's default is the machine epsilon of the gradients' dtype (torch's), not of the state's: bf16 state
    # (state_dtype=) made it 2**-7 for float32 parameters and clamped second moments below 6e-5
    eps = [torch.finfo(x.dtype).eps if eps1 is None else eps1 for x in k.g]
    for i, gi in enumerate(g):
        e1 = eps[i]
        w = _like(k.weights[i], gi)
        if gi.numel() == 0:  # nothing to average (torch would divide by a zero size)
            estimates.append(torch.ones_like(gi))
        elif is_factored(gi):
            # mean(g * g) over a dim, formed as torch forms it: ||g||^2 / size
            row_mean = torch.linalg.vector_norm(gi, 2, dim=-1, keepdim=True).square().div(gi.size(-1))
            col_mean = torch.linalg.vector_norm(gi, 2, dim=-2, keepdim=True).square().div(gi.size(-2))
            if sharded := is_dtensor(gi):  # placed as the factors are (reductions over sharded dims are exact)
                row_mean, col_mean = like_placed(row_mean, row_vars[i]), like_placed(col_mean, col_vars[i])
            if donate:
                row, col = row_vars[i].lerp_(row_mean, w), col_vars[i].lerp_(col_mean, w)
            else:
                row, col = torch.lerp(row_vars[i], row_mean, w), torch.lerp(col_vars[i], col_mean, w)
                row, col = like_placed(row, row_vars[i]), like_placed(col, col_vars[i])
            new_rows[i], new_cols[i] = row, col
            est = row @ col
            # a DTensor's mean over a sharded dimension as a sum (exact for uneven shards) over the size
            row_avg = row.sum(dim=-2, keepdim=True) / row.size(-2) if sharded else row.mean(dim=-2, keepdim=True)
            estimates.append(est / row_avg.clamp_min(e1))
        else:
            sq = gi * gi
            var = variances[i].lerp_(sq, w) if donate else torch.lerp(variances[i], sq, w)
            new_vars[i] = var
            estimates.append(var.clone() if donate else var)
    # U = g / sqrt(max(V, eps1**2)); estimates that are state (unfactored, not donated) are not written
    eps_sq = [e**2 for e in eps]
    owned = [tmp and est is not new_vars[i] for i, est in enumerate(estimates)]
    if all(owned) and len({*eps_sq}) <= 1:
        clamped = _clamp_min(ops, estimates, eps_sq[0] if eps_sq else 0.0, inplace=tmp)
    else:
        clamped = [
            est.clamp_min_(e) if own else torch.clamp_min(est, e) for est, e, own in zip(estimates, eps_sq, owned)
        ]
    u = ops.mul_list(_rsqrt(ops, clamped, inplace=tmp), g, inplace=tmp)

    u_rms = [
        as_plain_scalar(torch.linalg.vector_norm(x)).to(scalar_dtype(s.device)) / ((max(x.numel(), 1) ** 0.5) * h.d)
        for x, s in zip(u, k.counts)
    ]
    if lr is None:
        (denoms,) = map_scalars_n(lambda r: (torch.clamp_min(r, 1.0),), u_rms, outputs=1, keep_dtype=True)
        updates = ops.div(u, scalars_for(denoms, u), inplace=tmp)
    else:
        (coefs,) = map_scalars_n(
            lambda a, r: (-a / torch.clamp_min(r, 1.0),), k.alphas, u_rms, outputs=1, keep_dtype=True
        )
        updates = ops.mul(u, scalars_for(coefs, u), inplace=tmp)
        if h.weight_decay != 0:
            decay = -lr * h.weight_decay
            if isinstance(decay, Tensor):
                decays = scalars_for([decay] * len(updates), updates)
                updates = ops.add(updates, ops.mul(rparams, decays), inplace=tmp)
            else:
                updates = ops.add(updates, rparams, alpha=decay, inplace=tmp)
    if any(map(is_dtensor, grads)):  # DTensor ops may place an update otherwise (a product with a replicated factor)
        updates = [like_placed(u, g0) for u, g0 in zip(updates, grads)]
    new = {"row_var": new_rows, "col_var": new_cols, "variance": new_vars}
    if k.target is not None:  # (applied here, a chunk of whole tensors at a time: as the adapters add updates)
        add_inplace(k.target, updates)
        return None, new
    return updates, new


def _real(p: Tensor) -> Tensor:
    if p.is_complex():
        raise RuntimeError("Adafactor does not support complex parameters")
    return p


def _factor(dim: int) -> Callable[[Hyper, torch.dtype | None], Callable[[Tensor], Any]]:
    def make(h: Hyper, dtype: torch.dtype | None) -> Callable[[Tensor], Any]:
        def init(p: Tensor) -> Any:
            p = _real(p)
            if not is_factored(p):
                return ()
            return zeros_reduced(p, dim, dtype or p.dtype)  # a DTensor for a DTensor parameter

        return init

    return make


def _variance(h: Hyper, dtype: torch.dtype | None) -> Callable[[Tensor], Any]:
    def init(p: Tensor) -> Any:
        p = _real(p)
        return () if is_factored(p) else torch.zeros_like(p, dtype=dtype)

    return init


ADAFACTOR = Algorithm(
    "Adafactor",
    record="ScaleByFactoredRmsState",
    fields={
        "step": step_count(),
        "row_var": Field("row factors of the second moment (factored parameters).", _factor(-1), like_param=False),
        "col_var": Field("column factors of the second moment (factored parameters).", _factor(-2), like_param=False),
        "variance": Field("unfactored second moments (vectors and 0-d parameters).", _variance, like_param=False),
    },
    math=_math,
    scalars=_scalars,
    elementwise=False,
    tensorwise=True,
    params_required="adafactor",
    params_required_when=lambda h: h.lr is not None,
    real_only=True,
    doc="State of :func:`adafactor` and :func:`scale_by_factored_rms` (torch.optim.Adafactor's state keys; see "
    "the module docstring for which a parameter keeps).",
)
ScaleByFactoredRmsState = ADAFACTOR.state


# --- torch.optim.Adafactor's checks and wording ---------------------------------------------------------------------


def _lr(value: Any, name: str) -> Any:
    if is_schedule(value):
        return value
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    x = number(value)
    if x == x and not 0.0 <= x:
        raise ValueError(f"Learning rate should be >= 0 but is: {value}")
    return value.reshape(()) if isinstance(value, Tensor) else value


def _beta2_decay(value: Any, name: str) -> Any:
    if not 0.0 >= value:
        raise ValueError(f"beta2_decay should be <= 0 but is: {value}")
    return value


def _eps1(value: Any) -> None:
    if value is not None and not 0.0 <= value:
        raise ValueError(f"epsilon1 should be >= 0 but is: {value}")


def _eps_pair(value: Any, name: str) -> Any:
    _eps1(value[0])
    if not 0.0 <= value[1]:
        raise ValueError(f"epsilon2 should be >= 0 but is: {value[1]}")
    return value


def _eps(value: Any, name: str) -> Any:
    _eps1(value)
    return value


def _d(value: Any, name: str) -> Any:
    if not 1.0 <= value:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {value}")
    return value


def _weight_decay(value: Any, name: str) -> Any:
    if not 0.0 <= value:
        raise ValueError(f"weight_decay should be >= 0 but is: {value}")
    return value


Beta2Decay = Annotated[float, Check(_beta2_decay)]
D = Annotated[float, Check(_d)]


@ADAFACTOR.public
def adafactor(
    lr: Annotated[ScalarOrSchedule, Check(_lr)] = 1e-2,
    beta2_decay: Beta2Decay = -0.8,
    eps: Annotated[tuple[float | None, float], Check(_eps_pair)] = (None, 1e-3),
    d: D = 1.0,
    weight_decay: Annotated[float, Check(_weight_decay)] = 0.0,
    *,
    maximize: bool = False,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Adafactor, as ``torch.optim.Adafactor``: factored second moments and a step size relative to the weights
    (the rule is in the module docstring).

    Args:
      lr: caps the relative step size ``rho`` and scales the weight decay (float, 0-d tensor or schedule).
      beta2_decay: exponent of the second-moment decay schedule (<= 0).
      eps: ``(eps1, eps2)``: the floor of the second-moment estimate (``None``: the machine epsilon of the
        dtype the update is computed in) and the floor of ``RMS(p)`` in the step size.
      d: clipping threshold on the RMS of the normalised update (>= 1).
      weight_decay: decoupled weight decay coefficient.
      maximize: maximize the objective instead of minimizing.
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the factors (default: the parameter's, as torch); e.g. ``torch.float32`` for bf16
        parameters.

    Example::

        tx = pureopt.adafactor(lr=1e-2, weight_decay=1e-2)

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
    """
    eps1 = None if eps[0] is None else float(eps[0])
    return ADAFACTOR.build(
        locals(), beta2_decay=float(beta2_decay), d=float(d), weight_decay=float(weight_decay), eps1=eps1,
        eps2=float(eps[1]),
    )  # fmt: skip


@ADAFACTOR.public
def scale_by_factored_rms(
    beta2_decay: Beta2Decay = -0.8,
    eps: Annotated[float | None, Check(_eps)] = None,
    d: D = 1.0,
    *,
    impl: Impl = "auto",
    state_dtype: StateDtype = None,
) -> GradientTransformation:
    """Normalise updates by Adafactor's (factored) second-moment estimate, then clip their RMS to ``d``: the rule
    of the module docstring without the relative step size and weight decay (chain with a learning rate to
    descend). The second moment of a matrix costs ``rows + cols`` numbers instead of ``rows * cols``.

    Args:
      beta2_decay: exponent of the decay schedule ``1 - beta2_t = t ** beta2_decay`` (<= 0).
      eps: floor of the estimate (torch's ``eps1``); ``None`` is the machine epsilon of the update's dtype.
      d: clipping threshold on the RMS of the normalised update (>= 1).
      impl: kernel path, ``"auto" | "loop" | "foreach"``.
      state_dtype: dtype of the factors (default: the parameter's).

    Example::

        tx = pureopt.chain(pureopt.scale_by_factored_rms(), pureopt.scale_by_learning_rate(1e-2))

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018.
    """
    return ADAFACTOR.build(locals(), eps1=None if eps is None else float(eps), eps2=0.0)
