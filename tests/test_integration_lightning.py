"""TorchOptimizer inside PyTorch Lightning's ``Trainer``, against torch.optim in the same Trainer.

Each test trains a two-layer MLP on a fixed random regression set twice, once with a ``TorchOptimizer`` and once
with its torch.optim counterpart, under the same Trainer options, and compares the final parameters and the loss
of every training step. Lightning drives the optimizer the way users' code does: ``configure_optimizers`` with
param-group dicts (from generators, as written in Lightning's and PyTorch's documentation) and an lr_scheduler
dict stepping every optimizer step, gradient clipping under ``precision="bf16-mixed"``, gradient accumulation,
and a checkpoint saved by ``trainer.save_checkpoint`` and resumed in a fresh Trainer with ``ckpt_path``.

Tolerance. TorchOptimizer's ``impl="auto"`` may step with torch's fused or foreach CPU kernels, while torch.optim's
default on CPU is its per-tensor for-loop: the same formulas rounded in a different order, a few fp32 ulps per step
(measured <= 1.2e-7 here). Over these few steps that stays far below ``RTOL``/``ATOL``, while any real difference (a
group's lr, the scheduler, weight decay, a skipped clip, a lost moment on resume) moves parameters by ~``LR`` =
1e-2. Each comparison also checks that the parameters moved far more than the tolerance, so it cannot pass by both
runs doing nothing. A resumed run is compared bitwise with the uninterrupted run of the same optimizer: both run the
same kernels on the same machine, so the vector width cannot matter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import pureopt  # noqa: E402
from pureopt import TorchOptimizer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*is deprecated"),
]

SAMPLES, BATCH = 32, 4  # 8 batches per epoch
LR, LR2, WD, MOMENTUM = 1e-2, 3e-2, 0.1, 0.9
GAMMA, STEP_SIZE = 0.5, 3  # StepLR, stepped every optimizer step
RTOL, ATOL = 1e-5, 1e-6
# a bf16 forward rounds every weight to 8 significant bits: where the two runs' fp32 weights differ by an ulp
# across a bf16 rounding boundary, one matmul operand changes by 2^-8 relative, and the gradients with it
BF16_RTOL, BF16_ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _own_rng() -> Iterator[None]:
    """nn.Linear's initialisation and DataLoader draw from torch's global generator: give it back as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
ADAMW: dict[str, OptimizerFactory] = {
    "torch": lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD),
    "pureopt": lambda groups: TorchOptimizer(groups, pureopt.adamw, lr=LR, weight_decay=WD),
}
SGD: dict[str, OptimizerFactory] = {
    "torch": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WD),
    "pureopt": lambda groups: TorchOptimizer(groups, pureopt.sgd, lr=LR, momentum=MOMENTUM, weight_decay=WD),
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 4, generator=g)
    return x, torch.sin(2 * x).sum(1, keepdim=True)


