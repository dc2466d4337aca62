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

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OPTIONS = (ROOT / "docs" / "options.md").read_text()
CONFIGS = (AdaptiveWarmup, CurvatureProbe, Detection, Statistics, Window)


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def test_every_monitor_argument_is_in_the_readme_table_and_only_those() -> None:
    table = _section(README, "| `WarmupMonitor` argument |", "\n\n")
    rows = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    params = set(inspect.signature(WarmupMonitor.__init__).parameters) - {"self"}
    assert rows == params
    loop_only = set(inspect.signature(LoopMonitor.__init__).parameters) - params - {"self"}
    assert loop_only == {"optimizers", "writer", "model"}
    assert "LoopMonitor(optimizers, *, writer=None, model=None, ...)" in README


def test_every_config_field_and_default_is_in_the_readme_and_options_page() -> None:
    for cls in CONFIGS:
        line = _section(README, f"- **`{cls.__name__}`**", ".\n")
        shown = dict(re.findall(r"`(\w+)=([^`]+)`", line))
        fields = {f.name: repr(f.default) for f in dataclasses.fields(cls)}
        assert shown == fields, cls.__name__
        page = (
            _section(OPTIONS, f"## `{cls.__name__}`", "\n\n#")
            if cls is not Window
            else (OPTIONS[OPTIONS.index("## `Window`") :])
        )
        rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", page, re.M))
        assert rows == fields, cls.__name__


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
    for figure in ("2.3023", "2.3036", "0.3918", "0.4262"):
        assert figure in README and figure in adaptive, figure
