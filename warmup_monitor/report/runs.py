"""Find runs on disk and load what the monitor left there: scalars and the alerts JSONL.

A run directory holds ``events.out.tfevents.*`` files (TensorBoardLogger writes them in
``<root>/<name>/version_N/``) and, next to them, ``warmup_alerts.jsonl``. A directory without
event files of its own is searched for run directories below it.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from warmup_monitor.report.events import (
    Series,
    event_files,
    read_event_files,
    read_regular_file,
    superseded_note,
)
from warmup_monitor.schema import (
    ALERTS_FILENAME,
    DEFAULT_PREFIX,
    GRAD_NORM,
    LOSS,
    LR,
    WARMUP_STEPS,
    Alert,
    AlertKind,
    parse_alerts,
)

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_NOT_FOUND",
    "EXIT_NO_EVENTS",
    "EXIT_NO_WARMUP_KEYS",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_SKIPPED",
    "EXIT_USAGE",
    "NoEventFilesError",
    "NoWarmupKeysError",
    "ReportError",
    "RunData",
    "RunNotFoundError",
    "UnreadableEventsError",
    "discover_prefix",
    "find_run_dirs",
    "load_run",
    "read_alerts_jsonl",
    "resumed_from",
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
CORE_KEYS = (LR, LOSS, GRAD_NORM)
#: An alert more than this many steps (or ten times the run's length) after the last logged
#: step is implausible, and skipped.
PLAUSIBLE_STEPS_AFTER = 100_000


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


class UnreadableEventsError(ReportError, ValueError):
    """No event file of the run could be read at all (empty, not a TFRecord file, damaged
    from its first byte). Its exit code is :data:`EXIT_NO_EVENTS`."""

    exit_code = EXIT_NO_EVENTS


@dataclass
class RunData:
    """What one run left on disk.

    Attributes:
        name: The name shown for the run (its path as given, or relative to the root searched).
        path: The run directory.
        series: Scalar key without the prefix (``"lr"``, ``"loss"``, ``"opt1/lr"``) -> series.
        alerts: The alerts, in file order (kinds this version does not know are strings).
        alerts_source: ``"jsonl"``, ``"tensorboard"`` (text summaries, when there is no JSONL) or
            ``"none"``.
        problems: One sentence per thing that could not be read (the CLI exits with
            :data:`EXIT_SKIPPED`).
        notes: Facts about how the run was read that are not a loss of data.
        records: Event records read.
        prefix: The metric key prefix the run was read with.
        extra: Scalars logged outside the prefix that the report shows (``val_loss``).
    """

    name: str
    path: str
    series: dict[str, Series]
    alerts: list[Alert]
    alerts_source: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    prefix: str = DEFAULT_PREFIX
    extra: dict[str, Series] = field(default_factory=dict)


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


def read_alerts_jsonl(path: str) -> tuple[list[Alert], list[str]]:
    """Read a ``warmup_alerts.jsonl`` (never through a symbolic link); bad lines are skipped and
    named (``"warmup_alerts.jsonl line N: why; skipped"``)."""
    name = os.path.basename(path)
    try:
        data = read_regular_file(path)
    except OSError as e:
        return [], [f"{name}: could not be read ({e.strerror or e}); skipped"]
    found = parse_alerts(data)
    return found.alerts, [f"{name} {p}" for p in found.problems]


def discover_prefix(tags: list[str]) -> str | None:
    """The monitor's key prefix among a run's scalar tags: the shortest ``P`` for which both
    ``P + "lr"`` and ``P + "warmup_steps"`` are tags (``None`` if there is none)."""
    names = set(tags)
    found = [
        t[: -len(LR)] for t in names if t.endswith(LR) and t[: -len(LR)] + WARMUP_STEPS in names
    ]
    if not found:
        return None
    return min(found, key=lambda p: (len(p), p))


#: Tags of a validation loss the report draws when the run logged one (outside the prefix):
#: ``val_loss``, ``val/loss``, ``valid_loss``, ``validation/loss``, ``val_loss_epoch``, and the
#: same under a group (``eval/val_loss``); the shortest such tag wins.
VAL_LOSS = re.compile(r"(^|/)(val|valid|validation)[_/]?loss(_epoch)?$")


_TEXT_ALERT = re.compile(
    r"\*\*(?P<kind>[\w-]+)\*\* at step (?P<step>-?\d+): (?P<message>.*?)\s*\n"
    r"value `(?P<value>[^`]*)`, threshold `(?P<threshold>[^`]*)`",
    re.S,
)


def _alerts_from_text(rows: list[tuple[int, str]]) -> list[Alert]:
    alerts = []
    for _step, text in rows:
        for m in _TEXT_ALERT.finditer(text):
            try:
                value, threshold = float(m["value"]), float(m["threshold"])
            except ValueError:
                value = threshold = math.nan
            step = int(m["step"])
            if not 0 <= step <= 2**53:
                continue
            kind: AlertKind | str
            try:
                kind = AlertKind(m["kind"])
            except ValueError:
                kind = m["kind"]
            alerts.append(Alert(step, kind, m["message"].strip(), value, threshold))
    return alerts


def load_run(
    path: str,
    name: str | None = None,
    prefix: str | None = None,
    *,
    _seen: tuple[str, ...] = (),
) -> RunData:
    """Load one run directory (one that holds event files).

    A run the monitor resumed from a checkpoint written in another log directory (Lightning
    writes a resumed fit to a new ``version_N``) says so in its alerts file; the run it
    continues is then read too, and the two are one run (:func:`resumed_from`).

    Args:
        path: The run directory.
        name: The name shown for it (default: ``path``).
        prefix: The monitor's ``log_key_prefix``; ``None`` finds it in the run's tags
            (:func:`discover_prefix`), falling back to ``"warmup/"``.

    Raises:
        NoEventFilesError: ``path`` holds no event file.
        UnreadableEventsError: no event file could be read at all.
        NoWarmupKeysError: none of the monitor's keys is in the event files.
    """
    name = name or path
    files = event_files(path)
    if not files:
        raise NoEventFilesError(f"{name}: no TensorBoard event file (events.out.tfevents.*)")
    events = read_event_files(files)
    if events.unreadable:
        raise UnreadableEventsError(
            f"{name}: no event file could be read: " + "; ".join(events.problems)
        )
    if prefix is None:
        prefix = discover_prefix(list(events.scalars)) or DEFAULT_PREFIX
    series = {tag[len(prefix) :]: s for tag, s in events.scalars.items() if tag.startswith(prefix)}
    if not any(key in series for key in CORE_KEYS):
        raise NoWarmupKeysError(
            f"{name}: the event files hold none of the monitor's keys "
            f"({', '.join(prefix + k for k in CORE_KEYS)}); was WarmupMonitor in the Trainer's "
            "callbacks, with a TensorBoardLogger"
            + (f", and log_key_prefix={prefix!r}?" if prefix != DEFAULT_PREFIX else "?")
            + (f" (also: {'; '.join(events.problems)})" if events.problems else "")
        )
    extra = {}
    val_tags = sorted(
        (t for t, v in events.scalars.items() if len(v) and not t.startswith(prefix)),
        key=lambda t: (len(t), t),
    )
    for tag in val_tags:
        if VAL_LOSS.search(tag):
            extra["val_loss"] = events.scalars[tag]
            break
    problems = list(events.problems)
    notes: list[str] = []
    if (note := superseded_note(events, prefix)) is not None:
        notes.append(note)
    jsonl = os.path.join(path, ALERTS_FILENAME)
    texts = {t: rows for t, rows in events.texts.items() if t.startswith(prefix)}
    alerts: list[Alert]
    if os.path.lexists(jsonl):
        alerts, jsonl_problems = read_alerts_jsonl(jsonl)
        problems.extend(jsonl_problems)
        source = "jsonl"
    elif text := [
        row
        for tag in (f"{prefix}alerts", f"{prefix}alerts/text_summary")  # torch's add_text
        for row in texts.get(tag, [])
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
    alerts = _plausible(alerts, series, problems)
    run = RunData(
        name=name,
        path=path,
        series=series,
        alerts=alerts,
        alerts_source=source,
        problems=problems,
        notes=notes,
        records=events.records,
        prefix=prefix,
        extra=extra,
    )
    return _with_earlier(run, _seen)


#: How many earlier runs a chain of resumes is followed back.
MAX_RESUMES = 16


def resumed_from(alerts: list[Alert]) -> tuple[str, int] | None:
    """The log directory a run was resumed from, and the step it was resumed at, from the
    monitor's ``monitor`` record (``details.resumed_from``), or ``None``."""
    for a in alerts:
        prev = a.details.get("resumed_from")
        if a.kind == AlertKind.MONITOR and isinstance(prev, str) and prev:
            return prev, a.step
    return None


