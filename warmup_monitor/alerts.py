"""Alerts: what the monitor found, and the sinks that carry it to the user.

An :class:`Alert` is a plain record. Detectors return them; :class:`AlertDispatcher` fans each
one out to Python logging, a JSONL file, TensorBoard text and a user hook. A sink that fails
(a full disk, a hook that raises) never hides the alert from the others.

This module imports no Lightning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

log = logging.getLogger("warmup_monitor")

ALERTS_FILENAME = "warmup_alerts.jsonl"


class AlertKind(str, Enum):
    """The enumerated set of alert kinds. The value is what appears in files and logs."""

    #: The loss exceeded ``spike_factor`` x the initial loss (default 10x).
    LOSS_SPIKE = "loss_spike"
    #: The loss jumped far above its recent trend (relative spike, from the second step).
    LOSS_TREND_SPIKE = "loss_trend_spike"
    #: The loss keeps climbing above its recent best: a slow divergence.
    LOSS_DIVERGENCE = "loss_divergence"
    #: The global gradient norm jumped far above its recent level.
    GRAD_NORM_SPIKE = "grad_norm_spike"
    #: The global gradient norm keeps climbing, far above its recent low.
    GRAD_NORM_RISE = "grad_norm_rise"
    #: The loss or a gradient is NaN or infinite.
    NON_FINITE = "non_finite"
    #: Consecutive gradients point in opposite directions, step after step.
    OSCILLATION = "oscillation"
    #: A one-step excursion that recovered at once (a catapult); informational.
    TRANSIENT = "transient"
    #: Instability that persisted or repeated.
    PERSISTENT_INSTABILITY = "persistent_instability"
    #: The adaptive controller lengthened warmup.
    WARMUP_EXTENDED = "warmup_extended"
    #: The adaptive controller hit its caps while training was still unstable.
    WARMUP_EXHAUSTED = "warmup_exhausted"
    #: The learning rate is past the curvature stability limit.
    EDGE_OF_STABILITY = "edge_of_stability"
    #: The monitor itself could not compute something it was asked for.
    MONITOR = "monitor"
    #: An episode of instability ended: its summary (informational).
    EPISODE_END = "episode_end"

    @property
    def is_instability(self) -> bool:
        """Whether this kind means training is unstable (see :data:`INSTABILITY_KINDS`)."""
        return self in INSTABILITY_KINDS


#: The alert kinds that mean training is unstable: what drives warmup extension and the report's
#: verdict. The others are informational: ``transient`` (an excursion that recovered at once),
#: ``warmup_extended`` (an action taken) and ``monitor`` (the monitor's own trouble).
INSTABILITY_KINDS: frozenset[AlertKind] = frozenset(
    {
        AlertKind.LOSS_SPIKE,
        AlertKind.LOSS_TREND_SPIKE,
        AlertKind.GRAD_NORM_SPIKE,
        AlertKind.LOSS_DIVERGENCE,
        AlertKind.GRAD_NORM_RISE,
        AlertKind.NON_FINITE,
        AlertKind.OSCILLATION,
        AlertKind.PERSISTENT_INSTABILITY,
        AlertKind.WARMUP_EXHAUSTED,
        AlertKind.EDGE_OF_STABILITY,
    }
)


def is_instability(kind: AlertKind | str) -> bool:
    """Whether an alert kind (member or value, e.g. ``"loss_spike"``) means instability.

    Unknown kinds (from a newer version's file) are not instability.
    """
    try:
        return AlertKind(kind) in INSTABILITY_KINDS
    except ValueError:
        return False


@dataclass
class Alert:
    """One finding of the monitor.

    Attributes:
        step: Optimizer steps taken before the update the alert is about (0 for the first update).
        kind: What was found, one of :class:`AlertKind`.
        message: A sentence for a person.
        value: The observed value that triggered the alert (may be NaN or inf).
        threshold: The limit the value was compared with (NaN where there is none).
        details: Extra JSON-serialisable facts (e.g. the initial loss, the optimizer index).
        episode: The id of the instability episode the alert opens or closes, if any.
    """

    step: int
    kind: AlertKind
    message: str
    value: float = math.nan
    threshold: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)
    episode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats become ``"nan"``, ``"inf"`` or ``"-inf"``."""
        out = asdict(self)
        out["kind"] = AlertKind(self.kind).value
        out["value"] = _json_float(self.value)
        out["threshold"] = _json_float(self.threshold)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        return cls(
            step=int(data["step"]),
            kind=AlertKind(data["kind"]),
            message=str(data.get("message", "")),
            value=float(data.get("value", math.nan)),
            threshold=float(data.get("threshold", math.nan)),
            details=dict(data.get("details") or {}),
            episode=None if data.get("episode") is None else int(data["episode"]),
        )

    def __str__(self) -> str:
        return f"[step {self.step}] {AlertKind(self.kind).value}: {self.message}"


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


class TextWriter(Protocol):
    """What the dispatcher needs of a TensorBoard ``SummaryWriter``."""

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


class AlertDispatcher:
    """Sends each alert to every sink: logging, JSONL file, TensorBoard text and a user hook.

    Args:
        jsonl_path: File the alerts are appended to, one JSON object a line, flushed per alert.
            ``None`` writes no file.
        text_writers: TensorBoard writers that receive the alert as text under ``text_tag``.
        on_alert: A user callable given each :class:`Alert`. If it raises, the exception is
            logged (with traceback) and training goes on; the other sinks have already received
            the alert.
        text_tag: The TensorBoard text tag.
        log_level: Level of the Python logging record.
        log_quiet_steps: On the console (Python logging) only, an alert of a kind already
            logged fewer than this many steps before is logged at DEBUG instead, and the next
            one logged says how many were held back: a diverging run does not flood the
            terminal. Every other sink gets every alert. 0 logs them all.
    """

    def __init__(
        self,
        *,
        jsonl_path: str | os.PathLike[str] | None = None,
        text_writers: Iterable[TextWriter] = (),
        on_alert: Callable[[Alert], Any] | None = None,
        text_tag: str = "warmup/alerts",
        log_level: int = logging.WARNING,
        log_quiet_steps: int = 50,
    ) -> None:
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.text_writers = list(text_writers)
        self.on_alert = on_alert
        self.text_tag = text_tag
        self.log_level = log_level
        self.log_quiet_steps = log_quiet_steps
        self._file: Any = None
        self._last_logged: dict[str, int] = {}
        self._held: dict[str, int] = {}

    def dispatch(self, alert: Alert) -> None:
        """Send one alert to every sink; no sink's failure stops the others."""
        self._log(alert)
        self._write_jsonl(alert)
        for writer in self.text_writers:
            try:
                writer.add_text(self.text_tag, _markdown(alert), global_step=alert.step)
            except Exception:  # a broken writer must not hide the alert elsewhere
                log.exception("warmup_monitor: could not write the alert to TensorBoard")
        if self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception:
                log.exception("warmup_monitor: the on_alert hook raised; training goes on")

    def _log(self, alert: Alert) -> None:
        kind = AlertKind(alert.kind).value
        last = self._last_logged.get(kind)
        # Actions the monitor took are always said; findings that repeat step after step are
        # held back.
        action = alert.kind in (AlertKind.WARMUP_EXTENDED, AlertKind.WARMUP_EXHAUSTED)
        if not action and last is not None and 0 <= alert.step - last < self.log_quiet_steps:
            self._held[kind] = self._held.get(kind, 0) + 1
            log.debug("warmup_monitor: %s", alert)
            return
        held = self._held.pop(kind, 0)
        suffix = (
            f" ({held} more {kind} alerts since step {last}: see the alerts file)" if held else ""
        )
        log.log(self.log_level, "warmup_monitor: %s%s", alert, suffix)
        self._last_logged[kind] = alert.step

    def _write_jsonl(self, alert: Alert) -> None:
        if self.jsonl_path is None:
            return
        try:
            if self._file is None:
                os.makedirs(os.path.dirname(self.jsonl_path) or ".", exist_ok=True)
                self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            self._file.write(json.dumps(alert.to_dict(), allow_nan=False) + "\n")
            self._file.flush()
        except OSError:
            log.exception("warmup_monitor: could not write %s", self.jsonl_path)

    def close(self) -> None:
        """Close the JSONL file (it is reopened in append mode if another alert comes)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _markdown(alert: Alert) -> str:
    value = _json_float(alert.value)
    threshold = _json_float(alert.threshold)
    return (
        f"**{AlertKind(alert.kind).value}** at step {alert.step}: {alert.message}  \n"
        f"value `{value}`, threshold `{threshold}`"
    )


def read_alerts(path: str | os.PathLike[str]) -> list[Alert]:
    """Read a ``warmup_alerts.jsonl`` file. Lines that do not parse are skipped."""
    alerts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                alerts.append(Alert.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return alerts
