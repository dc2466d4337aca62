"""Warmup shapes, the untuned length, batch-size scaling and the warmup-then-decay scheduler.

Every expected value here is computed independently of ``warmup_monitor.schedules``: from the
formulas of its docstring transcribed below (:func:`reference`), from pytorch_warmup's
documented formulas, or by hand.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

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

# The defaults of each shape's keyword arguments, as documented (tau: W / 5).
DEFAULTS: dict[str, dict[str, float]] = {
    "exponential": {},
    "geometric": {"start_factor": 0.01},
    "polynomial": {"power": 2.0},
    "step": {"stairs": 4},
    "constant": {"factor": 0.1},
}


# Independent transcriptions. pytorch_warmup (Tony-Y/pytorch_warmup, pytorch_warmup/base.py):
# LinearWarmup.warmup_factor = min(1.0, (step+1) / warmup_period),
# ExponentialWarmup.warmup_factor = 1.0 - math.exp(-(step+1) / warmup_period); `step` is the
# index of the update, 0 for the first.
def pw_linear(step: int, period: int) -> float:
    return min(1.0, (step + 1) / period)


def pw_exponential(step: int, period: float) -> float:
    return 1.0 - math.exp(-(step + 1) / period)


def reference(shape: str, step: int, w: int, **kw: Any) -> float:
    """The documented formula of each shape, written out again (x = (step + 1) / W)."""
    one_at = w if shape in ("exponential", "constant") else w - 1
    if step >= one_at:
        return 1.0
    x = (step + 1) / w
    if shape == "linear":
        return x
    if shape == "cosine":
        return (1 - math.cos(math.pi * x)) / 2
    if shape == "smoothstep":
        return 3 * x**2 - 2 * x**3
    if shape == "polynomial":
        return x ** kw.get("power", 2.0)
    if shape == "exponential":
        return 1 - math.exp(-(step + 1) / kw.get("tau", w / 5))
    if shape == "geometric":
        s = kw.get("start_factor", 0.01)
        return s * (1 / s) ** (step / (w - 1))  # constant ratio s^(-1/(W-1)) per step
    if shape == "step":
        k = kw.get("stairs", 4)
        # The number of stairs climbed: the least integer n with n / k >= x, by integers.
        n = -(-(step + 1) * k // w)
        return min(1.0, n / k)
    assert shape == "constant"
    return kw.get("factor", 0.1)


# ------------------------------------------------------------------------- values


# (shape, kwargs, factor at step 0, at step 4 (mid: x = 1/2), at step W - 1 (last warmup
# update)), W = 10, worked out by hand.
EXPECTED = [
    ("linear", {}, 0.1, 0.5, 1.0),
    ("cosine", {}, 0.5 * (1 - math.cos(math.pi / 10)), 0.5, 1.0),
    ("smoothstep", {}, 3 * 0.01 - 2 * 0.001, 0.5, 1.0),
    ("polynomial", {}, 0.01, 0.25, 1.0),
    ("polynomial", {"power": 3}, 0.001, 0.125, 1.0),
    ("polynomial", {"power": 0.5}, math.sqrt(0.1), math.sqrt(0.5), 1.0),
    ("exponential", {}, 1 - math.exp(-0.5), 1 - math.exp(-2.5), 1 - math.exp(-5.0)),
    ("exponential", {"tau": 1.0}, 1 - math.exp(-1), 1 - math.exp(-5), 1 - math.exp(-10)),
    ("geometric", {}, 0.01, 0.01 ** (5 / 9), 1.0),
    ("geometric", {"start_factor": 0.5}, 0.5, 0.5 ** (5 / 9), 1.0),
    ("step", {}, 0.25, 0.5, 1.0),
    ("step", {"stairs": 2}, 0.5, 0.5, 1.0),
    ("step", {"stairs": 10}, 0.1, 0.5, 1.0),
    ("constant", {}, 0.1, 0.1, 0.1),
    ("constant", {"factor": 0.2}, 0.2, 0.2, 0.2),
]


@pytest.mark.parametrize(("shape", "kw", "first", "mid", "last"), EXPECTED)
def test_values_at_start_middle_end_and_after(
    shape: str, kw: dict, first: float, mid: float, last: float
) -> None:
    assert warmup_factor(shape, 0, W, **kw) == pytest.approx(first, rel=1e-12)
    assert warmup_factor(shape, 4, W, **kw) == pytest.approx(mid, rel=1e-12)
    assert warmup_factor(shape, W - 1, W, **kw) == pytest.approx(last, rel=1e-12)
    # From W on every shape is exactly 1.
    for step in (W, W + 1, 10 * W, 10**9):
        assert warmup_factor(shape, step, W, **kw) == 1.0


def test_every_shape_is_covered_by_the_table() -> None:
    assert {row[0] for row in EXPECTED} == set(SHAPES)
    assert len(SHAPES) == 8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [1, 2, 3, 7, 10, 64, 101])
def test_every_shape_is_its_documented_formula(shape: str, w: int) -> None:
    kw = DEFAULTS.get(shape, {})
    got = [warmup_factor(shape, s, w, **kw) for s in range(2 * w + 3)]
    assert got == pytest.approx([reference(shape, s, w, **kw) for s in range(2 * w + 3)], rel=1e-12)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s not in ("exponential", "constant")])
@pytest.mark.parametrize("w", [1, 2, 5, 10, 100])
def test_reaches_one_at_the_last_warmup_update(shape: str, w: int) -> None:
    assert warmup_factor(shape, w - 1, w) == 1.0
    assert full_at(shape, w) == w - 1
    if w > 1 and shape != "step":  # the last stair (default 4) starts before the last update
        assert warmup_factor(shape, w - 2, w) < 1.0


@pytest.mark.parametrize("shape", ["exponential", "constant"])
@pytest.mark.parametrize("w", [1, 2, 5, 100])
def test_exponential_and_constant_reach_one_at_w(shape: str, w: int) -> None:
    # Documented exception: a low factor for all W updates, 1 from update W on.
    assert warmup_factor(shape, w - 1, w) < 1.0
    assert warmup_factor(shape, w, w) == 1.0
    assert full_at(shape, w) == w


def test_linear_is_pytorch_warmups_linear_warmup() -> None:
    for period in (1, 3, 10, 2000):
        for step in range(3 * period):
            assert warmup_factor("linear", step, period) == pw_linear(step, period)


def test_exponential_is_pytorch_warmups_exponential_warmup_during_warmup() -> None:
    for tau in (0.5, 3.0, 50.0):
        for step in range(200):
            assert warmup_factor("exponential", step, 200, tau=tau) == pytest.approx(
                pw_exponential(step, tau), rel=1e-15
            )
    # Default tau = W / 5: the last factor before 1 is 1 - e^-5 = 0.993.
    assert warmup_factor("exponential", 99, 100) == pytest.approx(1 - math.exp(-5.0))
    assert warmup_factor("exponential", 0, 100) == pytest.approx(1 - math.exp(-0.05))
    assert round(warmup_factor("exponential", 0, 100, tau=10), 4) == 0.0952


def test_geometric_grows_by_a_constant_ratio() -> None:
    values = [warmup_factor("geometric", s, W, start_factor=0.001) for s in range(W)]
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert ratios == pytest.approx([1000 ** (1 / 9)] * (W - 1))
    assert values[0] == pytest.approx(0.001) and values[-1] == 1.0
    assert warmup_factor("geometric", 0, 1) == 1.0  # W = 1: the only update is at full lr
    assert [warmup_factor("geometric", s, 3, start_factor=0.25) for s in range(4)] == (
        pytest.approx([0.25, 0.5, 1.0, 1.0])
    )
    # start_factor = 1: no warmup at all.
    assert [warmup_factor("geometric", s, 5, start_factor=1.0) for s in range(6)] == [1.0] * 6


def test_smoothstep_has_zero_slope_at_both_ends() -> None:
    w = 1000
    first = warmup_factor("smoothstep", 1, w) - warmup_factor("smoothstep", 0, w)
    last = warmup_factor("smoothstep", w - 1, w) - warmup_factor("smoothstep", w - 2, w)
    middle = warmup_factor("smoothstep", w // 2, w) - warmup_factor("smoothstep", w // 2 - 1, w)
    assert first < 0.01 * middle and last < 0.01 * middle
    assert middle == pytest.approx(1.5 / w, rel=1e-3)  # slope 6x(1-x) at x = 1/2, per step


def test_cosine_is_symmetric_about_the_middle() -> None:
    w = 11
    values = [warmup_factor("cosine", s, w) for s in range(w)]
    # Updates s and W - 2 - s have x and 1 - x: their factors add up to 1.
    for s in range(w - 1):
        assert values[s] + values[w - 2 - s] == pytest.approx(1.0, abs=1e-12)


def test_step_has_k_stairs_and_k_equal_w_is_linear() -> None:
    values = [warmup_factor("step", s, 8, stairs=4) for s in range(9)]
    assert values == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor("step", s, 6, stairs=1) for s in range(7)] == [1.0] * 7
    # More stairs than steps: every update climbs ceil(k / W) or so.
    assert [warmup_factor("step", s, 4, stairs=10) for s in range(5)] == [0.3, 0.5, 0.8, 1.0, 1.0]
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
    assert [warmup_factor("constant", s, 3, factor=1) for s in range(4)] == [1.0] * 4


def test_integer_kwargs_are_accepted_as_numbers() -> None:
    assert warmup_factor("exponential", 0, 10, tau=2) == pytest.approx(1 - math.exp(-0.5))
    assert warmup_factor("polynomial", 4, 10, power=3) == pytest.approx(0.125)


# ------------------------------------------------------------------------- properties


def shape_kwargs() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A shape with keyword arguments drawn over their whole valid range."""
    pos = st.floats(1e-3, 1e3, allow_nan=False)
    unit = st.floats(1e-6, 1.0, allow_nan=False)
    per_shape: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "exponential": st.one_of(st.just({}), st.fixed_dictionaries({"tau": pos})),
        "geometric": st.one_of(st.just({}), st.fixed_dictionaries({"start_factor": unit})),
        "polynomial": st.one_of(
            st.just({}), st.fixed_dictionaries({"power": st.floats(0.05, 20.0)})
        ),
        "step": st.one_of(st.just({}), st.fixed_dictionaries({"stairs": st.integers(1, 500)})),
        "constant": st.one_of(st.just({}), st.fixed_dictionaries({"factor": unit})),
    }
    return st.sampled_from(SHAPES).flatmap(
        lambda s: st.tuples(st.just(s), per_shape.get(s, st.just({})))
    )


