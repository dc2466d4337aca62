"""From a run's series and alerts to a summary, a verdict with its reason, and advice.

The verdict is :func:`warmup_monitor.verdict.judge`, the one rule the console's episode lines
and the Warmup tab follow too, over **flagged steps**: the steps of every instability alert,
those folded into an episode included (an ``episode_end`` record lists them as ranges).
``transient``, ``monitor``, ``episode_end`` and the controller's actions (``warmup_extended``,
``lr_backoff``, ``rollback``) are not instability, and neither are the steps of an episode that
a ``transient`` alert closed (``details.episode_start``/``episode_steps``), except the
:data:`SEVERE_KINDS`, which always count. A ``warmup_exhausted`` alert is a flagged step like
any other: a run that recovered after it is "recovered".

Advice is built from the same numbers (:mod:`warmup_monitor.report.wording`); the lr it
recommends comes from :func:`warmup_monitor.advice.recommend_peak_lr`, as in the controller's
``warmup_exhausted`` alert.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from warmup_monitor.advice import recommend_peak_lr
from warmup_monitor.report.episodes import Episode, group_episodes
from warmup_monitor.report.events import Series
from warmup_monitor.report.runs import RunData
from warmup_monitor.schema import INSTABILITY_KINDS as _ALERT_INSTABILITY_KINDS
from warmup_monitor.schema import Alert, AlertKind
from warmup_monitor.verdict import (
    HEALTHY,
    RECOVERED,
    RECOVERY_STEPS,
    TOO_SHORT,
    UNSTABLE,
    judge,
    recovery,
)
from warmup_monitor.words import span as step_span

__all__ = [
    "HEALTHY",
    "INSTABILITY_KINDS",
    "RECOVERED",
    "TOO_SHORT",
    "UNSTABLE",
    "Extension",
    "RunSummary",
    "aligned_from",
    "extensions",
    "summarize",
    "verdict",
]


#: Alert kinds that count as instability for the verdict (values of
#: :data:`warmup_monitor.schema.INSTABILITY_KINDS`, the one definition the monitor also uses).
INSTABILITY_KINDS = frozenset(k.value for k in _ALERT_INSTABILITY_KINDS)
#: Instability kinds that count even inside an episode that recovered at once.
SEVERE_KINDS = frozenset(
    k.value
    for k in (
        AlertKind.LOSS_SPIKE,
        AlertKind.NON_FINITE,
        AlertKind.PERSISTENT_INSTABILITY,
        AlertKind.WARMUP_EXHAUSTED,
    )
)
_NEW_KEYS = ("new_warmup_steps", "new_warmup", "new", "warmup_steps", "new_end")
_OLD_KEYS = ("old_warmup_steps", "old_warmup", "old", "previous_warmup_steps", "old_end")
#: Healthy runs whose gradients aligned before this fraction of the planned warmup could warm up
#: for less.
SHORTER_WARMUP_FRACTION = 0.5


@dataclass
class Extension:
    """Warmup lengthened at ``step`` from ``old`` to ``new`` steps (``None``: not recorded)."""

    step: int
    old: int | None
    new: int | None


@dataclass
class RunSummary:
    """Everything the report says about one run (see :func:`summarize`)."""

    name: str
    path: str
    logged_steps: int
    first_step: int | None
    last_step: int | None
    planned_warmup: int | None
    effective_warmup: int | None
    extensions: list[Extension]
    alerts_by_kind: dict[str, list[int]]
    alerts_source: str
    initial_loss: float | None
    final_loss: float | None
    peak_loss_ratio: float | None
    peak_loss_ratio_step: int | None
    final_loss_ratio: float | None
    peak_grad_norm: float | None
    peak_grad_norm_step: int | None
    median_grad_norm: float | None
    peak_lr: float | None
    cosine_mean: float | None
    cosine_negative_fraction: float | None
    aligned_from: int | None
    first_instability_step: int | None
    instability_steps: list[int]
    lr_at_first_instability: float | None
    lr_before_first_instability: float | None
    lowest_unstable_lr: float | None
    recommended_peak_lr: float | None
    verdict: str
    verdict_reason: str = ""
    episodes: list[Episode] = field(default_factory=list)
    actions: dict[str, list[int]] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Where the scalars were read (:attr:`~warmup_monitor.report.runs.RunData.source`);
    #: ``"alerts"``: nowhere, the verdict rests on the alerts alone.
    source: str = "tensorboard"

    @property
    def alert_count(self) -> int:
        return sum(len(v) for v in self.alerts_by_kind.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``)."""
        out = {k: v for k, v in self.__dict__.items() if k != "episodes"}
        out["extensions"] = [vars(e).copy() for e in self.extensions]
        out["episodes"] = [e.to_dict() for e in self.episodes]
        out["alert_count"] = self.alert_count
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return out