class _Net(L.LightningModule):
    """A 4-16-1 tanh MLP whose ``configure_optimizers`` builds two param groups (layer2 with its own lr)."""

    def __init__(
        self, make_optimizer: OptimizerFactory, *, generators: bool = True, scheduler: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.layer1 = torch.nn.Linear(4, 16)
        self.layer2 = torch.nn.Linear(16, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.make_optimizer = make_optimizer
        self.generators = generators
        self.scheduler = scheduler
        self.losses: list[float] = []
        self.grad_norms: list[float] = []  # before clipping: Lightning clips after on_before_optimizer_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer2(torch.tanh(self.layer1(x))).float(), y)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH)

    def configure_optimizers(self) -> Any:
        first: Any = self.layer1.parameters()
        second: Any = self.layer2.parameters()
        if not self.generators:
            first, second = list(first), list(second)
        optimizer = self.make_optimizer([{"params": first}, {"params": second, "lr": LR2}])
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=GAMMA)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(module: _Net, root: Path, max_epochs: int, ckpt_path: Path | None = None, **options: Any) -> Any:
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **options,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _params(module: _Net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_same_run(
    actual: _Net, expected: _Net, start: dict[str, torch.Tensor], rtol: float = RTOL, atol: float = ATOL
) -> None:
    """Same losses and final parameters (within the tolerance), and the parameters moved far beyond it."""
    assert len(actual.losses) == len(expected.losses)
    torch.testing.assert_close(torch.tensor(actual.losses), torch.tensor(expected.losses), rtol=rtol, atol=atol)
    got, want = _params(actual), _params(expected)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    assert moved > 100 * (atol + rtol)


def _lrs(trainer: Any) -> list[float]:
    return [group["lr"] for group in trainer.optimizers[0].param_groups]


@pytest.mark.parametrize("generators", [pytest.param(True, id="generators"), False])
def test_param_groups_and_step_scheduler(tmp_path: Path, generators: bool) -> None:
    """configure_optimizers: two param-group dicts (layer2's own lr) and a StepLR stepped every step, as AdamW."""
    runs = {}
    for kind, make in ADAMW.items():
        module = _Net(make, generators=generators)
        start = _params(module)
        trainer = _fit(module, tmp_path / kind, max_epochs=1)
        runs[kind] = module, trainer
    (mine, mine_trainer), (ref, ref_trainer) = runs["pureopt"], runs["torch"]
    assert mine_trainer.global_step == ref_trainer.global_step == SAMPLES // BATCH
    decay = GAMMA ** (ref_trainer.global_step // STEP_SIZE)
    assert _lrs(ref_trainer) == pytest.approx([LR * decay, LR2 * decay], rel=1e-12)
    assert _lrs(mine_trainer) == pytest.approx(_lrs(ref_trainer), rel=1e-12)
    assert [len(g["params"]) for g in mine_trainer.optimizers[0].param_groups] == [2, 2]
    _assert_same_run(mine, ref, start)


def test_gradient_clipping_under_bf16_mixed(tmp_path: Path) -> None:
    """gradient_clip_val under precision="bf16-mixed" on CPU (autocast, no GradScaler), as SGD with momentum.

    SGD rather than Adam: Adam's update is nearly invariant to rescaling the gradients, so it would hide a clip
    that did not happen.
    """
    clip = 0.5
    runs = {}
    for kind, make in SGD.items():
        module = _Net(make, generators=False)
        start = _params(module)
        _fit(module, tmp_path / kind, max_epochs=1, precision="bf16-mixed", gradient_clip_val=clip)
        runs[kind] = module
    assert max(runs["torch"].grad_norms) > 2 * clip  # the clip was active
    _assert_same_run(runs["pureopt"], runs["torch"], start, rtol=BF16_RTOL, atol=BF16_ATOL)


def test_accumulate_grad_batches(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: one optimizer (and scheduler) step per two batches, as AdamW."""
    runs = {}
    for kind, make in ADAMW.items():
        module = _Net(make, generators=False)
        start = _params(module)
        trainer = _fit(module, tmp_path / kind, max_epochs=2, accumulate_grad_batches=2)
        assert trainer.global_step == 2 * SAMPLES // BATCH // 2
        assert len(module.losses) == 2 * SAMPLES // BATCH
        runs[kind] = module, trainer
    assert _lrs(runs["pureopt"][1]) == pytest.approx(_lrs(runs["torch"][1]), rel=1e-12)
    _assert_same_run(runs["pureopt"][0], runs["torch"][0], start)


def test_checkpoint_and_resume_with_ckpt_path(tmp_path: Path) -> None:
    """One epoch, trainer.save_checkpoint, a fresh module and Trainer resumed with ckpt_path for a second epoch:
    the same as two epochs uninterrupted (bitwise, same optimizer) and as torch.optim.AdamW doing the same."""
    resumed, whole = {}, {}
    for kind, make in ADAMW.items():
        module = _Net(make, generators=False)
        start = _params(module)
        _fit(module, tmp_path / kind / "whole", max_epochs=2)
        whole[kind] = module

        first = _Net(make, generators=False)
        trainer = _fit(first, tmp_path / kind / "first", max_epochs=1)
        ckpt = tmp_path / kind / "epoch1.ckpt"
        trainer.save_checkpoint(ckpt)
        second = _Net(make, generators=False, seed=1)  # other initial weights: the checkpoint must bring them
        trainer = _fit(second, tmp_path / kind / "second", max_epochs=2, ckpt_path=ckpt)
        assert trainer.global_step == 2 * SAMPLES // BATCH
        second.losses = first.losses + second.losses
        resumed[kind] = second

        assert resumed[kind].losses == whole[kind].losses
        for name, value in _params(resumed[kind]).items():
            assert torch.equal(value, _params(whole[kind])[name]), name
    assert isinstance(resumed["pureopt"].trainer.optimizers[0], TorchOptimizer)
    _assert_same_run(resumed["pureopt"], resumed["torch"], start)


def test_checkpoint_and_resume_with_8bit_state(tmp_path: Path) -> None:
    """TorchOptimizer with q8 AdamW state in Lightning: the checkpoint carries the codes (uint8) and scales, a resumed
    run equals the uninterrupted one bitwise, and both track torch.optim.AdamW (fp32 state) within the quantisation
    bound (L2 distance at most 0.1 of the distance torch's run moved the parameters)."""

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return TorchOptimizer(groups, pureopt.adamw, lr=LR, weight_decay=WD, state_dtype="q8")

    module = _Net(make, generators=False)
    start = _params(module)
    _fit(module, tmp_path / "whole", max_epochs=2)
    first = _Net(make, generators=False)
    trainer = _fit(first, tmp_path / "first", max_epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"][0]
    assert saved["exp_avg.codes"].dtype == torch.uint8 and saved["exp_avg_sq.scale"].dtype == torch.float32
    second = _Net(make, generators=False, seed=1)
    _fit(second, tmp_path / "second", max_epochs=2, ckpt_path=ckpt)
    assert first.losses + second.losses == module.losses
    for name, value in _params(second).items():
        assert torch.equal(value, _params(module)[name]), name

    reference = _Net(ADAMW["torch"], generators=False)
    _fit(reference, tmp_path / "torch", max_epochs=2)
    got, want = _params(module), _params(reference)
    moved = sum((want[k] - start[k]).square().sum() for k in want).sqrt()
    assert sum((got[k] - want[k]).square().sum() for k in want).sqrt() <= 0.1 * moved
