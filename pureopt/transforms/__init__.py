"""Primitive gradient transformations: the building blocks that optimizers are chained from."""

from pureopt.transforms.adam import ScaleByAdamState, scale_by_adam
from pureopt.transforms.adaptive_clip import adaptive_grad_clip
from pureopt.transforms.block_rms import clip_by_block_rms
from pureopt.transforms.centralize import centralize
from pureopt.transforms.clipping import clip, clip_by_global_norm, global_norm
from pureopt.transforms.constraints import keep_params_nonnegative
from pureopt.transforms.momentum import TraceState, trace
from pureopt.transforms.nans import ZeroNansState, zero_nans
from pureopt.transforms.noise import AddNoiseState, add_noise
from pureopt.transforms.scale import ScaleByScheduleState, scale, scale_by_learning_rate, scale_by_schedule
from pureopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "AddNoiseState",
    "ZeroNansState",
    "adaptive_grad_clip",
    "add_noise",
    "centralize",
    "clip_by_block_rms",
    "keep_params_nonnegative",
    "zero_nans",
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
