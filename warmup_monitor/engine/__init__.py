"""The monitor's engine: everything it does per optimizer step, without Lightning.

:class:`MonitorEngine` (in :mod:`~warmup_monitor.engine.core`) owns every capability; the
device side of a step is in ``core``, what is kept per optimizer in ``watch``, the host side
(detectors, plan, sinks) in ``host`` and the checkpoint state in ``state``.
"""

from warmup_monitor.engine.core import AlertSink, MetricsSink, MonitorEngine

__all__ = ["AlertSink", "MetricsSink", "MonitorEngine"]
