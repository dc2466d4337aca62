"""Issue 22, finding 6: the words of the messages, the report and the tab are true.

Real Lightning runs whose loss is scripted to spike at known steps; every expected value
(levels, bounds, steps) is computed here from the options and the script, never read off
the monitor.
"""

from __future__ import annotations

import io
import math
import os
import re
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
from conftest import fit, make_loader, ten_x_only, tiny_module_class
from rich.console import Console

from warmup_monitor import AdaptiveWarmup, Alert, WarmupMonitor, Window
from warmup_monitor.alerts import ALERTS_FILENAME, read_alerts
from warmup_monitor.report import load_run, summarize
from warmup_monitor.report.episodes import group_episodes
from warmup_monitor.report.events import Series
from warmup_monitor.report.figure import caption
from warmup_monitor.report.render import summary_table
from warmup_monitor.report.runs import RunData
from warmup_monitor.words import count, ratio, span

PEAK = 0.05  # the tiny module's lr
PERMANENT = ("from now on", "for the rest of training", "stays at")


class UsedLr(pl.Callback):
    """The lr each update used (read inside ``optimizer.step``, after the monitor's factor)."""

    def __init__(self) -> None:
        self.used: list[float] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(lambda o, a, k: self.used.append(float(o.param_groups[0]["lr"])))


def _spikes(steps: set[int]) -> Any:
    return lambda step: 20.0 if step in steps else 1.0


def test_repeated_back_offs_say_the_level_they_hold_and_never_claim_it_for_ever(
    tmp_path: os.PathLike,
) -> None:
    backoff, spikes = 0.5, [12, 20, 28, 36]
    hooked: list[Alert] = []
    used = UsedLr()
    monitor = WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=AdaptiveWarmup(backoff=backoff, cooldown_steps=0, rollback=False),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    model = tiny_module_class(pl)(lr=PEAK, scripted=_spikes(set(spikes)))
    fit(pl, tmp_path, [monitor, used], model=model, max_steps=40)
    backoffs = [a for a in hooked if a.kind.value == "lr_backoff"]
    assert [a.step for a in backoffs] == spikes
    # No two messages claim permanence; only the back-off with no extension left may.
    permanent = [a for a in backoffs if any(p in a.message for p in PERMANENT)]
    assert len({round(a.details["factor_after"], 12) for a in permanent}) <= 1
    assert all(a.details["extensions"] == a.details["max_extensions"] for a in permanent)
    # The factor each back-off lowered, measured from the lr the update at its step used.
    before = [used.used[s] / PEAK for s in spikes]
    after = [backoff * b for b in before]
    assert before[0] == pytest.approx(1.0)  # step 12: past the 10-step warmup
    for a, b, c in zip(backoffs, before, after, strict=True):
        assert f"from {b:.3g} to {c:.3g}" in a.message
    # From the second back-off on, the level is held: each back-off halves the one before,
    # so the levels are the products of the back-off factor, and the lr used between two
    # back-offs is the held level, as the message says.
    for k in range(1, len(spikes)):
        assert after[k] == pytest.approx(before[1] * backoff**k, rel=1e-6)
        assert f"held at {after[k]:.3g}" in backoffs[k].message
        stop = spikes[k + 1] + 1 if k + 1 < len(spikes) else len(used.used)
        held = [u / PEAK for u in used.used[spikes[k] + 1 : stop]]
        assert held == pytest.approx([after[k]] * len(held), rel=1e-6)
    for a in backoffs[1:-1]:
        assert "until a next back-off" in a.message
    # The extension of a held level does not promise a re-warm to the peak.
    for a in hooked:
        if a.kind.value == "warmup_extended" and a.details.get("ceiling") is not None:
            assert "reaches the peak" not in a.message


@pytest.mark.parametrize(
    ("warmup", "options", "spikes", "run_warmup"),
    [
        # No extension allowed: the run's warmup stayed at its 10 steps.
        (10, {"max_extensions": 0}, {3}, 10),
        # One extension of + 0.5 x 4 steps: 4 -> 6; the spike at 6 finds the caps used.
        (
            4,
            {"max_extensions": 1, "backoff": 1.0, "extend_fraction": 0.5, "grace_steps": 1},
            {1, 6},
            6,
        ),
    ],
)
def test_exhausted_advice_names_a_longer_warmup_than_the_run_had(
    tmp_path: os.PathLike, warmup: int, options: dict[str, Any], spikes: set[int], run_warmup: int
) -> None:
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=warmup,
        schedule="linear",
        adaptive=AdaptiveWarmup(rollback=False, cooldown_steps=5, **options),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    fit(
        pl, tmp_path, [monitor], model=tiny_module_class(pl)(scripted=_spikes(spikes)), max_steps=12
    )
    exhausted = [a for a in hooked if a.kind.value == "warmup_exhausted"]
    assert len(exhausted) == 1
    message = exhausted[0].message
    advised = [int(n) for n in re.findall(r"warmup[^:;]*?at least (\d+)", message)]
    assert advised and all(n > run_warmup for n in advised), message
    assert f"at least {2 * run_warmup}" in message
    caps = options["max_extensions"]
    assert f"caps: {caps} {'extension' if caps == 1 else 'extensions'}," in message
    assert "(s)" not in message


