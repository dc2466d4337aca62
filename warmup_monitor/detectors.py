"""Instability detectors: pure decisions over floats, usable from the first optimizer steps.

Each detector follows one protocol: ``update(step, ...) -> Alert | None``, ``state_dict()``
(primitives only), ``load_state_dict(state)`` (missing keys fall back to a fresh state) and
``reset()``. :class:`InstabilityDetector` composes them with the defaults that
:class:`~warmup_monitor.WarmupMonitor` uses.

- :class:`LossRatioDetector` (``loss_spike``): the loss above 10 x the initial loss.
- :class:`LossTrendDetector` (``loss_trend_spike``): the log-loss above its robust trend by
  more than max(8 sigma, log 2); from the second update.
- :class:`GradNormSpikeDetector` (``grad_norm_spike``): the log gradient norm above its robust
  trend by more than max(8 sigma, log 3); from the second update.
- :class:`NonFiniteDetector` (``non_finite``): the loss or the gradient norm is NaN or inf.
- :class:`OscillationDetector` (``oscillation``): the last 5 consecutive-gradient cosines all
  negative, with a mean below -0.5.
- :class:`PersistenceDetector` (``transient`` / ``persistent_instability``): an episode of
  flagged steps that ends before 5 steps is transient; one that lasts 5 steps, or the third
  episode within 100 steps, is persistent.

Bad input never raises inside ``update``: NaN, inf, zero and negative values are ignored by the
rules that cannot use them (and reported by :class:`NonFiniteDetector`), and never enter a
running statistic.

This module imports no Lightning and no torch: it runs on Python floats, in microseconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from typing import Any, Protocol

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import Detection

__all__ = [
    "Detector",
    "GradNormSpikeDetector",
    "InstabilityDetector",
    "LossRatioDetector",
    "LossTrendDetector",
    "NonFiniteDetector",
    "OscillationDetector",
    "PersistenceDetector",
]

# Kinds whose alerts flag a step for the persistence rule (its own kinds are excluded).
_FLAGGING_KINDS = frozenset(
    {
        AlertKind.LOSS_SPIKE,
        AlertKind.LOSS_TREND_SPIKE,
        AlertKind.GRAD_NORM_SPIKE,
        AlertKind.NON_FINITE,
        AlertKind.OSCILLATION,
    }
)
# sqrt(pi / 2): a normal distribution's sigma over its mean absolute deviation.
_MAD_TO_SIGMA = math.sqrt(math.pi / 2)
_MAX_EXP = 700.0


class Detector(Protocol):
    """The protocol every detector follows (besides ``update(step, ...) -> Alert | None``)."""

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _exp(x: float) -> float:
    """``exp`` that saturates instead of overflowing."""
    return math.exp(min(x, _MAX_EXP))


def _finite_float(value: Any, default: float) -> float:
    """``float(value)`` if it is finite, else ``default`` (for tolerant state loading)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _detail(x: float) -> float | str:
    """A JSON-safe float for an alert's details: non-finite values become strings."""
    return x if math.isfinite(x) else str(x)


