"""The warmup controller: the plan, the extension policy, the no-jump rule and its state.

Expected factors are written out from the documented rules (for ``linear``: the straight line
from the factor at the anchor step to 1 at the new last warmup update), never read off the
controller.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.controller import (
    DEFAULT_TRIGGER_KINDS,
    WarmupController,
    WarmupExhaustedError,
)
from warmup_monitor.schedules import SHAPES, max_increment, shape_params, shape_value

K = AlertKind

SEVERE = [K.LOSS_SPIKE, K.NON_FINITE]
# Documented as acting at once too (controller docstring, README "adaptive=True"): oscillation
# already means five flipped gradients in a row; edge_of_stability is a measured limit.
ALSO_AT_ONCE = [K.EDGE_OF_STABILITY]
REPEAT = [K.LOSS_TREND_SPIKE]
# Gradient-norm evidence counts only once a loss kind is in the episode.
WEAK = [K.GRAD_NORM_SPIKE, K.GRAD_NORM_RISE, K.PERSISTENT_INSTABILITY]
NEVER = [K.TRANSIENT, K.MONITOR, K.WARMUP_EXTENDED, K.WARMUP_EXHAUSTED]
# Gradient-norm spikes and rises are notices by default (issue 20: on the corpus of real runs
# they do not predict a worse outcome); a user who opts in gets the corroboration rules below.
NOTICES = [K.GRAD_NORM_SPIKE, K.GRAD_NORM_RISE, K.OSCILLATION]
WITH_GRAD = sorted(DEFAULT_TRIGGER_KINDS | {k.value for k in NOTICES})


def classic(*, warmup_steps: int, **kwargs: Any) -> WarmupController:
    """A controller with the first release's policy: no back-off, + W0 / 2 per extension, 3
    extensions, caps 4 W0, grace W0 // 4, window max(10, W0 // 5). The plan's mechanics are
    pinned with it; the defaults and the new policy are pinned apart (``test_defaults``,
    ``tests/test_adaptive.py``)."""
    w0 = warmup_steps
    base: dict[str, Any] = {
        "backoff": 1.0,
        "extend_steps": None if "extend_fraction" in kwargs else max(1, round(w0 / 2)),
        "max_extensions": 3,
        "max_warmup_steps": 4 * w0,
        "grace_steps": w0 // 4,
        "window_steps": max(10, w0 // 5),
    }
    return WarmupController(warmup_steps=w0, **{**base, **kwargs})


def alert(step: int, kind: AlertKind = K.LOSS_SPIKE) -> Alert:
    return Alert(step, kind, kind.value)


def lin(t: int, w: int) -> float:
    """pytorch_warmup's LinearWarmup: min(1, (t + 1) / W)."""
    return min(1.0, (t + 1) / w)


def line(t: int, a: int, fa: float, end: int) -> float:
    """The straight line from ``fa`` at step ``a`` to 1 at step ``end``, 1 after."""
    return min(1.0, fa + (1.0 - fa) * (t - a) / (end - a))


def run(
    c: WarmupController, events: dict[int, list[AlertKind]], steps: int, lag: int = 0
) -> tuple[list[float], list[Alert]]:
    """A training loop: the factor each update used, and the alerts the controller returned.
    The alerts of step ``t`` reach the controller after update ``t + lag``."""
    used, out = [], []
    for t in range(steps):
        used.append(c.factor(t))
        s = t - lag
        if s in events:
            out += c.observe(s, [alert(s, k) for k in events[s]], next_step=t + 1, lr=0.1)
    return used, out


def ext(alerts: list[Alert]) -> Alert:
    """The ``warmup_extended`` alert of an action (a back-off announces itself first)."""
    return next(a for a in alerts if a.kind == K.WARMUP_EXTENDED)


def kinds(alerts: list[Alert]) -> list[tuple[int, AlertKind]]:
    return [(a.step, a.kind) for a in alerts]


# ------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("shape", SHAPES)
def test_without_extensions_the_factor_is_the_shape(shape: str) -> None:
    c = WarmupController(warmup_steps=20, shape=shape)
    params = shape_params(shape, 20, {})
    expected = [shape_value(shape, float(t), 20, params) for t in range(50)]
    assert [c.factor(t) for t in range(50)] == expected
    assert [c.plan(t) for t in range(50)] == expected
    assert [c.base_factor(t) for t in range(50)] == expected
    assert c.owns_warmup
    assert c.in_warmup(19) and not c.in_warmup(20)
    assert c.full_lr_step == (20 if shape in ("exponential", "constant") else 19)


@pytest.mark.parametrize("shape", SHAPES)
def test_users_warmup_gives_factor_one_until_an_extension(shape: str) -> None:
    c = WarmupController(warmup_steps=20, shape=None, user_schedule=shape)
    assert not c.owns_warmup
    assert [c.factor(t) for t in range(60)] == [1.0] * 60
    assert [c.base_factor(t) for t in range(60)] == [1.0] * 60
    params = shape_params(shape, 20, {})
    assert [c.plan(t) for t in range(60)] == [
        shape_value(shape, float(t), 20, params) for t in range(60)
    ]


def test_the_docstring_example() -> None:
    c = WarmupController(warmup_steps=10)
    assert c.factor(4) == 0.5
    out = c.observe(4, [Alert(4, AlertKind.LOSS_SPIKE, "spike")])
    assert [a.kind.value for a in out] == ["lr_backoff", "warmup_extended"]
    # The defaults: back off to 0.25 (half of 0.5) at schedule time 1.5, warmup 10 -> 20, and
    # re-warm from there to 1 at step 19: 0.25 + 0.75 (t - 4) / 15.
    assert c.warmup_steps == 20 and c.factor(19) == 1.0
    assert c.factor(5) == pytest.approx(0.25 + 0.75 / 15)