@given(sk=shape_kwargs(), w=st.integers(1, 400))
@settings(max_examples=250, deadline=None)
def test_every_shape_is_in_0_1_monotone_and_one_after_warmup(
    sk: tuple[str, dict[str, Any]], w: int
) -> None:
    shape, kw = sk
    values = [warmup_factor(shape, s, w, **kw) for s in range(w + 3)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(b >= a for a, b in itertools.pairwise(values))
    one_at = w if shape in ("exponential", "constant") else w - 1
    assert values[one_at:] == [1.0] * (len(values) - one_at)
    assert values == pytest.approx([reference(shape, s, w, **kw) for s in range(w + 3)], rel=1e-9)


@given(
    sk=shape_kwargs(),
    w=st.integers(1, 300),
    u=st.floats(-1.0, 400.0),
    du=st.floats(0.0, 50.0),
)
@settings(max_examples=250, deadline=None)
def test_continuous_shape_is_monotone_and_matches_integer_steps(
    sk: tuple[str, dict[str, Any]], w: int, u: float, du: float
) -> None:
    shape, kw = sk
    params = shape_params(shape, w, kw)
    a, b = shape_value(shape, u, w, params), shape_value(shape, u + du, w, params)
    assert 0.0 <= a <= b <= 1.0
    step = max(0, math.floor(u))
    assert shape_value(shape, float(step), w, params) == warmup_factor(shape, step, w, **kw)


# ------------------------------------------------------------------------- max_increment


def reference_max_increment(shape: str, w: int, **kw: Any) -> float:
    values = [0.0] + [reference(shape, s, w, **kw) for s in range(w + 2)]
    return max(b - a for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("shape", "w", "kw", "expected"),
    [
        ("linear", 50, {}, 1 / 50),
        ("linear", 1, {}, 1.0),
        ("step", 8, {"stairs": 4}, 0.25),
        ("step", 4, {"stairs": 10}, 0.3),  # 0.3, 0.5, 0.8, 1.0
        ("constant", 5, {"factor": 0.1}, 0.9),  # the final jump from 0.1 to 1
        ("constant", 5, {"factor": 0.7}, 0.7),  # the first factor, counted from 0
        ("cosine", 101, {}, math.sin(math.pi / 202)),  # odd W: the middle step
        ("cosine", 100, {}, 0.5 * math.sin(math.pi / 100)),  # even W: two middle steps
        ("polynomial", 10, {"power": 2}, 1 - 0.81),  # convex: the last step
        ("polynomial", 10, {"power": 0.5}, math.sqrt(0.1)),  # concave: the first factor
        ("exponential", 100, {}, 1 - math.exp(-1 / 20)),  # the first factor
        ("exponential", 10, {"tau": 100.0}, math.exp(-0.1)),  # the jump to 1 at W
        ("geometric", 10, {"start_factor": 0.01}, 1 - 0.01 ** (1 / 9)),  # the last step
        ("geometric", 10, {"start_factor": 0.9}, 0.9),  # the first factor
        ("smoothstep", 4, {}, 0.5 - 5 / 32),  # F(1) - F(0) = 1/2 - (3/16 - 2/64)
    ],
)
def test_max_increment(shape: str, w: int, kw: dict, expected: float) -> None:
    assert max_increment(shape, w, **kw) == pytest.approx(expected, rel=1e-9)


@given(sk=shape_kwargs(), w=st.integers(1, 200))
@settings(max_examples=150, deadline=None)
def test_max_increment_is_the_largest_step_to_step_increase(
    sk: tuple[str, dict[str, Any]], w: int
) -> None:
    shape, kw = sk
    assert max_increment(shape, w, **kw) == pytest.approx(
        reference_max_increment(shape, w, **kw), rel=1e-9, abs=1e-15
    )


def test_max_increment_validates_like_warmup_factor() -> None:
    with pytest.raises(ValueError, match="`shape` must be one of"):
        max_increment("sine", 10)
    with pytest.raises(ValueError, match="`warmup_steps` must be >= 1, got 0"):
        max_increment("linear", 0)
    with pytest.raises(ValueError, match="shape 'linear' takes no keyword arguments"):
        max_increment("linear", 10, tau=1.0)


# ------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("beta2", "expected"),
    [
        (0.999, 2000),
        (0.98, 100),
        (0.99, 200),
        (0.95, 40),
        (0.9, 20),
        (0.5, 4),
        (0.9995, 4000),
        (0.9999, 20000),
        (0.997, 666),
        (0.0, 2),
        (0, 2),
    ],
)
def test_untuned_warmup_steps(beta2: float, expected: int) -> None:
    # Ma and Yarats (2019): 2 / (1 - beta2), truncated, as pytorch_warmup's UntunedLinearWarmup.
    assert untuned_warmup_steps(beta2) == expected
    assert isinstance(untuned_warmup_steps(beta2), int)
    # pytorch_warmup's int(2 / (1 - beta2)) agrees up to its binary rounding (1999 for 0.999).
    assert int(2.0 / (1.0 - beta2)) in (expected, expected - 1)


