"""The warmup plan as a small state machine, and the policy that lengthens it.

:class:`WarmupController` answers two questions: which lr factor applies to the update at a
step (:meth:`WarmupController.factor`), and, given the alerts of a step, whether warmup should
be extended (:meth:`WarmupController.observe`). It imports no Lightning and no torch.

**The no-jump rule: an action stretches the rest of the shape in time.** With :math:`F(u)` the
shape at a real schedule time :math:`u` (:func:`~warmup_monitor.schedules.shape_value`, at its
peak from :math:`u_e`), the update at step :math:`t` gets :math:`P(t) = F(u(t))`, :math:`u(t) = t`
before any action. An action after the update at step :math:`a`, with a new planned length
:math:`W'` (the plan reaches the peak at :math:`T'`) and a restart level :math:`g \\le P(a)`,
continues from :math:`u' = \\min\\{u : F(u) \\ge g\\}` (:math:`u(a)` without a back-off) as
:math:`u(t) = u' + (u_e - u')(t - a) / (T' - a)`, with :math:`T'` lengthened so that the rate
is at most 1 (where the caps leave less room, :math:`u'` moves up: a smaller back-off, said in
the alert). Hence **no jump up** (no one-step rise above the shape's own largest), **no drop
but an announced back-off**, and **never above the old plan**. The derivation is in
``docs/adaptive_plan.md``.

**Your own scheduler's ramp (``shape=None``): the rule.** The monitor records the lr your
scheduler set for each update of the declared warmup, :math:`L(s)` for :math:`s = 0..W_0`
(param group 0, read before the factor is applied; :class:`~warmup_monitor.schedules.
RecordedRamp`), and :math:`F` is that recorded ramp, linear between steps, with
:math:`u_e = W_0` (by step :math:`W_0` every warmup has ended, whether it ramps as
:math:`s / W_0` like Hugging Face's ``get_linear_schedule_with_warmup`` and
``get_cosine_schedule_with_warmup`` or as :math:`(s + 1) / W_0`). The update at :math:`t`
then gets

.. math::

    \\text{factor}(t) = \\min\\Big(1, \\frac{L(u(t))}{L(\\min(t, W_0))}\\Big)

so that its lr is :math:`L(u(t))` during your warmup and :math:`L(u(t)) / L(W_0)` times your
own decay after it. Since the lrs are the ones your scheduler produced, the stretched ramp
never rises faster than your ramp did (nothing is guessed about its shape), and the factor is
1 until the first action. A controller driven by hand, without :meth:`WarmupController.
record_user_lr`, models the ramp with ``user_schedule`` instead.

**The policy** is in :class:`WarmupController`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.actions import (
    GRAD_KINDS,
    LOSS_KINDS,
    WEAK_KINDS,
    RollbackRequest,
    action_alerts,
    acts_at_once,
    exhausted_alert,
    level_name,
    rollback_alert,
    rollback_worthy,
)
from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind
from warmup_monitor.config import AdaptiveWarmup
from warmup_monitor.detectors._common import finite_float
from warmup_monitor.schedules import (
    SHAPES,
    RecordedRamp,
    full_at,
    least_time,
    shape_params,
    shape_value,
)

__all__ = [
    "DEFAULT_TRIGGER_KINDS",
    "OnExhausted",
    "RollbackRequest",
    "WarmupController",
    "WarmupExhaustedError",
]

OnExhausted = Literal["warn", "stop", "raise"]

K = AlertKind
#: Alert kinds that count as instability for the policy: the instability kinds of
#: :mod:`warmup_monitor.alerts` (``transient`` is not one) less the controller's own.
DEFAULT_TRIGGER_KINDS: frozenset[str] = frozenset(
    k.value for k in INSTABILITY_KINDS if k is not K.WARMUP_EXHAUSTED
)


class WarmupExhaustedError(RuntimeError):
    """Raised with ``on_exhausted="raise"`` when the controller can do no more, still unstable."""


def _kind(alert: Alert) -> str:
    return str(getattr(alert.kind, "value", alert.kind))


class WarmupController:
    """The warmup plan and the policy that extends it, backs off and asks for rollbacks.

    The plan and the no-jump rule are in the module docstring. The policy, per call of
    :meth:`observe` (the alerts of one step):

    1. Only alerts whose kind is in ``trigger_kinds`` count, and only inside the planned
       warmup or the ``grace_steps`` after it, at least ``cooldown_steps`` after the last
       action. Consecutive flagged steps, and flagged steps less than ``window_steps`` apart,
       form one *episode*; its first step is the onset.
    2. It **acts** on ``loss_spike``, ``non_finite``, ``persistent_instability``,
       ``edge_of_stability`` and ``loss_divergence`` at once; on ``loss_trend_spike`` once
       ``min_alerts`` steps were flagged within ``window_steps``, or at once when a gradient
       kind (a notice by default: ``grad_norm_spike``, ``grad_norm_rise``, ``oscillation``)
       comes on the same step. Notices are not ``trigger_kinds`` by default; opted in, steps
       flagged by gradient kinds or ``persistent_instability`` alone count only once a loss
       kind is in the episode (healthy gradient norms bounce off a low, or climb, for long).
    3. **Acting** lowers the factor to ``backoff`` times the factor that broke (at most
       ``rewarm_from``; never below the first factor of the ramp), announced by an
       ``lr_backoff`` alert, and re-warms from there to the peak over an extended warmup: by
       ``extend_steps`` or ``extend_fraction`` x the planned length, past the current step, and
       at least as slowly as the shape itself, announced by ``warmup_extended``. A back-off
       after an earlier action also sets :attr:`ceiling`: the plan stays at its new level.
    4. With ``rollback``, a severe episode (:func:`~warmup_monitor.actions.rollback_worthy`)
       also sets :attr:`rollback_request`: the adapter restores the last snapshot taken before
       the onset and calls :meth:`rolled_back`; the episode that exhausts the plan (5.) too.
    5. When no action can help (``max_extensions`` used, ``max_warmup_steps`` reached, or the
       factor already 1 with no back-off configured), one ``warmup_exhausted`` alert
       recommends a peak lr (:func:`~warmup_monitor.actions.recommend`) and carries
       ``on_exhausted``; after it the controller does nothing more.

    Example:
        >>> from warmup_monitor.alerts import Alert, AlertKind
        >>> c = WarmupController(warmup_steps=10)
        >>> c.factor(4)
        0.5
        >>> [a.kind.value for a in c.observe(4, [Alert(4, AlertKind.LOSS_SPIKE, "spike")])]
        ['lr_backoff', 'warmup_extended']
        >>> c.warmup_steps, round(c.factor(5), 12), c.factor(19)  # 0.5 -> 0.25, re-warm
        (20, 0.3, 1.0)

    Args:
        warmup_steps: Planned warmup length ``W0`` in optimizer steps (>= 1).
        shape: A shape of :mod:`warmup_monitor.schedules` when the monitor applies warmup
            itself, or ``None`` when the user's scheduler does (the factor is then 1 until an
            action).
        shape_kwargs: Keyword arguments of the shape (or of ``user_schedule``), e.g.
            ``{"tau": 50}``.
        adaptive: The policy (:class:`~warmup_monitor.AdaptiveWarmup`); ``True``: its
            defaults; ``False``: the plan stays fixed.
        **overrides: Fields of :class:`~warmup_monitor.AdaptiveWarmup` to change, e.g.
            ``WarmupController(warmup_steps=100, backoff=1.0)``; the defaults that depend on
            ``W0`` are :meth:`~warmup_monitor.AdaptiveWarmup.resolved`'s.

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
        r = config.resolved(w0)
        self.max_warmup_steps, self.grace_steps = r["max_warmup_steps"], r["grace_steps"]
        self.cooldown_steps, self.window_steps = r["cooldown_steps"], r["window_steps"]
        self.snapshot_every_n_steps = r["snapshot_every_n_steps"]
        if self.max_warmup_steps < w0:
            raise ValueError(
                f"`AdaptiveWarmup.max_warmup_steps` must be >= warmup_steps ({w0}), "
                f"got {self.max_warmup_steps}"
            )
        c = config
        self.rollback = c.rollback and self.adaptive
        self.extend_fraction, self.extend_steps = c.extend_fraction, c.extend_steps
        self.max_extensions, self.min_alerts = c.max_extensions, c.min_alerts
        self.backoff, self.rewarm_from = c.backoff, c.rewarm_from
        self.on_exhausted: OnExhausted = c.on_exhausted
        self.trigger_kinds: frozenset[str] = (
            DEFAULT_TRIGGER_KINDS if c.trigger_kinds is None else frozenset(c.trigger_kinds)
        )
        self._corroborable = bool(self.trigger_kinds & LOSS_KINDS)
        self.reset()

    # ------------------------------------------------------------------ the plan

    def reset(self) -> None:
        """Back to the initial plan (no action, nothing observed or recorded)."""
        self.warmup_steps, self.extensions = self.initial_warmup_steps, 0
        self.stop_requested = self.exhausted = False
        # (a, u', r): u(t) = u' + r (t - a) for t > a; one segment per extension.
        self._segments: list[tuple[int, float, float]] = []
        self._last_extension: int | None = None
        self._recent: deque[int] = deque(maxlen=self.config.min_alerts)
        self._onset: int | None = None  # first and last flagged steps of the open episode
        self._last_flagged: int | None = None
        self._causes: set[str] = set()
        # The lowest plan factor (and the lr, if known) at which instability was acted on.
        self._unstable_factor: float | None = None
        self._unstable_lr: float | None = None  # (None: unknown)
        self._ceiling: float | None = None  # the highest level allowed, once it broke again
        self._ramp = RecordedRamp(self.initial_warmup_steps)
        self.rollback_request: RollbackRequest | None = None
        #: ``[step, snapshot step or None]`` of every rollback: facts that survive a resume.
        self.rollbacks: list[list[int | None]] = []

    @property
    def _recorded(self) -> bool:
        return self.shape is None and len(self._ramp) > 0 and not self._flat

    # Your lrs never rose: the plan is a factor on them (RecordedRamp.flat).
    _flat = property(lambda self: self.shape is None and self._ramp.flat())

    @property
    def _full(self) -> float:
        """u_e: the schedule time at which the shape (or the recorded ramp) is at its peak."""
        return float(self.initial_warmup_steps if self._recorded else self._full_model)

    @property
    def _full_model(self) -> int:
        return full_at(self._shape, self.initial_warmup_steps)

    @property
    def _offset(self) -> int:
        """W' - T': the planned length minus the step at which the plan reaches its peak."""
        return 0 if self._recorded else self.initial_warmup_steps - self._full_model

    def _f(self, u: float) -> float:
        if self._recorded:
            return self._ramp.value(u)
        return shape_value(self._shape, u, self.initial_warmup_steps, self._params)

    def _first(self) -> float:
        """The lowest level a back-off may go to: the ramp's first (positive) value."""
        if self._recorded:
            return self._ramp.first_positive() or self._f(self._full)
        return self._f(0.0)

    def _u(self, step: int) -> float:
        for a, u, r in reversed(self._segments):
            if step > a:
                return u + r * (step - a)
        return self._full if self._flat else float(step)

    def record_user_lr(self, step: int, lr: float) -> None:
        """Record the lr the user's scheduler set for the update at ``step`` (param group 0,
        without the monitor's factor). Call it for every step from 0, before :meth:`factor`
        of that step; the monitor does. Only used with ``shape=None``; steps past
        ``warmup_steps`` are not kept."""
        if self.shape is None and not (self._flat and self._segments):  # a flat plan: kept
            self._ramp.record(step, lr)

    @property
    def ceiling(self) -> float | None:
        """The highest level the plan may reach (a factor of the peak; with a recorded ramp, an
        lr), set when instability comes back after a back-off: the level that back-off lowers
        to, so that the lr stays there; ``None`` until then."""
        return self._ceiling

    @property
    def owns_warmup(self) -> bool:
        """Whether the monitor applies the warmup shape (``shape`` is not ``None``)."""
        return self.shape is not None

    def base_factor(self, step: int) -> float:
        """The factor without actions: the shape's, or 1 when the user owns warmup."""
        if self.shape is None:
            return 1.0
        return self._f(float(step))

    def plan(self, step: int) -> float:
        """The plan at ``step``: the fraction of the peak lr the update gets (with a recorded
        user ramp: the lr itself, before the user's decay).

        Equal to :meth:`factor` when the monitor owns warmup.
        """
        if not self._segments:
            return self._f(self._u(step))
        # Exactly the peak where announced, whatever u's rounding.
        level = self._f(self._full) if step >= self.full_lr_step else self._f(self._u(step))
        return level if self._ceiling is None else min(level, self._ceiling)

    def factor(self, step: int) -> float:
        """The lr factor of the update at ``step`` (optimizer steps taken, 0 for the first).

        In ``(0, 1]``; the monitor multiplies the scheduler's lr by it for that update only.
        """
        if not self._segments:
            return 1.0 if self.shape is None else self._f(float(step))
        planned = self.plan(step)
        if self.shape is not None or self._flat:
            return planned
        base = self._f(float(min(step, self._full)) if self._recorded else float(step))
        return 1.0 if base <= 0.0 else max(min(1.0, planned / base), 1e-12)

    def in_warmup(self, step: int) -> bool:
        """Whether the update at ``step`` is inside the (current) planned warmup."""
        return step < self.warmup_steps

    def in_grace(self, step: int) -> bool:
        """Whether instability at ``step`` can still act (warmup or the grace window)."""
        return step < self.warmup_steps + self.grace_steps

    @property
    def full_lr_step(self) -> int:
        """The first step at which the plan is at its peak (``warmup_steps - 1`` for most
        shapes, ``warmup_steps`` for ``exponential``, ``constant`` and a recorded ramp)."""
        return self.warmup_steps - self._offset

    def snapshot_due(self, steps_taken: int) -> bool:
        """Whether a snapshot is due before the update at ``steps_taken`` (with ``rollback``:
        every ``snapshot_every_n_steps`` steps while instability can still act, and not
        within ``window_steps`` of a flagged step: the kept snapshots precede the episode)."""
        last = self._last_flagged  # no snapshot while an episode is open: it would hold it
        open_episode = last is not None and steps_taken - 1 - last < self.window_steps
        return (
            self.rollback
            and not self.exhausted
            and not open_episode
            and steps_taken % self.snapshot_every_n_steps == 0
            and self.in_grace(steps_taken)
        )

    def earliest_onset(self, first_unseen: int) -> int:
        """The earliest step a rollback could still restore to before, when the steps from
        ``first_unseen`` on are not yet observed: the onset of an episode a later flagged step
        would continue (within ``window_steps`` of its last flagged step), else
        ``first_unseen``. Only the last snapshot before it can be needed."""
        last, onset = self._last_flagged, self._onset
        if onset is not None and last is not None and first_unseen - last <= self.window_steps:
            return min(onset, first_unseen)
        return first_unseen

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
                messages and the recommendation; NaN or ``None`` if unknown.

        Returns:
            ``lr_backoff`` and ``warmup_extended``, or ``warmup_exhausted``, or nothing (the
            usual case).
        """
        if not self.adaptive or self.exhausted:
            return []
        unstable = [a for a in alerts if _kind(a) in self.trigger_kinds]
        if not unstable or not self.in_grace(step):
            return []
        kinds = {_kind(a) for a in unstable}
        last = self._last_flagged
        if self._onset is None or last is None or step - last >= self.window_steps:
            self._onset, self._causes = step, set()
        self._last_flagged = max(step, last or 0)
        self._causes |= kinds
        if rollback_worthy(unstable, self.config.rollback_loss_ratio):
            self._causes.add("_rollback")
        done = self._last_extension
        if done is not None and (step <= done or step - done < self.cooldown_steps):
            return []
        if kinds <= WEAK_KINDS and self._causes.isdisjoint(LOSS_KINDS) and self._corroborable:
            return []
        if not self._recent or self._recent[-1] != step:
            self._recent.append(step)
        while self._recent and self._recent[0] <= step - self.window_steps:
            self._recent.popleft()
        grad = {_kind(a) for a in alerts} & GRAD_KINDS if kinds & LOSS_KINDS else set()  # notices
        if not acts_at_once(kinds | grad) and len(self._recent) < self.config.min_alerts:
            return []

        level = self.plan(step)
        good_lr = lr is not None and math.isfinite(lr) and lr > 0.0
        if self._unstable_factor is None or level < self._unstable_factor:
            self._unstable_factor = level
            self._unstable_lr = float(lr) if good_lr else None  # type: ignore[arg-type]
        causes = sorted(k for k in self._causes if not k.startswith("_"))
        cause_steps = list(self._recent)
        nxt = step + 1 if next_step is None else next_step
        anchor = max(step, nxt - 1, self._segments[-1][0] if self._segments else 0)
        out = self._extend(step, anchor, causes, cause_steps, lr if good_lr else None)
        # The episode that exhausts the plan rolls back too: what it damaged is not kept.
        if self.rollback and "_rollback" in self._causes:
            onset = self._onset if self._onset is not None else step
            self.rollback_request = RollbackRequest(step, onset, tuple(causes))
        return out

    def _extend(
        self, step: int, a: int, causes: list[str], cause_steps: list[int], lr: float | None
    ) -> list[Alert]:
        cfg = self.config
        old_end = self.warmup_steps
        before = self.plan(a)
        u_a = self._u(a)
        peak = self._f(self._full)
        target = min(before, max(self._first(), min(cfg.backoff * before, cfg.rewarm_from * peak)))
        wants_drop = target < before
        if self.extensions >= cfg.max_extensions:
            return self._exhaust(step, causes, cause_steps, "caps")
        if not wants_drop and u_a >= self._full:  # at the peak, nothing to slow down
            return self._exhaust(step, causes, cause_steps, "at_one")

        extra = cfg.extend_steps or max(1, round(cfg.extend_fraction * old_end))
        new_end = max(old_end, a + 1) + extra
        u_new = u_a
        offset, full = self._offset, self._full
        if wants_drop:
            u_new = least_time(self._f, target, -1.0, min(u_a, full))
            # Lengthen so that the re-warm is no faster than the shape: T' - a >= u_e - u'.
            new_end = max(new_end, a + math.ceil(full - u_new - 1e-9) + offset)
        new_end = min(new_end, self.max_warmup_steps)
        t_new = new_end - offset
        if new_end <= old_end or t_new <= a:
            return self._exhaust(step, causes, cause_steps, "caps")
        if wants_drop:
            u_new = max(u_new, full - (t_new - a))  # the caps leave less room: back off less
        rate = min(1.0, max(0.0, (full - u_new) / (t_new - a)))
        after = self._f(u_new)
        if self.extensions and wants_drop:  # it broke again after a re-warm: no more re-warm
            self._ceiling = after if self._ceiling is None else min(self._ceiling, after)

        self._segments.append((a, u_new, rate))
        self.warmup_steps = new_end
        self.extensions += 1
        self._last_extension = step
        self._recent.clear()
        next_factor = self.factor(a + 1)
        # Levels as factors: of the peak, or (a recorded ramp's levels are lrs) of the user's lr.
        unit = (self._ramp.value(min(a, self._full)) if self._recorded else 1.0) or 1.0
        frac_before, frac_after, frac_target = before / unit, after / unit, target / unit
        return action_alerts(
            step,
            what=level_name(owns_warmup=self.shape is not None, recorded=self._recorded),
            levels=(frac_before, frac_after, frac_target),
            lr=None if lr is None else (lr, lr * after / before),
            plan=(old_end, new_end, t_new, self.max_warmup_steps),
            count=(self.extensions, cfg.max_extensions),
            details={
                "causes": causes,
                "cause_steps": cause_steps,
                "onset_step": self._onset,
                "anchor_step": a,
                "next_factor": next_factor,
                "ceiling": None if self._ceiling is None else self._ceiling / unit,
            },
        )

    def _exhaust(
        self, step: int, causes: list[str], cause_steps: list[int], reason: str
    ) -> list[Alert]:
        self.exhausted = True
        if self.config.on_exhausted == "stop":
            self.stop_requested = True
        level = 1.0 if self._unstable_factor is None else self._unstable_factor
        if self._recorded:  # the plan's level is an lr: say it as a fraction of the peak
            level = level / max(self._f(self._full), 1e-300)
        return [
            exhausted_alert(
                step,
                reason=reason,
                causes=causes,
                cause_steps=cause_steps,
                extensions=self.extensions,
                max_extensions=self.config.max_extensions,
                warmup_steps=self.warmup_steps,
                max_warmup_steps=self.max_warmup_steps,
                level=level,
                lr=self._unstable_lr,
                action=self.config.on_exhausted,
            )
        ]

    # ------------------------------------------------------------------ rollback

    def rolled_back(self, step: int, snapshot_step: int | None, **details: Any) -> Alert:
        """Record that :attr:`rollback_request` was carried out at ``step`` (after that
        update) by restoring the snapshot taken before update ``snapshot_step`` (``None``: no
        snapshot before the onset was kept, nothing was restored); return the ``rollback``
        alert. The fact is kept in :meth:`state_dict`."""
        request = self.rollback_request
        self.rollback_request = None
        self.rollbacks.append([step, snapshot_step])
        self._onset, self._last_flagged, self._causes = None, None, set()
        return rollback_alert(step, snapshot_step, request, len(self.rollbacks), details)

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
            "onset": self._onset,
            "last_flagged": self._last_flagged,
            "causes": sorted(self._causes),
            "unstable_factor": self._unstable_factor,
            "unstable_lr": self._unstable_lr,
            "ceiling": self._ceiling,
            "user_lrs": list(self._ramp.values),
            "rollbacks": [list(r) for r in self.rollbacks],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Missing or malformed entries keep their initial values."""
        self.reset()

        def as_int(key: str, default: int) -> int:
            try:
                return int(state.get(key, default))
            except (TypeError, ValueError):
                return default

        def opt_int(key: str) -> int | None:
            value = as_int(key, -1) if state.get(key) is not None else -1
            return None if value < 0 else value

        def items(key: str) -> list[Any]:
            value = state.get(key)
            return list(value) if isinstance(value, (list, tuple)) else []

        self.warmup_steps = max(self.initial_warmup_steps, as_int("warmup_steps", 0))
        self.extensions = max(0, as_int("extensions", 0))
        self.stop_requested, self.exhausted = (
            bool(state.get(k)) for k in ("stop_requested", "exhausted")
        )
        for i, lr in enumerate(items("user_lrs")):
            self._ramp.record(i, finite_float(lr, -1.0))
        for seg in items("segments"):
            try:
                a, u, r = int(seg[0]), float(seg[1]), float(seg[2])
            except (TypeError, ValueError, IndexError):
                continue
            later = not self._segments or a >= self._segments[-1][0]
            if math.isfinite(u) and math.isfinite(r) and later:
                self._segments.append((a, max(-1.0, u), min(1.0, max(0.0, r))))
        self._last_extension = opt_int("last_extension")
        self._onset = opt_int("onset")
        self._last_flagged = opt_int("last_flagged")
        self._causes = {str(k) for k in items("causes")}
        self._recent.extend(s for s in items("recent") if type(s) is int)
        factor = state.get("unstable_factor")
        self._unstable_factor = None if factor is None else finite_float(factor, 1.0)
        lr = finite_float(state.get("unstable_lr"), math.nan)
        self._unstable_lr = lr if math.isfinite(lr) else None
        ceiling = finite_float(state.get("ceiling"), -1.0)
        self._ceiling = ceiling if ceiling > 0.0 else None
        for r in items("rollbacks"):
            try:
                self.rollbacks.append([int(r[0]), None if r[1] is None else int(r[1])])
            except (TypeError, ValueError, IndexError):
                continue
