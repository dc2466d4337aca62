"""The small phrases every message, the report and the tab share: one source for each.

A step range, a count with its noun, a loss ratio. Alerts (:mod:`warmup_monitor.actions`,
the detectors), the report (:mod:`warmup_monitor.report`) and the verdict say them through
these functions, so that one thing reads the same everywhere. No torch, no Lightning.
"""

from __future__ import annotations

import math

__all__ = ["count", "peak_loss", "ratio", "span", "times"]


def span(first: int, last: int, *, noun: bool = True) -> str:
    """``"step 32"`` for a one-step range, ``"steps 32-40"`` otherwise; without ``noun``
    (inside a list that names them): ``"32"``, ``"32-40"``."""
    if first == last:
        return f"step {first}" if noun else str(first)
    return f"steps {first}-{last}" if noun else f"{first}-{last}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with its noun in the right number: ``"1 extension"``, ``"2 extensions"``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def times(n: int) -> str:
    """``"once"``, ``"twice"``, ``"3 times"``."""
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def ratio(x: float | None) -> str:
    """A ratio (of losses, of lrs) with 2 significant digits, trailing zero kept:
    ``1.04 -> "1.0"``, ``23.4 -> "23"``, ``0.052 -> "0.052"``, ``1234 -> "1234"``; ``"-"``
    when unknown, ``"inf"`` or ``"nan"`` when not finite."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(float(x))
    if abs(x) >= 10:
        return f"{x:.0f}"
    return f"{x:#.2g}".rstrip(".")


def peak_loss(r: float | None, step: int | None) -> str:
    """``"peak loss 1.0x the initial loss, at step 2"`` (:func:`ratio`)."""
    where = "" if step is None else f", at step {step}"
    return f"peak loss {ratio(r)}x the initial loss{where}"
