"""Alerts grouped by unstable episode.

The monitor writes one record when an episode opens (its first instability alert, with
``episode`` set) and one ``episode_end`` record when it closes (see
:data:`warmup_monitor.schema.EPISODE_END_FIELDS`); alerts raised during the episode carry the same
id. Files written before episodes existed have no ids: each instability alert is then a group of
its own. Alerts that are neither instability nor part of an episode (warmup extended, lr
back-off, rollback, transient, monitor) are actions and notes, listed apart.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from warmup_monitor.schema import EPISODE_OUTCOMES, Alert, AlertKind, is_instability
from warmup_monitor.words import count, peak_loss, span

__all__ = ["Episode", "group_episodes", "step_ranges"]


@dataclass
class Episode:
    """One unstable episode, or one instability alert of a file without episode ids.

    Attributes:
        id: The episode's id (``None``: an alert of a file without ids).
        start: First flagged step.
        end: Last flagged step (the ``episode_end`` record's ``end``; else the last alert's step).
        kinds: Instability kinds seen, first seen first.
        count: Flagged steps (from ``episode_end``; else the number of instability alerts).
        peak_ratio: The highest ratio the episode reached, when recorded.
        peak_step: The step of ``peak_ratio``.
        recovered: Whether the loss came back (``None``: not recorded, or still open).
        outcome: How it ended (``episode_end`` ``outcome``, one of
            :data:`~warmup_monitor.schema.EPISODE_OUTCOMES`: ``"recovered"``,
            ``"not_recovered"``, ``"ended_quiet"``, ``"open_at_end"``, ``"interrupted"``;
            ``None``: not recorded).
        closed: Whether an ``episode_end`` record closed it.
        steps: Flagged steps as inclusive ranges, ``[[13, 40], [45, 45]]``.
        alerts: Indices of the episode's records in the run's alert list (open, updates, end).
    """

    id: int | None
    start: int
    end: int
    kinds: list[str] = field(default_factory=list)
    count: int = 0
    peak_ratio: float | None = None
    peak_step: int | None = None
    recovered: bool | None = None
    outcome: str | None = None
    closed: bool = False
    steps: list[list[int]] = field(default_factory=list)
    alerts: list[int] = field(default_factory=list)
    #: Set by the report: every flagged step of it was excused as transient (the loss came
    #: back at once), so the verdict does not count it, whatever its closing record said.
    transient: bool = False
    #: The step of its ``episode_end`` record: its ``recovered`` was judged then, while the
    #: run's verdict is judged at the run's end.
    closed_at: int | None = None

    def facts(self) -> list[str]:
        """The episode in words, one fact each (the tab's row): what and where, the flagged
        steps, the kinds, the peak loss, how it ended; in the words of the alerts."""
        where = span(self.start, self.end)
        out = [
            f"alert at {where}" if self.id is None else f"episode {self.id}: {where}",
            count(self.count, "flagged step"),
            ", ".join(self.kinds),
        ]
        if self.peak_ratio is not None and math.isfinite(self.peak_ratio):
            out.append(peak_loss(self.peak_ratio, self.peak_step))
        if self.outcome == "interrupted":
            out.append("interrupted (training crashed)")
        elif self.outcome == "open_at_end":
            out.append("still open when monitoring or training ended: not recovered")
        elif self.transient:
            out.append("recovered at once (transient): not counted by the verdict")
        elif self.recovered is not None:
            when = "" if self.closed_at is None else f" when it closed at step {self.closed_at}"
            out.append(("recovered" if self.recovered else "not recovered") + when)
        elif self.outcome == "ended_quiet":
            out.append("ended quiet (no loss to judge recovery)")
        elif self.id is not None and not self.closed:
            out.append("still open at the end")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a non-finite peak ratio becomes ``None``), with :meth:`facts`."""
        peak = self.peak_ratio
        return {
            "facts": self.facts(),
            "id": self.id,
            "start": self.start,
            "end": self.end,
            "kinds": list(self.kinds),
            "count": self.count,
            "peak_ratio": peak if peak is None or math.isfinite(peak) else None,
            "peak_step": self.peak_step,
            "recovered": self.recovered,
            "outcome": self.outcome,
            "closed": self.closed,
            "steps": [list(r) for r in self.steps],
            "alerts": list(self.alerts),
        }


def step_ranges(steps: list[int]) -> list[list[int]]:
    """Sorted unique steps as inclusive ranges: ``[3, 4, 5, 9]`` -> ``[[3, 5], [9, 9]]``."""
    out: list[list[int]] = []
    for s in sorted(set(steps)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _int(x: Any) -> int | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return int(x) if x == int(x) and 0 <= x <= 2**53 else None


def _ranges(x: Any) -> list[list[int]] | None:
    if not isinstance(x, list):
        return None
    out = []
    for r in x[:10_000]:
        if not isinstance(r, list) or len(r) != 2:
            return None
        a, b = _int(r[0]), _int(r[1])
        if a is None or b is None or b < a:
            return None
        out.append([a, b])
    return out


def _apply_end(ep: Episode, details: dict[str, Any]) -> None:
    """Fill ``ep`` from an ``episode_end`` record's details (tolerant: bad fields are ignored)."""
    start, end = _int(details.get("start")), _int(details.get("end"))
    if start is not None:
        ep.start = start
    if end is not None and end >= ep.start:
        ep.end = end
    count = _int(details.get("count"))
    if count is not None:
        ep.count = count
    kinds = details.get("kinds")
    if isinstance(kinds, list):
        for k in kinds:
            if isinstance(k, str) and k not in ep.kinds:
                ep.kinds.append(k)
    peak = details.get("peak_ratio")
    if isinstance(peak, (int, float)) and not isinstance(peak, bool):
        ep.peak_ratio = float(peak)
    ep.peak_step = _int(details.get("peak_step"))
    recovered = details.get("recovered")
    if isinstance(recovered, bool):
        ep.recovered = recovered
    outcome = details.get("outcome")
    if isinstance(outcome, str) and outcome in EPISODE_OUTCOMES:
        ep.outcome = outcome
    steps = _ranges(details.get("steps"))
    if steps is not None:
        ep.steps = steps


def group_episodes(alerts: list[Alert]) -> tuple[list[Episode], list[int]]:
    """Group a run's alerts by episode.

    Returns:
        The episodes, by first step; and the indices of the alerts that belong to none
        (actions and notes: warmup extended, back-off, rollback, transient, monitor).
    """
    by_id: dict[int, Episode] = {}
    episodes: list[Episode] = []
    others: list[int] = []
    for i, a in enumerate(alerts):
        if a.episode is not None:
            ep = by_id.get(a.episode)
            if ep is None:
                ep = by_id[a.episode] = Episode(a.episode, a.step, a.step)
                episodes.append(ep)
            ep.alerts.append(i)
            if a.kind == AlertKind.EPISODE_END:
                ep.closed = True
                ep.closed_at = a.step
                _apply_end(ep, a.details)
                continue
            ep.start = min(ep.start, a.step)
            if not ep.closed:
                ep.end = max(ep.end, a.step)
            if is_instability(a.kind) and a.kind_name not in ep.kinds:
                ep.kinds.append(a.kind_name)
            if not ep.closed and is_instability(a.kind):
                ep.count += 1
        elif is_instability(a.kind):
            episodes.append(
                Episode(
                    None, a.step, a.step, [a.kind_name], 1, steps=[[a.step, a.step]], alerts=[i]
                )
            )
        else:
            others.append(i)
    for ep in episodes:
        if not ep.steps:
            ep.steps = step_ranges(
                [alerts[i].step for i in ep.alerts if is_instability(alerts[i].kind)]
            )
    episodes.sort(key=lambda e: (e.start, -1 if e.id is None else e.id))
    return episodes, others
