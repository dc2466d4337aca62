"""``report.png``: the curves of one or more runs, with what the monitor found drawn on them.

Every panel spans the steps the runs logged, from the first to the last: a warmup extended past
the end of the run is written at the right edge of its band, never stretches the axis.

Up to :data:`MAX_OVERLAY` runs are overlaid, one colour each: the lr (a log axis when the runs'
peaks differ by 10x or more) and, beside it, the loss zoomed on warmup and the grace window
after it; then one band per run with what the monitor found (unstable episodes as bars,
instability alerts as filled dots, ``transient`` alerts hollow, warmup extensions, lr back-offs
and rollbacks as distinct markers side by side, the end of warmup dotted); then the loss (log
axis; the 10x-initial-loss threshold dashed; the validation loss when logged), the gradient
norm and the cosine of consecutive gradients. A single run also has its marks on its curves
(shaded episodes, dots on the loss at each instability alert, actions on the lr). Runs are
named by what differs in their paths (:func:`~warmup_monitor.report.names.run_names`); the
title says the shared part once. A caption gives each run's verdict and key numbers. More runs
are drawn as small multiples (one loss panel per run, titled with its verdict).

Every mark is one vectorized call per run (no per-alert artist): 50 runs draw in about a second.
matplotlib is imported (with the Agg backend) only when a picture is drawn.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from warmup_monitor.report.analysis import HEALTHY, RECOVERED, TOO_SHORT, RunSummary
from warmup_monitor.report.events import Series
from warmup_monitor.report.names import run_names
from warmup_monitor.report.runs import RunData
from warmup_monitor.schema import AlertKind, is_instability
from warmup_monitor.words import count, peak_loss, ratio

__all__ = ["MAX_OVERLAY", "MAX_POINTS", "downsample", "logged_range", "render_figure", "render_png"]

#: Points per curve in the picture: longer series are reduced to a min/max envelope.
MAX_POINTS = 4000
#: Runs overlaid in one set of panels; more are drawn as small multiples.
MAX_OVERLAY = 6
#: The loss threshold of the ``loss_spike`` rule, in multiples of the initial loss.
SPIKE_FACTOR = 10.0
#: The zoomed panel shows warmup and this fraction of it again (at least 20 steps).
GRACE_FRACTION = 0.5

_VERDICT_COLOR = {HEALTHY: "#1a7f37", RECOVERED: "#9a6700", TOO_SHORT: "#57606a"}
_UNSTABLE_COLOR = "#cf222e"
_PLANNED_COLOR = "#8c959f"  # the planned end of a warmup that was extended
# Distinct marks for the controller's actions: (marker, label).
_ACTIONS = {
    AlertKind.WARMUP_EXTENDED.value: (">", "warmup extended"),
    AlertKind.LR_BACKOFF.value: ("v", "lr back-off"),
    AlertKind.ROLLBACK.value: ("X", "rollback"),
    AlertKind.WARMUP_EXHAUSTED.value: ("s", "warmup exhausted"),
}


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


def _at(s: Series | None, steps: np.ndarray) -> np.ndarray:
    """The series' value at the last logged step <= each of ``steps`` (NaN before it)."""
    if s is None or not len(s) or steps.size == 0:
        return np.full(steps.size, np.nan)
    i = np.searchsorted(s.steps, steps, side="right") - 1
    out = s.values[np.clip(i, 0, None)].astype(float)
    out[i < 0] = np.nan
    return out


