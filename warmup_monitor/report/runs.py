"""Find runs on disk and load what the monitor left there: scalars and the alerts JSONL.

A run directory holds ``events.out.tfevents.*`` files (TensorBoardLogger writes them in
``<root>/<name>/version_N/``) and, next to them, ``warmup_alerts.jsonl``. A directory without
event files of its own is searched for run directories below it.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from warmup_monitor.alerts import ALERTS_FILENAME
from warmup_monitor.report.events import Series, event_files, read_event_files

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_NOT_FOUND",
    "EXIT_NO_EVENTS",
    "EXIT_NO_WARMUP_KEYS",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_SKIPPED",
    "EXIT_USAGE",
    "AlertRecord",
    "NoEventFilesError",
    "NoWarmupKeysError",
    "ReportError",
    "RunData",
    "RunNotFoundError",
    "find_run_dirs",
    "load_run",
    "read_alerts_jsonl",
]

#: Exit codes of ``warmup-monitor report`` (several problems: the lowest code >= 3 wins).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NO_EVENTS = 4
EXIT_NO_WARMUP_KEYS = 5
EXIT_SKIPPED = 6
EXIT_OUTPUT = 7

#: Keys whose presence makes a run a warmup_monitor run (without the prefix).
CORE_KEYS = ("lr", "loss", "grad_norm")


class ReportError(Exception):
    """A run could not be reported; ``exit_code`` is what the CLI returns for it."""

    exit_code = EXIT_INTERNAL


class RunNotFoundError(ReportError, FileNotFoundError):
    """The path given does not exist or is not a directory."""

    exit_code = EXIT_NOT_FOUND


class NoEventFilesError(ReportError, FileNotFoundError):
    """The directory holds no TensorBoard event file, at any depth."""

    exit_code = EXIT_NO_EVENTS


class NoWarmupKeysError(ReportError, ValueError):
    """The event files hold none of the monitor's keys."""

    exit_code = EXIT_NO_WARMUP_KEYS


@dataclass
class AlertRecord:
    """One alert as stored; ``kind`` is kept as a string so that new kinds still load."""

    step: int
    kind: str
    message: str = ""
    value: float = math.nan
    threshold: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "kind": self.kind,
            "message": self.message,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "details": self.details,
        }


@dataclass
class RunData:
    """What one run left on disk.

    Attributes:
        name: The name shown for the run (its path as given, or relative to the root searched).
        path: The run directory.
        series: Scalar key without the prefix (``"lr"``, ``"loss"``, ``"opt1/lr"``) -> series.
        alerts: The alerts, in file order.
        alerts_source: ``"jsonl"``, ``"tensorboard"`` (text summaries, when there is no JSONL) or
            ``"none"``.
        problems: One sentence per thing that could not be read (the CLI exits with
            :data:`EXIT_SKIPPED`).
        notes: Facts about how the run was read that are not a loss of data.
        records: Event records read.
    """

    name: str
    path: str
    series: dict[str, Series]
    alerts: list[AlertRecord]
    alerts_source: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0


