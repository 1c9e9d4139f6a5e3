"""The guide pages' Python snippets run (each page's blocks in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import pureopt


def pureopt_leaves(tree):
    return [t for t in pureopt.tree.leaves(tree) if isinstance(t, torch.Tensor)]


DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["getting_started.md", "flat.md"]


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert blocks, f"{page} has no python blocks"
    torch.manual_seed(0)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}[{i}]", "exec"), namespace)
    if page == "getting_started.md":
        # the pure loop lowered the loss of the least-squares problem below half of the way to its optimum
        loss, params, x, y = (namespace[k] for k in ("loss", "params", "x", "y"))
        design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        best = ((design @ torch.linalg.lstsq(design, y).solution - y) ** 2).mean()
        torch.manual_seed(0)  # the first block's model was the first thing drawn after this seed
        start = {k: v.detach() for k, v in torch.nn.Linear(10, 1).named_parameters()}
        assert loss(params, x, y) - best < 0.5 * (loss(start, x, y) - best)
        # the adapter stepped 20 times with StepLR(step_size=10, gamma=0.5)
        assert namespace["scheduler"].get_last_lr() == [1e-3 * 0.25]
        assert namespace["opt"].state_dict()["state"], "the adapter kept per-parameter state"
    if page == "flat.md":
        # the flat AdamW stepped three times, one buffer for the model; flatten's state is one vector
        opt, model = namespace["opt"], namespace["model"]
        assert opt.state_dict()["state"][0]["step"].item() == 3
        (buffer,) = opt._groups[0].flat.flat.buffers
        assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in model.parameters())
        assert {t.numel() for t in pureopt_leaves(namespace["state"]) if t.dim() == 1} == {2112}
