"""The detectors: exact alerts on scripted sequences, state round trips, and odd input."""

from __future__ import annotations

import doctest
import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmup_monitor import detectors
from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind, is_instability
from warmup_monitor.detectors import (
    GradNormSpikeDetector,
    InstabilityDetector,
    LossRatioDetector,
    LossTrendDetector,
    NonFiniteDetector,
    OscillationDetector,
    PersistenceDetector,
)

NAN, INF = math.nan, math.inf


def kinds(alerts: list[Alert]) -> list[str]:
    return [AlertKind(a.kind).value for a in alerts]


def feed(
    det: InstabilityDetector, losses: Sequence[float | None], **kw: Any
) -> list[tuple[int, str]]:
    out = []
    for step, loss in enumerate(losses):
        out += [(step, kind) for kind in kinds(det.update(step, loss, **kw))]
    return out


def power_law(n: int, l0: float = 8.0, tau: float = 5.0, p: float = 1.0) -> list[float]:
    """A noise-free, steeply falling loss: ``0.5 + (l0 - 0.5) * (1 + t / tau) ** -p``."""
    return [0.5 + (l0 - 0.5) * (1 + t / tau) ** -p for t in range(n)]


# ------------------------------------------------------------------------------ the 10x rule


@pytest.mark.parametrize(("factor", "expected"), [(10.5, 1), (9.5, 0)])
def test_ten_x_rule_contract(factor: float, expected: int) -> None:
    det = InstabilityDetector()
    losses = [1.0] * 5 + [factor] + [1.0] * 3
    spikes = [(s, k) for s, k in feed(det, losses) if k == "loss_spike"]
    assert spikes == [(5, "loss_spike")] * expected


def test_loss_ratio_detector_initial_loss_and_exact_alert() -> None:
    rule = LossRatioDetector(spike_factor=4.0, initial_loss_steps=2)
    assert rule.update(0, 1.0) is None
    assert rule.update(1, NAN) is None  # not finite: not part of the initial loss
    assert rule.initial_loss is None
    assert rule.update(2, 3.0) is None
    assert rule.initial_loss == 2.0
    assert rule.loss_ratio(5.0) == 2.5
    assert rule.update(3, 8.0) is None  # 8 = 4 x 2 is not above
    alert = rule.update(4, 9.0)
    assert alert is not None
    assert (alert.step, alert.kind, alert.value, alert.threshold) == (4, "loss_spike", 9.0, 8.0)
    assert alert.details == {"initial_loss": 2.0, "loss_ratio": 4.5}


# ------------------------------------------------------------------------------ trend spikes


def test_trend_spike_fires_from_the_second_update() -> None:
    rule = LossTrendDetector()
    assert rule.update(0, 1.0) is None
    alert = rule.update(1, 2.5)
    assert alert is not None
    assert (alert.step, alert.kind, alert.value) == (1, "loss_trend_spike", 2.5)
    # A constant loss has no spread: the floor of 2x the trend decides.
    assert alert.threshold == pytest.approx(2.0)
    assert alert.details["trend"] == pytest.approx(1.0)
    assert alert.details["ratio_to_trend"] == pytest.approx(2.5)


def test_trend_spike_exact_alerts_on_a_steep_power_law() -> None:
    losses = power_law(60)
    assert feed(InstabilityDetector(), losses) == []  # the steep fall is not a spike
    spiky = list(losses)
    spiky[3] = 3.0 * losses[3]  # during the steepest part of the fall
    spiky[30] = 1.9 * losses[30]  # under the 2x floor
    spiky[40] = 2.2 * losses[40]
    assert feed(InstabilityDetector(), spiky) == [
        (3, "loss_trend_spike"),
        (4, "transient"),
        (40, "loss_trend_spike"),
        (41, "transient"),
    ]


def test_a_spike_does_not_move_the_running_statistics() -> None:
    rule = LossTrendDetector()
    for step, loss in enumerate(power_law(20)):
        rule.update(step, loss)
    before = rule.state_dict()
    assert rule.update(20, 1e6) is not None
    after = rule.state_dict()
    assert after.pop("above") == 1
    before.pop("above")
    assert after == before


def test_trend_accepts_a_new_level_after_rebaseline_steps() -> None:
    rule = LossTrendDetector(rebaseline_steps=3)
    steps = [s for s, v in enumerate([1.0] * 5 + [5.0] * 8) if rule.update(s, v) is not None]
    assert steps == [5, 6, 7]


def test_trend_follows_a_sustained_drop_at_once() -> None:
    rule = LossTrendDetector()
    for step, loss in enumerate([10.0] * 5 + [1.0] * 5):
        assert rule.update(step, loss) is None
    # Restarted at the lower level: 2.5 is now a spike.
    alert = rule.update(10, 2.5)
    assert alert is not None and alert.details["trend"] == pytest.approx(1.0)


