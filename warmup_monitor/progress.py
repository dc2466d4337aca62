"""The warmup field of Lightning's progress bar: ``warmup 120/500 x0.24``.

While warming up, the Trainer's progress bar (``TQDMProgressBar`` or ``RichProgressBar``: both
build their metrics with ``get_metrics(trainer, pl_module)``) shows one more field, ``warmup``:

- ``120/500``: optimizer steps taken / the planned warmup length (extended by the adaptive
  controller, if it acted);
- `` x0.24``: the factor the monitor multiplies the lr of the next update by (a back-off
  shows at once), only when it is not 1 (a ``schedule``, or an adaptive back-off or slowed
  ramp); a watch-only monitor never shows it.

After warmup the field is gone, unless the factor stays below 1 (a held back-off): then it
reads ``done x0.45``. A Trainer without a progress bar is left alone. The field is added by
wrapping the bar's ``get_metrics`` for the duration of a fit (:func:`attach`, :func:`detach`);
Lightning shows a string value as is in both bars.
"""

from __future__ import annotations

from typing import Any

from warmup_monitor.engine import MonitorEngine

__all__ = ["FIELD", "attach", "check_flag", "detach", "field_text"]

#: The progress bar's key.
FIELD = "warmup"
_MARK = "_warmup_monitor_field"


def check_flag(value: Any) -> bool:
    """``WarmupMonitor.progress_bar``, checked.

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`WarmupMonitor.progress_bar` must be True or False, got {value!r}")
    return value


def field_text(engine: MonitorEngine) -> str | None:
    """The field's text for the engine's first optimizer, or ``None`` for no field (before
    the first step, and after warmup at a factor of 1)."""
    taken = engine.steps_taken(0)
    if taken < 1:
        return None
    warmup = engine.planned_warmup_steps(0)
    controller = engine.controller
    factor = 1.0 if controller is None else controller.factor(taken)  # the next update's
    scaled = f" x{factor:.2f}" if abs(factor - 1.0) > 1e-12 else ""
    if taken < warmup:
        return f"{taken}/{warmup}{scaled}"
    return f"done{scaled}" if scaled else None


def attach(trainer: Any, engine: MonitorEngine, *, on: bool = True) -> None:
    """Add the field to the Trainer's progress bar, if it has one and ``on`` (until
    :func:`detach`)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not on:
        return
    detach(trainer)
    original = bar.get_metrics

    def get_metrics(trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = original(trainer, pl_module)
        text = field_text(engine)
        return metrics if text is None else {**metrics, FIELD: text}

    bar.get_metrics = get_metrics
    setattr(bar, _MARK, True)


def detach(trainer: Any) -> None:
    """Remove the field from the Trainer's progress bar (its own ``get_metrics`` again)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, _MARK, False):
        del bar.get_metrics  # the instance's wrapper: the class's method shows through
        delattr(bar, _MARK)