def _with_earlier(run: RunData, seen: tuple[str, ...]) -> RunData:
    """A resumed run with the run it continues, when its log directory is still there: the
    earlier run's scalars and alerts before the resume step, then the resumed run's (followed
    back through a chain of resumes). The earlier run's ``episode_end`` of an episode the
    resumed run continued (it closed it when its fit ended) is dropped."""
    found = resumed_from(run.alerts)
    if found is None:
        return run
    prev, at = found
    here = os.path.realpath(run.path)
    there = os.path.realpath(prev)
    if there == here or there in seen or len(seen) >= MAX_RESUMES:
        return run
    if not os.path.isdir(prev):
        run.notes.append(f"resumed at step {at} from {prev}, which is not there: judged alone")
        return run
    try:
        earlier = load_run(prev, _seen=(*seen, here))
    except ReportError as err:
        run.problems.append(f"resumed at step {at} from {prev}, which could not be read: {err}")
        return run
    continued = {a.episode for a in run.alerts if a.episode is not None}
    alerts = [
        a
        for a in earlier.alerts
        if a.step < at and not (a.kind == AlertKind.EPISODE_END and a.episode in continued)
    ]
    series = dict(run.series)
    for key, old in earlier.series.items():
        keep = old.steps < at
        new = run.series.get(key)
        if new is None:
            series[key] = Series(old.steps[keep], old.values[keep])
        else:
            steps = np.concatenate([old.steps[keep], new.steps[new.steps >= at]])
            values = np.concatenate([old.values[keep], new.values[new.steps >= at]])
            series[key] = Series(steps, values)
    run.series = series
    run.alerts = alerts + run.alerts
    run.notes.append(f"continues {prev} (resumed at step {at}): the two are judged together")
    run.problems.extend(f"{prev}: {p}" for p in earlier.problems)
    return run


def _plausible(alerts: list[Alert], series: dict[str, Series], problems: list[str]) -> list[Alert]:
    """The alerts at a plausible step: not far beyond the last logged step."""
    last = max((int(s.steps[-1]) for s in series.values() if len(s)), default=None)
    if last is None or not alerts:
        return alerts
    limit = last + max(PLAUSIBLE_STEPS_AFTER, 10 * last)
    kept = [a for a in alerts if a.step <= limit]
    dropped = len(alerts) - len(kept)
    if dropped:
        problems.append(
            f"{ALERTS_FILENAME}: {dropped} alerts at steps beyond {limit} (the last logged step "
            f"is {last}); skipped as implausible"
        )
    return kept
