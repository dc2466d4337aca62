"""Host syncs: none on quiet steps, one batched read on steps that log or decide.

``.item()``, ``float(t)`` and ``bool(t)`` dispatch ``aten._local_scalar_dense``: a
``TorchDispatchMode`` counts them over real training, with and without the monitor. The
monitor's own batched read is ``Tensor.tolist()`` (which dispatches nothing), counted by a spy
that wraps the real method.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, tiny_module_class
from torch.utils._python_dispatch import TorchDispatchMode

from warmup_monitor import Statistics, WarmupMonitor, Window

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default"}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func) in SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class PerStep(pl.Callback):
    """Snapshots the counters after every other callback's on_train_batch_end."""

    def __init__(self, counter: SyncCounter, reads: list[int]) -> None:
        self.counter, self.reads = counter, reads
        self.syncs: list[int] = []
        self.read_counts: list[int] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.syncs.append(self.counter.count)
        self.read_counts.append(len(self.reads))


def _run(tmp_path: os.PathLike, monitor: WarmupMonitor | None, monkeypatch: Any) -> PerStep:
    reads: list[int] = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        reads.append(self.numel())
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    counter = SyncCounter()
    per_step = PerStep(counter, reads)
    callbacks: list[Any] = ([monitor] if monitor else []) + [per_step]
    with counter:
        fit(pl, tmp_path, callbacks, model=tiny_module_class(pl)(), max_steps=8, logger=False)
    monkeypatch.undo()
    return per_step


def _deltas(values: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *values], values, strict=False)]


@pytest.mark.parametrize("layers", ["off", "auto"])
def test_quiet_steps_take_no_host_sync(
    tmp_path: os.PathLike, monkeypatch: Any, layers: str
) -> None:
    bare = _run(os.path.join(str(tmp_path), "bare"), None, monkeypatch)
    monitor = WarmupMonitor(
        warmup_steps=8,
        window=Window(log_every_n_steps=4, check_every_n_steps=4),
        statistics=Statistics(layers=layers, layers_every_n_steps=1),
    )
    watched = _run(os.path.join(str(tmp_path), "watched"), monitor, monkeypatch)
    # Not one .item()/float()/bool() more than training itself, on any step.
    assert _deltas(watched.syncs) == _deltas(bare.syncs)
    # One batched read on the steps that log (0 and 4), none on the others.
    assert _deltas(watched.read_counts) == [1, 0, 0, 0, 1, 0, 0, 0]
    assert _deltas(bare.read_counts) == [0] * 8
    # The per-group values (2 groups x 3) ride in the same read, on logging steps only:
    # step 0 alone, then steps 1-3 (quiet) and 4 (logging), then 5-7 at the end of the fit.
    extra = 6 if layers == "auto" else 0
    assert watched.reads == [4 + extra, 4 * 4 + extra, 3 * 4]


@pytest.mark.parametrize("layers", ["off", "auto"])
def test_every_step_reads_once_when_logging_every_step(
    tmp_path: os.PathLike, monkeypatch: Any, layers: str
) -> None:
    monitor = WarmupMonitor(
        warmup_steps=8, statistics=Statistics(layers=layers, layers_every_n_steps=1)
    )
    watched = _run(tmp_path, monitor, monkeypatch)
    assert _deltas(watched.read_counts) == [1] * 8


def test_the_counter_sees_a_per_parameter_item(tmp_path: os.PathLike) -> None:
    """A positive control: the counting mode does catch `.item()` calls."""
    counter = SyncCounter()
    t = torch.randn(3)
    with counter:
        _ = [x.item() for x in t]
        _ = float(t.sum())
    assert counter.count == 4
