"""The engine's state for checkpoints: primitives only, steps kept on the device included."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from warmup_monitor.alerts import Alert, resumed_note
from warmup_monitor.engine import rollback
from warmup_monitor.engine.watch import read_values, record_state, restore_record

if TYPE_CHECKING:
    from warmup_monitor.engine.core import MonitorEngine


def save(self: MonitorEngine) -> dict[str, Any]:
    """Step counts, counters, detector, controller and probe states (primitives only), and,
    during a fit while a rollback can still come, the snapshots it may restore (tensors,
    :func:`.rollback.save`).

    Steps still kept on the device are saved as they are, unprocessed (one host read): a
    run resumed from the state processes them at its next read, exactly where the run
    without the checkpoint does. Processing them here would take their decisions earlier
    than a run that never saved (with ``check_every_n_steps > 1``, an extension anchored
    at another step): writing a checkpoint changes nothing in the run that writes it.
    """
    kept = {k: list(v) for k, v in self._kept.items()}
    for w in self._watches:
        if w.records:  # a checkpoint between two host reads: one read, no processing
            host = read_values(w.records)
            kept[w.index] = [record_state(r, v) for r, v in zip(w.records, host, strict=True)]
    steps = dict(self._steps)
    progress = dict(self._progress)
    detectors = dict(self._detector_states)
    controllers = dict(self._controller_states)
    for w in self._watches:
        steps[w.index] = w.step
        progress[w.index] = w.progress
        detectors[w.index] = w.detector.state_dict()
        if w.controller is not None:
            controllers[w.index] = w.controller.state_dict()
    if not detectors:
        detectors[0] = self.detector.state_dict()
    state = {
        "steps": steps,
        "progress": progress,
        "controllers": controllers,
        "alert_count": self.alert_count,
        "skipped_steps": self.skipped_steps,
        "amp_skipped_steps": self.amp_skipped_steps,
        "detectors": detectors,
        "episodes": {
            **self._episode_states,
            **{w.index: w.episodes.state_dict() for w in self._watches if w.episodes is not None},
        },
        "kept": kept,
        "log_dir": self.log_dir,
    }
    if self.prober is not None:
        state["probe"] = self.prober.state_dict()
    state.update(rollback.save(self))  # during a fit, the snapshots a rollback may restore
    return state


def load(self: MonitorEngine, state: dict[str, Any]) -> None:
    """Restore :meth:`state_dict`; the previous gradients are not restored (no cosine on
    the first step after)."""
    self._steps = {int(k): int(v) for k, v in state.get("steps", {}).items()}
    self._progress = {int(k): int(v) for k, v in state.get("progress", self._steps).items()}
    self._controller_states = {int(k): v for k, v in state.get("controllers", {}).items()}
    if self.controller is not None and 0 in self._controller_states:
        self.controller.load_state_dict(self._controller_states[0])
    self.alert_count = int(state.get("alert_count", 0))
    log_dir = state.get("log_dir")
    self.log_dir = log_dir if isinstance(log_dir, str) else None
    self.skipped_steps = int(state.get("skipped_steps", 0))
    self.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))
    self._detector_states = {int(k): v for k, v in state.get("detectors", {}).items()}
    self._episode_states = {int(k): v for k, v in state.get("episodes", {}).items()}
    if 0 in self._detector_states:
        self.detector.load_state_dict(self._detector_states[0])
    if self.prober is not None:
        self.prober.load_state_dict(state.get("probe", {}))
    self._kept = {int(k): list(v) for k, v in state.get("kept", {}).items()}
    for w in self._watches:
        w.records = [restore_record(r, w.stats.device) for r in self._kept.pop(w.index, [])]
        w.step = self._steps.get(w.index, w.step)
        w.progress = self._progress.get(w.index, w.progress)
        if w.controller is not None and w.index in self._controller_states:
            w.controller.load_state_dict(self._controller_states[w.index])
        if w.index in self._detector_states:
            w.detector.load_state_dict(self._detector_states[w.index])
        if w.episodes is not None and w.index in self._episode_states:
            w.episodes.load_state_dict(self._episode_states[w.index])
        w.stats.forget()
    rollback.load(self, state)


def continue_in(self: MonitorEngine, log_dir: str | None) -> Alert | None:
    """Note the log directory the run writes to now; when the state came from a run logged
    elsewhere (Lightning logs a resumed fit to a new ``version_N``), return the ``monitor``
    record that names it (:func:`~warmup_monitor.alerts.resumed_note`), to dispatch."""
    note = resumed_note(self.steps_taken(0), self.log_dir, log_dir)
    self.log_dir = log_dir or self.log_dir
    return note
