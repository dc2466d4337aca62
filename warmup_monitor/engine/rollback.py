"""The engine's side of rollback: when a snapshot is due, the restore the controller asks for,
and the snapshots a checkpoint keeps. Functions of the engine, kept apart from its device side.

The engine owns the :class:`~warmup_monitor.rollback.Snapshots` (with
``AdaptiveWarmup(rollback=True)``) and restores into the model and optimizers given to
:meth:`~warmup_monitor.engine.MonitorEngine.attach`: in the step post-hook of a single
optimizer, right after ``optimizer.step`` and before anything else (the scheduler, other
callbacks) sees the damaged weights; before ``on_exhausted="raise"`` raises; and, with several
optimizers, at :meth:`~warmup_monitor.engine.MonitorEngine.rollback_point` after the batch
(``LoopMonitor``, which completes its steps in ``after_step``, calls it there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from warmup_monitor.controller import RollbackRequest

if TYPE_CHECKING:
    from warmup_monitor.engine.core import MonitorEngine


def request(self: MonitorEngine) -> RollbackRequest | None:
    """A rollback the controller of optimizer 0 asks for."""
    w = self._watches[0] if self._watches else None
    return None if w is None or w.controller is None else w.controller.rollback_request


def snapshot_due(self: MonitorEngine) -> bool:
    """Whether a snapshot is due now, before the next update of optimizer 0: the controller's
    cadence, or the anchor's step (``AdaptiveWarmup.anchor_step``)."""
    w = self._watches[0] if self._watches else None
    c = w.controller if w is not None else None
    if w is None or c is None:
        return False
    anchor = self.snapshots.anchor_step if self.snapshots is not None else None
    return c.snapshot_due(w.progress) or (anchor == w.progress and c.rollback and not c.exhausted)


def possible(self: MonitorEngine) -> bool:
    """Whether a rollback can still be asked for: rollback is on, the plan of optimizer 0 is
    not exhausted, and a step not yet processed can still act (warmup or its grace window), or
    a request is pending. Snapshots matter (and go into checkpoints) only then."""
    w = self._watches[0] if self._watches else None
    c = w.controller if w is not None else None
    if w is None or c is None or not c.rollback:
        return False
    if c.rollback_request is not None:
        return True
    first = w.records[0].progress if w.records else w.progress
    return not c.exhausted and c.in_grace(first)


def updates_taken(self: MonitorEngine) -> int:
    """Updates optimizer 0 has taken (steps a gradient scaler skipped not counted): the step
    numbering of snapshots and of the plan."""
    return self._watches[0].progress if self._watches else self._progress.get(0, 0)


def earliest_onset(self: MonitorEngine) -> int:
    """The earliest onset a rollback of optimizer 0 can still have (steps not yet processed,
    or an episode still open): snapshots older than the last one before it can no longer be
    restored."""
    w = self._watches[0]
    first = w.records[0].progress if w.records else w.progress
    return first if w.controller is None else w.controller.earliest_onset(first)


def snapshot_state(self: MonitorEngine) -> tuple[int, dict[int, Any]]:
    """``(updates taken by optimizer 0, the detectors' states)`` for a snapshot; steps still
    kept on the device are processed first."""
    self.flush()
    return self._watches[0].progress, {w.index: w.detector.state_dict() for w in self._watches}


def rolled_back(
    self: MonitorEngine, snapshot_step: int | None, detectors: dict[int, Any] | None, **details: Any
) -> None:
    """The snapshot taken before update ``snapshot_step`` was restored (``None``: none was
    kept): restore the detectors, forget the previous gradients, and record the fact with a
    ``rollback`` alert."""
    w = self._watches[0]
    assert w.controller is not None
    for watch in self._watches:
        if detectors is not None and watch.index in detectors:
            watch.detector.load_state_dict(detectors[watch.index])
        watch.stats.forget()
    alert = w.controller.rolled_back(w.progress - 1, snapshot_step, **details)
    self.alert_count += 1
    self._dispatch([alert], 0)


def roll_back_now(self: MonitorEngine) -> bool:
    """Carry out a pending rollback request now (restore, then tell the controller); whether
    one was pending. Nothing without snapshots or outside a fit (no model attached)."""
    snapshots, target = self.snapshots, self._rollback_target
    req = request(self)
    if snapshots is None or target is None or req is None:
        return False
    model, optimizers = target
    snap = snapshots.restore(model, optimizers, before=req.onset)
    if snap is None:
        rolled_back(self, None, None, snapshot_bytes=snapshots.nbytes)
    else:
        # No wall time in the alert: the alerts of a run are reproducible, bit for bit.
        rolled_back(self, snap.step, snap.monitor, snapshot_bytes=snap.nbytes)
    return True


def rollback_point(self: MonitorEngine, *, start: bool = False) -> None:
    """Between two updates: restore when a rollback is asked for, then take a snapshot when
    one is due. At ``start`` the snapshots of an earlier fit are dropped (a resume keeps the
    checkpoint's)."""
    snapshots, target = self.snapshots, self._rollback_target
    if snapshots is None or target is None:
        return
    if start:
        if not self.snapshots_loaded:
            snapshots.clear()
        self.snapshots_loaded = False
    roll_back_now(self)
    if snapshot_due(self):
        step, monitor = snapshot_state(self)  # processes the steps kept on the device
        if roll_back_now(self):
            return  # they decided a rollback: carried out now, before the next batch
        if step not in snapshots.steps:
            snapshots.take(step, target[0], target[1], monitor)


def save(self: MonitorEngine) -> dict[str, Any]:
    """``{"snapshots": ...}`` during a fit while a rollback can still be asked for: the kept
    snapshots a rollback could still restore, less the one of the current state (tensors: a
    resume rolls back to them exactly as the uninterrupted run does; one snapshot at most,
    usually; not with sharded parameters, whose shards differ per rank); else ``{}``."""
    snapshots = self.snapshots
    fitting = self._rollback_target is not None
    if not snapshots or not fitting or self.sharded or not possible(self):
        return {}
    # The snapshot of the current state (taken before the next update) is left out: the
    # resumed run takes it again from the restored model and optimizers.
    return {
        "snapshots": snapshots.state_dict(
            onset_from=earliest_onset(self), current=updates_taken(self)
        )
    }


def load(self: MonitorEngine, state: dict[str, Any]) -> None:
    """Keep the snapshots of :func:`save` (none if it has none) for the next fit."""
    if self.snapshots is not None:
        self.snapshots.load_state_dict(state.get("snapshots") or {})
        self.snapshots_loaded = True
