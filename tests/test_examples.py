"""The examples run end to end (small sizes) and reach meaningful results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_quickstart_learns_two_moons():
    out = _run("quickstart.py", "--steps", "300", "--log-every", "100")
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)  lr", out)]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    accuracy = float(re.search(r"test accuracy (\d+\.\d+)%", out).group(1))
    assert accuracy > 95.0, out


def test_readme_example_runs_and_approaches_the_least_squares_optimum():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    params, loss, x, y, model = (namespace[k] for k in ("params", "loss", "x", "y", "model"))
    start = {k: v.detach() for k, v in model.named_parameters()}
    # closed-form optimum of the linear least-squares problem
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    best = ((design @ solution - y) ** 2).mean()
    initial, final = loss(start, x, y), loss(params, x, y)
    assert final - best < 0.5 * (initial - best), (initial, final, best)


def test_low_memory_example_trains_bf16_weights_with_8bit_state_as_well_as_torch_fp32():
    # bf16 weights with stochastic rounding and q8 AdamW state against torch.optim.AdamW on fp32 weights (the
    # example runs both): the held-out loss within 20% of torch's (bf16 forward passes included), the optimizer
    # state at most 2.1 bytes per parameter against torch's 8
    out = _run("low_memory.py", "--steps", "300", "--log-every", "100")
    fp32, low = (float(v) for v in re.search(r"held-out loss: fp32 (\S+), bf16 \+ 8-bit state (\S+)", out).groups())
    assert low <= 1.2 * fp32, out
    before, after = (float(v) for v in re.search(r"optimizer state: (\S+) -> (\S+) bytes/param", out).groups())
    assert before == 8.0 and after <= 2.1, out
