"""Argument validation shared by the public constructors: errors name the argument and the value."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_int_or_off(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is 0 (off) or an int >= ``minimum``, else raise."""
    out = check_int(name, value, minimum=0)
    if 0 < out < minimum:
        raise ValueError(f"`{name}` must be 0 (off) or >= {minimum}, got {value!r}")
    return out


def check_float(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Return ``float(value)`` if it is a finite real number in range, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if above is not None and maximum is not None and not above < value <= maximum:
        raise ValueError(f"`{name}` must be in ({above:g}, {maximum:g}], got {value}")
    if above is not None and value <= above:
        raise ValueError(f"`{name}` must be > {above:g}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum:g}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum:g}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming the allowed values."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
    return str(value)
