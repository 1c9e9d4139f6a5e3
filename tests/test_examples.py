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