def test_untuned_warmup_steps_rejects_bad_beta2() -> None:
    with pytest.raises(ValueError, match=r"`beta2` must be in \[0, 1\), got 1.0"):
        untuned_warmup_steps(1.0)
    with pytest.raises(ValueError, match=r"`beta2` must be in \[0, 1\), got 1.5"):
        untuned_warmup_steps(1.5)
    with pytest.raises(ValueError, match=r"`beta2` must be >= 0, got -0\.1"):
        untuned_warmup_steps(-0.1)
    with pytest.raises(ValueError, match="`beta2` must be finite, got nan"):
        untuned_warmup_steps(math.nan)
    with pytest.raises(TypeError, match="`beta2` must be a number"):
        untuned_warmup_steps("0.999")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`beta2` must be a number"):
        untuned_warmup_steps(True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.1, 500, 1024, 256), (0.4, 2000)),
        ((0.1, 500, 128, 256), (0.05, 250)),
        ((0.1, 500, 256, 256), (0.1, 500)),
        ((1e-3, 3, 1, 256), (1e-3 / 256, 1)),  # rounds to 0 steps: at least 1
        ((2e-4, 100, 96, 64), (3e-4, 150)),
        ((0.5, 6, 3, 2), (0.75, 9)),
        ((0.1, 10, 100, 30), (0.1 * 100 / 30, 33)),  # 33.3 rounds to 33
        ((0.1, 10, 50, 30), (0.1 * 50 / 30, 17)),  # 16.7 rounds to 17
    ],
)
def test_scale_for_batch_size(args: tuple, expected: tuple[float, int]) -> None:
    lr, w = scale_for_batch_size(*args)
    lr0, _, b, ref = args
    assert lr == pytest.approx(lr0 * b / ref, rel=1e-12) == pytest.approx(expected[0], rel=1e-12)
    assert w == expected[1] and isinstance(w, int)


