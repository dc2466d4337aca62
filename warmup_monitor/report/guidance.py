"""What each verdict means and what to change: one paragraph per verdict.

:func:`what_to_do` gives the paragraph for a verdict of :mod:`warmup_monitor.verdict`. Without a
run's numbers it is the generic paragraph the README quotes; with them (:func:`for_run`, which
:func:`warmup_monitor.summarize` shows) the same paragraph names the run's warmup length, the
length the monitor extended it to, and the peak lr the report recommends. Every number in it
comes from the code that decides: the verdict's rule (:mod:`warmup_monitor.verdict`), the lr
rule (:data:`warmup_monitor.advice.SAFETY`), the corpus evidence for a longer warmup
(:data:`warmup_monitor.report.wording.LONGER_WARMUP_HEALED`) and the defaults of
:class:`~warmup_monitor.AdaptiveWarmup`. The run's own facts and its one-line advice are
:func:`warmup_monitor.report.wording.advise`'s; this paragraph says what the verdict means.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

from warmup_monitor.advice import SAFETY, format_lr
from warmup_monitor.config import AdaptiveWarmup
from warmup_monitor.report.analysis import SHORTER_WARMUP_FRACTION, RunSummary
from warmup_monitor.report.wording import LONGER_WARMUP_HEALED
from warmup_monitor.verdict import (
    COME_BACK_TOLERANCE,
    HEALTHY,
    MIN_PROGRESS,
    RECOVERED,
    RECOVERY_STEPS,
    TOO_SHORT,
    UNSTABLE,
)

__all__ = ["VERDICTS", "for_run", "what_to_do"]

#: Every verdict the report gives, in the order the README lists them.
VERDICTS = (HEALTHY, RECOVERED, UNSTABLE, TOO_SHORT)


def _adaptive_text() -> str:
    """What ``adaptive=True`` does, from :class:`AdaptiveWarmup`'s defaults."""
    d = AdaptiveWarmup()
    grow = (
        "doubles the warmup"
        if d.extend_steps is None and d.extend_fraction == 1.0
        else "lengthens the warmup"
    )
    cap = d.resolved(1)["max_warmup_steps"]  # the default cap, in units of warmup_steps
    return (
        f"`adaptive=True`, which {grow} and backs the lr off to {d.backoff:g} times the one "
        f"that broke each time it sees instability during or just after warmup (at most "
        f"{d.max_extensions} times, and never past {cap} times the planned length)"
    )


def _lr_text(recommended: float | None, lowest: float | None) -> str:
    if recommended is not None and lowest is not None:
        return (
            f"to about {format_lr(recommended)} ({SAFETY:g} times {format_lr(lowest)}, the lowest "
            "lr at which instability was seen)"
        )
    return f"to {SAFETY:g} times the lowest lr at which instability was seen"


def _longer_text(planned: int | None, effective: int | None) -> str:
    if planned is not None and effective is not None and effective > planned:
        return f"at least {effective} steps, the length the monitor extended it to from {planned}"
    if planned is not None:
        return f"at least {2 * planned} steps, twice the planned {planned}"
    return "at least twice its length"


