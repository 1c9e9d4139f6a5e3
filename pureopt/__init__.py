"""pureopt: pure functional (optax-style) optimizers for PyTorch with torch.optim's numerics.

Example::

    import pureopt
    tx = pureopt.chain(pureopt.clip_by_global_norm(1.0), pureopt.adamw(lr=3e-4, weight_decay=0.1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = pureopt.apply_updates(params, updates)
"""

from pureopt import kernels, schedules, tree
from pureopt.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Schedule,
    Updates,
    apply_updates,
    identity,
    inplace_step,
    set_to_zero,
    stateless,
)
from pureopt.combine import chain
from pureopt.optimizers import adam, adamw, sgd
from pureopt.transforms import (
    ScaleByAdamState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_schedule,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "OptState",
    "Params",
    "ScalarOrSchedule",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "Updates",
    "__version__",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip",
    "clip_by_global_norm",
    "identity",
    "inplace_step",
    "kernels",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "schedules",
    "set_to_zero",
    "sgd",
    "stateless",
    "trace",
    "tree",
]
