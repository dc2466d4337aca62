"""Episodes: one alert when instability opens, one summary when it ends, nothing in between."""

from __future__ import annotations

import json
import math
import random
import statistics
from typing import Any

import pytest

from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind, is_instability
from warmup_monitor.detectors import EPISODE_KINDS, Episodes, InstabilityDetector
from warmup_monitor.schema import EPISODE_END_FIELDS, EPISODE_OUTCOMES

K = AlertKind


def alert(step: int, kind: Any, **details: Any) -> Alert:
    return Alert(
        step=step,
        kind=kind,
        message=f"{getattr(kind, 'value', kind)} at {step}",
        details=dict(details),
    )


def test_episode_kinds_are_the_instability_kinds_but_the_controllers() -> None:
    expected = {k.value for k in INSTABILITY_KINDS} - {"warmup_exhausted"}
    assert expected == EPISODE_KINDS
    assert "loss_divergence" in EPISODE_KINDS and "grad_norm_rise" not in EPISODE_KINDS
    assert "transient" not in EPISODE_KINDS and "episode_end" not in EPISODE_KINDS
    assert not K.EPISODE_END.is_instability


def test_an_episode_opens_once_updates_silently_and_closes_with_its_summary() -> None:
    ep = Episodes(quiet_steps=5)
    flagged = {
        10: [K.LOSS_SPIKE, K.LOSS_TREND_SPIKE],
        11: [K.LOSS_SPIKE, K.LOSS_TREND_SPIKE],
        12: [K.LOSS_TREND_SPIKE],
        13: [K.LOSS_TREND_SPIKE, K.NON_FINITE],
        14: [K.LOSS_TREND_SPIKE],
        16: [K.LOSS_DIVERGENCE],
    }
    ratios = {s: 1.0 + (s % 7) * 2.5 for s in range(30)}  # peak 16.0 at step 13
    out: dict[int, list[Alert]] = {}
    for step in range(5, 30):
        alerts = [alert(step, k) for k in flagged.get(step, [])]
        got = ep.observe(step, alerts, ratios[step], loss=2.0 * ratios[step], initial_loss=2.0)
        if got:
            out[step] = got
    assert sorted(out) == [10, 21]  # the opening, and the end 5 quiet steps after step 16
    (opening,) = out[10]
    assert (opening.kind, opening.episode, opening.step) == (K.LOSS_SPIKE, 1, 10)
    assert opening.details["episode_kinds"] == ["loss_spike", "loss_trend_spike"]
    assert "loss_trend_spike" in opening.message
    (end,) = out[21]
    assert (end.kind, end.step, end.episode) == (K.EPISODE_END, 21, 1)
    peak_step = max(range(10, 21), key=lambda s: ratios[s])
    assert end.details == {
        "episode": 1,
        "start": 10,
        "end": 16,
        "duration": 7,
        "count": 6,
        "alerts": sum(len(v) for v in flagged.values()),
        "kinds": ["loss_spike", "loss_trend_spike", "non_finite", "loss_divergence"],
        "kind_counts": {
            "loss_spike": 2,
            "loss_trend_spike": 5,
            "non_finite": 1,
            "loss_divergence": 1,
        },
        "peak_ratio": ratios[peak_step],
        "peak_step": peak_step,
        "recovered": False,
        "recovery": end.details["recovery"],
        "outcome": "not_recovered",
        "steps": [[10, 14], [16, 16]],
    }
    # The recovery rule written out again: the quiet steps 17-20 against steps 5-9 before it.
    after = statistics.median(2.0 * ratios[s] for s in range(17, 21))
    before = statistics.median(2.0 * ratios[s] for s in range(5, 10))
    assert after > 1.05 * before
    assert end.details["recovery"].startswith(f"their median loss ({after:.4g}) stayed more")
    assert "ended quiet but did not recover" in end.message
    assert end.value == ratios[peak_step]
    json.dumps(end.to_dict(), allow_nan=False)  # a JSONL line as it is


def test_the_raw_alerts_are_not_changed() -> None:
    ep = Episodes()
    raw = [alert(3, K.LOSS_TREND_SPIKE, trend=1.0), alert(3, K.LOSS_DIVERGENCE)]
    (opening,) = ep.observe(3, raw)
    assert opening is not raw[0] and opening.episode == 1
    assert raw[0].episode is None and raw[0].details == {"trend": 1.0}
    assert opening.details == {
        "trend": 1.0,
        "episode_kinds": ["loss_trend_spike", "loss_divergence"],
    }


