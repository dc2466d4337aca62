"""The alert sinks: JSONL, console throttling, a failing hook."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest

from warmup_monitor.alerts import Alert, AlertDispatcher, AlertKind, read_alerts


def test_console_holds_back_repeats_but_every_other_sink_gets_all(
    tmp_path: os.PathLike, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(str(tmp_path), "alerts.jsonl")
    hooked: list[Alert] = []
    dispatcher = AlertDispatcher(jsonl_path=path, on_alert=hooked.append, log_quiet_steps=50)
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        for step in range(100):
            dispatcher.dispatch(Alert(step, AlertKind.LOSS_SPIKE, "big", value=50.0))
        dispatcher.dispatch(Alert(7, AlertKind.NON_FINITE, "nan", value=math.nan))
        for step in (10, 11, 12):  # actions are always said
            dispatcher.dispatch(Alert(step, AlertKind.WARMUP_EXTENDED, "longer"))
    dispatcher.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 6
    assert sum("warmup_extended" in m for m in messages) == 3
    assert "[step 0] loss_spike" in messages[0]
    assert "[step 50] loss_spike" in messages[1] and "49 more loss_spike alerts" in messages[1]
    assert "non_finite" in messages[2]
    assert [a.step for a in read_alerts(path)] == [*range(100), 7, 10, 11, 12]
    assert len(hooked) == 104
    assert math.isnan(read_alerts(path)[100].value)


def test_zero_quiet_steps_logs_every_alert(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = AlertDispatcher(log_quiet_steps=0)
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        for step in range(5):
            dispatcher.dispatch(Alert(step, AlertKind.LOSS_SPIKE, "big"))
    assert len(caplog.records) == 5


def test_actions_and_episode_summaries_are_always_said(
    tmp_path: os.PathLike, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller's actions and the close of an episode are never held back on the console;
    the file gets strict JSON lines through the schema's one writer."""
    path = os.path.join(str(tmp_path), "alerts.jsonl")
    dispatcher = AlertDispatcher(jsonl_path=path, log_quiet_steps=50)
    kinds = [AlertKind.LR_BACKOFF, AlertKind.ROLLBACK, AlertKind.EPISODE_END]
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        for step in range(3):
            for kind in kinds:
                dispatcher.dispatch(Alert(step, kind, "m", value=math.inf, episode=step))
    dispatcher.close()
    assert len(caplog.records) == 9
    got = read_alerts(path)
    assert [(a.step, a.kind, a.episode) for a in got] == [
        (step, kind, step) for step in range(3) for kind in kinds
    ]
    with open(path, encoding="utf-8") as f:
        assert all('"value": "inf"' in line for line in f)


def test_held_back_alerts_point_where_they_can_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 item 14: without an alerts file the console never points at one."""
    cases = {"file": str(tmp_path / "a.jsonl"), "none": None}
    for name, path in cases.items():
        caplog.clear()
        dispatcher = AlertDispatcher(jsonl_path=path, log_quiet_steps=50)
        with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
            for step in (0, 1, 2, 60):
                dispatcher.dispatch(Alert(step, AlertKind.LOSS_TREND_SPIKE, "spike"))
        dispatcher.close()
        last = caplog.records[-1].getMessage()
        assert "2 more loss_trend_spike alerts since step 0" in last, name
        if path is None:
            assert "alerts file" not in last and "logged at DEBUG level" in last
        else:
            assert f"see {path}" in last