def what_to_do(
    verdict: str,
    *,
    planned_warmup: int | None = None,
    effective_warmup: int | None = None,
    last_step: int | None = None,
    recommended_peak_lr: float | None = None,
    lowest_unstable_lr: float | None = None,
) -> str:
    """One paragraph: what ``verdict`` means and what to change.

    Without the keyword arguments it is the generic paragraph (the README's); each one given
    puts the run's own number in its place.

    Args:
        verdict: One of :data:`VERDICTS`.
        planned_warmup: The run's planned warmup length, in optimizer steps.
        effective_warmup: The warmup length in force at the end (after the monitor's
            extensions).
        last_step: The run's last logged step.
        recommended_peak_lr: The peak lr the report recommends
            (:func:`warmup_monitor.advice.recommend_peak_lr`).
        lowest_unstable_lr: The lowest lr at which instability was seen.

    Raises:
        ValueError: ``verdict`` is not one of :data:`VERDICTS`.
    """
    planned, effective = planned_warmup, effective_warmup
    extended = planned is not None and effective is not None and effective > planned
    lr = _lr_text(recommended_peak_lr, lowest_unstable_lr)
    if verdict == HEALTHY:
        keep = (
            f"Keep the peak lr, and start the next run with at least {effective} warmup steps: "
            f"the monitor extended the warmup from {planned} to {effective} steps, and that is "
            "why the run stayed healthy."
            if extended
            else "Keep the peak lr and the warmup. If the monitor extended the warmup "
            "(`adaptive=True`; the report shows it as `planned -> effective`), start the next "
            "run with the extended length."
        )
        return (
            "No step had an instability alert, and the run trained past its warmup. "
            + keep
            + " The warmup may be shorter when consecutive gradients agreed (`warmup/grad_cosine` "
            f"stayed positive) from within the first {SHORTER_WARMUP_FRACTION:.0%} of it and the "
            "loss stayed near its start: the advice then names a shorter length. When they "
            "kept disagreeing (a negative mean cosine), the lr is near its stability limit: keep "
            + (
                f"at least {effective if extended else planned} warmup steps"
                if planned
                else "the warmup"
            )
            + " and do not raise the peak lr."
        )
    if verdict == RECOVERED:
        return (
            "Some steps had instability alerts, but none in the last "
            f"{RECOVERY_STEPS} logged steps (or the last tenth of the run, if longer), and the "
            f"loss came back to within {COME_BACK_TOLERANCE:.0%} of its level before the first "
            f"one and at least {MIN_PROGRESS:.0%} below the initial loss. The run learned, but "
            "the instability cost steps. To avoid it, start with a longer warmup ("
            + _longer_text(planned, effective)
            + "), or pass "
            + _adaptive_text()
            + ". If the alerts came after warmup had ended, the peak lr is too high: lower it "
            + lr
            + " rather than lengthening warmup."
        )
    if verdict == UNSTABLE:
        healed, tried = LONGER_WARMUP_HEALED
        return (
            "Instability alerts went on to the end of the run, or the loss did not come back to "
            "its level before them (the verdict's reason says which). Where the alerts are "
            "decides what to change. During warmup: lengthen it ("
            + _longer_text(planned, effective)
            + ") or pass "
            + _adaptive_text()
            + f"; on the corpus of real runs, a longer warmup turned {healed} of {tried} failing "
            "runs with none or a short one healthy, and the others were unstable at every warmup "
            "length, where only a lower peak lr helps. After warmup, or after a "
            "`warmup_exhausted` alert (the adaptive warmup reached its cap while still "
            "unstable): lower the peak lr "
            + lr
            + ". From the very first step: check the initialization and the loss scale. NaN or "
            "inf values (`non_finite`): clip gradients (`Trainer(gradient_clip_val=...)`) and "
            "check the data and the mixed-precision loss scaling at those steps."
        )
    if verdict == TOO_SHORT:
        where = (
            f" (at step {last_step}, in its {effective}-step warmup)"
            if last_step is not None and effective is not None
            else ""
        )
        length = f"{effective} optimizer steps" if effective is not None else "its warmup"
        return (
            f"The run ended during its warmup{where} without an instability alert, so neither "
            "the warmup length nor the peak lr was tested yet. Change neither: train for more "
            f"than {length} (`max_steps`, or `max_epochs` times the optimizer steps per epoch, "
            "after gradient accumulation) and judge then. `WarmupMonitor` warns at the start of "
            "`fit` when the Trainer's steps end inside warmup."
        )
    raise ValueError(
        f"what_to_do: unknown verdict {verdict!r}; the report gives "
        + ", ".join(repr(v) for v in VERDICTS)
    )


def for_run(summary: RunSummary) -> str:
    """:func:`what_to_do` for a run's verdict, with the run's own numbers."""
    return what_to_do(
        summary.verdict,
        planned_warmup=summary.planned_warmup,
        effective_warmup=summary.effective_warmup,
        last_step=summary.last_step,
        recommended_peak_lr=summary.recommended_peak_lr,
        lowest_unstable_lr=summary.lowest_unstable_lr,
    )