def test_linear_extension_is_a_straight_line_with_documented_details() -> None:
    c = classic(warmup_steps=10)
    used, out = run(c, {4: [K.LOSS_SPIKE]}, 20)
    assert kinds(out) == [(4, K.WARMUP_EXTENDED)]
    # (t+1)/10 to step 4 (0.5), then the line from 0.5 to 1 at step 14 (= 15 - 1).
    expected = [lin(t, 10) for t in range(5)] + [line(t, 4, 0.5, 14) for t in range(5, 20)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[14:] == [1.0] * 6
    d = out[0].details
    assert (d["old_warmup_steps"], d["new_warmup_steps"], d["full_lr_step"]) == (10, 15, 14)
    assert (d["factor_before"], d["factor_after"], d["backoff"]) == (0.5, 0.5, False)
    assert d["next_factor"] == pytest.approx(0.55)
    assert d["causes"] == ["loss_spike"] and d["cause_steps"] == [4]
    assert d["anchor_step"] == 4 and (d["extensions"], d["max_extensions"]) == (1, 3)
    assert out[0].value == 15.0 and out[0].threshold == 40.0  # the new length, 4 W cap
    assert "from 10 to 15 steps" in out[0].message and "without a jump" in out[0].message
    assert "reaches the peak at step 14" in out[0].message
    assert c.warmup_steps == 15 and c.extensions == 1 and c.full_lr_step == 14
    assert c.in_warmup(14) and not c.in_warmup(15)
    json.dumps(out[0].to_dict(), allow_nan=False)  # what the JSONL sink writes


def test_the_pytorch_warmup_comparison() -> None:
    """Linear W = 100, an extension decided after the update at step 50 to W' = 200.

    pytorch_warmup's ``LinearWarmup`` computes min(1, (step + 1) / warmup_period): given a
    period of 200 mid-run, the update at step 51 would get 52 / 200 = 0.26 after 0.51 at step
    50, halving the lr at once. The controller continues from 0.51 to 1 at step 199.
    """
    c = classic(warmup_steps=100, extend_steps=100)
    assert c.factor(50) == pytest.approx(0.51)
    out = c.observe(50, [alert(50)], next_step=51)
    assert out[0].details["new_warmup_steps"] == 200 == c.warmup_steps
    assert lin(50, 100) == pytest.approx(0.51) and lin(51, 200) == pytest.approx(0.26)
    assert c.factor(51) >= c.factor(50)
    assert c.factor(51) > lin(51, 200) + 0.24  # the pytorch_warmup drop does not happen
    factors = [c.factor(t) for t in range(51, 260)]
    assert factors == pytest.approx([line(t, 50, 0.51, 199) for t in range(51, 260)], rel=1e-12)
    assert c.factor(198) < 1.0 and c.factor(199) == 1.0


@pytest.mark.parametrize(
    ("shape", "kw"),
    [("polynomial", {"power": 2}), ("geometric", {}), ("cosine", {}), ("smoothstep", {})],
)
def test_an_extension_never_raises_the_lr_of_a_convex_shape(shape: str, kw: dict) -> None:
    # A straight line from the current factor would overtake these shapes' slow start.
    c = classic(warmup_steps=100, shape=shape, shape_kwargs=kw)
    old = [c.factor(t) for t in range(300)]
    c.observe(10, [alert(10)])
    new = [c.factor(t) for t in range(300)]
    assert new[:11] == old[:11]
    assert all(n <= o + 1e-15 for n, o in zip(new, old, strict=True))
    assert new[50] < old[50]
    # The rest of the shape, stretched in time: schedule time 10 + 89 (t - 10) / 139 at step t.
    params = shape_params(shape, 100, kw)
    for t in (11, 60, 79, 148):
        u = 10 + (99 - 10) * (t - 10) / (149 - 10)
        assert new[t] == pytest.approx(shape_value(shape, u, 100, params), rel=1e-12)
    assert new[149:] == [1.0] * 151


def test_users_warmup_is_slowed_not_dropped() -> None:
    c = classic(warmup_steps=100, shape=None)
    used, out = run(c, {49: [K.LOSS_SPIKE]}, 200)
    assert used[:50] == [1.0] * 50
    user = [lin(t, 100) for t in range(200)]  # the user's own linear warmup
    effective = [u * f for u, f in zip(user, used, strict=True)]
    # The user's ramp, stretched from step 49 (0.5) to 1 at step 149: no drop, no jump.
    expected = user[:50] + [line(t, 49, 0.5, 149) for t in range(50, 200)]
    assert effective == pytest.approx(expected, rel=1e-12)
    assert all(0.0 < f <= 1.0 for f in used) and used[149:] == [1.0] * 51
    assert out[0].details["factor_before"] == 0.5 and out[0].details["backoff"] is False
    assert "warmup factor (fraction of the peak)" in out[0].message


def test_users_warmup_rewarms_from_rewarm_from_and_ramps_linearly_to_the_new_end() -> None:
    c = classic(warmup_steps=100, shape=None, rewarm_from=0.5)
    used, out = run(c, {79: [K.LOSS_SPIKE]}, 200)
    assert used[:80] == [1.0] * 80
    d = ext(out).details
    assert (d["factor_before"], d["factor_after"], d["backoff"]) == (0.8, 0.5, True)
    assert (d["old_warmup_steps"], d["new_warmup_steps"]) == (100, 150)
    user = [lin(t, 100) for t in range(200)]
    # The effective fraction of the peak lr: 0.5 + 0.5 (t - 79) / 70 from step 80, 1 at 149.
    expected = [line(t, 79, 0.5, 149) for t in range(80, 200)]
    effective = [u * f for u, f in zip(user[80:], used[80:], strict=True)]
    assert effective == pytest.approx(expected, rel=1e-12)
    assert used[80] == pytest.approx((0.5 + 0.5 / 70) / 0.81, rel=1e-12)
    assert used[149:] == [1.0] * 51


def test_users_warmup_rewarm_in_the_grace_window() -> None:
    c = classic(warmup_steps=100, shape=None, rewarm_from=0.5)  # grace 25
    used, out = run(c, {110: [K.NON_FINITE]}, 200)
    assert used[:111] == [1.0] * 111
    assert ext(out).details["new_warmup_steps"] == 161  # 110 + 1 + 50
    # The user's lr is at its peak: the factor itself ramps from 0.5 at the anchor to 1.
    assert used[111:] == pytest.approx([line(t, 110, 0.5, 160) for t in range(111, 200)])
    assert used[159] < 1.0 and used[160:] == [1.0] * 40


# ------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("kind", SEVERE + ALSO_AT_ONCE)
def test_severe_kinds_extend_at_once(kind: AlertKind) -> None:
    c = classic(warmup_steps=20, extend_steps=10)
    out = c.observe(4, [alert(4, kind)], next_step=5)
    assert kinds(out) == [(4, K.WARMUP_EXTENDED)]
    assert out[0].details["causes"] == [kind.value]
    assert c.warmup_steps == 30
    assert c.factor(5) == pytest.approx(line(5, 4, 0.25, 29), rel=1e-12)


@pytest.mark.parametrize("kind", REPEAT)
def test_one_step_spikes_must_repeat_within_the_window(kind: AlertKind) -> None:
    c = classic(warmup_steps=100)  # window max(10, 100 // 5) = 20, min_alerts 2
    assert c.window_steps == 20 and c.min_alerts == 2
    assert c.observe(10, [alert(10, kind)]) == []
    assert c.observe(30, [alert(30, kind)]) == []  # 20 steps later: outside the window
    out = c.observe(49, [alert(49, kind)])  # 19 steps after 30: inside
    assert kinds(out) == [(49, K.WARMUP_EXTENDED)]
    assert out[0].details["causes"] == [kind.value]
    assert out[0].details["cause_steps"] == [30, 49]


@pytest.mark.parametrize("kind", WEAK)
def test_gradient_norm_evidence_alone_never_acts(kind: AlertKind) -> None:
    # The grid's post_ln lr 3e-3 seed 0: the gradient norm falls to 0.36, bounces to 0.6-1.0
    # and the trend rule flags 20 steps in a row (persistent at the 5th); the loss is fine.
    c = classic(warmup_steps=100, cooldown_steps=0)
    assert all(c.observe(t, [alert(t, kind)]) == [] for t in range(19, 60))
    assert c.extensions == 0


@pytest.mark.parametrize("kind", WEAK)
def test_gradient_norm_evidence_counts_once_a_loss_kind_is_in_the_episode(
    kind: AlertKind,
) -> None:
    c = classic(warmup_steps=100, trigger_kinds=WITH_GRAD)
    assert c.observe(5, [alert(5, kind)]) == []
    assert c.observe(6, [alert(6, K.LOSS_TREND_SPIKE)]) == []
    out = c.observe(7, [alert(7, kind)])
    assert kinds(out) == [(7, K.WARMUP_EXTENDED)]
    assert out[0].details["onset_step"] == 5  # the episode began with the gradient


def test_the_window_counts_flagged_steps_not_alerts() -> None:
    c = classic(warmup_steps=100)
    # The same step fed twice, or two loss kinds at one step: one flagged step.
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []
    out = c.observe(6, [alert(6, K.LOSS_TREND_SPIKE)])
    assert kinds(out) == [(6, K.WARMUP_EXTENDED)]
    assert out[0].details["causes"] == ["loss_trend_spike"]
    assert out[0].details["cause_steps"] == [5, 6]
    assert out[0].details["onset_step"] == 5


def test_a_loss_kind_and_a_gradient_kind_on_one_step_act_at_once() -> None:
    # Two independent signals agree: no need to wait for a second step.
    c = classic(warmup_steps=100, trigger_kinds=WITH_GRAD)
    out = c.observe(5, [alert(5, K.LOSS_TREND_SPIKE), alert(5, K.GRAD_NORM_SPIKE)])
    assert kinds(out) == [(5, K.WARMUP_EXTENDED)]
    assert out[0].details["causes"] == ["grad_norm_spike", "loss_trend_spike"]
    # Two loss kinds on one step are one signal: they wait.
    d = classic(warmup_steps=100, trigger_kinds=["loss_trend_spike", "grad_norm_spike"])
    assert d.observe(5, [alert(5, K.LOSS_TREND_SPIKE), alert(5, K.LOSS_TREND_SPIKE)]) == []


def test_min_alerts_and_window_steps_are_honoured() -> None:
    c = classic(warmup_steps=100, min_alerts=3, window_steps=5, trigger_kinds=WITH_GRAD)
    assert c.observe(0, [alert(0, K.LOSS_TREND_SPIKE)]) == []
    assert c.observe(2, [alert(2, K.LOSS_TREND_SPIKE)]) == []
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []  # step 0 left the window
    out = c.observe(6, [alert(6, K.GRAD_NORM_SPIKE)])
    assert kinds(out) == [(6, K.WARMUP_EXTENDED)]
    assert out[0].details["cause_steps"] == [2, 5, 6]

    one = classic(warmup_steps=100, min_alerts=1)
    assert kinds(one.observe(3, [alert(3, K.LOSS_TREND_SPIKE)])) == [(3, K.WARMUP_EXTENDED)]


def test_a_severe_alert_acts_at_once_and_carries_the_flagged_steps_before_it() -> None:
    c = classic(warmup_steps=100)
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []
    out = c.observe(8, [alert(8, K.LOSS_SPIKE), alert(8, K.TRANSIENT)])
    # The causes are the kinds of the whole episode, since its onset at step 5.
    d = out[0].details
    assert d["causes"] == ["loss_spike", "loss_trend_spike"] and d["cause_steps"] == [5, 8]
    assert d["onset_step"] == 5


@pytest.mark.parametrize("kind", NEVER)
def test_informational_kinds_never_extend(kind: AlertKind) -> None:
    c = classic(warmup_steps=100, min_alerts=1, cooldown_steps=0)
    assert all(c.observe(t, [alert(t, kind)]) == [] for t in range(150))
    assert c.extensions == 0 and c.warmup_steps == 100 and not c.exhausted
    assert kind.value not in DEFAULT_TRIGGER_KINDS


def test_transient_does_not_count_towards_min_alerts() -> None:
    c = classic(warmup_steps=100)
    assert c.observe(5, [alert(5, K.TRANSIENT)]) == []
    assert c.observe(6, [alert(6, K.LOSS_TREND_SPIKE)]) == []
    assert c.observe(7, [alert(7, K.TRANSIENT)]) == []
    assert c.extensions == 0


def test_default_trigger_kinds() -> None:
    sustained = [K.LOSS_DIVERGENCE]
    assert {K(k) for k in DEFAULT_TRIGGER_KINDS} == set(
        SEVERE + ALSO_AT_ONCE + REPEAT + WEAK + sustained
    ) - set(NOTICES)
    # A user who opts in to oscillation gets it acting at once, as before.
    c = classic(warmup_steps=20, extend_steps=10, trigger_kinds=WITH_GRAD)
    assert kinds(c.observe(4, [alert(4, K.OSCILLATION)], next_step=5)) == [(4, K.WARMUP_EXTENDED)]


@pytest.mark.parametrize("kind", NOTICES)
def test_notices_never_act_by_default(kind: AlertKind) -> None:
    c = classic(warmup_steps=100, min_alerts=1, cooldown_steps=0)
    steps = range(150)
    assert all(c.observe(t, [alert(t, kind)]) == [] for t in steps)
    assert c.extensions == 0


def test_a_loss_divergence_acts_at_once() -> None:
    c = classic(warmup_steps=20)
    assert kinds(c.observe(4, [alert(4, K.LOSS_DIVERGENCE)])) == [(4, K.WARMUP_EXTENDED)]


def test_a_grad_norm_rise_alone_never_acts_but_corroborates_a_loss_kind() -> None:
    # Healthy SGD runs raise their gradient norm 3x over their first tens of steps (the grid's
    # stable ResNet cells flag grad_norm_rise on consecutive steps inside the grace window).
    c = classic(warmup_steps=20, cooldown_steps=0, trigger_kinds=WITH_GRAD)
    assert all(c.observe(t, [alert(t, K.GRAD_NORM_RISE)]) == [] for t in range(4, 12))
    assert c.extensions == 0
    both = [alert(12, K.GRAD_NORM_RISE), alert(12, K.LOSS_TREND_SPIKE)]
    assert kinds(c.observe(12, both)) == [(12, K.WARMUP_EXTENDED)]


def test_custom_trigger_kinds() -> None:
    c = classic(warmup_steps=100, trigger_kinds=[K.PERSISTENT_INSTABILITY])
    assert c.observe(3, [alert(3, K.LOSS_SPIKE), alert(3, K.NON_FINITE)]) == []
    assert c.observe(4, [alert(4, K.PERSISTENT_INSTABILITY)])[0].kind == K.WARMUP_EXTENDED
    with pytest.raises(ValueError, match=r"`AdaptiveWarmup\.trigger_kinds`"):
        classic(warmup_steps=100, trigger_kinds=["transient"])  # never instability evidence


def test_cooldown_one_spike_one_extension() -> None:
    c = classic(warmup_steps=100, cooldown_steps=10)
    burst = {t: [K.LOSS_SPIKE] for t in range(20, 30)}  # one spike flagged on 10 steps
    _, out = run(c, {**burst, 30: [K.LOSS_SPIKE]}, 60)
    # 21..29 are within 10 steps of the extension at 20; 30 is not.
    assert kinds(out) == [(20, K.WARMUP_EXTENDED), (30, K.WARMUP_EXTENDED)]
    assert [a.details["new_warmup_steps"] for a in out] == [150, 200]
    # Late alerts of steps at or before the last extension never act again.
    assert c.observe(30, [alert(30)]) == [] and c.observe(12, [alert(12)]) == []
    assert WarmupController(warmup_steps=100).cooldown_steps == 10  # max(5, W // 10)
    assert WarmupController(warmup_steps=20).cooldown_steps == 5


def test_cooldown_zero_still_needs_a_later_step() -> None:
    c = classic(warmup_steps=100, cooldown_steps=0)
    assert c.observe(10, [alert(10)])[0].kind == K.WARMUP_EXTENDED
    assert c.observe(10, [alert(10)]) == []
    assert c.observe(11, [alert(11)])[0].kind == K.WARMUP_EXTENDED


def test_non_severe_alerts_in_the_cooldown_do_not_count_later() -> None:
    c = classic(warmup_steps=100, cooldown_steps=10)
    c.observe(20, [alert(20)])
    assert c.observe(25, [alert(25, K.LOSS_TREND_SPIKE)]) == []  # in cooldown: not recorded
    assert c.observe(31, [alert(31, K.LOSS_TREND_SPIKE)]) == []  # only one flagged step
    assert c.observe(32, [alert(32, K.LOSS_TREND_SPIKE)])[0].details["cause_steps"] == [31, 32]


def test_caps_then_exactly_one_exhausted_alert_with_a_recommendation() -> None:
    c = classic(warmup_steps=20, extend_steps=10, max_extensions=2, cooldown_steps=3)
    events = {t: [K.LOSS_SPIKE] for t in (4, 9, 14, 18, 25)}
    used = []
    out: list[Alert] = []
    for t in range(60):
        used.append(c.factor(t))
        if t in events:
            # The effective lr of the update: a peak of 0.8 times the factor.
            out += c.observe(t, [alert(t)], next_step=t + 1, lr=0.8 * used[t])
    assert kinds(out) == [(4, K.WARMUP_EXTENDED), (9, K.WARMUP_EXTENDED), (14, K.WARMUP_EXHAUSTED)]
    assert [a.details["new_warmup_steps"] for a in out[:2]] == [30, 40]
    # 0.25 at step 4, the line to 1 at step 29 (0.4 at step 9), then the line to 1 at step 39.
    expected = (
        [lin(t, 20) for t in range(5)]
        + [line(t, 4, 0.25, 29) for t in range(5, 10)]
        + [line(t, 9, 0.4, 39) for t in range(10, 60)]
    )
    assert used == pytest.approx(expected, rel=1e-12)
    assert (c.warmup_steps, c.extensions, c.exhausted, c.stop_requested) == (40, 2, True, False)
    d = out[-1].details
    assert d["reason"] == "caps" and d["action"] == "warn" and d["causes"] == ["loss_spike"]
    assert (d["extensions"], d["max_extensions"], d["warmup_steps"]) == (2, 2, 40)
    # The lowest factor at which instability was acted on: 0.25 (step 4, lr 0.8 x 0.25 = 0.2).
    assert d["unstable_factor"] == pytest.approx(0.25)
    assert d["unstable_lr"] == pytest.approx(0.2)
    assert d["recommended_lr_factor"] == pytest.approx(0.125)
    assert d["recommended_lr"] == pytest.approx(0.1)
    message = out[-1].message
    # One value per point, and a recommendation that follows from it: half the lr that broke.
    assert "use a peak lr of at most 0.1 (half the lr 0.2 that broke)" in message
    # A longer warmup than the 40 steps this run reached, never the same length again.
    assert "a warmup longer than this run's 40 steps (at least 80)" in message
    assert "caps: 2 extensions" in message
    assert out[-1].value == 40.0 and out[-1].threshold == 80.0
    json.dumps(out[-1].to_dict(), allow_nan=False)


def test_max_extensions_zero_exhausts_at_the_first_instability() -> None:
    c = classic(warmup_steps=10, max_extensions=0)
    out = c.observe(2, [alert(2)])
    assert kinds(out) == [(2, K.WARMUP_EXHAUSTED)] and out[0].details["reason"] == "caps"
    assert out[0].details["recommended_lr"] is None  # lr unknown (NaN by default)
    assert [c.factor(t) for t in range(12)] == pytest.approx([lin(t, 10) for t in range(12)])


def test_max_warmup_steps_truncates_then_exhausts() -> None:
    c = classic(warmup_steps=10, max_warmup_steps=12, cooldown_steps=0)
    assert c.observe(1, [alert(1)])[0].details["new_warmup_steps"] == 12  # not 15
    assert [c.factor(t) for t in range(2, 14)] == pytest.approx(
        [line(t, 1, 0.2, 11) for t in range(2, 14)], rel=1e-12
    )
    out = c.observe(2, [alert(2)], lr=math.nan)
    assert kinds(out) == [(2, K.WARMUP_EXHAUSTED)] and out[0].details["reason"] == "caps"
    assert out[0].details["recommended_lr"] is None
    assert c.extensions == 1 and c.warmup_steps == 12


@pytest.mark.parametrize(("action", "stop"), [("warn", False), ("stop", True), ("raise", False)])
def test_on_exhausted_is_carried_and_stop_sets_stop_requested(action: Any, stop: bool) -> None:
    c = classic(warmup_steps=10, max_extensions=1, cooldown_steps=0, on_exhausted=action)
    assert c.observe(1, [alert(1)])[0].kind == K.WARMUP_EXTENDED
    assert not c.stop_requested
    out = c.observe(2, [alert(2)])
    assert out[0].kind == K.WARMUP_EXHAUSTED and out[0].details["action"] == action
    assert c.stop_requested is stop and c.exhausted
    # Exhausted: nothing more, whatever comes.
    assert all(c.observe(t, [alert(t, k)]) == [] for t in range(3, 20) for k in SEVERE)
    assert c.extensions == 1 and c.stop_requested is stop
    assert issubclass(WarmupExhaustedError, RuntimeError)


def test_grace_window_extends_with_a_rewarm_and_not_after_it() -> None:
    def make() -> WarmupController:
        return classic(warmup_steps=20, grace_steps=5, extend_steps=10, rewarm_from=0.5)

    last_in_grace = make()
    out = last_in_grace.observe(24, [alert(24)], next_step=25)
    assert kinds(out) == [(24, K.LR_BACKOFF), (24, K.WARMUP_EXTENDED)]
    d = out[1].details
    assert (d["old_warmup_steps"], d["new_warmup_steps"]) == (20, 35)  # 24 + 1 + 10
    assert (d["factor_before"], d["factor_after"], d["backoff"]) == (1.0, 0.5, True)
    assert "lowered from 1 to 0.5" in out[0].message and out[0].details == {
        **out[0].details,
        "factor_before": 1.0,
        "factor_after": 0.5,
    }
    # Re-warm from 0.5 at the linear shape's pace (1/20 per step): 1 at step 34.
    assert [last_in_grace.factor(t) for t in range(25, 40)] == pytest.approx(
        [line(t, 24, 0.5, 34) for t in range(25, 40)], rel=1e-12
    )

    after_grace = make()
    assert after_grace.observe(25, [alert(25)]) == []
    assert after_grace.observe(100, [alert(100)]) == []
    assert after_grace.extensions == 0 and not after_grace.exhausted
    assert WarmupController(warmup_steps=100).grace_steps == 100  # max(20, W)
    assert WarmupController(warmup_steps=4).grace_steps == 20


def test_grace_window_without_back_off_reports_exhaustion() -> None:
    c = classic(warmup_steps=20, grace_steps=5)
    out = c.observe(22, [alert(22)], lr=0.2)
    assert kinds(out) == [(22, K.WARMUP_EXHAUSTED)]
    d = out[0].details
    assert d["reason"] == "at_one" and c.extensions == 0
    assert d["unstable_factor"] == 1.0 and d["recommended_lr"] == pytest.approx(0.1)
    assert "backoff=0.5" in out[0].message and "use a peak lr of at most 0.1" in out[0].message
    assert c.observe(23, [alert(23)]) == []  # once
    assert [c.factor(t) for t in range(20, 30)] == [1.0] * 10


def test_grace_rewarm_is_lengthened_to_the_shapes_pace() -> None:
    c = classic(warmup_steps=100, grace_steps=20, rewarm_from=0.5)
    used, out = run(c, {105: [K.LOSS_SPIKE]}, 300)
    d = ext(out).details
    assert d["backoff"] is True and (d["factor_before"], d["factor_after"]) == (1.0, 0.5)
    # 105 + 1 + 50 = 156: ramping 0.5 -> 1 at 1/100 per step takes 50 steps, 106..155.
    assert c.warmup_steps == 156 and d["full_lr_step"] == 155
    assert used[:106] == [lin(t, 100) for t in range(106)]
    assert used[106:] == pytest.approx([line(t, 105, 0.5, 155) for t in range(106, 300)])


def test_backoff_lowers_the_current_factor_and_is_announced() -> None:
    c = classic(warmup_steps=100, backoff=0.5, extend_steps=1)
    used, out = run(c, {59: [K.LOSS_SPIKE]}, 300)
    d = ext(out).details
    assert d["factor_before"] == pytest.approx(0.6) and d["factor_after"] == pytest.approx(0.3)
    assert d["backoff"] is True and "back-off" in ext(out).message
    assert out[0].kind == K.LR_BACKOFF and "lowered from 0.6 to 0.3" in out[0].message
    # One requested step would make the re-warm 35x steeper than the shape: lengthened to
    # 59 + 70 + 1 = 130 steps, from 0.3 at step 59 to 1 at 129 (1/100 per step).
    assert c.warmup_steps == 130
    assert used[60:] == pytest.approx([line(t, 59, 0.3, 129) for t in range(60, 300)])
    increments = [b - a for a, b in itertools.pairwise(used)]
    assert max(increments) <= 1 / 100 + 1e-12
    assert [i for i, x in enumerate(increments) if x < 0] == [59]  # the one announced drop


def test_backoff_never_goes_below_the_first_factor() -> None:
    c = classic(warmup_steps=10, backoff=0.01)
    out = c.observe(4, [alert(4)])
    assert ext(out).details["factor_after"] == pytest.approx(0.1)  # the shape's first factor


def test_caps_limit_the_back_off_rather_than_the_pace() -> None:
    c = classic(warmup_steps=100, backoff=0.2, max_warmup_steps=110)
    used, out = run(c, {89: [K.LOSS_SPIKE]}, 200)
    d = ext(out).details
    # Room for 20 ramp steps (90..109) at the shape's pace of 1/100: restart from 0.8, not 0.18.
    assert c.warmup_steps == 110 and d["factor_after"] == pytest.approx(0.8)
    assert "no room to go down to 0.18" in out[0].message
    assert used[90:] == pytest.approx([line(t, 89, 0.8, 109) for t in range(90, 200)])


def test_extend_steps_overrides_the_fraction() -> None:
    c = classic(warmup_steps=100, extend_steps=7, extend_fraction=0.9)
    assert c.observe(3, [alert(3)])[0].details["new_warmup_steps"] == 107
    f = classic(warmup_steps=100, extend_fraction=0.25)
    assert f.observe(3, [alert(3)])[0].details["new_warmup_steps"] == 125


def test_not_adaptive_never_extends() -> None:
    c = classic(warmup_steps=10, shape="cosine", adaptive=False, min_alerts=1)
    every = {t: [K.LOSS_SPIKE, K.NON_FINITE, K.GRAD_NORM_SPIKE] for t in range(30)}
    used, out = run(c, every, 30)
    assert out == [] and c.warmup_steps == 10 and c.extensions == 0 and not c.exhausted
    assert used == pytest.approx([0.5 * (1 - math.cos(math.pi * lin(t, 10))) for t in range(30)])


def test_a_late_decision_continues_from_the_last_factor_applied() -> None:
    # check_every_n_steps: the alerts of step 4 arrive after update 7.
    c = classic(warmup_steps=10)
    used, out = run(c, {4: [K.LOSS_SPIKE]}, 20, lag=3)
    assert out[0].step == 4 and out[0].details["anchor_step"] == 7
    expected = [lin(t, 10) for t in range(8)] + [line(t, 7, 0.8, 14) for t in range(8, 20)]
    assert used == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("shape", "w0", "new_end", "end"),
    [("constant", 31, 47, 47), ("exponential", 31, 47, 47), ("linear", 32, 48, 47)],
)
def test_the_factor_is_one_at_the_announced_full_lr_step(
    shape: str, w0: int, new_end: int, end: int
) -> None:
    c = classic(warmup_steps=w0, shape=shape)  # extends by round(W0 / 2) = 16 steps
    out = c.observe(0, [alert(0)])
    assert out[0].details["new_warmup_steps"] == new_end
    assert out[0].details["full_lr_step"] == end == c.full_lr_step
    assert f"reaches the peak at step {end}" in out[0].message
    assert c.factor(end + 1) == 1.0
    assert c.factor(end) == 1.0


