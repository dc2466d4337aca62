"""Read the scalars of a run the monitor logged through a logger other than TensorBoard.

The monitor logs its keys through every logger of the Trainer, so a run may hold them in:

* TensorBoard event files (:mod:`warmup_monitor.report.events`);
* a Lightning ``CSVLogger``'s ``metrics.csv`` (``<save_dir>/<name>/version_N/``): a header
  ``step,<key>,<key>,...`` and one row per ``log_metrics`` call, empty where a key was not
  logged in that call;
* an MLflow **file store** run (``MLFlowLogger(tracking_uri="file:./mlruns")``):
  ``mlruns/<experiment id>/<run id>/`` holds ``meta.yaml``, one file per key under ``metrics/``
  (a key ``warmup/lr`` is the file ``metrics/warmup/lr``), each line ``<timestamp> <value>
  <step>``, and the run's artifacts under ``artifacts/``, where the monitor's MLflow sink
  writes ``warmup_alerts.jsonl`` (:mod:`warmup_monitor.logger_text`);
* none at all: a directory with ``warmup_alerts.jsonl`` only.

Both formats are read as written, with the standard library (MLflow's file store format is in
maintenance mode and does not change; reading it needs no MLflow install). A point logged again
at an earlier step supersedes the later points, as for event files
(:mod:`warmup_monitor.report.events`): the last value written for a step wins.

This module imports no Lightning, no torch and no MLflow.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from warmup_monitor.report.events import Series, _timeline, event_files, read_regular_file
from warmup_monitor.schema import ALERTS_FILENAME, MAX_STEP

__all__ = [
    "CSV_FILENAME",
    "MLFLOW_ARTIFACTS",
    "ScalarData",
    "detect_source",
    "read_csv_metrics",
    "read_mlflow_metrics",
]

#: The file a Lightning ``CSVLogger`` writes its metrics to, in its ``log_dir``.
CSV_FILENAME = "metrics.csv"
#: The folder of an MLflow file-store run that holds its artifacts.
MLFLOW_ARTIFACTS = "artifacts"

#: Where a run's scalars are, by what is in its directory (the first that matches wins).
TENSORBOARD, CSV, MLFLOW, ALERTS_ONLY = "tensorboard", "csv", "mlflow", "alerts"


@dataclass
class ScalarData:
    """The scalars of one run read from ``metrics.csv`` or an MLflow run.

    Attributes:
        scalars: key -> :class:`~warmup_monitor.report.events.Series`, one value per step (keys
            in column order for ``metrics.csv``, in name order for MLflow).
        records: Points read.
        problems: One sentence per thing that could not be read.
    """

    scalars: dict[str, Series] = field(default_factory=dict)
    records: int = 0
    problems: list[str] = field(default_factory=list)


def _is_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def is_mlflow_run(path: str) -> bool:
    """Whether ``path`` is the directory of one MLflow file-store run (``meta.yaml`` and a
    ``metrics`` folder)."""
    metrics = os.path.join(path, "metrics")
    return (
        _is_file(os.path.join(path, "meta.yaml"))
        and os.path.isdir(metrics)
        and not os.path.islink(metrics)
    )


def detect_source(path: str) -> str | None:
    """Which kind of run ``path`` holds by itself: ``"tensorboard"`` (event files),
    ``"mlflow"`` (an MLflow file-store run), ``"csv"`` (a ``metrics.csv``), ``"alerts"`` (only
    a ``warmup_alerts.jsonl``), or ``None``. A directory with event files and a ``metrics.csv``
    (two loggers sharing it) is read from its event files."""
    if event_files(path):
        return TENSORBOARD
    if is_mlflow_run(path):
        return MLFLOW
    if _is_file(os.path.join(path, CSV_FILENAME)):
        return CSV
    if os.path.lexists(os.path.join(path, ALERTS_FILENAME)):
        return ALERTS_ONLY
    return None


def alerts_file_of(path: str, source: str | None) -> str:
    """Where the run's alerts JSONL is: in its directory, or, for an MLflow run, among its
    artifacts (the run's own copy, written by the MLflow sink)."""
    if source == MLFLOW:
        return os.path.join(path, MLFLOW_ARTIFACTS, ALERTS_FILENAME)
    return os.path.join(path, ALERTS_FILENAME)


def _series(points: list[tuple[int, float]]) -> Series:
    """Points in the order written -> one value per step (a later point supersedes earlier
    points at its step or after it, as in :func:`~warmup_monitor.report.events._timeline`)."""
    steps = np.asarray([p[0] for p in points], dtype=np.int64)
    values = np.asarray([p[1] for p in points], dtype=np.float64)
    keep = _timeline(steps)
    return Series(steps=steps[keep], values=values[keep])


def _step(text: str) -> int | None:
    """A step as written (``12`` or ``12.0``), or ``None`` when it is not one in
    ``[0, 2**53]``."""
    try:
        x = float(text)
    except ValueError:
        return None
    if not math.isfinite(x) or x != int(x) or not 0 <= x <= MAX_STEP:
        return None
    return int(x)


def read_csv_metrics(path: str) -> ScalarData:
    """Read a ``CSVLogger``'s ``metrics.csv`` (the file, or the directory holding it).

    Every column but ``step`` is a key; an empty cell is no point. A row whose step is not a
    whole number in ``[0, 2**53]``, or a cell that is not a number, is skipped and counted.
    """
    file = path if path.endswith(CSV_FILENAME) else os.path.join(path, CSV_FILENAME)
    out = ScalarData()
    try:
        text = read_regular_file(file).decode("utf-8", errors="replace")
    except OSError as e:
        out.problems.append(f"{CSV_FILENAME}: could not be read ({e.strerror or e}); skipped")
        return out
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header or "step" not in header:
        out.problems.append(f"{CSV_FILENAME}: no header with a 'step' column; skipped")
        return out
    at = header.index("step")
    columns = [(i, key) for i, key in enumerate(header) if i != at and key]
    points: dict[str, list[tuple[int, float]]] = {key: [] for _i, key in columns}
    bad_steps = bad_cells = 0
    for row in rows:
        if not row:
            continue
        step = _step(row[at]) if at < len(row) else None
        if step is None:
            bad_steps += 1
            continue
        for i, key in columns:
            cell = row[i] if i < len(row) else ""
            if not cell:
                continue
            try:
                points[key].append((step, float(cell)))
            except ValueError:
                bad_cells += 1
        out.records += 1
    if bad_steps:
        out.problems.append(f"{CSV_FILENAME}: {bad_steps} rows without a valid step; skipped")
    if bad_cells:
        out.problems.append(f"{CSV_FILENAME}: {bad_cells} cells that are not numbers; skipped")
    out.scalars = {key: _series(p) for key, p in points.items() if p}
    return out


def read_mlflow_metrics(path: str) -> ScalarData:
    """Read the metrics of one MLflow file-store run directory (``<exp id>/<run id>/``): each
    file under ``metrics/`` is a key (its path below ``metrics/``, with ``/``), each line
    ``<timestamp> <value> <step>``; a line that does not parse is skipped and counted."""
    out = ScalarData()
    root = os.path.join(path, "metrics")
    files: list[tuple[str, str]] = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(here, d)))
        for name in sorted(names):
            full = os.path.join(here, name)
            files.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    bad = 0
    for key, full in files:
        try:
            data = read_regular_file(full).decode("utf-8", errors="replace")
        except OSError as e:
            out.problems.append(f"metrics/{key}: could not be read ({e.strerror or e}); skipped")
            continue
        points: list[tuple[int, float]] = []
        for line in data.splitlines():
            parts = line.split()
            if not parts:
                continue
            step = _step(parts[2]) if len(parts) == 3 else None
            try:
                value = float(parts[1]) if step is not None else math.nan
            except ValueError:
                step = None
            if step is None:
                bad += 1
                continue
            points.append((step, value))
        out.records += len(points)
        if points:
            out.scalars[key] = _series(points)
    if bad:
        out.problems.append(f"metrics: {bad} lines that are not '<time> <value> <step>'; skipped")
    return out
