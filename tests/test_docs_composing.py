"""Every ```python block of docs/composing.md runs, in order, in one namespace, and its printed claims hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "composing.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_snippets():
    assert len(_blocks()) >= 15


def test_composing_snippets_run_and_print_what_the_comments_say():
    namespace: dict = {"__name__": "docs_composing"}
    for i, code in enumerate(_blocks()):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)
        printed = out.getvalue().splitlines()
        # a `print(...)  # value` line claims its output starts with `value`
        claims = [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.*)$", code, re.M)]
        lines = iter(printed)
        for claim in claims:
            expected = re.split(r"\s{2,}|; \.\.\.$|: the |\s+\(", claim)[0].strip()
            if "True on" in claim:  # the MultiSteps loop prints one line per micro-batch
                got = [next(lines) for _ in range(8)]
                assert [line.endswith("True") for line in got] == [i in (3, 7) for i in range(8)], got
                continue
            line = next(lines)
            assert line.startswith(expected), (i, claim, line)
    assert torch.is_tensor(namespace["params"]["0.weight"])
