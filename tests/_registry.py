"""Every optimizer configuration the cross-cutting tests (kernels, donation, compile, vmap) run over.

Each entry: ``(id, factory)`` where ``factory(impl)`` builds the optimizer with that ``impl``.
Add new optimizers here; ``FUSED`` lists the ids whose algorithm has a torch fused kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

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


# (name, kwargs) for the other optimizers: a representative configuration or two each
_OTHERS: list[tuple[str, dict]] = [
    ("adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.1)),
    ("adadelta", dict(lr=1.0, weight_decay=0.1)),
    ("adamax", dict(lr=0.01, weight_decay=0.1)),
    ("asgd", dict(lr=0.01, t0=3.0)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
    ("rmsprop", dict(lr=0.01)),
    ("rprop", dict(lr=0.01)),
    ("nadam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", dict(lr=0.01, weight_decay=0.1)),
    ("adafactor", dict(lr=0.01)),
    ("lion", dict(lr=1e-3, weight_decay=0.1)),
    ("lamb", dict(lr=0.01, weight_decay=0.1)),
    ("lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("adabelief", dict(lr=0.01)),
    ("yogi", dict(lr=0.01)),
    ("novograd", dict(lr=0.01, weight_decay=0.1)),
    ("sign_sgd", dict(lr=0.01)),
    ("signum", dict(lr=0.01, momentum=0.9)),
    ("adan", dict(lr=0.01, weight_decay=0.02)),
    ("schedule_free_sgd", dict(lr=0.1)),
    ("schedule_free_adamw", dict(lr=0.01, warmup_steps=2)),
    ("ademamix", dict(lr=0.01)),
    ("adopt", dict(lr=0.01, weight_decay=0.1)),
    ("adopt", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=None)),
    ("laprop", dict(lr=0.01, weight_decay=0.1, centered=True, steps_before_using_centered=2, amsgrad=True)),
    ("madgrad", dict(lr=0.01, weight_decay=0.1)),
    ("madgrad", dict(lr=0.01, momentum=0.0, weight_decay=0.1, decoupled_weight_decay=True)),
    ("mars", dict(lr=0.01, weight_decay=0.1)),
    ("mars", dict(lr=0.01, mars_type="lion", amsgrad=True)),
    ("adamp", dict(lr=0.01, weight_decay=0.1, delta=1.0, nesterov=True)),
    ("sgdp", dict(lr=0.05, momentum=0.9, weight_decay=0.1, delta=1.0)),
    ("came", dict(lr=0.01, weight_decay=0.1)),
    ("sophia_g", dict(lr=0.01, rho=0.1)),
    ("prodigy", dict(lr=1.0, weight_decay=0.1, use_bias_correction=True, d0=0.1)),
    ("dadapt_adam", dict(lr=1.0, weight_decay=0.1, decouple=True)),
    ("dadapt_sgd", dict(lr=1.0, momentum=0.9, d0=0.1)),
    ("dog", dict(lr=1.0, weight_decay=0.01, init_eta=0.05)),  # (no tie of max(rbar, distance) at step 2)
]


def _others() -> list[tuple[str, Factory]]:
    out: list[tuple[str, Factory]] = []
    for name, kw in _OTHERS:
        fn = getattr(pureopt, name, None)
        if fn is None:  # not in this checkout
            continue
        out.append((f"{name}{kw}", lambda impl, fn=fn, kw=kw: fn(impl=impl, **kw)))
    return out


OPTIMIZERS: list[tuple[str, Factory]] = [*_sgd_grid(), *_adam_grid(), *_others()]


def _clipped_adamw(**kw: Any) -> pureopt.GradientTransformation:
    return pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(**kw))


# (id, public factory, keyword arguments with ``lr``): one configuration per algorithm plus a chain, for the tests
# that build each optimizer themselves (e.g. with a tensor ``lr`` on a device: tests/test_cuda.py)
CONFIGS: list[tuple[str, Callable[..., pureopt.GradientTransformation], dict[str, Any]]] = [
    ("sgd", pureopt.sgd, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("sgd-dampening", pureopt.sgd, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    ("adam", pureopt.adam, dict(lr=0.01, weight_decay=0.1)),
    ("adam-amsgrad", pureopt.adam, dict(lr=0.01, amsgrad=True)),
    ("adamw", pureopt.adamw, dict(lr=0.01, weight_decay=0.1)),
    ("adagrad", pureopt.adagrad, dict(lr=0.05, lr_decay=0.01)),
    ("adadelta", pureopt.adadelta, dict(lr=1.0)),
    ("adamax", pureopt.adamax, dict(lr=0.01)),
    ("asgd", pureopt.asgd, dict(lr=0.01, t0=3.0)),
    ("nadam", pureopt.nadam, dict(lr=0.01)),
    ("radam", pureopt.radam, dict(lr=0.01)),
    ("rmsprop", pureopt.rmsprop, dict(lr=0.01, momentum=0.9, centered=True)),
    ("rprop", pureopt.rprop, dict(lr=0.01)),
    ("adafactor", pureopt.adafactor, dict(lr=0.01)),
    ("lion", pureopt.lion, dict(lr=1e-3, weight_decay=0.1)),
    ("lamb", pureopt.lamb, dict(lr=0.01, weight_decay=0.1)),
    ("lars", pureopt.lars, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("adabelief", pureopt.adabelief, dict(lr=0.01)),
    ("yogi", pureopt.yogi, dict(lr=0.01)),
    ("novograd", pureopt.novograd, dict(lr=0.01, weight_decay=0.1)),
    ("signum", pureopt.signum, dict(lr=0.01, momentum=0.9)),
    ("adan", pureopt.adan, dict(lr=0.01, weight_decay=0.02)),
    ("schedule_free_adamw", pureopt.schedule_free_adamw, dict(lr=0.01, warmup_steps=2)),
    ("ademamix", pureopt.ademamix, dict(lr=0.01)),
    ("adopt", pureopt.adopt, dict(lr=0.01, weight_decay=0.1)),
    ("laprop", pureopt.laprop, dict(lr=0.01, weight_decay=0.1)),
    ("madgrad", pureopt.madgrad, dict(lr=0.01)),
    ("mars", pureopt.mars, dict(lr=0.01, weight_decay=0.1)),
    ("adamp", pureopt.adamp, dict(lr=0.01, weight_decay=0.1, delta=1.0)),
    ("sgdp", pureopt.sgdp, dict(lr=0.05, momentum=0.9, weight_decay=0.1, delta=1.0)),
    ("came", pureopt.came, dict(lr=0.01, weight_decay=0.1)),
    ("sophia_g", pureopt.sophia_g, dict(lr=0.01)),
    ("prodigy", pureopt.prodigy, dict(lr=1.0, weight_decay=0.1)),
    ("dadapt_adam", pureopt.dadapt_adam, dict(lr=1.0)),
    ("dadapt_sgd", pureopt.dadapt_sgd, dict(lr=1.0, momentum=0.9)),
    ("dog", pureopt.dog, dict(lr=1.0)),
    (
        "chain-clip-adamw",
        _clipped_adamw,
        {"lr": 0.01},
    ),
]


def fused_available(opt_id: str) -> bool:
    """Whether the configuration has a torch fused kernel (SGD only without dampening)."""
    if opt_id.startswith("sgd{"):
        return "'dampening': 0.0" in opt_id or "'momentum': 0.0" in opt_id
    return opt_id.startswith(("adam{", "adamw", "adagrad"))
