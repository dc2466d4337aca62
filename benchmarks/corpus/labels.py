"""Outcome labels and the calibrate/report split of the corpus (pure functions, no detector).

A run is compared with the best warmup arm of its own cell and seed: the arm with the lowest
final loss (the mean training loss of the last 5 % of the planned steps; ``inf`` for a run that
diverged). The rules, word for word as in ``README_corpus.md``:

- **healthy**: no non-finite value, final loss within 2 % of the best arm (<= 1.02 x best), and
  no spike/divergence visible in the trace;
- **spiky**: final loss within 2 % of the best arm, but a spike/divergence visible in the
  trace: the whole cell is unstable at every warmup (every arm blew up alike, e.g. a loss 10x
  its initial value); not an ordinary healthy run, and instability the monitor must report
  (the issue's rules, taken literally, would call these healthy: ``README_corpus.md`` gives
  the figures both ways);
- **failing**: diverged (non-finite), or final loss > 1.05 x best **and** a spike/divergence
  visible in the trace;
- **silent**: final loss > 1.05 x best and no spike/divergence visible;
- **unclear**: everything else (e.g. 2-5 % above best).

"Visible spike/divergence" and the *deadline step*: the first step ``t`` where the loss (or the
gradient norm) is non-finite, or where ``m[t] > 2 x min(m[0..t-1])``, with ``m`` the trailing
median of the last 5 losses (``m[t] = median(loss[max(0, t-4)..t])``). The best arm is the best
*finite* arm; if every arm of a cell and seed diverged, all are failing.

The split: the families in :data:`REPORT_FAMILIES` are held out whole (every seed is
``report``); in the other families seeds 0 and 1 are ``calibrate`` and seed 2 is ``report``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATE_SEEDS",
    "REPORT_FAMILIES",
    "assign_labels",
    "final_loss",
    "label_one",
    "spike_step",
    "split_of",
    "trailing_median",
]

#: Families held out whole: every seed goes to the report split.
REPORT_FAMILIES: tuple[str, ...] = ("gru_lm", "hf_gpt2", "mlp_tabular")
#: Seeds used for calibration in the other families (the rest go to the report split).
CALIBRATE_SEEDS: tuple[int, ...] = (0, 1)

HEALTHY_RATIO = 1.02
WORSE_RATIO = 1.05
SPIKE_FACTOR = 2.0
MEDIAN_WINDOW = 5
FINAL_FRACTION = 0.05


def split_of(family: str, seed: int) -> str:
    """``"report"`` for a held-out family or a seed outside :data:`CALIBRATE_SEEDS`, else
    ``"calibrate"``."""
    if family in REPORT_FAMILIES or seed not in CALIBRATE_SEEDS:
        return "report"
    return "calibrate"


def trailing_median(loss: Sequence[float] | np.ndarray, window: int = MEDIAN_WINDOW) -> np.ndarray:
    """``m[t] = median(loss[max(0, t - window + 1) .. t])`` (float64, same length)."""
    x = np.asarray(loss, dtype=np.float64)
    return np.array([float(np.median(x[max(0, t - window + 1) : t + 1])) for t in range(len(x))])


def spike_step(
    loss: Sequence[float] | np.ndarray,
    factor: float = SPIKE_FACTOR,
    grad_norm: Sequence[float] | np.ndarray | None = None,
) -> int | None:
    """The first step where the loss (or ``grad_norm``, if given) is non-finite, or where the
    trailing median of 5 losses exceeds ``factor`` x its minimum over the earlier steps; None
    if there is none."""
    x = np.asarray(loss, dtype=np.float64)
    bad = ~np.isfinite(x)
    if grad_norm is not None:
        g = np.asarray(grad_norm, dtype=np.float64)
        bad[: len(g)] |= ~np.isfinite(g[: len(x)])
    first_bad = int(np.argmax(bad)) if bad.any() else len(x)
    m = trailing_median(x[:first_bad])
    low = math.inf
    for t in range(len(m)):
        if t > 0 and m[t] > factor * low:
            return t
        low = min(low, float(m[t]))
    return first_bad if first_bad < len(x) else None


def final_loss(loss: Sequence[float] | np.ndarray, steps: int, diverged: bool) -> float:
    """The mean training loss of the last 5 % (at least 1) of the ``steps`` planned steps;
    ``inf`` if the run diverged (or stopped before those steps)."""
    x = np.asarray(loss, dtype=np.float64)
    n = max(1, math.ceil(FINAL_FRACTION * steps))
    if diverged or len(x) < steps or not np.all(np.isfinite(x[-n:])):
        return math.inf
    return float(np.mean(x[-n:]))


def label_one(final: float, best: float, diverged: bool, visible: bool) -> tuple[str, str]:
    """The label and its reason for one run, given the best finite final loss of its cell and
    seed (``inf`` if every arm diverged) and whether a spike/divergence is visible."""
    if diverged or not math.isfinite(final):
        return "failing", "diverged (non-finite loss or gradient)"
    ratio = final / best
    if ratio <= HEALTHY_RATIO and visible:
        return "spiky", f"final loss {ratio:.4f} x best arm (<= {HEALTHY_RATIO}), but a spike"
    if ratio <= HEALTHY_RATIO:
        return "healthy", f"final loss {ratio:.4f} x best arm (<= {HEALTHY_RATIO})"
    if ratio > WORSE_RATIO:
        if visible:
            return "failing", f"final loss {ratio:.4f} x best arm (> {WORSE_RATIO}) and a spike"
        return "silent", f"final loss {ratio:.4f} x best arm (> {WORSE_RATIO}), no spike"
    return (
        "unclear",
        f"final loss {ratio:.4f} x best arm (between {HEALTHY_RATIO} and {WORSE_RATIO})",
    )


def assign_labels(
    records: Iterable[Mapping[str, Any]], traces: Mapping[str, Mapping[str, np.ndarray]]
) -> list[dict[str, Any]]:
    """Fill ``final_loss``, ``deadline_step``, ``spike_1_5x``, ``label``, ``label_reason`` and
    ``split`` of every record (new dicts, same order).

    Args:
        records: Index records with at least ``id``, ``family``, ``cell``, ``seed``, ``steps``
            and ``diverged``.
        traces: ``id`` -> arrays with at least ``loss`` (and optionally ``grad_norm``).
    """
    out = [dict(r) for r in records]
    for r in out:
        tr = traces[r["id"]]
        loss, gn = tr["loss"], tr.get("grad_norm")
        r["final_loss"] = final_loss(loss, int(r["steps"]), bool(r["diverged"]))
        r["deadline_step"] = spike_step(loss, SPIKE_FACTOR, gn)
        r["spike_1_5x"] = spike_step(loss, 1.5, gn)
        r["split"] = split_of(str(r["family"]), int(r["seed"]))
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in out:
        groups[(str(r["cell"]), int(r["seed"]))].append(r)
    for arms in groups.values():
        best = min(float(r["final_loss"]) for r in arms)
        for r in arms:
            label, reason = label_one(
                float(r["final_loss"]), best, bool(r["diverged"]), r["deadline_step"] is not None
            )
            if not math.isfinite(best):
                reason = "every arm of the cell and seed diverged"
            r["label"], r["label_reason"] = label, reason
    return out
