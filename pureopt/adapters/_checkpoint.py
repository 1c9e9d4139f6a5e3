"""Where ``TorchOptimizer`` keeps, in a state dict, what torch's format has no place for (internal to the adapters).

``torch.distributed.checkpoint`` (DCP) keeps only ``"state"`` and ``"param_groups"`` of an optimizer's state dict,
and it loads only what its *template* asks for: the state dict of the optimizer being loaded into, as made by
``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` and co.). Wrappers such as
``ZeroRedundancyOptimizer`` rebuild the state dict from the per-parameter entries and their own param groups, which
they copy from the wrapped optimizer's. Hence:

* **A record per param group.** Each param group holds, under ``"pureopt"``, the group's global state (the
  ``num_updates`` counters that schedules read, injected hyperparameters, ...) by dotted path: ``{"globals":
  {path: tensor}}``. In ``param_groups`` it is live (refreshed after each step; a record put there by someone
  else — ZeRO's ``load_state_dict`` — is adopted at the next step). A saved group's record adds the factory's
  name (``kind``), the state record types, which parameters have an entry (``stepped``) and the sum of their
  step counts (``step_sum``), so that a load can tell a template that dropped entries (an error) and a checkpoint
  that another optimizer stepped since (the counters are then rebuilt from the step counts, as for torch
  checkpoints).
* **Complete entries for DCP.** When ``torch.distributed.checkpoint.state_dict`` asks (found on the call stack),
  every parameter that requires a gradient gets an entry, its initial state if it has not stepped, so that the
  template of a fresh optimizer asks for everything a checkpoint may hold (a plain ``state_dict()`` keeps torch's
  rule: entries for the parameters that took a step). DCP's initialising "fake step" never runs: ``opt.state``
  is never empty.

Checkpoints of format 1 kept the records in a top-level ``"pureopt"`` entry (``{"version": 1, "groups": [...]}``);
they still load.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from pureopt.adapters._state import (
    CODES_VERSION,
    PUREOPT_KEY,
    STEP_KEY,
    StateLayout,
    as_state_tensor,
    check_group_record,
)

GROUP_KEY = PUREOPT_KEY
"""The key of a param group under which its record is kept (live in ``param_groups``, and in saved groups)."""
RECORD_VERSION = 2
_DCP_MODULE = "torch.distributed.checkpoint.state_dict"


def asked_by_dcp(depth: int = 12) -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``, ``set_state_dict``, ...) is among the
    callers of the caller (looked up ``depth`` frames; wrappers between it and the optimizer are allowed)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == _DCP_MODULE:
            return True
        frame = frame.f_back
    return False


def step_sum(entries: Mapping[Any, Mapping[str, Any]]) -> float | None:
    """The sum of the ``step`` counts of ``entries`` (``None`` when none has one), read to the host at once."""
    steps = [e[STEP_KEY] for e in entries.values() if isinstance(e, Mapping) and e.get(STEP_KEY) is not None]
    if not steps:
        return None
    values = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in steps]
    host = [torch.as_tensor(v).detach().to("cpu", torch.float64).sum() for v in values]
    return float(torch.stack(host).sum())


def saved_record(
    kind: str,
    layout: StateLayout,
    globals_: Mapping[str, Tensor],
    entries: Mapping[int, Mapping[str, Any]],
    stepped: Sequence[int],
) -> dict[str, Any]:
    """A param group's record as saved: its globals, the factory's name, the state record types, the local indices
    of the parameters that took a step (their entries must load) and the sum of the entries' step counts."""
    return {
        "version": RECORD_VERSION,
        "codes": CODES_VERSION,
        "kind": kind,
        "types": list(layout.types),
        "globals": dict(globals_),
        "stepped": sorted(stepped),
        "step_sum": step_sum(entries),
    }


