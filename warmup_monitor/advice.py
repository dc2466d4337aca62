"""The one place where a new peak learning rate is recommended.

The adaptive controller's ``warmup_exhausted`` alert and the offline report both call
:func:`recommend_peak_lr`, so that a run's alert and its report always give the same number.

The rule: instability seen at an lr of ``L`` says that the stable peak is below ``L``; the
recommendation is ``SAFETY x L`` (half of it), where ``L`` is the *lowest* lr at which an
instability alert was raised. Half, because the threshold a warmup crosses is not sharp
(the sharpness keeps rising as training goes on: an lr just under the first unstable one is often
unstable a few hundred steps later) and because lr sweeps are done in factors of 2 to 3; a
recommendation within 10 % of the current peak is not worth a rerun and is not made.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math

__all__ = ["MIN_CHANGE", "SAFETY", "format_lr", "recommend_peak_lr"]

#: The recommended peak is this fraction of the lowest lr at which instability was seen.
SAFETY = 0.5
#: A recommendation that changes the peak by less than this fraction is not made.
MIN_CHANGE = 0.1


def recommend_peak_lr(lowest_unstable_lr: float, *, peak_lr: float | None = None) -> float | None:
    """A new peak learning rate after instability was seen at ``lowest_unstable_lr``.

    Scale-free: pass factors of the peak (``lowest_unstable_lr=0.7, peak_lr=1.0``) to get a
    factor of the peak (``0.35``).

    Args:
        lowest_unstable_lr: The lowest lr at which an instability alert was raised (for the
            controller: the lr at which it acted on instability).
        peak_lr: The run's peak lr, when known. If the recommendation would not lower it by at
            least :data:`MIN_CHANGE` (10 %), none is made.

    Returns:
        ``SAFETY * lowest_unstable_lr``, or ``None`` when it is not at least 10 % below
        ``peak_lr``.

    Raises:
        ValueError: ``lowest_unstable_lr`` or ``peak_lr`` is not a finite positive number.

    >>> recommend_peak_lr(3e-3)
    0.0015
    >>> recommend_peak_lr(0.7, peak_lr=1.0)
    0.35
    >>> recommend_peak_lr(3e-3, peak_lr=1.5e-3) is None  # would not lower the peak
    True
    """
    _check("lowest_unstable_lr", lowest_unstable_lr)
    recommended = SAFETY * float(lowest_unstable_lr)
    if peak_lr is not None:
        _check("peak_lr", peak_lr)
        if recommended > (1.0 - MIN_CHANGE) * float(peak_lr):
            return None
    return recommended


def format_lr(lr: float) -> str:
    """An lr as the alert and the report print it (3 significant digits)."""
    return f"{lr:.3g}"


def _check(name: str, x: float) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"`{name}` must be a finite positive number, got {x!r}")