# ------------------------------------------------------------------------- the no-jump property


SHAPE_KW: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "exponential": st.one_of(st.just({}), st.fixed_dictionaries({"tau": st.floats(0.2, 100.0)})),
    "geometric": st.one_of(
        st.just({}), st.fixed_dictionaries({"start_factor": st.floats(1e-4, 1.0)})
    ),
    "polynomial": st.one_of(st.just({}), st.fixed_dictionaries({"power": st.floats(0.2, 6.0)})),
    "step": st.one_of(st.just({}), st.fixed_dictionaries({"stairs": st.integers(1, 12)})),
    "constant": st.one_of(st.just({}), st.fixed_dictionaries({"factor": st.floats(0.01, 1.0)})),
}
SHAPES_WITH_KW = st.sampled_from(SHAPES).flatmap(
    lambda s: st.tuples(st.just(s), SHAPE_KW.get(s, st.just({})))
)
EVENTS = st.lists(
    st.tuples(st.integers(0, 200), st.lists(st.sampled_from(list(K)), min_size=1, max_size=3)),
    max_size=20,
)
CONFIG = {
    "backoff": st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.1]),
    "rewarm": st.sampled_from([1.0, 1.0, 0.7, 0.3]),
    "extend_steps": st.one_of(st.none(), st.integers(1, 30)),
    "max_extensions": st.integers(0, 6),
    "room": st.one_of(st.none(), st.integers(0, 120)),
    "grace": st.integers(0, 30),
    "cooldown": st.integers(0, 8),
    "min_alerts": st.integers(1, 3),
    "lag": st.sampled_from([0, 0, 0, 1, 3]),  # alerts that reach the controller late
}


