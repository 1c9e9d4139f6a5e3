"""TorchOptimizer inside Hugging Face's ``transformers.Trainer``, against torch.optim.AdamW in the same Trainer.

A tiny LLaMA (2 layers, hidden size 16, vocabulary 32), built from a config object (nothing is downloaded:
the hub is switched offline before transformers is imported), is trained on random token sequences by
``Trainer`` with ``optimizers=(optimizer, scheduler)``, gradient accumulation over 2 batches, gradient-norm
clipping at 1.0, and a checkpoint saved mid-epoch. Four runs: each optimizer uninterrupted, and each resumed
(``resume_from_checkpoint``) from its own checkpoint into a fresh model with other initial weights.

Tolerance. TorchOptimizer's ``impl="auto"`` may step with torch's fused or foreach CPU kernels, torch.optim.AdamW
with its per-tensor for-loop: the same formulas rounded in a different order, a few fp32 ulps per step (measured <=
1.2e-7 here). ``RTOL``/``ATOL`` leave room for that over these few steps, while a real difference (the warmup
schedule, weight decay, a lost moment on resume) moves weights by ~``LR`` = 1e-2; the test also checks that the
weights moved far more than the tolerance. The model has no biases: GPT-2's key bias gets a gradient that is
rounding noise, which Adam normalises into lr-sized steps of either sign, far beyond any ulp bound. A resumed run is
compared bitwise with the uninterrupted run of the same optimizer: both run the same kernels on the same machine, so
the vector width cannot matter. (``TrainingArguments(save_safetensors=...)`` is gone in transformers 5, where
safetensors is the only format; the test checks the checkpoint holds ``model.safetensors``.)
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# no network: transformers and huggingface_hub read these when they are imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import pureopt  # noqa: E402
from pureopt import TorchOptimizer  # noqa: E402

VOCAB, SEQ, SAMPLES = 32, 8, 32
BATCH, ACCUMULATE = 4, 2  # 4 optimizer steps per epoch
STEPS, SAVE_AT, WARMUP = 6, 3, 2  # the checkpoint is taken mid-epoch
LR, WD, MAX_GRAD_NORM = 1e-2, 0.1, 1.0
RTOL, ATOL = 1e-5, 1e-6


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences, the same on every run; labels are the inputs (the model shifts them)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(seed: int) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ,
        initializer_range=0.2,  # gradients large enough for the 1.0 norm clip to act
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _optimizer(kind: str, model: Any) -> torch.optim.Optimizer:
    if kind == "torch":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    encoded = {"state_dtype": "q8"} if kind == "pureopt-q8" else {}
    return TorchOptimizer(model.parameters(), pureopt.adamw, lr=LR, weight_decay=WD, **encoded)


@contextlib.contextmanager
def _own_rng() -> Iterator[None]:
    """Trainer seeds torch's, Python's and NumPy's global generators: give them back as they were."""
    np = pytest.importorskip("numpy")
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


@dataclass
class _Run:
    params: dict[str, torch.Tensor]
    start: dict[str, torch.Tensor]
    losses: list[float]
    grad_norms: list[float]
    lrs: list[float]
    global_step: int
    optimizer: torch.optim.Optimizer


def _train(kind: str, out: Path, resume: Path | None = None) -> _Run:
    """STEPS optimizer steps (checkpoints every SAVE_AT) with ``kind``'s AdamW and a linear warmup-decay schedule."""
    with _own_rng():
        model = _model(seed=0 if resume is None else 1)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = _optimizer(kind, model)
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
        args = transformers.TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATE,
            max_grad_norm=MAX_GRAD_NORM,
            max_steps=STEPS,
            save_strategy="steps",
            save_steps=SAVE_AT,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Tokens(), optimizers=(optimizer, scheduler)
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return _Run(
        params={k: v.detach().clone() for k, v in model.named_parameters()},
        start=start,
        losses=[entry["loss"] for entry in logs],
        grad_norms=[entry["grad_norm"] for entry in logs],
        lrs=[entry["learning_rate"] for entry in logs],
        global_step=trainer.state.global_step,
        optimizer=optimizer,
    )


