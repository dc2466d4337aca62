"""``warmup_monitor.summarize(path_or_trainer)``: a run's verdict, episodes and advice in a notebook
or a terminal.

It reads the run as ``warmup-monitor report`` does (:func:`warmup_monitor.report.runs.load_run`)
and judges it with the same function (:func:`warmup_monitor.report.analysis.summarize`: verdict,
episodes, advice), adding the paragraph of :func:`warmup_monitor.report.guidance.what_to_do` for
the verdict. The :class:`Summary` it returns shows itself as rich text in a terminal
(``rich.print(summary)``, or the last line of a cell in a terminal IPython), as plain text
(``str(summary)``) and as a small HTML block in Jupyter (``_repr_html_``, no script).

This module imports no Lightning and no torch: a Trainer, a ``WarmupMonitor`` or a
``LoopMonitor`` is recognized by its class, which is loaded whenever such an object exists.
"""

from __future__ import annotations

import html
import io
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from warmup_monitor.report.analysis import RunSummary
from warmup_monitor.report.analysis import summarize as _judge
from warmup_monitor.report.episodes import Episode
from warmup_monitor.report.figure import verdict_color
from warmup_monitor.report.guidance import for_run
from warmup_monitor.report.render import clean_text, verdict_style
from warmup_monitor.report.runs import (
    NoEventFilesError,
    ReportError,
    RunData,
    RunNotFoundError,
    find_run_dirs,
    load_run,
)
from warmup_monitor.schema import ALERTS_FILENAME
from warmup_monitor.words import count, span

__all__ = ["Summary", "summarize"]

#: Episodes listed one by one; the rest are counted.
MAX_EPISODES_SHOWN = 10

_OUTCOMES = {
    "recovered": "recovered",
    "not_recovered": "did not recover",
    "ended_quiet": "ended quiet (no loss after it to judge recovery)",
    "open_at_end": "still open when monitoring ended",
    "interrupted": "still open when training stopped on an exception",
}


