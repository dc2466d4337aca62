"""Every logger the monitor logs through: the report reads a ``CSVLogger`` run, an MLflow
file-store run and an alerts file alone as it reads a TensorBoard run, and each alert reaches
the loggers that take text (TensorBoard text, MLflow artifacts, a W&B table).

Each twin is the same real training (same seed, same data, the same tiny model whose lr jumps
40x for two steps after step 12: a loss spike the run recovers from), logged once through a
``TensorBoardLogger`` and once through the other logger; the report of each is made by the
functions the CLI uses (``load_run`` then ``summarize``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import NAMESPACES, fit, make_loader, tiny_module_class
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from warmup_monitor import Statistics, WarmupMonitor
from warmup_monitor.cli import main
from warmup_monitor.report import RECOVERED, RunSummary, load_run, summarize
from warmup_monitor.schema import ALERTS_FILENAME, Alert, AlertKind

JUMP_AT, JUMP_FOR, JUMP = 12, 2, 40.0
STEPS = 48


class Jumping(tiny_module_class(pl)):  # type: ignore[misc]
    """The tiny model, its SGD lr multiplied by ``JUMP`` for ``JUMP_FOR`` steps from
    ``JUMP_AT``: the loss spikes, then comes back."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: JUMP if JUMP_AT <= k < JUMP_AT + JUMP_FOR else 1.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(root: Path, logger: Any) -> pl.Trainer:
    """The real run: 48 optimizer steps on CPU, warmup 8, per-group keys on."""
    monitor = WarmupMonitor(warmup_steps=8, statistics=Statistics(layers="auto"))
    return fit(
        pl,
        root,
        [monitor],
        model=Jumping(lr=0.05),
        max_steps=STEPS,
        loader=make_loader(n=64, batch_size=4),
        logger=logger,
        log_every_n_steps=1,
    )


def jsonl_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The alerts file's records, read with ``json`` (the independent truth)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report_of(path: str | os.PathLike[str]) -> RunSummary:
    """What ``warmup-monitor report`` computes for a run."""
    return summarize(load_run(str(path)))


def episodes_of(summary: RunSummary) -> list[dict[str, Any]]:
    return [e.to_dict() for e in summary.episodes]


