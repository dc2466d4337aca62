"""``warmup_monitor.summarize`` (issue 22, "Notebook and console") and the paragraph per verdict
(``warmup_monitor.report.guidance``), on real runs: a Lightning training with the monitor and a
TensorBoardLogger, and plain loops with a ``LoopMonitor`` and a ``SummaryWriter``.

The expected values are read from the runs' own files (the alerts JSONL with ``json``, the lr
with TensorBoard's ``EventAccumulator``) or follow from the scripted losses."""

from __future__ import annotations

import json
import os
import re
import traceback
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, make_loader, read_scalars, tiny_module_class
from rich.console import Console

import warmup_monitor
from warmup_monitor import AdaptiveWarmup, WarmupMonitor, verdict
from warmup_monitor.advice import SAFETY
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.report import NoWarmupKeysError, ReportError, RunNotFoundError
from warmup_monitor.report.analysis import SHORTER_WARMUP_FRACTION
from warmup_monitor.report.guidance import VERDICTS, what_to_do
from warmup_monitor.report.wording import LONGER_WARMUP_HEALED
from warmup_monitor.schema import ALERTS_FILENAME, INSTABILITY_KINDS

WARMUP = 20
STEPS = 60
SPIKES = (12, 13)
INSTABILITY = {k.value for k in INSTABILITY_KINDS}


def spiky(step: int) -> float:
    """1 / (1 + 0.05 step), 50 (50x the initial loss of 1) at SPIKES: two spikes inside the
    warmup, then a loss that ends far below the initial one, so "unstable but recovered"."""
    return 50.0 if step in SPIKES else 1.0 / (1.0 + 0.05 * step)


def records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def episode_count(rows: list[dict[str, Any]]) -> int:
    """Episodes in an alerts file: the distinct episode ids, and each instability record
    without one (a file written without episodes)."""
    ids = {r["episode"] for r in rows if r.get("episode") is not None}
    loose = [r for r in rows if r.get("episode") is None and r["kind"] in INSTABILITY]
    return len(ids) + len(loose)


def flat(text: str) -> str:
    """Whitespace folded: rich wraps a paragraph at the console's width."""
    return " ".join(text.split())


def field(text: str, key: str) -> str:
    """The first line of a ``key: value`` row of the rendered summary."""
    found = re.search(rf"^{re.escape(key)}: +(.*?) *$", text, re.M)
    assert found is not None, (key, text)
    return found[1]


def rendered(summary: Any) -> str:
    console = Console(record=True, width=100, force_terminal=False)
    console.print(summary)
    return console.export_text()


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    root = tmp_path_factory.mktemp("lightning")
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version=0)
    trainer = fit(
        pl,
        root,
        [WarmupMonitor(warmup_steps=WARMUP)],  # the defaults: episodes on
        model=tiny_module_class(pl)(scripted=spiky, warmup=WARMUP),
        max_steps=STEPS,
        loader=make_loader(n=4 * STEPS, batch_size=4),
        logger=logger,
    )
    return trainer, str(logger.log_dir)


def _loop(writer_dir: Path, alerts: Path, steps: int, warmup: int) -> LoopMonitor:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    monitor = LoopMonitor(
        opt, warmup_steps=warmup, writer=SummaryWriter(str(writer_dir)), alerts_file=alerts
    )
    g = torch.Generator().manual_seed(1)
    with monitor:
        for step in range(steps):
            x = torch.randn(8, 4, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).tanh())
            loss.backward()
            monitor.before_step()
            opt.step()
            sched.step()
            monitor.after_step(spiky(step))  # the scripted value is the loss the monitor sees
            opt.zero_grad()
    return monitor  # the writer is left open: summarize flushes it


# ---------------------------------------------------------------------------------- terminal