# ---------------------------------------------------------------------------------- numbers


def _finite(s: Series | None) -> tuple[np.ndarray, np.ndarray]:
    if s is None or not len(s):
        return np.zeros(0, np.int64), np.zeros(0)
    keep = np.isfinite(s.values)
    return s.steps[keep], s.values[keep]


def _value_at(s: Series | None, step: int, before: bool = False) -> float | None:
    """The value at the last logged step <= ``step`` (< ``step`` with ``before``)."""
    if s is None or not len(s):
        return None
    i = int(np.searchsorted(s.steps, step, side="left" if before else "right")) - 1
    return float(s.values[i]) if i >= 0 else None


def _peak(s: Series | None) -> tuple[float | None, int | None]:
    steps, values = _finite(s)
    if not values.size:
        return None, None
    i = int(np.argmax(values))
    return float(values[i]), int(steps[i])


def extensions(alerts: list[Alert], warmup_steps: Series | None) -> list[Extension]:
    """Warmup extensions: from ``warmup_extended`` alerts (their details give old and new
    length, under any of a few likely names), else from increases of the logged
    ``warmup_steps``."""
    found = []
    for a in alerts:
        if a.kind != AlertKind.WARMUP_EXTENDED:
            continue
        new = next((a.details[k] for k in _NEW_KEYS if _is_int(a.details.get(k))), None)
        old = next((a.details[k] for k in _OLD_KEYS if _is_int(a.details.get(k))), None)
        if new is None and warmup_steps is not None:
            after = _value_at(warmup_steps, a.step + 1)
            new = after if after is not None and after > (old or 0) else None
        if old is None and warmup_steps is not None:
            old = _value_at(warmup_steps, a.step, before=True)
        found.append(Extension(a.step, _int_or_none(old), _int_or_none(new)))
    if found or warmup_steps is None or len(warmup_steps) < 2:
        return found
    v = warmup_steps.values
    for i in np.flatnonzero(v[1:] > v[:-1]).tolist():
        found.append(Extension(int(warmup_steps.steps[i + 1]), int(v[i]), int(v[i + 1])))
    return found


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_or_none(x: Any) -> int | None:
    return None if x is None else int(x)


