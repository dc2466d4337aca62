"""warmup_monitor: watch learning-rate warmup in PyTorch Lightning, and act when it goes wrong.

``Trainer(callbacks=[WarmupMonitor(warmup_steps=500)])`` logs lr, loss, gradient norm,
consecutive-gradient cosine and update ratio every optimizer step during warmup, and raises
alerts (console, TensorBoard, ``warmup_alerts.jsonl``, a hook) when training turns unstable.
"""

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.callback import WarmupMonitor
from warmup_monitor.detectors import InstabilityDetector

__all__ = ["Alert", "AlertKind", "InstabilityDetector", "WarmupMonitor"]
__version__ = "0.1.0"