def make_controller(shape: str | None, user: str, kw: dict, w0: int, cfg: dict) -> Any:
    return WarmupController(
        warmup_steps=w0,
        shape=shape,
        user_schedule=user,
        shape_kwargs=kw,
        backoff=cfg["backoff"],
        rewarm_from=cfg["rewarm"],
        extend_steps=cfg["extend_steps"],
        max_extensions=cfg["max_extensions"],
        max_warmup_steps=None if cfg["room"] is None else w0 + cfg["room"],
        grace_steps=cfg["grace"],
        cooldown_steps=cfg["cooldown"],
        min_alerts=cfg["min_alerts"],
    )


@given(sk=SHAPES_WITH_KW, w0=st.integers(1, 60), events=EVENTS, **CONFIG)
@settings(max_examples=200, deadline=None)
def test_the_factor_never_jumps_up_and_drops_only_at_an_announced_back_off(
    sk: tuple[str, dict], w0: int, events: list[tuple[int, list[AlertKind]]], **cfg: Any
) -> None:
    shape, kw = sk
    c = make_controller(shape, shape, kw, w0, cfg)
    by_step: dict[int, list[AlertKind]] = {}
    for s, ks in events:
        by_step.setdefault(s, []).extend(ks)
    horizon = max(c.max_warmup_steps, 200) + cfg["grace"] + 5
    bound = max_increment(shape, w0, **kw) + 1e-9
    factors = [c.factor(0)]
    assert factors[0] <= bound  # the first factor counts as an increase from 0
    drops: set[int] = set()
    out: list[Alert] = []
    for t in range(horizon):
        s = t - cfg["lag"]  # the step whose alerts arrive after update t (lag 0: t itself)
        if s in by_step:
            ahead = [c.factor(x) for x in range(t + 1, horizon)]
            new = c.observe(s, [alert(s, k) for k in by_step[s]], next_step=t + 1)
            out += new
            # An extension never raises the factor anywhere ahead ...
            after = [c.factor(x) for x in range(t + 1, horizon)]
            assert all(a <= b + 1e-12 for a, b in zip(after, ahead, strict=True))
            for a in new:
                if a.kind == K.WARMUP_EXTENDED:
                    assert a.details["anchor_step"] == t
                    assert a.details["factor_before"] == factors[t]
                    if a.details["backoff"]:
                        drops.add(t)
        f = c.factor(t + 1)
        assert 0.0 < f <= 1.0
        if t + 1 >= c.full_lr_step:
            # 1 (or the ceiling) from the announced full-lr step on (test_the_factor_is_one_at_
            # the_announced_full_lr_step pins the rounding case).
            assert f == (1.0 if c.ceiling is None else min(1.0, c.ceiling))
        # ... and never rises in one step by more than the shape's own largest increase.
        assert f - factors[t] <= bound, (t, factors[t], f, bound)
        if f < factors[t]:
            assert t in drops  # only right after an extension that announced a back-off
        factors.append(f)
    if cfg["backoff"] == 1.0 and cfg["rewarm"] == 1.0:
        assert not drops
        assert all(b >= a for a, b in itertools.pairwise(factors))
    top = 1.0 if c.ceiling is None else c.ceiling
    assert factors[c.full_lr_step :] == [top] * (len(factors) - c.full_lr_step)
    ks = [a.kind for a in out]
    assert set(ks) <= {K.LR_BACKOFF, K.WARMUP_EXTENDED, K.WARMUP_EXHAUSTED}
    # Every drop is announced by an lr_backoff alert, right before its warmup_extended.
    for i, a in enumerate(out):
        if a.kind == K.LR_BACKOFF:
            assert out[i + 1].kind == K.WARMUP_EXTENDED and out[i + 1].details["backoff"]
        if a.kind == K.WARMUP_EXTENDED and a.details["backoff"]:
            assert out[i - 1].kind == K.LR_BACKOFF
    assert ks.count(K.WARMUP_EXHAUSTED) <= 1
    if K.WARMUP_EXHAUSTED in ks:
        assert ks[-1] == K.WARMUP_EXHAUSTED and c.exhausted
    assert ks.count(K.WARMUP_EXTENDED) == c.extensions <= cfg["max_extensions"]
    assert w0 <= c.warmup_steps <= c.max_warmup_steps
    for a in out:
        json.dumps(a.to_dict(), allow_nan=False)


