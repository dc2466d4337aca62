"""Show reports: a rich table for the terminal, JSON and a self-contained HTML page.

Every text that comes from a run (its directory name, alert kinds and messages, problems) has its
control characters removed before it reaches the terminal (:func:`clean_text`): an escape
sequence in a file cannot move the cursor, set the window title or clear the screen. The HTML
escapes it. The picture is drawn by :mod:`warmup_monitor.report.figure`.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from warmup_monitor.report.analysis import HEALTHY, RECOVERED, TOO_SHORT, RunSummary
from warmup_monitor.report.figure import downsample, render_png, verdict_color
from warmup_monitor.report.guidance import for_run
from warmup_monitor.report.names import run_names
from warmup_monitor.words import count, ratio, span

__all__ = [
    "TABLE_WIDTH",
    "clean_text",
    "downsample",
    "print_report",
    "render_html",
    "render_png",
    "summary_table",
    "to_json",
]

_VERDICT_STYLE = {HEALTHY: "bold green", RECOVERED: "bold yellow", TOO_SHORT: "bold"}


def verdict_style(verdict: str) -> str:
    """The rich style a verdict is printed in: green, yellow, plain bold, else red."""
    return _VERDICT_STYLE.get(verdict, "bold red")


# C0 controls but tab and newline, DEL, C1 controls (CSI is 0x9b), and the bidirectional
# overrides that can make a name read as another.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str, *, newlines: bool = False) -> str:
    """``text`` without control characters (ESC, CSI, BEL, ...), safe to print.

    Args:
        text: Any text from a run.
        newlines: Keep newlines (else they become spaces, as tabs always do).
    """
    text = _CONTROL.sub("", text)
    text = text.replace("\t", " ")
    return text if newlines else text.replace("\n", " ")


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _steps(steps: list[int], limit: int = 4) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" +{len(steps) - limit}" if len(steps) > limit else "")


def _warmup_text(r: RunSummary) -> str:
    if r.planned_warmup is None:
        return "-"
    if r.effective_warmup is not None and r.effective_warmup != r.planned_warmup:
        return f"{r.planned_warmup} -> {r.effective_warmup}"
    return str(r.planned_warmup)


def _extensions_text(r: RunSummary) -> str:
    if not r.extensions:
        return "-"
    return ", ".join(
        f"@{e.step}: {e.old if e.old is not None else '?'}->{e.new if e.new is not None else '?'}"
        for e in r.extensions
    )


def _alerts_text(r: RunSummary, limit: int = 4) -> str:
    """Episodes, then one line per alert kind: ``kind xN @ steps`` (``limit`` steps shown)."""
    if not r.alerts_by_kind:
        return "none"
    lines = []
    grouped = [e for e in r.episodes if e.id is not None]
    if grouped:
        lines.append(
            f"{count(len(grouped), 'episode')}: "
            + ", ".join(span(e.start, e.end, noun=False) for e in grouped[:limit])
            + (f" +{len(grouped) - limit}" if len(grouped) > limit else "")
        )
    lines += [f"{k} x{len(v)} @ {_steps(v, limit)}" for k, v in sorted(r.alerts_by_kind.items())]
    return "\n".join(lines)


def _cosine_text(r: RunSummary) -> str:
    if r.cosine_mean is None:
        return "-"
    neg = r.cosine_negative_fraction or 0.0
    aligned = "" if r.aligned_from is None else f"\naligned from {r.aligned_from}"
    return f"mean {r.cosine_mean:+.2f}\n{neg:.0%} negative{aligned}"


#: The table's width unless ``wide``: it fits a 100-column terminal.
TABLE_WIDTH = 100


def summary_table(
    summaries: Sequence[RunSummary],
    *,
    wide: bool = False,
    names: Sequence[str] | None = None,
    show_run: bool = True,
) -> Table:
    """One row per run. By default the columns fit :data:`TABLE_WIDTH` (2 alert steps per
    kind); ``wide`` adds the extensions' steps, the initial loss and the peak gradient norm,
    and lists 4 steps per kind. ``names``: the runs' names as shown (default: their names);
    ``show_run=False`` leaves the run column out (a single run, named above the table)."""
    shown = [r.name for r in summaries] if names is None else list(names)
    table = Table(
        title="warmup report", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
        collapse_padding=True,
    )  # fmt: skip
    # (header, justify, min width, max width): the alerts get the room, the verdict wraps.
    columns: list[tuple[str, str, int | None, int | None]] = []
    if show_run:
        columns.append(("run", "left", None, None if wide else 24))
    columns += [("verdict", "left", 9, None if wide else 12), ("warmup\nsteps", "right", 8, None)]
    if wide:
        columns.append(("extended", "left", None, None))
    columns.append(("alerts\nkind xN @ steps", "left", None, None))
    if wide:
        columns.append(("initial\nloss", "right", None, None))
    columns.append(("peak loss\nx initial", "right", 9, None))
    if wide:
        columns.append(("peak grad\nnorm", "right", None, None))
    columns.append(("cosine in\nwarmup", "left", None, None))
    for head, justify, least, most in columns:
        table.add_column(
            head,
            justify=justify,  # type: ignore[arg-type]
            min_width=least,
            max_width=most,
            overflow="fold",
        )
    limit = 4 if wide else 2
    for r, name in zip(summaries, shown, strict=True):
        cells = [Text(clean_text(name))] if show_run else []
        cells += [
            Text(r.verdict, style=verdict_style(r.verdict)),
            Text(_warmup_text(r)),
        ]
        if wide:
            cells.append(Text(_extensions_text(r)))
        cells.append(Text(clean_text(_alerts_text(r, limit), newlines=True)))
        if wide:
            cells.append(Text(_fmt(r.initial_loss, ".4g")))
        cells.append(Text(f"{ratio(r.peak_loss_ratio)}x\n@{_fmt_step(r.peak_loss_ratio_step)}"))
        if wide:
            cells.append(Text(f"{_fmt(r.peak_grad_norm)}\n@{_fmt_step(r.peak_grad_norm_step)}"))
        cells.append(Text(_cosine_text(r)))
        table.add_row(*cells, end_section=True)
    return table


def _fmt_step(step: int | None) -> str:
    return "-" if step is None else str(step)


def print_report(summaries: Sequence[RunSummary], console: Console, *, wide: bool = False) -> None:
    """The table, then each run's verdict with its reason, and its advice (wrapped lines keep
    their indent). Runs are named by what differs in their paths
    (:func:`~warmup_monitor.report.names.run_names`); the shared part is said once."""
    names = run_names([r.name for r in summaries])
    single = len(summaries) == 1
    if single:
        console.print(Text(clean_text(f"run: {summaries[0].name}"), style="bold"))
    elif names.pattern:
        console.print(Text(clean_text(f"runs: {names.pattern}"), style="bold"))
    console.print(summary_table(summaries, wide=wide, names=names.short, show_run=not single))
    for r, name in zip(summaries, names.short, strict=True):
        if single:
            console.print(Text("advice", style="bold"))
        else:
            console.print(Text.assemble(("advice for ", "bold"), (clean_text(name), "bold cyan")))
        style = verdict_style(r.verdict)
        lines = Table.grid(padding=(0, 1), pad_edge=False)
        lines.add_column(width=3, justify="right", no_wrap=True)
        lines.add_column(overflow="fold")
        lines.add_row("", Text.assemble("verdict: ", (r.verdict, style), f" ({r.verdict_reason})"))
        for line in r.advice:
            lines.add_row("-", Text(clean_text(line)))
        console.print(lines)


def to_json(summaries: Sequence[RunSummary], errors: Sequence[str] = ()) -> dict[str, Any]:
    """The machine-readable report."""
    return {"runs": [r.to_dict() for r in summaries], "errors": list(errors)}


# ---------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1f2328}
table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f6f8fa}
.verdict{font-weight:bold}
pre{margin:0;font-family:inherit;white-space:pre-wrap}
.problems{color:#9a6700}
img{max-width:100%}
"""


