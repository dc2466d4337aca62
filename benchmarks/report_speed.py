"""How long ``warmup-monitor report`` takes on a long run.

Writes (once, then reuses) a synthetic run of ``--steps`` logged steps x ``--keys`` scalars in the
monitor's key names, plus an alerts JSONL, then times:

* ``read+analyze``: ``load_run`` + ``summarize`` in this process (what the report computes);
* ``table``: the same plus printing the rich table;
* ``png+html``: drawing ``report.png`` and ``report.html``;
* ``cli``: ``warmup-monitor report DIR`` as a subprocess, Python start-up and imports included;
* with ``--compare``: TensorBoard's ``EventAccumulator`` and ``RawEventFileLoader`` on the same
  file (pure-Python checksums without TensorFlow: slow).

``--runs N`` times many runs at once instead: ``N`` run directories of ``--steps`` steps (1,000
by default there), each with 150 instability alerts in its JSONL (as a long diverging episode
writes), reported by ``warmup-monitor report ROOT --out DIR`` (the table, report.png and
report.html of all of them); ``--python`` runs that command with another interpreter and
``--pythonpath`` with another copy of the package, to time an older version on the same files.

The event file has the exact layout ``torch.utils.tensorboard.SummaryWriter.add_scalar`` writes
(``--writer summarywriter`` writes it with SummaryWriter itself, about 100 s per million records;
the default writes the same records directly).

Usage::

    .venv/bin/python benchmarks/report_speed.py                # 100,000 steps x 10 keys
    .venv/bin/python benchmarks/report_speed.py --compare      # also TensorBoard's readers
    .venv/bin/python benchmarks/report_speed.py --runs 50      # --out on 50 runs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

KEYS = (
    "lr",
    "loss",
    "loss_ratio",
    "grad_norm",
    "grad_cosine",
    "update_ratio",
    "warmup_steps",
    "alerts",
    "unstable",
    "lr_factor",
)


def _value(key: str, step: int, warmup: int) -> float:
    if key == "lr":
        return 1e-3 * min(1.0, (step + 1) / warmup)
    if key in ("loss", "loss_ratio"):
        base = 4.0 / (1.0 + step / 5000)
        return base if key == "loss" else base / 4.0
    if key == "grad_norm":
        return 1.0 + 0.5 * math.sin(step / 50)
    if key == "grad_cosine":
        return 0.3 * math.sin(step / 7)
    if key == "warmup_steps":
        return float(warmup)
    return 0.0


def write_run(path: str, steps: int, keys: int, writer: str, warmup: int = 2000) -> None:
    os.makedirs(path, exist_ok=True)
    names = [f"warmup/{k}" for k in KEYS[:keys]] + [f"warmup/extra{i}" for i in range(keys - 10)]
    if writer == "summarywriter":
        from torch.utils.tensorboard import SummaryWriter

        sw = SummaryWriter(path)
        for s in range(steps):
            for name in names:
                sw.add_scalar(name, _value(name[7:], s, warmup), s)
        sw.close()
    else:
        import google_crc32c
        from tensorboard.compat.proto import event_pb2, summary_pb2

        def masked(data: bytes) -> bytes:
            c = google_crc32c.value(data)
            return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

        out = io.BytesIO()

        def record(event: event_pb2.Event) -> None:
            data = event.SerializeToString()
            header = struct.pack("<Q", len(data))
            out.write(header + masked(header) + data + masked(data))

        now = time.time()
        record(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))
        for s in range(steps):
            for name in names:
                value = summary_pb2.Summary.Value(
                    tag=name, simple_value=_value(name[7:], s, warmup)
                )
                record(
                    event_pb2.Event(
                        wall_time=now + s * 1e-3, step=s, summary=summary_pb2.Summary(value=[value])
                    )
                )
        with open(os.path.join(path, f"events.out.tfevents.{int(now)}.bench.0.0"), "wb") as f:
            f.write(out.getvalue())
    with open(os.path.join(path, "warmup_alerts.jsonl"), "w", encoding="utf-8") as f:
        for s in range(100, steps, max(1, steps // 30)):
            alert = {"step": s, "kind": "transient", "message": "synthetic", "value": 1.0}
            f.write(json.dumps({**alert, "threshold": 2.0, "details": {}}) + "\n")


def write_runs(root: str, runs: int, steps: int, alerts: int = 150) -> None:
    """``runs`` run directories of ``steps`` steps, each with ``alerts`` loss_spike alerts."""
    for i in range(runs):
        path = os.path.join(root, f"run_{i:03d}")
        write_run(path, steps, 10, "direct", warmup=max(10, steps // 10))
        with open(os.path.join(path, "warmup_alerts.jsonl"), "w", encoding="utf-8") as f:
            start = steps // 5
            for s in range(start, min(steps, start + alerts)):
                alert = {"step": s, "kind": "loss_spike", "message": "synthetic", "value": 12.0}
                f.write(json.dumps({**alert, "threshold": 10.0, "details": {}}) + "\n")


def many_runs(args: argparse.Namespace) -> None:
    steps = args.steps if args.steps != 100_000 else 1000
    root = os.path.join(args.dir, f"runs_{args.runs}x{steps}")
    if not os.path.isdir(root):
        write_runs(root, args.runs, steps)
    out = os.path.join(args.dir, "out_many")
    script = os.path.join(os.path.dirname(sys.executable), "warmup-monitor")
    cmd = [args.python, "-m", "warmup_monitor.cli"] if args.python else [script]
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    load = os.getloadavg()

    def cli() -> None:
        shutil.rmtree(out, ignore_errors=True)
        # cwd: `python -m` would put the current directory (this checkout) before PYTHONPATH.
        done = subprocess.run(
            [*cmd, "report", root, "--out", out],
            capture_output=True,
            env=env,
            cwd=args.dir,
            check=False,
        )
        assert os.path.exists(os.path.join(out, "report.png")), done.stderr[-2000:]

    wall, cpu = timed(cli, args.repeat)
    stages: list[tuple[str, float]] = []
    if not args.pythonpath:  # in process, this checkout: where the time goes (CPU s)
        c = time.process_time()
        import matplotlib.pyplot  # noqa: F401

        from warmup_monitor.report.analysis import summarize
        from warmup_monitor.report.figure import render_png
        from warmup_monitor.report.runs import find_run_dirs, load_run

        stages.append(("import matplotlib", time.process_time() - c))
        c = time.process_time()
        data = [load_run(p) for p in find_run_dirs(root)]
        stages.append((f"read {len(data)} runs", time.process_time() - c))
        c = time.process_time()
        summaries = [summarize(d) for d in data]
        stages.append(("summaries", time.process_time() - c))
        c = time.process_time()
        render_png(data, summaries)
        stages.append(("report.png", time.process_time() - c))
    print(
        f"\n{args.runs} runs x {steps} steps x 10 keys, 150 alerts each; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
        f"load average before: {load[0]:.1f}\n"
    )

    probe = "import warmup_monitor; print(warmup_monitor.__file__)"
    where = subprocess.run(
        [args.python or sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=args.dir,
        check=False,
    ).stdout.strip()
    print(f"package timed: {where}\n")
    print("| what | wall s | CPU s |\n|---|---|---|")
    print(f"| `warmup-monitor report ROOT --out DIR` ({args.runs} runs) | {wall:.2f} | {cpu:.2f} |")
    for name, seconds in stages:
        print(f"| in process: {name} | | {seconds:.2f} |")


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process and its children) of ``fn``."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(_cpu() - c)
    return statistics.median(walls), statistics.median(cpus)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "wm_report_bench"))
    parser.add_argument("--writer", choices=("direct", "summarywriter"), default="direct")
    parser.add_argument("--compare", action="store_true", help="also time TensorBoard's readers")
    parser.add_argument("--runs", type=int, default=0, help="time --out on this many runs")
    parser.add_argument("--python", default="", help="with --runs: the interpreter to time")
    parser.add_argument("--pythonpath", default="", help="with --runs: PYTHONPATH for it")
    args = parser.parse_args()
    if args.runs:
        many_runs(args)
        return

    run = os.path.join(args.dir, f"run_{args.steps}x{args.keys}_{args.writer}")
    if not os.path.isdir(run):
        t = time.perf_counter()
        write_run(run, args.steps, args.keys, args.writer)
        print(f"wrote {run} in {time.perf_counter() - t:.1f} s")
    size = sum(os.path.getsize(os.path.join(run, f)) for f in os.listdir(run))

    from rich.console import Console

    from warmup_monitor.report.analysis import summarize
    from warmup_monitor.report.events import FAST_CRC
    from warmup_monitor.report.figure import render_png
    from warmup_monitor.report.render import print_report, render_html
    from warmup_monitor.report.runs import load_run

    data = load_run(run)
    assert len(data.series["loss"]) == args.steps, "not every step was read"
    summary = summarize(data)

    def table() -> None:
        print_report([summarize(load_run(run))], Console(file=io.StringIO(), width=160))

    def pictures() -> None:
        render_html([summary], render_png([data], [summary]))

    script = os.path.join(os.path.dirname(sys.executable), "warmup-monitor")
    load = os.getloadavg()
    rows = [
        ("read+analyze", timed(lambda: summarize(load_run(run)), args.repeat)),
        ("read+analyze+table", timed(table, args.repeat)),
        ("png+html", timed(pictures, args.repeat)),
        (
            "cli (subprocess, start-up included)",
            timed(
                lambda: subprocess.run([script, "report", run], capture_output=True), args.repeat
            ),
        ),
        (
            "cli --out (subprocess)",
            timed(
                lambda: subprocess.run(
                    [script, "report", run, "--out", os.path.join(args.dir, "out")],
                    capture_output=True,
                ),
                args.repeat,
            ),
        ),
    ]
    if args.compare:
        from tensorboard.backend.event_processing import event_file_loader
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        def accumulator() -> None:
            EventAccumulator(run, size_guidance={"scalars": 0}).Reload()

        def raw_loader() -> None:
            for f in os.listdir(run):
                if "tfevents" in f:
                    for _ in event_file_loader.RawEventFileLoader(os.path.join(run, f)).Load():
                        pass

        rows.append(("tensorboard EventAccumulator", timed(accumulator, 1)))
        rows.append(("tensorboard RawEventFileLoader (framing only)", timed(raw_loader, 1)))

    print(
        f"\n{args.steps:,} steps x {args.keys} keys = {args.steps * args.keys:,} records, "
        f"{size / 2**20:.1f} MiB; crc32c in C: {FAST_CRC}; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print(f"load average before: {load[0]:.1f} (1 min)\n")
    print("| what | wall s | CPU s |\n|---|---|---|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
