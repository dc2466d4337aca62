"""A real Lightning run whose warmup pushes the lr just past the stability limit: the loss climbs
slowly, and the monitor says so before the loss has doubled from its minimum."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import read_scalars
from torch.utils.data import DataLoader, IterableDataset

from warmup_monitor import WarmupMonitor
from warmup_monitor.alerts import ALERTS_FILENAME, is_instability, read_alerts

WARMUP, STEPS, BATCH = 100, 130, 1024
#: The rules for a sustained rise (the consecutive-gradient cosine also turns negative here,
#: and ``oscillation`` fires first: it alone would not show that these rules work).
RISES = ("loss_divergence", "grad_norm_rise")


def _data() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares in 16 dimensions, and its full-batch stability limit ``2 / lambda_max``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) * torch.linspace(0.3, 2.0, 16)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(2048, 1, generator=g)
    xa = torch.cat([x, torch.ones(2048, 1)], 1).double()
    hessian = 2.0 * xa.T @ xa / len(xa)  # of the mean squared error of a linear model
    return x, y, 2.0 / float(torch.linalg.eigvalsh(hessian).max())


class _Batches(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            idx = torch.randint(0, len(self.x), (BATCH,), generator=g)
            yield self.x[idx], self.y[idx]


def _module(pl: Any, peak: float, own_schedule: bool) -> Any:
    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=peak)
            if not own_schedule:
                return opt
            ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / WARMUP))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}

    return Regression()


@pytest.mark.parametrize("warmup", ["monitor", "scheduler"])
def test_a_slow_divergence_during_warmup_is_flagged_before_the_loss_doubles(
    tmp_path: os.PathLike[str], warmup: str
) -> None:
    import pytorch_lightning as pl

    x, y, limit = _data()
    peak = 1.05 * limit  # the linear warmup crosses 2 / lambda_max at 95 % of its length
    if warmup == "monitor":  # the monitor applies the linear warmup to a constant lr
        monitor = WarmupMonitor(warmup_steps=WARMUP, schedule="linear")
    else:  # the user's own LambdaLR ramps the lr; the monitor only watches
        monitor = WarmupMonitor(warmup_steps=WARMUP)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[monitor],
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(
        _module(pl, peak, warmup == "scheduler"), DataLoader(_Batches(x, y), batch_size=None)
    )

    losses = read_scalars(trainer.log_dir)["warmup/loss"]
    steps = sorted(losses)
    assert steps == list(range(STEPS))
    low = min(steps, key=lambda s: losses[s])
    doubled = next((s for s in steps if s > low and losses[s] >= 2.0 * losses[low]), None)
    assert doubled is not None, "the setup should diverge within the run"
    assert doubled - low >= 8, "a slow climb, not a jump"
    assert all(math.isfinite(v) for v in losses.values())

    alerts = read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))
    seen = [(a.step, str(a.kind.value)) for a in alerts]
    # An instability alert on a step of the climb, before the loss has doubled; with alerts
    # grouped into episodes, an episode whose flagged steps include one there.
    for kinds in (None, RISES):  # any instability kind; then the rules for a sustained rise
        direct = [
            a.step
            for a in alerts
            if is_instability(a.kind) and (kinds is None or a.kind in kinds)
            if low <= a.step < doubled
        ]
        grouped = [
            s
            for a in alerts
            if a.kind == "episode_end"
            and any(is_instability(k) and (kinds is None or k in kinds) for k in a.details["kinds"])
            for first, last in a.details["steps"]
            for s in range(first, last + 1)
            if low <= s < doubled
        ]
        assert direct or grouped, (kinds, low, doubled, seen)

    from warmup_monitor.report.analysis import HEALTHY, summarize
    from warmup_monitor.report.runs import load_run

    assert summarize(load_run(trainer.log_dir)).verdict != HEALTHY
