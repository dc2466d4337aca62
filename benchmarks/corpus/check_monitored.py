"""Re-train the corpus's healthy runs with the monitor attached: does it change them?

For every healthy run of a split (default: report), two real trainings with
:class:`warmup_monitor.loop.LoopMonitor` in the loop (``build.train(spec, hook=...)``):

- **watch only** (``adaptive=False``): the loss trace must be bit-identical to the stored,
  unmonitored one;
- **adaptive, the defaults** (``adaptive=True``): whether the controller acted, and the final
  loss (mean of the last 5 % of steps) against the unmonitored run's.

Usage::

    python benchmarks/corpus/check_monitored.py [--split report] [--json PATH] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import _worker_init, train
from labels import final_loss
from traces import load_corpus

from warmup_monitor.alerts import ACTION_KINDS
from warmup_monitor.loop import LoopMonitor


def monitored(run: Any, adaptive: bool) -> tuple[np.ndarray, list[str]]:
    """Train ``run`` again with a LoopMonitor; the loss trace and the kinds of its actions."""
    seen: list[str] = []

    def make(optimizer: Any, model: Any) -> LoopMonitor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "rollback needs model=" in a plain loop
            return LoopMonitor(
                optimizer,
                warmup_steps=max(run.warmup_steps, 1),
                adaptive=adaptive,
                on_alert=lambda a: seen.append(a.kind_name),
            )

    trace = train(run.record, hook=make)
    actions = [k for k in seen if k in {a.value for a in ACTION_KINDS} and k != "episode_end"]
    return np.asarray(trace["loss"]), actions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--split", choices=["calibrate", "report", "both"], default="report")
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    logging.getLogger("warmup_monitor").setLevel(logging.ERROR)
    _worker_init()  # one thread, as the corpus was built: the same reductions, bit for bit
    runs = [
        r
        for r in load_corpus()
        if r.label == "healthy" and (args.split == "both" or r.split == args.split)
    ][: args.limit]
    t0 = time.perf_counter()
    rows = []
    for r in runs:
        stored = np.asarray(r.loss)
        watch, _ = monitored(r, adaptive=False)
        adapt, actions = monitored(r, adaptive=True)
        base = final_loss(stored, r.steps, r.diverged)
        fin = final_loss(adapt, r.steps, not np.all(np.isfinite(adapt)))
        rows.append(
            {
                "id": r.id,
                "watch_identical": bool(
                    watch.shape == stored.shape and np.array_equal(watch, stored)
                ),
                "actions": actions,
                "final_loss": base,
                "adaptive_final_loss": fin,
                "change": (fin / base - 1.0) if math.isfinite(fin) and base > 0 else math.inf,
            }
        )
    n = len(rows)
    identical = sum(x["watch_identical"] for x in rows)
    quiet = sum(not x["actions"] for x in rows)
    worst = max((x["change"] for x in rows), default=0.0)
    print(f"healthy runs ({args.split} split): {n}")
    print(f"watch only, bit-identical to the unmonitored run: {identical} of {n}")
    print(f"adaptive (defaults), no controller action: {quiet} of {n} ({quiet / max(n, 1):.1%})")
    print(f"adaptive, worst final-loss change against the unmonitored run: {worst:+.2%}")
    for x in rows:
        if x["actions"] or not x["watch_identical"] or x["change"] > 0.01:
            print(f"  {x['id']}: actions {x['actions']}, change {x['change']:+.2%}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
