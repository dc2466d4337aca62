"""report.png: what is drawn, and that the number of artists does not grow with the alerts
(issue 16, defect 9: 2,980 full-height lines took 4.2 s of a 7.4 s drawing)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import pytorch_lightning as pl
from conftest import fit, make_loader, tiny_module_class
from matplotlib.collections import PolyCollection
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_report import _alert, _series, spiky_loss, synthetic_run

from warmup_monitor import AdaptiveWarmup, WarmupMonitor
from warmup_monitor.report import load_run, summarize
from warmup_monitor.report.figure import GRACE_FRACTION, SPIKE_FACTOR, _overlay, _small_multiples
from warmup_monitor.report.runs import RunData
from warmup_monitor.schema import ALERTS_FILENAME

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _artists(fig: Any) -> int:
    return sum(len(ax.lines) + len(ax.collections) + len(ax.patches) for ax in fig.axes)


def _spiky(alerts: int, peak_lr: float = 1e-3) -> RunData:
    return synthetic_run(
        peak_lr=peak_lr,
        alerts=[_alert(s, "loss_spike") for s in range(150, 150 + alerts)],
        loss=lambda s: 30.0 if 150 <= s < 150 + alerts else 2.0 / (1 + 0.01 * s),
    )


def test_the_drawing_does_not_grow_with_the_number_of_alerts() -> None:
    counts = []
    for n in (3, 200):
        runs = [_spiky(n), _spiky(n)]
        fig = _overlay(plt, runs, [summarize(r) for r in runs])
        counts.append(_artists(fig))
        plt.close(fig)
    assert counts[0] == counts[1]
    many = [_spiky(150) for _ in range(12)]
    fig = _small_multiples(plt, many, [summarize(r) for r in many])
    assert _artists(fig) <= 12 * 6  # curve, shading, dots, threshold, end of warmup: per run
    plt.close(fig)


@pytest.mark.parametrize(("peaks", "log"), [((1e-3, 1e-3), False), ((3e-3, 1.0), True)])
def test_log_lr_axis_when_runs_differ_tenfold(peaks: tuple[float, float], log: bool) -> None:
    runs = [synthetic_run(peak_lr=p) for p in peaks]
    fig = _overlay(plt, runs, [summarize(r) for r in runs])
    ax_lr = fig.axes[0]
    assert ax_lr.get_yscale() == ("log" if log else "linear")
    plt.close(fig)


def test_threshold_zoom_validation_loss_and_marks() -> None:
    alerts = [
        _alert(40, "loss_spike"),
        _alert(45, "warmup_extended", old_warmup_steps=100, new_warmup_steps=150),
        _alert(55, "lr_backoff"),
        _alert(60, "rollback"),
    ]
    plan = [100.0] * 45 + [150.0] * 355
    run = synthetic_run(warmup=plan, alerts=alerts)
    run.extra = {"val_loss": _series([0, 100, 200], [2.5, 1.5, 1.0])}
    summary = summarize(run)
    fig = _overlay(plt, [run], [summary])
    _, ax_zoom, ax_strip, ax_loss = fig.axes[:4]
    level = SPIKE_FACTOR * 2.0  # the synthetic loss starts at 2
    assert any(
        len(line.get_ydata()) == 2 and np.allclose(line.get_ydata(), level)
        for line in ax_loss.lines
    )
    assert ax_zoom.get_xlim() == (0.0, 150 + GRACE_FRACTION * 150)
    assert any(
        line.get_linestyle() == "--" and len(line.get_xdata()) == 3 for line in ax_loss.lines
    )
    markers = {line.get_marker() for line in ax_strip.lines}
    assert {">", "v", "X"} <= markers  # extension, back-off, rollback: distinct marks
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    for label in (
        "warmup extended",
        "lr back-off",
        "rollback",
        "instability alert",
        "10x initial loss",
        "validation loss",
        "end of warmup",
        "unstable episode",
    ):
        assert label in legend
    caption = [t.get_text() for t in fig.texts]
    assert any(summary.verdict in t and "warmup 100→150" in t for t in caption)
    plt.close(fig)


# ---------------------------------------------------------------------------------- issue 22


def _strip(fig: Any) -> Any:
    (ax,) = [a for a in fig.axes if a.get_title(loc="left").startswith("what the monitor found")]
    return ax


def test_the_panels_span_the_logged_steps_not_an_extended_warmup(tmp_path: Path) -> None:
    """Issue 22, finding 9: a run that ended at 234 had panels out to its extended warmup
    (1,000-1,400 steps): about 75 % of each panel was empty."""
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    model = tiny_module_class(pl)(scripted=spiky_loss, warmup=20)
    monitor = WarmupMonitor(
        warmup_steps=20, adaptive=AdaptiveWarmup(rollback=False, extend_steps=150)
    )
    fit(pl, tmp_path, [monitor], model=model, max_steps=40, loader=make_loader(160, 4),
        logger=logger)  # fmt: skip
    run_dir = str(logger.log_dir)
    # The steps with data, read by TensorBoard's own reader.
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    steps = [
        e.step for tag in events.Tags()["scalars"] if tag.startswith("warmup/")
        for e in events.Scalars(tag)
    ]  # fmt: skip
    first, last = min(steps), max(steps)
    with open(f"{run_dir}/{ALERTS_FILENAME}", encoding="utf-8") as f:
        ext = [json.loads(x) for x in f if '"warmup_extended"' in x]
    new_end = ext[-1]["details"]["new_warmup_steps"]
    assert new_end > last + 100  # the warmup was extended far past the end of the run

    run = load_run(run_dir)
    fig = _overlay(plt, [run], [summarize(run)])
    assert fig.axes[0].get_xlim() == (first, last)  # the lr, shared by the full-width panels
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert first <= lo < hi <= last, ax.get_title(loc="left")
    # The end of warmup past the data is said at the right edge of the run's band.
    notes = [t.get_text() for t in _strip(fig).texts]
    assert notes == [f"warmup ends at step {new_end} →"]
    plt.close(fig)
    many = _small_multiples(plt, [run] * 7, [summarize(run)] * 7)
    for ax in many.axes:
        if ax.get_visible():
            assert ax.get_xlim() == (first, last)
    plt.close(many)


def test_run_names_are_shortened_from_their_common_prefix() -> None:
    """Issue 22, finding 9: names were cut from the left (``…o/version_0``)."""
    runs = [synthetic_run(), synthetic_run()]
    runs[0].name = "runs/demo/short/version_0"
    runs[1].name = "runs/demo/defaults/version_0"
    fig = _overlay(plt, runs, [summarize(r) for r in runs])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["short", "defaults"]
    assert [t.get_text() for t in _strip(fig).get_yticklabels()] == ["short", "defaults"]
    assert fig._suptitle.get_text() == "warmup report: 2 runs, runs/demo/<run>/version_0"
    captions = [t.get_text() for t in fig.texts if ": " in t.get_text() and t is not fig._suptitle]
    assert [c.split(":")[0] for c in captions] == ["short", "defaults"]
    every = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert not any("…" in t for t in every)
    plt.close(fig)


@pytest.mark.parametrize(
    ("names", "short", "pattern"),
    [
        (["runs/demo/short/version_0", "runs/demo/defaults/version_0"],
         ["short", "defaults"], "runs/demo/<run>/version_0"),
        (["logs/run/version_0", "logs/run/version_1"], ["version_0", "version_1"],
         "logs/run/<run>"),
        (["/abs/a/x", "/abs/b/x", "/abs/c/x"], ["a", "b", "c"], "/abs/<run>/x"),
        (["logs", "logs/sub"], ["logs", "logs/sub"], ""),  # one is the other's prefix
        (["a/v0", "a/v0"], ["v0", "v0"], "a/<run>"),  # the same run twice
        (["only/one/run"], ["only/one/run"], ""),
        (["x", "y"], ["x", "y"], ""),
    ],
)  # fmt: skip
def test_run_names(names: list[str], short: list[str], pattern: str) -> None:
    from warmup_monitor.report.names import run_names  # new in issue 22

    got = run_names(names)
    assert (got.short, got.pattern) == (short, pattern)


def test_four_runs_overlaid_keep_their_marks_apart() -> None:
    """Issue 22, finding 9: with 4 runs overlaid, markers and episode shading piled up. Here
    the worst case: the same episode and the same three actions at the same steps in each."""
    alerts = [
        _alert(40, "loss_spike", episode=0),
        _alert(41, "loss_spike", episode=0),
        _alert(41, "warmup_extended", old_warmup_steps=100, new_warmup_steps=150),
        _alert(41, "lr_backoff"),
        _alert(41, "rollback"),
    ]
    runs = [synthetic_run(alerts=alerts, peak_lr=1e-3 * (i + 1)) for i in range(4)]
    for i, run in enumerate(runs):
        run.name = f"runs/cell/arm{i}/version_0"
    fig = _overlay(plt, runs, [summarize(r) for r in runs])
    strip = _strip(fig)
    bars = [c for c in strip.collections if isinstance(c, PolyCollection) and c.get_paths()]
    assert len(bars) == 4
    colors = {tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in bars}
    assert len(colors) == 4  # one colour per run
    extents = sorted((p.vertices[:, 1].min(), p.vertices[:, 1].max()) for c in bars
                     for p in c.get_paths())  # fmt: skip
    assert all(a[1] < b[0] for a, b in itertools.pairwise(extents))  # apart
    # The three actions at step 41 sit side by side in each band: no two at one place.
    places = [
        tuple(np.round(line.get_transform().transform(line.get_xydata())[0], 1))
        for line in strip.lines if line.get_marker() in (">", "v", "X")
    ]  # fmt: skip
    assert len(places) == 12 and len(set(places)) == 12
    # The curve panels carry curves only: no shading piled over the loss.
    ax_loss = fig.axes[3]
    assert ax_loss.get_title(loc="left") == "loss (log)"
    assert not [c for c in ax_loss.collections if isinstance(c, PolyCollection)]
    assert len({line.get_color() for line in ax_loss.lines if len(line.get_xdata()) > 2}) == 4
    plt.close(fig)