class _Runs:
    """The four runs, each trained once for the module (the resumed ones after the uninterrupted ones)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple[str, bool], _Run] = {}

    def get(self, kind: str, resumed: bool = False) -> _Run:
        if (kind, resumed) not in self.cache:
            if resumed:
                self.get(kind)
                checkpoint = self.root / kind / f"checkpoint-{SAVE_AT}"
                self.cache[kind, True] = _train(kind, self.root / f"{kind}-resumed", resume=checkpoint)
            else:
                self.cache[kind, False] = _train(kind, self.root / kind)
        return self.cache[kind, resumed]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("hf_trainer"))


def _assert_close_runs(actual: _Run, expected: _Run) -> None:
    assert actual.global_step == expected.global_step == STEPS
    torch.testing.assert_close(torch.tensor(actual.losses), torch.tensor(expected.losses), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(actual.grad_norms), torch.tensor(expected.grad_norms), rtol=RTOL, atol=ATOL)
    assert actual.lrs == pytest.approx(expected.lrs, rel=1e-12)
    torch.testing.assert_close(actual.params, expected.params, rtol=RTOL, atol=ATOL)
    moved = max((expected.params[k] - expected.start[k]).abs().max().item() for k in expected.params)
    assert moved > 100 * (ATOL + RTOL)


def _assert_same_bits(actual: _Run, expected: _Run) -> None:
    assert actual.losses == expected.losses
    assert actual.grad_norms == expected.grad_norms
    assert actual.lrs == expected.lrs
    assert actual.params.keys() == expected.params.keys()
    for name, value in actual.params.items():
        assert torch.equal(value, expected.params[name]), name


def test_trainer_with_accumulation_and_clipping_matches_torch_adamw(runs: _Runs) -> None:
    """optimizers=(TorchOptimizer(model.parameters(), pureopt.adamw, ...), scheduler) as torch.optim.AdamW."""
    mine, ref = runs.get("pureopt"), runs.get("torch")
    assert isinstance(mine.optimizer, TorchOptimizer)
    assert len(ref.losses) == STEPS
    assert min(ref.grad_norms) > MAX_GRAD_NORM  # the clip acted at every step (grad_norm is logged before it)
    # the lr each step used: linear warmup from 0, then linear decay to 0 (the closed form of the schedule)
    warmup_decay = [LR * min(s / WARMUP, (STEPS - s) / (STEPS - WARMUP)) for s in range(STEPS)]
    assert ref.lrs == pytest.approx(warmup_decay, rel=1e-12)
    _assert_close_runs(mine, ref)


def test_resume_from_checkpoint_equals_uninterrupted_run(runs: _Runs) -> None:
    """resume_from_checkpoint (model.safetensors, optimizer.pt, scheduler.pt, RNG state) mid-epoch, as torch."""
    checkpoint = runs.root / "pureopt" / f"checkpoint-{SAVE_AT}"
    resumed = runs.get("pureopt", resumed=True)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt"} <= {p.name for p in checkpoint.iterdir()}
    _assert_same_bits(resumed, runs.get("pureopt"))
    # the harness itself: torch.optim.AdamW resumes to the same bits too
    _assert_same_bits(runs.get("torch", resumed=True), runs.get("torch"))
    _assert_close_runs(resumed, runs.get("torch", resumed=True))


def test_8bit_state_resumes_bitwise_and_tracks_torch_adamw(runs: _Runs) -> None:
    """TorchOptimizer with q8 AdamW state: optimizer.pt carries the codes (uint8) and scales, resume_from_checkpoint
    equals the uninterrupted run bitwise, and the parameters stay within the quantisation bound of torch.optim.AdamW
    (L2 distance at most 0.1 of the distance torch's run moved them)."""
    mine, ref = runs.get("pureopt-q8"), runs.get("torch")
    saved = torch.load(runs.root / "pureopt-q8" / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    assert any(v.dtype == torch.uint8 for entry in saved["state"].values() for v in entry.values())
    _assert_same_bits(runs.get("pureopt-q8", resumed=True), mine)
    moved = sum((ref.params[k] - ref.start[k]).square().sum() for k in ref.params).sqrt()
    assert sum((mine.params[k] - ref.params[k]).square().sum() for k in ref.params).sqrt() <= 0.1 * moved
