"""From a run's series and alerts to a summary, a verdict and advice: pure functions.

Verdict:

* ``healthy``: no instability alert. ``transient``, ``monitor`` and ``warmup_extended`` are not
  instability (the first says an episode recovered at once, the second is about the monitor, the
  third is the controller acting on alerts counted elsewhere), and neither are the alerts of an
  episode that a ``transient`` alert closed (``details.episode_start``/``episode_steps``), except
  the :data:`SEVERE_KINDS`, which always count.
* ``unstable but recovered``: instability alerts, and by the last logged step the run recovered:
  the controller did not give up (no ``warmup_exhausted``), the last
  :data:`RECOVERY_STEPS` logged steps (or 10 % of them, whichever is more) raised no instability
  alert, and the median loss over them is finite and at most the initial loss.
* ``unstable``: instability alerts, and not recovered.

Advice is built from the same numbers; see :func:`advise`.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from warmup_monitor.alerts import INSTABILITY_KINDS as _ALERT_INSTABILITY_KINDS
from warmup_monitor.alerts import AlertKind
from warmup_monitor.report.events import Series
from warmup_monitor.report.runs import AlertRecord, RunData

__all__ = [
    "HEALTHY",
    "INSTABILITY_KINDS",
    "RECOVERED",
    "UNSTABLE",
    "Extension",
    "RunSummary",
    "advise",
    "aligned_from",
    "extensions",
    "summarize",
    "verdict",
]

HEALTHY = "healthy"
RECOVERED = "unstable but recovered"
UNSTABLE = "unstable"

#: Alert kinds that count as instability for the verdict (values of
#: :data:`warmup_monitor.alerts.INSTABILITY_KINDS`, the one definition the callback also uses).
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
#: Quiet logged steps needed at the end of a run to call it recovered (or 10 % of the steps).
RECOVERY_STEPS = 10
#: Healthy runs whose gradients aligned before this fraction of the planned warmup could warm up
#: for less.
SHORTER_WARMUP_FRACTION = 0.5

# How each instability kind reads in a sentence.
_PHRASES = {
    "loss_spike": "loss spiked",
    "loss_trend_spike": "loss jumped far above its recent trend",
    "grad_norm_spike": "gradient norm spiked",
    "non_finite": "loss or gradients were NaN/inf",
    "oscillation": "consecutive gradients oscillated",
    "persistent_instability": "instability persisted",
    "warmup_exhausted": "adaptive warmup reached its cap while still unstable",
    "edge_of_stability": "the lr passed the curvature stability limit",
}
_NEW_KEYS = ("new_warmup_steps", "new_warmup", "new", "warmup_steps", "new_end")
_OLD_KEYS = ("old_warmup_steps", "old_warmup", "old", "previous_warmup_steps", "old_end")


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
    verdict: str
    advice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def alert_count(self) -> int:
        return sum(len(v) for v in self.alerts_by_kind.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``)."""
        out = asdict(self)
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


