"""TensorBoard plugin backend: three routes over the runs of the log directory.

* ``/index.js``: the tab (plain JavaScript; every text from a run is set with ``textContent``).
* ``/runs``: every run under the log directory with its verdict and alert counts.
* ``/run?run=NAME``: one run's summary, advice, alerts, extensions and lr/loss/grad curves.

A run is a directory under ``--logdir`` that holds event files; its name is its path relative to
the log directory (``.`` for the log directory itself), as in TensorBoard's own run list. ``run``
is only ever looked up among the names found by walking the log directory (never joined to a
path), symlinks leading outside the log directory are skipped, and so no route reads outside it.

This module imports neither the callback nor Lightning.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from warmup_monitor.alerts import ALERTS_FILENAME
from warmup_monitor.report.analysis import RunSummary, summarize
from warmup_monitor.report.events import event_files
from warmup_monitor.report.figure import downsample
from warmup_monitor.report.runs import ReportError, RunData, load_run

__all__ = ["PLUGIN_NAME", "WarmupPlugin"]

PLUGIN_NAME = "warmup_monitor"
#: Directories visited when looking for runs, at most.
MAX_DIRS = 20000
#: Points per curve sent to the browser (min/max envelope beyond that).
MAX_POINTS = 2000
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_CURVES = ("lr", "loss", "grad_norm", "grad_cosine", "warmup_steps")


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


def _json_value(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


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
        self._cache: dict[str, tuple[Any, RunData | None, RunSummary | None, str | None]] = {}

    # ------------------------------------------------------------------ TensorBoard API

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._serve_js,
            "/runs": self._serve_runs,
            "/run": self._serve_run,
        }

    def is_active(self) -> bool:
        """Active when the log directory is local and holds a run with an alerts file or
        event files (cheap: no event file is read)."""
        if not self._logdir or "://" in self._logdir:
            return False
        return bool(discover_runs(self._logdir))

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Warmup")

    # ------------------------------------------------------------------ data

    def _runs(self) -> dict[str, str]:
        if not self._logdir or "://" in self._logdir:
            return {}
        return discover_runs(self._logdir)

    def _load(self, name: str, path: str) -> tuple[RunData | None, RunSummary | None, str | None]:
        """The run and its summary, re-read only when its files changed."""
        files = [*event_files(path), os.path.join(path, ALERTS_FILENAME)]
        key = []
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue
            key.append((f, st.st_size, st.st_mtime_ns))
        stamp = tuple(key)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2], cached[3]
        run: RunData | None = None
        summary: RunSummary | None = None
        error: str | None = None
        try:
            run = load_run(path, name=name, prefix=self._prefix)
            summary = summarize(run)
        except ReportError as e:
            error = str(e)
        with self._lock:
            self._cache[name] = (stamp, run, summary, error)
        return run, summary, error

    # ------------------------------------------------------------------ routes

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_js(self, request: wrappers.Request) -> wrappers.Response:
        with open(os.path.join(_STATIC, "index.js"), encoding="utf-8") as f:
            contents = f.read()
        return http_util.Respond(request, contents, "application/javascript")

    @wrappers.Request.application  # type: ignore[arg-type]
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        rows = []
        for name, path in sorted(self._runs().items()):
            _run, summary, error = self._load(name, path)
            row: dict[str, Any] = {"run": name, "error": error}
            if summary is not None:
                row.update(
                    verdict=summary.verdict,
                    alerts={k: len(v) for k, v in summary.alerts_by_kind.items()},
                    planned_warmup=summary.planned_warmup,
                    effective_warmup=summary.effective_warmup,
                    extensions=len(summary.extensions),
                    last_step=summary.last_step,
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
        run, summary, error = self._load(name, path)
        if run is None or summary is None:
            return http_util.Respond(
                request, {"run": name, "error": error}, "application/json", 422
            )
        curves = {}
        for key in _CURVES:
            s = run.series.get(key)
            if s is None or not len(s):
                continue
            x, y = downsample(s.steps, s.values, MAX_POINTS)
            curves[key] = [
                [int(a), _json_value(b)] for a, b in zip(x.tolist(), y.tolist(), strict=True)
            ]
        payload = {
            "run": name,
            "summary": {k: v for k, v in summary.to_dict().items() if k != "path"},
            "alerts": [a.to_dict() for a in run.alerts],
            "curves": curves,
        }
        return http_util.Respond(request, payload, "application/json")
