"""Regenerate ``docs/report.png`` and ``docs/tb_plugin.png`` from the demo's runs, and the
per-group heatmaps ``docs/layers.png`` and ``docs/tb_layers.png`` from one Post-LN cell.

Run after ``make demo`` (``make docs-images`` does both steps' second half)::

    .venv/bin/python docs/make_images.py runs/demo

With ``--cells DIR`` (default ``runs/cells``, skipped when absent), the runs of
``benchmarks/adaptive_warmup.py --cell post_ln:0.01:short:0 --cell post_ln:0.01:long:0
--cell-dir runs/cells`` give ``layers.png`` (the report's heatmaps) and ``tb_layers.png`` (the
Warmup tab on the short run, cut to its heatmaps).

``report.png`` is ``warmup-monitor report LOGDIR --out ...`` over every run under the log
directory (overlaid). ``tb_plugin.png`` is a headless-Chromium screenshot of the Warmup tab of a
real ``tensorboard --logdir LOGDIR`` on 127.0.0.1, the first run selected and the others overlaid
through the tab's deep link; it needs Debian's ``chromium`` (skipped, with a message, without it).
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


def report_png(logdir: str, out: str, picture: str = "report.png") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = report_main(["report", logdir, "--out", tmp])
        if code not in (0, 6):
            sys.exit(f"warmup-monitor report {logdir} exited with {code}")
        shutil.copyfile(os.path.join(tmp, picture), out)
    print(f"wrote {out}")


def tab_png(
    logdir: str,
    out: str,
    *,
    height: int = 1500,
    keep_bottom: int | None = None,
    focus: str | None = None,
) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        print(f"skipped {out}: no {chromium} (apt-get install chromium)")
        return
    runs = [os.path.relpath(p, logdir) for p in find_run_dirs(logdir)]
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
            if keep_bottom is None:
                shutil.copyfile(shot, out)
            else:  # only the bottom of the page: the heatmaps
                import matplotlib.image

                image = matplotlib.image.imread(shot)
                matplotlib.image.imsave(out, image[-keep_bottom:])
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
    report_png(args.logdir, os.path.join(args.out, "report.png"))
    tab_png(args.logdir, os.path.join(args.out, "tb_plugin.png"))
    if not os.path.isdir(args.cells):
        print(f"skipped layers.png and tb_layers.png: no {args.cells}")
        return
    report_png(args.cells, os.path.join(args.out, "layers.png"), picture="layers.png")
    tab_png(args.cells, os.path.join(args.out, "tb_layers.png"), height=2300, keep_bottom=900,
            focus="short")  # fmt: skip


if __name__ == "__main__":
    main()
