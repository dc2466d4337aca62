"""The warmup controller (plan, extension policy, no-jump rule, state) and LrFactor."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.controller import DEFAULT_TRIGGER_KINDS, WarmupController
from warmup_monitor.lr_factor import LrFactor
from warmup_monitor.schedules import SHAPES, full_at, shape_params, shape_value, warmup_factor

K = AlertKind


def alert(step: int, kind: AlertKind = K.LOSS_SPIKE) -> Alert:
    return Alert(step=step, kind=kind, message=kind.value, value=1.0, threshold=0.5)


def run(
    c: WarmupController, events: dict[int, list[AlertKind]], steps: int, lag: int = 0
) -> tuple[list[float], list[Alert]]:
    """A training loop: the factor each update used, and the alerts the controller returned.
    Alerts of step ``t`` reach the controller after update ``t + lag``."""
    used, out = [], []
    for t in range(steps):
        used.append(c.factor(t))
        s = t - lag
        if s in events:
            out += c.observe(s, [alert(s, k) for k in events[s]], next_step=t + 1, lr=0.1)
    return used, out


# ------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("shape", SHAPES)
def test_without_extensions_the_factor_is_the_shape(shape: str) -> None:
    c = WarmupController(warmup_steps=20, shape=shape)
    assert [c.factor(t) for t in range(50)] == [warmup_factor(shape, t, 20) for t in range(50)]
    user = WarmupController(warmup_steps=20, shape=None, user_shape=shape)
    assert [user.factor(t) for t in range(50)] == [1.0] * 50
    assert [user.plan(t) for t in range(50)] == [warmup_factor(shape, t, 20) for t in range(50)]
    assert c.in_warmup(19) and not c.in_warmup(20)
    assert c.full_lr_step == full_at(shape, 20)


def test_linear_extension_is_a_straight_line_from_the_factor_to_one() -> None:
    c = WarmupController(warmup_steps=10)
    used, out = run(c, {4: [K.LOSS_SPIKE]}, 20)
    assert [a.kind for a in out] == [K.WARMUP_EXTENDED]
    # Independent: (t+1)/10 to step 4 (0.5), then 0.5 + 0.5 (t - 4) / (15 - 1 - 4).
    expected = [(t + 1) / 10 for t in range(5)] + [
        min(1.0, 0.5 + 0.5 * (t - 4) / 10) for t in range(5, 20)
    ]
    assert used == pytest.approx(expected, rel=1e-12)
    d = out[0].details
    assert (d["old_warmup_steps"], d["new_warmup_steps"], d["full_lr_step"]) == (10, 15, 14)
    assert (d["factor_before"], d["factor_after"], d["backoff"]) == (0.5, 0.5, False)
    assert d["next_factor"] == pytest.approx(0.55)
    assert d["causes"] == ["loss_spike"] and d["cause_steps"] == [4]
    assert out[0].step == 4 and out[0].value == 15.0 and out[0].threshold == 40.0
    assert "from 10 to 15 steps" in out[0].message and "without a jump" in out[0].message
    assert c.warmup_steps == 15 and c.extensions == 1
    json.dumps(out[0].to_dict(), allow_nan=False)  # what the JSONL sink writes


@pytest.mark.parametrize(
    ("shape", "kw"),
    [("polynomial", {"power": 2}), ("geometric", {}), ("cosine", {}), ("smoothstep", {})],
)
def test_an_extension_never_raises_the_lr_of_a_convex_shape(shape: str, kw: dict) -> None:
    # A straight line from the current factor would overtake these shapes' slow start.
    c = WarmupController(warmup_steps=100, shape=shape, shape_kwargs=kw)
    old = [c.factor(t) for t in range(300)]
    c.observe(10, [alert(10)])
    new = [c.factor(t) for t in range(300)]
    assert new[:11] == old[:11]
    assert all(n <= o + 1e-15 for n, o in zip(new, old, strict=True))
    assert new[50] < old[50]
    # The rest of the shape, stretched: at the new end's midpoint the old shape's value at
    # the midpoint of the old remaining span (10 + 89/2 = 54.5).
    params = shape_params(shape, 100, kw)
    mid = 10 + (149 - 10) // 2
    u = 10 + (99 - 10) * (mid - 10) / (149 - 10)
    assert new[mid] == pytest.approx(shape_value(shape, u, 100, params), rel=1e-12)


def test_users_warmup_is_slowed_not_dropped() -> None:
    c = WarmupController(warmup_steps=100, shape=None)
    used, out = run(c, {49: [K.LOSS_SPIKE]}, 200)
    assert used[:50] == [1.0] * 50
    user = [min(1.0, (t + 1) / 100) for t in range(200)]  # the user's own linear warmup
    effective = [u * f for u, f in zip(user, used, strict=True)]
    # The user's ramp, stretched from step 49 (0.5) to 1 at step 149: no drop, no jump.
    expected = user[:50] + [min(1.0, 0.5 + 0.5 * (t - 49) / 100) for t in range(50, 200)]
    assert effective == pytest.approx(expected, rel=1e-12)
    assert all(0.0 < f <= 1.0 for f in used)
    assert out[0].details["factor_before"] == 0.5 and out[0].details["backoff"] is False
    assert "fraction of the peak lr" in out[0].message


# ------------------------------------------------------------------------- the policy


def test_one_step_spikes_must_repeat_within_the_window() -> None:
    c = WarmupController(warmup_steps=100)  # window max(10, 20) = 20, min_alerts 2
    assert c.observe(5, [alert(5, K.LOSS_TREND_SPIKE)]) == []
    assert c.observe(30, [alert(30, K.GRAD_NORM_SPIKE)]) == []  # 25 steps later: a new window
    out = c.observe(40, [alert(40, K.LOSS_TREND_SPIKE), alert(40, K.GRAD_NORM_SPIKE)])
    assert [a.kind for a in out] == [K.WARMUP_EXTENDED]
    assert out[0].details["causes"] == ["grad_norm_spike", "loss_trend_spike"]
    assert out[0].details["cause_steps"] == [30, 40]


@pytest.mark.parametrize(
    "kind",
    [K.LOSS_SPIKE, K.NON_FINITE, K.OSCILLATION, K.PERSISTENT_INSTABILITY, K.EDGE_OF_STABILITY],
)
def test_severe_kinds_act_alone(kind: AlertKind) -> None:
    c = WarmupController(warmup_steps=100)
    assert [a.kind for a in c.observe(5, [alert(5, kind)])] == [K.WARMUP_EXTENDED]


@pytest.mark.parametrize("kind", [K.TRANSIENT, K.MONITOR, K.WARMUP_EXTENDED, K.WARMUP_EXHAUSTED])
def test_informational_kinds_never_act(kind: AlertKind) -> None:
    c = WarmupController(warmup_steps=100, min_alerts=1)
    assert all(c.observe(t, [alert(t, kind)]) == [] for t in range(50))
    assert c.extensions == 0
    assert kind.value not in DEFAULT_TRIGGER_KINDS


def test_cooldown_one_burst_gives_one_extension() -> None:
    c = WarmupController(warmup_steps=100, cooldown_steps=10)
    burst = {t: [K.LOSS_SPIKE] for t in range(20, 29)}  # 9 flagged steps in a row
    _, out = run(c, {**burst, 40: [K.LOSS_SPIKE]}, 60)
    assert [(a.step, a.kind) for a in out] == [(20, K.WARMUP_EXTENDED), (40, K.WARMUP_EXTENDED)]
    # Late alerts of steps at or before the extension never act again.
    assert c.observe(39, [alert(39)]) == []


def test_instability_after_warmup_and_grace_is_ignored() -> None:
    c = WarmupController(warmup_steps=20, grace_steps=5)
    assert c.observe(25, [alert(25)]) == [] and not c.exhausted
    assert c.observe(100, [alert(100)]) == []


def test_grace_window_without_back_off_reports_exhaustion() -> None:
    c = WarmupController(warmup_steps=20, grace_steps=5)
    out = c.observe(22, [alert(22)], lr=0.2)
    assert [a.kind for a in out] == [K.WARMUP_EXHAUSTED]
    d = out[0].details
    assert d["reason"] == "at_one" and c.extensions == 0
    assert d["unstable_factor"] == 1.0 and d["recommended_lr"] == pytest.approx(0.1)
    assert "rewarm_from" in out[0].message and "lower the peak lr" in out[0].message
    assert c.observe(23, [alert(23)]) == []  # once


def test_grace_window_rewarm_drops_once_then_ramps_at_the_shapes_pace() -> None:
    c = WarmupController(warmup_steps=100, grace_steps=20, rewarm_from=0.5)
    used, out = run(c, {105: [K.LOSS_SPIKE]}, 300)
    d = out[0].details
    assert d["backoff"] is True and (d["factor_before"], d["factor_after"]) == (1.0, 0.5)
    assert "lowered from 1 to 0.5" in out[0].message
    # Lengthened past the requested 50 steps: ramping 0.5 -> 1 at 1/100 per step takes 50.
    assert c.warmup_steps == 156 and d["full_lr_step"] == 155
    assert used[:106] == [min(1.0, (t + 1) / 100) for t in range(106)]
    assert used[106:] == pytest.approx([min(1.0, 0.5 + (t - 105) / 100) for t in range(106, 300)])


def test_backoff_lowers_the_current_factor_and_is_announced() -> None:
    c = WarmupController(warmup_steps=100, backoff=0.5, extend_steps=1)
    used, out = run(c, {59: [K.LOSS_SPIKE]}, 300)
    d = out[0].details
    assert d["factor_before"] == pytest.approx(0.6) and d["factor_after"] == pytest.approx(0.3)
    # The requested single step would make the re-warm 35x steeper; it is lengthened instead.
    assert c.warmup_steps == 130
    increments = [b - a for a, b in itertools.pairwise(used)]
    assert max(increments) <= 1 / 100 + 1e-12
    assert used[60] == pytest.approx(0.31)  # the one drop, right after the extension
    assert [i for i, x in enumerate(increments) if x < 0] == [59]


def test_caps_limit_the_back_off_rather_than_the_pace() -> None:
    c = WarmupController(warmup_steps=100, backoff=0.2, max_warmup_steps=110)
    used, out = run(c, {89: [K.LOSS_SPIKE]}, 200)
    d = out[0].details
    # Room for 20 ramp steps (90..109) at the shape's pace of 1/100: restart from 0.8, not 0.18.
    assert c.warmup_steps == 110 and d["factor_after"] == pytest.approx(0.8)
    assert "no room to go down to 0.18" in out[0].message
    increments = [b - a for a, b in itertools.pairwise(used)]
    assert max(increments) <= 1 / 100 + 1e-12


def test_caps_then_exhaustion_with_a_recommendation() -> None:
    c = WarmupController(warmup_steps=10, max_extensions=2, cooldown_steps=1, on_exhausted="stop")
    _, out = run(
        c, {2: [K.LOSS_SPIKE], 4: [K.LOSS_SPIKE], 6: [K.NON_FINITE], 7: [K.LOSS_SPIKE]}, 30
    )
    assert [(a.step, a.kind) for a in out] == [
        (2, K.WARMUP_EXTENDED),
        (4, K.WARMUP_EXTENDED),
        (6, K.WARMUP_EXHAUSTED),
    ]
    assert (c.warmup_steps, c.extensions, c.exhausted, c.stop_requested) == (20, 2, True, True)
    d = out[-1].details
    assert d["reason"] == "caps" and d["action"] == "stop" and d["causes"] == ["non_finite"]
    # Lowest unstable factor: 0.3 at step 2 (lr 0.1 was passed as the effective lr there).
    assert d["unstable_factor"] == pytest.approx(0.3)
    assert d["recommended_lr_factor"] == pytest.approx(0.15)
    assert d["recommended_lr"] == pytest.approx(0.05)
    assert "lower the peak lr to about 0.15 x" in out[-1].message
    assert "at least 20 steps" in out[-1].message
    json.dumps(out[-1].to_dict(), allow_nan=False)


def test_max_warmup_steps_truncates_then_exhausts() -> None:
    c = WarmupController(warmup_steps=10, max_warmup_steps=12, cooldown_steps=0)
    assert c.observe(1, [alert(1)])[0].details["new_warmup_steps"] == 12
    out = c.observe(2, [alert(2)], lr=math.nan)
    assert out[0].kind == K.WARMUP_EXHAUSTED and out[0].details["recommended_lr"] is None
    assert c.stop_requested is False  # on_exhausted="warn"


def test_extend_steps_overrides_the_fraction() -> None:
    c = WarmupController(warmup_steps=100, extend_steps=7, extend_fraction=0.9)
    assert c.observe(3, [alert(3)])[0].details["new_warmup_steps"] == 107


def test_not_adaptive_never_extends() -> None:
    c = WarmupController(warmup_steps=10, shape="cosine", adaptive=False)
    _, out = run(c, {t: [K.LOSS_SPIKE] for t in range(20)}, 20)
    assert out == [] and c.warmup_steps == 10


def test_custom_trigger_kinds() -> None:
    c = WarmupController(warmup_steps=100, trigger_kinds=["persistent_instability"])
    assert c.observe(3, [alert(3, K.LOSS_SPIKE), alert(3, K.NON_FINITE)]) == []
    assert c.observe(4, [alert(4, K.PERSISTENT_INSTABILITY)])[0].kind == K.WARMUP_EXTENDED


def test_a_late_decision_continues_from_the_last_factor_applied() -> None:
    # check_every_n_steps: the alerts of step 4 arrive after update 7.
    c = WarmupController(warmup_steps=10)
    used, out = run(c, {4: [K.LOSS_SPIKE]}, 20, lag=3)
    assert out[0].step == 4 and out[0].details["anchor_step"] == 7
    expected = [(t + 1) / 10 for t in range(8)] + [
        min(1.0, 0.8 + 0.2 * (t - 7) / 7) for t in range(8, 20)
    ]
    assert used == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------- the no-jump property


@functools.cache
def own_increment(shape: str, w: int) -> float:
    """sup_x F(x + 1) - F(x) over real schedule times: a grid, then a local refinement."""
    params = shape_params(shape, w, {})

    def g(x: float) -> float:
        return shape_value(shape, x + 1.0, w, params) - shape_value(shape, x, w, params)

    grid = [-1.0 + i / 32 for i in range(32 * (full_at(shape, w) + 1) + 1)]
    best = max(grid, key=g)
    lo, hi = best - 1 / 32, best + 1 / 32
    for _ in range(80):  # ternary search: g is unimodal near a smooth maximum
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (m1, hi) if g(m1) < g(m2) else (lo, m2)
    return max(g(best), g(0.5 * (lo + hi)))


@given(
    shape=st.sampled_from(SHAPES),
    owned=st.booleans(),
    w0=st.integers(4, 60),
    backoff=st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.1]),
    rewarm=st.sampled_from([1.0, 1.0, 0.7, 0.3]),
    extend_steps=st.one_of(st.none(), st.integers(1, 30)),
    max_extensions=st.integers(0, 6),
    room=st.one_of(st.none(), st.integers(0, 120)),
    grace=st.integers(0, 30),
    cooldown=st.integers(0, 8),
    lag=st.integers(0, 3),
    events=st.lists(
        st.tuples(
            st.integers(0, 150),
            st.sampled_from([K.LOSS_SPIKE, K.LOSS_TREND_SPIKE, K.NON_FINITE, K.TRANSIENT]),
        ),
        max_size=15,
    ),
)
@settings(max_examples=150, deadline=None)
def test_the_factor_never_jumps_up_and_drops_only_on_an_announced_back_off(
    shape: str,
    owned: bool,
    w0: int,
    backoff: float,
    rewarm: float,
    extend_steps: int | None,
    max_extensions: int,
    room: int | None,
    grace: int,
    cooldown: int,
    lag: int,
    events: list[tuple[int, AlertKind]],
) -> None:
    c = WarmupController(
        warmup_steps=w0,
        shape=shape if owned else None,
        user_shape=shape,
        backoff=backoff,
        rewarm_from=rewarm,
        extend_steps=extend_steps,
        max_extensions=max_extensions,
        max_warmup_steps=None if room is None else w0 + room,
        grace_steps=grace,
        cooldown_steps=cooldown,
    )
    by_step: dict[int, list[AlertKind]] = {}
    for s, k in events:
        by_step.setdefault(s, []).append(k)
    horizon = max(c.max_warmup_steps, 160) + grace + 5
    params = shape_params(shape, w0, {})
    user = [shape_value(shape, float(t), w0, params) for t in range(horizon)]
    used, plan, drops, out = [], [], set(), []
    for t in range(horizon):
        f, p = c.factor(t), c.plan(t)
        assert 0.0 < f <= 1.0
        if owned:
            assert f == p
        else:
            assert f * user[t] == pytest.approx(p, rel=1e-9)  # the user's lr x f = the plan
        if t >= c.warmup_steps:
            assert p == 1.0
        used.append(f)
        plan.append(p)
        s = t - lag
        if s in by_step:
            before = [c.plan(x) for x in range(t + 1, horizon)]
            new = c.observe(s, [alert(s, k) for k in by_step[s]], next_step=t + 1)
            out += new
            after = [c.plan(x) for x in range(t + 1, horizon)]
            # An extension never raises the plan anywhere ahead.
            assert all(a <= b + 1e-12 for a, b in zip(after, before, strict=True))
            for a in new:
                if a.kind == K.WARMUP_EXTENDED:
                    assert a.details["anchor_step"] == t
                    assert a.details["factor_before"] == plan[t]
                    if a.details["backoff"]:
                        drops.add(t)

    bound = own_increment(shape, w0) * (1 + 1e-9) + 1e-12
    for t in range(horizon - 1):
        assert plan[t + 1] - plan[t] <= bound, (t, plan[t], plan[t + 1], bound)
        if plan[t + 1] < plan[t] - 1e-12:
            assert t in drops  # only right after an extension that announced a back-off
    if backoff == 1.0 and rewarm == 1.0:
        assert not drops
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(plan))
    kinds = [a.kind for a in out]
    assert kinds.count(K.WARMUP_EXHAUSTED) <= 1
    assert kinds.count(K.WARMUP_EXTENDED) == c.extensions <= max_extensions
    assert c.warmup_steps <= c.max_warmup_steps
    for a in out:
        json.dumps(a.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------- state


def test_state_round_trip_mid_sequence() -> None:
    events = {
        3: [K.LOSS_SPIKE],
        12: [K.LOSS_TREND_SPIKE],
        14: [K.LOSS_TREND_SPIKE],
        30: [K.NON_FINITE],
    }
    kwargs: dict[str, Any] = {
        "warmup_steps": 20,
        "shape": "cosine",
        "backoff": 0.8,
        "cooldown_steps": 3,
    }
    whole = WarmupController(**kwargs)
    used_whole, out_whole = run(whole, events, 60)

    first = WarmupController(**kwargs)
    used_a, out_a = run(first, {s: k for s, k in events.items() if s < 13}, 13)
    state = json.loads(json.dumps(first.state_dict()))  # primitives only
    second = WarmupController(**kwargs)
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    used_b, out_b = [], []
    for t in range(13, 60):
        used_b.append(second.factor(t))
        if t in events:
            out_b += second.observe(t, [alert(t, k) for k in events[t]], next_step=t + 1, lr=0.1)
    assert used_a + used_b == used_whole
    assert [a.to_dict() for a in out_a + out_b] == [a.to_dict() for a in out_whole]
    assert second.state_dict() == whole.state_dict()
    assert copy.deepcopy(whole).state_dict() == whole.state_dict()


def test_load_state_dict_tolerates_missing_and_malformed_entries() -> None:
    c = WarmupController(warmup_steps=10)
    c.observe(4, [alert(4)])
    c.load_state_dict({})
    assert (c.warmup_steps, c.extensions, c.exhausted) == (10, 0, False)
    assert [c.factor(t) for t in range(12)] == [warmup_factor("linear", t, 10) for t in range(12)]
    c.load_state_dict(
        {
            "warmup_steps": 15,
            "segments": [[4, 4.0, 0.5], "bad", [2, "x", 1], [5, math.nan, 1.0]],
            "unstable_lr": "nan",
            "recent": [4],
        }
    )
    assert c.warmup_steps == 15 and c.factor(5) == pytest.approx(0.55)
    assert c.state_dict()["segments"] == [[4, 4.0, 0.5]]
    assert c.state_dict()["unstable_lr"] is None


def test_reset_returns_to_the_initial_plan() -> None:
    c = WarmupController(warmup_steps=10, on_exhausted="stop", max_extensions=0)
    c.observe(2, [alert(2)])
    assert c.exhausted and c.stop_requested
    c.reset()
    assert not c.exhausted and not c.stop_requested and c.warmup_steps == 10


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": 0}, ValueError, "`warmup_steps` must be >= 1, got 0"),
        ({"warmup_steps": 10.0}, TypeError, "`warmup_steps` must be an int"),
        ({"shape": "sine"}, ValueError, "`shape` must be one of 'linear'"),
        ({"shape": None, "user_shape": "x"}, ValueError, "`user_shape` must be one of"),
        ({"shape_kwargs": {"tau": 3}}, ValueError, "shape 'linear' takes no keyword"),
        ({"shape_kwargs": [1]}, TypeError, "`shape_kwargs` must be a dict"),
        ({"adaptive": 1}, TypeError, "`adaptive` must be a bool"),
        ({"extend_fraction": 0}, ValueError, "`extend_fraction` must be > 0"),
        ({"extend_steps": 0}, ValueError, "`extend_steps` must be >= 1, got 0"),
        ({"max_extensions": -1}, ValueError, "`max_extensions` must be >= 0"),
        ({"max_warmup_steps": 5}, ValueError, "`max_warmup_steps` must be >= 10, got 5"),
        ({"cooldown_steps": -1}, ValueError, "`cooldown_steps` must be >= 0"),
        ({"grace_steps": -1}, ValueError, "`grace_steps` must be >= 0"),
        ({"min_alerts": 0}, ValueError, "`min_alerts` must be >= 1"),
        ({"window_steps": 0}, ValueError, "`window_steps` must be >= 1"),
        ({"backoff": 1.5}, ValueError, "`backoff` must be in \\(0, 1\\], got 1.5"),
        ({"backoff": 0}, ValueError, "`backoff` must be > 0"),
        ({"rewarm_from": 2}, ValueError, "`rewarm_from` must be in \\(0, 1\\]"),
        ({"on_exhausted": "panic"}, ValueError, "`on_exhausted` must be one of 'warn', 'stop'"),
        ({"trigger_kinds": ["spike"]}, ValueError, "`trigger_kinds` must hold alert kinds"),
        ({"trigger_kinds": ["warmup_extended"]}, ValueError, "the controller's own"),
        ({"trigger_kinds": "loss_spike"}, TypeError, "`trigger_kinds` must be a collection"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WarmupController(**{"warmup_steps": 10, **kwargs})


# ------------------------------------------------------------------------- LrFactor


def _loop(
    make_sched: Callable[[torch.optim.Optimizer], Any],
    factor: Callable[[int], float] | None,
    steps: int = 12,
) -> tuple[list[float], list[float]]:
    """SGD on loss = <c, w> (gradient c, constant): the scheduler's lr before each update, and
    the lr each update actually applied, read off the parameter change."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=0.3)
    sched = make_sched(opt)
    step = [0]
    hooks = None if factor is None else LrFactor(opt, lambda: factor(step[0]))
    sched_lrs, applied = [], []
    for t in range(steps):
        step[0] = t
        sched_lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        (w * c).sum().backward()
        before = w.detach().clone()
        opt.step()
        applied.append(float(((before - w.detach()) / c).mean()))
        sched.step()
    sched_lrs.append(opt.param_groups[0]["lr"])
    if hooks is not None:
        hooks.remove()
    return sched_lrs, applied


SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    "multiplicative": lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda t: 0.9),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_scheduler_never_sees_the_factor(name: str) -> None:
    controller = WarmupController(warmup_steps=6, shape="linear")
    controller.observe(2, [alert(2)])  # with an extension, for good measure
    plain_lrs, plain_applied = _loop(SCHEDULERS[name], None)
    lrs, applied = _loop(SCHEDULERS[name], controller.factor)
    assert lrs == plain_lrs  # bit for bit: no compounding
    assert plain_applied == pytest.approx(plain_lrs[:-1], rel=1e-12)
    expected = [lr * controller.factor(t) for t, lr in enumerate(plain_lrs[:-1])]
    assert applied == pytest.approx(expected, rel=1e-12)
    assert applied[0] < plain_applied[0]


def test_lr_factor_reports_scheduler_lrs_inside_the_step_and_removes_cleanly() -> None:
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [], "lr": 0.5}])
    hooks = LrFactor(opt, lambda: 0.1)
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append(([g["lr"] for g in o.param_groups], hooks.scheduler_lrs()))
    )
    w.grad = torch.ones(1)
    opt.step()
    assert seen == [([pytest.approx(0.1), pytest.approx(0.05)], [1.0, 0.5])]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5] and not hooks.active
    hooks.remove()
    hooks.remove()  # idempotent
    opt.step()
    assert w.item() == pytest.approx(-0.1 - 1.0)
    LrFactor(opt, lambda: 0.5).remove()  # a new one may attach after remove()