def test_trend_ignores_values_it_cannot_use() -> None:
    rule = LossTrendDetector()
    for step, value in enumerate([None, NAN, INF, -INF, 0.0, -3.0]):
        assert rule.update(step, value) is None
    assert rule.state_dict() == LossTrendDetector().state_dict()


def test_grad_norm_spike_follows_a_rising_trend() -> None:
    rule = GradNormSpikeDetector()
    norms = [0.1 * 1.05**t for t in range(40)]  # grows while the lr warms up
    assert [rule.update(t, g) for t, g in enumerate(norms)] == [None] * 40
    assert rule.update(40, 2.5 * 0.1 * 1.05**40) is None  # under the 3x floor
    alert = rule.update(41, 4.0 * 0.1 * 1.05**41)
    assert alert is not None and alert.kind == "grad_norm_spike"
    # The 2.5x step was clipped at 3 sigma in the forecast: it moved the trend only a little.
    assert 3.5 < alert.details["ratio_to_trend"] < 4.0


# ------------------------------------------------------------------------------ other rules


def test_non_finite_names_what_was_not_finite() -> None:
    rule = NonFiniteDetector()
    assert rule.update(0, 1.0, 2.0) is None
    alert = rule.update(1, NAN, INF)
    assert alert is not None
    assert alert.message == "non-finite values: loss is nan and gradient norm is inf"
    assert alert.details == {"loss": "nan", "gradient_norm": "inf"}


def test_oscillation_needs_a_sustained_negative_cosine() -> None:
    rule = OscillationDetector(steps=3)
    cosines: list[float | None] = [-0.9, -0.9, None, -0.9, -0.8, 0.1, -0.6, -0.6, -0.2, -0.7]
    fired = [(s, rule.update(s, c)) for s, c in enumerate(cosines)]
    hits = [(s, a.value) for s, a in fired if a is not None]
    # Step 3: the 3rd negative cosine (None is no evidence); step 4: still; step 5 breaks it;
    # steps 6-8 average -0.47 (> -0.5); steps 7-9 average -0.5 (not below).
    assert [s for s, _ in hits] == [3, 4]
    assert hits[0][1] == pytest.approx(-0.9)
    assert hits[1][1] == pytest.approx(-2.6 / 3)
    assert rule.update(10, -1.5) is not None  # clamped to -1: (-0.2 - 0.7 - 1) / 3 < -0.5


def test_persistence_transient_persistent_and_repeated() -> None:
    rule = PersistenceDetector(persist_steps=3, repeat_count=3, repeat_window=20)
    flags: list[bool | None] = [False, True, False, None, True, True, True, True, False]
    out = [(s, rule.update(s, f)) for s, f in enumerate(flags)]
    got = [(s, a.kind.value, a.details.get("reason")) for s, a in out if a is not None]
    assert got == [(2, "transient", None), (6, "persistent_instability", "persisted")]

    rule = PersistenceDetector(persist_steps=5, repeat_count=3, repeat_window=20)
    flags = [True, False, True, False, False, True, False, *[False] * 30, True, False]
    out = [(s, rule.update(s, f)) for s, f in enumerate(flags)]
    got = [(s, a.kind.value, a.details.get("reason")) for s, a in out if a is not None]
    # The 3rd episode within 20 steps repeats: no transient for it; step 37 is far after.
    assert got == [
        (1, "transient", None),
        (3, "transient", None),
        (5, "persistent_instability", "repeated"),
        (38, "transient", None),
    ]


def test_persistence_raises_at_most_once_per_window() -> None:
    rule = PersistenceDetector(persist_steps=2, repeat_count=2, repeat_window=10)
    flags = [True] * 25 + [False, True, False]
    out = [(s, rule.update(s, f)) for s, f in enumerate(flags)]
    assert [(s, a.kind.value) for s, a in out if a is not None] == [
        (1, "persistent_instability"),
        (11, "persistent_instability"),
        (21, "persistent_instability"),
    ]  # the episode at 26 belongs to the one raised at 21: neither raised nor transient


def test_composite_exact_alerts() -> None:
    det = InstabilityDetector()
    losses: list[float | None] = [4.0, 3.0, 2.5, 50.0, 2.2, None, 2.0]
    losses += [30.0] * 5 + [1.8, 1.7]
    assert feed(det, losses) == [
        (3, "loss_spike"),
        (3, "loss_trend_spike"),
        (4, "transient"),
        (7, "loss_trend_spike"),
        (8, "loss_trend_spike"),
        (9, "loss_trend_spike"),
        (10, "loss_trend_spike"),
        (11, "loss_trend_spike"),
        (11, "persistent_instability"),
    ]


