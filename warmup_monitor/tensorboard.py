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


#: A per-group key: ``.../layers/<group>/<statistic>`` (group names hold no ``/``).
_LAYER_KEY = re.compile(r"(^|/)layers/[^/]+/(grad_norm|grad_share|update_ratio)$")


def split_layer_keys(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(the per-group keys, the others)`` of one step's metrics."""
    layers = {k: v for k, v in metrics.items() if "layers/" in k and _LAYER_KEY.search(k)}
    if not layers:
        return layers, metrics
    return layers, {k: v for k, v in metrics.items() if k not in layers}


def write_scalars_event(writer: Any, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` as **one** event holding every value (a ``Summary`` with one
    ``simple_value`` per tag), as ``add_scalar`` would one event each.

    ``SummaryWriter.add_scalar`` costs about 0.1 ms per call (a protobuf, a checksum and a
    queue entry each): 600 per-group scalars a step cost more than a step of a small model.
    TensorBoard, ``EventAccumulator`` and the report read the values as if each had been
    written alone. A writer without a file writer gets ``add_scalar`` per value.
    """
    if not metrics:
        return
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if not callable(get_file_writer):
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(
        value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    )
    get_file_writer().add_summary(summary, step)
