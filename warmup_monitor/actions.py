"""The alerts that announce the adaptive controller's actions, built from plain values.

:class:`~warmup_monitor.controller.WarmupController` decides; this module says it: the
``warmup_exhausted`` recommendation and the ``rollback`` record (and the request a rollback
starts from); and which alert kinds act how (at once, only with loss evidence, worth a
rollback). This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from warmup_monitor.alerts import Alert, AlertKind
from warmup_monitor.words import count as _count

__all__ = [
    "GRAD_KINDS",
    "LOSS_KINDS",
    "SEVERE_KINDS",
    "WEAK_KINDS",
    "RollbackRequest",
    "action_alerts",
    "acts_at_once",
    "exhausted_alert",
    "level_name",
    "recommend",
    "rollback_alert",
    "rollback_worthy",
]

#: Kinds that act on their own: they already mean persistence (oscillation is five flips in a
#: row; a divergence is sustained), a blow-up or a broken step.
SEVERE_KINDS = frozenset({"loss_spike", "non_finite", "oscillation", "persistent_instability"})
SEVERE_KINDS |= {"edge_of_stability", "loss_divergence"}
#: Gradient-norm evidence: it counts once a loss kind is in the episode (the controller's
#: docstring).
WEAK_KINDS = frozenset({"grad_norm_spike", "grad_norm_rise", "persistent_instability"})
#: Findings on the loss and on the gradients: both on one step act at once (they agree).
LOSS_KINDS = frozenset({"loss_spike", "loss_trend_spike", "loss_divergence"})
GRAD_KINDS = frozenset({"grad_norm_spike", "grad_norm_rise", "oscillation", "non_finite"})
#: Kinds whose episode damaged the model itself: with ``rollback``, restore a snapshot.
ROLLBACK_KINDS = frozenset(
    {"non_finite", "loss_spike", "persistent_instability", "loss_divergence"}
)


def rollback_worthy(alerts: Sequence[Alert], loss_ratio: float) -> bool:
    """Whether ``alerts`` make an episode severe enough to roll back: a kind of
    :data:`ROLLBACK_KINDS`, or a ``loss_trend_spike`` at least ``loss_ratio`` x the trend."""
    for a in alerts:
        kind = str(getattr(a.kind, "value", a.kind))
        if kind in ROLLBACK_KINDS:
            return True
        if kind == AlertKind.LOSS_TREND_SPIKE.value:
            try:
                ratio = float(a.details.get("ratio_to_trend", math.inf))
            except (TypeError, ValueError):
                ratio = math.inf
            if ratio >= loss_ratio:  # NaN never is
                return True
    return False


def acts_at_once(kinds: set[str]) -> bool:
    """Whether a step flagged with ``kinds`` acts without waiting for ``min_alerts`` flagged
    steps: a kind of :data:`SEVERE_KINDS`, or a loss kind and a gradient kind together."""
    return bool(kinds & SEVERE_KINDS) or (bool(kinds & LOSS_KINDS) and bool(kinds & GRAD_KINDS))


@dataclass(frozen=True)
class RollbackRequest:
    """A rollback the controller asks for: restore the last snapshot taken before ``onset``.

    Attributes:
        step: The step whose alerts decided it.
        onset: The first step of the episode: a snapshot taken after ``onset`` updates or more
            holds parameters that already produced the episode.
        causes: The alert kinds of the episode.
    """

    step: int
    onset: int
    causes: tuple[str, ...]


def level_name(*, owns_warmup: bool, recorded: bool) -> str:
    """What the controller's levels are, for the messages: a factor of the monitor's own
    shape, of the user's recorded ramp (``recorded``), or a fraction of the peak."""
    if recorded:
        return "lr factor (on your scheduler's lr)"
    return "lr factor" if owns_warmup else "warmup factor (fraction of the peak)"


def action_alerts(
    step: int,
    *,
    what: str,
    levels: tuple[float, float, float],
    lr: tuple[float, float] | None,
    plan: tuple[int, int, int, int],
    count: tuple[int, int],
    details: dict[str, Any],
) -> list[Alert]:
    """``lr_backoff`` (when the level drops) and ``warmup_extended`` for one action.

    Args:
        what: What the levels are (``"lr factor"``, ...).
        levels: The factor before, after, and the back-off target (the caps may keep
            ``after`` above it).
        lr: The effective lr before and after, if known.
        plan: The planned warmup length before and after, the step at which the plan reaches
            the peak, and the length cap.
        count: This extension's number and the cap on them.
        details: Shared details (causes, onset, anchor, the next factor).
    """
    before, after, target = levels
    old_end, new_end, full_step, cap = plan
    causes = ", ".join(details["causes"])
    dropped = after < before
    out = []
    if dropped:
        scaled = "" if lr is None else f" (lr {lr[0]:.3g} -> {lr[1]:.3g})"
        ceiling = details.get("ceiling")
        if ceiling is not None:
            # Held, not for ever: a later back-off (while extensions are left) lowers it again.
            left = count[1] - count[0]
            until = (
                f"(no re-warm) until a next back-off ({_count(left, 'extension')} left)"
                if left > 0
                else "(no re-warm) for the rest of training (no extension left)"
            )
            then = (
                "; instability came back after an earlier back-off, so it is held at "
                f"{ceiling:.3g} {until}"
            )
        else:
            room = target >= after - 1e-12
            then = f", and re-warms to the peak by step {full_step}" + (
                "" if room else f"; the caps leave no room to go down to {target:.3g}"
            )
        out.append(
            Alert(
                step=step,
                kind=AlertKind.LR_BACKOFF,
                message=(
                    f"the {what} is lowered from {before:.3g} to {after:.3g}{scaled} after "
                    f"{causes} since step {details['onset_step']}{then}"
                ),
                value=after,
                threshold=before,
                details={
                    "factor_before": before,
                    "factor_after": after,
                    "lr_before": None if lr is None else lr[0],
                    "lr_after": None if lr is None else lr[1],
                    "extensions": count[0],
                    "max_extensions": count[1],
                    **details,
                },
            )
        )
        how = f"re-warms from {after:.3g} after a back-off and reaches the peak at step {full_step}"
        if details.get("ceiling") is not None:
            how = f"is held at {after:.3g} (no re-warm: instability came back after a back-off)"
    else:
        how = f"continues from {before:.3g} without a jump and reaches the peak at step {full_step}"
    out.append(
        Alert(
            step=step,
            kind=AlertKind.WARMUP_EXTENDED,
            message=(
                f"warmup extended from {old_end} to {new_end} steps after {causes} (extension "
                f"{count[0]} of {count[1]}); the {what} {how}"
            ),
            value=float(new_end),
            threshold=float(cap),
            details={
                "old_warmup_steps": old_end,
                "new_warmup_steps": new_end,
                "factor_before": before,
                "factor_after": after,
                "backoff": dropped,
                "full_lr_step": full_step,
                "extensions": count[0],
                "max_extensions": count[1],
                **details,
            },
        )
    )
    return out


