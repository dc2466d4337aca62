r"""Loss spikes against the recent level, with the noise that real mini-batch losses have.

Real mini-batch losses are heavy-tailed (a batch of a few hard examples), and their relative
noise grows as the loss falls (at a loss of 0.05 one batch can be 4x the next). A rule that
assumes Gaussian noise of a fixed relative size, learned once, cries wolf on every healthy run
once the loss is low (``benchmarks/README_corpus.md``). This rule works in log space and
measures the noise by a quantile of what the run itself showed lately:

.. math::

    r_t = \log x_t - \ell_t, \qquad
    s_t = Q_q\left(|r|\ \text{over the last } N \text{ steps}\right), \qquad
    \tau_t = \max(k\, s_t,\ \log \rho)

where the level ``l_t`` is a robust line through the last ``W`` log-losses (Theil-Sen: the
median of the pairwise slopes, never above 0, since a rising loss is not a trend to follow,
and the median of the points moved along it to step ``t``): on a falling loss the level falls
with it, so a spike is measured against where the loss was going. A loss is a spike when
``r_t > tau_t`` and the step before was already above ``c tau`` (two in a row: a single heavy
batch is not instability), or at once when ``r_t > 2 tau_t``.
Before the first ``early_samples`` losses the threshold is ``log(early_ratio)`` alone.

Robustness: a spike does not move the level; it enters the noise window clipped at ``2 tau``,
so a noise level that really grows is learned (the window is a quantile, so a few spikes do
not move it), while a spike never widens the threshold by more than its clipped size. After
``rebaseline_steps`` spikes in a row the level restarts from the current loss (a new level,
not a spike).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.detectors._common import finite_float as _finite_float
from warmup_monitor.detectors._common import log_positive as _log
from warmup_monitor.detectors._common import safe_exp as _exp

__all__ = ["LossTrendDetector"]


def _median(values: Any) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


#: Points a slope needs: the first steps fall fast and then level off, and a line through a
#: few of them projects the fall on (a plateau would look like a spike).
MIN_SLOPE_POINTS = 8


def _level(points: deque[tuple[int, float]], step: int) -> float:
    """The Theil-Sen line through ``points`` (``(step, log loss)``), slope at most 0, at
    ``step`` (extrapolated by at most the window's own span past its last point); their median
    while there are fewer than :data:`MIN_SLOPE_POINTS`."""
    if len(points) < MIN_SLOPE_POINTS:
        return _median(y for _, y in points)
    pts = list(points)
    slopes = [
        (y1 - y0) / (s1 - s0)
        for i, (s0, y0) in enumerate(pts)
        for s1, y1 in pts[i + 1 :]
        if s1 > s0
    ]
    slope = min(_median(slopes), 0.0) if slopes else 0.0
    last, first = pts[-1][0], pts[0][0]
    at = min(step, last + max(last - first, 1))
    return _median(y + slope * (at - s) for s, y in pts)


def _quantile(values: deque[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    i = int(pos)
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


class LossTrendDetector:
    """Loss spike against its recent level (``loss_trend_spike``), from the second update.

    The rule is in the module docstring: the log-loss more than ``sigmas`` times the recent
    ``quantile`` of its absolute residuals above the median of the last ``level_window``
    losses, two steps in a row (the first at ``pair_fraction`` of the threshold), or twice
    that at once. ``step`` may skip values: the windows count values, not steps.

    Args:
        sigmas: Multiples of the noise quantile above the level that make a spike (> 0).
        min_ratio: The least ratio to the level that makes a spike (> 1).
        early_ratio: The least ratio while the noise is unknown (> 1).
        early_samples: Losses before the noise is trusted (>= 1).
        rebaseline_steps: Consecutive spikes after which the new level is accepted (>= 1).
        level_window: Losses whose median is the level (>= 1).
        noise_window: Residuals whose quantile is the noise (>= 4).
        quantile: Which quantile of the absolute residuals is the noise, in (0, 1).
        pair_fraction: Fraction of the threshold the step before must exceed, in (0, 1].

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.LOSS_TREND_SPIKE

    def __init__(
        self,
        *,
        sigmas: float = 5.7,
        min_ratio: float = 1.1,
        early_ratio: float = 3.0,
        early_samples: int = 10,
        rebaseline_steps: int = 20,
        level_window: int = 16,
        noise_window: int = 128,
        quantile: float = 0.95,
        pair_fraction: float = 0.6,
    ) -> None:
        self.sigmas = _check_float("sigmas", sigmas, above=0.0)
        self.min_ratio = _check_float("min_ratio", min_ratio, above=1.0)
        self.early_ratio = _check_float("early_ratio", early_ratio, above=1.0)
        self.early_samples = _check_int("early_samples", early_samples, minimum=1)
        self.rebaseline_steps = _check_int("rebaseline_steps", rebaseline_steps, minimum=1)
        self.level_window = _check_int("level_window", level_window, minimum=1)
        self.noise_window = _check_int("noise_window", noise_window, minimum=4)
        self.quantile = _check_float("quantile", quantile, above=0.0, maximum=1.0)
        self.pair_fraction = _check_float("pair_fraction", pair_fraction, above=0.0, maximum=1.0)
        self.reset()

    def reset(self) -> None:
        self._level: deque[tuple[int, float]] = deque(maxlen=self.level_window)
        self._noise: deque[float] = deque(maxlen=self.noise_window)
        self._n = 0  # losses accepted
        self._above = 0  # consecutive spikes
        self._high = False  # the last loss was above the pair threshold

    @property
    def noise(self) -> float | None:
        """The current noise quantile of the log residuals (``None`` until there is one)."""
        return _quantile(self._noise, self.quantile) if self._noise else None

    def threshold_log(self) -> float:
        """The current threshold ``tau`` on the log residual."""
        if self._n < self.early_samples or not self._noise:
            return math.log(self.early_ratio)
        return max(self.sigmas * _quantile(self._noise, self.quantile), math.log(self.min_ratio))

    def forecast(self, step: int) -> float | None:
        """The level a loss is compared with (not its log), or ``None`` before the first."""
        return _exp(_level(self._level, step)) if self._level else None

    def update(self, step: int, value: float | None) -> Alert | None:
        """Feed one loss at optimizer step ``step``; return an alert if it is a spike."""
        y = None if value is None else _log(value)
        if value is None or y is None:
            return None
        if not self._level:
            self._level.append((step, y))
            self._n = 1
            return None
        level = _level(self._level, step)
        r = y - level
        tau = self.threshold_log()
        early = self._n < self.early_samples
        pair = tau if early else self.pair_fraction * tau
        was_high, self._high = self._high, r > pair
        spike = r > tau and (early or was_high or r > 2.0 * tau)
        if not early:
            self._noise.append(min(abs(r), 2.0 * tau))
        if spike:
            self._above += 1
            alert = self._alert(step, value, level, r, tau)
            if self._above >= self.rebaseline_steps:
                self._level.clear()
                self._level.append((step, y))
                self._above = 0
            return alert
        self._above = 0
        self._level.append((step, y))
        self._n += 1
        return None

    def _alert(self, step: int, value: float, level: float, r: float, tau: float) -> Alert:
        trend = _exp(level)
        return Alert(
            step=step,
            kind=self.kind,
            message=(
                f"loss {value:.4g} is {_exp(r):.3g}x its recent level {trend:.4g} "
                f"(limit {_exp(tau):.3g}x)"
            ),
            value=value,
            threshold=_exp(level + tau),
            details={
                "trend": trend,
                "ratio_to_trend": _exp(r),
                "limit_ratio": _exp(tau),
                "noise": self.noise,
                "consecutive": self._above,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": [list(p) for p in self._level],
            "noise": list(self._noise),
            "n": self._n,
            "above": self._above,
            "high": self._high,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for pair in state.get("level", []) or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                self._level.append((int(pair[0]), _finite_float(pair[1], 0.0)))
        values = state.get("noise", [])
        if isinstance(values, (list, tuple)):
            self._noise.extend(_finite_float(v, 0.0) for v in values)
        self._n = max(int(state.get("n", len(self._level))), 0)
        self._above = max(int(state.get("above", 0)), 0)
        self._high = bool(state.get("high", False))