def test_terminal_shows_the_verdict_the_episodes_and_what_to_do(lightning_run: Any) -> None:
    _, log_dir = lightning_run
    summary = warmup_monitor.summarize(log_dir)
    text = rendered(summary)
    rows = records(os.path.join(log_dir, ALERTS_FILENAME))
    n = episode_count(rows)
    assert n >= 1
    assert summary.verdict == verdict.RECOVERED  # by construction of the scripted loss
    assert field(text, "verdict").startswith("unstable but recovered (")
    assert field(text, "episodes") == str(n)
    assert len(summary.episodes) == n
    # The first instability is the scripted 50x loss at step 12, a loss_spike; in warmup the lr
    # rises, so the lowest lr at which instability was seen is step 12's, as TensorBoard read it.
    first = min((r for r in rows if r["kind"] in INSTABILITY), key=lambda r: r["step"])
    assert (first["step"], first["kind"]) == (SPIKES[0], "loss_spike")
    lr = read_scalars(log_dir)["warmup/lr"][SPIKES[0]]
    assert field(text, "recommended peak lr") == f"{SAFETY * lr:.3g}"
    assert field(text, "warmup") == f"{WARMUP} steps planned"
    # The guidance paragraph, with this run's numbers: twice the planned warmup.
    assert summary.guidance == what_to_do(
        verdict.RECOVERED,
        planned_warmup=WARMUP,
        effective_warmup=WARMUP,
        last_step=STEPS - 1,
        recommended_peak_lr=summary.report.recommended_peak_lr,
        lowest_unstable_lr=summary.report.lowest_unstable_lr,
    )
    assert f"at least {2 * WARMUP} steps, twice the planned {WARMUP}" in summary.guidance
    assert flat("what to do: " + summary.guidance) in flat(text)
    assert "peak loss 50x the initial at step 12" in flat(text)  # the scripted spike
    for line in summary.advice:
        assert flat(line) in flat(text)
    assert all(len(line) <= 100 for line in text.splitlines())
    # str() is the same text, without styles.
    assert flat(str(summary)) == flat(text)
    assert "\x1b" not in str(summary)
    assert field(text, "alerts") == f"{len(rows)}, read from {ALERTS_FILENAME}"


def test_summarize_a_trainer_a_monitor_and_the_directory_agree(
    lightning_run: Any, tmp_path: Path
) -> None:
    trainer, log_dir = lightning_run
    from_trainer = warmup_monitor.summarize(trainer)
    from_path = warmup_monitor.summarize(Path(log_dir))
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, WarmupMonitor))
    from_monitor = warmup_monitor.summarize(monitor)
    assert os.path.samefile(from_trainer.path, log_dir)
    assert from_trainer.report.to_dict() == from_path.report.to_dict()
    assert from_monitor.report.to_dict() == from_path.report.to_dict()
    assert str(from_trainer) == str(from_path)
    assert from_trainer.guidance == from_path.guidance
    # The directory above the run (root/run/version_0) holds one run: that one.
    root = Path(log_dir).parent.parent
    assert warmup_monitor.summarize(root).report.verdict == from_path.verdict


def test_a_trainer_of_either_namespace_without_instability(ns: ModuleType, tmp_path: Path) -> None:
    """``pytorch_lightning`` and ``lightning.pytorch`` Trainers are both recognized; a quiet run
    past its warmup is healthy, with no episode."""
    trainer = fit(ns, tmp_path, [WarmupMonitor(warmup_steps=4)], max_steps=12)
    summary = warmup_monitor.summarize(trainer)
    alerts = Path(trainer.log_dir) / ALERTS_FILENAME  # written at the first alert
    assert not alerts.exists() or not [r for r in records(alerts) if r["kind"] in INSTABILITY]
    assert summary.verdict == verdict.HEALTHY
    assert field(rendered(summary), "episodes") == "0"
    assert summary.guidance.startswith("No step had an instability alert")


# ---------------------------------------------------------------------------------- HTML