def extensions(alerts: list[AlertRecord], warmup_steps: Series | None) -> list[Extension]:
    """Warmup extensions: from ``warmup_extended`` alerts (their details give old and new
    length, under any of a few likely names), else from increases of the logged
    ``warmup_steps``."""
    found = []
    for a in alerts:
        if a.kind != AlertKind.WARMUP_EXTENDED.value:
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
    kinds: set[str],
    loss: Series | None,
    initial_loss: float | None,
) -> str:
    """``healthy``, ``unstable but recovered`` or ``unstable`` (rules in the module docstring)."""
    if not instability_steps:
        return HEALTHY
    if AlertKind.WARMUP_EXHAUSTED.value in kinds or loss is None or not len(loss):
        return UNSTABLE
    quiet = max(RECOVERY_STEPS, len(loss) // 10)
    last_alert = max(instability_steps)
    after = loss.steps > last_alert
    if int(after.sum()) < quiet:
        return UNSTABLE
    tail = loss.values[-quiet:]
    if not np.all(np.isfinite(tail)):
        return UNSTABLE
    if initial_loss is not None and float(np.median(tail)) > initial_loss:
        return UNSTABLE
    return RECOVERED


# ---------------------------------------------------------------------------------- summary


def summarize(run: RunData) -> RunSummary:
    """The report on one run: its numbers, verdict and advice."""
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
        by_kind.setdefault(a.kind, []).append(a.step)
    passing = transient_steps(run.alerts)
    unstable_steps = sorted(
        a.step
        for a in run.alerts
        if a.kind in SEVERE_KINDS or (a.kind in INSTABILITY_KINDS and a.step not in passing)
    )
    if run.alerts_source == "none" and (u := s.get("unstable")) is not None:
        # No alert records: the per-step flag still tells where instability was.
        unstable_steps = u.steps[u.values > 0].astype(int).tolist()
        if unstable_steps:
            by_kind["unknown (no alert file)"] = unstable_steps

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
    summary = RunSummary(
        name=run.name,
        path=run.path,
        logged_steps=int(steps_all.size),
        first_step=int(steps_all[0]) if steps_all.size else None,
        last_step=int(steps_all[-1]) if steps_all.size else None,
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
        verdict=verdict(unstable_steps, set(by_kind), loss, initial),
        problems=list(run.problems),
        notes=list(run.notes),
    )
    summary.advice = advise(summary)
    return summary


def transient_steps(alerts: list[AlertRecord]) -> set[int]:
    """Steps of the episodes that ``transient`` alerts say recovered at once (the step before
    the alert when its details do not say)."""
    steps: set[int] = set()
    for a in alerts:
        if a.kind != AlertKind.TRANSIENT.value:
            continue
        start: Any = a.details.get("episode_start")
        length: Any = a.details.get("episode_steps")
        if _is_int(start) and _is_int(length):
            steps.update(range(int(start), int(start) + int(length)))
        else:
            steps.add(a.step - 1)
    return steps


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


# ---------------------------------------------------------------------------------- advice


def _steps_text(steps: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    more = len(steps) - limit
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def _g(x: float) -> str:
    return f"{x:.3g}"


def advise(r: RunSummary) -> list[str]:
    """Concrete advice from the summary's numbers (each sentence states the facts it rests on)."""
    out: list[str] = []
    w, eff = r.planned_warmup, r.effective_warmup
    counted = set(r.instability_steps)
    unstable = {
        k: [st for st in v if st in counted]
        for k, v in r.alerts_by_kind.items()
        if k in INSTABILITY_KINDS and any(st in counted for st in v)
    }
    if r.verdict == HEALTHY:
        if r.extensions and eff is not None and w is not None and eff > w:
            # The monitor's action is why it stayed healthy: say what to start with.
            out.append(
                f"warmup was extended {_times(len(r.extensions))}, from {w} to {eff} steps, and "
                f"training recovered: start with at least {eff} warmup steps next time"
            )
        out.extend(_advise_healthy(r))
        return out

    for kind, steps in unstable.items():
        where = ""
        if eff is not None:
            during = sum(1 for s in steps if s < eff)
            where = (
                " during warmup"
                if during == len(steps)
                else " after warmup"
                if during == 0
                else f" ({during} during warmup)"
            )
        plural = "s" if len(steps) > 1 else ""
        out.append(
            f"{_PHRASES.get(kind, kind)} {_times(len(steps))}{where} "
            f"(step{plural} {_steps_text(steps)})"
        )
    if "unknown (no alert file)" in r.alerts_by_kind:
        steps = r.alerts_by_kind["unknown (no alert file)"]
        out.append(f"steps {_steps_text(steps)} were flagged unstable (no alert file to say why)")

    first = r.first_instability_step
    safe = r.lr_before_first_instability
    lr_hint = ""
    if safe is not None and safe > 0:
        lr_hint = f"lower the peak lr to about {_g(safe)} (the lr just before the first alert)"
    elif r.lr_at_first_instability:
        lr_hint = (
            f"lower the peak lr below {_g(r.lr_at_first_instability)} (the lr at the first alert)"
        )

    grown = [e for e in r.extensions if e.new is not None]
    if r.extensions and eff is not None and w is not None and eff > w:
        out.append(
            f"warmup was extended {_times(len(r.extensions))}, from {w} to {eff} steps: start with "
            f"at least {eff} warmup steps next time" + (f", or {lr_hint}" if lr_hint else "")
        )
    elif r.extensions and not grown:
        out.append(
            f"warmup was extended {_times(len(r.extensions))} (new length not recorded): "
            "start with a longer warmup next time" + (f", or {lr_hint}" if lr_hint else "")
        )
    elif first is not None and r.first_step is not None and first <= r.first_step:
        lr0 = r.lr_at_first_instability
        out.append(
            "training was unstable from its first logged step"
            + (f" (lr {_g(lr0)})" if lr0 is not None else "")
            + ": check the initialization and the loss scale, and start from a lower lr"
        )
    elif first is not None and eff is not None and first >= eff:
        out.append(
            f"instability began after warmup (step {first}, lr "
            f"{_g(r.lr_at_first_instability or math.nan)}): the peak lr is too high for this "
            "model; " + (lr_hint or "lower it") + " rather than lengthening warmup"
        )
    elif w is not None:
        out.append(
            f"lengthen warmup to at least {2 * w} steps (twice the planned {w})"
            + (f", or {lr_hint}" if lr_hint else "")
            + ", or let the monitor extend warmup when it sees instability"
        )
    elif lr_hint:
        out.append(lr_hint)

    if "non_finite" in unstable:
        out.append(
            "non-finite values: clip gradients, and check the data and the mixed-precision loss "
            "scaling at those steps"
        )
    if "grad_norm_spike" in unstable and r.median_grad_norm:
        out.append(
            f"gradient norm peaked at {_g(r.peak_grad_norm or math.nan)} (step "
            f"{r.peak_grad_norm_step}) against a median of {_g(r.median_grad_norm)}: gradient "
            f"clipping at about {_g(2 * r.median_grad_norm)} would cap such spikes"
        )
    if "warmup_exhausted" in unstable:
        out.append(
            "the adaptive warmup hit its cap while still unstable: a longer warmup alone will "
            "not do, lower the peak lr"
        )
    if r.verdict == UNSTABLE and r.final_loss_ratio is not None:
        out.append(
            f"the run had not recovered by its last logged step ({r.last_step}): loss at "
            f"{_g(r.final_loss_ratio)}x the initial loss"
        )
    elif r.verdict == RECOVERED and r.final_loss_ratio is not None:
        out.append(
            f"it recovered: the loss ended at {_g(r.final_loss_ratio)}x the initial loss, "
            "but the spikes cost steps"
        )
    return out


def _advise_healthy(r: RunSummary) -> list[str]:
    out = []
    w = r.planned_warmup
    transient = r.alerts_by_kind.get(AlertKind.TRANSIENT.value, [])
    if transient:
        out.append(
            f"{len(transient)} excursion(s) recovered at once (transient alerts at step(s) "
            f"{_steps_text(transient)}): nothing to change for them"
        )
    a = r.aligned_from
    quiet = r.peak_loss_ratio is None or r.peak_loss_ratio <= 1.5
    if a is not None and w is not None and a <= SHORTER_WARMUP_FRACTION * w and quiet:
        suggest = max(2 * a, w // 2, 1)
        out.append(
            f"no instability and gradients aligned from step {a} (of {w} planned warmup steps): "
            f"warmup could be shorter; try about {suggest} steps"
        )
    elif r.cosine_mean is not None and r.cosine_mean < 0:
        share = r.cosine_negative_fraction or 0.0
        out.append(
            f"no instability, but consecutive gradients disagreed during warmup (mean cosine "
            f"{r.cosine_mean:.2f}, {share:.0%} negative): the lr is near its stability limit; "
            + (f"keep at least {w} warmup steps" if w is not None else "keep the warmup")
        )
    elif a is not None:
        out.append(
            f"no instability; gradients aligned from step {a}"
            + (f" of {w}" if w is not None else "")
            + ": the warmup length looks right"
        )
    else:
        out.append(
            "no instability"
            + (
                "; gradients had not aligned by the end of warmup"
                if r.cosine_mean is not None
                else ""
            )
            + (f": keep at least {w} warmup steps" if w is not None else "")
        )
    return out