def _json_float(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _to_float(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool):
        raise TypeError("a boolean is not a number")
    return float(x)  # also parses "nan", "inf", "-inf"


def find_run_dirs(path: str) -> list[str]:
    """Run directories at or below ``path``: those with event files of their own, sorted.

    Raises:
        RunNotFoundError: ``path`` does not exist or is not a directory.
        NoEventFilesError: no event file at any depth.
    """
    if not os.path.exists(path):
        raise RunNotFoundError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise RunNotFoundError(f"{path}: not a directory (give the run's log directory)")
    if event_files(path):
        return [path]
    found = []
    for root, dirs, _files in os.walk(path):
        dirs.sort()
        if event_files(root):
            found.append(root)
    if not found:
        raise NoEventFilesError(
            f"{path}: no TensorBoard event file (events.out.tfevents.*) here or below; "
            "is this the TensorBoardLogger's log directory?"
        )
    return found


def read_alerts_jsonl(path: str) -> tuple[list[AlertRecord], list[str]]:
    """Read a ``warmup_alerts.jsonl``; lines that do not parse are skipped and named."""
    alerts: list[AlertRecord] = []
    problems: list[str] = []
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except OSError as e:
        return [], [f"{name}: could not be read ({e.strerror or e})"]
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            details = data.get("details") or {}
            if not isinstance(details, dict):
                raise TypeError("`details` is not an object")
            alerts.append(
                AlertRecord(
                    step=int(data["step"]),
                    kind=str(data["kind"]),
                    message=str(data.get("message", "")),
                    value=_to_float(data.get("value")),
                    threshold=_to_float(data.get("threshold")),
                    details=details,
                )
            )
        except json.JSONDecodeError:
            what = "truncated or not JSON" if number == len(lines) else "not JSON"
            problems.append(f"{name} line {number}: {what}; skipped")
        except KeyError as e:
            problems.append(f"{name} line {number}: no {e.args[0]!r} field; skipped")
        except (TypeError, ValueError) as e:
            problems.append(f"{name} line {number}: {e}; skipped")
    return alerts, problems


_TEXT_ALERT = re.compile(
    r"\*\*(?P<kind>[\w-]+)\*\* at step (?P<step>-?\d+): (?P<message>.*?)\s*\n"
    r"value `(?P<value>[^`]*)`, threshold `(?P<threshold>[^`]*)`",
    re.S,
)


def _alerts_from_text(rows: list[tuple[int, str]]) -> list[AlertRecord]:
    alerts = []
    for _step, text in rows:
        for m in _TEXT_ALERT.finditer(text):
            try:
                value, threshold = float(m["value"]), float(m["threshold"])
            except ValueError:
                value = threshold = math.nan
            alerts.append(
                AlertRecord(int(m["step"]), m["kind"], m["message"].strip(), value, threshold)
            )
    return alerts


def load_run(path: str, name: str | None = None, prefix: str = "warmup/") -> RunData:
    """Load one run directory (one that holds event files).

    Args:
        path: The run directory.
        name: The name shown for it (default: ``path``).
        prefix: The monitor's ``log_key_prefix``.

    Raises:
        NoEventFilesError: ``path`` holds no event file.
        NoWarmupKeysError: none of the monitor's keys is in the event files.
    """
    name = name or path
    files = event_files(path)
    if not files:
        raise NoEventFilesError(f"{name}: no TensorBoard event file (events.out.tfevents.*)")
    events = read_event_files(files, prefix=prefix)
    series = {tag[len(prefix) :]: s for tag, s in events.scalars.items()}
    if not any(key in series for key in CORE_KEYS):
        raise NoWarmupKeysError(
            f"{name}: the event files hold none of the monitor's keys "
            f"({', '.join(prefix + k for k in CORE_KEYS)}); was WarmupMonitor in the Trainer's "
            "callbacks, with a TensorBoardLogger"
            + (f", and log_key_prefix={prefix!r}?" if prefix != "warmup/" else "?")
        )
    problems = list(events.problems)
    notes: list[str] = []
    jsonl = os.path.join(path, ALERTS_FILENAME)
    if os.path.isfile(jsonl):
        alerts, jsonl_problems = read_alerts_jsonl(jsonl)
        problems.extend(jsonl_problems)
        source = "jsonl"
    elif text := [
        row
        for tag in (f"{prefix}alerts", f"{prefix}alerts/text_summary")  # torch's add_text
        for row in events.texts.get(tag, [])
    ]:
        alerts = _alerts_from_text(text)
        source = "tensorboard"
        notes.append(
            f"no {ALERTS_FILENAME}: alerts were read from the TensorBoard text (without details)"
        )
    else:
        alerts, source = [], "none"
        counted = series.get("alerts")
        if counted is not None and len(counted) and float(counted.values.max()) > 0:
            problems.append(
                f"no {ALERTS_FILENAME} and no alert text, though {int(counted.values.max())} "
                "alerts were counted: the alert list below is incomplete"
            )
    return RunData(
        name=name,
        path=path,
        series=series,
        alerts=alerts,
        alerts_source=source,
        problems=problems,
        notes=notes,
        records=events.records,
    )