def test_composite_reads_grad_norm_and_cosine() -> None:
    det = InstabilityDetector()
    out = []
    for step in range(12):
        grad_norm = 100.0 if step == 6 else (INF if step == 9 else 1.0)
        cosine = -0.9 if 0 <= step <= 4 else 0.3
        out += [(step, k) for k in kinds(det.update(step, 1.0, grad_norm, cosine))]
    assert out == [
        (4, "oscillation"),
        (5, "transient"),
        (6, "grad_norm_spike"),
        (7, "transient"),
        (9, "non_finite"),
        (9, "persistent_instability"),  # the third episode within 100 steps
    ]


def test_rules_turn_off_and_thresholds_apply() -> None:
    off = InstabilityDetector(
        loss_spike=False,
        loss_trend_spike=False,
        grad_norm_spike=False,
        non_finite=False,
        oscillation=False,
        persistence=False,
    )
    for step in range(8):
        assert off.update(step, [1.0, 50.0, NAN][step % 3], INF, -1.0) == []
    assert off.initial_loss == 1.0  # the initial loss is still kept for loss_ratio
    assert off.loss_ratio(3.0) == 3.0
    strict = InstabilityDetector(trend_min_ratio=1.5, persistence=False)
    assert feed(strict, [1.0] * 5 + [1.6]) == [(5, "loss_trend_spike")]
    assert feed(InstabilityDetector(persistence=False), [1.0] * 5 + [1.6]) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spike_factor": 1.0}, ValueError, "`Detection.spike_factor` must be > 1"),
        ({"initial_loss_steps": 0}, ValueError, "`Detection.initial_loss_steps` must be >= 1"),
        ({"loss_trend_spike": 1}, TypeError, "`Detection.loss_trend_spike` must be a bool"),
        ({"persistence": "yes"}, TypeError, "`Detection.persistence` must be a bool"),
        ({"trend_sigmas": 0.0}, ValueError, "`Detection.trend_sigmas` must be > 0"),
        ({"trend_min_ratio": 0.5}, ValueError, "`Detection.trend_min_ratio` must be > 1"),
        (
            {"grad_norm_min_ratio": NAN},
            ValueError,
            "`Detection.grad_norm_min_ratio` must be finite",
        ),
        ({"grad_norm_sigmas": "8"}, TypeError, "`Detection.grad_norm_sigmas` must be a number"),
        (
            {"oscillation_cosine": 0.1},
            ValueError,
            r"`Detection.oscillation_cosine` must be in \[-1, 0\)",
        ),
        ({"oscillation_cosine": -2.0}, ValueError, "`Detection.oscillation_cosine` must be >= -1"),
        ({"oscillation_steps": 0}, ValueError, "`Detection.oscillation_steps` must be >= 1"),
        ({"persist_steps": 1.5}, TypeError, "`Detection.persist_steps` must be an int"),
        ({"repeat_count": 1}, ValueError, "`Detection.repeat_count` must be >= 2"),
        ({"repeat_window": 0}, ValueError, "`Detection.repeat_window` must be >= 1"),
        ({"rebaseline_steps": 0}, ValueError, "`Detection.rebaseline_steps` must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        InstabilityDetector(**kwargs)


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        InstabilityDetector(10.0)  # type: ignore[call-arg]


def test_instability_kinds() -> None:
    assert AlertKind.LOSS_TREND_SPIKE.is_instability
    assert AlertKind.PERSISTENT_INSTABILITY.is_instability
    assert not AlertKind.TRANSIENT.is_instability
    assert not AlertKind.WARMUP_EXTENDED.is_instability
    assert is_instability("oscillation") and not is_instability("transient")
    assert not is_instability("a_future_kind")
    assert AlertKind.MONITOR not in INSTABILITY_KINDS


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(detectors, verbose=False)
    assert tried > 0 and failures == 0


# ------------------------------------------------------------------------------ state


def _primitives(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            yield from _primitives(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _primitives(v)
    else:
        assert obj is None or isinstance(obj, (bool, int, float, str)), type(obj)
        yield obj


def _noisy(n: int, seed: int) -> list[tuple[float | None, float | None, float | None]]:
    """A deterministic, varied sequence with spikes, gaps and odd values."""
    import random

    rng = random.Random(seed)
    out: list[tuple[float | None, float | None, float | None]] = []
    for t in range(n):
        loss = (0.5 + 7.5 / (1 + t / 5)) * math.exp(rng.gauss(0, 0.05))
        grad = (1.0 + 0.02 * t) * math.exp(rng.gauss(0, 0.1))
        cos = rng.uniform(-1, 1) if t % 17 < 10 else -0.9
        if rng.random() < 0.08:
            loss *= rng.choice([3.0, 20.0, 0.1])
        if rng.random() < 0.05:
            grad *= 10
        out.append(
            (
                rng.choice([loss, loss, loss, None, NAN]) if t % 23 == 0 else loss,
                rng.choice([grad, INF]) if t % 29 == 0 else grad,
                None if t % 13 == 0 else cos,
            )
        )
    return out


Factory = Callable[[], Any]
Feed = Callable[[Any, int, tuple[float | None, float | None, float | None]], Any]

DETECTORS: dict[str, tuple[Factory, Feed]] = {
    "composite": (InstabilityDetector, lambda d, s, v: d.update(s, *v)),
    "loss_ratio": (
        lambda: LossRatioDetector(initial_loss_steps=3),
        lambda d, s, v: d.update(s, v[0]),
    ),
    "loss_trend": (LossTrendDetector, lambda d, s, v: d.update(s, v[0])),
    "grad_norm": (GradNormSpikeDetector, lambda d, s, v: d.update(s, v[1])),
    "non_finite": (NonFiniteDetector, lambda d, s, v: d.update(s, v[0], v[1])),
    "oscillation": (OscillationDetector, lambda d, s, v: d.update(s, v[2])),
    "persistence": (
        lambda: PersistenceDetector(persist_steps=3, repeat_window=30),
        lambda d, s, v: d.update(s, None if v[0] is None else (v[0] > 4 or v[2] == -0.9)),
    ),
}


def _decisions(result: Any) -> list[dict[str, Any]]:
    alerts = result if isinstance(result, list) else ([] if result is None else [result])
    return [a.to_dict() for a in alerts]


@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("cut", [1, 37, 120])
def test_state_round_trip_mid_sequence(name: str, cut: int) -> None:
    make, step_fn = DETECTORS[name]
    seq = _noisy(200, seed=cut)
    original = make()
    for s, v in enumerate(seq[:cut]):
        step_fn(original, s, v)
    state = original.state_dict()
    assert list(_primitives(state)) is not None
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(state)))  # primitives only, JSON-safe
    assert restored.state_dict() == state
    a = [_decisions(step_fn(original, s, v)) for s, v in enumerate(seq[cut:], start=cut)]
    b = [_decisions(step_fn(restored, s, v)) for s, v in enumerate(seq[cut:], start=cut)]
    assert a == b
    if name in ("composite", "loss_trend", "persistence"):
        assert any(a), "the sequence should raise alerts after the cut"


@pytest.mark.parametrize("name", list(DETECTORS))
def test_missing_keys_load_as_fresh_and_reset_is_fresh(name: str) -> None:
    make, step_fn = DETECTORS[name]
    fresh = make().state_dict()
    det = make()
    for s, v in enumerate(_noisy(50, seed=1)):
        step_fn(det, s, v)
    det.load_state_dict({})
    assert det.state_dict() == fresh
    for s, v in enumerate(_noisy(50, seed=1)):
        step_fn(det, s, v)
    det.reset()
    assert det.state_dict() == fresh


def test_composite_state_keeps_the_initial_loss() -> None:
    det = InstabilityDetector(initial_loss_steps=2)
    det.update(0, 2.0)
    det.update(1, 4.0)
    restored = InstabilityDetector(initial_loss_steps=2)
    restored.load_state_dict(det.state_dict())
    assert restored.initial_loss == 3.0
    assert kinds(restored.update(2, 31.0))[:1] == ["loss_spike"]


# ------------------------------------------------------------------------------ odd input

ODD = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e30, -1e30, 1e-300, 5e-324, 1.7e308, NAN, INF, -INF]),
    st.floats(min_value=0.01, max_value=100.0),
)


