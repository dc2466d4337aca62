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


#: The plan's mechanics are pinned without a back-off and with + W0 / 2 per extension; the
#: defaults' policy has its own tests below.
NO_BACKOFF = AdaptiveWarmup(backoff=1.0, extend_fraction=0.5, rollback=False)


def test_instability_extends_warmup_without_an_lr_jump(tmp_path: os.PathLike) -> None:
    rec = LrRecorder()
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=10,
        schedule="linear",
        adaptive=NO_BACKOFF,
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
        warmup_steps=6, adaptive=NO_BACKOFF, detection=ten_x_only(), on_alert=hooked.append
    )
    model = tiny_module_class(pl)(
        lr=0.1, warmup=6, optimizer="plain_sgd", scripted=_spiky({3: 20.0})
    )
    fit(pl, tmp_path, [monitor, rec], model=model, max_steps=12)
    ext = [a for a in hooked if a.kind.value == "warmup_extended"]
    assert len(ext) == 1 and ext[0].details["new_warmup_steps"] == 9
    # The recorded ramp L(s) = 0.1 min(1, (s + 1) / 6), stretched after step 3 over schedule
    # time [3, 6] onto the steps [3, 9]: u(t) = 3 + (t - 3) / 2, the lr L(u(t)) (linear
    # between steps). No drop, no jump: it reaches the peak at u = 5, step 7.
    planned = [(t + 1) / 6 for t in range(4)]
    planned += [min(1.0, (3 + (t - 3) / 2 + 1) / 6) for t in range(4, 12)]
    assert rec.used == pytest.approx([0.1 * p for p in planned])
    users = [0.1 * min(1.0, (t + 1) / 6) for t in range(12)]
    assert all(u <= s + 1e-12 for u, s in zip(rec.used, users, strict=True))


@pytest.mark.parametrize("action", ["stop", "raise"])
def test_exhausted_caps_stop_or_raise(tmp_path: os.PathLike, action: str) -> None:
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=4,
        schedule="linear",
        adaptive=AdaptiveWarmup(
            max_extensions=1,
            on_exhausted=action,  # type: ignore[arg-type]
            backoff=1.0,
            extend_fraction=0.5,
            grace_steps=1,
            rollback=False,
        ),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    # Spikes at 1 and, after the cooldown of 5 steps, at 6 (inside the extended warmup of 6
    # steps plus its grace step): the second finds the caps used.
    model = _model(scripted=_spiky({1: 20.0, 6: 20.0}))
    if action == "raise":
        with pytest.raises(WarmupExhaustedError, match="use a peak lr of at most"):
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
            warmup_steps=10, schedule="linear", adaptive=NO_BACKOFF, detection=ten_x_only()
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


# ------------------------------------------------------------------------- Hugging Face ramps


def _hf_linear(step: int, w: int, total: int) -> float:
    """transformers' ``_get_linear_schedule_with_warmup_lr_lambda``, written out again."""
    if step < w:
        return float(step) / float(max(1, w))
    return max(0.0, float(total - step) / float(max(1, total - w)))


def _hf_cosine(step: int, w: int, total: int, cycles: float = 0.5) -> float:
    """transformers' ``_get_cosine_schedule_with_warmup_lr_lambda``, written out again."""
    if step < w:
        return float(step) / float(max(1, w))
    progress = float(step - w) / float(max(1, total - w))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def _hf_model(lam: Any, **kwargs: Any) -> pl.LightningModule:
    base = tiny_module_class(pl)

    class HF(base):  # type: ignore[misc,valid-type]
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return HF(**kwargs)


@pytest.mark.parametrize("hf", [_hf_linear, _hf_cosine], ids=["linear", "cosine"])
def test_hugging_face_ramps_are_stretched_without_a_jump(tmp_path: os.PathLike, hf: Any) -> None:
    """Issue 15 item 13: these ramp as step / W; the stretched plan follows the recorded lrs,
    so that it never rises faster than the scheduler itself (was 0.675 -> 0.800 in one step)."""
    w, total, spike = 8, 40, 5
    rec = LrRecorder()
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=w,
        adaptive=AdaptiveWarmup(backoff=1.0, rollback=False),
        detection=ten_x_only(),
        on_alert=hooked.append,
    )
    model = _hf_model(lambda s: hf(s, w, total), scripted=_spiky({spike: 20.0}))
    fit(pl, tmp_path, [monitor, rec], model=model, max_steps=30)
    ext = [a for a in hooked if a.kind.value == "warmup_extended"]
    assert len(ext) == 1 and ext[0].details["backoff"] is False
    new_end = ext[0].details["new_warmup_steps"]
    assert new_end == max(w, spike + 1) + w  # extend_fraction 1: + W past the planned end
    sched = [0.1 * hf(t, w, total) for t in range(30)]
    # The rule: u(t) = a + (W - a)(t - a) / (W' - a); the lr L(u(t)) (L is linear between
    # steps: u / W here), times the scheduler's own decay after its warmup.
    expected = []
    for t in range(30):
        if t <= spike:
            expected.append(sched[t])
            continue
        u = min(float(w), spike + (w - spike) * (t - spike) / (new_end - spike))
        decay = hf(t, w, total) if t >= w else 1.0  # the scheduler's own decay, after warmup
        expected.append(0.1 * u / w * decay)
    assert rec.used == pytest.approx(expected, rel=1e-9, abs=1e-12)
    own = max(b - a for a, b in itertools.pairwise(sched))
    rises = [b - a for a, b in itertools.pairwise(rec.used)]
    assert max(rises) <= own + 1e-12  # never a rise larger than the scheduler's own largest
    assert all(u <= s + 1e-12 for u, s in zip(rec.used, sched, strict=True))


def test_hugging_face_ramp_backoff_drops_once_and_says_the_lr(tmp_path: os.PathLike) -> None:
    w, total = 8, 40
    rec = LrRecorder()
    hooked: list[Alert] = []
    monitor = WarmupMonitor(
        warmup_steps=w, adaptive=True, detection=ten_x_only(), on_alert=hooked.append
    )
    model = _hf_model(lambda s: _hf_linear(s, w, total), scripted=_spiky({6: 20.0}))
    fit(pl, tmp_path, [monitor, rec], model=model, max_steps=30)
    kinds = [(a.step, a.kind.value) for a in hooked]
    # The defaults: a back-off, a longer warmup and (a loss spike is severe) a rollback.
    assert kinds == [(6, "loss_spike"), (6, "lr_backoff"), (6, "warmup_extended"), (6, "rollback")]
    backoff = hooked[1]
    # The lr that broke: 0.1 x 6 / 8 = 0.075; half of it from the next update on.
    assert backoff.details["lr_before"] == pytest.approx(0.075)
    assert backoff.details["lr_after"] == pytest.approx(0.0375)
    assert "lr 0.075 -> 0.0375" in backoff.message
    assert rec.used[7] < rec.used[6]  # the one drop, announced
    rises = [b - a for a, b in itertools.pairwise(rec.used[7:])]
    assert min(rises[:5]) >= 0 and max(rises) <= 0.1 / w + 1e-12
