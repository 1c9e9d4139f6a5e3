"""Algorithms defined once each (see :mod:`pureopt.algorithms.define`): one module holds an algorithm's
hyperparameters, state fields and math, and gives its public optimizer, its ``scale_by_*`` primitive and its
state record."""

from pureopt.algorithms.adabelief import ScaleByBeliefState, adabelief, scale_by_belief
from pureopt.algorithms.adadelta import ScaleByAdadeltaState, adadelta, scale_by_adadelta
from pureopt.algorithms.adafactor import ScaleByFactoredRmsState, adafactor, scale_by_factored_rms
from pureopt.algorithms.adagrad import ScaleByAdagradState, adagrad, scale_by_adagrad
from pureopt.algorithms.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from pureopt.algorithms.adamax import ScaleByAdamaxState, adamax, scale_by_adamax
from pureopt.algorithms.adamp import ScaleByAdamPState, adamp, scale_by_adamp
from pureopt.algorithms.adan import AdanState, adan, scale_by_adan
from pureopt.algorithms.ademamix import AdEMAMixState, ademamix, scale_by_ademamix
from pureopt.algorithms.adopt import ScaleByAdoptState, adopt, scale_by_adopt
from pureopt.algorithms.asgd import ASGDState, asgd
from pureopt.algorithms.came import CAMEState, came, scale_by_came
from pureopt.algorithms.dadapt import DAdaptAdamState, DAdaptSGDState, dadapt_adam, dadapt_sgd
from pureopt.algorithms.dog import DoGState, dog
from pureopt.algorithms.lamb import LambState, lamb
from pureopt.algorithms.laprop import ScaleByLaPropState, laprop, scale_by_laprop
from pureopt.algorithms.lars import LarsState, lars
from pureopt.algorithms.lion import LionState, lion, scale_by_lion
from pureopt.algorithms.madgrad import MadgradState, madgrad
from pureopt.algorithms.mars import ScaleByMarsState, mars, scale_by_mars
from pureopt.algorithms.muon import MuonState, muon, scale_by_muon
from pureopt.algorithms.nadam import ScaleByNAdamState, nadam, scale_by_nadam
from pureopt.algorithms.novograd import NovoGradState, novograd, scale_by_novograd
from pureopt.algorithms.prodigy import ProdigyState, prodigy
from pureopt.algorithms.radam import ScaleByRAdamState, radam, scale_by_radam
from pureopt.algorithms.rmsprop import ScaleByRmsState, rmsprop, scale_by_rms
from pureopt.algorithms.rprop import ScaleByRpropState, rprop, scale_by_rprop
from pureopt.algorithms.schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)
from pureopt.algorithms.sgd import TraceState, sgd, trace
from pureopt.algorithms.sgdp import SGDPState, scale_by_sgdp, sgdp
from pureopt.algorithms.sign_sgd import SignumState, scale_by_sign, scale_by_signum, sign_sgd, signum
from pureopt.algorithms.sophia import SophiaGState, scale_by_sophia, sophia_g
from pureopt.algorithms.sparse_adam import SparseAdamState, sparse_adam
from pureopt.algorithms.yogi import ScaleByYogiState, scale_by_yogi, yogi

__all__ = [
    "ASGDState",
    "AdEMAMixState",
    "AdanState",
    "CAMEState",
    "DAdaptAdamState",
    "DAdaptSGDState",
    "DoGState",
    "LambState",
    "LarsState",
    "LionState",
    "MadgradState",
    "ProdigyState",
    "SGDPState",
    "ScaleByAdadeltaState",
    "ScaleByAdagradState",
    "ScaleByAdamPState",
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByAdoptState",
    "ScaleByBeliefState",
    "ScaleByLaPropState",
    "ScaleByMarsState",
    "ScaleByNAdamState",
    "ScaleByRAdamState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByYogiState",
    "SignumState",
    "SophiaGState",
    "TraceState",
    "adabelief",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamp",
    "adamw",
    "adan",
    "ademamix",
    "adopt",
    "asgd",
    "came",
    "dadapt_adam",
    "dadapt_sgd",
    "dog",
    "lamb",
    "laprop",
    "lars",
    "lion",
    "madgrad",
    "mars",
    "nadam",
    "prodigy",
    "radam",
    "rmsprop",
    "rprop",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_adamp",
    "scale_by_adan",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_belief",
    "scale_by_came",
    "scale_by_laprop",
    "scale_by_lion",
    "scale_by_mars",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_sgdp",
    "scale_by_sign",
    "scale_by_signum",
    "scale_by_sophia",
    "scale_by_yogi",
    "sgd",
    "sgdp",
    "sign_sgd",
    "signum",
    "sophia_g",
    "trace",
    "yogi",
    "sparse_adam",
    "SparseAdamState",
    "schedule_free_sgd",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "ScheduleFreeState",
    "adafactor",
    "scale_by_factored_rms",
    "ScaleByFactoredRmsState",
    "novograd",
    "scale_by_novograd",
    "NovoGradState",
    "muon",
    "scale_by_muon",
    "MuonState",
]
