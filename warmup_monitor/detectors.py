"""Instability detectors: pure decisions over floats, usable from the first optimizer step.

Each detector follows one protocol: ``update(step, ...) -> Alert | None``, ``state_dict()``,
``load_state_dict(state)`` and ``reset()``. :class:`InstabilityDetector` composes them with the
defaults that :class:`~warmup_monitor.WarmupMonitor` uses.

This module imports no Lightning and no torch: it runs on Python floats.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from warmup_monitor._checks import check_float as _check_float
from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind

__all__ = [
    "Detector",
    "InstabilityDetector",
    "LossRatioDetector",
    "NonFiniteDetector",
]


class Detector(Protocol):
    """The protocol every detector follows."""

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class LossRatioDetector:
    """The initial-loss rule: alert when ``loss > spike_factor * initial_loss``.

    The initial loss is the mean of the first ``initial_loss_steps`` finite losses. Until it is
    known (the first ``initial_loss_steps`` finite updates) the rule cannot fire.

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
        if self._count < self.initial_loss_steps:
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
        if not _is_finite(loss):
            return None
        assert loss is not None
        if self._count < self.initial_loss_steps:
            self._sum += loss
            self._count += 1
            return None
        initial = self.initial_loss
        assert initial is not None
        threshold = self.spike_factor * initial
        if initial > 0 and loss > threshold:
            return Alert(
                step=step,
                kind=AlertKind.LOSS_SPIKE,
                message=(
                    f"loss {loss:.4g} is {loss / initial:.1f}x the initial loss {initial:.4g} "
                    f"(limit {self.spike_factor:g}x)"
                ),
                value=loss,
                threshold=threshold,
                details={"initial_loss": initial, "loss_ratio": loss / initial},
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = float(state.get("sum", 0.0))
        self._count = int(state.get("count", 0))


class NonFiniteDetector:
    """Alert when the loss or the gradient norm is NaN or infinite."""

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


class InstabilityDetector:
    """All rules together, with the defaults :class:`~warmup_monitor.WarmupMonitor` uses.

    Example:
        >>> det = InstabilityDetector()
        >>> det.update(0, loss=4.0)
        []
        >>> [a.kind.value for a in det.update(1, loss=50.0)]
        ['loss_spike']

    Args:
        spike_factor: Multiple of the initial loss that raises ``loss_spike``.
        initial_loss_steps: Number of first finite losses averaged into the initial loss.
    """

    def __init__(self, *, spike_factor: float = 10.0, initial_loss_steps: int = 1) -> None:
        self.loss_ratio_rule = LossRatioDetector(
            spike_factor=spike_factor, initial_loss_steps=initial_loss_steps
        )
        self.non_finite_rule = NonFiniteDetector()

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

        Args:
            step: Optimizer steps taken before this update (0 for the first).
            loss: The step's training loss (``None`` when the step had none).
            grad_norm: Global L2 norm of the gradient, if known.
            grad_cosine: Cosine between this step's gradient and the previous one, if defined.
        """
        alerts = []
        non_finite = self.non_finite_rule.update(step, loss, grad_norm)
        if non_finite is not None:
            alerts.append(non_finite)
        spike = self.loss_ratio_rule.update(step, loss)
        if spike is not None:
            alerts.append(spike)
        return alerts

    def reset(self) -> None:
        self.loss_ratio_rule.reset()
        self.non_finite_rule.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_ratio": self.loss_ratio_rule.state_dict(),
            "non_finite": self.non_finite_rule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_ratio_rule.load_state_dict(state.get("loss_ratio", {}))
        self.non_finite_rule.load_state_dict(state.get("non_finite", {}))
