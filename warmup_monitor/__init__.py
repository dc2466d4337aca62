"""warmup_monitor: watch learning-rate warmup in PyTorch Lightning, and act when it goes wrong.

``Trainer(callbacks=[WarmupMonitor(warmup_steps=500)])`` logs lr, loss, gradient norm,
consecutive-gradient cosine and update ratio every optimizer step during warmup, and raises
alerts (console, TensorBoard, ``warmup_alerts.jsonl``, a hook) when training turns unstable.

``WarmupMonitor`` is imported lazily: the report command and the TensorBoard plugin import this
package without paying for Lightning. ``summarize(run_dir_or_trainer)`` (the verdict, episodes and
advice, shown as rich text or HTML in a notebook) is imported lazily too.
"""

from typing import TYPE_CHECKING, Any

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.config import AdaptiveWarmup, CurvatureProbe, Detection, Statistics, Window
from warmup_monitor.detectors import InstabilityDetector

if TYPE_CHECKING:
    from warmup_monitor.callback import WarmupMonitor
    from warmup_monitor.report.summary import Summary, summarize

__all__ = [
    "AdaptiveWarmup",
    "Alert",
    "AlertKind",
    "CurvatureProbe",
    "Detection",
    "InstabilityDetector",
    "Statistics",
    "Summary",
    "WarmupMonitor",
    "Window",
    "summarize",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name == "WarmupMonitor":
        from warmup_monitor.callback import WarmupMonitor

        return WarmupMonitor
    if name in ("summarize", "Summary"):  # the report stack (tensorboard, rich) on first use
        from warmup_monitor.report import summary

        return getattr(summary, name)
    raise AttributeError(f"module 'warmup_monitor' has no attribute {name!r}")
