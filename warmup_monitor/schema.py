"""The on-disk contract: metric keys, the alert record, its JSONL writer and its tolerant reader.

Everything the monitor leaves in a run directory is defined here, and every part that writes or
reads it (the engine, the report, the TensorBoard tab) goes through this module:

* **Metric keys.** ``key(name, prefix, opt_idx)``: ``warmup/lr`` for optimizer 0,
  ``warmup/opt1/lr`` for optimizer 1; the names are the constants below (:data:`METRIC_NAMES`).
* **Alerts.** One :class:`Alert` record. ``warmup_alerts.jsonl`` holds one JSON object a line:
  ``{"step", "kind", "message", "value", "threshold", "details"}`` and, for the alerts of an
  unstable episode, ``"episode"`` (its id). Non-finite floats are written as the strings
  ``"nan"``, ``"inf"``, ``"-inf"``, so that every line is strict JSON.
* **Episodes.** The first flagged step of an unstable episode opens it: one instability alert
  with ``episode`` set. When it ends, one :data:`AlertKind.EPISODE_END` record closes it; its
  ``details`` hold :data:`EPISODE_END_FIELDS`, ``outcome`` one of :data:`EPISODE_OUTCOMES`
  (``"interrupted"``: training stopped on an exception while it was open).
* **One run per file.** A fresh watch moves an existing alerts file aside
  (:meth:`JsonlWriter.start_fresh`, to ``warmup_alerts.jsonl.N``); a resume appends.

:func:`read_alerts_file` is the one reader: it never raises on a bad line. Each line that cannot
be a record (not UTF-8, not JSON, nested deeper than :data:`MAX_DEPTH`, not an object, a step that
is not a whole number in ``[0, MAX_STEP]``, ...) is skipped and named, ``"line N: why; skipped"``.
Kinds this version does not know (from a newer one) are kept, as strings.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

__all__ = [
    "ACTION_KINDS",
    "ALERTS_FILENAME",
    "DEFAULT_PREFIX",
    "EPISODE_END_FIELDS",
    "EPISODE_OUTCOMES",
    "INSTABILITY_KINDS",
    "MAX_DEPTH",
    "MAX_STEP",
    "METRIC_NAMES",
    "NOTICE_KINDS",
    "Alert",
    "AlertKind",
    "AlertsFile",
    "JsonlWriter",
    "is_instability",
    "json_float",
    "jsonl_line",
    "key",
    "kind_value",
    "parse_alert_line",
    "parse_alerts",
    "read_alerts",
    "read_alerts_file",
    "split_key",
]

# ------------------------------------------------------------------------------ metric keys

#: The prefix of every metric key unless the user sets ``log_key_prefix``.
DEFAULT_PREFIX = "warmup/"

LR = "lr"
LOSS = "loss"
LOSS_RATIO = "loss_ratio"
GRAD_NORM = "grad_norm"
GRAD_COSINE = "grad_cosine"
UPDATE_RATIO = "update_ratio"
WARMUP_STEPS = "warmup_steps"
LR_FACTOR = "lr_factor"
ALERTS = "alerts"
UNSTABLE = "unstable"
AMP_SKIPPED_STEPS = "amp_skipped_steps"
SHARPNESS = "sharpness"
STABILITY_MARGIN = "stability_margin"
SHARPNESS_RESIDUAL = "sharpness_residual"
SHARPNESS_CONVERGED = "sharpness_converged"

#: Every metric name the monitor logs (the lr also per param group: ``lr/pgJ``).
METRIC_NAMES: tuple[str, ...] = (
    LR,
    LOSS,
    LOSS_RATIO,
    GRAD_NORM,
    GRAD_COSINE,
    UPDATE_RATIO,
    WARMUP_STEPS,
    LR_FACTOR,
    ALERTS,
    UNSTABLE,
    AMP_SKIPPED_STEPS,
    SHARPNESS,
    STABILITY_MARGIN,
    SHARPNESS_RESIDUAL,
    SHARPNESS_CONVERGED,
)

_OPT = re.compile(r"opt(\d+)/")


def key(name: str, prefix: str = DEFAULT_PREFIX, opt_idx: int = 0) -> str:
    """The metric key of ``name`` for optimizer ``opt_idx``.

    >>> key("lr"), key("lr", opt_idx=1), key("loss", prefix="wm/")
    ('warmup/lr', 'warmup/opt1/lr', 'wm/loss')
    """
    if opt_idx == 0:
        return f"{prefix}{name}"
    return f"{prefix}opt{opt_idx}/{name}"


def split_key(tag: str, prefix: str = DEFAULT_PREFIX) -> tuple[int, str] | None:
    """Inverse of :func:`key`: ``(opt_idx, name)``, or ``None`` if ``tag`` lacks the prefix."""
    if not tag.startswith(prefix):
        return None
    rest = tag[len(prefix) :]
    m = _OPT.match(rest)
    if m:
        return int(m.group(1)), rest[m.end() :]
    return 0, rest


# ------------------------------------------------------------------------------ alerts

#: The alerts file in the run's log directory.
ALERTS_FILENAME = "warmup_alerts.jsonl"


class AlertKind(str, Enum):
    """The enumerated set of alert kinds. The value is what appears in files and logs."""

    #: The loss exceeded ``spike_factor`` x the initial loss (default 10x).
    LOSS_SPIKE = "loss_spike"
    #: The loss jumped far above its recent trend (relative spike, from the second step).
    LOSS_TREND_SPIKE = "loss_trend_spike"
    #: The global gradient norm jumped far above its recent level.
    GRAD_NORM_SPIKE = "grad_norm_spike"
    #: The loss climbed above its best by a growing margin over a window (slow divergence).
    LOSS_DIVERGENCE = "loss_divergence"
    #: The gradient norm kept rising over a window.
    GRAD_NORM_RISE = "grad_norm_rise"
    #: The loss or a gradient is NaN or infinite.
    NON_FINITE = "non_finite"
    #: Consecutive gradients point in opposite directions, step after step.
    OSCILLATION = "oscillation"
    #: A one-step excursion that recovered at once (a catapult); informational.
    TRANSIENT = "transient"
    #: Instability that persisted or repeated.
    PERSISTENT_INSTABILITY = "persistent_instability"
    #: An unstable episode ended; ``details`` summarise it (:data:`EPISODE_END_FIELDS`).
    EPISODE_END = "episode_end"
    #: The adaptive controller lengthened warmup.
    WARMUP_EXTENDED = "warmup_extended"
    #: The adaptive controller lowered the lr factor (a back-off).
    LR_BACKOFF = "lr_backoff"
    #: The adaptive controller restored an earlier snapshot (a rollback).
    ROLLBACK = "rollback"
    #: The adaptive controller hit its caps while training was still unstable.
    WARMUP_EXHAUSTED = "warmup_exhausted"
    #: The learning rate is past the curvature stability limit.
    EDGE_OF_STABILITY = "edge_of_stability"
    #: The monitor itself could not compute something it was asked for.
    MONITOR = "monitor"

    @property
    def is_instability(self) -> bool:
        """Whether this kind means training is unstable (see :data:`INSTABILITY_KINDS`)."""
        return self in INSTABILITY_KINDS


#: The alert kinds that mean training is unstable: what drives warmup extension, the verdict and
#: ``warmup/unstable``. The others are informational: the :data:`NOTICE_KINDS`, ``transient``
#: (an excursion that recovered at once), ``episode_end`` (a summary), the controller's actions
#: (``warmup_extended``, ``lr_backoff``, ``rollback``) and ``monitor`` (the monitor's own
#: trouble).
INSTABILITY_KINDS: frozenset[AlertKind] = frozenset(
    {
        AlertKind.LOSS_SPIKE,
        AlertKind.LOSS_TREND_SPIKE,
        AlertKind.LOSS_DIVERGENCE,
        AlertKind.NON_FINITE,
        AlertKind.PERSISTENT_INSTABILITY,
        AlertKind.WARMUP_EXHAUSTED,
        AlertKind.EDGE_OF_STABILITY,
    }
)

#: Signals that are shown but mean nothing by themselves: on the corpus of real runs
#: (``benchmarks/README_corpus.md``) a gradient-norm spike or rise, and consecutive gradients
#: that point against each other, do not predict a worse outcome (the norm commonly rises during
#: warmup while the loss falls; plain SGD near its stability limit flips its gradients while the
#: loss falls). Logged, written to
#: every sink and drawn, at INFO on the console; not counted by the verdict,
#: ``warmup/unstable`` or the controller.
NOTICE_KINDS: frozenset[AlertKind] = frozenset(
    {AlertKind.GRAD_NORM_SPIKE, AlertKind.GRAD_NORM_RISE}
)

#: What the adaptive controller did (and the end of an episode): said on the console every time.
ACTION_KINDS: frozenset[AlertKind] = frozenset(
    {
        AlertKind.WARMUP_EXTENDED,
        AlertKind.LR_BACKOFF,
        AlertKind.ROLLBACK,
        AlertKind.WARMUP_EXHAUSTED,
        AlertKind.EPISODE_END,
    }
)

#: The ``details`` of an :data:`AlertKind.EPISODE_END` record: the episode's id, its first and
#: last flagged step, ``duration`` (``end - start + 1``), ``count`` (flagged steps), ``kinds``
#: (the instability kinds seen, first seen first), ``peak_ratio`` (highest loss / trend, or loss /
#: initial loss, seen) and ``peak_step``, ``recovered`` (whether the loss came back: ``None``
#: when that could not be judged), ``outcome`` (how it ended, one of :data:`EPISODE_OUTCOMES`),
#: and ``steps``: the flagged steps as inclusive ranges, ``[[13, 40], [45, 45]]``. An episode
#: that ended quiet also has ``recovery``: why it did or did not recover, or why that could not
#: be judged (:func:`warmup_monitor.verdict.recovery`).
EPISODE_END_FIELDS: tuple[str, ...] = (
    "episode",
    "start",
    "end",
    "duration",
    "count",
    "kinds",
    "peak_ratio",
    "peak_step",
    "recovered",
    "outcome",
    "steps",
)

#: Episode outcomes (``episode_end`` ``details["outcome"]``). It ended quiet (no flagged step for
#: ``Detection.episode_quiet_steps``) and the losses of the quiet steps were judged by
#: :func:`warmup_monitor.verdict.recovery` (the rule of the report's verdict; ``details
#: ["recovery"]`` says why): ``"recovered"`` (``recovered`` is true) or ``"not_recovered"``
#: (the loss did not come back: above the level before the episode, at the initial loss, or not
#: finite; ``recovered`` is false); ``"ended_quiet"``: it ended quiet but no loss was seen after
#: its last flagged step, so recovery could not be judged (``recovered`` is ``None``). It was
#: still open: ``"open_at_end"`` (monitoring ended normally: the end of a fit or loop) or
#: ``"interrupted"`` (training stopped on an exception: the run crashed, nothing is known of
#: what came next); ``recovered`` is false for these two. Files written before this field have
#: only ``recovered``.
EPISODE_OUTCOMES: tuple[str, ...] = (
    "recovered",
    "not_recovered",
    "ended_quiet",
    "open_at_end",
    "interrupted",
)


def kind_value(kind: AlertKind | str) -> str:
    """The string of a kind, member or not (``AlertKind.LOSS_SPIKE`` -> ``"loss_spike"``)."""
    return kind.value if isinstance(kind, AlertKind) else str(kind)


def is_instability(kind: AlertKind | str) -> bool:
    """Whether an alert kind (member or value, e.g. ``"loss_spike"``) means instability.

    Unknown kinds (from a newer version's file) are not instability.
    """
    try:
        return AlertKind(kind) in INSTABILITY_KINDS
    except ValueError:
        return False


def json_float(x: float) -> float | str:
    """``x`` for a strict JSON file: non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class Alert:
    """One finding of the monitor, and one line of ``warmup_alerts.jsonl``.

    Attributes:
        step: Optimizer steps taken before the update the alert is about (0 for the first update).
        kind: What was found: an :class:`AlertKind`, or the string of a kind this version does
            not know (read from a newer version's file).
        message: A sentence for a person.
        value: The observed value that triggered the alert (may be NaN or inf).
        threshold: The limit the value was compared with (NaN where there is none).
        details: Extra JSON-serialisable facts (e.g. the initial loss, the optimizer index).
        episode: The id of the unstable episode this alert opens or closes (``None``: none).
    """

    step: int
    kind: AlertKind | str
    message: str
    value: float = math.nan
    threshold: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)
    episode: int | None = None

    @property
    def kind_name(self) -> str:
        """The kind as a string (``"loss_spike"``)."""
        return kind_value(self.kind)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-ready dict (``episode`` only when set)."""
        out: dict[str, Any] = {
            "step": int(self.step),
            "kind": self.kind_name,
            "message": self.message,
            "value": json_float(self.value),
            "threshold": json_float(self.threshold),
            "details": self.details,
        }
        if self.episode is not None:
            out["episode"] = int(self.episode)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Alert:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, unknown kinds kept as strings.

        Raises:
            ValueError: ``data`` is not a valid record; the message says why.
        """
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object ({type(data).__name__})")
        if "step" not in data:
            raise ValueError("no 'step' field")
        if "kind" not in data:
            raise ValueError("no 'kind' field")
        step = _whole("step", data["step"])
        kind_raw = data["kind"]
        if not isinstance(kind_raw, str) or not kind_raw:
            raise ValueError("'kind' is not a non-empty string")
        kind: AlertKind | str
        try:
            kind = AlertKind(kind_raw)
        except ValueError:
            kind = kind_raw
        message = data.get("message", "")
        if message is None:
            message = ""
        if not isinstance(message, (str, int, float)) or isinstance(message, bool):
            raise ValueError("'message' is not a string")
        details = data.get("details")
        if details is None:
            details = {}
        if not isinstance(details, dict):
            raise ValueError("'details' is not an object")
        episode = data.get("episode")
        if episode is not None:
            episode = _whole("episode", episode)
        return cls(
            step=step,
            kind=kind,
            message=str(message),
            value=_number("value", data.get("value")),
            threshold=_number("threshold", data.get("threshold")),
            details=details,
            episode=episode,
        )

    def __str__(self) -> str:
        return f"[step {self.step}] {self.kind_name}: {self.message}"