def render_html(
    summaries: Sequence[RunSummary],
    png: bytes | None,
    errors: Sequence[str] = (),
    *,
    layers_png: bytes | None = None,
) -> str:
    """A self-contained page: the table, the advice, what was skipped, and the picture inline
    (and the per-group heatmaps, ``layers_png``, when the runs logged them).

    Every text from the runs (names, alert kinds, messages, paths) is escaped.
    """
    e = html.escape
    names = run_names([r.name for r in summaries])
    rows = []
    for r, short in zip(summaries, names.short, strict=True):
        color = verdict_color(r.verdict)
        cells = [
            f'<span title="{e(r.name)}">{e(short)}</span>',
            f'<span class="verdict" style="color:{color}">{e(r.verdict)}</span>',
            e(_warmup_text(r)),
            e(_extensions_text(r)),
            f"<pre>{e(_alerts_text(r))}</pre>",
            e(_fmt(r.initial_loss, ".4g")),
            e(f"{ratio(r.peak_loss_ratio)} ({_fmt_step(r.peak_loss_ratio_step)})"),
            e(f"{_fmt(r.peak_grad_norm)} ({_fmt_step(r.peak_grad_norm_step)})"),
            f"<pre>{e(_cosine_text(r))}</pre>",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = (
        "run",
        "verdict",
        "warmup planned &rarr; effective",
        "extensions",
        "alerts",
        "initial loss",
        "peak loss ratio (step)",
        "peak grad norm (step)",
        "cosine in warmup: mean (negative)",
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>warmup report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>warmup report</h1>",
        f"<p>runs: {e(names.pattern)}</p>" if names.pattern else "",
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead>",
        "<tbody>" + "".join(rows) + "</tbody></table>",
    ]
    for r, short in zip(summaries, names.short, strict=True):
        color = verdict_color(r.verdict)
        parts.append(
            f"<h2>advice for {e(short)}</h2><p>verdict: "
            f'<span class="verdict" style="color:{color}">{e(r.verdict)}</span> '
            f"({e(r.verdict_reason)})</p><ul>"
        )
        parts.extend(f"<li>{e(line)}</li>" for line in r.advice)
        parts.append(f"</ul><p><b>What to do:</b> {e(for_run(r))}</p>")
        if r.problems:
            parts.append('<ul class="problems">')
            parts.extend(f"<li>skipped: {e(p)}</li>" for p in r.problems)
            parts.append("</ul>")
    if errors:
        parts.append('<h2>runs not reported</h2><ul class="problems">')
        parts.extend(f"<li>{e(x)}</li>" for x in errors)
        parts.append("</ul>")
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<h2>curves</h2><img alt="lr, loss, gradient norm and cosine" '
            f'src="data:image/png;base64,{data}">'
        )
    if layers_png is not None:
        data = base64.b64encode(layers_png).decode("ascii")
        parts.append(
            f'<h2>inside the model</h2><img alt="gradient share and update ratio per group '
            f'and step" src="data:image/png;base64,{data}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
