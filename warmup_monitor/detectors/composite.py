"""All rules together: :class:`InstabilityDetector`, the detector the monitor runs per step."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from warmup_monitor.alerts import INSTABILITY_KINDS, Alert
from warmup_monitor.config import Detection
from warmup_monitor.detectors._common import Detector
from warmup_monitor.detectors.divergence import GradNormRiseDetector, LossDivergenceDetector
from warmup_monitor.detectors.loss_trend import LossTrendDetector
from warmup_monitor.detectors.persistence import PersistenceDetector
from warmup_monitor.detectors.rules import LossRatioDetector, NonFiniteDetector, OscillationDetector
from warmup_monitor.detectors.trend import GradNormSpikeDetector

__all__ = ["InstabilityDetector"]


class InstabilityDetector:
    """All rules together, with the defaults :class:`~warmup_monitor.WarmupMonitor` uses.

    One call per optimizer step; every rule sees every step, in order, and the alerts of a
    step come back together (rules that are turned off still keep the initial loss, so
    :meth:`loss_ratio` always works). ``sigma`` is a robust noise scale of the log of the
    value, learned from the run; ``early`` means the first ``noise_samples`` (10) values:

    ====================  ==========================  ==========================================
    rule                  alert kind                  default
    ====================  ==========================  ==========================================
    non-finite values     ``non_finite``              loss or grad norm NaN/inf
    initial-loss ratio    ``loss_spike``              loss > 10 x initial loss
    trend spike (loss)    ``loss_trend_spike``        loss > trend x max(1 + 5.7 sigma, 1.1), or
                                                      two in a row > trend x (1 + 4 sigma);
                                                      early: loss > 2 x trend
    slow divergence       ``loss_divergence``         smoothed loss > max(1.25x, 5 sigma) its
                                                      low of the last 100 steps, and still
                                                      climbing (not early)
    gradient-norm spike   ``grad_norm_spike``         as for the loss; early: 3 x trend; or,
                                                      once 64 norms are kept, > 6 standard
                                                      deviations above the mean of the last
                                                      128 (OLMo-core's rule)
    gradient-norm rise    ``grad_norm_rise``          smoothed norm > max(3x, 5 sigma) its low
                                                      of the last 100 steps, still climbing
    oscillation           ``oscillation``             5 cosines < 0 with mean < -0.5
    persistence           ``transient`` /             episode of 5 flagged steps, or 3
                          ``persistent_instability``  episodes within 100 steps
    ====================  ==========================  ==========================================

    ``transient`` is informational (see :data:`warmup_monitor.alerts.INSTABILITY_KINDS`); all
    the others mean instability. ``step`` may skip values (a plain loop that feeds every 10th
    step): the trends extrapolate over the gap and the windows are in steps, but the noise
    scales are those of the values fed, and the early phase and the median of three count
    values, not steps. :class:`~warmup_monitor.detectors.Episodes` groups the alerts for the
    sinks.

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
            ``InstabilityDetector(trend_sigmas=8.0)``.

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
        self.loss_divergence = cfg.loss_divergence
        self.grad_norm_spike = cfg.grad_norm_spike
        self.grad_norm_rise = cfg.grad_norm_rise
        self.non_finite = cfg.non_finite
        self.oscillation = cfg.oscillation
        self.persistence = cfg.persistence
        self.loss_ratio_rule = LossRatioDetector(
            spike_factor=cfg.spike_factor, initial_loss_steps=cfg.initial_loss_steps
        )
        self.loss_trend_rule = LossTrendDetector(
            sigmas=cfg.trend_sigmas,
            min_ratio=cfg.trend_min_ratio,
            early_ratio=cfg.trend_early_ratio,
            early_samples=cfg.noise_samples,
            rebaseline_steps=cfg.rebaseline_steps,
        )
        self.loss_divergence_rule = LossDivergenceDetector(
            min_ratio=cfg.divergence_min_ratio,
            sigmas=cfg.divergence_sigmas,
            window=cfg.rise_window,
            min_samples=cfg.noise_samples,
        )
        self.grad_norm_rule = GradNormSpikeDetector(
            sigmas=cfg.grad_norm_sigmas,
            min_ratio=cfg.grad_norm_min_ratio,
            early_ratio=cfg.grad_norm_early_ratio,
            early_samples=cfg.noise_samples,
            rebaseline_steps=cfg.rebaseline_steps,
            zscore_window=cfg.grad_norm_zscore_window,
            zscore_sigmas=cfg.grad_norm_zscore_sigmas,
        )
        self.grad_norm_rise_rule = GradNormRiseDetector(
            min_ratio=cfg.grad_norm_rise_ratio,
            sigmas=cfg.grad_norm_rise_sigmas,
            window=cfg.rise_window,
            min_samples=cfg.noise_samples,
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
            step: Optimizer steps taken before this update (0 for the first). Steps may be
                skipped (values fed every N steps); they should not go backwards.
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
        rules = (
            (self.loss_trend_spike, self.loss_trend_rule, loss),
            (self.loss_divergence, self.loss_divergence_rule, loss),
            (self.grad_norm_spike, self.grad_norm_rule, grad_norm),
            (self.grad_norm_rise, self.grad_norm_rise_rule, grad_norm),
        )
        for on, rule, value in rules:
            if on:
                found = rule.update(step, value)
                if found is not None:
                    alerts.append(found)
        if self.oscillation:
            found = self.oscillation_rule.update(step, grad_cosine)
            if found is not None:
                alerts.append(found)
        if self.persistence:
            kinds = tuple(a.kind_name for a in alerts if a.kind in INSTABILITY_KINDS)
            has_data = loss is not None or grad_norm is not None or grad_cosine is not None
            flagged = bool(kinds) if has_data else None
            found = self.persistence_rule.update(step, flagged, kinds)
            if found is not None:
                alerts.append(found)
        return alerts

    def reset(self) -> None:
        """Forget everything seen (the configuration stays)."""
        for rule in self._rules().values():
            rule.reset()

    def _rules(self) -> dict[str, Detector]:
        return {
            "loss_ratio": self.loss_ratio_rule,
            "non_finite": self.non_finite_rule,
            "loss_trend": self.loss_trend_rule,
            "loss_divergence": self.loss_divergence_rule,
            "grad_norm": self.grad_norm_rule,
            "grad_norm_rise": self.grad_norm_rise_rule,
            "oscillation": self.oscillation_rule,
            "persistence": self.persistence_rule,
        }

    def state_dict(self) -> dict[str, Any]:
        """Every rule's state (primitives only)."""
        return {name: rule.state_dict() for name, rule in self._rules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing rule (an older checkpoint) starts fresh."""
        for name, rule in self._rules().items():
            rule.load_state_dict(state.get(name, {}))
