"""The warmup plan as a small state machine, and the policy that lengthens it.

:class:`WarmupController` answers two questions: which lr factor applies to the update at a
step (:meth:`WarmupController.factor`), and, given the alerts of a step, whether warmup should
be extended (:meth:`WarmupController.observe`). It imports no Lightning and no torch.

**The no-jump rule: an extension stretches the rest of the shape in time.** Let :math:`F(u)`
be the shape over the planned :math:`W_0` steps at a real "schedule time" :math:`u \\ge -1`
(:func:`~warmup_monitor.schedules.shape_value`: :math:`F(t)` =
``warmup_factor(shape, t, W0)`` at integers, non-decreasing, 1 from :math:`u_e = W_0 - 1`;
:math:`u_e = W_0` for ``exponential`` and ``constant``). The update at step :math:`t` gets the
plan's factor :math:`P(t) = F(u(t))`, with :math:`u(t) = t` before any extension. An extension
decided after the update at step :math:`a` (the last one taken), with a new planned length
:math:`W'` (so that the factor first reaches 1 at :math:`T' = W' - W_0 + u_e`) and a restart
target :math:`g \\le P(a)` (:math:`g = P(a)` unless a back-off is configured), sets

.. math::

    u' = \\begin{cases}
        u(a) & g = P(a) \\\\
        \\max\\big(\\min\\{u : F(u) \\ge g\\},\\; u_e - (T' - a)\\big) & g < P(a)
    \\end{cases}
    \\qquad
    u(t) = u' + \\frac{u_e - u'}{T' - a}\\,(t - a) \\quad (t > a)

With a back-off, :math:`W'` is first lengthened (within the caps) to
:math:`T' \\ge a + \\lceil u_e - u' \\rceil`, so the rate :math:`r = (u_e - u') / (T' - a)` is
never above 1; where the caps leave less room, :math:`u'` moves up instead (a smaller back-off,
said in the alert). Hence, for every shape:

- **no jump up**: :math:`P(t+1) - P(t) \\le \\max_x F(x+1) - F(x)`, the shape's own largest
  one-step increase (exactly its largest step-to-step increase for ``linear``, ``geometric``,
  ``exponential``, ``polynomial``, ``step`` and ``constant``; within a factor
  :math:`1 + O(1/W_0^2)` of it for ``cosine`` and ``smoothstep``);
- **no drop without a back-off**: :math:`g = P(a)` continues from the factor last applied;
- **never above the old plan**: :math:`u' \\le u(a)` and :math:`T' > T` give
  :math:`P_\\text{new}(t) \\le P_\\text{old}(t)` for all :math:`t > a`: an extension only
  ever slows the ramp (a straight line from :math:`P(a)` would speed up convex shapes).

For ``linear`` this is the straight line from :math:`P(a)` to 1 at step :math:`W' - 1`:
:math:`P(t) = P(a) + (1 - P(a))\\,(t - a) / (W' - 1 - a)`.

When the user's scheduler warms up (``shape=None``), :math:`F` is that warmup as modelled by
``user_shape`` over :math:`W_0` (linear by default) and the monitor's factor is
:math:`P(t) / F(t) \\le 1`: 1 until the first extension, then the user's lr times the factor
follows the stretched plan instead of the user's own ramp. No lr drop either, unless a
back-off is configured.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind
from warmup_monitor.config import AdaptiveWarmup
from warmup_monitor.schedules import SHAPES, full_at, shape_params, shape_value

__all__ = ["DEFAULT_TRIGGER_KINDS", "OnExhausted", "WarmupController", "WarmupExhaustedError"]

OnExhausted = Literal["warn", "stop", "raise"]

#: Alert kinds that count as instability for the extension policy: the instability kinds of
#: :mod:`warmup_monitor.alerts` (``transient`` is not one) less the controller's own.
DEFAULT_TRIGGER_KINDS: frozenset[str] = frozenset(
    k.value for k in INSTABILITY_KINDS if k is not AlertKind.WARMUP_EXHAUSTED
)
#: Kinds that extend on their own: they already mean persistence (oscillation is five flips in
#: a row), divergence or a broken step. The others (one-step trend or gradient-norm spikes,
#: often a catapult that recovers at once) must repeat: ``min_alerts`` steps in a window.
_SEVERE = frozenset(
    k.value
    for k in (
        AlertKind.LOSS_SPIKE,
        AlertKind.NON_FINITE,
        AlertKind.OSCILLATION,
        AlertKind.PERSISTENT_INSTABILITY,
        AlertKind.EDGE_OF_STABILITY,
    )
)
_OWN = frozenset({AlertKind.WARMUP_EXTENDED.value, AlertKind.WARMUP_EXHAUSTED.value})
#: The recommended peak lr is this fraction of the lowest lr at which instability was acted on.
_RECOMMEND = 0.5


class WarmupExhaustedError(RuntimeError):
    """Raised (by the caller) with ``on_exhausted="raise"`` when the controller can do no more
    and training is still unstable."""


def _kind(alert: Alert) -> str:
    return str(getattr(alert.kind, "value", alert.kind))


def _finite_or(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


class WarmupController:
    """The warmup plan: planned length, extensions, the lr factor of every step.

    The plan and the no-jump rule are in the module docstring. The policy, per call of
    :meth:`observe` (the alerts of one step):

    1. Only alerts whose kind is in ``trigger_kinds`` count, and only inside warmup or the
       ``grace_steps`` after it (:meth:`in_grace`), at least ``cooldown_steps`` after the last
       extension (one spike, flagged over several steps, gives one extension).
    2. ``loss_spike``, ``non_finite``, ``oscillation``, ``persistent_instability`` and
       ``edge_of_stability`` act at once; other kinds (one-step trend or gradient-norm spikes)
       act once they flagged ``min_alerts`` steps within ``window_steps``.
    3. Acting means an extension by ``extend_steps`` (or ``extend_fraction`` x ``W0``) past
       the current end (or past the current step, in the grace window), restarting from
       ``min(backoff x factor, rewarm_from)`` when that is lower than the factor (a back-off),
       else continuing from the factor without a jump; a ``warmup_extended`` alert says so.
    4. When no extension can help (``max_extensions`` used, ``max_warmup_steps`` reached, or
       the factor already 1 with no back-off configured), a single ``warmup_exhausted`` alert
       recommends a peak lr (half the lowest lr at which instability was acted on) and carries
       ``on_exhausted``; after it the controller does nothing more.

    Example:
        >>> from warmup_monitor.alerts import Alert, AlertKind
        >>> c = WarmupController(warmup_steps=10)
        >>> c.factor(4)
        0.5
        >>> [a.kind.value for a in c.observe(4, [Alert(4, AlertKind.LOSS_SPIKE, "spike")])]
        ['warmup_extended']
        >>> c.warmup_steps, c.factor(4), c.factor(5), c.factor(14)
        (15, 0.5, 0.55, 1.0)

    Args:
        warmup_steps: Planned warmup length ``W0`` in optimizer steps (>= 1).
        shape: A shape of :mod:`warmup_monitor.schedules` when the monitor applies warmup
            itself, or ``None`` when the user's scheduler does (the factor is then 1 until an
            extension).
        shape_kwargs: Keyword arguments of the shape (or of ``user_schedule``), e.g.
            ``{"tau": 50}``.
        adaptive: The policy (:class:`~warmup_monitor.AdaptiveWarmup`: extension lengths,
            caps, cool-down, back-off, ``on_exhausted``, trigger kinds, ``user_schedule``);
            ``True``: its defaults; ``False``: the plan stays fixed.
        **overrides: Fields of :class:`~warmup_monitor.AdaptiveWarmup` to change, e.g.
            ``WarmupController(warmup_steps=100, backoff=0.5)``. Defaults that depend on
            ``W0``: ``max_warmup_steps`` 4 W0, ``cooldown_steps`` max(5, W0 // 10),
            ``grace_steps`` W0 // 4, ``window_steps`` max(10, W0 // 5).

    Raises:
        TypeError: an argument has the wrong type (named in the message).
        ValueError: an argument is out of range (named in the message, with what was given).
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        shape: str | None = "linear",
        shape_kwargs: Mapping[str, Any] | None = None,
        adaptive: AdaptiveWarmup | bool = True,
        **overrides: Any,
    ) -> None:
        w0 = check_int("warmup_steps", warmup_steps, minimum=1)
        self.initial_warmup_steps = w0
        if shape is not None:
            check_choice("schedule", shape, SHAPES)
        self.shape = shape
        if isinstance(adaptive, AdaptiveWarmup):
            config, self.adaptive = adaptive, True
        elif isinstance(adaptive, bool):
            config, self.adaptive = AdaptiveWarmup(), adaptive
        else:
            raise TypeError(
                f"`adaptive` must be an AdaptiveWarmup, True or False, got {adaptive!r}"
            )
        try:  # every check of the policy's options lives in AdaptiveWarmup
            config = replace(config, **overrides)
        except TypeError as err:
            raise TypeError(f"WarmupController: {err} (the options are AdaptiveWarmup's)") from None
        self.config = config
        if shape_kwargs is not None and not isinstance(shape_kwargs, Mapping):
            raise TypeError(f"`schedule_kwargs` must be a dict or None, got {shape_kwargs!r}")
        self.shape_kwargs = dict(shape_kwargs or {})
        self.user_shape = config.user_schedule
        # The shape the plan stretches: the monitor's, or the model of the user's warmup.
        self._shape = shape if shape is not None else self.user_shape
        self._params = shape_params(self._shape, w0, self.shape_kwargs)
        self._full = float(full_at(self._shape, w0))  # u_e: schedule time where F reaches 1
        self._offset = w0 - full_at(self._shape, w0)  # W' = T' + offset
        self._first = self._f(0.0)  # the shape's first factor: no back-off goes below it
        self.extend_fraction = config.extend_fraction
        self.extend_steps = config.extend_steps
        self.max_extensions = config.max_extensions
        self.max_warmup_steps = (
            4 * w0 if config.max_warmup_steps is None else config.max_warmup_steps
        )
        if self.max_warmup_steps < w0:
            raise ValueError(
                f"`AdaptiveWarmup.max_warmup_steps` must be >= warmup_steps ({w0}), "
                f"got {self.max_warmup_steps}"
            )
        self.cooldown_steps = (
            max(5, w0 // 10) if config.cooldown_steps is None else config.cooldown_steps
        )
        self.grace_steps = w0 // 4 if config.grace_steps is None else config.grace_steps
        self.min_alerts = config.min_alerts
        self.window_steps = max(10, w0 // 5) if config.window_steps is None else config.window_steps
        self.backoff = config.backoff
        self.rewarm_from = config.rewarm_from
        self.on_exhausted: OnExhausted = config.on_exhausted
        kinds = config.trigger_kinds
        self.trigger_kinds: frozenset[str] = (
            DEFAULT_TRIGGER_KINDS if kinds is None else frozenset(kinds)
        )
        self.reset()

    # ------------------------------------------------------------------ the plan

    def reset(self) -> None:
        """Back to the initial plan (no extension, nothing observed)."""
        self.warmup_steps = self.initial_warmup_steps
        self.extensions = 0
        self.stop_requested = False
        self.exhausted = False
        # (a, u', r): for steps t > a, schedule time u(t) = u' + r (t - a). Anchors never
        # decrease; at most one segment per extension.
        self._segments: list[tuple[int, float, float]] = []
        self._last_extension: int | None = None
        self._recent: deque[int] = deque(maxlen=self.min_alerts)
        # The lowest plan factor (and the lr, if known) at which instability was acted on.
        self._unstable_factor: float | None = None
        self._unstable_lr: float | None = None

    def _f(self, u: float) -> float:
        return shape_value(self._shape, u, self.initial_warmup_steps, self._params)

    def _u(self, step: int) -> float:
        for a, u, r in reversed(self._segments):
            if step > a:
                return u + r * (step - a)
        return float(step)

    @property
    def owns_warmup(self) -> bool:
        """Whether the monitor applies the warmup shape (``shape`` is not ``None``)."""
        return self.shape is not None

    def base_factor(self, step: int) -> float:
        """The factor without extensions: the shape's, or 1 when the user owns warmup."""
        if self.shape is None:
            return 1.0
        return self._f(float(step))

    def plan(self, step: int) -> float:
        """The plan's warmup factor at ``step``: the fraction of the peak lr the update gets.

        Equal to :meth:`factor` when the monitor owns warmup; with ``shape=None`` it is the
        user's modelled warmup times :meth:`factor`.
        """
        if not self._segments:
            return self._f(float(step))
        if step >= self.full_lr_step:  # exactly 1 where announced, whatever the rounding of u
            return 1.0
        return self._f(self._u(step))

    def factor(self, step: int) -> float:
        """The lr factor of the update at ``step`` (optimizer steps taken, 0 for the first).

        In ``(0, 1]``; the monitor multiplies the scheduler's lr by it for that update only.
        """
        if not self._segments:
            return 1.0 if self.shape is None else self._f(float(step))
        planned = self.plan(step)
        if self.shape is not None:
            return planned
        base = self._f(float(step))
        return 1.0 if base <= 0.0 else min(1.0, planned / base)

    def in_warmup(self, step: int) -> bool:
        """Whether the update at ``step`` is inside the (current) planned warmup."""
        return step < self.warmup_steps

    def in_grace(self, step: int) -> bool:
        """Whether instability at ``step`` can still act (warmup or the grace window)."""
        return step < self.warmup_steps + self.grace_steps

    @property
    def full_lr_step(self) -> int:
        """The first step at which the plan's factor is 1 (``warmup_steps - 1`` for most
        shapes, ``warmup_steps`` for ``exponential`` and ``constant``)."""
        return self.warmup_steps - self._offset

    # ------------------------------------------------------------------ the policy

    def observe(
        self,
        step: int,
        alerts: Sequence[Alert],
        *,
        next_step: int | None = None,
        lr: float | None = math.nan,
    ) -> list[Alert]:
        """Feed the alerts of the update at ``step``; return the alerts this decides.

        Calls may skip steps without alerts, and may come late (after later updates): the
        change takes effect at ``next_step`` and continues from the factor of the update just
        before it.

        Args:
            step: The step the alerts are about.
            alerts: That step's alerts (any kinds; only ``trigger_kinds`` count).
            next_step: The next update not yet taken (default ``step + 1``).
            lr: The effective lr of the update at ``step`` (scheduler lr x factor), for the
                recommendation of ``warmup_exhausted``; NaN or ``None`` if unknown.

        Returns:
            A ``warmup_extended`` or ``warmup_exhausted`` alert, or nothing (the usual case).
        """
        if not self.adaptive or self.exhausted:
            return []
        unstable = [a for a in alerts if _kind(a) in self.trigger_kinds]
        if not unstable or not self.in_grace(step):
            return []
        last = self._last_extension
        if last is not None and (step <= last or step - last < self.cooldown_steps):
            return []
        if not self._recent or self._recent[-1] != step:
            self._recent.append(step)
        while self._recent and self._recent[0] <= step - self.window_steps:
            self._recent.popleft()
        severe = any(_kind(a) in _SEVERE for a in unstable)
        if not severe and len(self._recent) < self.min_alerts:
            return []

        level = self.plan(step)
        if self._unstable_factor is None or level < self._unstable_factor:
            self._unstable_factor = level
            good_lr = lr is not None and math.isfinite(lr) and lr > 0.0
            self._unstable_lr = float(lr) if good_lr else None  # type: ignore[arg-type]
        causes = sorted({_kind(a) for a in unstable})
        cause_steps = list(self._recent)
        nxt = step + 1 if next_step is None else next_step
        anchor = max(step, nxt - 1, self._segments[-1][0] if self._segments else 0)
        return self._extend(step, anchor, causes, cause_steps)

    def _extend(self, step: int, a: int, causes: list[str], cause_steps: list[int]) -> list[Alert]:
        old_end = self.warmup_steps
        before = self.plan(a)
        u_a = self._u(a)
        target = min(before, max(self._first, min(self.backoff * before, self.rewarm_from)))
        wants_drop = target < before
        if self.extensions >= self.max_extensions:
            return self._exhaust(step, causes, cause_steps, "caps")
        if not wants_drop and before >= 1.0:
            return self._exhaust(step, causes, cause_steps, "at_one")

        extra = self.extend_steps or max(1, round(self.extend_fraction * self.initial_warmup_steps))
        new_end = max(old_end, a + 1) + extra
        u_new = u_a
        if wants_drop:
            u_new = self._inverse(target, min(u_a, self._full))
            # Lengthen so that the re-warm is no faster than the shape: T' - a >= u_e - u'.
            new_end = max(new_end, a + math.ceil(self._full - u_new - 1e-9) + self._offset)
        new_end = min(new_end, self.max_warmup_steps)
        t_new = new_end - self._offset
        if new_end <= old_end or t_new <= a:
            return self._exhaust(step, causes, cause_steps, "caps")
        if wants_drop:
            u_new = max(u_new, self._full - (t_new - a))  # the caps leave less room: back off less
        rate = min(1.0, max(0.0, (self._full - u_new) / (t_new - a)))
        after = self._f(u_new)
        dropped = after < before

        self._segments.append((a, u_new, rate))
        self.warmup_steps = new_end
        self.extensions += 1
        self._last_extension = step
        self._recent.clear()
        what = "lr factor" if self.shape is not None else "warmup factor (fraction of the peak lr)"
        if dropped:
            how = f"the {what} is lowered from {before:.3g} to {after:.3g} (back-off)"
            if target < after - 1e-12:
                how += f"; the caps leave no room to go down to {target:.3g}"
        else:
            how = f"the {what} continues from {before:.3g} without a jump"
        message = (
            f"warmup extended from {old_end} to {new_end} steps after {', '.join(causes)} "
            f"(extension {self.extensions} of {self.max_extensions}); {how} and reaches 1 at "
            f"step {t_new}"
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
                    "cause_steps": cause_steps,
                    "factor_before": before,
                    "factor_after": after,
                    "backoff": dropped,
                    "next_factor": self.factor(a + 1),
                    "anchor_step": a,
                    "full_lr_step": t_new,
                    "extensions": self.extensions,
                    "max_extensions": self.max_extensions,
                },
            )
        ]

    def _inverse(self, target: float, hi: float) -> float:
        """The least schedule time ``u`` in ``[-1, hi]`` with ``F(u) >= target``
        (``F(hi) >= target``), to float precision."""
        lo = -1.0
        if self._f(lo) >= target:
            return lo
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            if self._f(mid) >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def _exhaust(
        self, step: int, causes: list[str], cause_steps: list[int], reason: str
    ) -> list[Alert]:
        self.exhausted = True
        if self.on_exhausted == "stop":
            self.stop_requested = True
        level = 1.0 if self._unstable_factor is None else self._unstable_factor
        lr = self._unstable_lr
        if reason == "caps":
            why = (
                f"after {self.extensions} extension(s) and a warmup of {self.warmup_steps} steps "
                f"(caps: {self.max_extensions} extensions, {self.max_warmup_steps} steps)"
            )
        else:
            why = (
                "with the lr factor already at 1 and no back-off configured (`backoff` and "
                "`rewarm_from` are 1: nothing left to slow down)"
            )
        where = f"{level:.3g} x the peak" + (f", lr {lr:.3g}" if lr is not None else "")
        advice = (
            f"instability was acted on at {where}: lower the peak lr to about "
            f"{_RECOMMEND * level:.3g} x its current value"
        )
        if lr is not None:
            advice += f" (about {_RECOMMEND * lr:.3g})"
        advice += f", or start with a warmup of at least {self.warmup_steps} steps"
        if reason == "at_one":
            advice += ", or let the monitor re-warm (e.g. `rewarm_from=0.5`)"
        if level < 0.1:
            advice += (
                "; instability below a tenth of the peak lr often has another cause "
                "(initialisation, data, loss scale)"
            )
        return [
            Alert(
                step=step,
                kind=AlertKind.WARMUP_EXHAUSTED,
                message=f"still unstable ({', '.join(causes)}) {why}: {advice}",
                value=float(self.warmup_steps),
                threshold=float(self.max_warmup_steps),
                details={
                    "reason": reason,
                    "causes": causes,
                    "cause_steps": cause_steps,
                    "extensions": self.extensions,
                    "max_extensions": self.max_extensions,
                    "warmup_steps": self.warmup_steps,
                    "max_warmup_steps": self.max_warmup_steps,
                    "unstable_factor": level,
                    "unstable_lr": lr,
                    "recommended_lr_factor": _RECOMMEND * level,
                    "recommended_lr": None if lr is None else _RECOMMEND * lr,
                    "action": self.on_exhausted,
                },
            )
        ]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The plan's state (primitives only; the configuration is not saved)."""
        return {
            "warmup_steps": self.warmup_steps,
            "extensions": self.extensions,
            "stop_requested": self.stop_requested,
            "exhausted": self.exhausted,
            "segments": [[a, u, r] for a, u, r in self._segments],
            "last_extension": self._last_extension,
            "recent": list(self._recent),
            "unstable_factor": self._unstable_factor,
            "unstable_lr": self._unstable_lr,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Missing or malformed entries keep their initial values."""
        self.reset()

        def as_int(key: str, default: int) -> int:
            try:
                return int(state.get(key, default))
            except (TypeError, ValueError):
                return default

        self.warmup_steps = max(self.initial_warmup_steps, as_int("warmup_steps", 0))
        self.extensions = max(0, as_int("extensions", 0))
        self.stop_requested = bool(state.get("stop_requested", False))
        self.exhausted = bool(state.get("exhausted", False))
        segments = state.get("segments")
        for seg in segments if isinstance(segments, (list, tuple)) else []:
            try:
                a, u, r = int(seg[0]), float(seg[1]), float(seg[2])
            except (TypeError, ValueError, IndexError):
                continue
            if (
                math.isfinite(u)
                and math.isfinite(r)
                and (not self._segments or a >= self._segments[-1][0])
            ):
                self._segments.append((a, max(-1.0, u), min(1.0, max(0.0, r))))
        last = as_int("last_extension", -1) if state.get("last_extension") is not None else -1
        self._last_extension = None if last < 0 else last
        recent = state.get("recent")
        for s in recent if isinstance(recent, (list, tuple)) else []:
            if isinstance(s, int) and not isinstance(s, bool):
                self._recent.append(s)
        factor = state.get("unstable_factor")
        self._unstable_factor = None if factor is None else _finite_or(factor, 1.0)
        lr = state.get("unstable_lr")
        self._unstable_lr = None if lr is None else _finite_or(lr, math.nan)
        if self._unstable_lr is not None and not math.isfinite(self._unstable_lr):
            self._unstable_lr = None