@given(sk=SHAPES_WITH_KW, w0=st.integers(1, 60), events=EVENTS, **CONFIG)
@settings(max_examples=100, deadline=None)
def test_with_the_users_warmup_the_effective_ramp_never_jumps(
    sk: tuple[str, dict], w0: int, events: list[tuple[int, list[AlertKind]]], **cfg: Any
) -> None:
    user, kw = sk
    c = make_controller(None, user, kw, w0, cfg)
    by_step: dict[int, list[AlertKind]] = {}
    for s, ks in events:
        by_step.setdefault(s, []).extend(ks)
    horizon = max(c.max_warmup_steps, 200) + cfg["grace"] + 5
    params = shape_params(user, w0, kw)
    ramp = [shape_value(user, float(t), w0, params) for t in range(horizon + 1)]
    bound = max_increment(user, w0, **kw) + 1e-9
    extended = False
    effective = [ramp[0] * c.factor(0)]
    for t in range(horizon):
        s = t - cfg["lag"]
        if s in by_step:
            out = c.observe(s, [alert(s, k) for k in by_step[s]], next_step=t + 1)
            extended = extended or any(a.kind == K.WARMUP_EXTENDED for a in out)
        f = c.factor(t + 1)
        assert 0.0 < f <= 1.0
        if not extended:
            assert f == 1.0
        # The user's lr times the factor is the stretched plan.
        assert ramp[t + 1] * f == pytest.approx(c.plan(t + 1), rel=1e-9)
        effective.append(ramp[t + 1] * f)
        assert effective[-1] - effective[-2] <= bound
    if cfg["backoff"] == 1.0 and cfg["rewarm"] == 1.0:
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(effective))


