"""Show reports: a rich table for the terminal, JSON, a PNG of the curves, a self-contained HTML.

This module imports no Lightning and no torch; matplotlib is imported (with the Agg backend)
only when a picture is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from warmup_monitor.report.analysis import HEALTHY, INSTABILITY_KINDS, RECOVERED, RunSummary
from warmup_monitor.report.events import Series
from warmup_monitor.report.runs import RunData

__all__ = ["downsample", "render_html", "render_png", "summary_table", "to_json"]

_VERDICT_STYLE = {HEALTHY: "bold green", RECOVERED: "bold yellow"}
_VERDICT_COLOR = {HEALTHY: "#1a7f37", RECOVERED: "#9a6700"}
#: Points per curve in the picture: longer series are reduced to a min/max envelope.
MAX_POINTS = 4000


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


def _alerts_text(r: RunSummary) -> str:
    if not r.alerts_by_kind:
        return "none"
    return "\n".join(f"{k} x{len(v)} @ {_steps(v)}" for k, v in sorted(r.alerts_by_kind.items()))


def _cosine_text(r: RunSummary) -> str:
    if r.cosine_mean is None:
        return "-"
    neg = r.cosine_negative_fraction or 0.0
    aligned = "" if r.aligned_from is None else f"\naligned from {r.aligned_from}"
    return f"{r.cosine_mean:+.2f} ({neg:.0%} neg){aligned}"


def summary_table(summaries: Sequence[RunSummary]) -> Table:
    """One row per run."""
    table = Table(title="warmup report", show_lines=True)
    for name, justify in (
        ("run", "left"),
        ("verdict", "left"),
        ("warmup\nsteps", "right"),
        ("extended", "left"),
        ("alerts\nkind xN @ steps", "left"),
        ("initial\nloss", "right"),
        ("peak loss\nratio @step", "right"),
        ("peak grad\nnorm @step", "right"),
        ("cosine in\nwarmup", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in summaries:
        table.add_row(
            Text(r.name),
            Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "bold red")),
            Text(_warmup_text(r)),
            Text(_extensions_text(r)),
            Text(_alerts_text(r)),
            Text(_fmt(r.initial_loss, ".4g")),
            Text(f"{_fmt(r.peak_loss_ratio)} @{_fmt_step(r.peak_loss_ratio_step)}"),
            Text(f"{_fmt(r.peak_grad_norm)} @{_fmt_step(r.peak_grad_norm_step)}"),
            Text(_cosine_text(r)),
        )
    return table


def _fmt_step(step: int | None) -> str:
    return "-" if step is None else str(step)


def print_report(summaries: Sequence[RunSummary], console: Console) -> None:
    """The table, then each run's advice."""
    console.print(summary_table(summaries))
    for r in summaries:
        console.print(Text.assemble(("advice for ", "bold"), (r.name, "bold cyan")))
        for line in r.advice:
            console.print(Text("  - " + line))


def to_json(summaries: Sequence[RunSummary], errors: Sequence[str] = ()) -> dict[str, Any]:
    """The machine-readable report."""
    return {"runs": [r.to_dict() for r in summaries], "errors": list(errors)}


# ---------------------------------------------------------------------------------- picture


