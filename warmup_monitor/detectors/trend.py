r"""Spikes against a robust trend of the log: the loss and the gradient norm far above forecast.

Three forecasts of ``y = log(x)`` run side by side, fed at the optimizer steps given (gaps
allowed); the rule uses the one whose recent errors are smallest, and calls a value a spike when
it is above that forecast by more than ``k`` robust noise scales (in the value's own units, as a
z-score would), and at least by a small ratio. Until the noise is known (the first
``early_samples`` values) a conservative ratio applies instead, so the rule decides from the
second value. :class:`GradNormSpikeDetector` uses it (a notice); the loss rule, whose noise is
heavy-tailed, is :mod:`warmup_monitor.detectors.loss_trend`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor._checks import check_int_or_off
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.detectors._common import MAD_TO_SIGMA
from warmup_monitor.detectors._common import finite_float as _finite_float
from warmup_monitor.detectors._common import int_or as _int_or
from warmup_monitor.detectors._common import log_positive as _log
from warmup_monitor.detectors._common import safe_exp as _exp

__all__ = ["GradNormSpikeDetector"]

_LOG2 = math.log(2.0)


def _floats(values: Any, n: int) -> list[float] | None:
    """``n`` finite floats from a saved list, or ``None``."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return None
    return [_finite_float(v, 0.0) for v in values]


class _Holt:
    """One of the forecasts: Holt's level and slope of the log, and the scale of its errors."""

    __slots__ = ("alpha", "at", "beta", "clipped", "level", "m", "scale", "slope")

    def __init__(self, alpha: float, beta: float, scale: float) -> None:
        self.alpha, self.beta = alpha, beta
        self.level = self.slope = 0.0
        self.at: int | None = None  # step of the level
        self.scale = scale  # mean absolute error
        self.m = 0  # updates of the scale
        self.clipped = 0  # consecutive clipped errors, signed: > 0 above the forecast

    def predict(self, step: int, cap: float) -> float:
        """The forecast at ``step``; the slope is followed for at most ``cap`` steps."""
        return self.level + self.slope * min(max(step - (self.at or 0), 1), cap)

    def restart(self, step: int, y: float, slope: float) -> None:
        self.level, self.slope, self.at, self.clipped = y, slope, step, 0

    def state(self) -> list[float]:
        at = -1 if self.at is None else self.at
        return [self.level, self.slope, float(at), self.scale, float(self.m), float(self.clipped)]

    def load(self, values: Any, fallback_scale: float) -> None:
        if not isinstance(values, (list, tuple)) or len(values) != 6:
            return
        v = [_finite_float(x, 0.0) for x in values]
        self.level, self.slope = v[0], v[1]
        self.at = None if v[2] < 0 else int(v[2])
        self.scale = v[3] if v[3] > 0 else fallback_scale
        self.m, self.clipped = max(int(v[4]), 0), int(v[5])


