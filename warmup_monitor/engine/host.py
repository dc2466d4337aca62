"""The host side of the engine: the one batched read, the detectors, the plan, the sinks.

Each kept step is processed in order: the detectors see it, the warmup controller sees every
alert it raised, its scalars go to the metrics sinks on a logging step, and its alerts to the
alert sinks. Functions of the engine, kept apart from its device side.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from warmup_monitor import schema
from warmup_monitor.alerts import Alert, AlertKind, is_instability
from warmup_monitor.controller import WarmupExhaustedError
from warmup_monitor.engine import rollback
from warmup_monitor.engine.watch import Record, Watch, read_values

if TYPE_CHECKING:
    from warmup_monitor.engine.core import MonitorEngine

log = logging.getLogger("warmup_monitor")


def read(self: MonitorEngine, w: Watch) -> None:
    records, w.records = w.records, []
    # The one device-to-host read for all steps kept since the last read.
    host = read_values(records)
    exhausted: WarmupExhaustedError | None = None
    for rec, (loss, grad_norm, cosine, ratio, *layers) in zip(records, host, strict=True):
        try:
            process(self, w, rec, loss, grad_norm, cosine, ratio, layers)
        except WarmupExhaustedError as err:  # the steps after it were taken: process them
            exhausted = exhausted or err
    if exhausted is not None:
        raise exhausted


def process(
    self: MonitorEngine,
    w: Watch,
    rec: Record,
    loss: float,
    grad_norm: float,
    cosine: float,
    ratio: float,
    layers: Sequence[float] = (),
) -> None:
    idx, step = w.index, rec.step
    if rec.amp_skipped:
        # The gradient scaler skipped the update (inf/NaN in fp16 gradients): not an
        # instability; the step is counted apart and taught the detectors nothing.
        self.amp_skipped_steps += 1
        w.stats.forget()
        return
    if rec.grad_count == 0 and not rec.has_loss:
        # training_step returned None: Lightning counts the step, nothing was learned.
        self.skipped_steps += 1
        return
    loss_f = loss if rec.has_loss else None
    cosine_f = cosine if math.isfinite(cosine) else None
    alerts: list[Alert] = []
    if rec.grad_count == 0:
        alerts.append(
            Alert(
                step=step,
                kind=AlertKind.MONITOR,
                message="no parameter of the optimizer has a gradient at this step",
                details={"optimizer": idx},
            )
        )
    alerts.extend(w.detector.update(step, loss_f, grad_norm, cosine_f))
    if w.controller is not None:
        alerts.extend(
            w.controller.observe(rec.progress, alerts, next_step=w.progress, lr=rec.lrs[0])
        )
    loss_ratio = w.detector.loss_ratio(loss_f) if loss_f is not None else None
    # The rules, the persistence rule and the controller see every flagged step; the sinks
    # get one line when an episode opens and one when it ends (``Detection.episodes``).
    out = (
        alerts
        if w.episodes is None
        else w.episodes.observe(
            step, alerts, loss_ratio, loss=loss_f, initial_loss=w.detector.initial_loss
        )
    )
    self.alert_count += len(out)

    if rec.log:
        metrics: dict[str, float] = {self.key("lr", idx): rec.lrs[0]}
        if len(rec.lrs) > 1:
            for j, lr in enumerate(rec.lrs):
                metrics[self.key(f"lr/pg{j}", idx)] = lr
        if loss_f is not None:
            metrics[self.key("loss", idx)] = loss_f
            if loss_ratio is not None:
                metrics[self.key("loss_ratio", idx)] = loss_ratio
        if rec.grad_count:
            metrics[self.key("grad_norm", idx)] = grad_norm
        if cosine_f is not None:
            metrics[self.key("grad_cosine", idx)] = cosine_f
        if math.isfinite(ratio):
            metrics[self.key("update_ratio", idx)] = ratio
        metrics[self.key("warmup_steps", idx)] = float(self.planned_warmup_steps(idx))
        if w.controller is not None:
            metrics[self.key("lr_factor", idx)] = rec.factor
        metrics[self.key("alerts", idx)] = float(self.alert_count)
        unstable = any(is_instability(a.kind) for a in alerts)
        metrics[self.key("unstable", idx)] = 1.0 if unstable else 0.0
        if self.amp_skipped_steps:
            metrics[self.key("amp_skipped_steps", idx)] = float(self.amp_skipped_steps)
        if layers and w.groups is not None and len(layers) == 3 * len(w.groups):
            layer_metrics(self, w.groups.names, layers, idx, metrics)
        for sink in self.metrics_sinks:
            sink(metrics, step)
    dispatch(self, out, idx)


def layer_metrics(
    self: MonitorEngine,
    names: Sequence[str],
    values: Sequence[float],
    idx: int,
    metrics: dict[str, float],
) -> None:
    """``layers/<group>/grad_norm``, ``grad_share`` and ``update_ratio``: the finite ones."""
    keys = _layer_keys(self.key_prefix, tuple(names), idx)  # in ``values``' order
    for key, v in zip(keys, values, strict=True):
        if math.isfinite(v):
            metrics[key] = v


@functools.lru_cache(maxsize=64)
def _layer_keys(prefix: str, names: tuple[str, ...], idx: int) -> tuple[str, ...]:
    """The per-group keys of ``names``, every statistic of every group, stat-major (the
    order of a record's values), built once per set of groups."""
    stats = ("grad_norm", "grad_share", "update_ratio")
    return tuple(schema.key(f"layers/{n}/{s}", prefix, idx) for s in stats for n in names)


def dispatch(self: MonitorEngine, alerts: Sequence[Alert], opt_idx: int) -> None:
    for alert in alerts:
        alert.details.setdefault("optimizer", opt_idx)
        for alert_sink in self.alert_sinks:
            alert_sink(alert)
    for alert in alerts:
        if (
            alert.kind == AlertKind.WARMUP_EXHAUSTED
            and alert.details.get("action") == "raise"
            and self._raise_exhausted  # not while an interrupted run is wound up
        ):
            rollback.roll_back_now(self)  # the episode's damage is not left in the model
            raise WarmupExhaustedError(alert.message)


def stop(self: MonitorEngine, *, close_episodes: bool, interrupted: bool) -> None:
    """:meth:`MonitorEngine.detach` (a sink's error is raised after the cleanup) and
    :meth:`MonitorEngine.interrupt` (logged): process what is kept, end the episodes, remove
    every optimizer hook, free the buffers."""
    errors: list[Exception] = []
    if interrupted:
        self._raise_exhausted = False
        for w in self._watches:
            w.pending = None  # measured, never stepped: not a step taken
    try:
        for w in self._watches:
            try:
                if w.records:
                    read(self, w)
            except Exception as err:  # every watch is processed, then the hooks go
                errors.append(err)
                w.records = []
        for w in self._watches:
            if w.episodes is not None and w.hook is not None:  # not stopped already
                # A fit that stops inside the window keeps its open episode in the state: a
                # further fit (or a resume) continues it, and its own record closes it.
                until = self.monitor_until(w.index)
                window_ended = w.step >= until
                self._episode_states[w.index] = w.episodes.state_dict()
                if close_episodes:
                    last = int(min(w.step, until)) - 1  # the last step monitored
                    ended = w.episodes.close(
                        max(last, 0), interrupted=interrupted, monitoring_ended=window_ended
                    )
                    self.alert_count += len(ended)
                    try:
                        dispatch(self, ended, w.index)
                    except Exception as err:
                        errors.append(err)
                if window_ended or interrupted:
                    self._episode_states[w.index] = w.episodes.state_dict()
    finally:
        self._raise_exhausted = True
        for w in self._watches:
            if w.hook is not None:
                w.hook.remove()
                w.hook = None
            if w.lr_factor is not None:
                w.lr_factor.remove()
                w.lr_factor = None
            self._steps[w.index] = w.step
            self._progress[w.index] = w.progress
            self._detector_states[w.index] = w.detector.state_dict()
            if w.controller is not None:
                self._controller_states[w.index] = w.controller.state_dict()
        self._rollback_target = None
        self._release()
    if errors and interrupted:
        for error in errors:
            log.error("warmup_monitor: at the interruption: %s", error, exc_info=error)
    elif errors:
        raise errors[0]
