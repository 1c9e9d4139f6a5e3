"""The torch.func examples run end to end (small sizes) and reach meaningful results.

examples/ensemble_vmap.py, examples/maml.py and examples/per_param_groups.py are run as scripts (subprocess,
``sys.executable``); bounds are loose but each one fails if the example stops learning.
"""

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
    assert proc.stdout.rstrip().splitlines()[-1].startswith("final:"), proc.stdout
    return proc.stdout


def _floats(line: str) -> list[float]:
    return [float(v) for v in line.split(":", 1)[1].split()]


def test_ensemble_vmap_trains_every_member():
    out = _run("ensemble_vmap.py", "--models", "4", "--steps", "150", "--log-every", "50")
    initial = _floats(re.search(r"^initial per-model test losses:.*$", out, re.M).group())
    final = _floats(re.search(r"^final per-model test losses:.*$", out, re.M).group())
    assert len(initial) == len(final) == 4, out
    for before, after in zip(initial, final):
        assert after < 0.5 * before, out  # every member learned on its own, not just the average
    # members start apart (different initialisations) and stay distinct models
    assert len({round(v, 4) for v in final}) == 4, out
    means = [float(m) for m in re.findall(r"mean train loss (\d+\.\d+)", out)]
    assert len(means) == 4 and means[-1] < 0.5 * means[0], out


def test_maml_meta_loss_falls_below_half():
    out = _run("maml.py", "--meta-steps", "200", "--log-every", "50", "--eval-tasks", "100")
    initial, final = map(float, re.search(r"^final: meta-loss (\d+\.\d+) -> (\d+\.\d+)", out, re.M).groups())
    assert initial > 1.0, out  # untrained: about the variance of a random sine wave
    assert final < 0.5 * initial, out
    logged = [float(m) for m in re.findall(r"meta-step +\d+ +meta-loss (\d+\.\d+)", out)]
    assert len(logged) == 4, out
    # adaptation helps: after a few inner steps the query loss is below the unadapted model's
    before, after = map(
        float, re.search(r"before adaptation \d+\.\d+ -> (\d+\.\d+); after .* -> (\d+\.\d+)", out).groups()
    )
    assert after < before, out


def test_per_param_groups_freezes_and_trains(tmp_path):
    saved = tmp_path / "params.pt"
    out = _run("per_param_groups.py", "--steps", "500", "--log-every", "250", "--save", str(saved))
    record = torch.load(saved)
    initial, final, labels = record["initial"], record["final"], record["labels"]
    assert set(labels.values()) == {"backbone", "backbone_no_decay", "head", "head_no_decay", "frozen"}
    assert {k for k, v in labels.items() if v == "frozen"} == {"backbone.0.weight", "backbone.0.bias"}
    for name, label in labels.items():
        same_bits = torch.equal(final[name].view(torch.int32), initial[name].view(torch.int32))
        if label == "frozen":
            assert same_bits, f"frozen {name} changed"
        else:
            assert not same_bits, f"{name} ({label}) did not move"
    # the head (10x the backbone's learning rate) moved substantially
    head = max((final[k] - initial[k]).abs().max().item() for k, v in labels.items() if v.startswith("head"))
    assert head > 0.1, out
    accuracy = float(re.search(r"test accuracy (\d+\.\d+)%", out).group(1))
    assert accuracy > 60.0, out  # three classes: chance is 33%
    assert "frozen unchanged: yes" in out and "trained params moved: 10/10" in out, out
