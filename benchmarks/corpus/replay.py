"""Replay the detectors, the verdict and the controller's trigger on the corpus of real runs.

The detectors are pure functions of floats: every run's recorded loss, gradient norm and cosine
go through :class:`warmup_monitor.InstabilityDetector` step by step, in seconds for the whole
corpus, without training anything. Per run: the instability alerts (raw, every flagged step, not
only the lines an episode would send), the first flagged step, the verdict of
:func:`warmup_monitor.verdict.judge`, and whether the adaptive controller (the defaults) would
act (the first action is exact; what follows it would be another run).

Usage::

    python benchmarks/corpus/replay.py                 # the tables, both splits, the defaults
    python benchmarks/corpus/replay.py --split report  # one split
    python benchmarks/corpus/replay.py --detection trend_sigmas=4 --detection loss_divergence=false
    python benchmarks/corpus/replay.py --calibrate     # the sweep on the calibration split
    python benchmarks/corpus/replay.py --json benchmarks/results/corpus_replay.json

Criteria (issue 20), on the healthy runs: at most 1 instability alert per 50 runs, verdict
"healthy" in at least 98 %, no controller action in at least 98 %; on the failing runs: at least
95 % flagged by their deadline step (the first step whose loss is non-finite or whose trailing
median of 5 losses is above 2x its running minimum; see ``labels.py``).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traces import Run, load_corpus

from warmup_monitor import Detection, InstabilityDetector
from warmup_monitor.alerts import NOTICE_KINDS, is_instability
from warmup_monitor.controller import WarmupController
from warmup_monitor.verdict import HEALTHY, judge


@dataclass
class Outcome:
    """What the monitor would say about one run."""

    id: str
    family: str
    label: str
    split: str
    alerts: int  # instability alerts, every flagged step counted
    kinds: dict[str, int]
    notices: int
    first_flagged: int | None
    verdict: str
    reason: str
    action_step: int | None  # the controller's first action (defaults), if any
    deadline: int | None

    @property
    def caught(self) -> bool:
        """Flagged at or before the deadline step (failing runs)."""
        if self.deadline is None:
            return self.first_flagged is not None
        return self.first_flagged is not None and self.first_flagged <= self.deadline


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def replay(run: Run, detection: Detection) -> Outcome:
    """Feed one run's trace to the detectors and the controller's trigger."""
    det = InstabilityDetector(detection)
    ctl = WarmupController(warmup_steps=max(run.warmup_steps, 1), shape=None, adaptive=True)
    kinds: collections.Counter[str] = collections.Counter()
    flagged: list[int] = []
    notices = 0
    action: int | None = None
    n = run.steps_done
    for t in range(n):
        loss = float(run.loss[t])
        grad = float(run.grad_norm[t])
        cosine = _finite(float(run.grad_cosine[t]))
        alerts = det.update(t, loss, grad, cosine)
        unstable = [a for a in alerts if is_instability(a.kind)]
        for a in alerts:
            if is_instability(a.kind):
                kinds[a.kind_name] += 1
            elif a.kind in NOTICE_KINDS:
                notices += 1
        if unstable:
            flagged.append(t)
        if action is None and alerts:
            lr = float(run.lr_trace[t])
            if ctl.observe(t, alerts, lr=lr if lr > 0 else None):
                action = t
    steps = np.arange(n)
    verdict, reason = judge(
        flagged,
        steps,
        run.loss[:n],
        det.initial_loss,
        last_step=n - 1 if n else None,
        effective_warmup=run.warmup_steps,
    )
    return Outcome(
        id=run.id,
        family=run.family,
        label=run.label,
        split=run.split,
        alerts=sum(kinds.values()),
        kinds=dict(kinds),
        notices=notices,
        first_flagged=flagged[0] if flagged else None,
        verdict=verdict,
        reason=reason,
        action_step=action,
        deadline=run.deadline_step,
    )


@dataclass
class Score:
    healthy: int
    alerts_per_50: float
    healthy_verdict: float
    no_action: float
    failing: int
    recall: float
    spiky: int
    spiky_recall: float
    silent: int
    silent_flagged: float

    @property
    def passes(self) -> bool:
        return (
            self.alerts_per_50 <= 1.0
            and self.healthy_verdict >= 0.98
            and self.no_action >= 0.98
            and self.recall >= 0.95
        )


def score(outcomes: list[Outcome], *, literal: bool = False) -> Score:
    """The issue's figures; ``literal``: the spiky runs count as healthy (the issue's labels
    taken word for word), not as instability to catch."""
    healthy_labels = ("healthy", "spiky") if literal else ("healthy",)
    healthy = [o for o in outcomes if o.label in healthy_labels]
    failing = [o for o in outcomes if o.label == "failing"]
    spiky = [] if literal else [o for o in outcomes if o.label == "spiky"]
    silent = [o for o in outcomes if o.label == "silent"]
    nh = max(len(healthy), 1)
    return Score(
        healthy=len(healthy),
        alerts_per_50=50.0 * sum(o.alerts for o in healthy) / nh,
        healthy_verdict=sum(o.verdict == HEALTHY for o in healthy) / nh,
        no_action=sum(o.action_step is None for o in healthy) / nh,
        failing=len(failing),
        recall=sum(o.caught for o in failing) / max(len(failing), 1),
        spiky=len(spiky),
        spiky_recall=sum(o.caught for o in spiky) / max(len(spiky), 1),
        silent=len(silent),
        silent_flagged=sum(o.first_flagged is not None for o in silent) / max(len(silent), 1),
    )


def _parse_detection(items: list[str]) -> Detection:
    types = {f.name: f.type for f in fields(Detection)}
    options: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"--detection: unknown field {key!r} of Detection")
        low = raw.lower()
        value: Any = raw
        if low in ("true", "false"):
            value = low == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        options[key] = value
    return Detection(**options)


def table(outcomes: list[Outcome], title: str, *, literal: bool = False) -> str:
    s = score(outcomes, literal=literal)
    yes = {True: "yes", False: "**no**"}
    healthy = "healthy and spiky runs" if literal else "healthy runs"
    lines = [
        f"### {title}",
        "",
        "| | runs | figure | target | met |",
        "|---|---:|---:|---:|:---:|",
        f"| instability alerts per 50 {healthy} | {s.healthy} | {s.alerts_per_50:.2f} "
        f"| <= 1 | {yes[s.alerts_per_50 <= 1]} |",
        f'| {healthy} with the verdict "healthy" | {s.healthy} | {s.healthy_verdict:.1%} '
        f"| >= 98 % | {yes[s.healthy_verdict >= 0.98]} |",
        f"| {healthy} on which adaptive would not act | {s.healthy} | {s.no_action:.1%} "
        f"| >= 98 % | {yes[s.no_action >= 0.98]} |",
        f"| failing runs flagged by their deadline | {s.failing} | {s.recall:.1%} | >= 95 % "
        f"| {yes[s.recall >= 0.95]} |",
    ]
    if not literal:
        lines.append(
            f"| spiky runs flagged by their deadline | {s.spiky} | {s.spiky_recall:.1%} | - | - |"
        )
    lines += [
        f"| silent runs flagged at all (informative) | {s.silent} | {s.silent_flagged:.1%} "
        "| - | - |",
        "",
    ]
    return "\n".join(lines)


def per_family(outcomes: list[Outcome]) -> str:
    fams = sorted({o.family for o in outcomes})
    lines = [
        '| family | healthy | alerts on healthy | not "healthy" | would act | failing '
        "| caught | spiky | caught | silent | flagged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam in fams:
        os_ = [o for o in outcomes if o.family == fam]
        h = [o for o in os_ if o.label == "healthy"]
        f = [o for o in os_ if o.label == "failing"]
        si = [o for o in os_ if o.label == "silent"]
        sp = [o for o in os_ if o.label == "spiky"]
        lines.append(
            f"| {fam} | {len(h)} | {sum(o.alerts for o in h)} "
            f"| {sum(o.verdict != HEALTHY for o in h)} "
            f"| {sum(o.action_step is not None for o in h)} "
            f"| {len(f)} | {sum(o.caught for o in f)} | {len(sp)} | {sum(o.caught for o in sp)} "
            f"| {len(si)} "
            f"| {sum(o.first_flagged is not None for o in si)} |"
        )
    return "\n".join(lines) + "\n"


#: The sweep behind the defaults, on the calibration split only.
GRID: dict[str, list[Any]] = {
    "trend_sigmas": [3.0, 4.0, 5.7],
    "trend_early_ratio": [2.0, 2.5, 3.0],
    # Fixed by a constraint, not swept: the issue keeps the slow-divergence cases, and
    # tests/test_divergence_lightning.py (a least-squares run pushed just past 2 / lambda_max)
    # is flagged before its loss doubles at 1.25 and no longer at 1.5, 1.75 or 2 (measured).
    "divergence_min_ratio": [1.25],
    "divergence_sigmas": [3.0, 5.0],
}


def calibrate(runs: list[Run], base: Detection) -> Detection:
    """Sweep :data:`GRID` on the calibration split and return the setting the rule picks:
    among those that flag every failing calibration run by its deadline, the one
    with the fewest instability alerts on the healthy calibration runs; on a tie, the higher
    thresholds (first, do no harm: the corpus's classification runs use label smoothing, so
    their losses never reach the noisy lows of a plain cross-entropy near 0, where the user's
    digits run of issue 20 sits). Prints every setting's figures."""
    cal = [r for r in runs if r.split == "calibrate"]
    print("| " + " | ".join(GRID) + " | alerts/50 healthy | healthy verdict | recall | spiky |")
    print("|" + "---|" * (len(GRID) + 4))
    best: tuple[float, tuple[Any, ...]] | None = None
    for values in itertools.product(*GRID.values()):
        d = replace(base, **dict(zip(GRID, values, strict=True)))
        s = score([replay(r, d) for r in cal])
        print(
            "| "
            + " | ".join(f"{v:g}" for v in values)
            + f" | {s.alerts_per_50:.2f} | {s.healthy_verdict:.1%} | {s.recall:.0%} "
            f"| {s.spiky_recall:.0%} |"
        )
        if s.recall == 1.0 and (best is None or s.alerts_per_50 <= best[0]):
            best = (s.alerts_per_50, values)
    if best is None:
        raise SystemExit("no setting flags every failing calibration run")
    chosen = dict(zip(GRID, best[1], strict=True))
    print(f"\nchosen: {chosen}")
    return replace(base, **chosen)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", default=None, help="the traces folder (default: the committed)")
    ap.add_argument("--split", choices=["calibrate", "report", "both"], default="both")
    ap.add_argument("--detection", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--json", help="write every run's outcome here")
    ap.add_argument("--misses", action="store_true", help="list the runs that miss a target")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = load_corpus(args.corpus) if args.corpus else load_corpus()
    detection = _parse_detection(args.detection)
    if args.calibrate:
        calibrate(runs, detection)
        return
    outcomes = [replay(r, detection) for r in runs]
    splits = ["calibrate", "report"] if args.split == "both" else [args.split]
    for split in splits:
        mine = [o for o in outcomes if o.split == split]
        print(table(mine, f"{split} split ({len(mine)} runs)"))
        print(table(mine, f"{split} split, the issue's labels word for word", literal=True))
        print(per_family(mine))
        if args.misses:
            for o in mine:
                if o.label == "healthy" and (o.alerts or o.verdict != HEALTHY or o.action_step):
                    print(f"  healthy {o.id}: {o.kinds} {o.verdict} action={o.action_step}")
                if o.label in ("failing", "spiky") and not o.caught:
                    print(
                        f"  missed {o.id}: first flagged {o.first_flagged}, deadline {o.deadline}"
                    )
    print(f"replayed {len(runs)} runs in {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps([vars(o) for o in outcomes], indent=1, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
