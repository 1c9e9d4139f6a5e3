"""What ``TorchOptimizer`` knows about a transformation factory and its torch.optim counterpart.

:class:`_Factory` reads a factory's hyperparameters from its signature and finds the torch.optim class whose
checkpoints it reads and writes (``TORCH_COUNTERPARTS``); ``_torch_defaults`` and ``_torch_filled_options`` ask
torch for that class's param-group options and for the ones its ``__setstate__`` fills in; ``_same`` compares
hyperparameter values and ``_check_betas_kinds`` repeats torch's check on ``betas``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from pureopt.adapters._options import loaded_option
from pureopt.adapters._state import PUREOPT_KEY
from pureopt.base import GradientTransformation

TORCH_COUNTERPARTS: dict[str, str] = {
    "pureopt.optimizers.sgd.sgd": "SGD",
    "pureopt.optimizers.adam.adam": "Adam",
    "pureopt.optimizers.adam.adamw": "AdamW",
    "pureopt.optimizers.adagrad.adagrad": "Adagrad",
    "pureopt.optimizers.adadelta.adadelta": "Adadelta",
    "pureopt.optimizers.adafactor.adafactor": "Adafactor",
    "pureopt.optimizers.adamax.adamax": "Adamax",
    "pureopt.optimizers.asgd.asgd": "ASGD",
    "pureopt.optimizers.nadam.nadam": "NAdam",
    "pureopt.optimizers.radam.radam": "RAdam",
    "pureopt.optimizers.rmsprop.rmsprop": "RMSprop",
    "pureopt.optimizers.rprop.rprop": "Rprop",
    "pureopt.optimizers.muon.muon": "Muon",
    "pureopt.optimizers.sparse_adam.sparse_adam": "SparseAdam",
}
# the algorithms defined once each (pureopt.algorithms) under their new home
TORCH_COUNTERPARTS.update(
    {key.replace("pureopt.optimizers.", "pureopt.algorithms."): name for key, name in TORCH_COUNTERPARTS.items()}
)
"""pureopt factory (``module.name``) -> the torch.optim class whose checkpoints it reads and writes.

Used to check torch checkpoints (a hyperparameter of the torch class missing from a saved group means the
checkpoint is from another optimizer) and to add the torch class's fixed options to the param groups (AdamW's
``decoupled_weight_decay=True``), so that torch.optim loads pureopt's checkpoints with the right algorithm."""

# torch.optim's implementation switches: they do not change the numbers, so they are neither passed to the factory
# nor required to match
_TORCH_IMPL_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})
# keys of a param group that are not options: its parameters, their names, and pureopt's record of the group's global
# state (see pureopt.adapters._checkpoint)
_RESERVED_KEYS = frozenset({"params", "param_names", PUREOPT_KEY})


def _qualname(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__name__', type(factory).__name__)}"


@functools.cache
def _torch_defaults(class_name: str) -> dict[str, Any] | None:
    """The default param-group options of ``torch.optim.<class_name>`` (None if it cannot be built here)."""
    cls = getattr(torch.optim, class_name, None)
    if cls is None:
        return None
    try:
        dummy = torch.zeros(1, 1, requires_grad=True)
        return dict(cls([dummy]).defaults)
    except Exception:  # a torch without this class's defaults, or one that needs other arguments
        return None


@functools.cache
def _torch_filled_options(class_name: str) -> dict[str, Any]:
    """The options ``torch.optim.<class_name>.__setstate__`` fills in when a saved param group lacks them.

    These are the options torch added after the class first shipped (``maximize``, ``foreach``, ``capturable``,
    ``differentiable``, ``fused``, ``decoupled_weight_decay``, ...): torch loads an older checkpoint without them
    by giving them these values. Found by asking torch: each option is removed from a group in turn and the
    class's ``__setstate__`` is run on it.
    """
    cls = getattr(torch.optim, class_name, None)
    defaults = _torch_defaults(class_name)
    if cls is None or defaults is None:
        return {}
    filled: dict[str, Any] = {}
    for key in defaults:
        try:
            probe = cls([torch.zeros(1, 1, requires_grad=True)])
            group = {k: v for k, v in probe.param_groups[0].items() if k != key}
            probe.__setstate__({"defaults": probe.defaults, "state": probe.state, "param_groups": [group]})
        except Exception:  # __setstate__ needs the option: not one torch fills in
            continue
        if key in probe.param_groups[0]:
            filled[key] = probe.param_groups[0][key]
    return filled


# options a torch class's step reads with a default (``group.get(key, default)``) instead of filling them in
# ``__setstate__``: a checkpoint without them loads and steps in torch with that default
_TORCH_READ_WITH_DEFAULT: dict[str, dict[str, Any]] = {"SparseAdam": {"maximize": False}}


def _check_betas_kinds(torch_class: str | None, options: Mapping[str, Any], where: str) -> None:
    """torch.optim.Adam/AdamW refuse betas that mix floats and tensors (torch's wording)."""
    betas = options.get("betas")
    if torch_class not in ("Adam", "AdamW") or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")


def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are equal (tensors by value, tuples and lists alike)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


class _Factory:
    """What TorchOptimizer knows about the transformation factory: its hyperparameters and torch counterpart."""

    def __init__(self, factory: Callable[..., GradientTransformation]) -> None:
        self.fn = factory
        self.name: str = getattr(factory, "__name__", type(factory).__name__)
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            raise TypeError(f"cannot read the hyperparameters of {self.name}: pass a transformation instead") from None
        self.accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        self.defaults: dict[str, Any] = {}
        for name, p in signature.parameters.items():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            self.defaults[name] = required if p.default is inspect.Parameter.empty else p.default
        self.torch_class = TORCH_COUNTERPARTS.get(_qualname(factory))
        torch_defaults = _torch_defaults(self.torch_class) if self.torch_class is not None else None
        self.torch_keys: frozenset[str] | None = None
        self.implied: dict[str, Any] = {}
        if torch_defaults is not None:
            self.torch_keys = frozenset(k for k in torch_defaults if k not in _TORCH_IMPL_KEYS)
            self.implied = {k: v for k, v in torch_defaults.items() if k in self.torch_keys and k not in self.defaults}

    def accepts(self, key: str) -> bool:
        return key in self.defaults or (self.accepts_any and key not in _RESERVED_KEYS and key not in self.implied)

    def kwargs(self, group: Mapping[str, Any], where: str, read_lr: bool = True) -> dict[str, Any]:
        """The factory's keyword arguments from a group's options (``lr`` included, as given); checks fixed options.

        ``read_lr=False`` leaves ``group["lr"]`` unread (``None`` in its place): inside a compiled step, reading the
        float would make dynamo guard on its value.
        """
        for key, value in self.implied.items():
            if key in group and not _same(group[key], value):
                raise ValueError(
                    f"{where}: {self.name} is torch.optim.{self.torch_class} with {key}={value!r}, "
                    f"but the group has {key}={group[key]!r}"
                )
        kwargs = {
            k: loaded_option(group[k]) if read_lr or k != "lr" else None  # (as saved, if put back by a wrapper)
            for k in group.keys()
            if self.accepts(k) and k not in _RESERVED_KEYS
        }
        for key, default in self.defaults.items():
            if default is required and kwargs.get(key, required) is required:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {key}")
        return kwargs
