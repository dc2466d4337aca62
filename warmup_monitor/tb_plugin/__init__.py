"""The "Warmup" tab of TensorBoard: runs with their verdict, alerts and warmup extensions.

Installed with the package and found by TensorBoard through the ``tensorboard_plugins`` entry
point; nothing to configure. It reads the same files as ``warmup-monitor report`` (event files and
``warmup_alerts.jsonl`` under the ``--logdir``) and never reads outside the log directory.
"""

from warmup_monitor.tb_plugin.plugin import PLUGIN_NAME, WarmupPlugin

__all__ = ["PLUGIN_NAME", "WarmupPlugin"]
