"""report.png: what is drawn, and that the number of artists does not grow with the alerts
(issue 16, defect 9: 2,980 full-height lines took 4.2 s of a 7.4 s drawing)."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import pytest
from test_report import _alert, _series, synthetic_run

from warmup_monitor.report import summarize
from warmup_monitor.report.figure import GRACE_FRACTION, SPIKE_FACTOR, _overlay, _small_multiples
from warmup_monitor.report.runs import RunData

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
    ax_lr, ax_zoom, ax_loss = fig.axes[:3]
    level = SPIKE_FACTOR * 2.0  # the synthetic loss starts at 2
    assert any(
        len(line.get_ydata()) == 2 and np.allclose(line.get_ydata(), level)
        for line in ax_loss.lines
    )
    assert ax_zoom.get_xlim() == (0.0, 150 + GRACE_FRACTION * 150)
    assert any(
        line.get_linestyle() == "--" and len(line.get_xdata()) == 3 for line in ax_loss.lines
    )
    markers = {line.get_marker() for line in ax_lr.lines}
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