def _spans(summary: RunSummary) -> list[tuple[int, int]]:
    """The unstable episodes' step spans, ``[start, end + 1)``, overlapping or touching ones
    merged (an episode the verdict excused as transient shows as its hollow dot only)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((e.start, e.end + 1) for e in summary.episodes if not e.transient):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _shade(ax: Any, spans: list[tuple[int, int]], color: Any, alpha: float) -> None:
    """Full-height shaded spans, as one collection (one artist, however many spans)."""
    if not spans:
        return
    from matplotlib.collections import PolyCollection

    verts = [[(a, 0.0), (a, 1.0), (b, 1.0), (b, 0.0)] for a, b in spans]
    shade = PolyCollection(
        verts, transform=ax.get_xaxis_transform(), facecolors=color, alpha=alpha, linewidths=0
    )
    ax.add_collection(shade, autolim=False)


def _positive(y: np.ndarray) -> np.ndarray:
    return np.where(y > 0, y, np.nan)


def verdict_color(verdict: str) -> str:
    """The colour a verdict is shown in (pictures, HTML): green, amber, grey, else red."""
    return _VERDICT_COLOR.get(verdict, _UNSTABLE_COLOR)


def _g(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def caption(summary: RunSummary, name: str | None = None) -> str:
    """One line on a run: verdict and key numbers (``name``: the run's short name; ``""``:
    none, the title names the run)."""
    label = summary.name if name is None else name
    parts = [f"{label or 'verdict'}: {summary.verdict}"]
    w, e = summary.planned_warmup, summary.effective_warmup
    if w is not None:
        parts.append(f"warmup {w}" + (f"→{e}" if e is not None and e != w else ""))
    with_ids = [e for e in summary.episodes if e.id is not None]
    if with_ids or not summary.episodes:
        held = [e for e in with_ids if not e.transient]
        parts.append(count(len(held), "unstable episode"))
        if len(with_ids) > len(held):  # excused by the verdict: said, not counted
            parts.append(f"{count(len(with_ids) - len(held), 'episode')} recovered at once")
    else:  # a file written before episodes: one group per alert
        parts.append(count(len(summary.instability_steps), "unstable step"))
    if summary.peak_loss_ratio is not None:
        parts.append(peak_loss(summary.peak_loss_ratio, summary.peak_loss_ratio_step))
    if summary.final_loss_ratio is not None:
        parts.append(f"final loss {ratio(summary.final_loss_ratio)}x")
    if summary.recommended_peak_lr is not None:
        parts.append(f"advice: peak lr ≈ {_g(summary.recommended_peak_lr)}")
    return ", ".join(parts)


def render_figure(runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> Any:
    """The picture of the runs as a matplotlib figure (see the module docstring); close it with
    ``matplotlib.pyplot.close(fig)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(runs) > MAX_OVERLAY:
        return _small_multiples(plt, runs, summaries)
    return _overlay(plt, runs, summaries)


