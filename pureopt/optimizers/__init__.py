"""Optimizers with torch.optim's argument names, defaults, validation messages and numerics.

Each function returns a :class:`~pureopt.base.GradientTransformation` whose trajectory matches the
torch.optim class of the same name, flag for flag (tested against torch.optim itself over 25 steps).
``lr`` may be a float, a 0-d tensor (read at every update) or a schedule of the update count.
One module per family; the math lives once in :mod:`pureopt.kernels`.
"""

from pureopt.algorithms.adabelief import adabelief
from pureopt.algorithms.adadelta import adadelta
from pureopt.algorithms.adafactor import adafactor
from pureopt.algorithms.adagrad import adagrad
from pureopt.algorithms.adam import adam, adamw
from pureopt.algorithms.adamax import adamax
from pureopt.algorithms.adan import adan
from pureopt.algorithms.ademamix import ademamix
from pureopt.algorithms.asgd import asgd
from pureopt.algorithms.lamb import lamb
from pureopt.algorithms.lars import lars
from pureopt.algorithms.lion import lion
from pureopt.algorithms.muon import muon
from pureopt.algorithms.nadam import nadam
from pureopt.algorithms.novograd import novograd
from pureopt.algorithms.radam import radam
from pureopt.algorithms.rmsprop import rmsprop
from pureopt.algorithms.rprop import rprop
from pureopt.algorithms.schedule_free import schedule_free_adamw, schedule_free_eval_params, schedule_free_sgd
from pureopt.algorithms.sgd import sgd
from pureopt.algorithms.sign_sgd import sign_sgd, signum
from pureopt.algorithms.sparse_adam import sparse_adam
from pureopt.algorithms.yogi import yogi
from pureopt.optimizers.lbfgs import lbfgs

__all__ = [
    "adabelief",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adan",
    "ademamix",
    "asgd",
    "lamb",
    "lars",
    "lbfgs",
    "lion",
    "muon",
    "nadam",
    "novograd",
    "radam",
    "rmsprop",
    "rprop",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "sgd",
    "sign_sgd",
    "signum",
    "sparse_adam",
    "yogi",
]
