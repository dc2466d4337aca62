"""Instability detectors: pure decisions over floats, usable from the first optimizer steps.

Each detector follows one protocol: ``update(step, ...) -> Alert | None``, ``state_dict()``
(primitives only), ``load_state_dict(state)`` (missing keys fall back to a fresh state) and
``reset()``. :class:`InstabilityDetector` composes them with the defaults that
:class:`~warmup_monitor.WarmupMonitor` uses (its docstring has the table of defaults).

- :class:`LossRatioDetector` (``loss_spike``): the loss above 10 x the initial loss.
- :class:`LossTrendDetector` (``loss_trend_spike``): the log-loss above its robust trend by
  more than a number of noise scales and a small ratio floor; from the second update.
- :class:`GradNormSpikeDetector` (``grad_norm_spike``): the same on the log gradient norm.
- :class:`LossDivergenceDetector` (``loss_divergence``): the smoothed loss keeps climbing above
  its recent low (a slow divergence the trend follows upward).
- :class:`GradNormRiseDetector` (``grad_norm_rise``): the smoothed gradient norm keeps climbing,
  far above its recent low.
- :class:`NonFiniteDetector` (``non_finite``): the loss or the gradient norm is NaN or inf.
- :class:`OscillationDetector` (``oscillation``): the last 5 consecutive-gradient cosines all
  negative, with a mean below -0.5.
- :class:`PersistenceDetector` (``transient`` / ``persistent_instability``): a run of flagged
  steps that ends before 5 steps is transient; one that lasts 5 steps, or the third within 100
  steps, is persistent.
- :class:`Episodes`: not a rule but the filter between the rules and the sinks: one alert when
  an episode of instability opens, one ``episode_end`` summary when it ends.

Bad input never raises inside ``update``: NaN, inf, zero and negative values are ignored by the
rules that cannot use them (and reported by :class:`NonFiniteDetector`), and never enter a
running statistic.

This package imports no Lightning and no torch: it runs on Python floats, in microseconds.
"""

from warmup_monitor.detectors._common import Detector
from warmup_monitor.detectors.composite import InstabilityDetector
from warmup_monitor.detectors.divergence import GradNormRiseDetector, LossDivergenceDetector
from warmup_monitor.detectors.episodes import EPISODE_KINDS, Episodes
from warmup_monitor.detectors.loss_trend import LossTrendDetector
from warmup_monitor.detectors.persistence import PersistenceDetector
from warmup_monitor.detectors.rules import LossRatioDetector, NonFiniteDetector, OscillationDetector
from warmup_monitor.detectors.trend import GradNormSpikeDetector

__all__ = [
    "EPISODE_KINDS",
    "Detector",
    "Episodes",
    "GradNormRiseDetector",
    "GradNormSpikeDetector",
    "InstabilityDetector",
    "LossDivergenceDetector",
    "LossRatioDetector",
    "LossTrendDetector",
    "NonFiniteDetector",
    "OscillationDetector",
    "PersistenceDetector",
]
