"""Offline diagnostics of a run: read its event files and alerts, judge warmup, advise.

``warmup-monitor report RUN_DIR`` is the command line over this package. Layers: ``events``
(event files) and ``runs`` (run directories, alerts JSONL through :mod:`warmup_monitor.schema`)
read; ``episodes``, ``analysis`` (summary, verdict with its reason) and ``wording`` (advice) are
pure functions; ``render`` (table, JSON, HTML) and ``figure`` (PNG) show.

This package imports neither the callback nor Lightning.
"""

from warmup_monitor.report.analysis import (
    HEALTHY,
    RECOVERED,
    TOO_SHORT,
    UNSTABLE,
    Extension,
    RunSummary,
    summarize,
)
from warmup_monitor.report.episodes import Episode, group_episodes
from warmup_monitor.report.runs import (
    NoEventFilesError,
    NoWarmupKeysError,
    ReportError,
    RunData,
    RunNotFoundError,
    UnreadableEventsError,
    find_run_dirs,
    load_run,
)

__all__ = [
    "HEALTHY",
    "RECOVERED",
    "TOO_SHORT",
    "UNSTABLE",
    "Episode",
    "Extension",
    "NoEventFilesError",
    "NoWarmupKeysError",
    "ReportError",
    "RunData",
    "RunNotFoundError",
    "RunSummary",
    "UnreadableEventsError",
    "find_run_dirs",
    "group_episodes",
    "load_run",
    "summarize",
]