def render_png(runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> bytes:
    """The picture of the runs, as PNG bytes (see the module docstring)."""
    import matplotlib.pyplot as plt

    fig = render_figure(runs, summaries)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- overlay


def logged_range(runs: Sequence[RunData]) -> tuple[int, int] | None:
    """The first and last step with a logged value in any of the runs (``None``: none)."""
    lo, hi = math.inf, -math.inf
    for run in runs:
        for s in (*run.series.values(), *run.extra.values()):
            if len(s):
                lo, hi = min(lo, int(s.steps[0])), max(hi, int(s.steps[-1]))
    return None if lo > hi else (int(lo), int(hi))


def _overlay(plt: Any, runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> Any:
    """Up to :data:`MAX_OVERLAY` runs: curves overlaid, one colour each; what the monitor
    found in a band per run (:func:`_strip`). A single run also has its marks on its curves."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(runs)
    names = run_names([r.name for r in runs])
    single = n == 1
    caption_h = 0.22 * (n + 1) + 0.2
    heights = [2.4, 0.34 * n + 0.3, 2.4, 2.1, 2.1]
    gap = 0.55
    total = caption_h + 0.45 + sum(heights) + gap * 4 + 0.55
    top = 1 - (0.45 + caption_h) / total
    fig = plt.figure(figsize=(12, total))
    grid = fig.add_gridspec(
        5, 2, height_ratios=heights, left=0.07, right=0.78, top=top, bottom=0.55 / total,
        hspace=gap / (sum(heights) / 5), wspace=0.22,
    )  # fmt: skip
    # In this order in fig.axes; every panel but the zoom shares the x axis of the lr.
    ax_lr = fig.add_subplot(grid[0, 0])
    ax_zoom = fig.add_subplot(grid[0, 1])
    ax_strip = fig.add_subplot(grid[1, :], sharex=ax_lr)
    ax_loss = fig.add_subplot(grid[2, :], sharex=ax_lr)
    ax_grad = fig.add_subplot(grid[3, :], sharex=ax_lr)
    ax_cos = fig.add_subplot(grid[4, :], sharex=ax_lr)
    ax_zoom_lr = ax_zoom.twinx()  # the lr during warmup, where the controller acts
    colors = plt.get_cmap("tab10").colors
    peaks = [s.peak_lr for s in summaries if s.peak_lr and s.peak_lr > 0]
    log_lr = bool(peaks) and max(peaks) >= 10 * min(peaks)
    span = logged_range(runs)
    zoom_end = 0
    legend_runs: list[Any] = []
    used: set[str] = set()
    levels: dict[float, Any] = {}
    for i, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        color = colors[i % len(colors)]
        legend_runs.append(Line2D([], [], color=color, lw=2, label=names.short[i]))
        s = run.series
        _curve(ax_lr, s.get("lr"), color, log_lr)
        _curve(ax_zoom_lr, s.get("lr"), color, log_lr, alpha=0.45)
        _curve(ax_loss, s.get("loss"), color, True)
        _curve(ax_grad, s.get("grad_norm"), color, True)
        _curve(ax_cos, s.get("grad_cosine"), color, False)
        val = run.extra.get("val_loss")
        if val is not None and len(val):
            ax_loss.plot(val.steps, _positive(val.values), color=color, ls="--", lw=1.2)
            ax_loss.plot(val.steps, _positive(val.values), color=color, ls="none", marker=".")
            used.add("val")
        eff = summary.effective_warmup or 0
        end = int(eff + max(20, GRACE_FRACTION * eff))
        zoom_end = max(zoom_end, end)
        loss = s.get("loss")
        if loss is not None and len(loss):
            keep = loss.steps <= end
            ax_zoom.plot(loss.steps[keep], _positive(loss.values[keep]), color=color, lw=1.0)
        if summary.initial_loss is not None and summary.initial_loss > 0:
            level = float(f"{SPIKE_FACTOR * summary.initial_loss:.4g}")
            levels[level] = color if level not in levels else "black"  # shared: once, black
            used.add("threshold")
        used |= _strip(ax_strip, i, run, summary, color, span)
        if single:  # one run: its marks on its curves too (they cannot pile up)
            used |= _marks(run, summary, color, ax_lr, (ax_loss, ax_zoom))
    for level, color in levels.items():
        for ax in (ax_loss, ax_zoom):
            ax.axhline(level, color=color, ls=(0, (6, 3)), lw=0.9, alpha=0.8)
    for ax, title in (
        (ax_lr, "learning rate" + (" (log)" if log_lr else "")),
        (ax_zoom, "warmup + grace window: loss (log, left), lr (faint, right)"),
        (ax_strip, "what the monitor found" + ("" if single else ", one band per run")),
        (ax_loss, "loss (log)"),
        (ax_grad, "gradient norm (log)"),
        (ax_cos, "cosine of consecutive gradients"),
    ):
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.tick_params(which="both", labelsize=8)
    for ax in (ax_loss, ax_grad, ax_zoom):
        if ax.has_data():
            _log_axis(ax)
    if log_lr and ax_lr.has_data():
        _log_axis(ax_lr)
        _log_axis(ax_zoom_lr)
    ax_zoom_lr.tick_params(labelsize=7)
    ax_strip.set_ylim(n - 0.5, -0.5)  # the first run on top
    ax_strip.set_yticks([] if single else range(n), [] if single else names.short, fontsize=8)
    for label, color in zip(ax_strip.get_yticklabels(), colors, strict=False):
        label.set_color(color)
    ax_strip.tick_params(axis="x", labelbottom=False)
    ax_strip.grid(False, axis="y")
    if span is not None:
        lo, hi = span
        ax_lr.set_xlim(lo, max(hi, lo + 1))  # shared by every panel but the zoom
        if zoom_end:
            ax_zoom.set_xlim(lo, max(min(zoom_end, hi), lo + 1))
    ax_cos.axhline(0.0, color="black", lw=0.6)
    ax_cos.set_xlabel("optimizer step", fontsize=9)
    marks = _legend_marks(Line2D, Patch, used)
    if not single:  # a single run is named in the title
        fig.legend(
            handles=legend_runs,
            loc="upper left",
            bbox_to_anchor=(0.815, top),
            fontsize=8,
            title="runs",
            title_fontsize=8,
            frameon=False,
        )
    fig.legend(
        handles=marks,
        loc="upper left",
        bbox_to_anchor=(0.815, top - (0 if single else 0.22 * (n + 2) / total)),
        fontsize=8,
        title="marks",
        title_fontsize=8,
        frameon=False,
    )
    title = "warmup report: " + (
        runs[0].name if single else f"{n} runs, {names.pattern or 'each as given'}"
    )
    fig.suptitle(title, x=0.01, ha="left", y=1 - 0.12 / total, fontsize=12, weight="bold")
    y = 1 - 0.45 / total
    for i, (name, summary) in enumerate(zip(names.short, summaries, strict=True)):
        y -= 0.22 / total
        if not single:  # the run's colour, as in its curves and its band
            fig.text(0.01, y, "■", fontsize=9, color=colors[i % len(colors)], va="top")
        fig.text(
            0.01 if single else 0.025,
            y,
            caption(summary, "" if single else name),
            fontsize=8.5,
            color=verdict_color(summary.verdict),
            va="top",
        )
    return fig


def _strip(
    ax: Any, row: int, run: RunData, summary: RunSummary, color: Any, span: tuple[int, int] | None
) -> set[str]:
    """Band ``row`` of the strip: the run's unstable episodes as bars, its instability alerts
    (filled dots) and ``transient`` alerts (hollow) on the lower line, the controller's actions
    side by side on the upper line, and the end of warmup (dotted; the planned end grey when
    it was extended). An end past the last logged step is written at the right edge."""
    from matplotlib.collections import PolyCollection
    from matplotlib.transforms import ScaledTranslation

    used: set[str] = set()
    spans = _spans(summary)
    if spans:
        lo_y, hi_y = row - 0.4, row + 0.4
        verts = [[(a, lo_y), (a, hi_y), (b, hi_y), (b, lo_y)] for a, b in spans]
        bars = PolyCollection(verts, facecolors=color, edgecolors=color, alpha=0.35, lw=0.8)
        ax.add_collection(bars, autolim=False)
        used.add("episode")
    for kinds, key, style in (
        (None, "alert", {"ms": 4, "mfc": color, "mec": "black", "mew": 0.5}),
        ({AlertKind.TRANSIENT}, "transient", {"ms": 5, "mfc": "none", "mec": color, "mew": 1.0}),
    ):
        steps = sorted(
            {
                a.step
                for a in run.alerts
                if (is_instability(a.kind) if kinds is None else a.kind in kinds)
            }
        )
        if steps:
            ax.plot(steps, [row + 0.17] * len(steps), ls="none", marker="o", **style)
            used.add(key)
    fig = ax.figure
    for k, (kind, (marker, _label)) in enumerate(_ACTIONS.items()):
        steps = sorted({a.step for a in run.alerts if a.kind_name == kind})
        if kind == AlertKind.WARMUP_EXTENDED.value and not steps:
            steps = sorted({e.step for e in summary.extensions})
        if not steps:
            continue
        # Actions taken at one step sit side by side, each kind at its own offset.
        shift = ScaledTranslation((k - 1) * 8 / 72, 0, fig.dpi_scale_trans)
        ax.plot(
            steps, [row - 0.17] * len(steps), ls="none", marker=marker, ms=6, mfc=color,
            mec="black", mew=0.6, transform=ax.transData + shift,
        )  # fmt: skip
        used.add(kind)
    last = span[1] if span is not None else None
    beyond = []
    for end, shade, key in _warmup_ends(summary, color):
        if last is not None and end > last:
            beyond.append(end)
            continue
        ax.vlines(end, row - 0.45, row + 0.45, colors=shade, linestyles=":", lw=1.6)
        used.add(key)
    if beyond:
        ax.text(
            0.995, row, f"warmup ends at step {max(beyond)} →", transform=ax.get_yaxis_transform(),
            ha="right", va="center", fontsize=7.5, color=color,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0},
        )  # fmt: skip
    return used


def _log_axis(ax: Any) -> None:
    """A log y axis labelled with plain numbers: decades only when it spans one or more, else
    the minor ticks too (a loss from 2.1 to 3.4 still gets labels)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    wide = lo > 0 and hi / lo >= 10
    ax.yaxis.set_minor_formatter(NullFormatter() if wide else plain)


def _curve(ax: Any, s: Series | None, color: Any, log: bool, alpha: float = 1.0) -> None:
    if s is None or not len(s):
        return
    x, y = downsample(s.steps, s.values)
    ax.plot(x, _positive(y) if log else y, color=color, lw=1.0, alpha=alpha)


def _marks(run: RunData, summary: RunSummary, color: Any, lr_ax: Any, loss_axes: Any) -> set[str]:
    """A single run's marks on its curves: shaded episodes and a dot at each instability
    alert on the loss panels, the end of warmup on those and the lr; the marks used. (The
    controller's actions are in the strip only: at one step, they would hide each other.)"""
    used: set[str] = set()
    loss = run.series.get("loss")
    spans = _spans(summary)
    if spans:
        used.add("episode")
    alert_steps = np.array(
        sorted({a.step for a in run.alerts if is_instability(a.kind)}), dtype=np.int64
    )
    transient = np.array(
        sorted({a.step for a in run.alerts if a.kind == AlertKind.TRANSIENT}), dtype=np.int64
    )
    for ax in loss_axes:
        _shade(ax, spans, color, 0.15)
        if alert_steps.size:
            ax.plot(
                alert_steps,
                _positive(_at(loss, alert_steps)),
                ls="none",
                marker="o",
                ms=4,
                mfc=color,
                mec="black",
                mew=0.5,
            )
            used.add("alert")
        if transient.size:
            ax.plot(
                transient,
                _positive(_at(loss, transient)),
                ls="none",
                marker="o",
                ms=5,
                mfc="none",
                mec=color,
                mew=1.0,
            )
            used.add("transient")
    for end, shade, key in _warmup_ends(summary, color):
        for ax in (lr_ax, *loss_axes):
            ax.axvline(end, color=shade, ls=":", lw=1.0)
        used.add(key)
    return used


def _warmup_ends(summary: RunSummary, color: Any) -> list[tuple[int, Any, str]]:
    """(step, colour, legend key) of the end of warmup, in the run's colour, and of the planned
    end in grey when warmup was extended."""
    planned, eff = summary.planned_warmup, summary.effective_warmup
    ends = [(eff, color, "warmup_end")] if eff else []
    if planned and planned != eff:
        ends.append((planned, _PLANNED_COLOR, "warmup_planned"))
    return ends


def _legend_marks(line: Any, patch: Any, used: set[str]) -> list[Any]:
    k = "black"
    handles = []
    if "episode" in used:
        handles.append(patch(color="grey", alpha=0.3, label="unstable episode"))
    if "alert" in used:
        handles.append(
            line([], [], ls="none", marker="o", ms=5, mfc="grey", mec=k, label="instability alert")
        )
    if "transient" in used:
        handles.append(
            line([], [], ls="none", marker="o", ms=5, mfc="none", mec=k, label="transient (ok)")
        )
    for kind, (marker, label) in _ACTIONS.items():
        if kind in used:
            handles.append(
                line([], [], ls="none", marker=marker, ms=7, mfc="grey", mec=k, label=label)
            )
    if "warmup_end" in used:
        handles.append(line([], [], color=k, ls=":", label="end of warmup"))
    if "warmup_planned" in used:
        handles.append(line([], [], color=_PLANNED_COLOR, ls=":", label="planned end (extended)"))
    if "threshold" in used:
        handles.append(line([], [], color=k, ls=(0, (6, 3)), label="10x initial loss"))
    if "val" in used:
        handles.append(line([], [], color=k, ls="--", marker=".", label="validation loss"))
    return handles


# ---------------------------------------------------------------------------------- many runs


def _small_multiples(plt: Any, runs: Sequence[RunData], summaries: Sequence[RunSummary]) -> Any:
    """One small loss panel per run. Axes are kept cheap (a fixed handful of ticks, no minor
    ticks, titles as plain text): tick layout, not the curves, is what costs with 50 panels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    n = len(runs)
    names = run_names([r.name for r in runs])
    cols = 5 if n > 12 else 4
    rows = -(-n // cols)
    height = 2.1 * rows + 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
    counts: dict[str, int] = {}
    for ax, run, summary, name in zip(axes.flat, runs, summaries, names.short, strict=False):
        color = verdict_color(summary.verdict)
        span = logged_range([run])
        counts[summary.verdict] = counts.get(summary.verdict, 0) + 1
        loss = run.series.get("loss")
        lo, hi = math.inf, -math.inf
        if loss is not None and len(loss):
            x, y = downsample(loss.steps, loss.values, 600)
            ly = np.log10(_positive(y))
            ax.plot(x, ly, color="#0969da", lw=0.8)
            if np.isfinite(ly).any():
                lo, hi = float(np.nanmin(ly)), float(np.nanmax(ly))
        _shade(ax, _spans(summary), _UNSTABLE_COLOR, 0.2)
        steps = np.array(sorted({a.step for a in run.alerts if is_instability(a.kind)}), np.int64)
        if steps.size:
            ys = np.log10(_positive(_at(loss, steps)))
            ax.plot(steps, ys, ls="none", marker="o", ms=2.5, color=_UNSTABLE_COLOR)
        if summary.initial_loss and summary.initial_loss > 0:
            level = math.log10(SPIKE_FACTOR * summary.initial_loss)
            ax.axhline(level, color="black", ls="--", lw=0.7)
            lo, hi = min(lo, level), max(hi, level)
        eff = summary.effective_warmup
        if eff and (span is None or eff <= span[1]):
            ax.axvline(eff, color="black", ls=":", lw=0.8)
        elif eff:  # past the run's last step: said, not drawn
            ax.text(0.98, 0.95, f"warmup ends at {eff} →", transform=ax.transAxes, ha="right",
                    va="top", fontsize=6)  # fmt: skip
        if span is not None:
            ax.set_xlim(span[0], max(span[1], span[0] + 1))
        if math.isfinite(lo):
            decades = list(range(math.floor(lo), math.ceil(hi) + 1))
            step = max(1, len(decades) // 3)
            ax.yaxis.set_major_locator(FixedLocator(decades[::step]))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{10.0**v:g}"))
        ax.xaxis.set_major_locator(MaxNLocator(3, integer=True))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.text(
            0.0,
            1.04,
            f"{name}\n{summary.verdict}",
            transform=ax.transAxes,
            fontsize=7.5,
            color=color,
            va="bottom",
            ha="left",
        )
        ax.tick_params(labelsize=6, length=2, pad=1)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    tally = ", ".join(f"{v}: {c}" for v, c in sorted(counts.items()))
    fig.text(
        0.01,
        1 - 0.15 / height,
        f"warmup report: {n} runs, {names.pattern or 'each as given'} ({tally}).\nEach panel: "
        "the loss (log scale) of one run; red shading and dots: instability alerts and "
        "episodes; dashed: 10x the initial loss; dotted: end of warmup",
        fontsize=9,
        va="top",
        ha="left",
    )
    fig.subplots_adjust(
        left=0.04, right=0.99, bottom=0.03, top=1 - 0.9 / height, hspace=0.8, wspace=0.25
    )
    return fig
