"""What the distributed tests of encoded optimizer state share: the encodings they run, how far a run may be from
its references, and the distance they measure it by."""

from __future__ import annotations

import torch

SPECS = ["q8", "q4", "bf16-sr"]
# L2 distance from torch.optim.AdamW's fp32 run / the distance that run moved the parameters
TOL_FP32 = {"q8": 0.1, "q4": 0.5, "bf16-sr": 0.05, "bf16": 0.05}
# ... and from the single-process run of the same encodings: a code flip from the gradients' summation order moves an
# element by up to a code step; stochastic rounding (the same bits) flips a rounding where the value it rounds moved by
# an ulp with probability ~2**-16 per ulp, element and step (measured: none in one run, two in another, 3e-5 apart)
TOL_SAME = {"q8": 1e-3, "q4": 1e-3, "bf16-sr": 1e-4, "bf16": 1e-3}
# between two runs of bf16-sr state whose roundings draw other random bits (each element's state an ulp of bfloat16,
# 2**-8 relative, apart at random: measured up to 2.4e-3 of the distance moved over 6 steps)
TOL_SR_REALIZATIONS = 1e-2


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The L2 distance between two lists of tensors, over all their elements."""
    return float(sum((x - y).square().sum() for x, y in zip(a, b)).sqrt())