def test_other_kinds_pass_through_unchanged_and_in_place() -> None:
    ep = Episodes(quiet_steps=3)
    extended = alert(4, K.WARMUP_EXTENDED)
    transient = alert(4, K.TRANSIENT)
    backoff = alert(4, "lr_backoff")  # a kind this version does not know
    spike = alert(4, K.LOSS_TREND_SPIKE)
    got = ep.observe(4, [extended, spike, transient, backoff])
    assert got[0] is extended and got[2] is transient and got[3] is backoff
    assert got[1].kind == K.LOSS_TREND_SPIKE and got[1].episode == 1
    exhausted, monitor = alert(5, K.WARMUP_EXHAUSTED), alert(5, K.MONITOR)
    assert ep.observe(5, [exhausted, monitor, alert(5, K.NON_FINITE)]) == [exhausted, monitor]
    assert ep.observe(6, [alert(6, K.TRANSIENT)])[0].episode is None


def test_close_ends_an_open_episode_as_not_recovered() -> None:
    ep = Episodes(quiet_steps=10)
    assert ep.close(3) == []
    ep.observe(3, [alert(3, K.NON_FINITE)])
    ep.observe(4, [alert(4, K.NON_FINITE)])
    assert ep.current == 1
    (end,) = ep.close(6)
    assert (end.step, end.episode) == (6, 1)
    assert end.details["recovered"] is False and end.details["steps"] == [[3, 4]]
    assert end.details["outcome"] == "open_at_end"
    assert end.details["peak_ratio"] is None and math.isnan(end.value)
    assert ep.close(7) == [] and ep.current is None


def test_close_on_an_interruption_says_so_in_the_outcome_and_the_message() -> None:
    ep = Episodes(quiet_steps=10)
    assert ep.close(3, interrupted=True) == []
    ep.observe(3, [alert(3, K.LOSS_SPIKE)])
    (end,) = ep.close(5, interrupted=True)
    assert (end.step, end.episode) == (5, 1)
    assert end.details["outcome"] == "interrupted" and end.details["recovered"] is False
    assert "interrupted" in end.message
    assert set(EPISODE_END_FIELDS) <= set(end.details)
    assert set(EPISODE_OUTCOMES) == {
        "recovered",
        "not_recovered",
        "ended_quiet",
        "open_at_end",
        "interrupted",
    }


def test_a_later_episode_gets_the_next_id_and_the_first_one_its_end() -> None:
    ep = Episodes(quiet_steps=5)
    ep.observe(0, [alert(0, K.LOSS_SPIKE)])
    got = ep.observe(40, [alert(40, K.LOSS_DIVERGENCE)])  # no call in between
    assert [(a.kind, a.step, a.episode) for a in got] == [
        (K.EPISODE_END, 5, 1),
        (K.LOSS_DIVERGENCE, 40, 2),
    ]
    assert ep.observe(44, [alert(44, K.LOSS_DIVERGENCE)]) == []  # 4 steps apart: the same
    assert ep.current == 2