def downsample(
    steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points: the min and max of each bucket, so spikes stay."""
    n = steps.size
    if n <= max_points:
        return steps, values
    width = -(-n // (max_points // 2))  # points per bucket
    rows = -(-n // width)
    padded = np.full(rows * width, np.nan)
    padded[:n] = values
    grid = padded.reshape(rows, width)
    finite = np.isfinite(grid)
    lo = np.where(finite, grid, np.inf).argmin(axis=1)
    hi = np.where(finite, grid, -np.inf).argmax(axis=1)
    keep = finite.any(axis=1)
    base = np.arange(rows) * width
    idx = np.unique(np.concatenate([(base + lo)[keep], (base + hi)[keep]]))
    return steps[idx], values[idx]


_PANELS = (
    ("lr", "learning rate", "linear"),
    ("loss", "loss", "log"),
    ("grad_norm", "gradient norm", "log"),
    ("grad_cosine", "cosine of consecutive gradients", "linear"),
)


def render_png(runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> bytes:
    """lr, loss (log axis), gradient norm and cosine; alerts and warmup extensions marked.

    Several runs are overlaid, one colour each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(11, 10), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    legend: list[Any] = []
    for i, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        color = colors[i % len(colors)]
        legend.append(Line2D([], [], color=color, label=f"{run.name} ({summary.verdict})"))
        for ax, (key, _title, scale) in zip(axes, _PANELS, strict=True):
            s: Series | None = run.series.get(key)
            if s is None or not len(s):
                continue
            x, y = downsample(s.steps, s.values)
            if scale == "log":
                y = np.where(y > 0, y, np.nan)
            ax.plot(x, y, color=color, lw=1.0)
        _mark(axes, run, summary, color, len(runs) > 1)
    for ax, (_key, title, scale) in zip(axes, _PANELS, strict=True):
        ax.set_ylabel(title, fontsize=9)
        if scale == "log" and ax.has_data():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[3].axhline(0.0, color="black", lw=0.6)
    axes[-1].set_xlabel("optimizer step")
    several = len(runs) > 1  # markers then take their run's colour
    legend += [
        Line2D(
            [], [], color="black" if several else "red", ls="-", lw=1, label="instability alert"
        ),
        Line2D([], [], color="black" if several else "grey", ls=":", lw=1, label="other alert"),
        Line2D(
            [], [], color="black" if several else "purple", ls="--", lw=1.5, label="warmup extended"
        ),
        Line2D([], [], color="black", ls="-.", lw=1, label="end of warmup"),
    ]
    fig.legend(handles=legend, fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.suptitle("warmup report", x=0.01, ha="left", y=0.995, fontsize=11)
    # Fixed margins: tight_layout costs more than the whole drawing.
    fig.subplots_adjust(
        left=0.09,
        right=0.98,
        bottom=0.06,
        hspace=0.12,
        top=0.955 - 0.018 * ((len(legend) + 2) // 3),
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _mark(axes: Any, run: RunData, summary: RunSummary, color: str, several: bool) -> None:
    """Alerts as vertical lines on every panel, extensions and the end of warmup too."""
    seen: set[tuple[int, bool]] = set()
    for a in run.alerts:
        key = (a.step, a.kind in INSTABILITY_KINDS)
        if a.kind == "warmup_extended" or key in seen:
            continue
        seen.add(key)
        line_color = "red" if key[1] else "grey"
        for ax in axes:
            ax.axvline(
                a.step,
                color=color if several else line_color,
                lw=0.8,
                ls="-" if key[1] else ":",
                alpha=0.6,
            )
    for e in summary.extensions:
        for ax in axes:
            ax.axvline(e.step, color=color if several else "purple", ls="--", lw=1.5, alpha=0.8)
    for end in {summary.planned_warmup, summary.effective_warmup} - {None}:
        for ax in axes:
            ax.axvline(end, color=color if several else "black", ls="-.", lw=1.0, alpha=0.7)
    if summary.effective_warmup and not several:
        for ax in axes:
            ax.axvspan(0, summary.effective_warmup, color="grey", alpha=0.07, lw=0)


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
    summaries: Sequence[RunSummary], png: bytes | None, errors: Sequence[str] = ()
) -> str:
    """A self-contained page: the table, the advice, what was skipped, and the picture inline.

    Every text from the runs (names, alert kinds, messages, paths) is escaped.
    """
    e = html.escape
    rows = []
    for r in summaries:
        color = _VERDICT_COLOR.get(r.verdict, "#cf222e")
        cells = [
            e(r.name),
            f'<span class="verdict" style="color:{color}">{e(r.verdict)}</span>',
            e(_warmup_text(r)),
            e(_extensions_text(r)),
            f"<pre>{e(_alerts_text(r))}</pre>",
            e(_fmt(r.initial_loss, ".4g")),
            e(f"{_fmt(r.peak_loss_ratio)} ({_fmt_step(r.peak_loss_ratio_step)})"),
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
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead>",
        "<tbody>" + "".join(rows) + "</tbody></table>",
    ]
    for r in summaries:
        parts.append(f"<h2>advice for {e(r.name)}</h2><ul>")
        parts.extend(f"<li>{e(line)}</li>" for line in r.advice)
        parts.append("</ul>")
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
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
