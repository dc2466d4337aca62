"""TensorBoard plugin backend: the routes of the "Warmup" tab over the runs of the log directory.

* ``/index.js``: the tab (an ES module; every text from a run is set with ``textContent``).
* ``/uPlot.iife.min.js``, ``/uPlot.min.css``, ``/uPlot.LICENSE``: the charting library, shipped
  in ``static/`` with its licence (see ``static/README.md`` for why uPlot).
* ``/runs``: every run of the monitor under the log directory with its verdict, the rule behind
  it, and counts. A run is the monitor's when it can be reported, or when it has an alerts file
  or an event file naming the monitor's ``warmup_steps`` key (:func:`is_monitor_run`): such a
  run that cannot be read, for any reason, is a row with its own error, and never breaks the
  list. Other runs (a plain Lightning run without the monitor) are not listed, and ``/run``
  answers 404 for them.
* ``/run?run=NAME``: one run's summary, advice, episodes, alerts and curves, and its per-group
  statistics as a grid of group x step (``layers``, :func:`~warmup_monitor.report.heatmap.
  layer_grid`; ``null`` when the run logged none), drawn as heatmaps by the tab. A value or
  threshold that is not a number (an ``episode_end`` record has no threshold) is ``null``, shown
  as an em dash: the tab never shows "nan".

A run is a directory under ``--logdir`` that holds event files; its name is its path relative to
the log directory (``.`` for the log directory itself), as in TensorBoard's own run list. ``run``
is only ever looked up among the names found by walking the log directory (never joined to a
path); directory links are not followed, file links are not listed, and files are opened with
``O_NOFOLLOW``: no route reads a file outside the log directory, through any link. Each run's
metric prefix is found in its own tags, so a monitor logging under ``log_key_prefix="wm/"`` shows
as well as one under ``warmup/``.

This module imports neither the callback nor Lightning.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from warmup_monitor.report.analysis import RunSummary, summarize
from warmup_monitor.report.events import event_files, read_regular_file
from warmup_monitor.report.figure import SPIKE_FACTOR, downsample
from warmup_monitor.report.heatmap import layer_grid
from warmup_monitor.report.runs import ReportError, RunData, load_run
from warmup_monitor.schema import ALERTS_FILENAME, WARMUP_STEPS

__all__ = ["PLUGIN_NAME", "WarmupPlugin", "discover_runs", "is_monitor_run"]

log = logging.getLogger("warmup_monitor")

PLUGIN_NAME = "warmup_monitor"
#: Directories visited when looking for runs, at most.
MAX_DIRS = 20000
#: Points per curve sent to the browser (min/max envelope beyond that).
MAX_POINTS = 2000
#: Step columns of the per-group heatmaps sent to the browser.
MAX_LAYER_COLUMNS = 500
#: Bytes of each event file searched for the monitor's key when deciding whether the tab is
#: active (the keys are logged from the first step on, near the start of the file).
ACTIVE_SCAN_BYTES = 4 * 2**20
#: Seconds between two searches while no monitor run was found.
ACTIVE_RECHECK_S = 10.0
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_FILES = {
    "/index.js": ("index.js", "application/javascript"),
    "/uPlot.iife.min.js": ("uPlot.iife.min.js", "application/javascript"),
    "/uPlot.min.css": ("uPlot.min.css", "text/css"),
    "/uPlot.LICENSE": ("uPlot.LICENSE", "text/plain"),
}
_CURVES = ("lr", "loss", "grad_norm", "grad_cosine", "warmup_steps", "lr_factor")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def discover_runs(logdir: str) -> dict[str, str]:
    """Run name -> real path of every directory with event files under ``logdir``."""
    root = os.path.realpath(logdir)
    if not os.path.isdir(root):
        return {}
    runs: dict[str, str] = {}
    visited = 0
    for current, dirs, _files in os.walk(root, followlinks=False):
        visited += 1
        if visited > MAX_DIRS:
            break
        dirs.sort()
        real = os.path.realpath(current)
        if not _inside(real, root):
            continue
        if event_files(real):
            runs[os.path.relpath(current, root)] = real
    return runs


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)  # a link is not
    except OSError:
        return False


def is_monitor_run(path: str) -> bool:
    """Whether a run directory has an alerts file or an event file naming the monitor's
    ``warmup_steps`` key (whatever the prefix) in its first bytes; reads no link."""
    if _is_regular_file(os.path.join(path, ALERTS_FILENAME)):
        return True
    needle = WARMUP_STEPS.encode()
    for f in event_files(path):
        try:
            if needle in read_regular_file(f, ACTIVE_SCAN_BYTES):
                return True
        except OSError:
            continue
    return False


def _json_value(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _alert_json(alert: Any) -> dict[str, Any]:
    """An alert for the browser: a value or threshold that is not a number is ``null`` (the
    tab shows an em dash); infinities stay ``"inf"``/``"-inf"``."""
    out: dict[str, Any] = alert.to_dict()
    for key in ("value", "threshold"):
        if out[key] == "nan":
            out[key] = None
    return out


def _curve(steps: Any, values: Any) -> list[list[float | None]]:
    x, y = downsample(steps, values, MAX_POINTS)
    return [[int(a), _json_value(b)] for a, b in zip(x.tolist(), y.tolist(), strict=True)]


class WarmupPlugin(base_plugin.TBPlugin):
    """The "Warmup" tab. Args: context: TensorBoard's ``TBContext`` (its ``logdir`` is used)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        logdir: str = str(getattr(context, "logdir", None) or "")
        flags: Any = getattr(context, "flags", None)
        if flags is not None and str(getattr(flags, "logdir_spec", None) or ""):
            logdir = ""  # several named log directories: not supported
        self._logdir = logdir
        self._prefix: str | None = None  # found in each run's tags
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Any, RunData | None, RunSummary | None, str | None, bool]] = {}
        self._active = False
        self._checked_at = -math.inf

    # ------------------------------------------------------------------ TensorBoard API

    def get_plugin_apps(self) -> dict[str, Any]:
        apps: dict[str, Any] = {route: self._serve_static for route in _STATIC_FILES}
        apps["/runs"] = self._serve_runs
        apps["/run"] = self._serve_run
        return apps

    def is_active(self) -> bool:
        """Active when a run under the local log directory was written by the monitor: it has
        an alerts file, or an event file names its ``warmup_steps`` key. Once found, the answer
        is kept; until then the search runs at most every :data:`ACTIVE_RECHECK_S` seconds."""
        if self._active:
            return True
        if not self._logdir or "://" in self._logdir:
            return False
        now = time.monotonic()
        if now - self._checked_at < ACTIVE_RECHECK_S:
            return False
        self._checked_at = now
        try:
            self._active = any(is_monitor_run(p) for p in self._runs().values())
        except Exception:  # never break TensorBoard's plugin listing
            log.exception("warmup_monitor: could not look for runs")
        return self._active

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Warmup")

    # ------------------------------------------------------------------ data

    def _runs(self) -> dict[str, str]:
        if not self._logdir or "://" in self._logdir:
            return {}
        return discover_runs(self._logdir)

    def _load(
        self, name: str, path: str
    ) -> tuple[RunData | None, RunSummary | None, str | None, bool]:
        """The run, its summary, its error and whether it is the monitor's (see the module
        docstring), re-read only when its files changed. Never raises: any failure is this
        run's error."""
        try:
            files = [*event_files(path), os.path.join(path, ALERTS_FILENAME)]
            key = []
            for f in files:
                try:
                    st = os.lstat(f)
                except OSError:
                    continue
                key.append((f, st.st_size, st.st_mtime_ns))
            stamp = tuple(key)
        except Exception as e:  # pragma: no cover - lstat of listed files
            return None, None, f"could not list the run's files: {e}", is_monitor_run(path)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2], cached[3], cached[4]
        run: RunData | None = None
        summary: RunSummary | None = None
        error: str | None = None
        try:
            run = load_run(path, name=name, prefix=self._prefix)
            summary = summarize(run)
        except ReportError as e:
            error = str(e)
            run = None
        except Exception as e:  # one bad run must never break the others
            log.exception("warmup_monitor: could not report run %s", name)
            error = f"could not be reported ({type(e).__name__}: {e})"
            run, summary = None, None
        # Reported: the monitor's. Not: the monitor's only if its files say so.
        ours = error is None or is_monitor_run(path)
        with self._lock:
            self._cache[name] = (stamp, run, summary, error, ours)
        return run, summary, error, ours

    # ------------------------------------------------------------------ routes

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        route = request.path[request.path.rfind("/") :]
        filename, mimetype = _STATIC_FILES[route]
        with open(os.path.join(_STATIC, filename), encoding="utf-8") as f:
            contents = f.read()
        return http_util.Respond(request, contents, mimetype)

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        rows = []
        for name, path in sorted(self._runs().items()):
            _run, summary, error, ours = self._load(name, path)
            if not ours:  # a run without the monitor: not this tab's
                continue
            row: dict[str, Any] = {"run": name, "error": error}
            if summary is not None:
                row.update(
                    verdict=summary.verdict,
                    verdict_reason=summary.verdict_reason,
                    alerts={k: len(v) for k, v in summary.alerts_by_kind.items()},
                    episodes=sum(1 for e in summary.episodes if e.id is not None),
                    unstable_steps=len(summary.instability_steps),
                    planned_warmup=summary.planned_warmup,
                    effective_warmup=summary.effective_warmup,
                    extensions=len(summary.extensions),
                    last_step=summary.last_step,
                    peak_lr=_json_value(summary.peak_lr or math.nan),
                    problems=summary.problems,
                )
            rows.append(row)
        return http_util.Respond(request, {"runs": rows}, "application/json")

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_run(self, request: wrappers.Request) -> wrappers.Response:
        name = request.args.get("run")
        if not name:
            return http_util.Respond(request, {"error": "missing ?run="}, "application/json", 400)
        path = self._runs().get(name)  # only names found under the log directory
        if path is None:
            return http_util.Respond(request, {"error": "no such run"}, "application/json", 404)
        run, summary, error, ours = self._load(name, path)
        if not ours:
            err = {"run": name, "error": "not a run of the monitor"}
            return http_util.Respond(request, err, "application/json", 404)
        if run is None or summary is None:
            return http_util.Respond(
                request, {"run": name, "error": error}, "application/json", 422
            )
        try:
            payload = self._payload(name, run, summary)
        except Exception as e:  # pragma: no cover - a defect, shown as this run's error
            log.exception("warmup_monitor: could not serve run %s", name)
            err = {"run": name, "error": f"could not be served ({type(e).__name__}: {e})"}
            return http_util.Respond(request, err, "application/json", 500)
        return http_util.Respond(request, payload, "application/json")

    @staticmethod
    def _payload(name: str, run: RunData, summary: RunSummary) -> dict[str, Any]:
        curves = {}
        for key in _CURVES:
            s = run.series.get(key)
            if s is not None and len(s):
                curves[key] = _curve(s.steps, s.values)
        for key, s in run.extra.items():
            if len(s):
                curves[key] = _curve(s.steps, s.values)
        initial = summary.initial_loss
        grid = layer_grid(run.series, MAX_LAYER_COLUMNS)
        return {
            "run": name,
            "prefix": run.prefix,
            "summary": {
                k: None if v == "nan" else v  # not a number: null, never "nan"
                for k, v in summary.to_dict().items()
                if k != "path"
            },
            "alerts": [_alert_json(a) for a in run.alerts],
            "curves": curves,
            "spike_threshold": None if initial is None else SPIKE_FACTOR * initial,
            "layers": None if grid is None else grid.to_json(),
        }
