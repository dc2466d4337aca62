"""A warning, once, where a setting contradicts the run (issue 22, items 3-5)."""

from __future__ import annotations

import csv
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import fit, make_loader, tiny_module_class

from warmup_monitor import WarmupMonitor, Window
from warmup_monitor.alerts import ALERTS_FILENAME, alerts_path


def _matching(record: pytest.WarningsRecorder, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def test_warns_once_when_the_scheduler_still_ramps_after_warmup_steps(
    tmp_path: os.PathLike,
) -> None:
    import pytorch_lightning as pl

    # The user's LambdaLR warms up over 10 steps (peak at step 9); the monitor was told 4.
    model = tiny_module_class(pl)(lr=0.05, warmup=10)
    monitor = WarmupMonitor(warmup_steps=4, window=Window(post_warmup_steps=12))
    with pytest.warns(UserWarning, match="still raised the lr") as record:
        fit(pl, tmp_path, [monitor], model=model, max_steps=16)
    (message,) = _matching(record, "still raised the lr")
    assert "WarmupMonitor.warmup_steps=4" in message
    assert "stopped rising at step 9" in message


def test_no_ramp_warning_when_the_scheduler_warms_up_as_planned(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    model = tiny_module_class(pl)(lr=0.05, warmup=4)
    monitor = WarmupMonitor(warmup_steps=4, window=Window(post_warmup_steps=8))
    fit(pl, tmp_path, [monitor], model=model, max_steps=12)  # a warning would be an error


def test_warns_once_when_the_epochs_end_inside_warmup(tmp_path: os.PathLike) -> None:
    import pytorch_lightning as pl

    # 8 batches per epoch, 4 accumulated per optimizer step, 3 epochs: 6 optimizer steps.
    with pytest.warns(UserWarning, match="longer than the run") as record:
        trainer = fit(
            pl, tmp_path, [WarmupMonitor(warmup_steps=10)], max_steps=-1, max_epochs=3,
            accumulate_grad_batches=4, loader=make_loader(n=32, batch_size=4),
        )  # fmt: skip
    assert trainer.global_step == 6
    (message,) = _matching(record, "longer than the run")
    assert "WarmupMonitor.warmup_steps=10" in message
    assert "6 optimizer steps" in message


def test_says_once_where_the_alerts_file_goes_without_a_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pytorch_lightning as pl

    with caplog.at_level(logging.WARNING, logger="warmup_monitor"):
        monitor = WarmupMonitor(warmup_steps=4)
        fit(pl, tmp_path, [monitor], max_steps=4, logger=False)
    expected = os.path.abspath(tmp_path / ALERTS_FILENAME)
    said = [r.getMessage() for r in caplog.records if "WarmupMonitor.alerts_file" in r.getMessage()]
    assert len(said) == 1
    assert expected in said[0]
    assert all(
        r.levelno == logging.WARNING for r in caplog.records if "alerts_file" in r.getMessage()
    )
    assert os.path.abspath(alerts_path(monitor.alerts_file, monitor._log_dir)) == expected


# ------------------------------------------------------------- LearningRateMonitor (finding 2)


def _lr_monitor_warnings(tmp_path: os.PathLike, **monitor: Any) -> list[str]:
    import pytorch_lightning as pl

    callbacks = [WarmupMonitor(warmup_steps=4, **monitor), pl.callbacks.LearningRateMonitor()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(pl, tmp_path, callbacks, max_steps=4, log_every_n_steps=1)
    return [str(w.message) for w in record if "LearningRateMonitor" in str(w.message)]


def test_warns_once_when_a_learning_rate_monitor_cannot_see_the_factor(
    tmp_path: os.PathLike,
) -> None:
    (message,) = _lr_monitor_warnings(tmp_path, schedule="linear")
    assert "WarmupMonitor.schedule='linear'" in message
    assert "`warmup/lr` key" in message


@pytest.mark.parametrize("adaptive", [False, True])
def test_lr_monitor_warning_only_where_the_monitor_scales_the_lr(
    tmp_path: os.PathLike, adaptive: bool
) -> None:
    said = _lr_monitor_warnings(tmp_path, adaptive=adaptive)
    assert len(said) == (1 if adaptive else 0)  # watch-only: the scheduler's lr is the lr used


def test_learning_rate_monitor_shows_the_schedulers_lr_not_the_lr_used(
    tmp_path: os.PathLike,
) -> None:
    """The finding itself: at step 0 with ``schedule="linear"`` the update used 1 / W of the
    lr, while LearningRateMonitor logs the scheduler's lr (read from a CSVLogger)."""
    import pytorch_lightning as pl

    warmup, lr = 4, 0.05
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    callbacks = [
        WarmupMonitor(warmup_steps=warmup, schedule="linear"),
        pl.callbacks.LearningRateMonitor(logging_interval="step"),
    ]
    with pytest.warns(UserWarning, match="LearningRateMonitor logs the lr your scheduler set"):
        fit(
            pl, tmp_path, callbacks, model=tiny_module_class(pl)(lr=lr, optimizer="plain_sgd"),
            max_steps=warmup, logger=logger, log_every_n_steps=1,
        )  # fmt: skip
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    at_zero = [r for r in rows if r["step"] == "0"]
    shown = [float(r["lr-SGD"]) for r in at_zero if r.get("lr-SGD")]
    used = [float(r["warmup/lr"]) for r in at_zero if r.get("warmup/lr")]
    assert shown == [pytest.approx(lr)]  # the scheduler's lr
    assert used == [pytest.approx(lr / warmup)]  # the linear factor (0 + 1) / W on it
    assert shown[0] != pytest.approx(used[0])
