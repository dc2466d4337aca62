"""Find runs on disk and load what the monitor left there: scalars and the alerts JSONL.

A run directory holds ``events.out.tfevents.*`` files (TensorBoardLogger writes them in
``<root>/<name>/version_N/``) and, next to them, ``warmup_alerts.jsonl``; or a ``CSVLogger``'s
``metrics.csv`` and the JSONL; or it is an MLflow file-store run; or it holds the JSONL alone
(:mod:`warmup_monitor.report.sources` reads the scalars of the other loggers). A directory
without a run of its own is searched for run directories below it.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from warmup_monitor.report.events import (
    EventData,
    Series,
    event_files,
    read_event_files,
    read_regular_file,
    superseded_note,
)
from warmup_monitor.report.sources import (
    ALERTS_ONLY,
    CSV,
    CSV_FILENAME,
    MLFLOW,
    TENSORBOARD,
    alerts_file_of,
    detect_source,
    read_csv_metrics,
    read_mlflow_metrics,
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
        source: Where the scalars were read: ``"tensorboard"``, ``"csv"`` (a ``CSVLogger``'s
            ``metrics.csv``), ``"mlflow"`` (an MLflow file-store run) or ``"alerts"`` (none:
            the alerts JSONL alone).
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
    source: str = TENSORBOARD


def find_run_dirs(path: str) -> list[str]:
    """Run directories at or below ``path``, sorted: those holding the monitor's scalars by
    themselves (event files, a ``CSVLogger``'s ``metrics.csv``, an MLflow file-store run;
    :func:`~warmup_monitor.report.sources.detect_source`); where none is found, those holding a
    ``warmup_alerts.jsonl`` alone.

    Raises:
        RunNotFoundError: ``path`` does not exist or is not a directory.
        NoEventFilesError: no run at any depth.
    """
    if not os.path.exists(path):
        raise RunNotFoundError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise RunNotFoundError(f"{path}: not a directory (give the run's log directory)")
    here = detect_source(path)
    if here is not None and here != ALERTS_ONLY:
        return [path]
    found: list[str] = []
    alerts_only: list[str] = [path] if here == ALERTS_ONLY else []
    for root, dirs, _files in os.walk(path):
        dirs.sort()
        source = detect_source(root)
        if source == MLFLOW:
            dirs.clear()  # metrics/ and artifacts/ of one run hold no other run
        if source == ALERTS_ONLY and root != path:
            alerts_only.append(root)
        elif source is not None and source != ALERTS_ONLY:
            found.append(root)
    if found:
        return found
    if alerts_only:
        return alerts_only
    raise NoEventFilesError(
        f"{path}: no run of the monitor here or below: no TensorBoard event file "
        f"(events.out.tfevents.*), no CSVLogger {CSV_FILENAME}, no MLflow run, no "
        f"{ALERTS_FILENAME}; is this the logger's log directory?"
    )


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
    alerts_file: str | None = None,
    _seen: tuple[str, ...] = (),
) -> RunData:
    """Load one run: the monitor's scalars and alerts, from whatever logger wrote them.

    The source is found from what the directory holds
    (:func:`~warmup_monitor.report.sources.detect_source`): TensorBoard event files, a
    ``CSVLogger``'s ``metrics.csv``, an MLflow file-store run (``mlruns/<exp>/<run>``), or only
    a ``warmup_alerts.jsonl``: then the verdict rests on the alerts alone, and a note says so
    (:attr:`RunData.source` is ``"alerts"``). A directory holding exactly one run below it
    (a logger's ``<name>/`` holding one ``version_N/``) is read as that run.

    A run the monitor resumed from a checkpoint written in another log directory (Lightning
    writes a resumed fit to a new ``version_N``) says so in its alerts file; the run it
    continues is then read too, and the two are one run (:func:`resumed_from`).

    Args:
        path: The run directory.
        name: The name shown for it (default: ``path``).
        prefix: The monitor's ``log_key_prefix``; ``None`` finds it in the run's tags
            (:func:`discover_prefix`), falling back to ``"warmup/"``.
        alerts_file: The monitor's alerts JSONL when it is not the run directory's own (an
            absolute ``alerts_file``, a ``LoopMonitor``'s file elsewhere); a note says so.

    Raises:
        NoEventFilesError: ``path`` holds no run of the monitor.
        UnreadableEventsError: no event file could be read at all.
        NoWarmupKeysError: none of the monitor's keys is in the run's scalars.
    """
    name = name or path
    source = detect_source(path)
    if source is None and os.path.isdir(path):
        below = _runs_below(path)
        if len(below) == 1:
            return load_run(below[0], name=name, prefix=prefix, alerts_file=alerts_file,
                            _seen=_seen)  # fmt: skip
    if source is None:
        raise NoEventFilesError(
            f"{name}: no run of the monitor: no TensorBoard event file (events.out.tfevents.*), "
            f"no CSVLogger {CSV_FILENAME}, no MLflow run, no {ALERTS_FILENAME}"
        )
    scalars, texts, records, problems, events = _read_scalars(path, name, source)
    if prefix is None:
        prefix = discover_prefix(list(scalars)) or DEFAULT_PREFIX
    notes = [ALERTS_ONLY_NOTE] if source == ALERTS_ONLY else []
    if events is not None and (note := superseded_note(events, prefix)) is not None:
        notes.append(note)
    series = {tag[len(prefix) :]: s for tag, s in scalars.items() if tag.startswith(prefix)}
    if source != ALERTS_ONLY and not any(key in series for key in CORE_KEYS):
        logger = {TENSORBOARD: "TensorBoardLogger", CSV: "CSVLogger", MLFLOW: "MLFlowLogger"}
        raise NoWarmupKeysError(
            f"{name}: {_WHAT[source]} none of the monitor's keys "
            f"({', '.join(prefix + k for k in CORE_KEYS)}); was WarmupMonitor in the Trainer's "
            f"callbacks, with the {logger[source]}"
            + (f", and log_key_prefix={prefix!r}?" if prefix != DEFAULT_PREFIX else "?")
            + (f" (also: {'; '.join(problems)})" if problems else "")
        )
    extra = {}
    val_tags = sorted(
        (t for t, v in scalars.items() if len(v) and not t.startswith(prefix)),
        key=lambda t: (len(t), t),
    )
    for tag in val_tags:
        if VAL_LOSS.search(tag):
            extra["val_loss"] = scalars[tag]
            break
    jsonl = alerts_file or alerts_file_of(path, source)
    if alerts_file is not None:
        notes.append(f"alerts read from {alerts_file}")
    texts = {t: rows for t, rows in texts.items() if t.startswith(prefix)}
    alerts: list[Alert]
    if os.path.lexists(jsonl):
        alerts, jsonl_problems = read_alerts_jsonl(jsonl)
        problems.extend(jsonl_problems)
        alerts_source = "jsonl"
    elif text := [
        row
        for tag in (f"{prefix}alerts", f"{prefix}alerts/text_summary")  # torch's add_text
        for row in texts.get(tag, [])
    ]:
        alerts = _alerts_from_text(text)
        alerts_source = "tensorboard"
        notes.append(
            f"no {ALERTS_FILENAME}: alerts were read from the TensorBoard text (without details)"
        )
    else:
        alerts, alerts_source = [], "none"
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
        alerts_source=alerts_source,
        problems=problems,
        notes=notes,
        records=records,
        prefix=prefix,
        extra=extra,
        source=source,
    )
    return _with_earlier(run, _seen)


#: What holds the scalars, by source, for the messages.
_WHAT = {
    TENSORBOARD: "the event files hold",
    CSV: f"{CSV_FILENAME} holds",
    MLFLOW: "the MLflow run's metrics hold",
}


def _runs_below(path: str) -> list[str]:
    """The runs below ``path`` (:func:`find_run_dirs`), none when there is none."""
    try:
        return [p for p in find_run_dirs(path) if p != path]
    except ReportError:
        return []


def _read_scalars(
    path: str, name: str, source: str
) -> tuple[dict[str, Series], dict[str, list[tuple[int, str]]], int, list[str], EventData | None]:
    """``(scalars by tag, texts by tag, records read, problems, the event data)`` of the run
    at ``path``, from its ``source`` (the event data only for event files)."""
    if source == TENSORBOARD:
        events = read_event_files(event_files(path))
        if events.unreadable:
            raise UnreadableEventsError(
                f"{name}: no event file could be read: " + "; ".join(events.problems)
            )
        return events.scalars, events.texts, events.records, list(events.problems), events
    if source == ALERTS_ONLY:
        return {}, {}, 0, [], None
    data = read_csv_metrics(path) if source == CSV else read_mlflow_metrics(path)
    return data.scalars, {}, data.records, list(data.problems), None


#: The note on a run read from its alerts file alone.
ALERTS_ONLY_NOTE = (
    f"read from {ALERTS_FILENAME} alone (no TensorBoard event file, metrics.csv or MLflow "
    "metrics here): the verdict rests on the alerts only, without the logged loss"
)


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
