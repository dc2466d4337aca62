"""Offline diagnostics of a run: read its event files and alerts, judge warmup, advise.

``warmup-monitor report RUN_DIR`` is the command line over this package. Layers: ``events``
(event files) and ``runs`` (run directories, alerts JSONL) read; ``analysis`` is pure functions
(summary, verdict, advice); ``render`` shows (table, JSON, PNG, HTML).

This package imports neither the callback nor Lightning.
"""

from warmup_monitor.report.analysis import (
    HEALTHY,
    RECOVERED,
    UNSTABLE,
    Extension,
    RunSummary,
    advise,
    summarize,
)
from warmup_monitor.report.runs import (
    AlertRecord,
    NoEventFilesError,
    NoWarmupKeysError,
    ReportError,
    RunData,
    RunNotFoundError,
    find_run_dirs,
    load_run,
)

__all__ = [
    "HEALTHY",
    "RECOVERED",
    "UNSTABLE",
    "AlertRecord",
    "Extension",
    "NoEventFilesError",
    "NoWarmupKeysError",
    "ReportError",
    "RunData",
    "RunNotFoundError",
    "RunSummary",
    "advise",
    "find_run_dirs",
    "load_run",
    "summarize",
]
