"""One rule for what a run, or an episode of it, was: the single place that decides "recovered".

The console's ``episode_end`` line, the episode records in the JSONL, the report's verdict, the
Warmup tab and ``warmup/unstable`` all follow the rule here, over **flagged steps**: every
optimizer step with an instability alert (:data:`warmup_monitor.schema.INSTABILITY_KINDS`),
whether the alert was dispatched on its own line or folded into an episode (an ``episode_end``
record lists its flagged steps as ranges).

Recovered (:func:`recovery`): after the last flagged step, a quiet stretch of logged losses

* that are all finite,
* whose median came back to the level before the instability (the median of the
  :data:`BEFORE_STEPS` losses logged before the first flagged step), within
  :data:`COME_BACK_TOLERANCE`, and
* that is below the initial loss by at least :data:`MIN_PROGRESS`: a run that sits at its
  initial loss (a dead network at chance) did not recover, however quiet it is.

Run verdicts (:func:`judge`), checked in this order:

* ``too short to judge``: the run ended during its warmup (last logged step below the effective
  warmup length) without a flagged step;
* ``healthy``: no flagged step;
* ``unstable but recovered``: the last :data:`RECOVERY_STEPS` logged steps (or the last 10 % of
  them, whichever is more) hold no flagged step and :func:`recovery` holds over them;
* ``unstable``: anything else (the reason says which condition failed).

This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from warmup_monitor.words import span

__all__ = [
    "BEFORE_STEPS",
    "COME_BACK_TOLERANCE",
    "HEALTHY",
    "MIN_PROGRESS",
    "RECOVERED",
    "RECOVERY_STEPS",
    "TOO_SHORT",
    "UNSTABLE",
    "judge",
    "recovery",
]

HEALTHY = "healthy"
RECOVERED = "unstable but recovered"
UNSTABLE = "unstable"
TOO_SHORT = "too short to judge"

#: Quiet logged steps needed at the end of a run to call it recovered (or 10 % of the steps).
RECOVERY_STEPS = 10
#: Logged losses before the first flagged step whose median is the level to come back to.
BEFORE_STEPS = 5
#: How far above the level before the instability the quiet median may end (relative): a
#: mini-batch median of a few steps is that noisy on the corpus's healthy runs.
COME_BACK_TOLERANCE = 0.05
#: How far below the initial loss the quiet median must be (relative) to count as learning.
MIN_PROGRESS = 0.05


def _g(x: float) -> str:
    return f"{x:.4g}"


def recovery(
    after: Sequence[float],
    before: Sequence[float],
    initial_loss: float | None,
    *,
    first_flagged: int | None = None,
) -> tuple[bool, str]:
    """Whether the losses ``after`` the last flagged step show a recovery, and why (or why not).

    Args:
        after: The losses of the quiet stretch after the last flagged step (in any scale shared
            with ``before`` and ``initial_loss``: losses, or loss ratios with an initial of 1).
        before: The losses logged before the first flagged step (the last
            :data:`BEFORE_STEPS` finite ones are used).
        initial_loss: The run's initial loss (``None``: unknown).
        first_flagged: The first flagged step, for the sentence.

    Returns:
        ``(recovered, reason)``; the reason is a clause such as ``"their median loss (0.41)
        came back to ..."``.
    """
    if not len(after):
        return False, "no loss logged after the last flagged step to show a recovery"
    tail = [float(x) for x in after]
    if not all(math.isfinite(x) for x in tail):
        return False, f"the last {len(tail)} losses are not all finite"
    median = statistics.median(tail)
    prior = [float(x) for x in before if math.isfinite(float(x))][-BEFORE_STEPS:]
    where = "" if first_flagged is None else f" before step {first_flagged}"
    if prior:
        level = statistics.median(prior)
        what = (
            f"the loss before the first instability (median {_g(level)} of the {len(prior)} "
            f"logged{where})"
        )
    elif initial_loss is not None and math.isfinite(initial_loss):
        level, what = initial_loss, f"the initial loss ({_g(initial_loss)})"
    else:
        return False, "no loss before the instability to come back to"
    if median > level * (1 + COME_BACK_TOLERANCE):
        return False, (
            f"their median loss ({_g(median)}) stayed more than "
            f"{COME_BACK_TOLERANCE:.0%} above {what}"
        )
    initial = initial_loss if initial_loss is not None and math.isfinite(initial_loss) else 0.0
    if initial > 0 and median > initial * (1 - MIN_PROGRESS):
        return False, (
            f"their median loss ({_g(median)}) is not {MIN_PROGRESS:.0%} below the initial "
            f"loss ({_g(initial)}): the run is not learning"
        )
    return True, f"their median loss ({_g(median)}) came back to at most {what}"


def judge(
    flagged_steps: Sequence[int],
    loss_steps: Sequence[int],
    loss_values: Sequence[float],
    initial_loss: float | None,
    *,
    last_step: int | None,
    effective_warmup: int | None,
) -> tuple[str, str]:
    """The run's verdict and the sentence that says which rule produced it (module docstring).

    Args:
        flagged_steps: Every step with an instability alert, sorted.
        loss_steps, loss_values: The logged losses, by step (sorted).
        initial_loss: The monitor's initial loss (``None``: unknown).
        last_step: The last logged step.
        effective_warmup: The warmup length in force at the end (extensions included).
    """
    ended_in_warmup = (
        last_step is not None and effective_warmup is not None and last_step < effective_warmup
    )
    where = (
        f"the run ended at step {last_step}, during its {effective_warmup}-step warmup"
        if ended_in_warmup
        else ""
    )
    if not flagged_steps:
        if ended_in_warmup:
            return TOO_SHORT, f"{where}, without an instability alert"
        return HEALTHY, "no instability alert" + (
            f" up to step {last_step}" if last_step is not None else ""
        )
    first, last_flag = int(flagged_steps[0]), int(flagged_steps[-1])
    if ended_in_warmup:
        return UNSTABLE, f"{where}, with instability alerts ({span(first, last_flag)})"
    if not len(loss_values):
        return UNSTABLE, "instability alerts, and no loss logged to show a recovery"
    quiet = max(RECOVERY_STEPS, len(loss_values) // 10)
    tail_steps = [int(s) for s in loss_steps[-quiet:]]
    if last_flag >= tail_steps[0]:
        return UNSTABLE, (
            f"an instability alert at step {last_flag}, within the last {quiet} logged steps "
            f"(from step {tail_steps[0]}): not recovered"
        )
    before = [float(v) for s, v in zip(loss_steps, loss_values, strict=True) if s < first]
    ok, why = recovery(loss_values[-quiet:], before, initial_loss, first_flagged=first)
    if not ok:
        return UNSTABLE, (
            f"no instability alert in the last {quiet} logged steps (last one at step "
            f"{last_flag}), but {why}: not recovered"
        )
    return RECOVERED, (
        f"no instability alert in the last {quiet} logged steps (last one at step {last_flag}), "
        f"and {why}"
    )
