"""Persistence: an excursion that recovers at once, or instability that persists or repeats."""

from __future__ import annotations

from collections import deque
from typing import Any

from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.words import span as _span

__all__ = ["PersistenceDetector"]


class PersistenceDetector:
    """Tell a transient excursion from instability that persists or repeats.

    Fed, each step, whether any instability rule flagged it. Consecutive flagged steps form an
    *episode*. ``persistent_instability`` is raised when

    - an episode reaches ``persist_steps`` flagged steps (default 5): it **persists**; or
    - an episode starts while ``repeat_count - 1`` other episodes (default 2) started within
      the last ``repeat_window`` steps (default 100): it **repeats**;

    at most once per ``repeat_window`` steps: episodes that start within ``repeat_window``
    steps of the last ``persistent_instability`` belong to it, and an episode that goes on
    raises it again every ``repeat_window`` steps. An episode that ends (a step with data and
    no flag) without belonging to a persistent instability raises ``transient`` on that step:
    it recovered at once, e.g. a one-step catapult. Steps without data (``flagged=None``)
    change nothing.

    Args:
        persist_steps: Flagged steps in a row that make an episode persistent (>= 1).
        repeat_count: Episodes within ``repeat_window`` steps that make instability repeated
            (>= 2).
        repeat_window: The window, in steps, for ``repeat_count`` and between two
            ``persistent_instability`` alerts (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    kinds = (AlertKind.TRANSIENT, AlertKind.PERSISTENT_INSTABILITY)

    def __init__(
        self, *, persist_steps: int = 5, repeat_count: int = 3, repeat_window: int = 100
    ) -> None:
        self.persist_steps = _check_int("persist_steps", persist_steps, minimum=1)
        self.repeat_count = _check_int("repeat_count", repeat_count, minimum=2)
        self.repeat_window = _check_int("repeat_window", repeat_window, minimum=1)
        self.reset()

    def reset(self) -> None:
        self._onsets: deque[int] = deque(maxlen=self.repeat_count)
        self._start: int | None = None  # first step of the open episode
        self._length = 0
        self._escalated = False  # the open episode belongs to a persistent instability
        self._last: int | None = None  # step of the last persistent_instability
        self._kinds: list[str] = []  # kinds seen in the open episode

    def _cooling(self, step: int) -> bool:
        return self._last is not None and 0 <= step - self._last < self.repeat_window

    def update(self, step: int, flagged: bool | None, kinds: tuple[str, ...] = ()) -> Alert | None:
        """Feed whether ``step`` was flagged (``None``: no data); return a persistence alert.

        Args:
            step: The step.
            flagged: Whether an instability rule fired on this step; ``None`` if the step had
                no data.
            kinds: The kinds that flagged it (for the alert's details).
        """
        if flagged is None:
            return None
        if not flagged:
            if self._start is None:
                return None
            start, length, escalated = self._start, self._length, self._escalated
            kinds_seen = list(self._kinds)
            self._start, self._length, self._escalated, self._kinds = None, 0, False, []
            if escalated:
                return None
            span = _span(start, start + length - 1)
            return Alert(
                step=step,
                kind=AlertKind.TRANSIENT,
                message=f"the instability of {span} recovered at once",
                value=float(length),
                threshold=float(self.persist_steps),
                details={"episode_start": start, "episode_steps": length, "kinds": kinds_seen},
            )
        for kind in kinds:
            if kind not in self._kinds:
                self._kinds.append(kind)
        if self._start is None:
            self._start, self._length = step, 1
            self._escalated = self._cooling(step)
            self._onsets.append(step)
            if (
                not self._escalated
                and len(self._onsets) == self.repeat_count
                and step - self._onsets[0] < self.repeat_window
            ):
                return self._escalate(step, "repeated")
        else:
            self._length += 1
        if self._length >= self.persist_steps and not self._cooling(step):
            return self._escalate(step, "persisted")
        return None

    def _escalate(self, step: int, reason: str) -> Alert:
        self._escalated = True
        self._last = step
        if reason == "persisted":
            message = f"instability persisted for {self._length} steps since step {self._start}"
            value, threshold = float(self._length), float(self.persist_steps)
        else:
            onsets = ", ".join(str(s) for s in self._onsets)
            message = (
                f"instability repeated: {len(self._onsets)} episodes within "
                f"{self.repeat_window} steps (steps {onsets})"
            )
            value, threshold = float(len(self._onsets)), float(self.repeat_count)
        return Alert(
            step=step,
            kind=AlertKind.PERSISTENT_INSTABILITY,
            message=message,
            value=value,
            threshold=threshold,
            details={
                "reason": reason,
                "episode_start": self._start,
                "episode_steps": self._length,
                "onsets": list(self._onsets),
                "kinds": list(self._kinds),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "onsets": list(self._onsets),
            "start": self._start,
            "length": self._length,
            "escalated": self._escalated,
            "last": self._last,
            "kinds": list(self._kinds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._onsets.extend(int(s) for s in state.get("onsets", []))
        start, last = state.get("start"), state.get("last")
        self._start = None if start is None else int(start)
        self._last = None if last is None else int(last)
        self._length = max(int(state.get("length", 0)), 0)
        self._escalated = bool(state.get("escalated", False))
        self._kinds = [str(k) for k in state.get("kinds", [])]
