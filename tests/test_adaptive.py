"""Warmup applied and lengthened by the monitor, in real Lightning training."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, read_scalars, ten_x_only, tiny_module_class

from warmup_monitor import AdaptiveWarmup, Alert, WarmupMonitor
from warmup_monitor.alerts import ALERTS_FILENAME, read_alerts
from warmup_monitor.controller import WarmupExhaustedError


def _model(scheduler: str | None = None, **kwargs: Any) -> pl.LightningModule:
    base = tiny_module_class(pl)

    class WithScheduler(base):  # type: ignore[misc,valid-type]
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            if scheduler is None:
                return opt
            if scheduler == "exponential":
                sched: Any = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            else:
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return WithScheduler(**kwargs)


class LrRecorder(pl.Callback):
    """The lr each update really used (inside optimizer.step) and the scheduler's lr after."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.after: list[float] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        # Registered after the monitor's pre-hook: sees the lr the update uses.
        opt.register_step_pre_hook(lambda o, a, k: self.used.append(float(o.param_groups[0]["lr"])))

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.after.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.mark.parametrize("scheduler", [None, "exponential", "step"])
def test_schedule_multiplies_the_users_lr_without_compounding(
    tmp_path: os.PathLike, scheduler: str | None
) -> None:
    rec = LrRecorder()
    monitor = WarmupMonitor(warmup_steps=5, schedule="linear", detection=ten_x_only())
    trainer = fit(pl, tmp_path, [monitor, rec], model=_model(scheduler), max_steps=8)
    # The user's scheduler alone, computed independently.
    if scheduler is None:
        sched_lr = [0.1] * 8
    elif scheduler == "exponential":
        sched_lr = [0.1 * 0.9**t for t in range(8)]
    else:
        sched_lr = [0.1 * 0.5 ** (t // 3) for t in range(8)]
    factor = [min(1.0, (t + 1) / 5) for t in range(8)]
    assert rec.used == pytest.approx([s * f for s, f in zip(sched_lr, factor, strict=True)])
    # The scheduler never saw the factor: its lr after each step is its own.
    if scheduler is None:
        after_last = 0.1
    elif scheduler == "exponential":
        after_last = 0.1 * 0.9**8
    else:
        after_last = 0.1 * 0.5 ** (8 // 3)
    next_sched = [*sched_lr[1:], after_last]
    assert rec.after == pytest.approx(next_sched)
    scalars = read_scalars(trainer.log_dir)
    for t in range(8):
        assert scalars["warmup/lr"][t] == pytest.approx(rec.used[t], rel=1e-6)
        assert scalars["warmup/lr_factor"][t] == pytest.approx(factor[t], rel=1e-6)
        assert scalars["warmup/warmup_steps"][t] == 5.0


def _spiky(values: dict[int, float]) -> Any:
    return lambda step: values.get(step, 1.0)


def test_instability_extends_warmup_without_an_lr_jump(tmp_path: os.PathLike) -> None:
    rec = LrRecorder()
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=True,
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    model = _model(scripted=_spiky({4: 20.0}))
    trainer = fit(pl, tmp_path, [monitor, rec], model=model, max_steps=20)
    kinds = [(a.step, a.kind.value) for a in hooked]
    assert kinds == [(4, "loss_spike"), (4, "warmup_extended")]
    ext = hooked[1]
    assert ext.details["old_warmup_steps"] == 10
    assert ext.details["new_warmup_steps"] == 15  # + 0.5 x 10
    # Independent expectation: linear to step 4, then a straight line from factor(4) = 0.5 to
    # 1 at step 14 (the last warmup update of the new plan): no jump, no drop.
    expected = [(t + 1) / 10 for t in range(5)]
    expected += [0.5 + 0.5 * min(1.0, (t - 4) / 10) for t in range(5, 20)]
    assert [u / 0.1 for u in rec.used] == pytest.approx(expected)
    increments = [b - a for a, b in itertools.pairwise(expected)]
    assert max(increments) <= 0.1 + 1e-12 and min(increments) >= 0
    scalars = read_scalars(trainer.log_dir)
    # The plan logged at a step is the one in force after that step's decisions.
    assert scalars["warmup/warmup_steps"][3] == 10.0
    assert scalars["warmup/warmup_steps"][4] == 15.0
    on_disk = read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))
    assert [a.kind.value for a in on_disk] == ["loss_spike", "warmup_extended"]


def test_users_scheduler_warms_up_and_the_monitor_slows_it(tmp_path: os.PathLike) -> None:
    rec = LrRecorder()
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=6, adaptive=True, detection=ten_x_only(), on_alert=hooked.append
    )
    model = tiny_module_class(pl)(
        lr=0.1, warmup=6, optimizer="plain_sgd", scripted=_spiky({3: 20.0})
    )
    fit(pl, tmp_path, [monitor, rec], model=model, max_steps=12)
    ext = [a for a in hooked if a.kind.value == "warmup_extended"]
    assert len(ext) == 1 and ext[0].details["new_warmup_steps"] == 9
    # The user's linear warmup (lr 0.1 (t+1)/6), stretched after step 3: from 4/6 at step 3 in
    # a straight line to 1 at step 8, the last update of the 9-step plan. No drop, no jump.
    planned = [(t + 1) / 6 for t in range(4)]
    planned += [4 / 6 + (1 - 4 / 6) * min(1.0, (t - 3) / 5) for t in range(4, 12)]
    assert rec.used == pytest.approx([0.1 * p for p in planned])
    users = [0.1 * min(1.0, (t + 1) / 6) for t in range(12)]
    assert all(u <= s + 1e-12 for u, s in zip(rec.used, users, strict=True))


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_exhausted_caps_stop_or_raise(tmp_path: os.PathLike, action: str) -> None:
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=4,
        schedule="linear",
        adaptive=AdaptiveWarmup(max_extensions=1, on_exhausted=action),  # type: ignore[arg-type]
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    # Spikes at 1 and, after the cooldown of 5 steps, at 6 (inside the extended warmup of 6
    # steps plus its grace step): the second finds the caps used.
    model = _model(scripted=_spiky({1: 20.0, 6: 20.0}))
    if action == "raise":
        with pytest.raises(WarmupExhaustedError, match="lower the peak lr"):
            fit(pl, tmp_path, [monitor], model=model, max_steps=12)
    else:
        trainer = fit(pl, tmp_path, [monitor], model=model, max_steps=12)
        assert trainer.global_step == 7  # stopped right after the step that exhausted the caps
    kinds = [(a.step, a.kind.value) for a in hooked]
    assert kinds == [
        (1, "loss_spike"),
        (1, "warmup_extended"),
        (6, "loss_spike"),
        (6, "warmup_exhausted"),
    ]
    exhausted = hooked[-1]
    assert exhausted.details["action"] == action
    assert math.isfinite(exhausted.details["recommended_lr"])


