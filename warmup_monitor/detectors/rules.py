"""The simple rules: the initial-loss ratio (10x), non-finite values, and oscillating gradients."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.detectors._common import check_cosine as _check_cosine
from warmup_monitor.detectors._common import detail as _detail
from warmup_monitor.detectors._common import finite_float as _finite_float
from warmup_monitor.detectors._common import is_finite as _is_finite

__all__ = ["LossRatioDetector", "NonFiniteDetector", "OscillationDetector"]


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