# ------------------------------------------------------------------------- state


STATE_CASES: list[tuple[dict[str, Any], dict[int, list[AlertKind]]]] = [
    (
        {"warmup_steps": 20, "shape": "cosine", "backoff": 0.8, "cooldown_steps": 3},
        {3: [K.LOSS_SPIKE], 12: [K.LOSS_TREND_SPIKE], 14: [K.LOSS_TREND_SPIKE], 30: [K.NON_FINITE]},
    ),
    (
        {"warmup_steps": 30, "shape": None, "rewarm_from": 0.5, "max_extensions": 2},
        {5: [K.GRAD_NORM_SPIKE], 11: [K.GRAD_NORM_SPIKE], 25: [K.LOSS_SPIKE], 40: [K.OSCILLATION]},
    ),
    (
        {"warmup_steps": 10, "max_extensions": 1, "cooldown_steps": 1, "on_exhausted": "stop"},
        {2: [K.LOSS_SPIKE], 7: [K.LOSS_TREND_SPIKE], 8: [K.LOSS_TREND_SPIKE], 9: [K.NON_FINITE]},
    ),
]


@pytest.mark.parametrize(("kwargs", "events"), STATE_CASES)
@pytest.mark.parametrize("split", [1, 8, 13, 26])
def test_state_round_trip_mid_sequence(
    kwargs: dict[str, Any], events: dict[int, list[AlertKind]], split: int
) -> None:
    whole = WarmupController(**kwargs)
    used_whole, out_whole = run(whole, events, 60)

    first = WarmupController(**kwargs)
    used_a, out_a = run(first, {s: k for s, k in events.items() if s < split}, split)
    state = json.loads(json.dumps(first.state_dict()))  # primitives only
    second = WarmupController(**kwargs)
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    used_b, out_b = [], []
    for t in range(split, 60):
        used_b.append(second.factor(t))
        if t in events:
            out_b += second.observe(t, [alert(t, k) for k in events[t]], next_step=t + 1, lr=0.1)
    assert used_a + used_b == used_whole  # identical factors
    assert [a.to_dict() for a in out_a + out_b] == [a.to_dict() for a in out_whole]
    assert second.state_dict() == whole.state_dict()
    assert (second.warmup_steps, second.stop_requested) == (
        whole.warmup_steps,
        whole.stop_requested,
    )
    assert copy.deepcopy(whole).state_dict() == whole.state_dict()