def exhausted_alert(
    step: int,
    *,
    reason: str,
    causes: list[str],
    cause_steps: list[int],
    extensions: int,
    max_extensions: int,
    warmup_steps: int,
    max_warmup_steps: int,
    level: float,
    lr: float | None,
    action: str,
) -> Alert:
    """The one ``warmup_exhausted`` alert: why nothing more can be done, and the advice.

    Args:
        reason: ``"caps"`` (extensions or length used up) or ``"at_one"`` (at the peak, with
            no back-off configured).
        level: The lowest fraction of the peak at which instability was acted on.
        lr: The effective lr there, if known (the recommendation is half of it, or of
            ``level`` without it: :func:`recommend`).
        action: ``on_exhausted``.
    """
    recommended, advice = recommend(lr, level)
    if reason == "caps":
        why = (
            f"after {_count(extensions, 'extension')} and a warmup of {warmup_steps} steps "
            f"(caps: {_count(max_extensions, 'extension')}, {max_warmup_steps} steps)"
        )
    else:
        why = (
            "with the lr factor already at the peak and no back-off configured (`backoff` "
            "and `rewarm_from` are 1: nothing left to slow down)"
        )
    # Longer than the warmup this run had (extended or not), never the same length again.
    advice += (
        f", or start with a warmup longer than this run's {warmup_steps} steps (at least "
        f"{2 * warmup_steps})"
    )
    if reason == "at_one":
        advice += ", or let the monitor re-warm (e.g. `backoff=0.5`)"
    if level < 0.1:
        advice += (
            "; instability below a tenth of the peak lr often has another cause "
            "(initialisation, data, loss scale)"
        )
    return Alert(
        step=step,
        kind=AlertKind.WARMUP_EXHAUSTED,
        message=f"still unstable ({', '.join(causes)}) {why}: {advice}",
        value=float(warmup_steps),
        threshold=float(max_warmup_steps),
        details={
            "reason": reason,
            "causes": causes,
            "cause_steps": cause_steps,
            "extensions": extensions,
            "max_extensions": max_extensions,
            "warmup_steps": warmup_steps,
            "max_warmup_steps": max_warmup_steps,
            "unstable_factor": level,
            "unstable_lr": lr,
            "recommended_lr_factor": 0.5 * level,
            "recommended_lr": recommended if lr is not None else None,
            "action": action,
        },
    )


def rollback_alert(
    step: int,
    snapshot_step: int | None,
    request: RollbackRequest | None,
    rollbacks: int,
    details: dict[str, Any],
) -> Alert:
    """The ``rollback`` alert: the snapshot restored after the update at ``step`` (``None``:
    none older than the onset was kept), the progress undone (its value), and ``details``
    (e.g. the snapshot's bytes and copy time)."""
    causes = ", ".join(request.causes) if request is not None else "instability"
    onset = request.onset if request is not None else step
    if snapshot_step is None:
        message = (
            f"no snapshot taken before the episode's onset at step {onset} is kept: nothing "
            "was restored; training goes on from the back-off alone"
        )
    else:
        message = (
            f"model, optimizer state and detectors restored to the snapshot taken "
            f"before step {snapshot_step} (episode of {causes} since step {onset}); "
            f"{step + 1 - snapshot_step} step(s) of progress undone, the data stream, the "
            "random generators and the lr schedule go on"
        )
    return Alert(
        step=step,
        kind=AlertKind.ROLLBACK,
        message=message,
        value=math.nan if snapshot_step is None else float(step + 1 - snapshot_step),
        threshold=math.nan,
        details={
            "snapshot_step": snapshot_step,
            "onset_step": onset,
            "causes": list(request.causes) if request is not None else [],
            "rollbacks": rollbacks,
            **details,
        },
    )


def recommend(unstable_lr: float | None, unstable_factor: float) -> tuple[float, str]:
    """Half the lr that broke (``unstable_lr``; without it, of the factor ``unstable_factor``)."""
    if unstable_lr is not None:
        lr = 0.5 * unstable_lr
        return lr, f"use a peak lr of at most {lr:.3g} (half the lr {unstable_lr:.3g} that broke)"
    frac = 0.5 * unstable_factor
    return frac, (
        f"use a peak lr of at most {frac:.3g} x the current one (half the fraction "
        f"{unstable_factor:.3g} of the peak that broke)"
    )
