"""Overhead of WarmupMonitor's gradient statistics: against the floor, Lightning, and end to end.

Two parts (``--part micro|e2e|all``):

* ``micro``: the hook micro-benchmark. For synthetic models of about 1M, 10M and 50M parameters,
  each in 10, 200 and 2,000 tensors (half matrices, half vectors), a real ``Trainer`` fits a
  ``LightningModule`` holding those parameters (loss ``0.5 * sum(p**2)``: the gradients are the
  parameters, SGD with lr 0 keeps them). Inside the module's real ``on_before_optimizer_step``
  every method is timed on the same gradients, in rounds, the order rotating from round to
  round:

  - ``floor``: ``torch._foreach_copy_`` of the gradients into preallocated tensors (the list of
    ``p.grad`` built in the call, as every method must);
  - ``exact`` / ``sketch``: ``GradientStats(cosine=...)``: ``finish(local_sums())`` and the one
    batched ``.tolist()`` of a logging step (norm and cosine);
  - ``update``: ``UpdateRatio``: ``snapshot()`` and ``local_sums()`` (one parameter copy and one
    difference pass; paid on logging steps only);
  - ``lightning``: ``self.log_dict(grad_norm(self, norm_type=2))``, the monitor a user would
    otherwise write (Lightning's docs put it in this hook), and ``grad_norm`` alone.

  Ratios are per round (each method over the floor timed in the same round), summarised by the
  median and the 25th-75th percentiles over all rounds.

* ``e2e``: interleaved paired runs of ``examples/char_transformer.py`` (its default model and
  data, ``--max-steps`` steps, no validation): bare (``--no-monitor``) and with WarmupMonitor
  with everything on and logging every step (``log_every_n_steps=1``, update ratio, alerts
  file, TensorBoard), cosine ``exact`` and ``sketch``. Each run is its own process, the script
  run unchanged under a small wrapper that reports the exact ``Trainer.fit`` time, the time
  spent inside the monitor's own hooks, and the process's peak RSS. Also: the median per-step
  time from the TensorBoard event timestamps of ``train/loss``; peak RSS of one run per variant
  on a wider model (``--mem-d-model``), where the buffers stand out; the exact byte counts of
  the monitor's buffers.

* ``layers``: the cost of per-group statistics (``Statistics(layers="auto")``), end to end, on
  two models that are not the example: the small GRU language model of
  ``benchmarks/host_time.py`` (about 100k parameters; 3 groups) and a 200-layer MLP
  (``nn.Sequential`` of 200 ``Linear(64, 64)`` + tanh, 832k parameters; 200 groups), AdamW,
  a real ``Trainer`` with a ``TensorBoardLogger``. Three variants, each its own process, in
  rotated order within each repetition: ``bare`` (no monitor), ``off`` (the monitor, logging
  every step, per-group statistics off) and ``on`` (the same with them on); ``--layers-every``
  sets the monitor's ``log_every_n_steps`` (and ``check_every_n_steps``). The figures are the
  ``Trainer.fit`` wall time and the process's CPU time over that fit (every thread of the
  process, TensorBoard's writer thread included; far less disturbed by other jobs than the wall
  time) over bare's, per repetition, as median [25th-75th percentile].

Timings use ``--threads`` intra-op threads (default 1: on a shared machine spinning OpenMP
threads make timings erratic; memory-bound passes gain little from a second thread anyway).

Usage::

    .venv/bin/python benchmarks/overhead.py            # both parts, about 8 minutes
    .venv/bin/python benchmarks/overhead.py --quick    # fewer rounds and pairs, about 3 minutes
    .venv/bin/python benchmarks/overhead.py --part micro --json out.json
    .venv/bin/python benchmarks/overhead.py --part layers --pairs 7 --steps 300
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_models import MODELS  # the benchmark models, as script source

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "char_transformer.py"
SIZES = [1_000_000, 10_000_000, 50_000_000]
COUNTS = [10, 200, 2000]
METHODS = ["floor", "exact", "sketch", "off", "update", "grad_norm", "lightning"]
#: Calls per method and round; a round keeps the fastest (the least disturbed by other processes).
INNER = 3


# --------------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------------


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def fmt_ratio(values: list[float], digits: int = 2) -> str:
    lo, med, hi = quantiles(values)
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_speedup(values: list[float]) -> str:
    lo, med, hi = quantiles(values)
    f = (lambda v: f"{v:,.0f}") if lo >= 10 else (lambda v: f"{v:.2g}")
    return f"{f(med)}x [{f(lo)}-{f(hi)}]"


# --------------------------------------------------------------------------------------------
# Micro-benchmark
# --------------------------------------------------------------------------------------------


def synthetic_shapes(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    """``n_tensors / 2`` matrices ``(r, c)`` each followed by a vector ``(c,)``: ~``n_params``."""
    pairs = n_tensors // 2
    per = n_params // pairs
    c = max(1, round(per**0.5))
    r = max(1, (per - c) // c)
    shapes: list[tuple[int, ...]] = []
    for _ in range(pairs):
        shapes += [(r, c), (c,)]
    return shapes


def micro_config(
    n_params: int, n_tensors: int, rounds: int, lightning_rounds: int
) -> dict[str, Any]:
    """Fit a real Trainer whose on_before_optimizer_step times every method; return the ratios."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import grad_norm
    from torch.utils.data import DataLoader, TensorDataset

    from warmup_monitor.stats import GradientStats, UpdateRatio

    shapes = synthetic_shapes(n_params, n_tensors)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    measured_steps = 2
    per_step = -(-rounds // measured_steps)

    class Synthetic(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return 0.5 * sum((p * p).sum() for p in self.weights)  # type: ignore[return-value]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def on_fit_start(self) -> None:
            params = list(self.parameters())
            self.params_ = params
            self.floor_out = [torch.empty_like(p) for p in params]
            self.stats = {
                mode: GradientStats(params, cosine=mode) for mode in ("exact", "sketch", "off")
            }
            self.update = UpdateRatio(params)

        def method(self, name: str) -> Callable[[], Any]:
            if name == "floor":
                return lambda: torch._foreach_copy_(self.floor_out, [p.grad for p in self.params_])
            if name in self.stats:
                stats = self.stats[name]
                return lambda: stats.finish(stats.local_sums()).tolist()
            if name == "update":

                def update() -> Any:
                    self.update.snapshot()
                    return UpdateRatio.finish(self.update.local_sums()).tolist()  # type: ignore[arg-type]

                return update
            if name == "grad_norm":
                return lambda: grad_norm(self, norm_type=2)
            return lambda: self.log_dict(grad_norm(self, norm_type=2))

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            fns = {m: self.method(m) for m in METHODS}
            if self.global_step == 0:  # warm-up: buffers, plans, allocator
                for f in fns.values():
                    f()
                return
            for r in range(per_step):
                k = r + self.global_step
                order = METHODS[k % len(METHODS) :] + METHODS[: k % len(METHODS)]
                for name in order:
                    slow = name in ("grad_norm", "lightning")
                    if slow and len(times[name]) >= lightning_rounds:
                        continue
                    best = math.inf
                    for _ in range(1 if slow else INNER):
                        t0 = time.perf_counter()
                        fns[name]()
                        best = min(best, time.perf_counter() - t0)
                    times[name].append(best)

    trainer = pl.Trainer(
        max_steps=1 + measured_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Synthetic(), DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1))

    # Paired ratios: each method over the floor of the same round (for Lightning: its rounds).
    floors = times["floor"]
    out: dict[str, Any] = {
        "params": sum(int(torch.Size(s).numel()) for s in shapes),
        "tensors": len(shapes),
        "rounds": len(floors),
        "floor_ms": statistics.median(floors) * 1e3,
    }
    for m in ("exact", "sketch", "off", "update", "grad_norm", "lightning"):
        n = len(times[m])
        out[m] = [t / f for t, f in zip(times[m], floors[:n], strict=True)]
    exact_ms = times["exact"][: len(times["lightning"])]
    out["lightning_over_exact"] = [t / e for t, e in zip(times["lightning"], exact_ms, strict=True)]
    out["grad_norm_over_off"] = [
        t / e for t, e in zip(times["grad_norm"], times["off"], strict=False)
    ]
    del trainer
    gc.collect()
    return out


def run_micro(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    sizes = SIZES if not args.sizes else [int(float(s)) for s in args.sizes]
    for n_params in sizes:
        for n_tensors in COUNTS:
            rounds = args.rounds or (
                (6 if args.quick else 12) if n_params > 10**7 else (10 if args.quick else 30)
            )
            lightning_rounds = 3 if n_tensors >= 2000 or args.quick else min(rounds, 8)
            t0 = time.perf_counter()
            row = micro_config(n_params, n_tensors, rounds, lightning_rounds)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(micro_line(row), flush=True)
    return rows


MICRO_HEADER = (
    "| params | tensors | rounds | exact / floor | sketch / floor | off / floor "
    "| update ratio / floor | grad_norm+log_dict / exact | grad_norm / off |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def micro_line(row: dict[str, Any]) -> str:
    return (
        f"| {row['params'] / 1e6:.1f}M | {row['tensors']} | {row['rounds']} "
        f"| {fmt_ratio(row['exact'])} | {fmt_ratio(row['sketch'])} | {fmt_ratio(row['off'])} "
        f"| {fmt_ratio(row['update'])} "
        f"| {fmt_speedup(row['lightning_over_exact'])} (n={len(row['lightning'])}) "
        f"| {fmt_speedup(row['grad_norm_over_off'])} |"
    )


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

MONITOR_KWARGS = {"window": {"log_every_n_steps": 1, "post_warmup_steps": -1}}


#: Runs the example script (``sys.argv[1:]``) and reports, at exit: the exact ``Trainer.fit``
#: time, the time spent inside WarmupMonitor's own hooks, and the process's peak RSS (VmHWM of
#: its own address space: ``wait4``'s ``ru_maxrss`` would also count the parent's memory image
#: inherited by ``fork``).
RUNNER = """
import atexit, runpy, sys, time
sys.argv = sys.argv[1:]
spent = {"fit": 0.0, "hooks": 0.0}

def timed(f, key):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0
    return wrapper

import pytorch_lightning as pl
pl.Trainer.fit = timed(pl.Trainer.fit, "fit")
import warmup_monitor.callback as cb
for name, f in list(vars(cb.WarmupMonitor).items()):
    if callable(f) and (name.startswith("on_") or name in ("setup", "teardown")):
        setattr(cb.WarmupMonitor, name, timed(f, "hooks"))

def report():
    print(f"fit seconds: {spent['fit']:.6f}")
    print(f"monitor hook seconds: {spent['hooks']:.6f}")
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                print(f"peak rss kib: {line.split()[1]}")
    sys.stdout.flush()

atexit.register(report)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_example(
    variant: str, args: argparse.Namespace, log_dir: str, tag: str, extra: list[str] | None = None
) -> dict[str, Any]:
    steps = args.steps if extra is None else 3
    cmd = [
        sys.executable, "-c", RUNNER,
        str(EXAMPLE),
        "--max-steps", str(steps),
        "--val-every", str(10 * steps),
        "--threads", str(args.threads),
        "--quiet",
        "--log-dir", log_dir,
        "--run-name", tag,
        *(extra or []),
    ]  # fmt: skip
    if variant == "bare":
        cmd.append("--no-monitor")
    else:
        kwargs = {**MONITOR_KWARGS, "statistics": {"cosine": variant}}
        cmd += ["--monitor-kwargs", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({proc.returncode}):\n{output[-3000:]}")
    found = {
        key: re.search(pattern, output)
        for key, pattern in {
            "fit": r"fit seconds: ([\d.]+)",
            "hooks": r"monitor hook seconds: ([\d.]+)",
            "rss": r"peak rss kib: (\d+)",
            "run_dir": r"run dir: (\S+)",
        }.items()
    }
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"no {missing} in the output of {' '.join(cmd[3:])}:\n{output[-3000:]}")
    fit_s = float(found["fit"].group(1))  # type: ignore[union-attr]
    return {
        "variant": variant,
        "fit_s": fit_s,
        "hooks_fraction": float(found["hooks"].group(1)) / fit_s,  # type: ignore[union-attr]
        "step_s": median_step_seconds(found["run_dir"].group(1)),  # type: ignore[union-attr]
        "peak_rss_mib": int(found["rss"].group(1)) / 1024,  # type: ignore[union-attr]
    }


def median_step_seconds(run_dir: str) -> float:
    """Median wall time between consecutive ``train/loss`` events (first two steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted(acc.Scalars("train/loss"), key=lambda e: e.step)
    walls = [e.wall_time for e in events][2:]
    gaps = [b - a for a, b in itertools.pairwise(walls)]
    return statistics.median(gaps) if gaps else float("nan")


def buffer_bytes(d_model: int | None) -> dict[str, float]:
    """The monitor's buffers for the example's model of width ``d_model``, in MiB and as
    fractions of its gradients."""
    import importlib.util

    from warmup_monitor.stats import GradientStats, UpdateRatio

    spec = importlib.util.spec_from_file_location("char_transformer_bench", EXAMPLE)
    assert spec is not None and spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ex
    spec.loader.exec_module(ex)
    d = ex.COMMON_DEFAULTS
    heads = d["n_heads"] if d_model is None else 8
    d_model = d_model or d["d_model"]
    model = ex.CharTransformer(100, d["seq_len"], d_model, d["n_layers"], heads)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    out: dict[str, float] = {"params": sum(p.numel() for p in params)}
    for mode in ("exact", "sketch"):
        stats = GradientStats(params, cosine=mode)  # type: ignore[arg-type]
        stats.local_sums()
        out[f"{mode}_fraction"] = stats.memory_bytes / stats.grad_bytes
        out["grad_mib"] = stats.grad_bytes / 2**20
    upd = UpdateRatio(params)
    upd.snapshot()
    out["update_fraction"] = upd.memory_bytes / out["grad_mib"] / 2**20
    out["d_model"] = d_model
    return out


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    variants = ["bare", "exact", "sketch"]
    runs: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as log_dir:
        # Peak memory on a wider model, where the monitor's buffers are not lost in the noise.
        wide = ["--d-model", str(args.mem_d_model), "--n-heads", "8", "--batch-size", "4"]
        for v in ["bare", "off", *variants[1:]]:
            run = run_example(v, args, log_dir, f"mem-{v}", extra=wide)
            memory.append(run)
            rss = run["peak_rss_mib"]
            print(f"  memory, d_model {args.mem_d_model}: {v:6s} peak RSS {rss:.0f} MiB")
        for rep in range(args.pairs):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                run = run_example(v, args, log_dir, f"{v}{rep}")
                run["rep"] = rep
                runs.append(run)
                print(
                    f"  pair {rep} {v:6s} fit {run['fit_s']:.3f} s, median step "
                    f"{run['step_s'] * 1e3:.1f} ms, in monitor hooks "
                    f"{100 * run['hooks_fraction']:.2f} %, peak RSS {run['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    result: dict[str, Any] = {
        "runs": runs,
        "variants": variants,
        "memory": memory,
        "buffers": buffer_bytes(None),
        "wide_buffers": buffer_bytes(args.mem_d_model),
    }
    by = {(r["rep"], r["variant"]): r for r in runs}
    for v in variants[1:]:
        result[v] = {
            key: [by[(i, v)][key] / by[(i, "bare")][key] for i in range(args.pairs)]
            for key in ("fit_s", "step_s")
        }
        result[v]["hooks_fraction"] = [by[(i, v)]["hooks_fraction"] for i in range(args.pairs)]
        result[v]["rss_delta_mib"] = [
            by[(i, v)]["peak_rss_mib"] - by[(i, "bare")]["peak_rss_mib"] for i in range(args.pairs)
        ]
    return result


def print_e2e(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nEnd to end: {args.pairs} interleaved pairs x {args.steps} steps, "
        f"{args.threads} thread(s)"
    )
    print(
        "| variant | fit time / bare | median step / bare | time in the monitor's hooks "
        "/ fit time | peak RSS - bare (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for v in result["variants"][1:]:
        r = result[v]
        hooks = [100 * x for x in r["hooks_fraction"]]
        print(
            f"| monitor, cosine={v} | {fmt_ratio(r['fit_s'], 3)} | {fmt_ratio(r['step_s'], 3)} "
            f"| {fmt_ratio(hooks, 2)} % | {fmt_ratio(r['rss_delta_mib'], 1)} |"
        )
    for key in ("buffers", "wide_buffers"):
        b = result[key]
        print(
            f"Buffers, d_model {b['d_model']} ({b['params'] / 1e6:.2f}M parameters, "
            f"{b['grad_mib']:.1f} MiB of gradients): exact reference {b['exact_fraction']:.1%}, "
            f"sketch {b['sketch_fraction']:.2%}, update-ratio snapshot "
            f"{b['update_fraction']:.1%} of the gradients' bytes."
        )
    bare = next(r for r in result["memory"] if r["variant"] == "bare")["peak_rss_mib"]
    print(f"\nPeak RSS, d_model {args.mem_d_model}, 3 steps, one run each (bare {bare:.0f} MiB):")
    print("| monitor (update ratio on) | peak RSS - bare (MiB) |\n|---|---:|")
    for r in result["memory"]:
        if r["variant"] != "bare":
            print(f"| cosine={r['variant']} | {r['peak_rss_mib'] - bare:+.0f} |")


# --------------------------------------------------------------------------------------------
# Per-group statistics, end to end
# --------------------------------------------------------------------------------------------

LAYERS_RUN = (
    r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import torch, pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(int(sys.argv[5]))
model_name, variant, out = sys.argv[1], sys.argv[2], sys.argv[6]
steps, every = int(sys.argv[3]), int(sys.argv[4])

"""
    + MODELS
    + r"""
Model, loader = model_and_loader(model_name, steps)
model = Model()
callbacks = []
if variant != "bare":
    from warmup_monitor import Statistics, WarmupMonitor, Window
    callbacks.append(WarmupMonitor(
        warmup_steps=steps,
        window=Window(log_every_n_steps=every, check_every_n_steps=every, post_warmup_steps=0),
        statistics=Statistics(layers="auto" if variant == "on" else "off")))
trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks,
                     logger=pl.loggers.TensorBoardLogger(out, name="", version=""),
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, log_every_n_steps=50)
t0, c0 = time.perf_counter(), time.process_time()
trainer.fit(model, loader)
print(json.dumps({"fit_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "steps": steps}))
"""
)
LAYER_VARIANTS = ["bare", "off", "on"]
LAYER_MODELS = ["gru", "mlp200"]


def run_layers(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PL_DISABLE_FORK="1")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for rep in range(args.pairs):
            shift = rep % len(LAYER_VARIANTS)
            for model in LAYER_MODELS:
                for v in LAYER_VARIANTS[shift:] + LAYER_VARIANTS[:shift]:
                    out = os.path.join(log_dir, f"{model}-{v}-{rep}")
                    cmd = [sys.executable, "-c", LAYERS_RUN, model, v, str(args.steps),
                           str(args.layers_every), str(args.threads), out]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    run.update(model=model, variant=v, rep=rep)
                    runs.append(run)
                    ms = run["fit_s"] / run["steps"] * 1e3
                    print(f"  rep {rep} {model:6s} {v:4s} {ms:.2f} ms / step", flush=True)
    result: dict[str, Any] = {"runs": runs, "ratios": {}, "cpu_ratios": {}}
    for key, out in (("fit_s", result["ratios"]), ("cpu_s", result["cpu_ratios"])):
        by = {(r["rep"], r["model"], r["variant"]): r[key] for r in runs}
        for model in LAYER_MODELS:
            for v, base in (("off", "bare"), ("on", "bare"), ("on", "off")):
                out[f"{model} {v}/{base}"] = [
                    by[(i, model, v)] / by[(i, model, base)] for i in range(args.pairs)
                ]
    return result


def print_layers(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nPer-group statistics, end to end: {args.pairs} interleaved repetitions x "
        f"{args.steps} steps, logging every {args.layers_every} step(s), {args.threads} "
        "thread(s); Trainer.fit time ratio, median [25th-75th percentile]"
    )
    print("| model | time | bare ms / step | monitor, layers off / bare | layers on / bare "
          "| layers on / off |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for model in LAYER_MODELS:
        for key, label, r in (("fit_s", "wall", result["ratios"]),
                              ("cpu_s", "CPU", result["cpu_ratios"])):  # fmt: skip
            bare = [x[key] / x["steps"] * 1e3 for x in result["runs"]
                    if x["model"] == model and x["variant"] == "bare"]  # fmt: skip
            print(
                f"| {model} | {label} | {statistics.median(bare):.2f} "
                f"| {fmt_ratio(r[f'{model} off/bare'], 3)} "
                f"| {fmt_ratio(r[f'{model} on/bare'], 3)} | {fmt_ratio(r[f'{model} on/off'], 3)} |"
            )


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arg = parser.add_argument
    arg("--part", choices=("all", "micro", "e2e", "host", "layers"), default="all")
    arg("--tree", action="append", default=[], help="host: NAME=PATH of another checkout")
    arg("--quick", action="store_true", help="fewer rounds and pairs (about 3 minutes)")
    arg("--threads", type=int, default=1, help="torch intra-op threads")
    arg("--rounds", type=int, default=None, help="micro: timing rounds per configuration")
    arg("--sizes", nargs="*", help="micro: parameter counts (default 1e6 1e7 5e7)")
    arg("--pairs", type=int, default=None, help="e2e: interleaved repetitions")
    arg("--steps", type=int, default=None, help="e2e: optimizer steps per run")
    arg("--mem-d-model", type=int, default=512, help="e2e: model width of the memory runs")
    arg("--layers-every", type=int, default=1, help="layers: log_every_n_steps")
    arg("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = 2 if args.quick else 7
    if args.steps is None:
        args.steps = 8 if args.quick else 15
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # Lightning's banners and tips, at every Trainer
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    results: dict[str, Any] = {"threads": args.threads, "quick": args.quick}
    start = time.perf_counter()
    if args.part in ("all", "micro"):
        print("Hook micro-benchmark: ratio to the floor (median [25th-75th percentile])")
        print(MICRO_HEADER)
        results["micro"] = run_micro(args)
    if args.part == "host":
        # The monitor's host time per step on a ~100k-parameter model (benchmarks/host_time.py).
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import host_time

        return host_time.main([f"--tree={t}" for t in args.tree] + ["--steps", "200"])
    if args.part == "layers":
        print("\nPer-group statistics (each line one run):")
        results["layers"] = run_layers(args)
        print_layers(results["layers"], args)
    if args.part in ("all", "e2e"):
        print("\nEnd to end (each line one run):")
        results["e2e"] = run_e2e(args)
        print_e2e(results["e2e"], args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
