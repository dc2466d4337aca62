"""Loss-spike detection on synthetic early-training loss traces: ours against the rules peers use.

Each rule set reads the loss of every optimizer step, in order, and says on which steps it
alerts. The traces look like early training (see :func:`clean_trace`): a fast power-law
decrease whose speed follows a linear lr warmup, plateaus, and multiplicative Student-t noise
(absolute noise shrinks with the loss). Three sets of traces:

``clean``
    No events: every alert is a false alarm.
``spikes``
    Three spikes per trace, each multiplying the loss by a height (1.5x to 100x the local
    level) for a duration (1 to 50 steps), on a balanced grid of heights and durations, at
    random onsets (step 1 to 900, at least 100 steps apart).
``catapults``
    Two harmless catapults per trace: the loss rises to 1.5-4x over 1-3 steps, then lands
    10 % below its trend for 5 steps, and training goes on.

Rule sets (all loss only; faithful re-implementations of the rules, with training continuing
after an alert so that every event can be scored):

``ours``
    ``warmup_monitor.InstabilityDetector()`` with its defaults; an alert is any alert of an
    instability kind (``transient`` is informational and does not count).
``lightning``
    Lightning's ``SpikeDetection(window=10, warmup=1, rtol=2.0, atol=None, mode="min",
    finite_only=True)``: a loss that is worse than the last non-spike loss and at least
    ``rtol`` x the running mean above the running mean of the last 10 non-spike losses (that
    is, >= 3x the mean). The real callback raises ``TrainingSpikeException`` and stops.
``llm-foundry``
    ``KillLossSpike(window_size=100, outlier_multiplier=2, patience=4)``: once the window of
    the last 100 losses (spikes included) is full, alert when the loss is >= 2x the window
    mean for more than 4 (i.e. 5) consecutive steps. Its absolute ``loss_cap`` rule is left
    out (it tests a fixed loss level, not a spike).
``olmo-core``
    ``SkipStepOptimizer(rolling_interval_length=128, sigma_factor=6)``: once 64 losses are
    known, skip the step when ``|loss - mean| / std > 6`` over the previous up to 128 losses.

Scores (a *spike event* is detected when the rule alerts on one of its steps):

- recall: detected events / events; precision: detected events / (detected events + alerting
  steps outside every event on the spike traces); F1, both for all heights and for >= 3x;
- false alarms per 10,000 steps of the clean traces (alerting steps);
- median detection delay: first alerting step - onset, over detected events;
- the first update (1 = the first) at which a rule can alert at all, found by probing a 100x
  spike of 10 steps at every onset from step 1 on;
- catapults: the share that raises any alert, and for ours the share reported as
  ``persistent_instability`` (what would lengthen warmup) and as ``transient``.

A second part, ``divergence``, trains a linear least-squares model with mini-batch SGD and a
linear warmup (200 steps) to a peak lr of 0.5x to 3x the full-batch stability limit
``2 / lambda_max`` (the Hessian's top eigenvalue, computed exactly), feeding every rule the
real loss and ours also the gradient norm and the cosine of consecutive gradients. It reports
the first step at which each rule alerts, the step at which the lr crosses ``2 / lambda_max``
and the step at which the loss is 10x the initial loss or non-finite.

Run from the repository root (about a minute on one core)::

    .venv/bin/python benchmarks/detection.py [--seed 0] [--quick] [--part spikes|divergence]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from warmup_monitor.alerts import AlertKind  # noqa: E402
from warmup_monitor.detectors import InstabilityDetector  # noqa: E402

T = 1000
HEIGHTS = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
DURATIONS = (1, 2, 5, 10, 20, 50)
EARLY = 128  # onsets before this step are "during start-up"

# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------


def clean_trace(rng: np.random.Generator, n: int = T) -> np.ndarray:
    """One early-training loss trace without events.

    ``L0`` in [2, 11] (log of 7 to 60,000 classes), decreasing toward a floor of 5-50 % of
    ``L0`` as a power law ``(1 + s / tau) ** -p`` of the progress ``s``, which advances with a
    linear lr warmup of 0-300 steps and nearly stops on 0-2 plateaus of 30-200 steps.
    Noise is multiplicative Student-t (5 degrees of freedom) with a relative sd of 1-10 %,
    starting at 30 % of that and growing as the loss falls.
    """
    l0 = rng.uniform(2.0, 11.0)
    floor = l0 * rng.uniform(0.05, 0.5)
    warmup = rng.uniform(0.0, 300.0)
    tau = rng.uniform(2.0, 50.0)
    power = rng.uniform(0.5, 1.5)
    t = np.arange(n, dtype=float)
    dt = np.minimum(1.0, (t + 1.0) / max(warmup, 1.0))
    for _ in range(rng.integers(0, 3)):
        start = int(rng.integers(100, 800))
        dt[start : start + int(rng.integers(30, 200))] *= 0.02
    progress = np.cumsum(dt) - dt[0]
    trend = floor + (l0 - floor) * (1.0 + progress / tau) ** (-power)
    sigma = math.exp(rng.uniform(math.log(0.01), math.log(0.1)))
    fallen = 1.0 - (trend - floor) / (l0 - floor)
    rel_sd = sigma * (0.3 + 0.7 * fallen)
    eps = rng.standard_t(5, size=n) * math.sqrt(3.0 / 5.0)
    return trend * np.exp(rel_sd * eps - 0.5 * rel_sd**2)


def _onsets(rng: np.random.Generator, count: int, lo: int, hi: int, gap: int) -> list[int]:
    while True:
        onsets = sorted(int(x) for x in rng.integers(lo, hi, size=count))
        if all(b - a >= gap for a, b in itertools.pairwise(onsets)):
            return onsets


@dataclass
class Event:
    onset: int
    steps: int  # steps in the event's window
    height: float
    duration: int


@dataclass
class Trace:
    loss: np.ndarray
    events: list[Event] = field(default_factory=list)


def spike_traces(rng: np.random.Generator, reps: int) -> list[Trace]:
    grid = [(h, d) for h in HEIGHTS for d in DURATIONS] * reps
    order = rng.permutation(len(grid))
    grid = [grid[i] for i in order]
    traces = []
    for i in range(0, len(grid), 3):
        loss = clean_trace(rng)
        chunk = grid[i : i + 3]
        events = []
        for onset, (h, d) in zip(_onsets(rng, len(chunk), 1, 900, 100), chunk, strict=True):
            loss[onset : onset + d] *= h
            events.append(Event(onset, d, h, d))
        traces.append(Trace(loss, events))
    return traces


def catapult_traces(rng: np.random.Generator, n: int) -> list[Trace]:
    traces = []
    for _ in range(n):
        loss = clean_trace(rng)
        events = []
        for onset in _onsets(rng, 2, 1, 900, 100):
            h = rng.uniform(1.5, 4.0)
            rise = int(rng.integers(1, 4))
            profile = [h ** ((k + 1) / rise) for k in range(rise)] + [0.9] * 5
            loss[onset : onset + len(profile)] *= np.array(profile)
            events.append(Event(onset, len(profile), h, rise))
        traces.append(Trace(loss, events))
    return traces


# --------------------------------------------------------------------------------------------
# Rule sets: each maps a loss trace to a boolean "alerts on this step" array
# --------------------------------------------------------------------------------------------

Rule = Callable[[np.ndarray], np.ndarray]


def run_ours(loss: np.ndarray, kinds: list[set[str]] | None = None) -> np.ndarray:
    det = InstabilityDetector()
    out = np.zeros(len(loss), dtype=bool)
    for i, value in enumerate(loss.tolist()):
        alerts = det.update(i, value)
        if alerts:
            out[i] = any(a.kind.is_instability for a in alerts)
            if kinds is not None:
                kinds[i] = {a.kind.value for a in alerts}
    return out


def run_lightning(loss: np.ndarray, window: int = 10, warmup: int = 1, rtol: float = 2.0) -> Any:
    """``lightning.fabric.utilities.spike.SpikeDetection`` (mode="min", atol=None)."""
    out = np.zeros(len(loss), dtype=bool)
    last_val = 0.0
    recent: deque[float] = deque(maxlen=window)  # torchmetrics Running(MeanMetric, window)
    for i, value in enumerate(loss.tolist()):
        spike = False
        if i >= warmup:
            running = sum(recent) / len(recent) if recent else math.nan
            if not math.isfinite(value):
                spike = True  # finite_only=True
            elif value - last_val > 0.0:  # not an improvement on the last non-spike value
                spike = abs(value - running) >= abs(rtol * running)
        if spike:
            out[i] = True  # the real callback raises TrainingSpikeException here
        elif math.isfinite(value):
            recent.append(value)
            last_val = value
    return out


def run_llm_foundry(
    loss: np.ndarray, window: int = 100, multiplier: float = 2.0, patience: int = 4
) -> Any:
    """``llmfoundry.callbacks.KillLossSpike`` (log_only=True): its loss-spike decision.

    Its second rule, ``HighLossError`` (half the window above an absolute ``loss_cap`` of 10),
    is left out: it tests a fixed loss level, not a spike.
    """
    out = np.zeros(len(loss), dtype=bool)
    recent: deque[float] = deque(maxlen=window)
    total = 0.0
    outliers = 0
    for i, value in enumerate(loss.tolist()):
        if len(recent) == window:
            mean = total / window
            if value >= mean * multiplier:
                outliers += 1
                out[i] = outliers > patience
            elif outliers > 0:
                outliers = 0
            total -= recent[0]
        recent.append(value)
        total += value
    return out


def run_olmo_core(loss: np.ndarray, interval: int = 128, sigmas: float = 6.0) -> Any:
    """``olmo_core.optim.SkipStepOptimizer.get_step_factor`` on the loss alone."""
    n = len(loss)
    out = np.zeros(n, dtype=bool)
    need = max(20, interval // 2)  # losses known, the current one included
    z = np.full(n, np.nan)
    for i in range(need - 1, min(interval, n)):  # growing window
        prev = loss[:i]
        z[i] = abs(loss[i] - prev.mean()) / prev.std(ddof=1)
    if n > interval:  # full windows of the previous `interval` losses
        win = np.lib.stride_tricks.sliding_window_view(loss[:-1], interval)
        with np.errstate(divide="ignore", invalid="ignore"):
            z[interval:] = np.abs(loss[interval:] - win.mean(1)) / win.std(1, ddof=1)
    out[need - 1 :] = ~(z[need - 1 :] <= sigmas)  # a NaN z-score skips too
    return out


RULES: dict[str, Rule] = {
    "ours": run_ours,
    "lightning": run_lightning,
    "llm-foundry": run_llm_foundry,
    "olmo-core": run_olmo_core,
}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def first_update_able_to_fire(rule: Rule, rng: np.random.Generator) -> int | None:
    base = clean_trace(rng, 400)
    for onset in range(1, 300):
        loss = base.copy()
        loss[onset : onset + 10] *= 100.0
        alerts = np.flatnonzero(rule(loss)[onset : onset + 10])
        if len(alerts):
            return onset + int(alerts[0]) + 1  # 1-based update number
    return None


def _height_is(h: float) -> Callable[[Event], bool]:
    return lambda ev: ev.height == h


def _ge3_lasting(d: int) -> Callable[[Event], bool]:
    return lambda ev: ev.height >= 3.0 and ev.duration == d


def score(
    name: str, rule: Rule, spikes: list[Trace], clean: list[Trace], cats: list[Trace], seed: int
) -> dict[str, Any]:
    detected: list[tuple[Event, int | None]] = []
    false_steps = 0
    for tr in spikes:
        alerts = rule(tr.loss)
        inside = np.zeros(len(tr.loss), dtype=bool)
        for ev in tr.events:
            inside[ev.onset : ev.onset + ev.steps] = True
            hits = np.flatnonzero(alerts[ev.onset : ev.onset + ev.steps])
            detected.append((ev, int(hits[0]) if len(hits) else None))
        false_steps += int((alerts & ~inside).sum())
    clean_alerts = sum(int(rule(tr.loss).sum()) for tr in clean)
    clean_steps = sum(len(tr.loss) for tr in clean)

    def block(keep: Callable[[Event], bool]) -> dict[str, Any]:
        rows = [(ev, d) for ev, d in detected if keep(ev)]
        tp = sum(d is not None for _, d in rows)
        recall = tp / len(rows) if rows else math.nan
        precision = tp / (tp + false_steps) if tp + false_steps else math.nan
        delays = [d for _, d in rows if d is not None]
        return {
            "events": len(rows),
            "detected": tp,
            "recall": recall,
            "precision": precision,
            "f1": _f1(precision, recall),
            "median_delay": statistics.median(delays) if delays else None,
        }

    cat_alerted = cat_persistent = cat_transient = n_cats = 0
    for tr in cats:
        kinds: list[set[str]] = [set() for _ in range(len(tr.loss))]
        alerts = run_ours(tr.loss, kinds) if name == "ours" else rule(tr.loss)
        for ev in tr.events:
            n_cats += 1
            span = slice(ev.onset, ev.onset + ev.steps + 5)
            cat_alerted += bool(alerts[span].any())
            seen = set().union(*kinds[span])
            cat_persistent += AlertKind.PERSISTENT_INSTABILITY.value in seen
            cat_transient += AlertKind.TRANSIENT.value in seen

    return {
        "rule": name,
        "all": block(lambda ev: True),
        "ge3": block(lambda ev: ev.height >= 3.0),
        "ge3_early": block(lambda ev: ev.height >= 3.0 and ev.onset < EARLY),
        "by_height": {h: block(_height_is(h))["recall"] for h in HEIGHTS},
        "by_duration_ge3": {d: block(_ge3_lasting(d))["recall"] for d in DURATIONS},
        "false_steps_on_spike_traces": false_steps,
        "false_alarms_per_10k": 1e4 * clean_alerts / clean_steps,
        "clean_alerts": clean_alerts,
        "clean_steps": clean_steps,
        "first_update": first_update_able_to_fire(rule, np.random.default_rng(seed + 99)),
        "catapults": n_cats,
        "catapults_alerted": cat_alerted / n_cats,
        "catapults_persistent": cat_persistent / n_cats if name == "ours" else None,
        "catapults_transient": cat_transient / n_cats if name == "ours" else None,
    }


# --------------------------------------------------------------------------------------------
# Divergence: a real model warmed up past its stability limit
# --------------------------------------------------------------------------------------------

MULTIPLES = (0.5, 0.9, 1.2, 1.5, 3.0)


def divergence_run(multiple: float, seed: int, warmup: int = 200, steps: int = 400) -> dict:
    """Mini-batch SGD on least squares, lr warmed up linearly to ``multiple * 2 / lambda_max``."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(4096, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    y = x @ torch.randn(64, 1, generator=g) + 0.3 * torch.randn(4096, 1, generator=g)
    xa = torch.cat([x, torch.ones(4096, 1)], 1).double()
    lam = float(torch.linalg.eigvalsh(2.0 * xa.T @ xa / len(xa)).max())  # Hessian of the MSE
    peak = multiple * 2.0 / lam
    model = torch.nn.Linear(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=peak)
    det = InstabilityDetector()
    first: dict[str, int] = {}
    losses: list[float] = []
    prev = None
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = peak * min(1.0, (t + 1) / warmup)
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        cosine = (
            None if prev is None else float(torch.nn.functional.cosine_similarity(grad, prev, 0))
        )
        prev = grad.clone()
        value = float(loss.detach())
        losses.append(value)
        for alert in det.update(t, value, float(grad.norm()), cosine):
            first.setdefault(alert.kind.value, t)
            if alert.kind.is_instability:
                first.setdefault("ours", t)
        if not math.isfinite(value):
            break
        opt.step()
    trace = np.array(losses)
    for name in ("lightning", "llm-foundry", "olmo-core"):
        hits = np.flatnonzero(RULES[name](trace))
        if len(hits):
            first[name] = int(hits[0])
    big = np.flatnonzero(~(trace <= 10.0 * trace[0]))
    if len(big):
        first["10x_or_non_finite"] = int(big[0])
    crossing = math.ceil(warmup / multiple) - 1  # first step with lr > 2 / lambda_max
    if multiple > 1.0:
        first["lr_crosses_limit"] = crossing
    return first