def _all_finite(state: Any) -> bool:
    return all(
        math.isfinite(x) for x in _primitives(state) if isinstance(x, float) and x is not None
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(ODD, ODD, ODD), max_size=60))
def test_odd_sequences_never_raise_nor_leave_nan(seq: list[tuple[Any, Any, Any]]) -> None:
    dets = {name: make() for name, (make, _) in DETECTORS.items()}
    for step, values in enumerate(seq):
        for name, det in dets.items():
            result = DETECTORS[name][1](det, step, values)
            for alert in _decisions(result):
                json.dumps(alert, allow_nan=False)  # every alert is writable to the JSONL
            assert _all_finite(det.state_dict()), (name, det.state_dict())


@settings(max_examples=100, deadline=None)
@given(st.lists(ODD, min_size=1, max_size=80), st.integers(min_value=0, max_value=80))
def test_odd_losses_round_trip_anywhere(losses: list[Any], cut: int) -> None:
    a, b = InstabilityDetector(), InstabilityDetector()
    for step, loss in enumerate(losses[:cut]):
        a.update(step, loss, loss, loss)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    for step, loss in enumerate(losses[cut:], start=cut):
        assert _decisions(a.update(step, loss, loss, loss)) == _decisions(
            b.update(step, loss, loss, loss)
        )
