"""The "Warmup" tab of TensorBoard: runs with their verdict and its reason, interactive charts
(uPlot) with episodes and the controller's actions marked, alerts grouped by episode.

Installed with the package and found by TensorBoard through the ``tensorboard_plugins`` entry
point; nothing to configure. It reads the same files as ``warmup-monitor report`` (event files and
``warmup_alerts.jsonl`` under the ``--logdir``, whatever the monitor's key prefix), never through a
link, and is active only when a run under the log directory was written by the monitor.
"""

from warmup_monitor.tb_plugin.plugin import PLUGIN_NAME, WarmupPlugin

__all__ = ["PLUGIN_NAME", "WarmupPlugin"]