@dataclass(frozen=True)
class Summary:
    """One run's verdict, episodes, advice and what to do, as the report judges them.

    Attributes:
        report: The report's :class:`~warmup_monitor.report.RunSummary` of the run (every
            number the report has: warmup lengths, alerts by kind, peak values, ...).
        run: What was read from disk (:class:`~warmup_monitor.report.RunData`).
        guidance: The paragraph for the verdict
            (:func:`warmup_monitor.report.guidance.for_run`).
        alerts_file: The alerts JSONL read (``None``: the run directory's own, if any).
    """

    report: RunSummary
    run: RunData
    guidance: str
    alerts_file: str | None = None

    @property
    def verdict(self) -> str:
        """``"healthy"``, ``"unstable but recovered"``, ``"unstable"`` or ``"too short to
        judge"``."""
        return self.report.verdict

    @property
    def reason(self) -> str:
        """The sentence that says which rule gave the verdict."""
        return self.report.verdict_reason

    @property
    def episodes(self) -> list[Episode]:
        """The unstable episodes (:class:`~warmup_monitor.report.Episode`), by first step."""
        return self.report.episodes

    @property
    def advice(self) -> list[str]:
        """The report's advice, one sentence each."""
        return self.report.advice

    @property
    def path(self) -> str:
        """The run directory read."""
        return self.run.path

    # ------------------------------------------------------------------ content

    def _facts(self) -> list[tuple[str, str]]:
        r = self.report
        out: list[tuple[str, str]] = []
        if r.planned_warmup is not None:
            warmup = f"{r.planned_warmup} steps planned"
            if r.effective_warmup is not None and r.effective_warmup != r.planned_warmup:
                n = len(r.extensions)
                times = f" ({count(n, 'extension')})" if n else ""
                warmup += f", extended to {r.effective_warmup}{times}"
            out.append(("warmup", warmup))
        if r.first_step is not None and r.last_step is not None:
            out.append(("logged", f"{r.logged_steps} steps, {r.first_step} to {r.last_step}"))
        source = {
            "jsonl": self.alerts_file or ALERTS_FILENAME,
            "tensorboard": "the TensorBoard alert text",
        }
        alerts = f"{r.alert_count}" + (
            f", read from {source[r.alerts_source]}" if r.alerts_source in source else ""
        )
        out.append(("alerts", alerts))
        if r.recommended_peak_lr is not None:
            out.append(("recommended peak lr", f"{r.recommended_peak_lr:.3g}"))
        return out

    def _episode_lines(self) -> list[str]:
        shown = [_episode_text(e) for e in self.episodes[:MAX_EPISODES_SHOWN]]
        more = len(self.episodes) - MAX_EPISODES_SHOWN
        return shown + ([f"... and {more} more"] if more > 0 else [])

    def _notes(self) -> list[str]:
        r = self.report
        return [f"note: {n}" for n in r.notes] + [f"skipped: {p}" for p in r.problems]

    # ------------------------------------------------------------------ rendering

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Rich text for a terminal (``rich.print(summary)``, ``Console().print(summary)``)."""
        yield self._group()

    def _group(self) -> Group:
        r = self.report
        style = verdict_style(r.verdict)
        facts = Table.grid(padding=(0, 1))
        facts.add_column(style="bold", no_wrap=True)
        facts.add_column()
        facts.add_row(
            "verdict:", Text.assemble((r.verdict, style), f" ({clean_text(r.verdict_reason)})")
        )
        for k, v in self._facts():
            facts.add_row(f"{k}:", Text(v))
        facts.add_row("episodes:", Text(str(len(self.episodes))))
        parts: list[Any] = [
            Text.assemble(("warmup summary: ", "bold"), (clean_text(r.name), "bold cyan")),
            facts,
            _bullets(self._episode_lines()),
            Text("advice:", style="bold"),
            _bullets(self.advice),
            Text("what to do:", style="bold"),
            Padding(Text(clean_text(self.guidance)), (0, 0, 0, 2)),
        ]
        parts += [Text(clean_text(n), style="yellow") for n in self._notes()]
        return Group(*parts)

    def __str__(self) -> str:
        """Plain text, 100 columns wide."""
        buffer = io.StringIO()
        console = Console(
            file=buffer, width=100, color_system=None, force_terminal=False, highlight=False
        )
        console.print(self._group())
        return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())

    def __repr__(self) -> str:
        return (
            f"Summary(verdict={self.verdict!r}, episodes={len(self.episodes)}, path={self.path!r})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display: the same text as ``str``."""
        printer.text(repr(self) if cycle else str(self).rstrip("\n"))

    def _repr_html_(self) -> str:
        """A self-contained HTML block for Jupyter (every text from the run escaped; no
        script)."""
        e = html.escape
        r = self.report
        color = verdict_color(r.verdict)
        rows = [
            f'<tr><th style="text-align:left">verdict</th><td><b style="color:{color}">'
            f"{e(r.verdict)}</b> ({e(r.verdict_reason)})</td></tr>"
        ]
        rows += [
            f'<tr><th style="text-align:left">{e(k)}</th><td>{e(v)}</td></tr>'
            for k, v in self._facts()
        ]
        rows.append(
            f'<tr><th style="text-align:left">episodes</th><td>{len(self.episodes)}</td></tr>'
        )
        parts = [
            '<div class="warmup-monitor-summary">',
            f"<h4>warmup summary: {e(r.name)}</h4>",
            "<table>" + "".join(rows) + "</table>",
        ]
        if self.episodes:
            parts.append(
                "<p><b>episodes</b></p><ul>"
                + "".join(f"<li>{e(line)}</li>" for line in self._episode_lines())
                + "</ul>"
            )
        parts.append(
            "<p><b>advice</b></p><ul>"
            + "".join(f"<li>{e(line)}</li>" for line in self.advice)
            + "</ul>"
        )
        parts.append(f"<p><b>what to do:</b> {e(self.guidance)}</p>")
        notes = self._notes()
        if notes:
            parts.append(
                '<ul style="color:#9a6700">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"
            )
        parts.append("</div>")
        return "\n".join(parts)


def _bullets(lines: list[str]) -> Table:
    """Lines as a list whose wrapped lines hang under their text."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for line in lines:
        grid.add_row(" -", Text(clean_text(line)))
    return grid


def _episode_text(ep: Episode) -> str:
    flagged = count(ep.count, "flagged step")
    text = f"{span(ep.start, ep.end)} ({flagged}): {', '.join(ep.kinds) or 'no kind recorded'}"
    if ep.peak_ratio is not None and math.isfinite(ep.peak_ratio):
        at = f" at step {ep.peak_step}" if ep.peak_step is not None else ""
        text += f"; peak loss {ep.peak_ratio:.3g}x the initial{at}"
    if ep.outcome is not None:
        text += f"; {_OUTCOMES.get(ep.outcome, ep.outcome)}"
    elif ep.recovered is not None:
        text += "; recovered" if ep.recovered else "; did not recover"
    elif ep.id is not None and not ep.closed:
        text += "; still open"
    return text


# ---------------------------------------------------------------------------------- reading


def _loaded_class(module: str, name: str) -> type | None:
    """A class from a module only if that module is already imported (an instance of the class
    cannot exist otherwise), so that recognizing it imports nothing."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _is(obj: Any, *where: tuple[str, str]) -> bool:
    classes = tuple(c for m, n in where if (c := _loaded_class(m, n)) is not None)
    return bool(classes) and isinstance(obj, classes)


def _monitors(trainer: Any) -> Iterator[Any]:
    for cb in getattr(trainer, "callbacks", None) or []:
        if _is(cb, ("warmup_monitor.callback", "WarmupMonitor")):
            yield cb