#: The largest step a record may carry: 2**53, the last integer a JSON number (a double) holds
#: exactly. Larger, or negative, steps are refused by the reader.
MAX_STEP = 2**53
#: The deepest nesting of arrays and objects a line may have; deeper lines are refused before
#: they are parsed (a line of 100,000 ``[`` would exhaust Python's recursion limit).
MAX_DEPTH = 64


def _whole(name: str, x: Any) -> int:
    """A whole number in ``[0, MAX_STEP]``; integral floats (``7.0``) are accepted."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"'{name}' is not a number ({type(x).__name__})")
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"'{name}' is not finite ({x})")
        if x != math.floor(x):
            raise ValueError(f"'{name}' {x!r} is not a whole number")
    if x < 0:
        raise ValueError(f"'{name}' {x} is negative")
    if x > MAX_STEP:
        raise ValueError(f"'{name}' {x:.4g} is beyond 2**53")
    return int(x)


def _number(name: str, x: Any) -> float:
    """A float; ``None`` is NaN; the strings of :func:`json_float` are accepted."""
    if x is None:
        return math.nan
    if isinstance(x, bool):
        raise ValueError(f"'{name}' is a boolean, not a number")
    if isinstance(x, (int, float)):
        try:
            return float(x)
        except OverflowError:  # an int beyond the float range
            return math.inf if x > 0 else -math.inf
    if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(x)
    raise ValueError(f"'{name}' is not a number ({type(x).__name__})")


def _too_deep(line: str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``line`` nests arrays/objects deeper than ``limit`` (strings are skipped)."""
    if line.count("[") + line.count("{") <= limit:
        return False  # cheap: the common case never walks the line
    depth = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _strict(x: Any) -> Any:
    """``x`` with every non-finite float replaced by its :func:`json_float` string."""
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def jsonl_line(alert: Alert) -> str:
    """The alert as one line of ``warmup_alerts.jsonl`` (strict JSON, no newline)."""
    record = alert.to_dict()
    try:
        return json.dumps(record, allow_nan=False)
    except ValueError:  # a non-finite float in the details
        return json.dumps(_strict(record), allow_nan=False)


