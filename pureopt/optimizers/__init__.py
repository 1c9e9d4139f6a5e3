"""Optimizers with torch.optim's argument names, defaults, validation messages and numerics.

Each function returns a :class:`~pureopt.base.GradientTransformation` whose trajectory matches the
torch.optim class of the same name, flag for flag (tested against torch.optim itself over 25 steps).
``lr`` may be a float, a 0-d tensor (read at every update) or a schedule of the update count.
One module per family; the math lives once in :mod:`pureopt.kernels`.
"""

from pureopt.optimizers.adafactor import adafactor
from pureopt.optimizers.adam import adam, adamw
from pureopt.optimizers.lbfgs import lbfgs
from pureopt.optimizers.muon import muon
from pureopt.optimizers.nadam import nadam
from pureopt.optimizers.radam import radam
from pureopt.optimizers.rmsprop import rmsprop
from pureopt.optimizers.rprop import rprop
from pureopt.optimizers.sgd import sgd

__all__ = [
    "adafactor",
    "adam",
    "adamw",
    "lbfgs",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
]