def test_scale_for_batch_size_keyword_form() -> None:
    assert scale_for_batch_size(0.1, 500, batch_size=1024, reference_batch_size=256) == (
        pytest.approx(0.4),
        2000,
    )


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0.0, 500, 1, 256), ValueError, "`lr` must be > 0, got 0.0"),
        ((-0.1, 500, 1, 256), ValueError, "`lr` must be > 0"),
        ((math.inf, 500, 1, 256), ValueError, "`lr` must be finite"),
        (("0.1", 500, 1, 256), TypeError, "`lr` must be a number"),
        ((0.1, 0, 1, 256), ValueError, "`warmup_steps` must be >= 1, got 0"),
        ((0.1, 5.0, 1, 256), TypeError, "`warmup_steps` must be an int"),
        ((0.1, 500, 0, 256), ValueError, "`batch_size` must be >= 1, got 0"),
        ((0.1, 500, 2.0, 256), TypeError, "`batch_size` must be an int"),
        ((0.1, 500, 1, 0), ValueError, "`reference_batch_size` must be >= 1, got 0"),
        ((0.1, 500, 1, None), TypeError, "`reference_batch_size` must be an int"),
    ],
)
def test_scale_for_batch_size_rejects_bad_arguments(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        scale_for_batch_size(*args)


# ------------------------------------------------------------------------- warmup_then_decay


def train(
    sched: torch.optim.lr_scheduler.LRScheduler, param: torch.Tensor, n: int
) -> tuple[list[float], list[float], list[float]]:
    """A real SGD loop on a scalar parameter with gradient 1: per update, the lr in the param
    group, the scheduler's ``get_last_lr()``, and the update actually applied (``-delta``)."""
    opt = sched.optimizer
    group_lrs: list[float] = []
    last_lrs: list[float] = []
    applied: list[float] = []
    for _ in range(n):
        group_lrs.append(float(opt.param_groups[0]["lr"]))
        last_lrs.append(float(sched.get_last_lr()[0]))
        with torch.no_grad():
            param.zero_()
        param.grad = torch.ones_like(param)
        opt.step()
        applied.append(-param.item())
        sched.step()
    return group_lrs, last_lrs, applied


def expected_decay(t: int, w: int, total: int, decay: str, lo: float) -> float:
    q = min(1.0, (t - w + 1) / (total - w))
    if decay == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * q))
    if decay == "linear":
        return lo + (1 - lo) * (1 - q)
    return 1.0


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("lo", [0.0, 0.1])
def test_warmup_then_decay_with_a_real_optimizer(decay: str, lo: float) -> None:
    w, total, peak = 4, 12, 0.5
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=peak)
    sched = warmup_then_decay(
        opt,
        warmup_steps=w,
        total_steps=total,
        decay=decay,  # type: ignore[arg-type]
        min_factor=lo,
    )
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    expected = [peak * (t + 1) / w for t in range(w)]
    expected += [peak * expected_decay(t, w, total, decay, lo) for t in range(w, total + 3)]
    group_lrs, last_lrs, applied = train(sched, p, total + 3)
    assert group_lrs == pytest.approx(expected, rel=1e-12)
    assert last_lrs == pytest.approx(expected, rel=1e-12)
    assert applied == pytest.approx(expected, rel=1e-12)
    assert group_lrs[w - 1] == pytest.approx(peak)  # the peak at the last warmup update
    if decay == "constant":
        assert group_lrs[w:] == pytest.approx([peak] * (total + 3 - w))
    else:
        # Strictly decreasing to the floor at the last step, total - 1, and flat after.
        decaying = group_lrs[w - 1 : total]
        assert all(b < a for a, b in itertools.pairwise(decaying))
        assert group_lrs[total - 1 :] == pytest.approx([peak * lo] * 4, abs=1e-15)


