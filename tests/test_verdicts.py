"""Honest verdicts (issue 16, defects 4 and 8): each verdict says its rule, too-short runs are not
judged, the lr advice is the one shared function's, never under 10 %, never contradictory; and
alerts group by episode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import _alert, synthetic_run

from warmup_monitor import cli
from warmup_monitor.advice import recommend_peak_lr
from warmup_monitor.report import HEALTHY, RECOVERED, TOO_SHORT, UNSTABLE, summarize
from warmup_monitor.report.episodes import step_ranges
from warmup_monitor.schema import Alert, AlertKind


def test_a_run_that_ends_during_warmup_is_too_short_to_judge() -> None:
    """Defect 4: a run stopped at step 3 of a 5-step warmup was "healthy", told to "try about 2
    steps"."""
    r = summarize(synthetic_run(n=4, warmup=5, cosine=lambda s: 0.9))
    assert r.verdict == TOO_SHORT
    assert r.verdict_reason == (
        "the run ended at step 3, during its 5-step warmup, without an instability alert"
    )
    assert r.advice == [
        "the run ended at step 3, before its 5-step warmup did: train past the end of warmup "
        "before judging its length or the peak lr"
    ]
    unstable = summarize(synthetic_run(n=4, warmup=5, alerts=[_alert(2, "loss_spike")]))
    assert unstable.verdict == UNSTABLE
    assert "during its 5-step warmup, with instability alerts" in unstable.verdict_reason


def test_every_verdict_states_its_rule() -> None:
    healthy = summarize(synthetic_run())
    assert (healthy.verdict, healthy.verdict_reason) == (
        HEALTHY,
        "no instability alert up to step 399",
    )
    recovered = summarize(synthetic_run(alerts=[_alert(30, "loss_spike")]))
    assert recovered.verdict == RECOVERED
    # 400 steps: the quiet tail is the last 40; the loss before step 30 is 2 / (1 + 0.01 s) for
    # s = 25..29, median at s = 27; the tail's median is between s = 379 and 380.
    before = 2 / (1 + 0.01 * 27)
    tail = (2 / (1 + 0.01 * 379) + 2 / (1 + 0.01 * 380)) / 2
    assert recovered.verdict_reason == (
        f"no instability alert in the last 40 logged steps (last one at step 30), and their "
        f"median loss ({tail:.4g}) came back to at most the loss before the first instability "
        f"(median {before:.4g} of the 5 logged before step 30)"
    )
    stuck = summarize(
        synthetic_run(alerts=[_alert(30, "loss_spike")], loss=lambda s: 2.0 if s < 30 else 3.0)
    )
    assert stuck.verdict == UNSTABLE
    assert stuck.verdict_reason == (
        "no instability alert in the last 40 logged steps (last one at step 30), but their median "
        "loss (3) stayed more than 5% above the loss before the first instability (median 2 of "
        "the 5 logged before step 30): not recovered"
    )


def test_exhausted_warmup_then_recovery_is_recovered_and_the_advice_agrees_with_the_alert() -> None:
    """Defect 4: after any warmup_exhausted the verdict was "unstable" for good ("had not
    recovered", though the last alert was 231 steps before the end); the advice said "0.65"
    where the alert said "0.35", and "at least 50 warmup steps" next to "a longer warmup alone
    will not do"."""
    exhausted = _alert(60, "warmup_exhausted", unstable_lr=0.7, unstable_factor=0.7)
    alerts = [_alert(20, "oscillation"), _alert(40, "loss_spike"), exhausted]
    plan = [50.0] * 30 + [100.0] * 370
    ext = _alert(30, "warmup_extended", old_warmup_steps=50, new_warmup_steps=100)
    r = summarize(synthetic_run(warmup=plan, alerts=[*alerts, ext], peak_lr=1.0))
    assert r.verdict == RECOVERED
    assert "last one at step 60" in r.verdict_reason
    expected = recommend_peak_lr(0.7)  # what the controller's alert says
    assert expected is not None and r.recommended_peak_lr == expected
    text = " ".join(r.advice)
    assert f"lower the peak lr to about {expected:.3g} (half of 0.7," in text
    assert "a longer warmup alone did not do" in text
    assert "warmup steps next time" not in text and "lengthen warmup" not in text
    assert "had not recovered" not in text


