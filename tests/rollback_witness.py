"""An independent witness of rollbacks, for tests/test_rollback.py and its 2-process scripts.

:func:`witness_class` builds a callback (listed after the monitor) that deep-copies the model's
parameters and buffers and every optimizer-state tensor (``step`` included; a ``DTensor`` as
this rank's shard) before every update, with its own code, never the monitor's. After each
rollback the monitor reports (``controller.rollbacks``), it compares the live state with its
copy of the step the monitor says it restored; at every step it compares each snapshot the
monitor keeps with its copy of that step. Mismatches are recorded, not raised (a rank that
raises alone would leave the other one waiting in a collective).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch


def local(t: Any) -> Any:
    """This rank's part of a tensor (a DTensor's local shard), detached and cloned."""
    if not isinstance(t, torch.Tensor):
        return t
    to_local = getattr(t, "to_local", None)
    if to_local is not None and type(t).__name__ == "DTensor":
        t = to_local()
    return t.detach().clone()


def copy_state(module: torch.nn.Module, optimizers: list[Any]) -> dict[str, Any]:
    """The model's state_dict and each optimizer's per-parameter state, copied."""
    model = {k: local(v) for k, v in module.state_dict().items()}
    opts = [
        {int(i): {k: local(v) for k, v in e.items()} for i, e in o.state_dict()["state"].items()}
        for o in optimizers
    ]
    return {"model": model, "opts": opts}


def differences(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Where two states of :func:`copy_state`'s form differ (exactly; names say where)."""
    out: list[str] = []
    if got["model"].keys() != expected["model"].keys():
        out.append(f"model keys {sorted(got['model'])} != {sorted(expected['model'])}")
    for k, v in expected["model"].items():
        if k in got["model"] and not torch.equal(got["model"][k], v):
            out.append(f"model[{k}]")
    if len(got["opts"]) != len(expected["opts"]):
        out.append("optimizer count")
    for j, (g, e) in enumerate(zip(got["opts"], expected["opts"], strict=False)):
        if g.keys() != e.keys():
            out.append(f"opt{j} params with state {sorted(g)} != {sorted(e)}")
        for i, entry in e.items():
            if i not in g:
                continue
            if g[i].keys() != entry.keys():
                out.append(f"opt{j}[{i}] keys {sorted(g[i])} != {sorted(entry)}")
            for name, value in entry.items():
                other = g[i].get(name)
                if isinstance(value, torch.Tensor):
                    same = isinstance(other, torch.Tensor) and torch.equal(
                        local(other).to(value.device), value
                    )
                else:
                    same = other == value
                if not same:
                    out.append(f"opt{j}[{i}][{name}]: {other!r} != {value!r}")
    return out


def witness_class(ns: ModuleType) -> type:
    """The witness as a Callback of Lightning namespace ``ns``."""

    class RollbackWitness(ns.Callback):  # type: ignore[name-defined,misc]
        def __init__(self, monitor: Any) -> None:
            self.monitor = monitor
            self.copies: dict[int, dict[str, Any]] = {}
            self.checked: list[list[int]] = []  # [rollback step, snapshot step] compared
            self.snapshot_checks = 0
            self.errors: list[str] = []
            self._seen = 0

        def _state(self, trainer: Any, module: Any) -> dict[str, Any]:
            return copy_state(module, list(trainer.optimizers))

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.copies[trainer.global_step] = self._state(trainer, module)

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            now = self._state(trainer, module)
            rollbacks = self.monitor.engine.controller.rollbacks
            for step, snap_step in rollbacks[self._seen :]:
                if snap_step is None:
                    self.errors.append(f"rollback at {step} restored nothing")
                    continue
                diff = differences(now, self.copies[snap_step])
                self.errors += [f"after the rollback at {step} to {snap_step}: {d}" for d in diff]
                self.checked.append([step, snap_step])
            self._seen = len(rollbacks)
            self.copies[trainer.global_step] = now  # the state before the next update
            # Every snapshot the monitor keeps is still what it was when it was taken.
            for snap in self.monitor._snapshots._ring:
                kept = {"model": snap.model, "opts": snap.optimizers}
                diff = differences(kept, self.copies[snap.step])
                where = f"at step {trainer.global_step}, snapshot {snap.step}"
                self.errors += [f"{where}: {d}" for d in diff]
                self.snapshot_checks += 1

    return RollbackWitness
