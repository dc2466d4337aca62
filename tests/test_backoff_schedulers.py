"""Adaptive back-off under a user scheduler that does not ramp up (``schedule=None``): the lr
really goes down, then re-warms no faster than a ``warmup_steps``-step ramp, never above the
scheduler's own lr."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, tiny_module_class

from warmup_monitor import AdaptiveWarmup, Alert, Detection, WarmupMonitor

W0 = 10
SPIKE_AT = 6
STEPS = 30


def _scheduler(name: str, opt: torch.optim.Optimizer) -> Any:
    s = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "plateau":
        return {"scheduler": s.ReduceLROnPlateau(opt, patience=1000), "monitor": "train_loss",
                "interval": "step"}  # fmt: skip
    if name == "exponential":
        return {"scheduler": s.ExponentialLR(opt, gamma=0.98), "interval": "step"}
    return {"scheduler": s.CosineAnnealingWarmRestarts(opt, T_0=5), "interval": "step"}


class _Lrs(pl.Callback):
    """The lr each update used (inside optimizer.step, after the monitor's factor, read by a
    pre-hook registered after the monitor's) and the scheduler's lr (before the step)."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.scheduler: list[float] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(lambda o, a, k: self.used.append(o.param_groups[0]["lr"]))

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        # Before optimizer.step: its pre-hooks (the factor) run before the closure.
        self.scheduler.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.mark.parametrize("name", ["constant", "plateau", "exponential", "warm_restarts"])
def test_a_back_off_lowers_the_lr_of_a_scheduler_that_does_not_ramp_up(
    tmp_path: os.PathLike, name: str
) -> None:
    base = tiny_module_class(pl)

    class Model(base):  # type: ignore[misc,valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss.detach())
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            sched = _scheduler(name, opt)
            return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    model = Model(scripted=lambda s: 30.0 if s == SPIKE_AT else 1.0 - 0.01 * s)
    alerts: list[Alert] = []
    lrs = _Lrs()
    monitor = WarmupMonitor(
        warmup_steps=W0,
        adaptive=AdaptiveWarmup(rollback=False),
        detection=Detection(episodes=False),
        on_alert=alerts.append,
    )
    fit(pl, tmp_path, [monitor, lrs], model=model, max_steps=STEPS)
    kinds = [(a.step, a.kind_name) for a in alerts]
    assert (SPIKE_AT, "lr_backoff") in kinds, kinds
    used, sched = lrs.used, lrs.scheduler
    assert len(used) == len(sched) == STEPS
    # Before the action: the scheduler's lr, untouched.
    assert used[: SPIKE_AT + 1] == sched[: SPIKE_AT + 1]
    # The next update's lr is really lower: half the scheduler's (backoff=0.5), about.
    ratio = used[SPIKE_AT + 1] / sched[SPIKE_AT + 1]
    assert 0.45 < ratio < 0.6, ratio
    # Never above the scheduler's lr; no one-step rise above the scheduler's own rise plus
    # that of a linear W0-step ramp; back to the scheduler's lr by the end of the re-warm.
    for t in range(STEPS - 1):
        assert used[t] <= sched[t] * (1 + 1e-12)
        own = max(0.0, sched[t + 1] - sched[t])
        assert used[t + 1] - used[t] <= own + sched[t] / W0 * (1 + 1e-9), t
    assert used[-1] == pytest.approx(sched[-1], rel=1e-9)


def test_the_flat_plan_survives_a_state_round_trip() -> None:
    from warmup_monitor.alerts import AlertKind
    from warmup_monitor.controller import WarmupController

    c = WarmupController(warmup_steps=W0, shape=None, adaptive=AdaptiveWarmup(rollback=False))
    for t in range(5):
        c.record_user_lr(t, 0.1 * 0.9**t)  # a decaying scheduler
        assert c.factor(t) == 1.0
    c.observe(4, [Alert(4, AlertKind.LOSS_SPIKE, "spike")], lr=0.1 * 0.9**4)
    assert c.factor(5) < 0.6
    copy = WarmupController(warmup_steps=W0, shape=None, adaptive=AdaptiveWarmup(rollback=False))
    copy.load_state_dict(c.state_dict())
    assert [copy.factor(t) for t in range(5, 40)] == [c.factor(t) for t in range(5, 40)]