def test_lr_advice_is_never_a_change_under_ten_percent() -> None:
    """Defect 4: "lower the peak lr to about 0.00298" was 0.7 % below a peak of 3e-3."""
    r = summarize(synthetic_run(peak_lr=3e-3, alerts=[_alert(399, "loss_spike")]))
    assert r.lowest_unstable_lr == 3e-3
    assert r.recommended_peak_lr is not None and r.recommended_peak_lr <= 0.9 * 3e-3
    # A healthy run whose gradients aligned early: a shorter warmup only when >= 10 % shorter.
    for warmup in (4, 10, 100):
        h = summarize(synthetic_run(warmup=warmup, cosine=lambda s: 0.9))
        for line in h.advice:
            if "try about" in line:
                steps = int(line.split("try about ")[1].split()[0])
                assert steps <= 0.9 * warmup


def test_json_lists_each_unstable_step_once(tmp_path: Path) -> None:
    """Defect 8: instability_steps repeated steps (21, 21, 30, 30)."""
    alerts = [_alert(s, k) for s in (21, 30) for k in ("loss_spike", "grad_norm_spike")]
    r = summarize(synthetic_run(alerts=alerts))
    assert r.instability_steps == [21, 30]
    assert r.to_dict()["instability_steps"] == [21, 30]
    json.dumps(r.to_dict(), allow_nan=False)


def test_alerts_are_grouped_by_episode() -> None:
    ended = {
        "episode": 0, "start": 13, "end": 45, "duration": 33, "count": 29,
        "kinds": ["loss_spike", "grad_norm_spike"], "peak_ratio": 50.0, "peak_step": 20,
        "recovered": True, "steps": [[13, 40], [45, 45]],
    }  # fmt: skip
    alerts = [
        _alert(13, "loss_spike", episode=0),
        _alert(14, "warmup_extended", old_warmup_steps=100, new_warmup_steps=150),
        Alert(46, AlertKind.EPISODE_END, "episode 0 ended", details=ended, episode=0),
        _alert(200, "loss_divergence"),  # a file without episode ids: a group of its own
        _alert(201, "loss_divergence"),
    ]
    r = summarize(synthetic_run(alerts=alerts))
    first, second, third = r.episodes
    assert (first.id, first.start, first.end, first.count) == (0, 13, 45, 29)
    assert first.steps == [[13, 40], [45, 45]] and first.recovered is True and first.closed
    assert first.kinds == ["loss_spike", "grad_norm_spike"] and first.alerts == [0, 2]
    assert (second.id, second.start, second.steps, second.alerts) == (None, 200, [[200, 200]], [3])
    assert third.alerts == [4]
    assert r.actions == {"warmup_extended": [14]}
    assert step_ranges([5, 3, 4, 9, 9]) == [[3, 5], [9, 9]]


def test_real_run_reports_episodes_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report of a file with episodes, through the command line, in JSON."""
    from test_report import make_real_run

    run = make_real_run(tmp_path)
    code = cli.main(["report", run, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    got = doc["runs"][0]
    assert got["verdict_reason"] and got["episodes"]
    assert got["instability_steps"] == sorted(set(got["instability_steps"]))


def test_a_loss_that_climbed_before_the_first_alert_does_not_set_the_bar() -> None:
    """The demo's loss rose from 4.4 to 15 before the first alert: coming back to 15 is not a
    recovery; the initial loss is the bar then."""

    def climbing(s: int) -> float:
        if s < 30:
            return 2.0 + s  # climbing, unflagged, to 31 before the first alert at step 30
        return 40.0 if s < 100 else 3.0  # after the episode: 3, below 31 but above 2

    r = summarize(synthetic_run(alerts=[_alert(30, "loss_spike")], loss=climbing))
    assert r.verdict == UNSTABLE
    assert "is not 5% below the initial loss (2): the run is not learning" in r.verdict_reason
