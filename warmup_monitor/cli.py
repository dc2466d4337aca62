"""``warmup-monitor``: the command line.

``warmup-monitor report RUN_DIR [RUN_DIR ...] [--json] [--out DIR] [--prefix PREFIX] [--wide]``

The table fits 100 columns (fewer on a narrower terminal); ``--wide`` uses the terminal's whole
width (160 columns when the output is not a terminal and ``COLUMNS`` is not set) and shows
more: the initial loss, the extensions' steps, 4 alert steps per kind.

Exit codes: 0 reported; 1 internal error; 2 usage error; 3 a RUN_DIR does not exist or is not a
directory; 4 no run in a RUN_DIR (no event file, metrics.csv, MLflow run or alerts file), or no
event file that could be read (empty, not an event file,
damaged from its first byte); 5 a run without the monitor's keys; 6 reported, but something was
skipped (a truncated or corrupted event file, a bad JSONL line: each is named, ``line N: why;
skipped``); 7 the ``--out`` files could not be written. With several problems the lowest of 3-7
wins; the runs that could be read are reported all the same. Text from the runs is printed
without its control characters.

This module imports neither the callback nor Lightning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from warmup_monitor.report.analysis import RunSummary, summarize
from warmup_monitor.report.figure import render_png
from warmup_monitor.report.heatmap import render_layers_png
from warmup_monitor.report.render import (
    TABLE_WIDTH,
    clean_text,
    print_report,
    render_html,
    to_json,
)
from warmup_monitor.report.runs import (
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SKIPPED,
    ReportError,
    RunData,
    find_run_dirs,
    load_run,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from warmup_monitor import __version__

    parser = argparse.ArgumentParser(
        prog="warmup-monitor", description="Tools around the WarmupMonitor callback."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="summarize runs: verdict, alerts, advice",
        description=(
            "Read the scalars (TensorBoard event files, a CSVLogger's metrics.csv or an MLflow "
            "file-store run) and warmup_alerts.jsonl of each run and print a summary with a "
            "verdict and advice; a directory with warmup_alerts.jsonl alone is judged from its "
            "alerts. A directory without a run of its own is searched for runs below it (e.g. "
            "lightning_logs/ holds version_0/, version_1/; mlruns/ holds MLflow runs)."
        ),
        epilog=(
            "exit codes: 0 reported; 2 usage; 3 no such directory; 4 no run (or no readable "
            "event file); 5 no warmup keys; 6 reported, something skipped; 7 could not write --out"
        ),
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's log directory")
    report.add_argument("--json", action="store_true", help="print JSON instead of the table")
    report.add_argument(
        "--out", metavar="DIR", help="also write DIR/report.png and DIR/report.html"
    )
    report.add_argument(
        "--wide",
        action="store_true",
        help="a wider table with more columns (default: it fits 100 columns)",
    )
    report.add_argument(
        "--prefix",
        default=None,
        help="the monitor's log_key_prefix (default: found in each run's tags, else warmup/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return int(e.code or 0)
    return _report(
        args.run_dirs, as_json=args.json, out=args.out, prefix=args.prefix, wide=args.wide
    )


def _table_width(wide: bool) -> int:
    """The table's width: the terminal's (or ``COLUMNS``), at most :data:`TABLE_WIDTH` unless
    ``wide``; without a terminal, :data:`TABLE_WIDTH` (160 with ``wide``)."""
    known = sys.stdout.isatty() or "COLUMNS" in os.environ
    terminal = Console().width if known else None
    if wide:
        return terminal or 160
    return min(TABLE_WIDTH, terminal or TABLE_WIDTH)


def _report(
    run_dirs: Sequence[str],
    *,
    as_json: bool,
    out: str | None,
    prefix: str | None,
    wide: bool = False,
) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    codes: list[int] = []
    errors: list[str] = []
    runs: list[RunData] = []
    for given in run_dirs:
        given = os.path.normpath(given)
        try:
            found = find_run_dirs(given)
        except ReportError as e:
            codes.append(e.exit_code)
            errors.append(str(e))
            continue
        for path in found:
            rel = os.path.relpath(path, given)
            name = given if rel == "." else os.path.join(given, rel)
            try:
                runs.append(load_run(path, name=name, prefix=prefix))
            except ReportError as e:
                codes.append(e.exit_code)
                errors.append(str(e))
    summaries: list[RunSummary] = [summarize(run) for run in runs]
    if any(r.problems for r in runs):
        codes.append(EXIT_SKIPPED)

    if as_json:
        print(json.dumps(to_json(summaries, errors), indent=2))
    elif summaries:
        width = _table_width(wide)
        print_report(summaries, Console(highlight=False, width=width), wide=wide)
    for r in summaries:
        for note in r.notes:
            err.print(clean_text(f"note: {r.name}: {note}"), markup=False)
        for problem in r.problems:
            err.print(clean_text(f"skipped: {r.name}: {problem}"), markup=False, style="yellow")
    for message in errors:
        err.print(clean_text(f"error: {message}"), markup=False, style="red")

    if out is not None and summaries:
        try:
            os.makedirs(out, exist_ok=True)
            png = render_png(runs, summaries)
            with open(os.path.join(out, "report.png"), "wb") as f:
                f.write(png)
            layers_png = render_layers_png(runs, summaries)  # None without per-group keys
            if layers_png is not None:
                with open(os.path.join(out, "layers.png"), "wb") as f:
                    f.write(layers_png)
            with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
                f.write(render_html(summaries, png, errors, layers_png=layers_png))
        except OSError as e:
            err.print(clean_text(f"error: could not write the report to {out}: {e}"), markup=False)
            codes.append(EXIT_OUTPUT)
        else:
            if not as_json:
                also = " and layers.png" if layers_png is not None else ""
                err.print(
                    f"wrote {os.path.join(out, 'report.png')}, report.html{also}", markup=False
                )
    return min(codes) if codes else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
