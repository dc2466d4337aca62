"""Argument validation shared by the public constructors: errors name the argument and the value."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast


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


#: The 0.1 keywords of ``WarmupMonitor`` and ``LoopMonitor`` (CHANGELOG.md, "Breaking: one
#: object per capability"): keyword -> (argument, class, field) of its 0.2 home.
MOVED_KEYWORDS: dict[str, tuple[str, str, str]] = {
    **{k: ("window", "Window", k) for k in ("log_every_n_steps", "check_every_n_steps",
                                            "post_warmup_steps", "post_warmup_log_every_n_steps")},
    "spike_factor": ("detection", "Detection", "spike_factor"),
    "initial_loss_steps": ("detection", "Detection", "initial_loss_steps"),
    "detector": ("detection", "Detection", ""),  # InstabilityDetector's keywords are its fields
    "cosine": ("statistics", "Statistics", "cosine"),
    "cosine_reference_dtype": ("statistics", "Statistics", "reference_dtype"),
    "update_ratio": ("statistics", "Statistics", "update_ratio"),
    **{k: ("adaptive", "AdaptiveWarmup", k) for k in ("on_exhausted", "extend_fraction",
       "max_extensions", "max_warmup_steps", "grace_steps", "backoff", "rewarm_from",
       "user_schedule")},
    "curvature_every_n_steps": ("curvature", "CurvatureProbe", "every_n_steps"),
    "curvature_iters": ("curvature", "CurvatureProbe", "max_iters"),
    "curvature_loss": ("curvature", "CurvatureProbe", "loss_fn"),
    "curvature_feeds_controller": ("curvature", "CurvatureProbe", "feeds_controller"),
}  # fmt: skip

_Init = TypeVar("_Init", bound=Callable[..., None])


def refuse_moved_keywords(init: _Init) -> _Init:
    """Wrap a constructor so that a 0.1 keyword raises a ``TypeError`` naming its 0.2 home
    (``window=Window(log_every_n_steps=5)``) instead of Python's bare "unexpected keyword"."""
    owner = init.__qualname__.split(".")[0]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        moved = [k for k in kwargs if k in MOVED_KEYWORDS]
        if moved:
            homes: dict[tuple[str, str], list[str]] = {}
            for k in moved:
                argument, cls, name = MOVED_KEYWORDS[k]
                given = "..." if k == "detector" else f"{name}={kwargs[k]!r}"
                homes.setdefault((argument, cls), []).append(given)
            new = ", ".join(f"{a}={c}({', '.join(v)})" for (a, c), v in homes.items())
            old = ", ".join(f"`{k}`" for k in moved)
            raise TypeError(
                f"{owner}: {old} moved in 0.2 (CHANGELOG.md, 'Breaking: one object per "
                f"capability'): pass {new}"
            )
        init(self, *args, **kwargs)

    return cast(_Init, wrapper)
