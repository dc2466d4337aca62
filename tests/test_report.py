"""The report package: event-file reader vs TensorBoard's own, alerts JSONL, verdict and advice,
rendering. Real runs come from a tiny real LightningModule; the analysis rules are pinned on
hand-made series."""

from __future__ import annotations

import ast
import html
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
from conftest import fit, make_loader, read_scalars, tiny_module_class

from warmup_monitor import Detection, Statistics, WarmupMonitor
from warmup_monitor.report import (
    HEALTHY,
    RECOVERED,
    UNSTABLE,
    NoEventFilesError,
    NoWarmupKeysError,
    RunData,
    load_run,
    summarize,
)
from warmup_monitor.report.analysis import aligned_from, extensions
from warmup_monitor.report.events import Series, event_files, read_event_files
from warmup_monitor.report.figure import downsample, render_png
from warmup_monitor.report.render import render_html, to_json
from warmup_monitor.report.runs import read_alerts_jsonl
from warmup_monitor.schema import ALERTS_FILENAME, Alert, AlertKind

SPIKE_STEPS = (12, 13)


def jsonl_by_kind(run_dir: str | os.PathLike[str]) -> dict[str, list[int]]:
    """kind -> steps, read straight from the run's alerts JSONL (the independent truth)."""
    expected: dict[str, list[int]] = {}
    with open(os.path.join(run_dir, ALERTS_FILENAME), encoding="utf-8") as f:
        for line in f:
            alert = json.loads(line)
            expected.setdefault(alert["kind"], []).append(alert["step"])
    return {k: sorted(v) for k, v in expected.items()}


def spiky_loss(step: int) -> float:
    """1 / (1 + 0.05 step), and 50 (50x the initial loss of 1) at SPIKE_STEPS."""
    return 50.0 if step in SPIKE_STEPS else 1.0 / (1.0 + 0.05 * step)


def make_real_run(
    root: str | os.PathLike[str],
    *,
    scripted: Callable[[int], float] | None = spiky_loss,
    warmup_steps: int = 20,
    max_steps: int = 60,
    version: int = 0,
    layers: bool = False,
    layers_every: int = 1,
) -> str:
    """A real Lightning run with WarmupMonitor and a TensorBoardLogger; returns its log dir.
    With ``layers``, per-group statistics too (groups ``net.0`` and ``net.2``)."""
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version=version)
    model = tiny_module_class(pl)(scripted=scripted, warmup=warmup_steps)
    fit(
        pl,
        root,
        # One alert line per flagged step (no episodes): these tests pin the report's reading
        # of per-step alerts; episodes are read in test_verdicts/test_tb_browser.
        [
            WarmupMonitor(
                warmup_steps=warmup_steps,
                detection=Detection(episodes=False),
                statistics=Statistics(
                    layers="auto" if layers else "off", layers_every_n_steps=layers_every
                ),
            )
        ],
        model=model,
        max_steps=max_steps,
        loader=make_loader(n=4 * max_steps, batch_size=4),
        logger=logger,
    )
    return str(logger.log_dir)


