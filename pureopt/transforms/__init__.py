"""Primitive gradient transformations: the building blocks that optimizers are chained from."""

from pureopt.transforms.adam import ScaleByAdamState, scale_by_adam
from pureopt.transforms.clipping import clip, clip_by_global_norm, global_norm
from pureopt.transforms.momentum import TraceState, trace
from pureopt.transforms.scale import ScaleByScheduleState, scale, scale_by_learning_rate, scale_by_schedule
from pureopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "clip",
    "clip_by_global_norm",
    "global_norm",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "trace",
]
