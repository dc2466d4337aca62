"""The one lr recommendation shared by the controller's alert and the report."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmup_monitor.advice import MIN_CHANGE, SAFETY, format_lr, recommend_peak_lr


def test_half_of_the_lowest_unstable_lr() -> None:
    assert SAFETY == 0.5 and MIN_CHANGE == 0.1
    assert recommend_peak_lr(3e-3) == pytest.approx(1.5e-3, rel=1e-15)
    assert recommend_peak_lr(0.7, peak_lr=1.0) == pytest.approx(0.35, rel=1e-15)
    assert format_lr(0.35) == "0.35" and format_lr(2.9876e-3) == "0.00299"


@given(
    unstable=st.floats(min_value=1e-8, max_value=10.0),
    peak=st.floats(min_value=1e-8, max_value=10.0),
)
def test_never_a_change_under_ten_percent(unstable: float, peak: float) -> None:
    got = recommend_peak_lr(unstable, peak_lr=peak)
    if got is None:
        assert 0.5 * unstable > 0.9 * peak
    else:
        assert got == 0.5 * unstable and got <= 0.9 * peak


def test_scale_free() -> None:
    """A factor of the peak and the lr it stands for give the same recommendation."""
    peak = 3e-3
    for level in (0.1, 0.35, 0.7, 1.0):
        by_factor = recommend_peak_lr(level, peak_lr=1.0)
        by_lr = recommend_peak_lr(level * peak, peak_lr=peak)
        assert by_factor is not None and by_lr is not None
        assert math.isclose(by_factor * peak, by_lr, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "0.1", None])
def test_bad_inputs_name_the_argument(bad: object) -> None:
    with pytest.raises(ValueError, match="lowest_unstable_lr"):
        recommend_peak_lr(bad)  # type: ignore[arg-type]
    if bad is not None:  # None means "peak not known"
        with pytest.raises(ValueError, match="peak_lr"):
            recommend_peak_lr(0.1, peak_lr=bad)  # type: ignore[arg-type]
