"""Warmup shapes, the untuned length, batch-size scaling and the warmup-then-decay scheduler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmup_monitor.schedules import (
    SHAPES,
    full_at,
    max_increment,
    scale_for_batch_size,
    shape_params,
    shape_value,
    untuned_warmup_steps,
    warmup_factor,
    warmup_then_decay,
)

W = 10


# Independent transcriptions. pytorch_warmup (Tony-Y/pytorch_warmup, pytorch_warmup/base.py):
# LinearWarmup.warmup_factor = min(1.0, (step+1) / warmup_period),
# ExponentialWarmup.warmup_factor = 1.0 - math.exp(-(step+1) / warmup_period); `step` is the
# index of the update, 0 for the first (BaseWarmup.__init__ dampens step 0 at once).
def pw_linear(step: int, period: int) -> float:
    return min(1.0, (step + 1) / period)


def pw_exponential(step: int, period: float) -> float:
    return 1.0 - math.exp(-(step + 1) / period)


# (shape, kwargs, factor at step 0, at step 4 (mid), at step W - 1 (last warmup update)).
EXPECTED = [
    ("linear", {}, 0.1, 0.5, 1.0),
    ("cosine", {}, 0.5 * (1 - math.cos(math.pi * 0.1)), 0.5, 1.0),
    ("smoothstep", {}, 3 * 0.01 - 2 * 0.001, 0.5, 1.0),
    ("polynomial", {"power": 3}, 0.001, 0.125, 1.0),
    ("exponential", {"tau": 2.0}, 1 - math.exp(-0.5), 1 - math.exp(-2.5), 1 - math.exp(-5.0)),
    ("geometric", {"start_factor": 0.01}, 0.01, 0.01 ** (1 - 4 / 9), 1.0),
    ("step", {"stairs": 4}, 0.25, 0.5, 1.0),
    ("constant", {"factor": 0.2}, 0.2, 0.2, 0.2),
]


@pytest.mark.parametrize(("shape", "kw", "first", "mid", "last"), EXPECTED)
def test_values_at_start_middle_end(
    shape: str, kw: dict, first: float, mid: float, last: float
) -> None:
    assert warmup_factor(shape, 0, W, **kw) == pytest.approx(first, rel=1e-12)
    assert warmup_factor(shape, 4, W, **kw) == pytest.approx(mid, rel=1e-12)
    assert warmup_factor(shape, W - 1, W, **kw) == pytest.approx(last, rel=1e-12)
    # From W on every shape is exactly 1.
    for step in (W, W + 1, 10 * W):
        assert warmup_factor(shape, step, W, **kw) == 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [1, 2, 7, 100])
def test_every_shape_is_in_0_1_monotone_and_1_after_warmup(shape: str, w: int) -> None:
    values = [warmup_factor(shape, s, w) for s in range(3 * w + 2)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[full_at(shape, w)] == 1.0
    assert all(v == 1.0 for v in values[w:])
    if full_at(shape, w) == w:  # exponential and constant reach 1 at W, not before
        assert values[w - 1] < 1.0


def test_linear_is_pytorch_warmups_linear_warmup() -> None:
    for period in (1, 3, 10, 2000):
        for step in range(3 * period):
            assert warmup_factor("linear", step, period) == pw_linear(step, period)


def test_exponential_is_pytorch_warmups_exponential_warmup_during_warmup() -> None:
    for tau in (0.5, 3.0, 50.0):
        for step in range(200):
            assert warmup_factor("exponential", step, 200, tau=tau) == pw_exponential(step, tau)
    # Default tau = W / 5: the last factor before 1 is 1 - e^-5.
    assert warmup_factor("exponential", 99, 100) == pytest.approx(1 - math.exp(-5.0))
    assert warmup_factor("exponential", 0, 100) == pytest.approx(1 - math.exp(-0.05))


def test_geometric_grows_by_a_constant_ratio() -> None:
    values = [warmup_factor("geometric", s, W, start_factor=0.001) for s in range(W)]
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert ratios == pytest.approx([1000 ** (1 / 9)] * (W - 1))
    assert values[0] == pytest.approx(0.001) and values[-1] == 1.0
    assert warmup_factor("geometric", 0, 1) == 1.0  # W = 1: the only update is at full lr


def test_smoothstep_has_zero_slope_at_both_ends() -> None:
    w = 1000
    first = warmup_factor("smoothstep", 1, w) - warmup_factor("smoothstep", 0, w)
    last = warmup_factor("smoothstep", w - 1, w) - warmup_factor("smoothstep", w - 2, w)
    middle = warmup_factor("smoothstep", w // 2, w) - warmup_factor("smoothstep", w // 2 - 1, w)
    assert first < 0.01 * middle and last < 0.01 * middle
    assert middle == pytest.approx(1.5 / w, rel=1e-3)  # slope 6x(1-x) at x = 1/2, per step


def test_step_has_k_stairs_and_k_equal_w_is_linear() -> None:
    values = [warmup_factor("step", s, 8, stairs=4) for s in range(8)]
    assert values == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    for w in (3, 10, 37):
        assert [warmup_factor("step", s, w, stairs=w) for s in range(w)] == pytest.approx(
            [warmup_factor("linear", s, w) for s in range(w)], rel=1e-12
        )


def test_constant_is_low_then_one() -> None:
    assert [warmup_factor("constant", s, 3, factor=0.1) for s in range(5)] == [
        0.1,
        0.1,
        0.1,
        1.0,
        1.0,
    ]


@given(
    shape=st.sampled_from(SHAPES),
    w=st.integers(1, 300),
    u=st.floats(-1.0, 400.0),
    du=st.floats(0.0, 50.0),
)
@settings(max_examples=300, deadline=None)
def test_continuous_shape_is_monotone_and_matches_integer_steps(
    shape: str, w: int, u: float, du: float
) -> None:
    params = shape_params(shape, w, {})
    a, b = shape_value(shape, u, w, params), shape_value(shape, u + du, w, params)
    assert 0.0 <= a <= b <= 1.0
    step = max(0, math.floor(u))
    assert shape_value(shape, float(step), w, params) == warmup_factor(shape, step, w)


def test_max_increment() -> None:
    assert max_increment("linear", 50) == pytest.approx(1 / 50)
    assert max_increment("step", 8, stairs=4) == 0.25
    assert max_increment("constant", 5, factor=0.1) == pytest.approx(0.9)
    assert max_increment("cosine", 101) == pytest.approx(math.sin(math.pi / 202), rel=1e-9)


@pytest.mark.parametrize(
    ("beta2", "expected"),
    [(0.999, 2000), (0.98, 100), (0.99, 200), (0.95, 40), (0.9995, 4000), (0.997, 666), (0.0, 2)],
)
def test_untuned_warmup_steps(beta2: float, expected: int) -> None:
    assert untuned_warmup_steps(beta2) == expected
    # pytorch_warmup's int(2 / (1 - beta2)) agrees up to its binary rounding (1999 for 0.999).
    assert int(2.0 / (1.0 - beta2)) in (expected, expected - 1)


def test_untuned_warmup_steps_rejects_bad_beta2() -> None:
    with pytest.raises(ValueError, match=r"`beta2` must be in \[0, 1\), got 1.0"):
        untuned_warmup_steps(1.0)
    with pytest.raises(ValueError, match="`beta2` must be >= 0"):
        untuned_warmup_steps(-0.1)
    with pytest.raises(TypeError, match="`beta2` must be a number"):
        untuned_warmup_steps("0.999")  # type: ignore[arg-type]


def test_scale_for_batch_size() -> None:
    assert scale_for_batch_size(0.1, 500, 1024, 256) == (pytest.approx(0.4), 2000)
    assert scale_for_batch_size(0.1, 500, 128, 256) == (pytest.approx(0.05), 250)
    assert scale_for_batch_size(1e-3, 3, 1, 256) == (pytest.approx(1e-3 / 256), 1)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        scale_for_batch_size(0.1, 500, 0, 256)
    with pytest.raises(ValueError, match="`lr` must be > 0"):
        scale_for_batch_size(0.0, 500, 1, 256)


def _scheduler_lrs(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    opt = sched.optimizer
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the next update uses
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay_is_one_scheduler(decay: str) -> None:
    w_, total, peak, lo = 4, 12, 0.5, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = warmup_then_decay(
        opt,
        warmup_steps=w_,
        total_steps=total,
        decay=decay,  # type: ignore[arg-type]
        min_factor=lo,
    )
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    expected = [peak * (t + 1) / w_ for t in range(w_)]
    for t in range(w_, total + 2):
        q = min(1.0, (t - w_ + 1) / (total - w_))
        if decay == "cosine":
            f = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * q))
        elif decay == "linear":
            f = lo + (1 - lo) * (1 - q)
        else:
            f = 1.0
        expected.append(peak * f)
    assert _scheduler_lrs(sched, total + 2) == pytest.approx(expected, rel=1e-12)
    if decay != "constant":
        assert expected[total - 1] == pytest.approx(peak * lo)  # the last step reaches the floor


def test_warmup_then_decay_takes_shape_keywords() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_then_decay(opt, warmup_steps=5, total_steps=5, shape="constant", factor=0.3)
    assert _scheduler_lrs(sched, 7) == pytest.approx([0.3] * 5 + [1.0, 1.0])


def test_warmup_then_decay_rejects_bad_arguments() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(
        ValueError, match="`total_steps` \\(5\\) must be >= `warmup_steps` \\(10\\)"
    ):
        warmup_then_decay(opt, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="`decay` must be one of 'cosine', 'linear', 'constant'"):
        warmup_then_decay(opt, warmup_steps=1, total_steps=5, decay="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`min_factor` must be in \\[0, 1\\], got 2"):
        warmup_then_decay(opt, warmup_steps=1, total_steps=5, min_factor=2.0)
    with pytest.raises(ValueError, match="shape 'linear' takes no keyword arguments"):
        warmup_then_decay(opt, warmup_steps=1, total_steps=5, tau=3.0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: warmup_factor("sine", 0, 10), ValueError, "`shape` must be one of 'linear'"),
        (lambda: warmup_factor("linear", -1, 10), ValueError, "`step` must be >= 0, got -1"),
        (lambda: warmup_factor("linear", 0, 0), ValueError, "`warmup_steps` must be >= 1, got 0"),
        (lambda: warmup_factor("linear", 0.5, 10), TypeError, "`step` must be an int"),  # type: ignore[arg-type]
        (lambda: warmup_factor("linear", 0, 10, tau=2), ValueError, "takes no keyword"),
        (lambda: warmup_factor("exponential", 0, 10, power=2), ValueError, "takes `tau`"),
        (lambda: warmup_factor("exponential", 0, 10, tau=0), ValueError, "`tau` must be > 0"),
        (lambda: warmup_factor("geometric", 0, 9, start_factor=2), ValueError, "`start_factor`"),
        (lambda: warmup_factor("geometric", 0, 9, start_factor=0), ValueError, "`start_factor`"),
        (lambda: warmup_factor("polynomial", 0, 9, power=-1), ValueError, "`power` must be > 0"),
        (lambda: warmup_factor("step", 0, 9, stairs=0), ValueError, "`stairs` must be >= 1"),
        (lambda: warmup_factor("constant", 0, 9, factor=0), ValueError, "`factor` must be > 0"),
        (lambda: warmup_factor("constant", 0, 9, factor=1.5), ValueError, "`factor` must be in"),
    ],
)
def test_bad_arguments_name_the_argument(call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]
