"""The README and docs/options.md say what the code does: every option, default, key and kind,
and the figures they quote from the benchmark pages."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from warmup_monitor import (
    AdaptiveWarmup,
    CurvatureProbe,
    Detection,
    Statistics,
    WarmupMonitor,
    Window,
    schema,
)
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.report.guidance import VERDICTS, what_to_do

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OPTIONS = (ROOT / "docs" / "options.md").read_text()
CONFIGS = (AdaptiveWarmup, CurvatureProbe, Detection, Statistics, Window)


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def test_the_readme_lists_six_arguments_and_the_options_page_every_one() -> None:
    params = inspect.signature(WarmupMonitor.__init__).parameters
    table = _section(README, "| `WarmupMonitor` argument |", "\n\n")
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, re.M))
    assert len(rows) == 6 and set(rows) <= set(params)
    for name, default in rows.items():
        expected = params[name].default
        shown = default.strip()
        assert shown == ("required" if expected is inspect.Parameter.empty else f"`{expected!r}`")
    page = _section(OPTIONS, "| argument | default | meaning |", "\n\n")
    assert set(re.findall(r"^\| `(\w+)` \|", page, re.M)) == set(params) - {"self"}
    loop_only = set(inspect.signature(LoopMonitor.__init__).parameters) - set(params) - {"self"}
    assert loop_only == {"optimizers", "writer", "model"}
    assert "LoopMonitor(optimizers, *, writer=None, model=None, ...)" in README


def test_every_config_field_and_default_is_on_the_options_page() -> None:
    for cls in CONFIGS:
        fields = {f.name: repr(f.default) for f in dataclasses.fields(cls)}
        page = (
            _section(OPTIONS, f"## `{cls.__name__}`", "\n\n#")
            if cls is not Window
            else (OPTIONS[OPTIONS.index("## `Window`") :])
        )
        rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", page, re.M))
        assert rows == fields, cls.__name__


def test_the_verdict_paragraphs_are_the_reports_own() -> None:
    """The README's "What to do when the verdict is" section quotes
    ``warmup_monitor.report.guidance.what_to_do``, word for word, for every verdict."""
    section = " ".join(_section(README, "## What to do when the verdict is", "\n## ").split())
    for verdict in VERDICTS:
        assert " ".join(f"**{verdict}**: {what_to_do(verdict)}".split()) in section, verdict


def test_every_key_and_alert_kind_is_documented() -> None:
    keys = _section(README, "| key | value |", "\n\n")
    for name in schema.METRIC_NAMES:
        assert f"`warmup/{name}`" in keys, name
    kinds = _section(README, "| kind | raised when | instability |", "\n\n")
    documented = set(re.findall(r"`(\w+)`", kinds))
    assert {k.value for k in schema.AlertKind} <= documented
    assert documented - {k.value for k in schema.AlertKind} <= {"spike_factor"}


def test_figures_quoted_from_benchmark_pages_are_there() -> None:
    """A figure the README quotes from a benchmark page must still be on that page."""
    overhead = (ROOT / "benchmarks" / "README_overhead.md").read_text()
    perf = _section(README, "| code | logging | monitor host ms / step |", "\n\n")
    for row in perf.splitlines()[2:]:
        assert row in overhead, row
    report = (ROOT / "benchmarks" / "README_report.md").read_text()
    assert "3.3 s" in README and "3.3 s" in report
    adaptive = (ROOT / "benchmarks" / "README_adaptive.md").read_text()
    for figure in ("2.0476", "2.0483", "0.7789", "0.6981"):
        assert figure in README and figure in adaptive, figure