def _check_cosine(name: str, value: Any) -> float:
    value = _check_float(name, value, minimum=-1.0)
    if value >= 0.0:
        raise ValueError(f"`{name}` must be in [-1, 0), got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# The 10x rule and non-finite values
# ---------------------------------------------------------------------------------------------


class LossRatioDetector:
    """The initial-loss rule: alert when ``loss > spike_factor * initial_loss``.

    The initial loss is the mean of the first ``initial_loss_steps`` finite losses. Until it is
    known (the first ``initial_loss_steps`` finite updates) the rule cannot fire. It catches
    disasters only; :class:`LossTrendDetector` catches spikes against the recent trend.

    Args:
        spike_factor: The multiple of the initial loss that counts as a spike; must be > 1.
        initial_loss_steps: How many finite losses define the initial loss; must be >= 1.

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.LOSS_SPIKE

    def __init__(self, *, spike_factor: float = 10.0, initial_loss_steps: int = 1) -> None:
        self.spike_factor = _check_float("spike_factor", spike_factor, above=1.0)
        self.initial_loss_steps = _check_int("initial_loss_steps", initial_loss_steps, minimum=1)
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    @property
    def initial_loss(self) -> float | None:
        """The initial loss once it is defined, else ``None``."""
        if self._count < self.initial_loss_steps or self._count == 0:
            return None
        return self._sum / self._count

    def loss_ratio(self, loss: float) -> float | None:
        """``loss / initial_loss``, or ``None`` while the initial loss is unknown or zero."""
        initial = self.initial_loss
        if initial is None or initial == 0.0 or not _is_finite(loss):
            return None
        return loss / initial

    def update(self, step: int, loss: float | None) -> Alert | None:
        """Feed one optimizer step's loss; return a ``loss_spike`` alert if the rule fires."""
        if loss is None or not math.isfinite(loss):
            return None
        if self._count < self.initial_loss_steps:
            total = self._sum + loss
            if math.isfinite(total):  # two losses of 1e308 would overflow the sum
                self._sum = total
                self._count += 1
            return None
        initial = self.initial_loss
        if initial is None or initial <= 0:
            return None
        threshold = self.spike_factor * initial
        if loss > threshold:
            ratio = loss / initial
            return Alert(
                step=step,
                kind=AlertKind.LOSS_SPIKE,
                message=(
                    f"loss {loss:.4g} is {ratio:.1f}x the initial loss {initial:.4g} "
                    f"(limit {self.spike_factor:g}x)"
                ),
                value=loss,
                threshold=threshold,
                details={"initial_loss": initial, "loss_ratio": _detail(ratio)},
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = _finite_float(state.get("sum", 0.0), 0.0)
        self._count = int(state.get("count", 0))


class NonFiniteDetector:
    """Alert when the loss or the gradient norm is NaN or infinite. Stateless."""

    kind = AlertKind.NON_FINITE

    def reset(self) -> None:
        pass

    def update(self, step: int, loss: float | None, grad_norm: float | None = None) -> Alert | None:
        """Return a ``non_finite`` alert naming which value was not finite."""
        bad = []
        if loss is not None and not math.isfinite(loss):
            bad.append(("loss", loss))
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(("gradient norm", grad_norm))
        if not bad:
            return None
        what = " and ".join(f"{name} is {value}" for name, value in bad)
        return Alert(
            step=step,
            kind=AlertKind.NON_FINITE,
            message=f"non-finite values: {what}",
            value=bad[0][1],
            threshold=math.inf,
            details={name.replace(" ", "_"): str(value) for name, value in bad},
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Spikes against a robust trend of the log
# ---------------------------------------------------------------------------------------------


class _LogTrendSpike:
    r"""A robust one-step-ahead forecast of ``log(x)`` and the rule "x jumped far above it".

    The forecast is Holt's linear trend on ``y = log(x)``: a level ``m`` and a slope ``b``
    (for a loss, never above 0: a rising loss is not a trend to follow), predicting
    ``p = m + b``. The spread ``s`` is the exponentially weighted mean of the positive forecast
    errors (a falling loss that the forecast lags behind gives negative errors, which must not
    blunt the rule), started from a prior so that the rule can decide from the second value:

    .. math::

        r_t = y_t - p_t, \qquad
        \tau_t = \max\left(k \sqrt{\pi/2}\, s_t,\ \log \rho\right), \qquad
        \text{spike} \iff r_t > \tau_t

    A spike does not move ``m``, ``b`` or ``s`` (the running statistics are never poisoned by
    the outlier they flag); after ``rebaseline_steps`` consecutive spikes the forecast restarts
    from the current value (a new level, not a spike). Smaller errors beyond 3 sigma are
    clipped at 3 sigma in the updates (one very low or high value must not drag the forecast);
    two of them in a row on the same side restart the forecast at the current value (a steep
    fall or rise, or the recovery after a spike). Values that are not finite and > 0 are
    ignored.
    """

    kind: AlertKind = AlertKind.LOSS_TREND_SPIKE
    what = "value"
    decreasing_only = False
    #: Level and slope smoothing, spread smoothing (after the first updates).
    alpha, beta, gamma = 0.5, 0.3, 0.05
    #: The spread before any data (5 % noise), its weight in updates, and its floor (1 %: a
    #: constant value must not shrink it to nothing).
    prior_spread, prior_weight, min_spread = 0.05, 4.0, 0.01
    #: Forecast errors are clipped at this many sigmas in the updates (Huber).
    clip_sigmas = 3.0

    def __init__(self, *, sigmas: float, min_ratio: float, rebaseline_steps: int = 20) -> None:
        self.sigmas = _check_float("sigmas", sigmas, above=0.0)
        self.min_ratio = _check_float("min_ratio", min_ratio, above=1.0)
        self.rebaseline_steps = _check_int("rebaseline_steps", rebaseline_steps, minimum=1)
        self._log_min_ratio = math.log(self.min_ratio)
        self.reset()

    def reset(self) -> None:
        self._n = 0  # values accepted into the forecast
        self._m = 0  # updates of the spread
        self._level = 0.0
        self._slope = 0.0
        self._spread = self.prior_spread
        self._above = 0  # consecutive spikes
        self._clipped = 0  # consecutive clipped errors, signed: > 0 above the forecast

    def threshold_log(self) -> float:
        """The current threshold ``tau`` on the log residual."""
        return max(self.sigmas * _MAD_TO_SIGMA * self._spread, self._log_min_ratio)

    def forecast(self) -> float | None:
        """The forecast of the next value (not its log), or ``None`` before the first value."""
        if self._n == 0:
            return None
        return _exp(self._level + self._slope)

    def _restart(self, y: float) -> None:
        self._level = y
        self._slope = 0.0
        self._above = 0
        self._clipped = 0

    def update(self, step: int, value: float | None) -> Alert | None:
        """Feed one value; return an alert if it is a spike against the trend."""
        if value is None or not math.isfinite(value) or value <= 0.0:
            return None
        y = math.log(value)
        if self._n == 0:
            self._restart(y)
            self._n = 1
            return None
        pred = self._level + self._slope
        r = y - pred
        tau = self.threshold_log()
        if r > tau:
            self._above += 1
            self._clipped = 0
            alert = self._alert(step, value, pred, r, tau)
            if self._above >= self.rebaseline_steps:
                self._restart(y)
            return alert
        self._above = 0
        clip = self.clip_sigmas * _MAD_TO_SIGMA * self._spread
        if abs(r) > clip:
            sign = 1 if r > 0 else -1
            self._clipped = self._clipped + sign if self._clipped * sign > 0 else sign
            if abs(self._clipped) >= 2:  # a move, not an outlier: follow it at once
                self._restart(y)
                return None
            r = math.copysign(clip, r)
        else:
            self._clipped = 0
        level = pred + self.alpha * r
        slope = self._slope + self.beta * (level - self._level - self._slope)
        if self.decreasing_only:
            slope = min(slope, 0.0)
        self._level, self._slope = level, slope
        self._n += 1
        if r >= 0.0:
            self._m += 1
            weight = max(self.gamma, 1.0 / (self._m + self.prior_weight))
            self._spread = max(self._spread + weight * (r - self._spread), self.min_spread)
        return None

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
                "consecutive": self._above,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self._n,
            "m": self._m,
            "level": self._level,
            "slope": self._slope,
            "spread": self._spread,
            "above": self._above,
            "clipped": self._clipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._n = max(int(state.get("n", 0)), 0)
        self._m = max(int(state.get("m", 0)), 0)
        self._level = _finite_float(state.get("level", 0.0), 0.0)
        self._slope = _finite_float(state.get("slope", 0.0), 0.0)
        spread = abs(_finite_float(state.get("spread", self.prior_spread), self.prior_spread))
        self._spread = max(spread, self.min_spread)
        self._above = max(int(state.get("above", 0)), 0)
        self._clipped = int(state.get("clipped", 0))


class LossTrendDetector(_LogTrendSpike):
    """Relative loss spike: the loss far above its own recent trend, from the second update.

    Works on the log of the loss, so that a loss falling steeply (a power law early in
    training) is a straight, slowly bending line, and noise that shrinks with the loss has a
    constant spread. A robust forecast (Holt's level and slope, the slope never above 0) says
    where the loss should be; the noise scale is the running mean of the positive forecast
    errors (so that a steep fall, which the forecast lags behind, does not inflate it). Steep
    falls are followed at once (two drops of more than 3 sigma restart the forecast lower). A
    loss is a spike when

    .. math::

        \\log \\text{loss}_t - \\text{forecast}_t > \\max(k\\,\\hat\\sigma_t,\\ \\log \\rho)

    with ``k = sigmas`` (default 8) and ``rho = min_ratio`` (default 2): at least twice the
    trend, and far outside the noise. Before the spread is learned, a prior spread of 5 % is
    used, so the rule is usable from the second update. A spike never updates the forecast or
    the spread; after ``rebaseline_steps`` (20) consecutive spikes the new level is accepted.
    Losses that are not finite and > 0 are ignored.

    Args:
        sigmas: The multiple of the robust noise scale that counts as a spike (> 0).
        min_ratio: The least ratio to the trend that counts as a spike (> 1).
        rebaseline_steps: Consecutive spikes after which the new level is accepted (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.LOSS_TREND_SPIKE
    what = "loss"
    decreasing_only = True

    def __init__(
        self, *, sigmas: float = 8.0, min_ratio: float = 2.0, rebaseline_steps: int = 20
    ) -> None:
        super().__init__(sigmas=sigmas, min_ratio=min_ratio, rebaseline_steps=rebaseline_steps)


class GradNormSpikeDetector(_LogTrendSpike):
    """Gradient-norm spike: the global gradient norm far above its recent trend.

    The same robust rule as :class:`LossTrendDetector` on ``log(grad_norm)``, but the trend may
    rise (gradient norms often grow while the lr warms up): a spike is a norm more than
    ``max(k sigma, log rho)`` above the forecast, ``k = sigmas`` (default 8), ``rho =
    min_ratio`` (default 3). Usable from the second update; norms that are not finite and > 0
    are ignored.

    Args:
        sigmas: The multiple of the robust noise scale that counts as a spike (> 0).
        min_ratio: The least ratio to the trend that counts as a spike (> 1).
        rebaseline_steps: Consecutive spikes after which the new level is accepted (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.GRAD_NORM_SPIKE
    what = "gradient norm"
    decreasing_only = False

    def __init__(
        self, *, sigmas: float = 8.0, min_ratio: float = 3.0, rebaseline_steps: int = 20
    ) -> None:
        super().__init__(sigmas=sigmas, min_ratio=min_ratio, rebaseline_steps=rebaseline_steps)


# ---------------------------------------------------------------------------------------------
# Oscillation and persistence
# ---------------------------------------------------------------------------------------------


class OscillationDetector:
    """Gradient direction flipping step after step: an lr above the local stability limit.

    Along a direction of curvature ``lambda``, gradient descent with ``lr > 2 / lambda``
    overshoots and the gradient changes sign every step, so the cosine between consecutive
    gradients turns negative and stays negative. The rule fires on every step where the last
    ``steps`` cosines (default 5) are all negative and their mean is below ``cosine``
    (default -0.5). Missing or non-finite cosines are ignored (no evidence either way).
    Near convergence, mini-batch noise alone makes consecutive gradients mildly
    anti-correlated (and an lr between 1 and 2 / lambda makes them flip while converging):
    five steps averaging below -0.5 keep those apart from an lr past the limit
    (``benchmarks/detection.py``, divergence table).

    Args:
        cosine: The mean cosine below which the gradients oscillate, in [-1, 0).
        steps: How many consecutive cosines must agree (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kind = AlertKind.OSCILLATION

    def __init__(self, *, cosine: float = -0.5, steps: int = 5) -> None:
        self.cosine = _check_cosine("cosine", cosine)
        self.steps = _check_int("steps", steps, minimum=1)
        self.reset()

    def reset(self) -> None:
        self._recent: deque[float] = deque(maxlen=self.steps)
        self._run = 0  # consecutive steps on which the rule held

    def update(self, step: int, cosine: float | None) -> Alert | None:
        """Feed one step's gradient cosine; return an ``oscillation`` alert if the rule holds."""
        if cosine is None or not math.isfinite(cosine):
            return None
        self._recent.append(min(max(cosine, -1.0), 1.0))
        if len(self._recent) < self.steps or max(self._recent) >= 0.0:
            self._run = 0
            return None
        mean = sum(self._recent) / len(self._recent)
        if mean >= self.cosine:
            self._run = 0
            return None
        self._run += 1
        return Alert(
            step=step,
            kind=AlertKind.OSCILLATION,
            message=(
                f"consecutive gradients point against each other: mean cosine {mean:.2f} over "
                f"the last {self.steps} steps (limit {self.cosine:g}); the lr is likely above "
                "the local stability limit 2/lambda_max"
            ),
            value=mean,
            threshold=self.cosine,
            details={"cosines": list(self._recent), "consecutive": self._run},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self._recent), "run": self._run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recent = [_finite_float(c, 0.0) for c in state.get("recent", [])]
        self._recent = deque((min(max(c, -1.0), 1.0) for c in recent), maxlen=self.steps)
        self._run = max(int(state.get("run", 0)), 0)


class PersistenceDetector:
    """Tell a transient excursion from instability that persists or repeats.

    Fed, each step, whether any instability rule flagged it. Consecutive flagged steps form an
    *episode*. ``persistent_instability`` is raised when

    - an episode reaches ``persist_steps`` flagged steps (default 5): it **persists**; or
    - an episode starts while ``repeat_count - 1`` other episodes (default 2) started within
      the last ``repeat_window`` steps (default 100): it **repeats**;

    at most once per ``repeat_window`` steps: episodes that start within ``repeat_window``
    steps of the last ``persistent_instability`` belong to it, and an episode that goes on
    raises it again every ``repeat_window`` steps. An episode that ends (a step with data and
    no flag) without belonging to a persistent instability raises ``transient`` on that step:
    it recovered at once, e.g. a one-step catapult. Steps without data (``flagged=None``)
    change nothing.

    Args:
        persist_steps: Flagged steps in a row that make an episode persistent (>= 1).
        repeat_count: Episodes within ``repeat_window`` steps that make instability repeated
            (>= 2).
        repeat_window: The window, in steps, for ``repeat_count`` and between two
            ``persistent_instability`` alerts (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kinds = (AlertKind.TRANSIENT, AlertKind.PERSISTENT_INSTABILITY)

    def __init__(
        self, *, persist_steps: int = 5, repeat_count: int = 3, repeat_window: int = 100
    ) -> None:
        self.persist_steps = _check_int("persist_steps", persist_steps, minimum=1)
        self.repeat_count = _check_int("repeat_count", repeat_count, minimum=2)
        self.repeat_window = _check_int("repeat_window", repeat_window, minimum=1)
        self.reset()

    def reset(self) -> None:
        self._onsets: deque[int] = deque(maxlen=self.repeat_count)
        self._start: int | None = None  # first step of the open episode
        self._length = 0
        self._escalated = False  # the open episode belongs to a persistent instability
        self._last: int | None = None  # step of the last persistent_instability
        self._kinds: list[str] = []  # kinds seen in the open episode

    def _cooling(self, step: int) -> bool:
        return self._last is not None and 0 <= step - self._last < self.repeat_window

    def update(self, step: int, flagged: bool | None, kinds: tuple[str, ...] = ()) -> Alert | None:
        """Feed whether ``step`` was flagged (``None``: no data); return a persistence alert.

        Args:
            step: The step.
            flagged: Whether an instability rule fired on this step; ``None`` if the step had
                no data.
            kinds: The kinds that flagged it (for the alert's details).
        """
        if flagged is None:
            return None
        if not flagged:
            if self._start is None:
                return None
            start, length, escalated = self._start, self._length, self._escalated
            kinds_seen = list(self._kinds)
            self._start, self._length, self._escalated, self._kinds = None, 0, False, []
            if escalated:
                return None
            span = f"step {start}" if length == 1 else f"steps {start}-{start + length - 1}"
            return Alert(
                step=step,
                kind=AlertKind.TRANSIENT,
                message=f"the instability of {span} recovered at once",
                value=float(length),
                threshold=float(self.persist_steps),
                details={"episode_start": start, "episode_steps": length, "kinds": kinds_seen},
            )
        for kind in kinds:
            if kind not in self._kinds:
                self._kinds.append(kind)
        if self._start is None:
            self._start, self._length = step, 1
            self._escalated = self._cooling(step)
            self._onsets.append(step)
            if (
                not self._escalated
                and len(self._onsets) == self.repeat_count
                and step - self._onsets[0] < self.repeat_window
            ):
                return self._escalate(step, "repeated")
        else:
            self._length += 1
        if self._length >= self.persist_steps and not self._cooling(step):
            return self._escalate(step, "persisted")
        return None

    def _escalate(self, step: int, reason: str) -> Alert:
        self._escalated = True
        self._last = step
        if reason == "persisted":
            message = f"instability persisted for {self._length} steps since step {self._start}"
            value, threshold = float(self._length), float(self.persist_steps)
        else:
            onsets = ", ".join(str(s) for s in self._onsets)
            message = (
                f"instability repeated: {len(self._onsets)} episodes within "
                f"{self.repeat_window} steps (steps {onsets})"
            )
            value, threshold = float(len(self._onsets)), float(self.repeat_count)
        return Alert(
            step=step,
            kind=AlertKind.PERSISTENT_INSTABILITY,
            message=message,
            value=value,
            threshold=threshold,
            details={
                "reason": reason,
                "episode_start": self._start,
                "episode_steps": self._length,
                "onsets": list(self._onsets),
                "kinds": list(self._kinds),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "onsets": list(self._onsets),
            "start": self._start,
            "length": self._length,
            "escalated": self._escalated,
            "last": self._last,
            "kinds": list(self._kinds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._onsets.extend(int(s) for s in state.get("onsets", []))
        start, last = state.get("start"), state.get("last")
        self._start = None if start is None else int(start)
        self._last = None if last is None else int(last)
        self._length = max(int(state.get("length", 0)), 0)
        self._escalated = bool(state.get("escalated", False))
        self._kinds = [str(k) for k in state.get("kinds", [])]


# ---------------------------------------------------------------------------------------------
# The composite
# ---------------------------------------------------------------------------------------------


class InstabilityDetector:
    """All rules together, with the defaults :class:`~warmup_monitor.WarmupMonitor` uses.

    One call per optimizer step; every rule sees every step, in order, and the alerts of a
    step come back together (rules that are turned off still keep the initial loss, so
    :meth:`loss_ratio` always works):

    ======================  ============================  =====================================
    rule                    alert kind                    default
    ======================  ============================  =====================================
    non-finite values       ``non_finite``                loss or grad norm NaN/inf
    initial-loss ratio      ``loss_spike``                loss > 10 x initial loss
    trend spike (loss)      ``loss_trend_spike``          > max(8 sigma, 2x) above the trend
    gradient-norm spike     ``grad_norm_spike``           > max(8 sigma, 3x) above the trend
    oscillation             ``oscillation``               5 cosines < 0 with mean < -0.5
    persistence             ``transient`` /               episode of 5 flagged steps, or 3
                            ``persistent_instability``    episodes within 100 steps
    ======================  ============================  =====================================

    ``transient`` is informational (see :data:`warmup_monitor.alerts.INSTABILITY_KINDS`); all
    the others mean instability.

    Example:
        >>> det = InstabilityDetector()
        >>> det.update(0, loss=4.0)
        []
        >>> [a.kind.value for a in det.update(1, loss=50.0)]
        ['loss_spike', 'loss_trend_spike']
        >>> [a.kind.value for a in det.update(2, loss=3.5)]
        ['transient']

    Args:
        config: The rules and thresholds (:class:`~warmup_monitor.Detection`); default
            ``Detection()``.
        **overrides: Fields of :class:`~warmup_monitor.Detection` to change, e.g.
            ``InstabilityDetector(trend_sigmas=6.0)``.

    Raises:
        TypeError: an argument has the wrong type (the message names it).
        ValueError: an argument is out of range (the message names it and the allowed range).
    """

    def __init__(self, config: Detection | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, Detection):
            raise TypeError(f"`config` must be a Detection or None, got {config!r}")
        # Every check lives in Detection: the overrides are its fields.
        try:
            cfg = replace(config or Detection(), **overrides)
        except TypeError as err:
            raise TypeError(
                f"InstabilityDetector: {err} (the options are Detection's fields)"
            ) from None
        self.config = cfg
        self.loss_spike = cfg.loss_spike
        self.loss_trend_spike = cfg.loss_trend_spike
        self.grad_norm_spike = cfg.grad_norm_spike
        self.non_finite = cfg.non_finite
        self.oscillation = cfg.oscillation
        self.persistence = cfg.persistence
        self.loss_ratio_rule = LossRatioDetector(
            spike_factor=cfg.spike_factor, initial_loss_steps=cfg.initial_loss_steps
        )
        self.loss_trend_rule = LossTrendDetector(
            sigmas=cfg.trend_sigmas,
            min_ratio=cfg.trend_min_ratio,
            rebaseline_steps=cfg.rebaseline_steps,
        )
        self.grad_norm_rule = GradNormSpikeDetector(
            sigmas=cfg.grad_norm_sigmas,
            min_ratio=cfg.grad_norm_min_ratio,
            rebaseline_steps=cfg.rebaseline_steps,
        )
        self.non_finite_rule = NonFiniteDetector()
        self.oscillation_rule = OscillationDetector(
            cosine=cfg.oscillation_cosine, steps=cfg.oscillation_steps
        )
        self.persistence_rule = PersistenceDetector(
            persist_steps=cfg.persist_steps,
            repeat_count=cfg.repeat_count,
            repeat_window=cfg.repeat_window,
        )

    @property
    def initial_loss(self) -> float | None:
        """The initial loss, once the first ``initial_loss_steps`` finite losses are seen."""
        return self.loss_ratio_rule.initial_loss

    def loss_ratio(self, loss: float) -> float | None:
        """``loss / initial_loss`` or ``None`` while undefined."""
        return self.loss_ratio_rule.loss_ratio(loss)

    def update(
        self,
        step: int,
        loss: float | None,
        grad_norm: float | None = None,
        grad_cosine: float | None = None,
    ) -> list[Alert]:
        """Feed one optimizer step's values; return the alerts it raises (possibly none).

        Never raises on odd values: NaN, inf, zero, negative or huge inputs are reported
        (``non_finite``) or ignored by the rules that cannot use them.

        Args:
            step: Optimizer steps taken before this update (0 for the first).
            loss: The step's training loss (``None`` when the step had none).
            grad_norm: Global L2 norm of the gradient, if known.
            grad_cosine: Cosine between this step's gradient and the previous one, if defined.
        """
        alerts: list[Alert] = []
        found = self.non_finite_rule.update(step, loss, grad_norm)
        if found is not None and self.non_finite:
            alerts.append(found)
        found = self.loss_ratio_rule.update(step, loss)
        if found is not None and self.loss_spike:
            alerts.append(found)
        if self.loss_trend_spike:
            found = self.loss_trend_rule.update(step, loss)
            if found is not None:
                alerts.append(found)
        if self.grad_norm_spike:
            found = self.grad_norm_rule.update(step, grad_norm)
            if found is not None:
                alerts.append(found)
        if self.oscillation:
            found = self.oscillation_rule.update(step, grad_cosine)
            if found is not None:
                alerts.append(found)
        if self.persistence:
            kinds = tuple(a.kind_name for a in alerts)
            has_data = loss is not None or grad_norm is not None or grad_cosine is not None
            flagged = bool(kinds) if has_data else None
            found = self.persistence_rule.update(step, flagged, kinds)
            if found is not None:
                alerts.append(found)
        return alerts

    def reset(self) -> None:
        for rule in self._rules().values():
            rule.reset()

    def _rules(self) -> dict[str, Detector]:
        return {
            "loss_ratio": self.loss_ratio_rule,
            "non_finite": self.non_finite_rule,
            "loss_trend": self.loss_trend_rule,
            "grad_norm": self.grad_norm_rule,
            "oscillation": self.oscillation_rule,
            "persistence": self.persistence_rule,
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: rule.state_dict() for name, rule in self._rules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, rule in self._rules().items():
            rule.load_state_dict(state.get(name, {}))