def test_controller_state_survives_a_checkpoint(tmp_path: os.PathLike) -> None:
    ckpt_dir = os.path.join(str(tmp_path), "ckpt")

    def monitor() -> WarmupMonitor:
        return WarmupMonitor(
            warmup_steps=10, schedule="linear", adaptive=True, detection=ten_x_only()
        )

    first = monitor()
    with pytest.warns(UserWarning, match="longer than"):
        fit(
            pl,
            tmp_path,
            [first, pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
            model=_model(scripted=_spiky({2: 20.0})),
            max_steps=8,
            enable_checkpointing=True,
        )
    second = monitor()
    rec = LrRecorder()
    fit(
        pl,
        tmp_path,
        [second, rec],
        model=_model(scripted=_spiky({2: 20.0})),
        max_steps=12,
        ckpt_path=os.path.join(ckpt_dir, "last.ckpt"),
    )
    assert second.engine.controller is not None
    controller = second.engine.controller
    assert controller.warmup_steps == 15 and controller.extensions == 1
    # Continues the extended ramp: from factor(2) = 0.3 at step 2 to 1 at step 14.
    expected = [0.3 + 0.7 * (t - 2) / 12 for t in range(8, 12)]
    assert [u / 0.1 for u in rec.used] == pytest.approx(expected)