class _LogTrendSpike:
    r"""Robust one-step-ahead forecasts of ``log(x)`` and the rule "x jumped far above them".

    **Forecasts.** Holt's linear trend on ``y = log(x)`` with fast, middle and slow smoothing
    (:attr:`smoothing`): a level ``m`` (at the step of the last value it took in) and a slope
    ``b`` per step,
    predicting ``p = m + b min(h, 3 g)`` for a value ``h`` steps later (``g`` the usual gap: a
    run of spikes does not run the slope on). Each keeps ``s``, the exponentially weighted mean
    of its absolute errors (weight ``max(1/(n+1), 0.01)``, from a prior of 20 % noise). The rule
    uses the forecast with the smallest ``s``: the slow one on a noisy, slowly moving value
    (its error is then little more than the noise), the fast one on a value that falls fast.

    **Threshold.** With ``sigma = sqrt(pi/2) s`` and ``k`` widened for a scale learned from
    ``nu`` errors (a Student-t quantile, ``k' = k + (k^3 + k) / (4 nu)``, ``nu = 0.88 min(n + 1,
    199)``):

    .. math::

        r_t = y_t - p_t, \qquad
        \tau_t = \max\left(\log(1 + k' \sigma_t),\ \log \rho_t\right), \qquad
        \text{spike} \iff r_t > \tau_t
        \ \text{ or }\ r_t, r_{t-1} > \tau^{(0.7 k)}

    that is ``x > forecast * (1 + k' sigma)`` (a z-score in the value's units), with ``rho_t =
    min_ratio``; two values in a row above the threshold for ``0.7 k`` are a spike too (a step
    up that lasts). While fewer than ``early_samples`` values have entered the forecasts the
    noise is unknown and the threshold is ``early_ratio`` alone.

    **Robustness.** A spike moves no forecast and no scale (the running statistics are never
    poisoned by the outlier they flag); after ``rebaseline_steps`` consecutive spikes the
    forecasts restart from the current value (a new level, not a spike). Smaller errors beyond
    3 sigma are clipped at 3 sigma in the updates; two of them in a row on the same side restart
    the fast forecast at the current value (with the slope of the smaller of the last two moves
    when both went the same way beyond the noise: a steep fall), five the slower ones (at the
    fast one's level). After a step down of at most half that levels off (a catapult landing
    below its trend), a return to the forecast from before it is not a spike for
    ``rebaseline_steps`` steps. A gap between steps more than 20 times the usual one restarts
    the forecasts (the trends are stale). Values that are not finite and > 0 are ignored.
    """

    kind: AlertKind = AlertKind.LOSS_TREND_SPIKE
    what = "value"
    #: (level, slope) smoothing of the fast, the middle and the slow forecast.
    smoothing = ((0.5, 0.3), (0.2, 0.05), (0.05, 0.01))
    #: Clipped errors in a row after which a slower forecast takes the fast one's level.
    resync_clips = 5
    #: Two values in a row above this fraction of the threshold's sigmas also make a spike.
    pair_fraction = 0.7
    #: Weight of a new error in the scales (after the first ones), the noise before any data
    #: (10 %) and its weight, and the least scale.
    gamma, prior_noise, prior_weight, min_spread = 0.01, 0.2, 1.0, 0.0005
    #: The efficiency of a mean absolute error against a standard deviation (normal data), and
    #: the denominator of the Cornish-Fisher term (4 for a Student-t quantile).
    mad_efficiency, widen = 0.88, 4.0
    #: Forecast errors are clipped at this many sigmas in the updates (Huber).
    clip_sigmas = 3.0
    #: A gap this many times the usual one restarts the forecasts.
    stale_gap = 20.0

    def __init__(
        self,
        *,
        sigmas: float,
        min_ratio: float,
        early_ratio: float,
        early_samples: int = 10,
        rebaseline_steps: int = 20,
    ) -> None:
        self.sigmas = _check_float("sigmas", sigmas, above=0.0)
        self.min_ratio = _check_float("min_ratio", min_ratio, above=1.0)
        self.early_ratio = _check_float("early_ratio", early_ratio, above=1.0)
        self.early_samples = _check_int("early_samples", early_samples, minimum=1)
        self.rebaseline_steps = _check_int("rebaseline_steps", rebaseline_steps, minimum=1)
        self._log_min_ratio = math.log(self.min_ratio)
        self._log_early_ratio = math.log(self.early_ratio)
        self.reset()

    def reset(self) -> None:
        prior = self.prior_noise / MAD_TO_SIGMA
        self._fits = [_Holt(a, b, prior) for a, b in self.smoothing]
        self._n = 0  # values accepted into the forecasts
        self._gap = 0.0  # usual gap between steps (0: unknown)
        self._above = 0  # consecutive spikes
        self._high = False  # the last value was above the threshold for two in a row
        self._recent: list[list[float]] = []  # the last two [step, y] that were not spikes
        # The best forecast [level, slope, step] before a drop began, and, after a step down,
        # that forecast with the last step it still counts: a return to it is not a spike.
        self._drop: list[float] | None = None
        self._shadow: list[float] | None = None

    def _best(self) -> _Holt:
        best = self._fits[0]
        for fit in self._fits[1:]:
            if fit.scale < best.scale:
                best = fit
        return best

    @property
    def sigma(self) -> float:
        """The robust noise scale of the log (about the relative noise of the value)."""
        return MAD_TO_SIGMA * self._best().scale

    def _sigmas(self, fit: _Holt, pair: bool = False) -> float:
        """``k`` widened for a scale learned from few errors (a Student-t quantile's
        Cornish-Fisher term, ``k + (k^3 + k) / (4 nu)``, ``nu`` the errors behind the scale)."""
        k = self.sigmas * (self.pair_fraction if pair else 1.0)
        nu = self.mad_efficiency * min(fit.m + self.prior_weight, 2.0 / self.gamma - 1.0)
        return k + (k**3 + k) / (self.widen * nu)

    def threshold_log(self, pair: bool = False, best: _Holt | None = None) -> float:
        """The current threshold ``tau`` on the log residual (``pair``: for two in a row)."""
        if self._n < self.early_samples:  # the noise is unknown: a fixed, conservative ratio
            return self._log_early_ratio
        best = best or self._best()
        noise = math.log1p(self._sigmas(best, pair) * MAD_TO_SIGMA * best.scale)
        return max(noise, self._log_min_ratio)

    def _cap(self) -> float:
        """The most steps a slope is followed: three usual gaps (a spike must not run it on)."""
        return 3.0 * max(self._gap, 1.0)

    def forecast(self, step: int) -> float | None:
        """The forecast (not its log) at ``step``, or ``None`` before the first value."""
        best = self._best()
        if self._n == 0 or best.at is None:
            return None
        return _exp(best.predict(step, self._cap()))

    def _restart_all(self, step: int, y: float) -> None:
        for fit in self._fits:
            fit.restart(step, y, 0.0)
        self._above = 0
        self._high = False
        self._drop = self._shadow = None
        self._remember(step, y)

    def _recent_slope(self, step: int, y: float, sigma: float) -> float:
        """The slope of the smaller of the last two moves, if both went the same way by more
        than the noise (2 sigma of a move, ``sigma`` that of one value), else 0."""
        if len(self._recent) < 2:
            return 0.0
        (s0, y0), (s1, y1) = self._recent
        d1, d2 = y1 - y0, y - y1
        if d1 * d2 <= 0.0 or min(abs(d1), abs(d2)) <= 2.0 * math.sqrt(2.0) * sigma:
            return 0.0
        slope = min(d1 / max(s1 - s0, 1.0), d2 / max(step - s1, 1.0), key=abs)
        return slope

    def _remember(self, step: int, y: float) -> None:
        self._recent = [*self._recent[-1:], [float(step), y]]

    def update(self, step: int, value: float | None) -> Alert | None:
        """Feed one value at optimizer step ``step``; return an alert if it is a spike."""
        y = None if value is None else _log(value)
        if value is None or y is None:
            return None
        best = self._best()
        if self._n == 0 or best.at is None:
            self._restart_all(step, y)
            self._n = 1
            return None
        h = max(step - best.at, 1)
        if self._gap > 0.0 and h > self.stale_gap * self._gap:
            self._restart_all(step, y)  # the trends are stale: nothing to compare with
            return None
        pred = best.predict(step, self._cap())
        ref = self._reference(step, pred)
        r = y - ref
        tau, tau_pair = self.threshold_log(best=best), self.threshold_log(True, best)
        high = r > tau_pair
        was_high, self._high = self._high, high
        if r > tau or (high and was_high):
            self._above += 1
            alert = self._alert(step, value, ref, r, tau if r > tau else tau_pair)
            if self._above >= self.rebaseline_steps:
                self._restart_all(step, y)
            return alert
        self._above = 0
        self._watch_drop(step, y, y - pred, best)
        self._gap = float(h) if self._gap == 0.0 else self._gap + 0.1 * (h - self._gap)
        for fit in self._fits:
            self._absorb(fit, step, y)
        self._remember(step, y)
        self._n += 1
        return None

    def _reference(self, step: int, pred: float) -> float:
        """The forecast a spike is measured against: after a step down, the forecast from
        before it while that is higher (a loss back at its old level has not spiked)."""
        if self._shadow is None:
            return pred
        level, slope, at, until = self._shadow
        old = level + slope * min(max(step - at, 1.0), self._cap())
        if step > until or old <= pred:
            self._shadow = None
            return pred
        return old

    def _watch_drop(self, step: int, y: float, r: float, best: _Holt) -> None:
        """Note a drop below the best forecast (beyond its clip); a second one that levels
        off (it moved less than half the first, which at most halved the value) makes the
        forecast before it the shadow."""
        if r >= -self.clip_sigmas * MAD_TO_SIGMA * best.scale:
            self._drop = None
            return
        if self._drop is None:
            self._drop = [best.level, best.slope, float(best.at or 0)]
            return
        if len(self._recent) == 2:
            (_, y0), (_, y1) = self._recent
            if abs(y - y1) < 0.5 * abs(y1 - y0) and y1 - y0 >= -_LOG2:  # at most halved
                self._shadow = [*self._drop, float(step + self.rebaseline_steps)]

    def _absorb(self, fit: _Holt, step: int, y: float) -> None:
        """Take a value that is not a spike into one forecast and its error scale."""
        h = max(step - (fit.at or 0), 1)
        pred = fit.predict(step, self._cap())
        r = y - pred
        sigma = MAD_TO_SIGMA * fit.scale
        clip = self.clip_sigmas * sigma
        fit.m += 1
        weight = max(self.gamma, 1.0 / (fit.m + self.prior_weight))
        fit.scale = max(fit.scale + weight * (min(abs(r), clip) - fit.scale), self.min_spread)
        if abs(r) > clip:
            sign = 1 if r > 0 else -1
            fit.clipped = fit.clipped + sign if fit.clipped * sign > 0 else sign
            fast = self._fits[0]
            if fit is fast and abs(fit.clipped) >= 2:  # a move, not an outlier: follow it
                fit.restart(step, y, self._recent_slope(step, y, sigma))
                return
            if abs(fit.clipped) >= self.resync_clips:  # the slower ones take the fast level
                fit.restart(step, fast.level, fit.slope)
                return
            r = math.copysign(clip, r)
        else:
            fit.clipped = 0
        level = pred + fit.alpha * r
        slope = fit.slope + fit.beta * ((level - fit.level) / h - fit.slope)
        fit.level, fit.slope, fit.at = level, slope, step

    def _alert(self, step: int, value: float, pred: float, r: float, tau: float) -> Alert:
        trend = _exp(pred)
        ratio = _exp(r)
        return Alert(
            step=step,
            kind=self.kind,
            message=(
                f"{self.what} {value:.4g} is {ratio:.3g}x its recent trend {trend:.4g} "
                f"(limit {_exp(tau):.3g}x)"
            ),
            value=value,
            threshold=_exp(pred + tau),
            details={
                "trend": trend,
                "ratio_to_trend": ratio,
                "limit_ratio": _exp(tau),
                "noise": self.sigma,
                "consecutive": self._above,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self._n,
            "gap": self._gap,
            "above": self._above,
            "high": self._high,
            "fits": [fit.state() for fit in self._fits],
            "recent": [list(p) for p in self._recent],
            "drop": None if self._drop is None else list(self._drop),
            "shadow": None if self._shadow is None else list(self._shadow),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._n = max(_int_or(state.get("n"), 0) or 0, 0)
        self._gap = max(_finite_float(state.get("gap", 0.0), 0.0), 0.0)
        self._above = max(_int_or(state.get("above"), 0) or 0, 0)
        self._high = bool(state.get("high", False))
        fits = state.get("fits", [])
        if isinstance(fits, list) and len(fits) == len(self._fits):
            for fit, values in zip(self._fits, fits, strict=True):
                fit.load(values, fit.scale)
        if self._n and any(fit.at is None for fit in self._fits):
            self.reset()  # an incomplete state (e.g. from an older version): start afresh
            return
        recent = state.get("recent", [])
        if isinstance(recent, list):
            self._recent = [
                [_finite_float(p[0], 0.0), _finite_float(p[1], 0.0)]
                for p in recent[-2:]
                if isinstance(p, (list, tuple)) and len(p) == 2
            ]
        self._drop = _floats(state.get("drop"), 3)
        self._shadow = _floats(state.get("shadow"), 4)


class GradNormSpikeDetector(_LogTrendSpike):
    """Gradient-norm spike: the global gradient norm far above its recent trend, or far above
    the mean of a long window.

    The rule of :class:`LossTrendDetector` on ``log(grad_norm)``, but the trends may rise
    (gradient norms often grow while the lr warms up). Usable from the second update; norms
    that are not finite and > 0 are ignored.

    Besides, OLMo-core's z-score rule (``SkipStepOptimizer``): once ``zscore_window // 2``
    norms are kept, a norm with ``(x - mean) / std > zscore_sigmas`` over the previous (up to)
    ``zscore_window`` norms, spikes included (``std`` with ``n - 1``), is a spike. The trend
    rule follows a small lasting step up within a few steps; the long window keeps it in view,
    so that no spike OLMo-core's rule finds is missed here (``benchmarks/README_detection.md``).

    Args:
        sigmas: Robust noise scales above the forecast that make a spike (> 0).
        min_ratio: The least ratio to the forecast that makes a spike (> 1).
        early_ratio: The least ratio while the noise scale is unknown (> 1).
        early_samples: Norms before the noise scale is trusted (>= 1).
        rebaseline_steps: Consecutive spikes after which the new level is accepted (>= 1).
        zscore_window: Norms in the z-score's window (0: the z-score rule is off; else >= 8).
        zscore_sigmas: Standard deviations above the window's mean that make a spike (> 0).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.GRAD_NORM_SPIKE
    what = "gradient norm"

    def __init__(
        self,
        *,
        sigmas: float = 5.7,
        min_ratio: float = 1.1,
        early_ratio: float = 3.0,
        early_samples: int = 10,
        rebaseline_steps: int = 20,
        zscore_window: int = 128,
        zscore_sigmas: float = 6.0,
    ) -> None:
        self.zscore_window = check_int_or_off("zscore_window", zscore_window, minimum=8)
        self.zscore_sigmas = _check_float("zscore_sigmas", zscore_sigmas, above=0.0)
        super().__init__(
            sigmas=sigmas,
            min_ratio=min_ratio,
            early_ratio=early_ratio,
            early_samples=early_samples,
            rebaseline_steps=rebaseline_steps,
        )

    def reset(self) -> None:
        super().reset()
        self._window: deque[float] = deque(maxlen=max(self.zscore_window, 1))
        self._resum()

    def _resum(self) -> None:
        """Sums of the window's deviations from its mean, the shift ``_ref`` (they are then kept
        up to date per value, and redone each time the window has turned over). Plain float
        sums: a huge norm makes them inf or NaN for a while (no alert), never an exception."""
        kept = self._window
        n = max(len(kept), 1)
        self._ref = sum(v / n for v in kept)
        self._sum = sum(v - self._ref for v in kept)
        self._sq = sum((v - self._ref) * (v - self._ref) for v in kept)
        self._fresh = 0  # values taken in since

    def update(self, step: int, value: float | None) -> Alert | None:
        """Feed one gradient norm at optimizer step ``step``; return an alert if it is a spike
        (by the trend rule, or else by the z-score rule)."""
        z = self._zscore(value)
        alert = super().update(step, value)
        if alert is not None or z is None or value is None:
            return alert
        mean, std, zs, n = z
        return Alert(
            step=step,
            kind=self.kind,
            message=(
                f"gradient norm {value:.4g} is {zs:.3g} standard deviations above the mean "
                f"{mean:.4g} of the last {n} (limit {self.zscore_sigmas:g})"
            ),
            value=value,
            threshold=mean + self.zscore_sigmas * std,
            details={"rule": "zscore", "zscore": zs, "mean": mean, "std": std},
        )

    def _zscore(self, value: float | None) -> tuple[float, float, float, int] | None:
        """``(mean, std, z, n)`` of ``value`` against the window when it fires; keeps the value."""
        if not self.zscore_window or value is None:
            return None
        x = float(value)
        if not (math.isfinite(x) and x > 0.0):
            return None
        kept, ref = self._window, self._ref
        out = None
        if len(kept) + 1 >= self.zscore_window // 2:
            n = len(kept)
            mean = ref + self._sum / n
            std = math.sqrt(max(self._sq - self._sum * self._sum / n, 0.0) / (n - 1))
            if x > mean and (std == 0.0 or (x - mean) / std > self.zscore_sigmas):
                out = (mean, std, math.inf if std == 0.0 else (x - mean) / std, n)
        if len(kept) == kept.maxlen:
            old = kept[0] - ref
            self._sum, self._sq = self._sum - old, self._sq - old * old
        kept.append(x)
        self._sum, self._sq = self._sum + (x - ref), self._sq + (x - ref) * (x - ref)
        self._fresh += 1
        if self._fresh >= self.zscore_window:
            self._resum()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "window": list(self._window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        window = state.get("window")
        if isinstance(window, list):
            self._window.extend(
                float(v) for v in window if isinstance(v, (int, float)) and math.isfinite(v)
            )
        self._resum()
