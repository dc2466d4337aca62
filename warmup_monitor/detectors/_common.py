"""Helpers shared by the detectors: the protocol, float hygiene and tolerant state loading."""

from __future__ import annotations

import math
from typing import Any, Protocol

from warmup_monitor._checks import check_float

# sqrt(pi / 2): a normal distribution's sigma over its mean absolute deviation.
MAD_TO_SIGMA = math.sqrt(math.pi / 2)
_MAX_EXP = 700.0


class Detector(Protocol):
    """The protocol every detector follows (besides ``update(step, ...) -> Alert | None``)."""

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def is_finite(x: float | None) -> bool:
    """Whether ``x`` is a finite float (``None`` is not)."""
    return x is not None and math.isfinite(x)


def log_positive(value: float | None) -> float | None:
    """``log(value)`` for a finite value > 0, else ``None`` (what a log-scale rule can use)."""
    if value is None or not math.isfinite(value) or value <= 0.0:
        return None
    return math.log(value)


def safe_exp(x: float) -> float:
    """``exp`` that saturates instead of overflowing."""
    return math.exp(min(x, _MAX_EXP))


def finite_float(value: Any, default: float) -> float:
    """``float(value)`` if it is finite, else ``default`` (for tolerant state loading)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def int_or(value: Any, default: int | None) -> int | None:
    """``int(value)`` if it is an int-like number, else ``default`` (tolerant state loading)."""
    if isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def detail(x: float) -> float | str:
    """A JSON-safe float for an alert's details: non-finite values become strings."""
    return x if math.isfinite(x) else str(x)


def check_cosine(name: str, value: Any) -> float:
    """A cosine threshold in [-1, 0)."""
    value = check_float(name, value, minimum=-1.0)
    if value >= 0.0:
        raise ValueError(f"`{name}` must be in [-1, 0), got {value}")
    return value