def divergence_table(seeds: Sequence[int]) -> str:
    cols = [
        ("lr_crosses_limit", "lr > 2/lambda_max"),
        ("oscillation", "ours: oscillation"),
        ("persistent_instability", "ours: persistent"),
        ("ours", "ours: any"),
        ("lightning", "lightning"),
        ("llm-foundry", "llm-foundry"),
        ("olmo-core", "olmo-core"),
        ("10x_or_non_finite", "loss 10x initial or NaN"),
    ]
    lines = [
        "| peak lr / (2/lambda_max) | " + " | ".join(c for _, c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for multiple in MULTIPLES:
        runs = [divergence_run(multiple, seed) for seed in seeds]
        cells = []
        for key, _ in cols:
            steps = [r[key] for r in runs if key in r]
            if not steps:
                cells.append("-")
            else:
                cells.append(f"{statistics.median(steps):g} ({len(steps)}/{len(runs)})")
        lines.append(f"| {multiple:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def tables(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| rule set | precision | recall >=3x | F1 >=3x | recall >=3x, onset < "
        f"{EARLY} | F1 all | false alarms / 10k clean steps | median delay >=3x (steps) "
        "| first update able to fire | catapults alerted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g, a, e = r["ge3"], r["all"], r["ge3_early"]
        lines.append(
            f"| {r['rule']} | {_fmt(g['precision'])} | {_fmt(g['recall'])} | {_fmt(g['f1'])} "
            f"| {_fmt(e['recall'])} | {_fmt(a['f1'])} | {_fmt(r['false_alarms_per_10k'], '.2f')}"
            f" | {_fmt(g['median_delay'], 'g')} | {_fmt(r['first_update'], 'd')} "
            f"| {_fmt(r['catapults_alerted'], '.0%')} |"
        )
    lines += ["", "Recall by spike height (all durations):", ""]
    lines.append("| rule set | " + " | ".join(f"{h:g}x" for h in HEIGHTS) + " |")
    lines.append("|---" * (len(HEIGHTS) + 1) + "|")
    for r in results:
        cells = " | ".join(_fmt(r["by_height"][h], ".2f") for h in HEIGHTS)
        lines.append(f"| {r['rule']} | {cells} |")
    lines += ["", "Recall of spikes >= 3x by duration:", ""]
    lines.append("| rule set | " + " | ".join(f"{d} step{'s' * (d > 1)}" for d in DURATIONS) + " |")
    lines.append("|---" * (len(DURATIONS) + 1) + "|")
    for r in results:
        cells = " | ".join(_fmt(r["by_duration_ge3"][d], ".2f") for d in DURATIONS)
        lines.append(f"| {r['rule']} | {cells} |")
    ours = next((r for r in results if r["rule"] == "ours"), None)
    if ours is not None:
        lines += [
            "",
            f"Catapults (ours): {ours['catapults']} harmless catapults, "
            f"{_fmt(ours['catapults_alerted'], '.0%')} raised a spike alert, "
            f"{_fmt(ours['catapults_transient'], '.0%')} were then reported `transient`, "
            f"{_fmt(ours['catapults_persistent'], '.0%')} `persistent_instability`.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a third of the traces")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--part", choices=("all", "spikes", "divergence"), default="all")
    args = parser.parse_args(argv)
    if args.part in ("all", "spikes"):
        spikes_part(args)
    if args.part in ("all", "divergence"):
        seeds = [args.seed + i for i in range(2 if args.quick else 3)]
        print()
        print(
            "First alert step (median over seeds, and how many seeds alerted), lr warmed up "
            f"linearly over 200 steps; seeds {seeds}:"
        )
        print()
        print(divergence_table(seeds))
    return 0


def spikes_part(args: argparse.Namespace) -> None:

    rng = np.random.default_rng(args.seed)
    reps, n_clean, n_cats = (4, 50, 20) if args.quick else (12, 150, 60)
    spikes = spike_traces(rng, reps)
    clean = [Trace(clean_trace(rng)) for _ in range(n_clean)]
    cats = catapult_traces(rng, n_cats)
    n_events = sum(len(t.events) for t in spikes)
    print(
        f"{len(spikes)} spike traces ({n_events} spikes), {len(clean)} clean traces "
        f"({len(clean) * T} steps), {len(cats)} catapult traces ({2 * len(cats)} catapults), "
        f"{T} steps each; seed {args.seed}",
        flush=True,
    )
    results = []
    for name in args.rules:
        start = time.perf_counter()
        results.append(score(name, RULES[name], spikes, clean, cats, args.seed))
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print()
    print(tables(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
