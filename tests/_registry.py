"""Every optimizer configuration the cross-cutting tests (kernels, donation, compile, vmap) run over.

Each entry: ``(id, factory)`` where ``factory(impl)`` builds the optimizer with that ``impl``.
Add new optimizers here; ``FUSED`` lists the ids whose algorithm has a torch fused kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pureopt

Factory = Callable[[str], pureopt.GradientTransformation]


def _sgd_grid() -> list[tuple[str, Factory]]:
    out: list[tuple[str, Factory]] = []
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True]):
        if n and (m == 0 or d != 0):
            continue
        kw = dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
        out.append((f"sgd{kw}", lambda impl, kw=kw: pureopt.sgd(lr=0.05, impl=impl, **kw)))
    return out


def _adam_grid() -> list[tuple[str, Factory]]:
    out: list[tuple[str, Factory]] = []
    for a, wd, mx, dw in itertools.product([False, True], [0.0, 0.1], [False, True], [False, True]):
        kw = dict(amsgrad=a, weight_decay=wd, maximize=mx, decoupled_weight_decay=dw)
        out.append((f"adam{kw}", lambda impl, kw=kw: pureopt.adam(lr=0.01, impl=impl, **kw)))
    out.append(("adamw", lambda impl: pureopt.adamw(lr=0.01, impl=impl)))
    return out


OPTIMIZERS: list[tuple[str, Factory]] = [*_sgd_grid(), *_adam_grid()]


def fused_available(opt_id: str) -> bool:
    """Whether the configuration has a torch fused kernel (SGD only without dampening)."""
    if opt_id.startswith("sgd"):
        return "'dampening': 0.0" in opt_id or "'momentum': 0.0" in opt_id
    return opt_id.startswith("adam")