def test_loading_an_empty_state_gives_the_initial_plan() -> None:
    c = classic(warmup_steps=10, shape="smoothstep", on_exhausted="stop")
    fresh = classic(warmup_steps=10, shape="smoothstep", on_exhausted="stop")
    c.observe(4, [alert(4)])
    c.observe(9, [alert(9, K.LOSS_TREND_SPIKE)])
    assert c.warmup_steps == 15
    c.load_state_dict({})
    assert c.state_dict() == fresh.state_dict()
    assert (c.warmup_steps, c.extensions, c.exhausted, c.stop_requested) == (10, 0, False, False)
    assert [c.factor(t) for t in range(15)] == [fresh.factor(t) for t in range(15)]
    assert c.factor(4) == pytest.approx(0.5)  # smoothstep at x = 1/2
    # And the decisions afterwards are a fresh controller's.
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []


def test_load_state_dict_tolerates_malformed_items() -> None:
    c = WarmupController(warmup_steps=10)
    c.load_state_dict(
        {
            "warmup_steps": 15,
            "segments": [[4, 4.0, 0.5], "bad", [2, "x", 1], [5, math.nan, 1.0], [3, 1.0, 1.0]],
            "unstable_lr": "nan",
            "recent": [4],
            "unknown_key_from_a_newer_version": 1,
        }
    )
    assert c.warmup_steps == 15 and c.factor(5) == pytest.approx(0.55)
    # Only the well-formed segment whose anchor does not go back is kept.
    assert c.state_dict()["segments"] == [[4, 4.0, 0.5]]
    assert c.state_dict()["unstable_lr"] is None
    c.load_state_dict({"warmup_steps": 3})  # never shorter than the configured W0
    assert c.warmup_steps == 10


@pytest.mark.parametrize(
    "bad",
    [
        {"warmup_steps": "abc"},
        {"warmup_steps": None},
        {"extensions": None},
        {"last_extension": "x"},
        {"recent": ["x"]},
        {"segments": 5},
    ],
    ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}",
)
def test_load_state_dict_keeps_initial_values_for_malformed_entries(bad: dict) -> None:
    c = WarmupController(warmup_steps=10)
    c.load_state_dict(bad)
    assert c.state_dict() == WarmupController(warmup_steps=10).state_dict()


