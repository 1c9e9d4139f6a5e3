"""Algorithms defined once each (see :mod:`pureopt.algorithms.define`): one module holds an algorithm's
hyperparameters, state fields and math, and gives its public optimizer, its ``scale_by_*`` primitive and its
state record."""

from pureopt.algorithms.adabelief import ScaleByBeliefState, adabelief, scale_by_belief
from pureopt.algorithms.adadelta import ScaleByAdadeltaState, adadelta, scale_by_adadelta
from pureopt.algorithms.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from pureopt.algorithms.adamax import ScaleByAdamaxState, adamax, scale_by_adamax
from pureopt.algorithms.adopt import ScaleByAdoptState, adopt, scale_by_adopt
from pureopt.algorithms.laprop import ScaleByLaPropState, laprop, scale_by_laprop
from pureopt.algorithms.lion import LionState, lion, scale_by_lion
from pureopt.algorithms.madgrad import MadgradState, madgrad
from pureopt.algorithms.mars import ScaleByMarsState, mars, scale_by_mars
from pureopt.algorithms.nadam import ScaleByNAdamState, nadam, scale_by_nadam
from pureopt.algorithms.rmsprop import ScaleByRmsState, rmsprop, scale_by_rms
from pureopt.algorithms.sgd import TraceState, sgd, trace
from pureopt.algorithms.yogi import ScaleByYogiState, scale_by_yogi, yogi

__all__ = [
    "ScaleByAdoptState",
    "adopt",
    "scale_by_adopt",
    "ScaleByLaPropState",
    "laprop",
    "scale_by_laprop",
    "MadgradState",
    "madgrad",
    "ScaleByMarsState",
    "mars",
    "scale_by_mars",
    "LionState",
    "ScaleByAdadeltaState",
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByBeliefState",
    "ScaleByNAdamState",
    "ScaleByRmsState",
    "ScaleByYogiState",
    "TraceState",
    "adabelief",
    "adadelta",
    "adam",
    "adamax",
    "adamw",
    "lion",
    "nadam",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_belief",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_rms",
    "scale_by_yogi",
    "sgd",
    "trace",
    "yogi",
]
