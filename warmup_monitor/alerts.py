"""Alerts: what the monitor found, and the sinks that carry it to the user.

An :class:`Alert` is a plain record, defined with its kinds, its JSONL writer and its reader in
:mod:`warmup_monitor.schema` (the on-disk contract) and re-exported here. Detectors return
them; :class:`AlertDispatcher` fans each one out to Python logging, a JSONL file, TensorBoard
text and a user hook. A sink that fails (a full disk, a hook that raises) never hides the alert
from the others.

This module imports no Lightning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from warmup_monitor.schema import (
    ACTION_KINDS,
    ALERTS_FILENAME,
    INSTABILITY_KINDS,
    NOTICE_KINDS,
    Alert,
    AlertKind,
    JsonlWriter,
    is_instability,
    json_float,
    read_alerts,
    read_alerts_file,
)

__all__ = [
    "ALERTS_FILENAME",
    "INSTABILITY_KINDS",
    "NOTICE_KINDS",
    "Alert",
    "AlertDispatcher",
    "AlertKind",
    "TextWriter",
    "alerts_path",
    "is_instability",
    "read_alerts",
    "read_alerts_file",
    "resumed_note",
]

log = logging.getLogger("warmup_monitor")


def resumed_note(step: int, previous: Any, current: str | None) -> Alert | None:
    """The ``monitor`` record a resumed fit writes when its log directory is not the one its
    checkpoint was written from (Lightning logs a resumed fit to a new ``version_N``): it names
    the earlier directory (``details.resumed_from``), and the report reads the two as one run.
    ``None`` when there is nothing to say."""
    if not isinstance(previous, str) or not previous or not current:
        return None
    if os.path.realpath(previous) == os.path.realpath(current):
        return None
    return Alert(
        step=step,
        kind=AlertKind.MONITOR,
        message=(
            f"resumed at step {step} from a checkpoint of the run logged in {previous}: the "
            "report judges the two together"
        ),
        details={"resumed_from": previous},
    )


def alerts_path(alerts_file: str | None, log_dir: str | None) -> str | None:
    """Where the alerts JSONL goes: ``alerts_file`` relative to the run's ``log_dir`` (the
    working directory without one); an absolute path as is; ``None``: no file."""
    if alerts_file is None:
        return None
    if os.path.isabs(alerts_file):
        return alerts_file
    return os.path.join(log_dir or os.getcwd(), alerts_file)


class TextWriter(Protocol):
    """What the dispatcher needs of a TensorBoard ``SummaryWriter``."""

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


class AlertDispatcher:
    """Sends each alert to every sink: logging, JSONL file, TensorBoard text, the other loggers'
    text and a user hook.

    Args:
        jsonl_path: File the alerts are appended to, one JSON object a line, flushed per alert.
            ``None`` writes no file.
        text_writers: TensorBoard writers that receive the alert as text under ``text_tag``.
        text_sinks: Other loggers' text sinks, each called with the alert
            (:func:`warmup_monitor.logger_text.text_sinks`: W&B's table, MLflow's artifacts).
        on_alert: A user callable given each :class:`Alert`. If it raises, the exception is
            logged (with traceback) and training goes on; the other sinks have already received
            the alert.
        text_tag: The TensorBoard text tag.
        log_level: Level of the Python logging record.
        log_quiet_steps: On the console (Python logging) only, an alert of a kind already
            logged fewer than this many steps before is logged at DEBUG instead, and the next
            one logged says how many were held back: a diverging run does not flood the
            terminal. Every other sink gets every alert. 0 logs them all.
        fresh: A fresh watch begins: move an existing JSONL file aside now
            (:meth:`start_fresh`); ``False`` (a resume) appends to it.
    """

    def __init__(
        self,
        *,
        jsonl_path: str | os.PathLike[str] | None = None,
        text_writers: Iterable[TextWriter] = (),
        text_sinks: Iterable[Callable[[Alert], Any]] = (),
        on_alert: Callable[[Alert], Any] | None = None,
        text_tag: str = "warmup/alerts",
        log_level: int = logging.WARNING,
        log_quiet_steps: int = 50,
        fresh: bool = False,
    ) -> None:
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.text_writers = list(text_writers)
        self.text_sinks = list(text_sinks)
        self.on_alert = on_alert
        self.text_tag = text_tag
        self.log_level = log_level
        self.log_quiet_steps = log_quiet_steps
        self._writer = None if self.jsonl_path is None else JsonlWriter(self.jsonl_path)
        self._last_logged: dict[str, int] = {}
        self._held: dict[str, int] = {}
        if fresh:
            self.start_fresh()

    def dispatch(self, alert: Alert) -> None:
        """Send one alert to every sink; no sink's failure stops the others."""
        self._log(alert)
        self._write_jsonl(alert)
        for writer in self.text_writers:
            try:
                writer.add_text(self.text_tag, _markdown(alert), global_step=alert.step)
            except Exception:  # a broken writer must not hide the alert elsewhere
                log.exception("warmup_monitor: could not write the alert to TensorBoard")
        for sink in self.text_sinks:
            try:
                sink(alert)
            except Exception:  # the logger_text sinks say their own failures; a safety net
                log.exception("warmup_monitor: could not send the alert to a logger")
        if self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception:
                log.exception("warmup_monitor: the on_alert hook raised; training goes on")

    def _log(self, alert: Alert) -> None:
        kind = alert.kind_name
        last = self._last_logged.get(kind)
        # Actions the monitor took (and episode summaries) are always said; findings that repeat
        # step after step are held back.
        action = alert.kind in ACTION_KINDS
        if not action and last is not None and 0 <= alert.step - last < self.log_quiet_steps:
            self._held[kind] = self._held.get(kind, 0) + 1
            log.debug("warmup_monitor: %s", alert)
            return
        held = self._held.pop(kind, 0)
        suffix = f" ({held} more {kind} alerts since step {last}: {self._where()})" if held else ""
        # A notice (a signal that predicts nothing by itself) is said at INFO, below a warning.
        level = min(self.log_level, logging.INFO) if alert.kind in NOTICE_KINDS else self.log_level
        log.log(level, "warmup_monitor: %s%s", alert, suffix)
        self._last_logged[kind] = alert.step

    def _where(self) -> str:
        """Where the alerts held back on the console can be read."""
        if self.jsonl_path is not None:
            return f"see {self.jsonl_path}"
        if self.text_writers:
            return f"see TensorBoard's TEXT tab, tag {self.text_tag}"
        return "logged at DEBUG level"

    def _write_jsonl(self, alert: Alert) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(alert)
        except (OSError, ValueError):
            log.exception("warmup_monitor: could not write %s", self.jsonl_path)

    def start_fresh(self) -> None:
        """A fresh watch begins: move an existing JSONL file aside (to the first free
        ``<path>.N``), so that the file holds this run's alerts only
        (:meth:`~warmup_monitor.schema.JsonlWriter.start_fresh`); a resume does not call this
        and appends. A file that cannot be moved is said once on the log, and appended to."""
        if self._writer is None:
            return
        try:
            aside = self._writer.start_fresh()
        except OSError:
            log.exception("warmup_monitor: could not move %s aside; appending", self.jsonl_path)
            return
        if aside is not None:
            log.info(
                "warmup_monitor: a fresh run: the previous %s is now %s", self.jsonl_path, aside
            )

    def close(self) -> None:
        """Close the JSONL file (it is reopened in append mode if another alert comes)."""
        if self._writer is not None:
            self._writer.close()


def _markdown(alert: Alert) -> str:
    value = json_float(alert.value)
    threshold = json_float(alert.threshold)
    return (
        f"**{alert.kind_name}** at step {alert.step}: {alert.message}  \n"
        f"value `{value}`, threshold `{threshold}`"
    )
