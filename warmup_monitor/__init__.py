"""warmup_monitor: watch learning-rate warmup in PyTorch Lightning, and act when it goes wrong.

``Trainer(callbacks=[WarmupMonitor(warmup_steps=500)])`` logs lr, loss, gradient norm,
consecutive-gradient cosine and update ratio every optimizer step during warmup, and raises
alerts (console, TensorBoard, ``warmup_alerts.jsonl``, a hook) when training turns unstable.

``WarmupMonitor`` is imported lazily: the report command and the TensorBoard plugin import this
package without paying for Lightning.
"""

from typing import TYPE_CHECKING, Any

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import AdaptiveWarmup, CurvatureProbe, Detection, Statistics, Window
from warmup_monitor.detectors import InstabilityDetector

if TYPE_CHECKING:
    from warmup_monitor.callback import WarmupMonitor

__all__ = [
    "AdaptiveWarmup",
    "Alert",
    "AlertKind",
    "CurvatureProbe",
    "Detection",
    "InstabilityDetector",
    "Statistics",
    "WarmupMonitor",
    "Window",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name == "WarmupMonitor":
        from warmup_monitor.callback import WarmupMonitor

        return WarmupMonitor
    raise AttributeError(f"module 'warmup_monitor' has no attribute {name!r}")
