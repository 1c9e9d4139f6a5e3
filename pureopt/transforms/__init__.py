"""Primitive gradient transformations: the building blocks that optimizers are chained from."""

import importlib
from typing import Any

from pureopt.transforms.adaptive_clip import adaptive_grad_clip
from pureopt.transforms.block_rms import clip_by_block_rms
from pureopt.transforms.centralize import centralize
from pureopt.transforms.clipping import clip, clip_by_global_norm, global_norm
from pureopt.transforms.constraints import keep_params_nonnegative
from pureopt.transforms.lbfgs import LBFGSState
from pureopt.transforms.muon import orthogonalize
from pureopt.transforms.nans import ZeroNansState, zero_nans
from pureopt.transforms.noise import AddNoiseState, add_noise
from pureopt.transforms.scale import ScaleByScheduleState, scale, scale_by_learning_rate, scale_by_schedule
from pureopt.transforms.trust_ratio import scale_by_trust_ratio
from pureopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "adaptive_grad_clip",
    "add_decayed_weights",
    "add_noise",
    "AddNoiseState",
    "centralize",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "global_norm",
    "keep_params_nonnegative",
    "LBFGSState",
    "MuonState",
    "NovoGradState",
    "orthogonalize",
    "scale",
    "scale_by_learning_rate",
    "scale_by_muon",
    "scale_by_novograd",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "ScaleByScheduleState",
    "zero_nans",
    "ZeroNansState",
]

_MOVED = {"MuonState": "muon", "scale_by_muon": "muon", "NovoGradState": "novograd", "scale_by_novograd": "novograd"}
"""Names defined in :mod:`pureopt.algorithms` and still found here (imported on first use: :mod:`pureopt.algorithms`
imports this package)."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"pureopt.algorithms.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
