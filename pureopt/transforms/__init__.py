"""Primitive gradient transformations: the building blocks that optimizers are chained from."""

from pureopt.transforms.adaptive_clip import adaptive_grad_clip
from pureopt.transforms.block_rms import clip_by_block_rms
from pureopt.transforms.centralize import centralize
from pureopt.transforms.clipping import clip, clip_by_global_norm, global_norm
from pureopt.transforms.constraints import keep_params_nonnegative
from pureopt.transforms.lbfgs import LBFGSState
from pureopt.transforms.muon import MuonState, orthogonalize, scale_by_muon
from pureopt.transforms.nans import ZeroNansState, zero_nans
from pureopt.transforms.noise import AddNoiseState, add_noise
from pureopt.transforms.novograd import NovoGradState, scale_by_novograd
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
