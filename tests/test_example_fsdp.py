"""examples/fsdp_train.py under torchrun (2 gloo ranks on CPU): killed after a checkpoint, resumed, compared with an
uninterrupted single-process run of torch.optim.AdamW on the whole batches (float64, 1e-10)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _dist import free_port
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp_train.py"
ARGS = ["--dtype", "float64", "--log-every", "1000"]
LR, WARMUP, DECAY = 3e-3, 10, 1000  # the example's defaults


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "--monitor-interval",
        "0.1",
        str(EXAMPLE),
        *ARGS,
        *args,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("fsdp_train_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _killed_after_a_checkpoint(directory: Path, timeout: float = 120.0) -> int:
    """Start a long run, SIGKILL the whole job (torchrun and its ranks) once a checkpoint is complete; its step."""
    proc = subprocess.Popen(
        _torchrun("--steps", "100000", "--save-every", "4", "--checkpoint-dir", str(directory)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not (directory / "latest").exists():
            if proc.poll() is not None:
                raise AssertionError(f"the job ended before a checkpoint:\n{proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint in {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        # the ranks run in sessions of their own (torchrun starts them so): kill them, then torchrun
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    return int((directory / "latest").read_text())


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux: /proc/<pid>/task/<tid>/children), deepest first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [*_descendants(child), child]
    return found


def _reference(example: Any, steps: int) -> tuple[nn.Module, torch.optim.AdamW]:
    """torch.optim.AdamW on the unsharded model and whole batches, its lr set from the example's schedule."""
    model = example.make_model(0, torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
    schedule = example.make_schedule(type("Args", (), {"lr": LR, "warmup": WARMUP, "decay_steps": DECAY})())
    for step in range(steps):
        x, y = example.batch(0, step, 64, torch.float64)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.param_groups[0]["lr"] = float(schedule(step))
        opt.step()
    return model, opt


def test_example_fsdp_train_killed_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = tmp_path / "ckpt"
    saved = _killed_after_a_checkpoint(directory)
    target = saved + 3
    proc = subprocess.run(
        _torchrun("--steps", str(target), "--save-every", "0", "--resume", "--checkpoint-dir", str(directory)),
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"resumed from {directory / f'step-{saved:06d}'} at step {saved}" in proc.stdout, proc.stdout

    dcp_to_torch_save(directory / f"step-{target:06d}", tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    model, opt = _reference(_load_example(), target)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            final["model"][name], value, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
    for (name, p), (key, entry) in zip(model.named_parameters(), final["optim"]["state"].items()):
        assert key == name
        want = opt.state[p]
        assert float(entry["step"]) == float(want["step"]) == target
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                entry[k], want[k], rtol=1e-10, atol=1e-14, msg=lambda m, n=name, k=k: f"{n}/{k}: {m}"
            )
    assert int(final["optim"]["param_groups"][0]["pureopt"]["globals"]["num_updates"]) == target