def _where(source: Any) -> tuple[str, str | None, str | None]:
    """The run directory, the key prefix (``None``: found in the tags) and the alerts file of
    ``source`` (``None``: the one in the run directory)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), None, None
    if _is(source, ("warmup_monitor.loop", "LoopMonitor")):
        writer = source.writer
        if writer is None:
            raise ValueError(
                "summarize: this LoopMonitor has no writer, so no scalars were logged; pass "
                "LoopMonitor(..., writer=SummaryWriter(log_dir)) and summarize it (or log_dir)"
            )
        if callable(getattr(writer, "flush", None)):
            writer.flush()  # what it buffered is part of the run
        log_dir = getattr(writer, "log_dir", None) or writer.get_logdir()
        alerts = source.alerts_file
        return (
            str(log_dir),
            source.config.log_key_prefix,
            None if alerts is None else os.fspath(alerts),
        )
    monitor = None
    if _is(source, ("warmup_monitor.callback", "WarmupMonitor")):
        monitor = source
    elif _is(source, ("pytorch_lightning", "Trainer"), ("lightning.pytorch", "Trainer")):
        monitor = next(_monitors(source), None)
        if monitor is None or monitor._log_dir is None:
            log_dir = source.log_dir
            if log_dir is None:
                raise ValueError(
                    "summarize: this Trainer has no log directory (no logger with a log_dir); "
                    "pass the run's directory instead"
                )
            return str(log_dir), None if monitor is None else monitor.config.log_key_prefix, None
    else:
        raise TypeError(
            "summarize: expected a run directory (str or os.PathLike), a Lightning Trainer, a "
            f"WarmupMonitor or a LoopMonitor, got {type(source).__name__}"
        )
    if monitor._log_dir is None:
        raise ValueError(
            "summarize: this WarmupMonitor has not been in a fit yet, so there is no run to "
            "summarize; call it after trainer.fit(...)"
        )
    from warmup_monitor.alerts import alerts_path

    return (
        monitor._log_dir,
        monitor.config.log_key_prefix,
        alerts_path(monitor.alerts_file, monitor._log_dir),
    )


def _load(path: str, prefix: str | None, alerts_file: str | None = None) -> RunData:
    if not os.path.exists(path):
        raise RunNotFoundError(f"summarize: {path}: no such directory")
    if not os.path.isdir(path):
        raise RunNotFoundError(f"summarize: {path}: not a directory (give the run's log directory)")
    try:
        return load_run(path, prefix=prefix, alerts_file=alerts_file)
    except NoEventFilesError as first:
        try:
            below = find_run_dirs(path)
        except ReportError:
            below = []
        if below:  # a single run below was read by load_run itself
            listed = ", ".join(below[:5]) + (
                f" and {len(below) - 5} more" if len(below) > 5 else ""
            )
            raise NoEventFilesError(
                f"summarize: {path} holds {len(below)} runs ({listed}): pass one of them"
            ) from None
        raise type(first)(f"summarize: {first}; no monitor run to summarize") from None
    except ReportError as err:
        raise type(err)(f"summarize: {err}") from None


def summarize(source: Any) -> Summary:
    """Read a run and judge it as ``warmup-monitor report`` does: verdict, episodes, advice,
    and the paragraph that says what to do about the verdict.

    Args:
        source: A run directory (a Lightning ``version_N`` or the ``SummaryWriter``'s
            directory; one that holds a single run below it works too), a Lightning
            ``Trainer`` after ``fit`` (the directory of its ``WarmupMonitor``, else its
            ``log_dir``), a ``WarmupMonitor`` after ``fit``, or a ``LoopMonitor`` with a
            ``writer`` (its buffered events are flushed first).

    Returns:
        A :class:`Summary`: rich text in a terminal, HTML in Jupyter, plain text with ``str``.

    Raises:
        warmup_monitor.report.ReportError: no monitor run there (its subclasses say why:
            no such directory, no event file, none of the monitor's keys); the message starts
            with ``summarize:``.
        TypeError: ``source`` is none of the above.
        ValueError: the Trainer or monitor has no log directory (yet).
    """
    path, prefix, alerts_file = _where(source)
    elsewhere = alerts_file if alerts_file and _elsewhere(path, alerts_file) else None
    run = _load(path, prefix, elsewhere)
    report = _judge(run)
    return Summary(report=report, run=run, guidance=for_run(report), alerts_file=elsewhere)


def _elsewhere(path: str, alerts_file: str) -> bool:
    """Whether the monitor's ``alerts_file`` exists and is not the run directory's own."""
    in_dir = os.path.join(path, ALERTS_FILENAME)
    return os.path.exists(alerts_file) and not (
        os.path.exists(in_dir) and os.path.samefile(in_dir, alerts_file)
    )
