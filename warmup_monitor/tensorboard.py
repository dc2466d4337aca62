"""TensorBoard side of the monitor: the "Warmup" custom-scalars dashboard.

This module imports no Lightning; it builds the layout dict that
``SummaryWriter.add_custom_scalars`` takes, and writes it.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from warmup_monitor.schema import DEFAULT_PREFIX

__all__ = ["DASHBOARD_TITLE", "custom_scalars_layout", "write_layout"]

DASHBOARD_TITLE = "Warmup"

# (chart title, metric name) in display order; each chart matches the key for every optimizer
# (``warmup/NAME`` and ``warmup/optK/NAME``) and, for the lr, every param group (``.../lr/pgJ``).
_CHARTS: tuple[tuple[str, str], ...] = (
    ("learning rate", "lr"),
    ("loss", "loss"),
    ("loss / initial loss", "loss_ratio"),
    ("gradient norm (pre-clip)", "grad_norm"),
    ("cosine of consecutive gradients", "grad_cosine"),
    ("update / weight ratio", "update_ratio"),
    ("lr factor applied by the monitor", "lr_factor"),
    ("planned warmup length", "warmup_steps"),
    ("alerts so far", "alerts"),
)


class LayoutWriter(Protocol):
    """What :func:`write_layout` needs of a TensorBoard ``SummaryWriter``."""

    def add_custom_scalars(self, layout: dict[str, Any]) -> None: ...


def custom_scalars_layout(prefix: str = DEFAULT_PREFIX) -> dict[str, dict[str, list[Any]]]:
    """The "Warmup" dashboard: one multiline chart per metric, all optimizers and groups overlaid.

    Args:
        prefix: The metric key prefix the monitor logs with (``log_key_prefix``).
    """
    p = re.escape(prefix)
    charts: dict[str, list[Any]] = {}
    for title, name in _CHARTS:
        suffix = r"(/pg\d+)?" if name == "lr" else ""
        charts[title] = ["Multiline", [rf"^{p}(opt\d+/)?{name}{suffix}$"]]
    return {DASHBOARD_TITLE: charts}


def write_layout(writer: LayoutWriter, prefix: str = DEFAULT_PREFIX) -> None:
    """Write the dashboard layout to one TensorBoard writer (once per run)."""
    writer.add_custom_scalars(custom_scalars_layout(prefix))