def write_scalars(
    run_dir: str | os.PathLike[str], series: dict[str, Sequence[tuple[int, float]]]
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_real_run(tmp_path_factory.mktemp("real"))


# ---------------------------------------------------------------------------------- reading


def test_reader_reads_what_event_accumulator_reads(real_run: str) -> None:
    expected = read_scalars(real_run)
    got = read_event_files(event_files(real_run))
    assert got.problems == []
    assert set(got.scalars) == set(expected)
    for tag, by_step in expected.items():
        s = got.scalars[tag]
        assert s.steps.tolist() == sorted(by_step), tag
        # EventAccumulator keeps float32 values as Python floats: exactly equal.
        assert s.values.tolist() == [by_step[k] for k in sorted(by_step)], tag
    # The alert texts, through the protobuf fallback (torch's add_text appends /text_summary).
    texts = got.texts["warmup/alerts/text_summary"]
    steps = sorted(st for v in jsonl_by_kind(real_run).values() for st in v)
    assert sorted(step for step, _ in texts) == steps
    assert texts[0][1].startswith("**loss_spike** at step 12: loss 50 is 50.0x")


def test_reader_fallback_records_and_last_value_per_step(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    w.add_scalar("warmup/lr", 0.5, 0)  # step 0: no step field in the record
    w.add_scalar("warmup/lr", 0.25, 3)
    w.add_text("warmup/alerts", "hello <b>", 3)
    w.add_scalar("warmup/lr", 0.75, 3)  # rewritten step: the last value wins
    w.add_scalar("warmup/" + "k" * 140, 1.0, 2**40)  # a long tag, a large step
    w.close()
    got = read_event_files(event_files(str(tmp_path)), prefix="warmup/")
    assert got.scalars["warmup/lr"].steps.tolist() == [0, 3]
    assert got.scalars["warmup/lr"].values.tolist() == [0.5, 0.75]
    assert got.scalars["warmup/" + "k" * 140].steps.tolist() == [2**40]
    assert got.texts == {"warmup/alerts/text_summary": [(3, "hello <b>")]}


def _copy_run(src: str, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dst)
    return dst, Path(event_files(str(dst))[0])


def test_truncated_event_file_keeps_the_records_before(real_run: str, tmp_path: Path) -> None:
    _, events = _copy_run(real_run, tmp_path / "run")
    full = read_event_files([str(events)])
    data = events.read_bytes()
    events.write_bytes(data[:-7])  # the last record loses its tail
    got = read_event_files([str(events)])
    assert len(got.problems) == 1
    assert "truncated record at byte" in got.problems[0]
    assert got.records == full.records - 1
    loss = got.scalars["warmup/loss"]
    assert loss.steps.tolist() == full.scalars["warmup/loss"].steps.tolist()[: len(loss)]


def test_corrupted_event_file_stops_at_the_bad_record(real_run: str, tmp_path: Path) -> None:
    _, events = _copy_run(real_run, tmp_path / "run")
    data = bytearray(events.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    events.write_bytes(bytes(data))
    got = read_event_files([str(events)])
    assert len(got.problems) == 1
    assert "corrupted record" in got.problems[0] and "bytes were skipped" in got.problems[0]
    lr = got.scalars["warmup/lr"]
    assert 0 < len(lr) < 60
    assert lr.steps.tolist() == list(range(len(lr)))  # what was read is intact


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(NoEventFilesError, match="no TensorBoard event file"):
        load_run(str(tmp_path))
    write_scalars(tmp_path, {"train/loss": [(0, 1.0)]})
    with pytest.raises(NoWarmupKeysError, match="none of the monitor's keys"):
        load_run(str(tmp_path))


def test_alerts_jsonl_tolerates_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / ALERTS_FILENAME
    good = {"step": 3, "kind": "loss_spike", "message": "m", "value": "inf", "threshold": 10.0}
    newer = {"step": 5, "kind": "a_future_kind", "value": "nan", "details": {"x": 1}}
    path.write_text(
        json.dumps(good)
        + "\nnot json\n"
        + json.dumps({"kind": "loss_spike"})
        + "\n"
        + json.dumps(newer)
        + '\n{"step": 9, "kind": "loss_sp',  # truncated last line
        encoding="utf-8",
    )
    alerts, problems = read_alerts_jsonl(str(path))
    assert [(a.step, a.kind) for a in alerts] == [(3, "loss_spike"), (5, "a_future_kind")]
    assert alerts[0].value == math.inf and math.isnan(alerts[1].value)
    assert problems == [
        f"{ALERTS_FILENAME} line 2: not JSON: expecting value (column 1); skipped",
        f"{ALERTS_FILENAME} line 3: no 'step' field; skipped",
        f"{ALERTS_FILENAME} line 5: truncated or not JSON: unterminated string starting at "
        "(column 21); skipped",
    ]


def test_alerts_from_tensorboard_text_when_there_is_no_jsonl(real_run: str, tmp_path: Path) -> None:
    run, _ = _copy_run(real_run, tmp_path / "run")
    os.remove(run / ALERTS_FILENAME)
    data = load_run(str(run))
    assert data.alerts_source == "tensorboard"
    with open(os.path.join(real_run, ALERTS_FILENAME), encoding="utf-8") as f:
        expected = [json.loads(line) for line in f]
    assert [(a.step, a.kind, a.message) for a in data.alerts] == [
        (e["step"], e["kind"], e["message"]) for e in expected
    ]
    assert data.alerts[0].value == 50.0 and data.alerts[0].threshold == 10.0
    assert data.problems == [] and "TensorBoard text" in data.notes[0]


# ---------------------------------------------------------------------------------- analysis


def test_real_run_summary_matches_its_jsonl(real_run: str) -> None:
    summary = summarize(load_run(real_run))
    # Other detectors may flag more than the scripted spikes; the report must say what the file
    # says, and the two 50x losses must be there as loss_spike.
    expected = jsonl_by_kind(real_run)
    assert summary.alerts_by_kind == expected
    assert expected["loss_spike"] == list(SPIKE_STEPS)
    assert summary.alert_count == sum(len(v) for v in expected.values())
    assert summary.planned_warmup == summary.effective_warmup == 20
    assert summary.initial_loss == pytest.approx(1.0)
    assert summary.peak_loss_ratio == pytest.approx(50.0)
    assert summary.peak_loss_ratio_step == SPIKE_STEPS[0]
    assert summary.first_instability_step == SPIKE_STEPS[0]
    # The loss ends at 1 / (1 + 0.05 * 59), well below the initial loss: recovered.
    assert summary.verdict == RECOVERED
    assert "loss spiked twice during warmup (steps 12, 13)" in summary.advice
    # Half the lowest lr (as TensorBoard read it) at the steps the report counts as unstable.
    lr = read_scalars(real_run)["warmup/lr"]
    lowest = min(lr[s] for s in summary.instability_steps)
    assert SPIKE_STEPS[0] in summary.instability_steps
    hint = (
        f"lower the peak lr to about {0.5 * lowest:.3g} (half of {lowest:.3g}, the lowest lr at "
        "which instability was seen)"
    )
    assert any(
        a.startswith("lengthen warmup to at least 40 steps") and hint in a for a in summary.advice
    )


def _series(steps: Sequence[int], values: Sequence[float]) -> Series:
    return Series(np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))


def synthetic_run(
    n: int = 400,
    *,
    warmup: int | Sequence[float] = 100,
    loss: Callable[[int], float] = lambda s: 2.0 / (1 + 0.01 * s),
    cosine: Callable[[int], float] = lambda s: 0.5,
    peak_lr: float = 1e-3,
    alerts: Sequence[Alert] = (),
    source: str = "jsonl",
    extra: dict[str, Series] | None = None,
) -> RunData:
    steps = list(range(n))
    plan = [float(warmup)] * n if isinstance(warmup, int) else list(warmup)
    lr = [peak_lr * min(1.0, (s + 1) / plan[s]) for s in steps]
    losses = [loss(s) for s in steps]
    series = {
        "lr": _series(steps, lr),
        "loss": _series(steps, losses),
        "loss_ratio": _series(steps, [v / losses[0] for v in losses]),
        "grad_norm": _series(steps, [1.0 + 0.001 * s for s in steps]),
        "grad_cosine": _series(steps[1:], [cosine(s) for s in steps[1:]]),
        "warmup_steps": _series(steps, plan),
        **(extra or {}),
    }
    return RunData("synthetic", "/nowhere", series, list(alerts), source)


def _alert(step: int, kind: str, episode: int | None = None, **details: Any) -> Alert:
    return Alert(step, AlertKind(kind), f"{kind} at {step}", 1.0, 1.0, dict(details), episode)


def test_healthy_aligned_early_suggests_a_shorter_warmup() -> None:
    r = summarize(synthetic_run(cosine=lambda s: -0.5 if s < 30 else 0.6))
    assert r.verdict == HEALTHY
    # 99 cosines in warmup (steps 1-99): windows of 9. A window with k cosines of 0.6 and
    # 9 - k of -0.5 has a positive mean from k = 5: the window of steps 26-34 is the first.
    assert r.aligned_from == 26
    assert r.advice == [
        "no instability and gradients aligned from step 26 (of 100 planned warmup steps): "
        "warmup could be shorter; try about 52 steps"
    ]


def test_aligned_from() -> None:
    steps = list(range(1, 101))
    cos = _series(steps, [-1.0] * 40 + [1.0] * 60)
    # Window 10: the first all-positive-mean window from which every later window is positive
    # starts at index 35 (mean of 5 x -1 and 5 x 1 is 0, not positive; index 36 is 0.2).
    assert aligned_from(cos, None) == steps[36]
    assert aligned_from(cos, until=41) is None  # within the first 40 steps never aligned
    assert aligned_from(_series([1, 2], [0.3, 0.2]), None) == 1
    assert aligned_from(None, 10) is None


def test_healthy_with_disagreeing_gradients_keeps_warmup() -> None:
    r = summarize(synthetic_run(cosine=lambda s: -0.3 if s % 3 else 0.2))
    assert r.verdict == HEALTHY
    assert r.cosine_negative_fraction == pytest.approx(2 / 3, abs=0.02)
    assert "consecutive gradients disagreed during warmup" in r.advice[0]
    assert r.advice[0].endswith("keep at least 100 warmup steps")


def test_transient_only_is_healthy() -> None:
    r = summarize(synthetic_run(alerts=[_alert(50, "transient")]))
    assert r.verdict == HEALTHY
    assert r.advice[0].startswith("1 excursion recovered at once (transient alerts at step 50)")


def test_an_episode_closed_by_transient_is_not_instability_but_a_loss_spike_is() -> None:
    closed = _alert(53, "transient", episode_start=50, episode_steps=3)
    quiet = [_alert(50, "loss_trend_spike"), _alert(52, "loss_divergence"), closed]
    assert summarize(synthetic_run(alerts=quiet)).verdict == HEALTHY
    assert summarize(synthetic_run(alerts=quiet[:2])).verdict == RECOVERED
    spike = summarize(synthetic_run(alerts=[*quiet, _alert(51, "loss_spike")]))
    assert spike.verdict == RECOVERED and spike.instability_steps == [51]
    assert spike.advice[0] == "loss spiked once during warmup (step 51)"


def test_extended_warmup_advice_uses_the_extension_details() -> None:
    plan = [100.0] * 40 + [200.0] * 40 + [300.0] * 320
    alerts = [
        _alert(30, "loss_spike"),
        _alert(32, "loss_spike"),
        _alert(39, "warmup_extended", old_warmup_steps=100, new_warmup_steps=200),
        _alert(70, "loss_spike"),
        _alert(79, "warmup_extended", old_warmup_steps=200, new_warmup_steps=300),
    ]
    r = summarize(synthetic_run(warmup=plan, alerts=alerts))
    assert r.verdict == RECOVERED
    assert [(e.step, e.old, e.new) for e in r.extensions] == [(39, 100, 200), (79, 200, 300)]
    assert (r.planned_warmup, r.effective_warmup) == (100, 300)
    assert r.advice[0] == "loss spiked 3 times during warmup (steps 30, 32, 70)"
    lr_30 = 1e-3 * 31 / 100  # the lowest lr at an instability alert (step 30)
    assert r.advice[1] == (
        "warmup was extended twice, from 100 to 300 steps: start with at least 300 warmup steps "
        f"next time, or lower the peak lr to about {0.5 * lr_30:.3g} (half of {lr_30:.3g}, the "
        "lowest lr at which instability was seen)"
    )


def test_extensions_inferred_when_details_are_missing() -> None:
    plan = _series([0, 1, 2, 3], [10, 10, 15, 15])
    found = extensions([_alert(1, "warmup_extended")], plan)
    assert [(e.step, e.old, e.new) for e in found] == [(1, 10, 15)]
    assert [(e.step, e.old, e.new) for e in extensions([], plan)] == [(2, 10, 15)]


def test_unstable_to_the_end() -> None:
    alerts = [_alert(s, "loss_spike") for s in (150, 390, 395)]
    r = summarize(synthetic_run(alerts=alerts, loss=lambda s: 2.0 if s < 150 else 40.0))
    assert r.verdict == UNSTABLE
    assert r.advice[0] == "loss spiked 3 times after warmup (steps 150, 390, 395)"
    assert r.advice[1].startswith("instability began after warmup (step 150, lr 0.001)")
    assert "lower the peak lr to about 0.0005 (half of 0.001," in r.advice[1]
    # 400 logged steps: the last 40 (from step 360) must be quiet.
    assert r.verdict_reason == (
        "an instability alert at step 395, within the last 40 logged steps (from step 360): "
        "not recovered"
    )


def test_a_gradient_norm_notice_alone_changes_neither_the_verdict_nor_the_advice() -> None:
    """Issue 20: a gradient-norm spike predicts nothing on the corpus of real runs; the report
    no longer advises clipping from it."""
    r = summarize(synthetic_run(alerts=[_alert(10, "grad_norm_spike")]))
    assert r.verdict == HEALTHY
    assert r.advice == summarize(synthetic_run()).advice


def test_without_alert_records_the_unstable_flag_is_used() -> None:
    flag = _series(range(400), [1.0 if s == 7 else 0.0 for s in range(400)])
    r = summarize(synthetic_run(source="none", extra={"unstable": flag}))
    assert r.alerts_by_kind == {"unknown (no alert file)": [7]}
    assert r.verdict == RECOVERED


# ---------------------------------------------------------------------------------- rendering


def test_html_and_json_escape_and_serialize(real_run: str) -> None:
    run = load_run(real_run, name="<script>alert(1)</script>")
    run.alerts[0].message = "<img src=x onerror=alert(2)>"
    summary = summarize(run)
    png = render_png([run], [summary])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = render_html([summary], png, errors=["<b>bad</b>"])
    assert "<script>" not in page and "<img src=x" not in page and "<b>bad" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "data:image/png;base64," in page
    assert html.escape(summary.verdict_reason) in page
    doc = to_json([summary])
    json.dumps(doc, allow_nan=False)
    assert doc["runs"][0]["alerts_by_kind"] == jsonl_by_kind(real_run)


def test_downsample_keeps_spikes() -> None:
    steps = np.arange(100_000)
    values = np.ones(100_000)
    values[54_321] = 1e6
    x, y = downsample(steps, values, 1000)
    assert x.size <= 1000 and 54_321 in x.tolist() and y.max() == 1e6


# ---------------------------------------------------------------------------------- layering


@pytest.mark.parametrize(
    "module",
    [
        "report/__init__.py",
        "report/events.py",
        "report/runs.py",
        "report/analysis.py",
        "report/render.py",
        "report/figure.py",
        "report/episodes.py",
        "report/wording.py",
        "schema.py",
        "advice.py",
        "cli.py",
        "tb_plugin/__init__.py",
        "tb_plugin/plugin.py",
    ],
)
def test_offline_tools_import_neither_lightning_nor_the_callback(module: str) -> None:
    import warmup_monitor

    path = Path(warmup_monitor.__file__).parent / module
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    forbidden = {"torch", "pytorch_lightning", "lightning", "warmup_monitor.callback"}
    assert not {m for m in imported if m.split(".")[0] in forbidden or m in forbidden}


@pytest.mark.parametrize("tag", ["val_loss", "val/loss", "validation/loss", "val_loss_epoch"])
def test_validation_loss_is_read_when_logged(tmp_path: Path, tag: str) -> None:
    write_scalars(
        tmp_path,
        {
            "warmup/lr": [(0, 0.1), (1, 0.2)],
            "warmup/loss": [(0, 2.0), (1, 1.5)],
            "warmup/warmup_steps": [(0, 2.0), (1, 2.0)],
            "train/loss": [(0, 2.0)],
            tag: [(1, 1.75)],
        },
    )
    run = load_run(str(tmp_path))
    assert run.extra["val_loss"].steps.tolist() == [1]
    assert run.extra["val_loss"].values.tolist() == [1.75]
