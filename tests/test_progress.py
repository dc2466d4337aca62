"""The warmup field of Lightning's progress bar (issue 22: ``warmup 120/500 x0.50``).

Real Trainers with a real ``TQDMProgressBar`` or ``RichProgressBar``; a callback asks the bar
for its metrics after each optimizer step, as the bar itself does. The expected text is
computed here from ``warmup_steps``, the step and the linear ramp ``(t + 1) / W``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
from conftest import make_loader, tiny_module_class
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from warmup_monitor import WarmupMonitor

WARMUP, STEPS = 8, 10


class BarReader(pl.Callback):
    """The progress bar's metrics after each optimizer step (``global_step`` -> metrics), and
    the TQDM bar's shown postfix at the start of the next batch."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, Any]] = {}
        self.postfix: dict[int, str] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        bar = trainer.progress_bar_callback
        self.metrics[trainer.global_step] = dict(bar.get_metrics(trainer, pl_module))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and trainer.global_step > 0:
            self.postfix[trainer.global_step] = str(bar.train_progress_bar.postfix)


def _fit(tmp_path: os.PathLike, bar: Any, **monitor: Any) -> tuple[pl.Trainer, BarReader]:
    reader = BarReader()
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[WarmupMonitor(warmup_steps=WARMUP, **monitor), reader, bar],
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=True,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(tiny_module_class(pl)(), make_loader(n=64))
    return trainer, reader


def _expected(taken: int, scaled: bool) -> str | None:
    """The field after ``taken`` optimizer steps, with the linear factor of the next update."""
    if taken >= WARMUP:
        return None
    factor = (taken + 1) / WARMUP  # (t + 1) / W for the update t = taken
    shown = f" x{factor:.2f}" if scaled and factor != 1.0 else ""
    return f"{taken}/{WARMUP}{shown}"


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_the_bar_shows_the_warmup_step_and_factor_while_warming_up(
    tmp_path: os.PathLike, bar: type, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer, reader = _fit(tmp_path, bar(), schedule="linear")
    assert sorted(reader.metrics) == list(range(1, STEPS + 1))
    for taken, metrics in reader.metrics.items():
        assert metrics.get("warmup") == _expected(taken, scaled=True), taken
    assert reader.metrics[3]["warmup"] == "3/8 x0.50"  # written out: (3 + 1) / 8
    if bar is TQDMProgressBar:  # what the bar showed: tqdm prints a string as is
        assert sorted(reader.postfix) == list(range(1, STEPS))
        for taken, shown in reader.postfix.items():
            text = _expected(taken, scaled=True)
            assert (f"warmup={text}" in shown) if text else ("warmup=" not in shown), shown
    # The wrapper is gone after the fit: the bar's own metrics again.
    assert "warmup" not in trainer.progress_bar_callback.get_metrics(
        trainer, trainer.lightning_module
    )
    capsys.readouterr()


def test_watch_only_shows_the_step_without_a_factor(
    tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str]
) -> None:
    _, reader = _fit(tmp_path, TQDMProgressBar())
    for taken, metrics in reader.metrics.items():
        assert metrics.get("warmup") == _expected(taken, scaled=False), taken
    capsys.readouterr()


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_progress_bar_false_leaves_the_bar_alone(
    tmp_path: os.PathLike, bar: type, capsys: pytest.CaptureFixture[str]
) -> None:
    _, reader = _fit(tmp_path, bar(), schedule="linear", progress_bar=False)
    assert reader.metrics and all("warmup" not in m for m in reader.metrics.values())
    capsys.readouterr()


def test_progress_bar_must_be_a_bool_and_survives_a_copy() -> None:
    import pickle

    with pytest.raises(TypeError, match=r"`WarmupMonitor\.progress_bar` must be True or False"):
        WarmupMonitor(warmup_steps=4, progress_bar="yes")  # type: ignore[arg-type]
    off = WarmupMonitor(warmup_steps=4, progress_bar=False)
    assert pickle.loads(pickle.dumps(off)).progress_bar is False
    assert pickle.loads(pickle.dumps(WarmupMonitor(warmup_steps=4))).progress_bar is True


def test_an_extended_warmup_and_its_back_off_show_at_once(
    tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spike at step 12, after the 10-step warmup: the back-off halves the factor and the
    warmup is extended by extend_fraction x 10 steps past step 12 (to 23 steps); the factor
    re-warms on the straight line from 0.5 at step 12 to 1 at step 22, the new last warmup
    update. The field reappears at once with the new length and factor."""
    from conftest import ten_x_only

    from warmup_monitor import AdaptiveWarmup

    warmup, spike, steps = 10, 12, 24
    new_end = (spike + 1) + warmup  # extend_fraction=1.0: + 1.0 x 10 past the spike's step
    reader = BarReader()
    monitor = WarmupMonitor(
        warmup_steps=warmup,
        schedule="linear",
        adaptive=AdaptiveWarmup(backoff=0.5, cooldown_steps=0, rollback=False),
        detection=ten_x_only(),
    )
    model = tiny_module_class(pl)(scripted=lambda s: 20.0 if s == spike else 1.0)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[monitor, reader, TQDMProgressBar()], logger=False,
        default_root_dir=str(tmp_path), enable_progress_bar=True, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, make_loader(n=128))
    for taken in range(warmup, spike + 1):
        assert "warmup" not in reader.metrics[taken], taken  # warmup done at factor 1
    for taken in range(spike + 1, steps + 1):
        factor = min(1.0, 0.5 + 0.5 * (taken - spike) / (new_end - 1 - spike))
        shown = f" x{factor:.2f}" if factor != 1.0 else ""
        text = f"{taken}/{new_end}{shown}" if taken < new_end else None
        assert reader.metrics[taken].get("warmup") == text, taken
    capsys.readouterr()