def test_factor_one_touches_nothing_and_a_second_lr_factor_is_refused() -> None:
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.7)
    lr_object = opt.param_groups[0]["lr"]
    hooks = LrFactor(opt, lambda: 1.0)
    w.grad = torch.ones(1)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr_object
    with pytest.raises(ValueError, match="already has an LrFactor"):
        LrFactor(opt, lambda: 0.5)
    hooks.remove()


def test_a_step_that_raises_does_not_leave_the_factor_in_place() -> None:
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    hooks = LrFactor(opt, lambda: 0.5)

    def failing_closure() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure)  # the post-hook never runs
    assert opt.param_groups[0]["lr"] == 0.5 and hooks.active
    w.grad = torch.ones(1)
    opt.step()  # restores 1.0 first, then applies 0.5 to it: not 0.25
    assert w.item() == pytest.approx(-0.5) and opt.param_groups[0]["lr"] == 1.0
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure)
    hooks.remove()  # restores too
    assert opt.param_groups[0]["lr"] == 1.0


def test_bad_factors_and_arguments() -> None:
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer"):
        LrFactor(object(), lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`factor` must be callable"):
        LrFactor(opt, 0.5)  # type: ignore[arg-type]
    hooks = LrFactor(opt, lambda: math.nan)
    w.grad = torch.ones(1)
    with pytest.raises(ValueError, match="the lr factor must be finite and > 0, got nan"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 1.0
    hooks.remove()


def test_tensor_lr_is_scaled_and_the_original_tensor_put_back() -> None:
    w = torch.zeros(2, requires_grad=True)
    lr = torch.tensor(0.4)
    opt = torch.optim.Adam([w], lr=lr)
    hooks = LrFactor(opt, lambda: 0.5)
    w.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.4)
    assert w.detach() == pytest.approx(torch.full((2,), -0.2), rel=1e-4)  # Adam's first step: lr
    assert hooks.scheduler_lrs() == [pytest.approx(0.4)]
    hooks.remove()
