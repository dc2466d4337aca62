"""The monitor's engine: everything it does per optimizer step, without Lightning.

:class:`MonitorEngine` owns, for each watched optimizer, the gradient statistics, the update
ratio, the instability detector and the step count; it decides which steps are read back to the
host, feeds the detectors, and hands metrics and alerts to sinks given by its user. The
Lightning callback (:mod:`warmup_monitor.callback`) and the plain-PyTorch helper
(:mod:`warmup_monitor.loop`) are thin shells around it.

Host reads. Statistics stay on the device. Each step's values are stacked into a small device
tensor and kept; on a step that logs, or every ``check_every_n_steps``, everything kept since the
last read comes back in **one** device-to-host read and the detectors see every step in order.
On other steps nothing is read: a decision about step ``t`` is taken at the next read, at most
``check_every_n_steps - 1`` steps later (0 with the default of 1).

Distributed. Under data parallelism the gradients are identical on every rank after the
all-reduce, so only the loss is averaged over ranks. Sharded gradients (FSDP2 ``DTensor``, or
FSDP1 flat shards) contribute local sums of squares and dot products that are summed over the
ranks holding shards. Both reductions go into one small all-reduce per step. Every rank then
holds the same numbers and takes the same decisions without further communication.

Layout: :class:`MonitorEngine` (``core``: the device side of a step and the wiring), what is
kept per optimizer (``watch``), the host side (``host``: detectors, plan, sinks), rollback
(``rollback``: the snapshots, when they are taken and restored) and the checkpoint state
(``state``).
"""

from warmup_monitor.engine.core import AlertSink, MetricsSink, MonitorEngine

__all__ = ["AlertSink", "MetricsSink", "MonitorEngine"]
