r"""Sustained rises: a loss that keeps climbing above its recent low, a gradient norm that grows.

A slow divergence escapes the spike rules: each step's rise is small against a trend that
follows it upward. These rules look at the level itself, over a window of steps:

.. math::

    \tilde y_t = \text{EWMA}_\alpha\big(\operatorname{median}(y_{t-2}, y_{t-1}, y_t)\big),
    \qquad y = \log x

    \text{fire} \iff \tilde y_t - \ell_t > \tau
    \ \text{ and }\ \operatorname{median}(y_{t-2}, y_{t-1}, y_t) - \ell_t > \tau
    \ \text{ and }\ \tilde y_t - \tilde y_{t - W/5} > \tau / 2
    \ \text{ and }\ \tilde y_t - \tilde y_{t - W/20} > \tau / 8

    \ell_t = \min_{t - W \le u \le t} \tilde y_u, \qquad \tau = \max(\log \rho,\ k \hat\sigma)

The median of three makes a one-step excursion (a spike, a catapult) invisible to them; the
second condition stops them as soon as the values are back down (the smoothed level lags); the
last two ask that the level is still climbing (a margin that grows, over the last fifth of the
window and over its last twentieth), so a level that climbed and then stays flat stops firing.
``sigma`` is the noise of one value, estimated from ``|y_t - y_{t-1}|`` (never while a rise is
in progress); ``W`` is in optimizer steps, so a value fed every 10th step still looks back
``W`` steps.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.detectors._common import finite_float as _finite_float
from warmup_monitor.detectors._common import int_or as _int_or
from warmup_monitor.detectors._common import log_positive as _log
from warmup_monitor.detectors._common import safe_exp as _exp

__all__ = ["GradNormRiseDetector", "LossDivergenceDetector"]

# E|x - x'| = 2 sigma / sqrt(pi) for two independent normal values: sigma from the mean move.
_MOVE_TO_SIGMA = math.sqrt(math.pi) / 2


class _SustainedRise:
    """The level of ``log(x)`` climbing above its low over a window: see the module docstring."""

    kind: AlertKind = AlertKind.LOSS_DIVERGENCE
    what = "value"
    advice = ""
    #: Smoothing of the median of three.
    alpha = 0.5
    #: Weight of a new move in the noise estimate (after the first ones), the noise before any
    #: data (10 %) and its weight, and the clip of a move (in mean moves).
    gamma, prior_noise, prior_weight, clip = 0.05, 0.1, 4.0, 4.0

    def __init__(
        self, *, min_ratio: float, sigmas: float, window: int = 100, min_samples: int = 10
    ) -> None:
        self.min_ratio = _check_float("min_ratio", min_ratio, above=1.0)
        self.sigmas = _check_float("sigmas", sigmas, above=0.0)
        self.window = _check_int("window", window, minimum=1)
        self.min_samples = _check_int("min_samples", min_samples, minimum=1)
        self.rise_steps = max(self.window // 5, 1)
        self.recent_steps = max(self.rise_steps // 4, 1)
        self._log_min_ratio = math.log(self.min_ratio)
        self.reset()

    def reset(self) -> None:
        self._n = 0  # values seen
        self._m = 0  # updates of the noise
        self._at: int | None = None  # step of the last value
        self._last: float | None = None  # log of the last value
        self._recent: list[float] = []  # the last three logs
        self._smooth = 0.0
        self._move = self.prior_noise / _MOVE_TO_SIGMA  # mean |y_t - y_{t-1}|
        self._rising = False  # a rise was in progress at the last value
        self._above = 0  # consecutive alerts
        # Lows of the smoothed level within the window (increasing), and its values within
        # the rise window, as [step, level].
        self._lows: deque[list[float]] = deque()
        self._rise: deque[list[float]] = deque()

    @property
    def sigma(self) -> float:
        """The noise of one value's log (about its relative noise)."""
        return _MOVE_TO_SIGMA * self._move

    def threshold_log(self) -> float:
        """The current margin ``tau`` above the low, in log units."""
        return max(self._log_min_ratio, self.sigmas * self.sigma)

    def update(self, step: int, value: float | None) -> Alert | None:
        """Feed one value at optimizer step ``step``; return an alert while it keeps climbing."""
        y = None if value is None else _log(value)
        if value is None or y is None:
            return None
        t = step if self._at is None or step > self._at else self._at + 1
        if self._last is not None and not self._rising:
            move = min(abs(y - self._last), self.clip * self._move)
            self._m += 1
            weight = max(self.gamma, 1.0 / (self._m + self.prior_weight))
            self._move += weight * (move - self._move)
        self._last, self._at = y, t
        self._recent = [*self._recent[-2:], y]
        self._n += 1
        if len(self._recent) < 3:
            return None
        level = sorted(self._recent)[1]
        # From the third value on: a running mean of the medians at first, then the EWMA.
        weight = max(self.alpha, 1.0 / (self._n - 2))
        self._smooth += weight * (level - self._smooth)
        s = self._smooth
        while self._lows and self._lows[-1][1] >= s:
            self._lows.pop()
        self._lows.append([float(t), s])
        while self._lows[0][0] < t - self.window:
            self._lows.popleft()
        self._rise.append([float(t), s])
        while self._rise[0][0] < t - self.rise_steps:
            self._rise.popleft()
        low_step, low = self._lows[0]
        excess, rise = s - low, s - self._rise[0][1]
        # The level at least `recent_steps` back (values fed every 10th step: the one before).
        recent = next((v for u, v in reversed(self._rise) if u <= t - self.recent_steps), s)
        tau = self.threshold_log()
        self._rising = excess > tau / 2
        climbing = rise > tau / 2 and s - recent > tau / 8
        quiet = excess <= tau or level - low <= tau or not climbing
        if self._n <= self.min_samples or quiet:
            self._above = 0
            return None
        self._above += 1
        return Alert(
            step=step,
            kind=self.kind,
            message=(
                f"{self.what} keeps climbing: {_exp(s):.4g} (smoothed) is {_exp(excess):.3g}x "
                f"its low of {_exp(low):.4g} at step {int(low_step)}, {_exp(rise):.3g}x within "
                f"{self.rise_steps} steps (limit {_exp(tau):.3g}x){self.advice}"
            ),
            value=value,
            threshold=_exp(low + tau),
            details={
                "smoothed": _exp(s),
                "low": _exp(low),
                "low_step": int(low_step),
                "ratio_to_low": _exp(excess),
                "rise_ratio": _exp(rise),
                "rise_steps": self.rise_steps,
                "limit_ratio": _exp(tau),
                "noise": self.sigma,
                "consecutive": self._above,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self._n,
            "m": self._m,
            "at": self._at,
            "last": self._last,
            "recent": list(self._recent),
            "smooth": self._smooth,
            "move": self._move,
            "rising": self._rising,
            "above": self._above,
            "lows": [list(p) for p in self._lows],
            "rise": [list(p) for p in self._rise],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._n = max(_int_or(state.get("n"), 0) or 0, 0)
        self._m = max(_int_or(state.get("m"), 0) or 0, 0)
        self._at = _int_or(state.get("at"), None)
        last = state.get("last")
        self._last = None if last is None else _finite_float(last, 0.0)
        recent = state.get("recent", [])
        if isinstance(recent, list):
            self._recent = [_finite_float(v, 0.0) for v in recent[-3:]]
        self._smooth = _finite_float(state.get("smooth", 0.0), 0.0)
        move = _finite_float(state.get("move", self._move), self._move)
        self._move = move if move > 0.0 else self._move
        self._rising = bool(state.get("rising", False))
        self._above = max(_int_or(state.get("above"), 0) or 0, 0)
        for name in ("lows", "rise"):
            points = state.get(name, [])
            target = self._lows if name == "lows" else self._rise
            if isinstance(points, list):
                target.extend(
                    [_finite_float(p[0], 0.0), _finite_float(p[1], 0.0)]
                    for p in points
                    if isinstance(p, (list, tuple)) and len(p) == 2
                )
        if self._n >= 3 and (self._at is None or not self._lows or not self._rise):
            self.reset()  # an incomplete state: start afresh rather than half-loaded


class LossDivergenceDetector(_SustainedRise):
    """Slow divergence (``loss_divergence``): the loss keeps climbing above its recent low.

    Fires on every step where the smoothed log-loss (an EWMA of the median of the last three)
    is more than ``max(log rho, k sigma)`` above its lowest value within the last ``window``
    steps, and has risen by more than half that within the last ``window // 5`` steps: the
    margin keeps growing. ``rho = min_ratio``, ``k = sigmas``, ``sigma`` the noise of one loss
    (from consecutive losses). Silent for the first ``min_samples`` losses. A loss that doubles
    over 10 to 50 steps is flagged well before it has doubled (``benchmarks/detection.py``).

    Args:
        min_ratio: The least ratio of the smoothed loss to its low that counts (> 1).
        sigmas: The least margin in noise scales (> 0).
        window: Steps over which the low is taken (>= 1); the rise is measured over a fifth.
        min_samples: Losses before the rule may fire (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.LOSS_DIVERGENCE
    what = "the loss"
    advice = "; the lr may be past the stability limit"

    def __init__(
        self,
        *,
        min_ratio: float = 1.25,
        sigmas: float = 5.0,
        window: int = 100,
        min_samples: int = 10,
    ) -> None:
        super().__init__(min_ratio=min_ratio, sigmas=sigmas, window=window, min_samples=min_samples)


class GradNormRiseDetector(_SustainedRise):
    """A rising gradient norm (``grad_norm_rise``): far above its recent low, and climbing.

    The rule of :class:`LossDivergenceDetector` on the log of the global gradient norm, with a
    larger least ratio (gradient norms grow in healthy warmups too, but slowly).

    Args:
        min_ratio: The least ratio of the smoothed norm to its low that counts (> 1).
        sigmas: The least margin in noise scales (> 0).
        window: Steps over which the low is taken (>= 1); the rise is measured over a fifth.
        min_samples: Norms before the rule may fire (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.GRAD_NORM_RISE
    what = "the gradient norm"

    def __init__(
        self,
        *,
        min_ratio: float = 3.0,
        sigmas: float = 5.0,
        window: int = 100,
        min_samples: int = 10,
    ) -> None:
        super().__init__(min_ratio=min_ratio, sigmas=sigmas, window=window, min_samples=min_samples)