def test_the_closing_record_carries_the_last_monitored_step(tmp_path: os.PathLike) -> None:
    warmup, post, steps = 6, 2, 14
    last_monitored = warmup + post - 1  # Window.post_warmup_steps after the warmup
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=warmup, window=Window(post_warmup_steps=post), on_alert=hooked.append
    )
    model = tiny_module_class(pl)(scripted=_spikes({6, 7}))
    trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=steps)
    assert trainer.global_step == steps  # training went on after the monitoring ended
    ends = [a for a in hooked if a.kind.value == "episode_end"]
    assert len(ends) == 1
    assert ends[0].step == last_monitored
    assert f"when monitoring ended after step {last_monitored}" in ends[0].message
    # One vocabulary: the tab's row (the report's facts) says the range and the peak in the
    # words of the record.
    (episode,) = [e for e in summarize(load_run(trainer.log_dir)).episodes if e.id is not None]
    facts = episode.facts()
    assert facts[0] == f"episode 1: {span(6, last_monitored)}"
    assert facts[1] == count(2, "flagged step")
    assert span(6, last_monitored) in ends[0].message
    assert facts[3] == "peak loss 20x the initial loss, at step 6"  # the scripted 20 / 1
    assert facts[3] in ends[0].message


def test_a_second_fit_continues_the_episode_the_first_left_open(tmp_path: os.PathLike) -> None:
    spikes = {5, 6, 7, 8}
    hooked: list[Alert] = []
    monitor = WarmupMonitor(warmup_steps=10, on_alert=hooked.append)
    model = tiny_module_class(pl)(scripted=_spikes(spikes))
    with pytest.warns(UserWarning, match="longer than"):
        trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=7)
    first = [a for a in hooked if a.kind.value == "episode_end"]
    assert len(first) == 1 and first[0].step == 6  # the first fit's last step
    # Not "monitoring ended": the window (10 + 100 steps) was still running.
    assert "monitoring ended" not in first[0].message
    assert "training stopped after step 6" in first[0].message
    trainer.fit_loop.epoch_loop.max_steps = 14
    trainer.fit(model, make_loader())
    assert trainer.global_step == 14
    # The instability of steps 7-8 is the same episode: no second one opens.
    assert {a.episode for a in hooked if a.episode is not None} == {1}
    alerts = read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))
    episodes, _ = group_episodes(alerts)
    grouped = [e for e in episodes if e.id is not None]
    assert len(grouped) == 1
    assert (grouped[0].start, grouped[0].end) == (min(spikes), max(spikes))
    summary = summarize(load_run(trainer.log_dir))
    assert len([e for e in summary.episodes if e.id is not None]) == 1


def _series(values: list[float]) -> Series:
    return Series(np.arange(len(values), dtype=np.int64), np.asarray(values, dtype=np.float64))


def test_ranges_counts_and_ratios_read_as_words() -> None:
    assert span(32, 32) == "step 32" and span(32, 40) == "steps 32-40"
    assert count(1, "extension") == "1 extension" and count(2, "extension") == "2 extensions"
    assert [ratio(x) for x in (1.04, 1.0, 23.4, 0.052)] == ["1.0", "1.0", "23", "0.052"]
    assert (ratio(None), ratio(math.inf)) == ("-", "inf")
    # A run that ended inside its warmup, with one flagged step (32), in one episode, and its
    # peak loss 1.04x the initial one at step 2.
    n, peak_step, flagged = 40, 2, 32
    losses = [1.0] * n
    losses[peak_step] = 1.04
    lr = [1e-3 * (s + 1) / 100 for s in range(n)]
    series = {
        "loss": _series(losses),
        "loss_ratio": _series([v / losses[0] for v in losses]),
        "lr": _series(lr),
        "warmup_steps": _series([100.0] * n),
    }
    alert = Alert(flagged, "loss_trend_spike", "jump", 1.0, 1.0, {}, 1)  # type: ignore[arg-type]
    end = Alert(
        flagged, "episode_end", "end", math.nan, math.nan,  # type: ignore[arg-type]
        {"start": flagged, "end": flagged, "count": 1, "outcome": "open_at_end"}, 1,
    )  # fmt: skip
    r = summarize(RunData("short", "/nowhere", series, [alert, end], "jsonl"))
    assert f"({span(flagged, flagged)})" in r.verdict_reason
    assert f"{flagged}-{flagged}" not in r.verdict_reason
    assert f"peak loss {1.04:.1f}x the initial loss, at step {peak_step}" in caption(r)
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(summary_table([r]))
    table = out.getvalue()
    assert "1 episode:" in table and "(s)" not in table
    assert f"{flagged}-{flagged}" not in table