@pytest.fixture(scope="module")
def tb_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TensorBoard run every other logger's run is compared with. The scenario is what the
    twins are about: a loss spike after the jump, and a run that recovered (a verdict that
    needs the logged loss, not only the alerts)."""
    root = tmp_path_factory.mktemp("tb")
    trainer = train(root, TensorBoardLogger(str(root), name="run", version=0))
    log_dir = Path(trainer.log_dir)
    records = jsonl_records(log_dir / ALERTS_FILENAME)
    spikes = [r["step"] for r in records if r["kind"] == "loss_spike"]
    assert spikes and JUMP_AT <= spikes[0] <= JUMP_AT + JUMP_FOR + 1
    assert any(r["kind"] == "episode_end" for r in records)
    tb = report_of(log_dir)
    assert tb.verdict == RECOVERED and len(tb.episodes) == 1
    return log_dir


def assert_same_report(other: RunSummary, tb: RunSummary) -> None:
    """Same verdict, same episodes, same flagged steps, same logged range and warmup."""
    assert other.verdict == tb.verdict
    assert episodes_of(other) == episodes_of(tb)
    assert other.instability_steps == tb.instability_steps
    assert other.alerts_by_kind == tb.alerts_by_kind
    assert (other.first_step, other.last_step, other.logged_steps) == (
        tb.first_step,
        tb.last_step,
        tb.logged_steps,
    )
    assert (
        (other.planned_warmup, other.effective_warmup)
        == (8, 8)
        == (
            tb.planned_warmup,
            tb.effective_warmup,
        )
    )


def test_csv_logger_run_reports_as_its_tensorboard_twin(tmp_path: Path, tb_twin: Path) -> None:
    """A CSVLogger-only run: every warmup/* key (per-group keys too) is read from its
    metrics.csv with the TensorBoard twin's steps and values (float32 in the event files),
    the alerts JSONL lies next to metrics.csv, and the report is the twin's."""
    trainer = train(tmp_path, CSVLogger(str(tmp_path), name="run_csv"))
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "metrics.csv").is_file() and (log_dir / ALERTS_FILENAME).is_file()
    assert jsonl_records(log_dir / ALERTS_FILENAME) == jsonl_records(tb_twin / ALERTS_FILENAME)

    csv_run, tb_run = load_run(str(log_dir)), load_run(str(tb_twin))
    assert csv_run.source == "csv" and csv_run.alerts_source == "jsonl"
    assert set(csv_run.series) == set(tb_run.series)
    assert any(k.startswith("layers/") for k in csv_run.series)
    for key, series in tb_run.series.items():
        got = csv_run.series[key]
        assert got.steps.tolist() == series.steps.tolist(), key
        assert np.allclose(
            got.values.astype(np.float32), series.values, rtol=1e-6, equal_nan=True
        ), key
    assert_same_report(summarize(csv_run), summarize(tb_run))


def test_cli_reports_a_csv_run_from_the_directory_a_user_gives(
    tmp_path: Path, tb_twin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``warmup-monitor report logs/run_csv`` (the logger's name folder, one version in it)
    and ``.../version_0`` (its log_dir) both exit 0 and print the twin's verdict; --out
    writes the report's files."""
    trainer = train(tmp_path / "logs", CSVLogger(str(tmp_path / "logs"), name="run_csv"))
    tb = report_of(tb_twin)
    out = tmp_path / "out"
    for given in (tmp_path / "logs" / "run_csv", Path(trainer.log_dir)):
        code = main(["report", str(given), "--out", str(out)])
        printed, err = capsys.readouterr()
        assert code == 0, err
        assert tb.verdict in printed and "run_csv" in printed
        assert (out / "report.png").stat().st_size > 0 and (out / "report.html").is_file()
        shutil.rmtree(out)
    # The notebook path reads the name folder too.
    assert report_of(tmp_path / "logs" / "run_csv").verdict == tb.verdict


def test_mlflow_file_store_run_reports_as_its_tensorboard_twin(
    tmp_path: Path, tb_twin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLflow file-store run (``MLFlowLogger(tracking_uri="file:...")``; MLflow 3 wants
    ``MLFLOW_ALLOW_FILE_STORE=true`` for it): reported with the twin's verdict and episodes,
    from its metrics and the alerts artifact; every alert is a line of the run's
    ``warmup_alerts.txt`` artifact, read back through MLflow's own client."""
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="twin", tracking_uri=uri)
    train(tmp_path, logger)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    run_dir = tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id

    expected = jsonl_records(tb_twin / ALERTS_FILENAME)
    names = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"warmup_alerts.txt", ALERTS_FILENAME} <= names
    text = Path(client.download_artifacts(logger.run_id, "warmup_alerts.txt", str(tmp_path)))
    lines = text.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(expected)
    for line, record in zip(lines, expected, strict=True):
        assert line.startswith(f"[step {record['step']}] {record['kind']}: ")

    ml = load_run(str(run_dir))
    assert ml.source == "mlflow" and ml.alerts_source == "jsonl"
    assert len(ml.alerts) == len(expected)
    assert_same_report(summarize(ml), report_of(tb_twin))
    # The tracking folder itself (what a user passes) holds one run: the CLI finds it.
    assert main(["report", str(tmp_path / "mlruns")]) == 0


def test_alerts_file_alone_is_reported_and_says_so(tmp_path: Path, tb_twin: Path) -> None:
    """A directory with warmup_alerts.jsonl and no scalars: a report, not an error, whose
    verdict says it rests on the alerts alone, in the text and in summarize's data."""
    only = tmp_path / "alerts_only"
    only.mkdir()
    shutil.copy(tb_twin / ALERTS_FILENAME, only / ALERTS_FILENAME)
    summary = report_of(only)
    tb = report_of(tb_twin)
    assert summary.source == "alerts" and summary.to_dict()["source"] == "alerts"
    assert "alerts alone" in summary.verdict_reason
    assert any("alerts only" in n for n in summary.notes)
    assert episodes_of(summary) == episodes_of(tb)
    assert summary.alerts_by_kind == tb.alerts_by_kind
    assert summary.logged_steps == 0
    # Without the loss, a recovery cannot be shown: the verdict says the run was unstable.
    assert summary.verdict != RECOVERED


def test_cli_reports_an_alerts_file_alone(
    tmp_path: Path, tb_twin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(tb_twin / ALERTS_FILENAME, tmp_path / ALERTS_FILENAME)
    code = main(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "alerts alone" in printed and "alerts only" in err
    assert (tmp_path / "out" / "report.html").is_file()


class TableLogger(Logger):
    """A Lightning logger with ``WandbLogger``'s public ``log_text(key, columns, data,
    dataframe, step)``, recording each call.

    Why not ``WandbLogger`` itself: it needs the ``wandb`` package (its constructor raises
    ``ModuleNotFoundError`` without it), which the tests do not install, and its ``log_text``
    sends the table to W&B. The monitor picks the loggers to send a table to by that public
    method, not by class, so this logger gets exactly the calls a ``WandbLogger`` gets; the
    test binds each recorded call to ``WandbLogger.log_text``'s real signature, so a call that
    ``WandbLogger`` would refuse fails here too.
    """

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.calls: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "table"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_text(
        self,
        key: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
    ) -> None:
        if self.fail:
            raise RuntimeError("the text service is down")
        self.calls.append({"key": key, "columns": columns, "data": data, "step": step})


def test_wandb_style_log_text_gets_every_alert_and_a_failing_one_is_said_once(
    tmp_path: Path, tb_twin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every alert reaches a logger's public ``log_text`` as a table row (the latest table
    holds them all, in order); a logger whose ``log_text`` raises does not stop training, is
    said once on the log, and the other sinks get every alert."""
    table, broken = TableLogger(), TableLogger(fail=True)
    tensorboard = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        trainer = train(tmp_path, [tensorboard, broken, table])
    assert trainer.global_step == STEPS  # trained to the end
    expected = jsonl_records(tb_twin / ALERTS_FILENAME)
    assert jsonl_records(Path(trainer.log_dir) / ALERTS_FILENAME) == expected
    assert len(table.calls) == len(expected)
    signature = inspect.signature(WandbLogger.log_text)
    for call, record in zip(table.calls, expected, strict=True):
        signature.bind(None, **call)  # a call WandbLogger.log_text accepts
        assert call["key"] == "warmup/alerts" and call["step"] == record["step"]
        assert call["columns"] == ["step", "kind", "message", "value", "threshold"]
    last = table.calls[-1]["data"]
    assert [(row[0], row[1]) for row in last] == [(r["step"], r["kind"]) for r in expected]
    assert [row[2] for row in last] == [" ".join(r["message"].split()) for r in expected]
    said = [r for r in caplog.records if "could not send the alert" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None


def test_csv_and_mlflow_readers_skip_and_name_what_they_cannot_read(tmp_path: Path) -> None:
    """A damaged metrics.csv or MLflow metric file is read as far as it goes: each bad row,
    cell or line is counted in a problem (the CLI exits 6), never a traceback; a step written
    again supersedes the later points, as in event files."""
    from warmup_monitor.report.sources import read_csv_metrics, read_mlflow_metrics

    (tmp_path / "metrics.csv").write_text(
        "step,warmup/lr,warmup/loss\n0,0.1,1.0\n1,0.2,\nx,0.3,0.5\n2,abc,0.4\n1,0.25,0.9\n"
    )
    data = read_csv_metrics(str(tmp_path))
    assert data.scalars["warmup/lr"].steps.tolist() == [0, 1]
    assert data.scalars["warmup/lr"].values.tolist() == [0.1, 0.25]  # step 1 written again
    assert data.scalars["warmup/loss"].steps.tolist() == [0, 1]
    assert data.scalars["warmup/loss"].values.tolist() == [1.0, 0.9]  # step 2 superseded
    assert data.problems == [
        "metrics.csv: 1 rows without a valid step; skipped",
        "metrics.csv: 1 cells that are not numbers; skipped",
    ]

    run = tmp_path / "mlruns" / "1" / "abc"
    (run / "metrics" / "warmup").mkdir(parents=True)
    (run / "meta.yaml").write_text("run_id: abc\n")
    (run / "metrics" / "warmup" / "lr").write_text("1 0.1 0\n2 nan 1\n3 oops 2\n4 0.3\n")
    got = read_mlflow_metrics(str(run))
    lr = got.scalars["warmup/lr"]
    assert lr.steps.tolist() == [0, 1] and lr.values[0] == 0.1 and np.isnan(lr.values[1])
    assert got.problems == ["metrics: 2 lines that are not '<time> <value> <step>'; skipped"]
    # What the report makes of it: a run without the monitor's other keys is still read.
    assert load_run(str(tmp_path / "mlruns")).source == "mlflow"


@pytest.mark.parametrize("ns", NAMESPACES, ids=lambda m: m.__name__)
def test_each_namespace_logger_that_takes_text_gets_a_sink(
    ns: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFlowLogger of either Lightning namespace gets the artifacts, a logger with a public
    log_text the table; CSVLogger and TensorBoardLogger (written by the dispatcher) none."""
    from warmup_monitor.logger_text import MlflowArtifacts, TableText, text_sinks

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers = [
        ns.loggers.MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}"),
        ns.loggers.CSVLogger(str(tmp_path)),
        ns.loggers.TensorBoardLogger(str(tmp_path)),
        TableLogger(),
    ]
    sinks = text_sinks(loggers, "warmup/alerts")
    assert [type(s) for s in sinks] == [MlflowArtifacts, TableText]
    assert sinks[0].logger is loggers[0] and sinks[1].logger is loggers[3]


def test_mlflow_artifacts_continue_what_the_run_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second fit (or a resume) into the same MLflow run adds its alerts after the ones the
    run's artifacts already hold, instead of replacing them."""
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from warmup_monitor.logger_text import MlflowArtifacts

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(tracking_uri=uri)
    first = Alert(3, AlertKind.LOSS_SPIKE, "loss 12 is 12x the initial loss", 12.0, 10.0)
    second = Alert(9, AlertKind.NON_FINITE, "the loss is nan", math.nan)
    MlflowArtifacts(logger)(first)
    MlflowArtifacts(logger)(second)  # a new fit: a new sink on the same run
    client = MlflowClient(uri)
    text = client.download_artifacts(logger.run_id, "warmup_alerts.txt", str(tmp_path))
    assert Path(text).read_text(encoding="utf-8").splitlines() == [
        "[step 3] loss_spike: loss 12 is 12x the initial loss (value 12.0, threshold 10.0)",
        "[step 9] non_finite: the loss is nan (value nan, threshold nan)",
    ]
    jsonl = client.download_artifacts(logger.run_id, ALERTS_FILENAME, str(tmp_path / "j"))
    assert [r["step"] for r in jsonl_records(jsonl)] == [3, 9]


def test_a_csv_run_without_the_monitor_is_said_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CSVLogger run of a plain Lightning model (no monitor): exit 5, naming the file and
    the logger, as for event files."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.0\n0,1,0.5\n")
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 5
    assert "metrics.csv holds none of the monitor's keys" in err and "CSVLogger" in err
