"""The user's warmup against ``warmup_steps``: a warning, once, when the scheduler still ramps.

Host-side only: it reads the lr the scheduler set (param group 0, without the monitor's
factor), a Python float the engine reads anyway; no device sync.
"""

from __future__ import annotations

import warnings

from warmup_monitor.words import span


class RampCheck:
    """Warn once when the user's lr still rises after ``warmup_steps`` (only when the user's
    scheduler owns warmup: ``schedule=None``). The monitor would otherwise judge steps as
    "after warmup" while the lr still ramps, and its advice would blame the peak lr."""

    def __init__(self, warmup_steps: int, user_owns_warmup: bool) -> None:
        self.end = warmup_steps
        self.on = user_owns_warmup
        self._last: dict[int, tuple[int, float, bool]] = {}  # per optimizer: (step, lr, rose)
        self._done: set[int] = set()  # optimizers whose ramp is judged
        self._said = False

    def see(self, index: int, step: int, progress: int, lr: float | None) -> None:
        """The lr of the update at ``step`` (``progress`` updates applied before it) of
        optimizer ``index``; ``None`` once monitoring ended (the lr is no longer read)."""
        end = self.end
        if not self.on or progress < end - 1 or index in self._done:
            return
        if progress == end - 1 or index not in self._last:
            if lr is None or progress > end - 1:  # already past it (a resume): not judged
                self._done.add(index)
            else:
                self._last[index] = (step, lr, False)
            return
        peak_step, last, rose = self._last[index]
        if lr is not None and lr > last:
            self._last[index] = (step, lr, True)
            return
        self._done.add(index)
        if rose and not self._said:
            still = "" if lr is not None else " (or later: monitoring ended while it rose)"
            warnings.warn(
                f"warmup_monitor: your lr scheduler still raised the lr after "
                f"WarmupMonitor.warmup_steps={end}: the lr stopped rising at step "
                f"{peak_step}{still}, so the monitor judged {span(end, peak_step)} as after "
                "warmup; set WarmupMonitor.warmup_steps to your scheduler's warmup length",
                UserWarning,
                stacklevel=4,
            )
            self._said = True