def test_warmup_then_decay_cosine_half_way() -> None:
    # W = 10, T = 110: q = 1/2 at t = 59, where the cosine decay is halfway: (1 + m) / 2.
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_then_decay(opt, warmup_steps=10, total_steps=110, min_factor=0.2)
    lrs, _, _ = train(sched, p, 112)
    assert lrs[59] == pytest.approx(2.0 * 0.6, rel=1e-12)
    assert lrs[109] == pytest.approx(0.4, rel=1e-12)


@pytest.mark.parametrize(
    ("shape", "kw"),
    [("cosine", {}), ("exponential", {"tau": 3.0}), ("step", {"stairs": 2}), ("geometric", {})],
)
def test_warmup_then_decay_uses_the_shape_during_warmup(shape: str, kw: dict) -> None:
    w, total, peak = 6, 16, 0.3
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=peak)
    sched = warmup_then_decay(
        opt,
        warmup_steps=w,
        total_steps=total,
        shape=shape,  # type: ignore[arg-type]
        decay="linear",
        **kw,
    )
    expected = [peak * reference(shape, t, w, **kw) for t in range(w)]
    expected += [peak * (1 - (t - w + 1) / (total - w)) for t in range(w, total)]
    lrs, _, applied = train(sched, p, total)
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert applied == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_then_decay_scales_every_param_group() -> None:
    a = torch.zeros((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = warmup_then_decay(opt, warmup_steps=4, total_steps=4)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [[f, 0.1 * f] for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert seen == [pytest.approx(e, rel=1e-12) for e in expected]


def test_warmup_then_decay_takes_shape_keywords_and_total_equal_to_warmup() -> None:
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_then_decay(opt, warmup_steps=5, total_steps=5, shape="constant", factor=0.3)
    lrs, _, _ = train(sched, p, 7)
    assert lrs == pytest.approx([0.3] * 5 + [1.0, 1.0])


def test_warmup_then_decay_first_lr_is_set_at_construction() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    warmup_then_decay(opt, warmup_steps=10, total_steps=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-12)
    assert opt.param_groups[0]["initial_lr"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": 10, "total_steps": 5}, ValueError, r"`total_steps` \(5\) must be >= "),
        ({"total_steps": 0}, ValueError, "`total_steps` must be >= 1, got 0"),
        ({"total_steps": 5.0}, TypeError, "`total_steps` must be an int"),
        ({"warmup_steps": 0}, ValueError, "`warmup_steps` must be >= 1, got 0"),
        ({"decay": "exp"}, ValueError, "`decay` must be one of 'cosine', 'linear', 'constant'"),
        ({"min_factor": 2.0}, ValueError, r"`min_factor` must be in \[0, 1\], got 2"),
        ({"min_factor": -0.1}, ValueError, "`min_factor` must be >= 0"),
        ({"min_factor": "0"}, TypeError, "`min_factor` must be a number"),
        ({"shape": "sine"}, ValueError, "`shape` must be one of 'linear'"),
        ({"tau": 3.0}, ValueError, "shape 'linear' takes no keyword arguments"),
        ({"shape": "step", "stairs": 0}, ValueError, "`stairs` must be >= 1, got 0"),
    ],
)
def test_warmup_then_decay_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(error, match=match):
        warmup_then_decay(opt, **{"warmup_steps": 1, "total_steps": 5, **kwargs})


# ------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("shape", "step", "w", "kw", "error", "match"),
    [
        ("sine", 0, 10, {}, ValueError, "`shape` must be one of 'linear', 'cosine'"),
        (None, 0, 10, {}, ValueError, "`shape` must be one of .*got None"),
        ("linear", -1, 10, {}, ValueError, "`step` must be >= 0, got -1"),
        ("linear", 0.5, 10, {}, TypeError, r"`step` must be an int, got 0.5 \(float\)"),
        ("linear", True, 10, {}, TypeError, "`step` must be an int, got True"),
        ("linear", 0, 0, {}, ValueError, "`warmup_steps` must be >= 1, got 0"),
        ("linear", 0, 10.0, {}, TypeError, "`warmup_steps` must be an int"),
        ("linear", 0, 10, {"tau": 2}, ValueError, "shape 'linear' takes no keyword arguments"),
        ("cosine", 0, 10, {"power": 2}, ValueError, "shape 'cosine' takes no keyword"),
        ("exponential", 0, 10, {"power": 2}, ValueError, r"takes `tau`, got \['power'\]"),
        ("exponential", 0, 10, {"tau": 0}, ValueError, "`tau` must be > 0, got 0"),
        ("exponential", 0, 10, {"tau": -1.0}, ValueError, "`tau` must be > 0"),
        ("exponential", 0, 10, {"tau": math.nan}, ValueError, "`tau` must be finite"),
        ("exponential", 0, 10, {"tau": "2"}, TypeError, "`tau` must be a number"),
        ("geometric", 0, 9, {"start_factor": 2}, ValueError, r"`start_factor` must be in \(0, 1"),
        ("geometric", 0, 9, {"start_factor": 0}, ValueError, "`start_factor` must be > 0"),
        ("geometric", 0, 9, {"stairs": 2}, ValueError, "takes `start_factor`"),
        ("polynomial", 0, 9, {"power": -1}, ValueError, "`power` must be > 0, got -1"),
        ("polynomial", 0, 9, {"power": math.inf}, ValueError, "`power` must be finite"),
        ("polynomial", 0, 9, {"power": None}, TypeError, "`power` must be a number"),
        ("step", 0, 9, {"stairs": 0}, ValueError, "`stairs` must be >= 1, got 0"),
        ("step", 0, 9, {"stairs": 2.0}, TypeError, "`stairs` must be an int"),
        ("constant", 0, 9, {"factor": 0}, ValueError, "`factor` must be > 0"),
        ("constant", 0, 9, {"factor": 1.5}, ValueError, r"`factor` must be in \(0, 1\], got 1.5"),
        ("constant", 0, 9, {"tau": 1.0}, ValueError, "shape 'constant' takes `factor`"),
    ],
)
def test_bad_arguments_name_the_argument(
    shape: Any, step: Any, w: Any, kw: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        warmup_factor(shape, step, w, **kw)