class _Checker(HTMLParser):
    """Well-formedness: every tag closed in order; collects the text."""

    VOID = frozenset({"br", "hr", "img", "meta"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(markup: str) -> tuple[str, list[str]]:
    parser = _Checker()
    parser.feed(markup)
    parser.close()
    assert parser.stack == []
    return flat(" ".join(parser.text)), parser.tags


def test_html_is_well_formed_escaped_and_holds_the_verdict_and_guidance(tmp_path: Path) -> None:
    # A directory name with markup in it: it must come out as text.
    run_dir = tmp_path / "loop <b>&amp;"
    monitor = _loop(run_dir, run_dir / ALERTS_FILENAME, STEPS, WARMUP)
    summary = warmup_monitor.summarize(monitor)
    text, tags = check_html(summary._repr_html_())
    assert set(tags) <= {"div", "h4", "table", "tr", "th", "td", "b", "p", "ul", "li"}
    assert f"verdict {summary.verdict} (" in text
    assert summary.verdict == verdict.RECOVERED
    assert flat(summary.guidance) in text
    assert str(run_dir) in text  # shown as text, escaped in the markup
    n = episode_count(records(run_dir / ALERTS_FILENAME))
    assert f"episodes {n}" in text


def test_ipython_displays_the_html_and_the_text(lightning_run: Any) -> None:
    pytest.importorskip("IPython")
    from IPython.core.formatters import format_display_data

    summary = warmup_monitor.summarize(lightning_run[1])
    data, _ = format_display_data(summary)
    assert data["text/html"] == summary._repr_html_()
    check_html(data["text/html"])
    assert data["text/plain"] == str(summary).rstrip("\n")


# ---------------------------------------------------------------------------------- loops


def test_loop_monitor_with_its_alerts_file_elsewhere(tmp_path: Path) -> None:
    """The LoopMonitor's file is read, wherever it is; the directory alone has only the
    TensorBoard alert text (said in a note), and the verdict is the same."""
    elsewhere = tmp_path / "alerts" / "mine.jsonl"
    elsewhere.parent.mkdir()
    monitor = _loop(tmp_path / "tb", elsewhere, STEPS, WARMUP)
    summary = warmup_monitor.summarize(monitor)
    rows = records(elsewhere)
    by_kind: dict[str, list[int]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["step"])
    assert summary.report.alerts_by_kind == {k: sorted(v) for k, v in by_kind.items()}
    assert summary.report.alerts_source == "jsonl"
    assert len(summary.episodes) == episode_count(rows)
    assert summary.verdict == verdict.RECOVERED
    assert f"alerts read from {elsewhere}" in summary.report.notes
    # The HTML, as it does not wrap the long path.
    assert f"alerts {len(rows)}, read from {elsewhere}" in check_html(summary._repr_html_())[0]
    alone = warmup_monitor.summarize(tmp_path / "tb")
    assert alone.report.alerts_source == "tensorboard"
    assert alone.verdict == summary.verdict


def test_a_run_that_ends_in_warmup_gets_the_too_short_paragraph(tmp_path: Path) -> None:
    monitor = _loop(tmp_path / "short", tmp_path / "short" / ALERTS_FILENAME, 8, 50)
    summary = warmup_monitor.summarize(monitor)
    assert summary.verdict == verdict.TOO_SHORT
    assert "at step 7, in its 50-step warmup" in summary.guidance
    assert "more than 50 optimizer steps" in summary.guidance
    assert flat(summary.guidance) in flat(rendered(summary))
    assert field(rendered(summary), "episodes") == "0"


# ---------------------------------------------------------------------------------- errors


def _raised_in_summarize(err: BaseException) -> None:
    """The error is raised by summarize itself: no chained error from deep inside."""
    assert str(err).startswith("summarize: ")
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    frames = traceback.extract_tb(err.__traceback__)
    assert frames[-1].filename.endswith(os.path.join("report", "summary.py"))


def test_no_monitor_run_is_a_clear_error(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(RunNotFoundError, match=r"^summarize: .*missing: no such directory") as e:
        warmup_monitor.summarize(tmp_path / "missing")
    _raised_in_summarize(e.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunNotFoundError, match="not a directory"):
        warmup_monitor.summarize(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    # ReportError: load_run may learn other sources (CSV, JSONL); none is here in any case.
    with pytest.raises(ReportError, match=r"^summarize: .*empty") as e2:
        warmup_monitor.summarize(tmp_path / "empty")
    _raised_in_summarize(e2.value)
    writer = SummaryWriter(str(tmp_path / "other"))  # a run without the monitor
    writer.add_scalar("train_loss", 1.0, 0)
    writer.close()
    with pytest.raises(NoWarmupKeysError, match=r"^summarize: .*none of the monitor's keys") as e3:
        warmup_monitor.summarize(tmp_path / "other")
    _raised_in_summarize(e3.value)
    with pytest.raises(TypeError, match=r"^summarize: expected a run directory"):
        warmup_monitor.summarize(42)


def test_summarize_is_imported_lazily() -> None:
    """``import warmup_monitor`` does not load the report stack (TensorBoard's reader, rich), and
    the report stack loads neither Lightning nor the callback."""
    import subprocess
    import sys

    code = (
        "import sys, warmup_monitor; "
        "print(sorted(m for m in ('rich', 'warmup_monitor.report', 'tensorboard') "
        "if m in sys.modules)); "
        "warmup_monitor.summarize; print('warmup_monitor.report.summary' in sys.modules); "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'warmup_monitor.callback') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["[]", "True", "[]"]


# ---------------------------------------------------------------------------------- guidance


def test_every_verdict_has_a_paragraph() -> None:
    constants = {getattr(verdict, n) for n in verdict.__all__ if n.isupper()}
    verdicts = {c for c in constants if isinstance(c, str)}
    assert set(VERDICTS) == verdicts == {"healthy", "unstable but recovered", "unstable",
                                         "too short to judge"}  # fmt: skip
    for v in VERDICTS:
        paragraph = what_to_do(v)
        assert len(paragraph) > 100 and "\n" not in paragraph, v
    with pytest.raises(ValueError, match=r"^what_to_do: unknown verdict 'fine'"):
        what_to_do("fine")


def test_the_numbers_in_the_paragraphs_are_the_constants() -> None:
    healed, tried = LONGER_WARMUP_HEALED
    d = AdaptiveWarmup()
    unstable = what_to_do(verdict.UNSTABLE)
    assert f"turned {healed} of {tried} failing runs" in unstable
    assert f"to {SAFETY:g} times the lowest lr" in unstable
    assert f"at most {d.max_extensions} times" in unstable
    assert f"backs the lr off to {d.backoff:g} times" in unstable
    assert f"never past {d.resolved(1)['max_warmup_steps']} times the planned length" in unstable
    recovered = what_to_do(verdict.RECOVERED)
    assert f"none in the last {verdict.RECOVERY_STEPS} logged steps" in recovered
    assert f"within {verdict.COME_BACK_TOLERANCE:.0%} of its level" in recovered
    assert f"at least {verdict.MIN_PROGRESS:.0%} below the initial loss" in recovered
    healthy = what_to_do(verdict.HEALTHY)
    assert f"the first {SHORTER_WARMUP_FRACTION:.0%} of it" in healthy
    # No other number: every figure in the generic paragraphs is one of these constants.
    allowed = {
        str(healed), str(tried), f"{SAFETY:g}", str(d.max_extensions), f"{d.backoff:g}",
        str(d.resolved(1)["max_warmup_steps"]), str(verdict.RECOVERY_STEPS),
        f"{verdict.COME_BACK_TOLERANCE * 100:.0f}", f"{verdict.MIN_PROGRESS * 100:.0f}",
        f"{SHORTER_WARMUP_FRACTION * 100:.0f}",
    }  # fmt: skip
    for v in VERDICTS:
        assert set(re.findall(r"\d+(?:\.\d+)?", what_to_do(v))) <= allowed, v


def test_the_run_numbers_take_their_place() -> None:
    healthy = what_to_do(verdict.HEALTHY, planned_warmup=20, effective_warmup=80)
    assert "at least 80 warmup steps" in healthy and "from 20 to 80 steps" in healthy
    unstable = what_to_do(
        verdict.UNSTABLE,
        planned_warmup=30,
        effective_warmup=30,
        recommended_peak_lr=1.5e-3,
        lowest_unstable_lr=3e-3,
    )
    assert "at least 60 steps, twice the planned 30" in unstable
    assert "to about 0.0015 (0.5 times 0.003, the lowest lr" in unstable
    extended = what_to_do(verdict.RECOVERED, planned_warmup=30, effective_warmup=120)
    assert "at least 120 steps, the length the monitor extended it to from 30" in extended
    short = what_to_do(verdict.TOO_SHORT, last_step=9, effective_warmup=100)
    assert "(at step 9, in its 100-step warmup)" in short