def aligned_from(cosine: Series | None, until: int | None) -> int | None:
    """The first step from which consecutive gradients stay aligned until ``until``.

    Aligned: every window of ``W`` consecutive logged cosines from that step on has a positive
    mean, ``W = clip(n // 10, 5, 50)`` for ``n`` logged cosines before ``until``. ``None`` when the
    last window is not positive (or there is no cosine).
    """
    steps, values = _finite(cosine)
    if until is not None:
        keep = steps < until
        steps, values = steps[keep], values[keep]
    n = values.size
    if n == 0:
        return None
    w = int(min(50, max(5, n // 10)))
    if n < w:
        return int(steps[0]) if values.mean() > 0 else None
    means = np.convolve(values, np.ones(w) / w, mode="valid")
    bad = np.flatnonzero(means <= 0)
    if not bad.size:
        return int(steps[0])
    j = int(bad[-1]) + 1
    return int(steps[j]) if j < means.size else None


def verdict(
    instability_steps: list[int],
    loss: Series | None,
    initial_loss: float | None,
    *,
    last_step: int | None,
    effective_warmup: int | None,
) -> tuple[str, str]:
    """The verdict and the sentence that says which rule produced it:
    :func:`warmup_monitor.verdict.judge` over the flagged steps and the logged losses."""
    steps = loss.steps.tolist() if loss is not None else []
    values = loss.values.tolist() if loss is not None else []
    return judge(
        instability_steps,
        steps,
        values,
        initial_loss,
        last_step=last_step,
        effective_warmup=effective_warmup,
    )


# ---------------------------------------------------------------------------------- summary


def summarize(run: RunData) -> RunSummary:
    """The report on one run: its numbers, verdict and advice."""
    from warmup_monitor.report.wording import advise

    s = run.series
    lr, loss, ratio = s.get("lr"), s.get("loss"), s.get("loss_ratio")
    grad, cosine, planned_s = s.get("grad_norm"), s.get("grad_cosine"), s.get("warmup_steps")
    steps_all = np.unique(np.concatenate([x.steps for x in s.values()])) if s else np.zeros(0)
    exts = extensions(run.alerts, planned_s)

    planned: int | None = None
    effective: int | None = None
    if planned_s is not None and len(planned_s):
        planned = int(planned_s.values[0])
        effective = int(planned_s.values.max())
    if planned is None and exts and exts[0].old is not None:
        planned = exts[0].old
    news = [e.new for e in exts if e.new is not None]
    if news:
        effective = max([*news, effective or 0])
    if effective is None:
        effective = planned

    by_kind: dict[str, list[int]] = {}
    for a in sorted(run.alerts, key=lambda a: a.step):
        by_kind.setdefault(a.kind_name, []).append(a.step)
    unstable_steps = flagged_steps(run.alerts, s.get("loss"))
    if run.alerts_source == "none" and (u := s.get("unstable")) is not None:
        # No alert records: the per-step flag still tells where instability was.
        unstable_steps = u.steps[u.values > 0].astype(int).tolist()
        if unstable_steps:
            by_kind["unknown (no alert file)"] = unstable_steps
    episodes, other = group_episodes(run.alerts)
    actions: dict[str, list[int]] = {}
    for i in other:
        actions.setdefault(run.alerts[i].kind_name, []).append(run.alerts[i].step)

    initial = _initial_loss(loss, ratio)
    l_steps, l_values = _finite(loss)
    final_loss = float(l_values[-1]) if l_values.size else None
    final_ratio = final_loss / initial if final_loss is not None and initial else None
    peak_ratio, peak_ratio_step = _peak(ratio)
    if peak_ratio is None and initial and l_values.size:
        i = int(np.argmax(l_values))
        peak_ratio, peak_ratio_step = float(l_values[i]) / initial, int(l_steps[i])
    peak_grad, peak_grad_step = _peak(grad)
    g = _finite(grad)[1]
    median_grad = float(np.median(g)) if g.size else None
    peak_lr = _peak(lr)[0]

    c_steps, c_values = _finite(cosine)
    if effective is not None:
        c_values = c_values[c_steps < effective]
    cos_mean = float(c_values.mean()) if c_values.size else None
    cos_neg = float((c_values < 0).mean()) if c_values.size else None

    first = unstable_steps[0] if unstable_steps else None
    last_step = int(steps_all[-1]) if steps_all.size else None
    lowest = _lowest_unstable_lr(run.alerts, lr, unstable_steps)
    recommended = None
    if lowest is not None:
        ok_peak = (
            peak_lr if peak_lr is not None and math.isfinite(peak_lr) and peak_lr > 0 else None
        )
        recommended = recommend_peak_lr(lowest, peak_lr=ok_peak)
    judged, reason = verdict(
        unstable_steps, loss, initial, last_step=last_step, effective_warmup=effective
    )
    excused = sorted(raw_flagged_steps(run.alerts) - set(unstable_steps))
    for e in episodes:  # one truth: an episode the verdict excused reads as excused
        flagged = {s for a, b in (e.steps or [[e.start, e.end]]) for s in range(a, b + 1)}
        e.transient = e.id is not None and bool(flagged) and flagged.isdisjoint(unstable_steps)
    if excused and judged != UNSTABLE:  # say what was not counted, and why
        if judged == HEALTHY:
            reason = reason.replace("no instability alert", "no instability alert counted", 1)
        reason += (
            f"; {step_span(excused[0], excused[-1])} flagged, then recovered at once (transient)"
        )
    if run.source == "alerts":
        reason += "; judged from the alerts alone: no logged scalars were found"
    summary = RunSummary(
        name=run.name,
        path=run.path,
        logged_steps=int(steps_all.size),
        first_step=int(steps_all[0]) if steps_all.size else None,
        last_step=last_step,
        planned_warmup=planned,
        effective_warmup=effective,
        extensions=exts,
        alerts_by_kind=by_kind,
        alerts_source=run.alerts_source,
        initial_loss=initial,
        final_loss=final_loss,
        peak_loss_ratio=peak_ratio,
        peak_loss_ratio_step=peak_ratio_step,
        final_loss_ratio=final_ratio,
        peak_grad_norm=peak_grad,
        peak_grad_norm_step=peak_grad_step,
        median_grad_norm=median_grad,
        peak_lr=peak_lr,
        cosine_mean=cos_mean,
        cosine_negative_fraction=cos_neg,
        aligned_from=aligned_from(cosine, effective),
        first_instability_step=first,
        instability_steps=unstable_steps,
        lr_at_first_instability=None if first is None else _value_at(lr, first),
        lr_before_first_instability=None if first is None else _value_at(lr, first, True),
        lowest_unstable_lr=lowest,
        recommended_peak_lr=recommended,
        verdict=judged,
        verdict_reason=reason,
        episodes=episodes,
        actions=actions,
        problems=list(run.problems),
        notes=list(run.notes),
        source=run.source,
    )
    summary.advice = advise(summary)
    return summary


def _lowest_unstable_lr(
    alerts: list[Alert], lr: Series | None, unstable_steps: list[int]
) -> float | None:
    """The lowest lr at which instability was seen: the controller's own figure (the
    ``unstable_lr`` of its ``warmup_exhausted`` alert) when there is one, so that the report
    and the alert recommend the same lr; else the lowest logged lr at an instability step."""
    for a in alerts:
        if a.kind == AlertKind.WARMUP_EXHAUSTED:
            x = a.details.get("unstable_lr")
            if (
                isinstance(x, (int, float))
                and not isinstance(x, bool)
                and math.isfinite(x)
                and x > 0
            ):
                return float(x)
    found = [_value_at(lr, step) for step in unstable_steps]
    ok = [x for x in found if x is not None and math.isfinite(x) and x > 0]
    return min(ok) if ok else None


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def flagged_steps(alerts: list[Alert], loss: Series | None = None) -> list[int]:
    """The run's flagged steps, sorted: the step of every instability alert and every step an
    ``episode_end`` record lists in its ``steps`` ranges (alerts folded into an episode are
    not on a line of their own), less the steps of episodes a ``transient`` alert says recovered
    at once (:func:`transient_steps`) and whose loss did come back (the recovery rule over the
    :data:`~warmup_monitor.verdict.RECOVERY_STEPS` losses logged after it, when ``loss`` is
    given), unless a :data:`SEVERE_KINDS` alert is on that step."""
    passing = transient_steps(alerts, loss)
    severe = {a.step for a in alerts if a.kind_name in SEVERE_KINDS}
    return sorted(s for s in raw_flagged_steps(alerts) if s in severe or s not in passing)


def raw_flagged_steps(alerts: list[Alert]) -> set[int]:
    """Every step with an instability alert, on its own line or inside an ``episode_end``
    record's ranges, before :func:`flagged_steps` excuses the transient ones."""
    steps = {a.step for a in alerts if a.kind_name in INSTABILITY_KINDS}
    for a in alerts:
        if a.kind != AlertKind.EPISODE_END:
            continue
        ranges: Any = a.details.get("steps")
        if not isinstance(ranges, list):
            continue
        for pair in ranges[:100_000]:
            if (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(_is_int(x) for x in pair)
                and 0 <= pair[1] - pair[0] <= 1_000_000
            ):
                steps.update(range(int(pair[0]), int(pair[1]) + 1))
    return steps


def transient_steps(alerts: list[Alert], loss: Series | None = None) -> set[int]:
    """Steps of the episodes that ``transient`` alerts say recovered at once (the step before
    the alert when its details do not say); with ``loss``, only those after which the loss came
    back (:func:`warmup_monitor.verdict.recovery`: a spike after which the run sits at a worse
    level did not recover, however short it was)."""
    steps: set[int] = set()
    for a in alerts:
        if a.kind != AlertKind.TRANSIENT:
            continue
        start: Any = a.details.get("episode_start")
        length: Any = a.details.get("episode_steps")
        if _is_int(start) and _is_int(length) and 0 <= length <= 100_000:
            span = range(int(start), int(start) + int(length))
        else:
            span = range(a.step - 1, a.step)
        if loss is not None and len(loss) and not _came_back(loss, span.start, span.stop):
            continue
        steps.update(span)
    return steps


def _came_back(loss: Series, start: int, stop: int) -> bool:
    """Whether the losses logged after ``[start, stop)`` came back to the level before it."""
    before = loss.values[loss.steps < start].tolist()
    after = loss.values[loss.steps >= stop][:RECOVERY_STEPS].tolist()
    return recovery(after, before, None)[0] if len(after) >= RECOVERY_STEPS else True


def _initial_loss(loss: Series | None, ratio: Series | None) -> float | None:
    """The monitor's initial loss: loss / loss_ratio where both are logged, else the first
    finite loss."""
    if loss is not None and ratio is not None and len(loss) and len(ratio):
        common, li, ri = np.intersect1d(loss.steps, ratio.steps, return_indices=True)
        if common.size:
            r, lv = ratio.values[ri], loss.values[li]
            ok = np.isfinite(r) & np.isfinite(lv) & (r != 0)
            if ok.any():
                i = int(np.flatnonzero(ok)[0])
                return float(lv[i] / r[i])
    values = _finite(loss)[1]
    return float(values[0]) if values.size else None
