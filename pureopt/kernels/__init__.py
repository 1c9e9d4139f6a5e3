"""Each algorithm's math over flat lists of tensors, with per-tensor / foreach (/ fused) paths.

Kernels take lists of tensors (never ``None``), hyperparameters as Python numbers or 0-d tensors, ``impl`` and
``donate``, and return the updates and the new state lists. With ``donate=False`` (the pure API) nothing passed
in is modified. With ``apply`` (and ``donate``) a kernel adds its updates to the parameters itself, in its last op,
and returns ``updates=None``; on CPU the elementwise part then runs over cache-sized chunks
(:func:`pureopt.kernels.common.elementwise`).
"""

from pureopt.kernels.listops import FOREACH, LOOP, ListOps
from pureopt.kernels.select import IMPLS, Impl, check_impl, choose_impl, functorch_active

__all__ = [
    "FOREACH",
    "IMPLS",
    "LOOP",
    "Impl",
    "ListOps",
    "check_impl",
    "choose_impl",
    "functorch_active",
]