def test_reset_returns_to_the_initial_plan() -> None:
    c = WarmupController(warmup_steps=10, on_exhausted="stop", max_extensions=0)
    c.observe(2, [alert(2)])
    assert c.exhausted and c.stop_requested
    c.reset()
    assert not c.exhausted and not c.stop_requested and c.warmup_steps == 10
    assert c.state_dict() == WarmupController(warmup_steps=10).state_dict()


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": 0}, ValueError, "`warmup_steps` must be >= 1, got 0"),
        ({"warmup_steps": 10.0}, TypeError, "`warmup_steps` must be an int"),
        ({"warmup_steps": True}, TypeError, "`warmup_steps` must be an int"),
        ({"shape": "sine"}, ValueError, "`schedule` must be one of 'linear'.*got 'sine'"),
        (
            {"shape": None, "user_schedule": "x"},
            ValueError,
            "`AdaptiveWarmup.user_schedule` must be one of",
        ),
        ({"shape_kwargs": {"tau": 3}}, ValueError, "shape 'linear' takes no keyword"),
        ({"shape": "exponential", "shape_kwargs": {"tau": -1}}, ValueError, "`tau` must be > 0"),
        (
            {"shape": None, "user_schedule": "step", "shape_kwargs": {"stairs": 0}},
            ValueError,
            "`stairs` must be >= 1",
        ),
        ({"shape_kwargs": [1]}, TypeError, "`schedule_kwargs` must be a dict"),
        ({"adaptive": 1}, TypeError, "`adaptive` must be an AdaptiveWarmup, True or False"),
        ({"extend_fraction": 0}, ValueError, "`AdaptiveWarmup.extend_fraction` must be > 0"),
        (
            {"extend_fraction": math.nan},
            ValueError,
            "`AdaptiveWarmup.extend_fraction` must be finite",
        ),
        ({"extend_fraction": "1"}, TypeError, "`AdaptiveWarmup.extend_fraction` must be a number"),
        ({"extend_steps": 0}, ValueError, "`AdaptiveWarmup.extend_steps` must be >= 1, got 0"),
        ({"extend_steps": 2.5}, TypeError, "`AdaptiveWarmup.extend_steps` must be an int"),
        ({"max_extensions": -1}, ValueError, "`AdaptiveWarmup.max_extensions` must be >= 0"),
        (
            {"max_warmup_steps": 5},
            ValueError,
            r"`AdaptiveWarmup.max_warmup_steps` must be >= warmup_steps \(10\), got 5",
        ),
        ({"max_warmup_steps": 20.0}, TypeError, "`AdaptiveWarmup.max_warmup_steps` must be an int"),
        ({"cooldown_steps": -1}, ValueError, "`AdaptiveWarmup.cooldown_steps` must be >= 0"),
        ({"grace_steps": -1}, ValueError, "`AdaptiveWarmup.grace_steps` must be >= 0"),
        ({"min_alerts": 0}, ValueError, "`AdaptiveWarmup.min_alerts` must be >= 1"),
        ({"window_steps": 0}, ValueError, "`AdaptiveWarmup.window_steps` must be >= 1"),
        ({"backoff": 1.5}, ValueError, r"`AdaptiveWarmup.backoff` must be in \(0, 1\], got 1.5"),
        ({"backoff": 0}, ValueError, r"`AdaptiveWarmup.backoff` must be in \(0, 1\]"),
        ({"backoff": "x"}, TypeError, "`AdaptiveWarmup.backoff` must be a number"),
        ({"rewarm_from": 2}, ValueError, r"`AdaptiveWarmup.rewarm_from` must be in \(0, 1\]"),
        ({"rewarm_from": 0.0}, ValueError, r"`AdaptiveWarmup.rewarm_from` must be in \(0, 1\]"),
        (
            {"on_exhausted": "panic"},
            ValueError,
            "`AdaptiveWarmup.on_exhausted` must be one of 'warn', 'stop'",
        ),
        (
            {"trigger_kinds": ["spike"]},
            ValueError,
            "`AdaptiveWarmup.trigger_kinds` must hold alert kinds",
        ),
        ({"trigger_kinds": ["warmup_extended"]}, ValueError, "can be evidence of instability"),
        ({"trigger_kinds": [K.WARMUP_EXHAUSTED]}, ValueError, "can be evidence of instability"),
        (
            {"trigger_kinds": "loss_spike"},
            TypeError,
            "`AdaptiveWarmup.trigger_kinds` must be a collection",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WarmupController(**{"warmup_steps": 10, **kwargs})


def test_defaults() -> None:
    c = WarmupController(warmup_steps=100)
    assert (c.shape, c.adaptive, c.extend_fraction, c.extend_steps) == ("linear", True, 1.0, None)
    assert (c.max_extensions, c.max_warmup_steps, c.min_alerts) == (4, 1000, 2)
    assert (c.backoff, c.rewarm_from, c.on_exhausted) == (0.5, 1.0, "warn")
    assert (c.grace_steps, c.window_steps, c.cooldown_steps) == (100, 50, 10)
    assert (c.rollback, c.snapshot_every_n_steps) == (True, 10)
    assert WarmupController(warmup_steps=7).window_steps == 20  # max(20, W // 2)
    assert WarmupController(warmup_steps=7).snapshot_every_n_steps == 1  # max(1, W // 10)


def test_instability_after_a_re_warm_keeps_the_lr_at_the_backed_off_level() -> None:
    # The grid's ResNet at peak lr 0.4: the peak itself is unstable, so re-warming to it breaks
    # again. The second back-off sets a ceiling: the factor stays at the level it lowered to,
    # through warmup and after it, and a resume keeps it.
    c = WarmupController(warmup_steps=10, shape="linear", cooldown_steps=0)
    assert c.backoff == 0.5
    first = c.observe(12, [alert(12, K.LOSS_SPIKE)])  # at the peak: 1.0 -> 0.5, re-warm
    assert c.ceiling is None and first[0].kind == K.LR_BACKOFF
    level = c.plan(20)  # re-warming: above 0.5
    assert 0.5 < level < 1.0
    second = c.observe(20, [alert(20, K.LOSS_SPIKE)])
    assert second[0].kind == K.LR_BACKOFF and "is held at" in second[0].message
    assert c.ceiling == pytest.approx(0.5 * level, rel=1e-12)
    assert second[0].details["ceiling"] == pytest.approx(0.5 * level, rel=1e-12)
    later = [c.factor(t) for t in range(21, 400)]
    assert max(later) == pytest.approx(0.5 * level, rel=1e-12) and later[-1] == max(later)
    again = WarmupController(warmup_steps=10, shape="linear", cooldown_steps=0)
    again.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert [again.factor(t) for t in range(21, 400)] == later
    # backoff=1.0 never lowers the lr, so it never sets a ceiling.
    flat = WarmupController(warmup_steps=10, shape="linear", cooldown_steps=0, backoff=1.0)
    for t in (3, 6):
        flat.observe(t, [alert(t, K.LOSS_SPIKE)])
    assert flat.extensions == 2 and flat.ceiling is None
