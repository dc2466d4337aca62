"""The warmup plan as a small state machine, and the policy that lengthens it.

:class:`WarmupController` answers two questions: which lr factor applies to the update at a
step (:meth:`WarmupController.factor`), and, given the alerts of a step, whether warmup should
be extended (:meth:`WarmupController.observe`). It imports no Lightning and no torch.

The no-jump rule. Before any extension the factor is the shape's,
:math:`f(t) = \\text{warmup\\_factor}(\\text{shape}, t, W_0)` (or 1 when the user's scheduler
owns warmup). An extension decided when the next update is :math:`a` sets the planned end to
:math:`E` and continues from the factor last applied, :math:`f(a-1)`, times the optional
back-off :math:`b \\le 1`:

.. math::

    c = b \\, f(a - 1), \\qquad
    f(t) = c + (1 - c) \\, \\min\\!\\Big(1, \\frac{t - a + 1}{E - a}\\Big)
    \\quad (t \\ge a)

so the factor never rises faster than a straight line from where it is to 1 at the new end,
never falls unless ``backoff < 1`` (or the re-warm below), and reaches 1 at the last update of
the new warmup, ``E - 1``, as the shapes reach 1 at ``W0 - 1``.
When the factor is already 1 (after warmup, in the grace window, or when the user's scheduler
warms up) an extension re-warms from ``rewarm_from`` (a drop, announced in the alert).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from warmup_monitor._checks import check_choice, check_float, check_int
from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind
from warmup_monitor.schedules import SHAPES, warmup_factor

__all__ = ["DEFAULT_TRIGGER_KINDS", "OnExhausted", "WarmupController", "WarmupExhaustedError"]

OnExhausted = Literal["warn", "stop", "raise"]

#: Alert kinds that count as instability for the extension policy: the instability kinds of
#: :mod:`warmup_monitor.alerts` (``transient`` is not one) less the controller's own.
DEFAULT_TRIGGER_KINDS: frozenset[str] = frozenset(
    k.value for k in INSTABILITY_KINDS if k is not AlertKind.WARMUP_EXHAUSTED
)
#: Kinds severe enough to extend on their own; the others must repeat (``min_alerts``).
_SEVERE = frozenset(
    {
        AlertKind.LOSS_SPIKE.value,
        AlertKind.NON_FINITE.value,
        AlertKind.PERSISTENT_INSTABILITY.value,
    }
)


class WarmupExhaustedError(RuntimeError):
    """Raised with ``on_exhausted="raise"`` when the caps are hit and training is unstable."""


class WarmupController:
    """The warmup plan: planned length, extensions, the lr factor of every step.

    Args:
        warmup_steps: Planned warmup length ``W0`` in optimizer steps.
        shape: A shape of :mod:`warmup_monitor.schedules` when the monitor applies warmup
            itself, or ``None`` when the user's scheduler does (base factor 1).
        shape_kwargs: Keyword arguments of the shape (e.g. ``{"tau": 50}``).
        adaptive: Extend warmup on instability; ``False`` keeps the plan fixed.
        extend_fraction: Each extension adds this fraction of ``W0`` (> 0).
        extend_steps: Or this many steps (overrides ``extend_fraction``).
        max_extensions: At most this many extensions (>= 0).
        max_warmup_steps: The planned end never passes this (default ``4 * W0``).
        cooldown_steps: Steps after an extension during which instability does not extend
            again, so that one spike gives one extension (default ``max(5, W0 // 10)``).
        grace_steps: After warmup ends, instability in this many steps still extends it
            (default ``W0 // 4``).
        min_alerts: Non-severe instability alerts (oscillation, trend or gradient spikes)
            extend once this many fall within ``window_steps``; ``loss_spike``, ``non_finite``
            and ``persistent_instability`` extend on their own.
        window_steps: The window for ``min_alerts`` (default ``max(10, W0 // 5)``).
        backoff: Multiply the current factor by this at an extension (``<= 1``; 1 = no drop).
        rewarm_from: When the factor is already 1 at an extension, restart the ramp from this
            factor (``1.0`` never lowers the lr; then such an extension changes nothing).
        on_exhausted: What to do when the caps are hit and instability goes on: ``"warn"``
            (a ``warmup_exhausted`` alert), ``"stop"`` (alert and :attr:`stop_requested`),
            ``"raise"`` (alert, then :class:`WarmupExhaustedError`, raised by the caller).
        trigger_kinds: Alert kinds that count as instability.

    Raises:
        TypeError, ValueError: a bad argument, named in the message.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        shape: str | None = "linear",
        shape_kwargs: dict[str, Any] | None = None,
        adaptive: bool = True,
        extend_fraction: float = 0.5,
        extend_steps: int | None = None,
        max_extensions: int = 3,
        max_warmup_steps: int | None = None,
        cooldown_steps: int | None = None,
        grace_steps: int | None = None,
        min_alerts: int = 2,
        window_steps: int | None = None,
        backoff: float = 1.0,
        rewarm_from: float = 0.5,
        on_exhausted: OnExhausted = "warn",
        trigger_kinds: Iterable[str] = DEFAULT_TRIGGER_KINDS,
    ) -> None:
        w0 = check_int("warmup_steps", warmup_steps, minimum=1)
        self.initial_warmup_steps = w0
        if shape is not None:
            check_choice("shape", shape, SHAPES)
        self.shape = shape
        self.shape_kwargs = dict(shape_kwargs or {})
        if shape is not None:
            warmup_factor(shape, 0, w0, **self.shape_kwargs)  # validates the keywords
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.extend_fraction = check_float("extend_fraction", extend_fraction, above=0.0)
        self.extend_steps = (
            None if extend_steps is None else check_int("extend_steps", extend_steps, minimum=1)
        )
        self.max_extensions = check_int("max_extensions", max_extensions, minimum=0)
        self.max_warmup_steps = check_int(
            "max_warmup_steps", 4 * w0 if max_warmup_steps is None else max_warmup_steps, minimum=w0
        )
        self.cooldown_steps = check_int(
            "cooldown_steps",
            max(5, w0 // 10) if cooldown_steps is None else cooldown_steps,
            minimum=0,
        )
        self.grace_steps = check_int(
            "grace_steps", w0 // 4 if grace_steps is None else grace_steps, minimum=0
        )
        self.min_alerts = check_int("min_alerts", min_alerts, minimum=1)
        self.window_steps = check_int(
            "window_steps", max(10, w0 // 5) if window_steps is None else window_steps, minimum=1
        )
        self.backoff = check_float("backoff", backoff, above=0.0)
        if self.backoff > 1.0:
            raise ValueError(f"`backoff` must be in (0, 1], got {backoff}")
        self.rewarm_from = check_float("rewarm_from", rewarm_from, above=0.0)
        if self.rewarm_from > 1.0:
            raise ValueError(f"`rewarm_from` must be in (0, 1], got {rewarm_from}")
        self.on_exhausted: OnExhausted = check_choice(  # type: ignore[assignment]
            "on_exhausted", on_exhausted, ("warn", "stop", "raise")
        )
        self.trigger_kinds = frozenset(str(getattr(k, "value", k)) for k in trigger_kinds)
        self.reset()

    # ------------------------------------------------------------------ the plan

    def reset(self) -> None:
        """Back to the initial plan."""
        self.warmup_steps = self.initial_warmup_steps
        self.extensions = 0
        self.stop_requested = False
        self.exhausted = False
        self._anchor: int | None = None  # first update of the current ramp
        self._anchor_factor = 1.0
        self._last_extension: int | None = None
        self._recent: deque[int] = deque(maxlen=64)
        self._first_unstable_factor: float | None = None

    def base_factor(self, step: int) -> float:
        """The factor without extensions: the shape's, or 1 when the user owns warmup."""
        if self.shape is None:
            return 1.0
        return warmup_factor(self.shape, step, self.initial_warmup_steps, **self.shape_kwargs)

    def factor(self, step: int) -> float:
        """The lr factor of the update at ``step`` (optimizer steps taken, 0 for the first)."""
        if self._anchor is None or step < self._anchor:
            return self.base_factor(step)
        c = self._anchor_factor
        span = self.warmup_steps - self._anchor
        return c + (1.0 - c) * min(1.0, (step - self._anchor + 1) / span)

    def in_warmup(self, step: int) -> bool:
        """Whether the update at ``step`` is inside the (current) planned warmup."""
        return step < self.warmup_steps

    def in_grace(self, step: int) -> bool:
        """Whether instability at ``step`` can still extend warmup (warmup or grace window)."""
        return step < self.warmup_steps + self.grace_steps

    # ------------------------------------------------------------------ the policy

    def observe(
        self,
        step: int,
        alerts: Sequence[Alert],
        *,
        next_step: int | None = None,
        lr: float = math.nan,
    ) -> list[Alert]:
        """Feed the alerts of the update at ``step``; return the alerts this decides.

        Args:
            step: The step the alerts are about.
            alerts: That step's alerts (any kinds; only ``trigger_kinds`` count).
            next_step: The next update not yet taken (default ``step + 1``); an extension
                takes effect there, continuing from the factor of ``next_step - 1``.
            lr: The effective lr at ``step``, for the recommendation of ``warmup_exhausted``.

        Returns:
            ``warmup_extended`` or ``warmup_exhausted`` alerts (usually none).
        """
        unstable = [a for a in alerts if AlertKind(a.kind).value in self.trigger_kinds]
        if not unstable or not self.adaptive:
            return []
        if self._first_unstable_factor is None:
            self._first_unstable_factor = self.factor(step)
        self._recent.append(step)
        while self._recent and self._recent[0] <= step - self.window_steps:
            self._recent.popleft()
        severe = any(AlertKind(a.kind).value in _SEVERE for a in unstable)
        if not severe and len(self._recent) < self.min_alerts:
            return []
        if not self.in_grace(step):
            return []
        if self._last_extension is not None and step - self._last_extension < self.cooldown_steps:
            return []
        nxt = step + 1 if next_step is None else next_step
        causes = sorted({AlertKind(a.kind).value for a in unstable})
        extra = self.extend_steps or max(1, round(self.extend_fraction * self.initial_warmup_steps))
        new_end = min(self.max_warmup_steps, max(self.warmup_steps, nxt) + extra)
        if self.extensions >= self.max_extensions or new_end <= max(self.warmup_steps, nxt):
            return self._exhausted(step, causes, lr)

        old_end = self.warmup_steps
        before = self.factor(nxt - 1)
        start = before * self.backoff
        if start >= 1.0:
            start = self.rewarm_from
        self._anchor = nxt
        self._anchor_factor = start
        self.warmup_steps = new_end
        self.extensions += 1
        self._last_extension = step
        self._recent.clear()
        dropped = start < before
        message = (
            f"warmup extended from {old_end} to {new_end} steps after {', '.join(causes)} "
            f"(extension {self.extensions} of {self.max_extensions}); the lr factor ramps "
            f"from {start:.3g} to 1"
            + (f", lowered from {before:.3g}" if dropped else ", continuing without a jump")
        )
        return [
            Alert(
                step=step,
                kind=AlertKind.WARMUP_EXTENDED,
                message=message,
                value=float(new_end),
                threshold=float(self.max_warmup_steps),
                details={
                    "old_warmup_steps": old_end,
                    "new_warmup_steps": new_end,
                    "causes": causes,
                    "factor_before": before,
                    "factor_after": start,
                    "extensions": self.extensions,
                },
            )
        ]

    def _exhausted(self, step: int, causes: list[str], lr: float) -> list[Alert]:
        if self.exhausted:
            return []
        self.exhausted = True
        if self.on_exhausted == "stop":
            self.stop_requested = True
        f = self._first_unstable_factor if self._first_unstable_factor is not None else 1.0
        advice = (
            f"training first went unstable at lr factor {f:.3g}; "
            f"lower the peak lr to about {0.5 * f:.3g} x its current value"
        )
        if math.isfinite(lr) and lr > 0:
            advice += f" (an lr of about {0.5 * lr:.3g} instead of {lr:.3g} where it broke)"
        advice += f", or start with a warmup of at least {self.warmup_steps} steps"
        return [
            Alert(
                step=step,
                kind=AlertKind.WARMUP_EXHAUSTED,
                message=(
                    f"still unstable ({', '.join(causes)}) after {self.extensions} extension(s) "
                    f"and a warmup of {self.warmup_steps} steps (caps: {self.max_extensions} "
                    f"extensions, {self.max_warmup_steps} steps): {advice}"
                ),
                value=float(self.warmup_steps),
                threshold=float(self.max_warmup_steps),
                details={
                    "causes": causes,
                    "extensions": self.extensions,
                    "warmup_steps": self.warmup_steps,
                    "recommended_lr_factor": 0.5 * f,
                    "recommended_lr": 0.5 * lr if math.isfinite(lr) else None,
                    "action": self.on_exhausted,
                },
            )
        ]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The plan's state (primitives only)."""
        return {
            "warmup_steps": self.warmup_steps,
            "extensions": self.extensions,
            "stop_requested": self.stop_requested,
            "exhausted": self.exhausted,
            "anchor": self._anchor,
            "anchor_factor": self._anchor_factor,
            "last_extension": self._last_extension,
            "recent": list(self._recent),
            "first_unstable_factor": self._first_unstable_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their initial values."""
        self.reset()
        self.warmup_steps = int(state.get("warmup_steps", self.initial_warmup_steps))
        self.extensions = int(state.get("extensions", 0))
        self.stop_requested = bool(state.get("stop_requested", False))
        self.exhausted = bool(state.get("exhausted", False))
        anchor = state.get("anchor")
        self._anchor = None if anchor is None else int(anchor)
        self._anchor_factor = float(state.get("anchor_factor", 1.0))
        last = state.get("last_extension")
        self._last_extension = None if last is None else int(last)
        self._recent.extend(int(s) for s in state.get("recent", []))
        first = state.get("first_unstable_factor")
        self._first_unstable_factor = None if first is None else float(first)