def test_ranges_beyond_the_cap_merge_the_closest() -> None:
    ep = Episodes(quiet_steps=5, max_ranges=3)
    for step in (0, 2, 4, 6, 10):
        ep.observe(step, [alert(step, K.LOSS_TREND_SPIKE)])
    (end,) = ep.close(11)
    # [0],[2],[4] -> +[6]: gaps 2,2,2, the first pair merges -> [0-2],[4],[6]; +[10]: gaps
    # 2,2,4 -> [0-4],[6],[10].
    assert end.details["steps"] == [[0, 4], [6, 6], [10, 10]]
    assert end.details["steps_merged"] is True and end.details["count"] == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quiet_steps": 0}, ValueError, "`quiet_steps` must be >= 1"),
        ({"quiet_steps": 2.5}, TypeError, "`quiet_steps` must be an int"),
        ({"max_ranges": 0}, ValueError, "`max_ranges` must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Episodes(**kwargs)


def _script(seed: int, n: int = 120) -> list[tuple[int, list[Alert], float | None]]:
    rng = random.Random(seed)
    kinds = [K.LOSS_SPIKE, K.LOSS_TREND_SPIKE, K.GRAD_NORM_RISE, K.TRANSIENT, K.WARMUP_EXTENDED]
    out = []
    for step in range(n):
        alerts = [alert(step, rng.choice(kinds)) for _ in range(rng.choice([0, 0, 0, 1, 2]))]
        out.append((step, alerts, rng.choice([None, rng.uniform(0.5, 20.0)])))
    return out


@pytest.mark.parametrize("cut", [7, 40, 77])
def test_an_open_episode_survives_a_state_round_trip(cut: int) -> None:
    script = _script(cut)
    original, restored = Episodes(quiet_steps=4), Episodes(quiet_steps=4)
    for step, alerts, ratio in script[:cut]:
        original.observe(step, alerts, ratio)
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    a = [[x.to_dict() for x in original.observe(*row)] for row in script[cut:]]
    b = [[x.to_dict() for x in restored.observe(*row)] for row in script[cut:]]
    assert a == b and any(a)
    assert [x.to_dict() for x in original.close(200)] == [x.to_dict() for x in restored.close(200)]


def test_a_malformed_state_loads_as_no_open_episode() -> None:
    ep = Episodes()
    ep.observe(1, [alert(1, K.LOSS_SPIKE)])
    ep.load_state_dict({"next_id": 4, "open": {"id": 3, "start": "x"}})
    assert ep.current is None
    assert ep.observe(9, [alert(9, K.LOSS_SPIKE)])[0].episode == 4
    ep.load_state_dict({})
    assert ep.state_dict() == Episodes().state_dict()


def test_a_long_excursion_above_ten_times_the_initial_loss_is_two_lines() -> None:
    """The demo's case: one long excursion, 150 alert lines today; every step still flagged."""
    rng = random.Random(0)
    losses = [4.0 * math.exp(rng.gauss(0, 0.02)) for _ in range(30)]
    losses += [4.0 * rng.uniform(12.0, 30.0) for _ in range(142)]  # above 10x for 142 steps
    losses += [3.0 * math.exp(rng.gauss(0, 0.02)) for _ in range(60)]
    det, ep = InstabilityDetector(), Episodes()
    raw: list[Alert] = []
    sent: list[Alert] = []
    for step, loss in enumerate(losses):
        alerts = det.update(step, loss)
        raw += alerts
        sent += ep.observe(step, alerts, det.loss_ratio(loss))
    sent += ep.close(len(losses))
    flagged_steps = sorted({a.step for a in raw if is_instability(a.kind)})
    assert len(raw) >= 142 and len(sent) * 10 <= len(raw)
    ends = [a for a in sent if a.kind == K.EPISODE_END]
    openings = [a for a in sent if a.episode is not None and a.kind != K.EPISODE_END]
    assert len(ends) == len(openings) >= 1
    # Nothing is lost: every flagged step, kind and the peak are in the summaries.
    covered = sorted(s for e in ends for a, b in e.details["steps"] for s in range(a, b + 1))
    assert covered == flagged_steps
    assert {k for e in ends for k in e.details["kinds"]} == {
        a.kind.value for a in raw if is_instability(a.kind)
    }
    peak = max(loss / det.initial_loss for loss in losses)  # type: ignore[operator]
    assert max(e.details["peak_ratio"] for e in ends) == pytest.approx(peak)


def test_an_episode_without_losses_ends_quiet_with_recovery_unknown() -> None:
    ep = Episodes(quiet_steps=3)
    ep.observe(1, [alert(1, K.LOSS_SPIKE)])
    (end,) = ep.observe(4, [])
    assert end.details["recovered"] is None and end.details["outcome"] == "ended_quiet"
    assert "ended quiet (no loss was seen after the last flagged step)" in end.message


def test_a_quiet_episode_at_the_initial_loss_did_not_recover() -> None:
    """Issue 20: a dead run (the loss sits at chance after a spike) printed "recovered"."""
    ep = Episodes(quiet_steps=4)
    for s in range(3):
        ep.observe(s, [], loss=2.30 - 0.01 * s, initial_loss=2.30)
    ep.observe(3, [alert(3, K.LOSS_SPIKE)], loss=40.0, initial_loss=2.30)
    out = [a for s in range(4, 8) for a in ep.observe(s, [], loss=2.3026, initial_loss=2.30)]
    (end,) = out
    assert end.details["recovered"] is False and end.details["outcome"] == "not_recovered"
    assert "not 5% below the initial loss (2.3): the run is not learning" in end.message
    assert " recovered" not in end.message.replace("did not recover", "")


def test_a_quiet_episode_whose_loss_came_back_has_the_outcome_recovered() -> None:
    ep = Episodes(quiet_steps=4)
    for s in range(3):
        ep.observe(s, [], loss=2.0 - 0.1 * s, initial_loss=2.0)
    ep.observe(3, [alert(3, K.LOSS_SPIKE)], loss=40.0, initial_loss=2.0)
    out = [a for s in range(4, 8) for a in ep.observe(s, [], loss=1.7, initial_loss=2.0)]
    (end,) = out
    assert (end.details["recovered"], end.details["outcome"]) == (True, "recovered")
    assert end.details["recovery"].startswith("their median loss (1.7) came back")
    assert "recovered" in end.message and "did not" not in end.message
