"""Alert text for every logger of the Trainer that can take text, besides TensorBoard.

TensorBoard gets each alert as text from :class:`~warmup_monitor.alerts.AlertDispatcher`
(its ``text_writers``). The other loggers, through their public methods:

* **Weights & Biases** (``WandbLogger``, and any logger with the same public
  ``log_text(key, columns, data, step)``): a table under ``<prefix>alerts``, one row per alert
  (step, kind, message, value, threshold), logged again with every new alert, so that the
  latest table holds every alert so far (the W&B UI shows the latest one; its step slider the
  earlier ones).
* **MLflow** (``MLFlowLogger``): two artifacts of the run, rewritten with every alert:
  ``warmup_alerts.txt`` (one line per alert, for a person, shown in the MLflow UI's artifact
  view) and ``warmup_alerts.jsonl`` (the same records as the alerts file, that
  ``warmup-monitor report`` reads from an MLflow file-store run).
* ``CSVLogger`` takes no text: the alerts JSONL lies next to its ``metrics.csv`` (the
  Trainer's ``log_dir``), where the report reads it.

A logger whose call raises never stops training nor the other sinks: the first failure of each
logger is logged with its traceback, the later ones at DEBUG.

This module imports no Lightning (loggers are known by their public methods and class names).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from typing import Any

from warmup_monitor.schema import ALERTS_FILENAME, Alert, json_float, jsonl_line

__all__ = [
    "ALERT_COLUMNS",
    "MLFLOW_TEXT_FILE",
    "MlflowArtifacts",
    "TableText",
    "text_sinks",
]

log = logging.getLogger("warmup_monitor")

#: The columns of the W&B alerts table.
ALERT_COLUMNS = ("step", "kind", "message", "value", "threshold")
#: The MLflow artifact a person reads: one line per alert.
MLFLOW_TEXT_FILE = "warmup_alerts.txt"


class _Sink:
    """One logger's alert sink: ``sink(alert)``; a failure is logged once, never raised."""

    what = "the logger"

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._failed = False

    def __call__(self, alert: Alert) -> None:
        try:
            self._send(alert)
        except Exception:  # a logger's failure must not stop training or the other sinks
            if self._failed:
                log.debug("warmup_monitor: %s still fails", self.what, exc_info=True)
                return
            self._failed = True
            log.exception(
                "warmup_monitor: could not send the alert to %s (said once; the alerts go on "
                "to the other sinks)",
                self.what,
            )

    def _send(self, alert: Alert) -> None:
        raise NotImplementedError


def _text(alert: Alert) -> str:
    """One line for a person: ``[step 12] loss_spike: message (value 3.1, threshold 2)``."""
    message = " ".join(alert.message.split())
    return (
        f"[step {alert.step}] {alert.kind_name}: {message} "
        f"(value {json_float(alert.value)}, threshold {json_float(alert.threshold)})"
    )


class TableText(_Sink):
    """The alerts as a table through a logger's public ``log_text(key, columns, data,
    step)`` (``WandbLogger.log_text``): every alert so far, logged again with each new one.

    Args:
        logger: The logger.
        key: The table's key (``<prefix>alerts``).
    """

    what = "the logger's log_text"

    def __init__(self, logger: Any, key: str) -> None:
        super().__init__(logger)
        self.key = key
        self.rows: list[list[Any]] = []

    def _send(self, alert: Alert) -> None:
        message = " ".join(alert.message.split())
        # Numbers as text: a W&B table column keeps the type of its first row ("nan" too).
        value, threshold = f"{alert.value:.6g}", f"{alert.threshold:.6g}"
        self.rows.append([int(alert.step), alert.kind_name, message, value, threshold])
        self.logger.log_text(
            key=self.key, columns=list(ALERT_COLUMNS), data=list(self.rows), step=alert.step
        )


class MlflowArtifacts(_Sink):
    """The alerts as two text artifacts of an ``MLFlowLogger``'s run, through
    ``logger.experiment.log_text(run_id, text, artifact_file)``: :data:`MLFLOW_TEXT_FILE`
    (for a person) and ``warmup_alerts.jsonl`` (for the report), each rewritten whole with
    every alert, after the lines the run already holds (a second ``fit``, a resume)."""

    what = "MLflow (MLFlowLogger.experiment.log_text)"

    def __init__(self, logger: Any) -> None:
        super().__init__(logger)
        self.lines: list[str] = []
        self.records: list[str] = []
        self._loaded = False

    def _load(self, client: Any, run_id: str) -> None:
        """Continue the run's artifacts when they are there (a second ``fit``, or a resume
        into the same MLflow run); else start empty."""
        self._loaded = True
        for name, into in ((MLFLOW_TEXT_FILE, self.lines), (ALERTS_FILENAME, self.records)):
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = client.download_artifacts(run_id, name, tmp)
                    with open(path, encoding="utf-8") as f:
                        into[:0] = f.read().splitlines()
            except Exception:  # no such artifact yet: a new run
                continue

    def _send(self, alert: Alert) -> None:
        if not self._loaded:
            self._load(self.logger.experiment, self.logger.run_id)
        self.lines.append(_text(alert))
        self.records.append(jsonl_line(alert))
        client, run_id = self.logger.experiment, self.logger.run_id
        client.log_text(run_id, "\n".join(self.lines) + "\n", MLFLOW_TEXT_FILE)
        client.log_text(run_id, "\n".join(self.records) + "\n", ALERTS_FILENAME)


def _is_mlflow_logger(logger: Any) -> bool:
    """Whether ``logger`` is an ``MLFlowLogger`` of either Lightning namespace (or a subclass),
    known by its class name: this module imports no Lightning."""
    return any(k.__name__ == "MLFlowLogger" for k in type(logger).__mro__)


def text_sinks(loggers: Iterable[Any], key: str) -> list[_Sink]:
    """The alert sinks of the loggers that take text, besides TensorBoard's: an
    :class:`MlflowArtifacts` per ``MLFlowLogger``, a :class:`TableText` per logger with a
    public ``log_text`` (``WandbLogger``).

    Args:
        loggers: The Trainer's loggers.
        key: The key of the alerts table (``<prefix>alerts``).
    """
    sinks: list[_Sink] = []
    for logger in loggers:
        if _is_mlflow_logger(logger):
            sinks.append(MlflowArtifacts(logger))
        elif callable(getattr(logger, "log_text", None)):
            sinks.append(TableText(logger, key))
    return sinks
