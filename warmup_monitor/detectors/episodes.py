"""Episodes: what reaches the sinks when instability goes on for many steps.

A diverging run flags step after step; every rule and the warmup controller must see each of
those steps, but a person (console, JSONL, TensorBoard text, the report) wants one line when
it starts and one summary when it ends. :class:`Episodes` is that filter: pure, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from warmup_monitor._checks import check_int as _check_int
from warmup_monitor.alerts import INSTABILITY_KINDS, Alert, AlertKind
from warmup_monitor.detectors._common import finite_float as _finite_float
from warmup_monitor.detectors._common import int_or as _int_or
from warmup_monitor.verdict import BEFORE_STEPS, recovery
from warmup_monitor.words import peak_loss
from warmup_monitor.words import span as _span

__all__ = ["EPISODE_KINDS", "Episodes"]

#: The kinds grouped into episodes: every instability kind but the controller's own
#: ``warmup_exhausted``. Everything else (``transient``, ``monitor``, the controller's
#: actions, kinds this version does not know) passes through untouched.
EPISODE_KINDS: frozenset[str] = frozenset(
    k.value for k in INSTABILITY_KINDS if k is not AlertKind.WARMUP_EXHAUSTED
)


def _kind(alert: Alert) -> str:
    return str(getattr(alert.kind, "value", alert.kind))


def _floats(values: Any) -> list[float]:
    """A list of floats from a state value (anything else: empty)."""
    if not isinstance(values, (list, tuple)):
        return []
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


class Episodes:
    """Group the per-step instability alerts into episodes; return what to dispatch.

    An **episode** opens at the first step with an alert of an instability kind
    (:data:`EPISODE_KINDS`) and stays open while such alerts keep coming; it ends after
    ``quiet_steps`` steps without one, or at :meth:`close` (the monitoring ended while it was
    open: not recovered). An episode that ends quiet *recovered* when
    :func:`warmup_monitor.verdict.recovery` holds over the losses of its quiet steps: the rule
    of the report's verdict, so that the console, the records and the report agree (a run
    quiet at its initial loss, or above the loss before the episode, did not recover). Per
    call of :meth:`observe` (one optimizer step):

    - the step that **opens** an episode returns its first instability alert (in the order
      given), copied with ``episode`` set to the new id and ``details["episode_kinds"]`` listing
      every instability kind of that step (the others are folded into the episode): one line
      per opening;
    - later flagged steps of the same episode **update** it (flagged steps, alerts, kinds, peak
      loss ratio, flagged step ranges) and return nothing;
    - the step at which it has been quiet for ``quiet_steps`` steps (or any later step observed)
      **closes** it: one ``episode_end`` alert, at step ``last flagged + quiet_steps``, whose
      details are ``episode``, ``start``, ``end`` (last flagged step), ``duration``
      (``end - start + 1``), ``count`` (flagged steps), ``alerts``, ``kinds`` (in order of
      first appearance), ``kind_counts`` (flagged steps per kind), ``peak_ratio`` and
      ``peak_step`` (the highest ``loss_ratio`` observed while open, ``None`` if none was
      given), ``recovered``, ``recovery`` (why it did or did not recover, or why that could
      not be judged), ``outcome`` (``"recovered"``, ``"not_recovered"``, ``"ended_quiet"``,
      ``"open_at_end"`` or ``"interrupted"``:
      :data:`~warmup_monitor.schema.EPISODE_OUTCOMES`) and ``steps`` (the
      flagged steps as ``[first, last]`` ranges, at most ``max_ranges``: the closest ranges
      are merged beyond that, and ``steps_merged`` says so);
    - every other alert (``transient``, ``monitor``, ``warmup_extended``, ``warmup_exhausted``,
      ``lr_backoff``, ``rollback``, unknown kinds) is returned unchanged, in its place.

    Wiring: the engine feeds the raw alerts of a step to the persistence rule and the warmup
    controller as before, then passes the whole list here and dispatches only what comes back;
    at the end of monitoring it dispatches :meth:`close`; :meth:`state_dict` goes into its
    checkpoint state so that an open episode survives a resume. One instance per optimizer.

    Example:
        >>> from warmup_monitor.alerts import Alert, AlertKind
        >>> ep = Episodes(quiet_steps=3)
        >>> spike = lambda s: Alert(s, AlertKind.LOSS_SPIKE, "spike")
        >>> [(a.kind.value, a.episode) for a in ep.observe(5, [spike(5)], loss_ratio=12.0)]
        [('loss_spike', 1)]
        >>> ep.observe(6, [spike(6)], loss_ratio=15.0)  # the same episode: nothing to say
        []
        >>> ep.observe(7, [], loss_ratio=1.2)
        []
        >>> [end] = ep.observe(9, [], loss_ratio=1.0)  # quiet since step 6 (3 steps)
        >>> end.kind.value, end.step, end.episode
        ('episode_end', 9, 1)
        >>> {k: end.details[k] for k in ("start", "end", "count", "peak_ratio", "steps")}
        {'start': 5, 'end': 6, 'count': 2, 'peak_ratio': 15.0, 'steps': [[5, 6]]}

    Args:
        quiet_steps: Steps without an instability alert that end an episode (>= 1;
            ``Detection.episode_quiet_steps``).
        max_ranges: The most flagged-step ranges an episode keeps (>= 1).

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    def __init__(self, *, quiet_steps: int = 20, max_ranges: int = 64) -> None:
        self.quiet_steps = _check_int("quiet_steps", quiet_steps, minimum=1)
        self.max_ranges = _check_int("max_ranges", max_ranges, minimum=1)
        self.reset()

    def reset(self) -> None:
        self._next_id = 1
        self._open: dict[str, Any] | None = None
        self._before: deque[float] = deque(maxlen=BEFORE_STEPS)  # losses while none is open
        self._initial: float | None = None

    @property
    def current(self) -> int | None:
        """The id of the open episode, or ``None``."""
        return None if self._open is None else int(self._open["id"])

    def observe(
        self,
        step: int,
        alerts: Sequence[Alert],
        loss_ratio: float | None = None,
        *,
        loss: float | None = None,
        initial_loss: float | None = None,
    ) -> list[Alert]:
        """Feed one step's alerts (all of them, in order); return those to dispatch.

        Args:
            step: The optimizer step the alerts are about.
            alerts: Every alert of that step, of any kind (the detectors' and the controller's).
            loss_ratio: That step's loss over the initial loss, if known (for the peak).
            loss: That step's loss, if known (for the recovery rule).
            initial_loss: The run's initial loss, once known (for the recovery rule).
        """
        out: list[Alert] = []
        if initial_loss is not None and math.isfinite(initial_loss):
            self._initial = float(initial_loss)
        ep = self._open
        if ep is not None and step - ep["last"] >= self.quiet_steps:
            out.append(self._end(ep["last"] + self.quiet_steps, recovered=None))
            ep = None
        flagged = [a for a in alerts if _kind(a) in EPISODE_KINDS]
        opening = None
        if flagged:
            if ep is None:
                opening = self._start(step, flagged)
            else:
                self._add(ep, step, flagged)
        ep = self._open
        if loss is not None:
            if ep is None:
                if math.isfinite(loss):
                    self._before.append(float(loss))
            elif not flagged and len(ep["after"]) < self.quiet_steps:
                ep["after"].append(float(loss))
        if ep is not None and loss_ratio is not None and math.isfinite(loss_ratio):
            peak = ep["peak_ratio"]
            if peak is None or loss_ratio > peak:
                ep["peak_ratio"], ep["peak_step"] = float(loss_ratio), step
        for alert in alerts:
            if _kind(alert) not in EPISODE_KINDS:
                out.append(alert)
            elif alert is flagged[0] and opening is not None:
                out.append(opening)
        return out

    def close(
        self, step: int, *, interrupted: bool = False, monitoring_ended: bool = True
    ) -> list[Alert]:
        """End the open episode, if any, at ``step`` (not recovered); return its summary.

        Args:
            step: The last step monitored: the record is stamped with it.
            interrupted: Training stopped on an exception (outcome ``"interrupted"``), rather
                than ending normally (``"open_at_end"``).
            monitoring_ended: The monitoring window ended (no step after ``step`` is
                watched); ``False``: training stopped inside the window, and a further fit
                or a resume continues the episode (its later record replaces this one).
        """
        if self._open is None:
            return []
        last = max(step, int(self._open["last"]))
        return [
            self._end(last, recovered=False, interrupted=interrupted, window_ended=monitoring_ended)
        ]

    # ------------------------------------------------------------------ internals

    def _start(self, step: int, flagged: list[Alert]) -> Alert:
        kinds = list(dict.fromkeys(_kind(a) for a in flagged))
        self._open = {
            "id": self._next_id,
            "start": step,
            "last": step,
            "count": 0,
            "alerts": 0,
            "kinds": [],
            "kind_counts": {},
            "ranges": [],
            "merged": False,
            "peak_ratio": None,
            "peak_step": None,
            "before": list(self._before),
            "after": [],
        }
        self._before.clear()
        self._next_id += 1
        self._add(self._open, step, flagged)
        first = flagged[0]
        details = dict(first.details)
        details["episode_kinds"] = kinds
        message = first.message
        if len(kinds) > 1:
            message += f" (also {', '.join(kinds[1:])} at this step)"
        return replace(first, message=message, details=details, episode=int(self._open["id"]))

    def _add(self, ep: dict[str, Any], step: int, flagged: list[Alert]) -> None:
        kinds = list(dict.fromkeys(_kind(a) for a in flagged))
        ranges: list[list[int]] = ep["ranges"]
        if ranges and step <= ranges[-1][1]:  # the same step again (late alerts): no new step
            pass
        else:
            ep["count"] += 1
            if ranges and step == ranges[-1][1] + 1:
                ranges[-1][1] = step
            else:
                ranges.append([step, step])
                if len(ranges) > self.max_ranges:
                    gaps = [ranges[i + 1][0] - ranges[i][1] for i in range(len(ranges) - 1)]
                    i = gaps.index(min(gaps))
                    ranges[i : i + 2] = [[ranges[i][0], ranges[i + 1][1]]]
                    ep["merged"] = True
        ep["last"] = max(int(ep["last"]), step)
        ep["after"] = []
        ep["alerts"] += len(flagged)
        counts: dict[str, int] = ep["kind_counts"]
        for kind in kinds:
            if kind not in counts:
                ep["kinds"].append(kind)
            counts[kind] = counts.get(kind, 0) + 1

    def _end(
        self,
        step: int,
        *,
        recovered: bool | None,
        why: str = "",
        interrupted: bool = False,
        window_ended: bool = True,
    ) -> Alert:
        """End the open episode; ``recovered=None``: it ended quiet, judge its quiet losses;
        ``False``: :meth:`close` (``interrupted``: on an exception)."""
        ep = self._open
        assert ep is not None  # internal: only called with an open episode
        self._open = None
        start, end = int(ep["start"]), int(ep["last"])
        peak = ep["peak_ratio"]
        kinds = ", ".join(ep["kinds"])
        self._before.extend(x for x in ep["after"] if math.isfinite(x))
        if recovered is None and not ep["after"]:
            why, state = "no loss was seen after the last flagged step", "ended quiet"
            outcome = "ended_quiet"
        elif recovered is None:
            recovered, why = recovery(ep["after"], ep["before"], self._initial, first_flagged=start)
            state = "recovered" if recovered else "ended quiet but did not recover"
            outcome = "recovered" if recovered else "not_recovered"
        elif interrupted:
            state = "was still open when training was interrupted (an exception)"
            outcome = "interrupted"
        elif window_ended:
            state = f"was still open when monitoring ended after step {step}"
            outcome = "open_at_end"
        else:
            state = (
                f"was still open when training stopped after step {step} (if training goes "
                "on, so does the episode, and a later record closes it)"
            )
            outcome = "open_at_end"
        message = (
            f"episode {ep['id']} ({_span(start, end)}, {ep['count']} flagged: {kinds}) {state}"
        )
        if why and recovered is not True:
            message += f" ({why})"
        if peak is not None:
            message += f"; {peak_loss(peak, ep['peak_step'])}"
        details: dict[str, Any] = {
            "episode": ep["id"],
            "start": start,
            "end": end,
            "duration": end - start + 1,
            "count": ep["count"],
            "alerts": ep["alerts"],
            "kinds": list(ep["kinds"]),
            "kind_counts": dict(ep["kind_counts"]),
            "peak_ratio": peak,
            "peak_step": ep["peak_step"],
            "recovered": recovered,
            "outcome": outcome,
            "steps": [list(r) for r in ep["ranges"]],
        }
        if why:
            details["recovery"] = why
        if ep["merged"]:
            details["steps_merged"] = True
        return Alert(
            step=step,
            kind=AlertKind.EPISODE_END,
            message=message,
            value=math.nan if peak is None else float(peak),
            threshold=math.nan,
            details=details,
            episode=int(ep["id"]),
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The next id and the open episode (primitives only)."""
        ep = self._open
        if ep is not None:
            ep = {**ep, "kinds": list(ep["kinds"]), "kind_counts": dict(ep["kind_counts"])}
            ep["ranges"] = [list(r) for r in self._open["ranges"]]  # type: ignore[index]
            ep["before"] = list(self._open["before"])  # type: ignore[index]
            ep["after"] = list(self._open["after"])  # type: ignore[index]
        return {
            "next_id": self._next_id,
            "open": ep,
            "before": list(self._before),
            "initial": self._initial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a malformed open episode is dropped, not half-loaded."""
        self.reset()
        self._next_id = max(_int_or(state.get("next_id"), 1) or 1, 1)
        self._before.extend(_floats(state.get("before")))
        initial = state.get("initial")
        self._initial = None if initial is None else _finite_float(initial, 0.0) or None
        ep = state.get("open")
        if not isinstance(ep, dict):
            return
        try:
            ranges = [[int(a), int(b)] for a, b in ep.get("ranges", [])]
            counts = {str(k): int(v) for k, v in dict(ep.get("kind_counts", {})).items()}
            peak = ep.get("peak_ratio")
            peak_step = ep.get("peak_step")
            self._open = {
                "id": int(ep["id"]),
                "start": int(ep["start"]),
                "last": int(ep["last"]),
                "count": int(ep.get("count", 0)),
                "alerts": int(ep.get("alerts", 0)),
                "kinds": [str(k) for k in ep.get("kinds", [])],
                "kind_counts": counts,
                "ranges": ranges,
                "merged": bool(ep.get("merged", False)),
                "peak_ratio": None if peak is None else _finite_float(peak, 0.0),
                "peak_step": None if peak_step is None else int(peak_step),
                "before": _floats(ep.get("before")),
                "after": _floats(ep.get("after")),
            }
        except (KeyError, TypeError, ValueError):
            self._open = None
