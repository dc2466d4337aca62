"""The advice of the report, in words, from a :class:`RunSummary`'s numbers.

Every sentence states the facts it rests on. The advice never contradicts itself (a warmup that
the adaptive controller could not make long enough is never answered with "a longer warmup"),
never suggests a change under 10 % (the lr comes from
:func:`warmup_monitor.advice.recommend_peak_lr`; a shorter warmup only when at least 10 %
shorter), and gives no warmup or lr advice for a run too short to judge.

This module imports no Lightning and no torch.
"""

from __future__ import annotations

import math

from warmup_monitor.advice import format_lr
from warmup_monitor.report.analysis import (
    HEALTHY,
    INSTABILITY_KINDS,
    RECOVERED,
    SHORTER_WARMUP_FRACTION,
    TOO_SHORT,
    RunSummary,
)
from warmup_monitor.schema import AlertKind
from warmup_monitor.words import count, ratio
from warmup_monitor.words import times as _times

__all__ = ["advise"]

# How each instability kind reads in a sentence.
_PHRASES = {
    "loss_spike": "loss spiked",
    "loss_trend_spike": "loss jumped far above its recent trend",
    "grad_norm_spike": "gradient norm spiked",
    "loss_divergence": "loss kept climbing (divergence)",
    "grad_norm_rise": "gradient norm kept rising",
    "non_finite": "loss or gradients were NaN/inf",
    "oscillation": "consecutive gradients oscillated",
    "persistent_instability": "instability persisted",
    "warmup_exhausted": "adaptive warmup reached its cap while still unstable",
    "edge_of_stability": "the lr passed the curvature stability limit",
}

#: On the corpus of real runs (``benchmarks/README_corpus.md``): of the failing runs with no or a
#: short warmup, how many the long-warmup arm of the same cell and seed turned healthy
#: (``tests/test_corpus.py`` recomputes it from the corpus).
LONGER_WARMUP_HEALED = (17, 35)


def _steps_text(steps: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    more = len(steps) - limit
    return shown + (f", ... (+{more} more)" if more > 0 else "")


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
    if r.verdict == TOO_SHORT:
        return [
            f"the run ended at step {r.last_step}, before its {r.effective_warmup}-step warmup "
            "did: train past the end of warmup before judging its length or the peak lr"
        ]
    if r.verdict == HEALTHY:
        if r.extensions and eff is not None and w is not None and eff > w:
            # The monitor's own action is why the run stayed healthy: say what to start with.
            out.append(
                f"warmup was extended {_times(len(r.extensions))}, from {w} to {eff} steps, and "
                f"training stayed healthy: start with at least {eff} warmup steps next time"
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
    lr_hint = ""
    if r.recommended_peak_lr is not None and r.lowest_unstable_lr is not None:
        lr_hint = (
            f"lower the peak lr to about {format_lr(r.recommended_peak_lr)} (half of "
            f"{format_lr(r.lowest_unstable_lr)}, the lowest lr at which instability was seen)"
        )

    grown = [e for e in r.extensions if e.new is not None]
    if "warmup_exhausted" in unstable:
        out.append(
            "the adaptive warmup hit its cap while still unstable, so a longer warmup alone did "
            "not do: " + (lr_hint or "lower the peak lr")
        )
    elif r.extensions and eff is not None and w is not None and eff > w:
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
            + (f" (lr {format_lr(lr0)})" if lr0 is not None else "")
            + ": check the initialization and the loss scale"
            + (f", and {lr_hint}" if lr_hint else ", and start from a lower lr")
        )
    elif first is not None and eff is not None and first >= eff:
        out.append(
            f"instability began after warmup (step {first}, lr "
            f"{format_lr(r.lr_at_first_instability or math.nan)}): the peak lr is too high for "
            "this model; " + (lr_hint or "lower it") + " rather than lengthening warmup"
        )
    elif w is not None:
        healed, tried = LONGER_WARMUP_HEALED
        out.append(
            f"lengthen warmup to at least {2 * w} steps (twice the planned {w})"
            + (f", or {lr_hint}" if lr_hint else "")
            + ", or let the monitor extend warmup when it sees instability (on the corpus of "
            f"real runs a warmup of 30 % of the run turned {healed} of {tried} failing runs "
            "with none or a short one healthy; the others were unstable at every warmup, where "
            "only a lower lr helps)"
        )
    elif lr_hint:
        out.append(lr_hint)

    if "non_finite" in unstable:
        out.append(
            "non-finite values: clip gradients, and check the data and the mixed-precision loss "
            "scaling at those steps"
        )
    if r.verdict == RECOVERED and r.final_loss_ratio is not None:
        out.append(
            f"it recovered: the loss ended at {ratio(r.final_loss_ratio)}x the initial loss, "
            "but the instability cost steps"
        )
    return out


def _advise_healthy(r: RunSummary) -> list[str]:
    out = []
    extended = r.effective_warmup is not None and r.effective_warmup > (r.planned_warmup or 0)
    w = r.effective_warmup if extended else r.planned_warmup  # never contradict an extension
    transient = r.alerts_by_kind.get(AlertKind.TRANSIENT.value, [])
    if transient:
        out.append(
            f"{count(len(transient), 'excursion')} recovered at once (transient alerts at "
            f"{'step' if len(transient) == 1 else 'steps'} {_steps_text(transient)}): nothing "
            "to change for them"
        )
    a = r.aligned_from
    quiet = r.peak_loss_ratio is None or r.peak_loss_ratio <= 1.5
    suggest = max(2 * (a or 0), (w or 0) // 2, 1)
    shorter = w is not None and suggest <= 0.9 * w  # never a change under 10 %
    if (
        not extended
        and a is not None
        and w is not None
        and a <= SHORTER_WARMUP_FRACTION * w
        and quiet
        and shorter
    ):
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