class JsonlWriter:
    """Appends alerts to a ``warmup_alerts.jsonl`` file, one strict-JSON line each, flushed.

    The file (and its directory) is created at the first write. Raises ``OSError`` when the file
    cannot be written: the caller decides what a failing sink means.

    **One run per file.** A fresh watch (a new run, not a resume) calls :meth:`start_fresh`
    before anything is written: an existing file is moved aside to the first free
    ``<path>.N`` (``warmup_alerts.jsonl.1``, ``.2``, ...: the higher, the later) and an empty
    file takes its place, so that the file holds only this run's alerts, and the older ones
    are kept. A resume does not call it and keeps appending.

    Args:
        path: The file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None

    def start_fresh(self) -> str | None:
        """Move an existing file aside (to the first free ``<path>.N``) and start an empty one
        in its place; return where the old one went (``None``: there was none, nothing done).

        Raises:
            OSError: the file could not be moved.
        """
        self.close()
        if not os.path.lexists(self.path):
            return None
        n = 1
        while os.path.lexists(f"{self.path}.{n}"):
            n += 1
        aside = f"{self.path}.{n}"
        os.replace(self.path, aside)
        # An empty file in its place: this run has no alert yet, and a reader must not fall
        # back on the older run's alerts (in TensorBoard text of the same directory).
        with open(self.path, "w", encoding="utf-8"):
            pass
        return aside

    def write(self, alert: Alert) -> None:
        """Append one alert and flush."""
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(jsonl_line(alert) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (it is reopened in append mode by the next write)."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class AlertsFile:
    """What :func:`read_alerts_file` found.

    Attributes:
        alerts: The valid records, in file order.
        lines: The line number (from 1) of each alert.
        problems: One sentence per line skipped, ``"line N: why; skipped"`` (or a sentence on why
            the file could not be read at all).
    """

    alerts: list[Alert] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_alert_line(raw: bytes) -> Alert:
    """One line of the file as a record.

    Raises:
        ValueError: the line is not a valid record; the message says why.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start})") from None
    if _too_deep(text):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text)
    except RecursionError:  # pragma: no cover - _too_deep refuses such lines first
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg.lower()} (column {e.colno})") from None
    return Alert.from_dict(data)


def parse_alerts(data: bytes) -> AlertsFile:
    """The records of a ``warmup_alerts.jsonl`` file's bytes; never raises.

    Each bad line is skipped and named in :attr:`AlertsFile.problems` (``"line N: why;
    skipped"``). Blank lines are ignored.
    """
    out = AlertsFile()
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            alert = parse_alert_line(raw.strip())
        except ValueError as e:
            why = str(e)
            if number == len(lines) and why.startswith("not JSON"):
                why = "truncated or " + why  # a writer stopped mid-line
            out.problems.append(f"line {number}: {why}; skipped")
            continue
        out.alerts.append(alert)
        out.lines.append(number)
    return out


def read_alerts_file(path: str | os.PathLike[str]) -> AlertsFile:
    """Read a ``warmup_alerts.jsonl`` file; never raises (see :func:`parse_alerts`).

    An unreadable file gives one problem and no alert.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return AlertsFile(problems=[f"could not be read ({e.strerror or e})"])
    return parse_alerts(data)


def read_alerts(path: str | os.PathLike[str]) -> list[Alert]:
    """The valid records of a ``warmup_alerts.jsonl`` file (bad lines are skipped; use
    :func:`read_alerts_file` to learn which and why)."""
    return read_alerts_file(path).alerts
