"""Regenerate the report's pictures and ``docs/tb_plugin.png`` from the demo's runs, and the
per-group heatmaps ``docs/layers.png`` and ``docs/tb_layers.png`` from one Post-LN cell.

Run after ``make demo`` (``make docs-images`` does both steps' second half)::

    .venv/bin/python docs/make_images.py runs/demo

The demo trains two arms of ``benchmarks/adaptive_warmup.py``'s demo cell (the residual CNN at
peak lr 0.4, seed 2) into ``LOGDIR/<arm>/version_0``: ``short`` (a fixed 10-step warmup) and
``rollback`` (the adaptive defaults). This script trains two more arms of the same cell when
they are missing, ``long`` (a fixed 100-step warmup) and ``adaptive`` (adaptive, no rollback),
about half a minute on two cores. Then:

- ``report.png``: ``warmup-monitor report`` over the demo's two runs (overlaid);
- ``report_overlay.png``: the four arms overlaid;
- ``report_extended.png``: the ``rollback`` run alone, whose warmup was extended twice;
- ``tb_plugin.png``: a headless-Chromium screenshot of the Warmup tab of a real
  ``tensorboard --logdir LOGDIR`` on 127.0.0.1, the first run selected and the others overlaid
  through the tab's deep link; it needs Debian's ``chromium`` (skipped, with a message,
  without it).

With ``--cells DIR`` (default ``runs/cells``, skipped when absent), the runs of
``benchmarks/adaptive_warmup.py --cell post_ln:0.01:short:0 --cell post_ln:0.01:long:0
--cell-dir runs/cells`` give ``layers.png`` (the report's heatmaps) and ``tb_layers.png`` (the
Warmup tab on the short run, cut to its heatmaps).

A PNG over 300 KB is written with a 256-colour palette (Pillow), which keeps each under it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from warmup_monitor.cli import main as report_main
from warmup_monitor.report.runs import find_run_dirs

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The demo cell's arms in the overlay, in this order; the demo itself trains the first two.
DEMO_ARMS = ("short", "rollback")
MORE_ARMS = ("long", "adaptive")


#: A picture over this many bytes is written with a 256-colour palette.
MAX_BYTES = 300 * 1024


def small_png(src: str, out: str) -> None:
    """``src`` copied to ``out``; over :data:`MAX_BYTES`, with a 256-colour palette instead
    (the line plots keep their look at a third of the bytes; the heatmaps, small already,
    keep their smooth colour scales)."""
    if os.path.getsize(src) <= MAX_BYTES:
        shutil.copyfile(src, out)
        return
    from PIL import Image

    with Image.open(src) as image:
        image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)


def report_png(runs: str | list[str], out: str, picture: str = "report.png") -> None:
    """``warmup-monitor report RUNS --out``'s ``picture``, copied to ``out``."""
    dirs = [runs] if isinstance(runs, str) else runs
    with tempfile.TemporaryDirectory() as tmp:
        code = report_main(["report", *dirs, "--out", tmp])
        if code not in (0, 6):
            sys.exit(f"warmup-monitor report {' '.join(dirs)} exited with {code}")
        small_png(os.path.join(tmp, picture), out)
    print(f"wrote {out} ({os.path.getsize(out) // 1024} KB)")


def arm_dir(logdir: str, arm: str) -> str:
    return os.path.join(logdir, arm, "version_0")


def train_more_arms(logdir: str) -> None:
    """Train the arms of :data:`MORE_ARMS` that ``logdir`` lacks, as the demo trains its own
    (``benchmarks/adaptive_warmup.py``: same cell, same seed, logs in ``logdir/<arm>``)."""
    missing = [arm for arm in MORE_ARMS if not os.path.isdir(arm_dir(logdir, arm))]
    if not missing:
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    import adaptive_warmup as bench

    family, lr, seed = bench.DEMO
    jobs = [(family, lr, arm, seed, logdir) for arm in missing]
    with cf.ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        for r in pool.map(bench._worker, jobs):
            print(f"trained {r['arm']} ({r['wall_s']:.0f} s): {r['log_dir']}")


def tab_png(
    logdir: str,
    out: str,
    *,
    height: int = 1500,
    keep_bottom: int | None = None,
    focus: str | None = None,
    shown: list[str] | None = None,
) -> None:
    """A screenshot of the Warmup tab: the first run selected and the others overlaid (only
    the runs named in ``shown``, relative to ``logdir``, when given), or the first run whose
    name holds ``focus``, alone."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        print(f"skipped {out}: no {chromium} (apt-get install chromium)")
        return
    runs = [os.path.relpath(p, logdir) for p in find_run_dirs(logdir)]
    if shown is not None:
        runs = [r for r in shown if r in runs] or runs
    overlay = focus is None
    if focus is not None:  # the first run whose name holds `focus`, alone
        runs = [r for r in runs if focus in r][:1] or runs
    port = _free_port()
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "tb.log"), "w+b")  # noqa: SIM115
        server = subprocess.Popen(
            [tensorboard, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port),
             "--load_fast", "false"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/data/plugins_listing", timeout=10).read()
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline or server.poll() is not None:
                        log.seek(0)
                        sys.exit("tensorboard did not start: " + log.read().decode()[-2000:])
                    time.sleep(0.5)
            query = {"wm_run": runs[0]}
            if len(runs) > 1 and overlay:
                query["wm_overlay"] = ",".join(runs[1:])
            page = f"{url}/?{urllib.parse.urlencode(query)}#warmup_monitor"
            shot = os.path.join(tmp, "tab.png")
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={os.path.join(tmp, 'profile')}",
                 "--hide-scrollbars", f"--window-size=1400,{height}", "--virtual-time-budget=30000",
                 f"--screenshot={shot}", page],
                capture_output=True, timeout=300, check=False,
            )  # fmt: skip
            if not os.path.exists(shot):
                sys.exit("chromium took no screenshot")
            if keep_bottom is not None:  # only the bottom of the page: the heatmaps
                import matplotlib.image

                image = matplotlib.image.imread(shot)
                matplotlib.image.imsave(shot, image[-keep_bottom:])
            small_png(shot, out)
            print(f"wrote {out}")
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", nargs="?", default="runs/demo")
    parser.add_argument("--out", default=HERE, help="the folder of the pictures")
    parser.add_argument("--cells", default="runs/cells", help="the Post-LN cell's runs")
    args = parser.parse_args()
    demo = [arm_dir(args.logdir, arm) for arm in DEMO_ARMS]
    for d in demo:
        if not os.path.isdir(d):
            sys.exit(f"no {d}: run `make demo` first")
    train_more_arms(args.logdir)
    report_png(demo, os.path.join(args.out, "report.png"))
    four = [arm_dir(args.logdir, arm) for arm in ("short", "long", "adaptive", "rollback")]
    report_png(four, os.path.join(args.out, "report_overlay.png"))
    report_png(demo[1], os.path.join(args.out, "report_extended.png"))
    tab_png(args.logdir, os.path.join(args.out, "tb_plugin.png"),
            shown=[os.path.relpath(d, args.logdir) for d in demo])  # fmt: skip
    if not os.path.isdir(args.cells):
        print(f"skipped layers.png and tb_layers.png: no {args.cells}")
        return
    report_png(args.cells, os.path.join(args.out, "layers.png"), picture="layers.png")
    tab_png(args.cells, os.path.join(args.out, "tb_layers.png"), height=2300, keep_bottom=900,
            focus="short")  # fmt: skip


if __name__ == "__main__":
    main()