def loaded_stepped(record: Any, entries: Mapping[int, Mapping[str, Any]], layout: StateLayout) -> set[int]:
    """The local indices of the parameters that took a step, by a loaded checkpoint: its record says so; a
    checkpoint without one (torch.optim's) has entries for those only."""
    if isinstance(record, Mapping) and "stepped" in record:
        return {int(i) for i in record["stepped"]}
    return {i for i, e in entries.items() if isinstance(e, Mapping) and any(k in e for k in layout.param_keys[i])}


def saved_records(state_dict: Mapping[str, Any], num_groups: int) -> list[Mapping[str, Any]] | None:
    """Each saved group's record: from the groups (format 2), or from the top-level entry (format 1); ``None`` for a
    checkpoint without records (torch.optim's)."""
    groups = state_dict["param_groups"]
    in_groups = [isinstance(g, Mapping) and GROUP_KEY in g for g in groups]
    if any(in_groups):
        if not all(in_groups):
            missing = in_groups.index(False)
            raise ValueError(f"param group {missing} of the checkpoint has no {GROUP_KEY!r} record, other groups do")
        return [g[GROUP_KEY] for g in groups]
    section = state_dict.get(PUREOPT_KEY)
    if section is None:
        return None
    records = section.get("groups") if isinstance(section, Mapping) else None
    if not isinstance(records, Sequence) or len(records) != num_groups:
        raise ValueError(f"the checkpoint's {PUREOPT_KEY!r} section is malformed")
    return list(records)


def record_globals(
    record: Any,
    kind: str | None,
    layout: StateLayout,
    entries: Mapping[int, Mapping[str, Any]],
    params: Sequence[Tensor],
    where: str,
    labels: Sequence[Any],
) -> Mapping[str, Any] | None:
    """The global state a group's record gives, after checking it against the loaded entries.

    Raises a ValueError when the record lists a parameter with state that the loaded dict has no entry for (the
    entries were lost on the way: a DCP template that did not ask for them). Returns ``None`` (rebuild the counters
    from the step counts) when the entries' step counts no longer add up to the recorded sum: another optimizer
    (torch.optim) stepped the checkpoint after pureopt saved it, so the recorded counters are stale.
    """
    globals_ = check_group_record(record, kind, layout, where, entries)
    for i in record.get("stepped", ()):
        entry = entries.get(i)
        if isinstance(entry, Mapping) and any(k in entry for k in layout.param_keys[i]):
            continue
        frozen = not params[i].requires_grad
        raise ValueError(
            f"{where}: the checkpoint was saved with state for parameter {labels[i]}, but none was loaded. "
            + (
                "It does not require grad, and torch.distributed.checkpoint's set_state_dict loads no optimizer "
                "state for such parameters: set requires_grad=True on it while loading, then freeze it again"
                if frozen
                else "torch.distributed.checkpoint loads only the entries its template asks for: make the template "
                "with get_state_dict / get_optimizer_state_dict (not a fresh optimizer's state_dict()) and load "
                "with set_state_dict"
            )
        )
    saved_sum = record.get("step_sum")
    if saved_sum is not None and step_sum(entries) != saved_sum:
        return None
    return globals_


def checked_globals(record: Any, layout: StateLayout, current: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The global state a live record holds (a client put it in ``param_groups``), checked against ``current``
    (the group's global tensors by path) and copied into new tensors like them; a ValueError names what is wrong."""
    values = record.get("globals") if isinstance(record, Mapping) else None
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} should be a dict with a 'globals' dict (the group's global state by path)")
    unknown = sorted(str(k) for k in values if k not in current)
    missing = sorted(k for k in current if k not in values)
    if unknown or missing:
        detail = f"unexpected {unknown}" if unknown else f"missing {missing}"
        raise ValueError(f"{where} does not match this optimizer's global state ({detail})")
    out = {}
    for key, like in current.items():
        value = as_state_tensor(values[key], like, f"{where}['globals'][{key!r}]")
        out[key] = torch.empty_like(like).copy_(value.detach())
    return out
