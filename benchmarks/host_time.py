"""Host time the monitor spends per optimizer step, inside its own code, on a small model.

On a model of about 100k parameters the gradient maths is cheap and the monitor's fixed cost
per step (Python in its hooks, the optimizer step hook, host reads) is what shows. This trains
a small GRU language model (about 100k parameters, real Lightning ``Trainer``, CPU, one
thread) with the monitor watching every step, and times every call into the monitor: the
callback's hooks and the engine's entry points, counting only the outermost call when they
nest (so the engine's own step hook inside ``optimizer.step`` is counted once).

Two settings: logging every step (``log_every_n_steps=1``) and quiet steps
(``log_every_n_steps=10`` with ``check_every_n_steps=10``: no host read on 9 steps of 10).
Each run is its own process; runs alternate between the settings (and between code trees with
``--tree``), and the figure is the median over ``--reps`` runs.

``--layers`` runs each setting of this tree twice, with per-group statistics off and on
(``Statistics(layers="auto")``: 3 groups on the GRU model); ``--model mlp200`` trains a
200-layer MLP instead (``nn.Sequential`` of 200 ``Linear(64, 64)`` + tanh: 200 groups).

    python benchmarks/host_time.py                      # this tree
    python benchmarks/host_time.py --tree old=/tmp/old  # and another checkout, interleaved
    python benchmarks/host_time.py --layers --model mlp200

Works against the flat-keyword API of 0.1 too (``--tree`` of an older checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_models import MODELS  # the benchmark models, as script source

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = (
    r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import torch, pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
log_every, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
layers, model_name = sys.argv[4], sys.argv[5]
import warmup_monitor.callback as cb, warmup_monitor.engine as en
spent = [0.0]; depth = [0]; calls = [0]

def timed(f):
    def wrapper(*a, **k):
        if depth[0]:
            return f(*a, **k)
        depth[0] += 1; calls[0] += 1; t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0; depth[0] -= 1
    return wrapper

for name, f in list(vars(cb.WarmupMonitor).items()):
    if callable(f) and name.startswith("on_"):
        setattr(cb.WarmupMonitor, name, timed(f))
for name in ("before_step", "add_loss", "end_batch", "after_step", "_complete", "flush"):
    if hasattr(en.MonitorEngine, name):
        setattr(en.MonitorEngine, name, timed(getattr(en.MonitorEngine, name)))

"""
    + MODELS
    + r"""
Model, loader = model_and_loader(model_name, steps)
n_params = sum(p.numel() for p in Model().parameters())
try:
    from warmup_monitor import Window
    extra = {}
    if layers != "off":
        from warmup_monitor import Statistics
        extra["statistics"] = Statistics(layers=layers)
    monitor = cb.WarmupMonitor(warmup_steps=steps, window=Window(
        log_every_n_steps=log_every, check_every_n_steps=log_every, post_warmup_steps=0), **extra)
except ImportError:  # the flat keywords of 0.1
    monitor = cb.WarmupMonitor(warmup_steps=steps, log_every_n_steps=log_every,
                               check_every_n_steps=log_every, post_warmup_steps=0)
trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[monitor],
                     logger=pl.loggers.TensorBoardLogger(out, name="", version=""),
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, log_every_n_steps=50)
t0 = time.perf_counter()
trainer.fit(Model(), loader)
fit = time.perf_counter() - t0
print(json.dumps({"params": n_params, "host_s": spent[0], "fit_s": fit, "steps": steps}))
"""
)


def run(
    tree: str, log_every: int, steps: int, out: str, layers: str = "off", model: str = "gru"
) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=tree, PL_DISABLE_FORK="1")
    cmd = [sys.executable, "-c", RUN, str(log_every), str(steps), out, layers, model]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a checkout")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="/tmp/host_time_runs")
    parser.add_argument("--layers", action="store_true", help="per-group statistics off and on")
    parser.add_argument("--model", choices=["gru", "mlp200"], default="gru")
    args = parser.parse_args(argv)
    trees = {"this": HERE, **dict(t.split("=", 1) for t in args.tree)}
    settings = [
        (name, log_every, layers)
        for name in trees
        for log_every in (1, 10)
        for layers in (("off", "auto") if args.layers and name == "this" else ("off",))
    ]
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for rep in range(args.reps):  # interleaved: every setting once per repetition, rotated
        shift = rep % len(settings)
        for name, log_every, layers in settings[shift:] + settings[:shift]:
            out = os.path.join(args.out, f"{name}-{log_every}-{layers}-{rep}")
            results.setdefault((name, log_every, layers), []).append(
                run(trees[name], log_every, args.steps, out, layers, args.model)
            )
    first = results[settings[0]][0]
    print(f"{args.model}: {first['params']:,} parameters, {args.steps} steps")
    print(
        "| code | logging | per-group | monitor host ms / step | fit ms / step "
        "| share of the step |"
    )
    print("|---|---|---|---|---|---|")
    for (name, log_every, layers), runs in sorted(results.items()):
        host = statistics.median(r["host_s"] / r["steps"] * 1e3 for r in runs)
        fit = statistics.median(r["fit_s"] / r["steps"] * 1e3 for r in runs)
        label = "every step" if log_every == 1 else "every 10th (quiet steps)"
        print(f"| {name} | {label} | {layers} | {host:.3f} | {fit:.1f} | {host / fit:.1%} |")
    print(f"({args.reps} runs each, median; {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
