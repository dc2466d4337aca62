"""LoopMonitor: rollback with ``model=``, rollback off (said once) without it, any real loss,
and an AdaptiveWarmup that could never act refused by name."""

from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from warmup_monitor import AdaptiveWarmup, Alert, Detection
from warmup_monitor.loop import LoopMonitor


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(
    monitor: LoopMonitor, model: torch.nn.Module, opt: torch.optim.Optimizer, nan_at: int,
    steps: int = 12, snapshots: dict[int, Any] | None = None,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 4, generator=g)
        y = x.sum(dim=1, keepdim=True).tanh()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.before_step()
        if snapshots is not None:  # an independent copy of the state before each update
            snapshots[step] = copy.deepcopy(
                ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
            )
        if step == nan_at:
            with torch.no_grad():
                model[0].weight[0, 0] = math.nan  # the update of this step breaks the model
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()


def _rollback_run(
    steps: int = 12,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[Alert], dict[int, Any]]:
    """A loop with a model (rollback on, a snapshot every 2 steps) and a NaN loss at step 5:
    the model, the optimizer, the alerts and the states before each snapshot step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    alerts: list[Alert] = []
    states: dict[int, Any] = {}
    monitor = LoopMonitor(
        opt,
        warmup_steps=10,
        model=model,
        adaptive=AdaptiveWarmup(snapshot_every_n_steps=2),
        on_alert=alerts.append,
    )
    with monitor:
        _train(monitor, model, opt, nan_at=5, steps=steps, snapshots=states)
    return model, opt, alerts, states


def test_loop_with_a_model_rolls_back_to_the_snapshot_before_the_episode() -> None:
    model, opt, alerts, _ = _rollback_run()
    rollbacks = [a for a in alerts if a.kind_name == "rollback"]
    assert len(rollbacks) == 1
    snap = rollbacks[0].details["snapshot_step"]
    assert snap == 4  # the last snapshot (every 2 steps) before the onset at step 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The rollback restored the state taken before update `snap`; training then went on.
    assert rollbacks[0].step == 6
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks


def test_loop_rollback_restores_exactly_the_state_before_the_snapshot_step() -> None:
    model, opt, alerts, states = _rollback_run(steps=7)
    (rollback,) = [a for a in alerts if a.kind_name == "rollback"]
    assert rollback.step == 6  # after the last update: nothing trained since the restore
    params, opt_state = states[rollback.details["snapshot_step"]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for idx, per_param in opt.state_dict()["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, opt_state["state"][idx][name]), (idx, name)


def test_loop_without_a_model_says_once_that_rollback_is_off() -> None:
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"AdaptiveWarmup\.rollback.*model=") as caught:
        monitor = LoopMonitor(opt, warmup_steps=10, adaptive=True)
    assert len(caught) == 1
    assert monitor.config.adaptive is not None and monitor.config.adaptive.rollback is False
    monitor.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoopMonitor(opt, warmup_steps=10, adaptive=AdaptiveWarmup(rollback=False)).close()
        LoopMonitor(opt, warmup_steps=10, adaptive=True, model=torch.nn.Linear(1, 1)).close()
        LoopMonitor(opt, warmup_steps=10).close()


def test_loop_without_a_model_never_leaves_a_rollback_pending() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alerts: list[Alert] = []
    with pytest.warns(UserWarning, match="rollback is off"):
        monitor = LoopMonitor(
            opt, warmup_steps=10, schedule="linear", adaptive=True, on_alert=alerts.append
        )
    with monitor:
        _train(monitor, model, opt, nan_at=5)
    assert monitor.engine.controller is not None
    assert monitor.engine.controller.rollback_request is None  # main: the request is the plan's
    kinds = [a.kind_name for a in alerts]
    assert "lr_backoff" in kinds and "rollback" not in kinds


@pytest.mark.parametrize(
    "loss",
    [
        np.float32(0.75),
        np.float16(0.75),
        np.float64(0.75),
        np.array(0.75, dtype=np.float32),
        np.array([0.75]),
        np.int64(3),
        Fraction(3, 4),
        torch.tensor([0.75], dtype=torch.bfloat16),
        torch.tensor(3),
    ],
    ids=lambda v: f"{type(v).__name__}-{getattr(v, 'dtype', '')}",
)
def test_loop_takes_any_real_loss(loss: Any) -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    got: list[Alert] = []
    monitor = LoopMonitor(
        opt, warmup_steps=4, on_alert=got.append, detection=Detection(spike_factor=1.01)
    )
    records: list[dict[str, float]] = []
    monitor.engine.metrics_sinks.append(lambda metrics, step: records.append(metrics))
    for value in (0.5, loss):
        w.sum().backward()
        monitor.before_step()
        opt.step()
        monitor.after_step(value)
        opt.zero_grad()
    monitor.close()
    expected = (
        float(np.asarray(loss, dtype=np.float64).reshape(()))
        if not isinstance(loss, torch.Tensor)
        else float(loss.float())
    )
    assert records[1]["warmup/loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("loss", "error", "match"),
    [
        (np.array([0.5, 0.25]), ValueError, "single value"),
        (torch.tensor([0.5, 0.25]), ValueError, "single value"),
        (True, TypeError, "real number"),
        (np.bool_(True), TypeError, "real number"),
        (1 + 2j, TypeError, "real number"),
        (torch.tensor(True), TypeError, "real number"),
        ("0.5", TypeError, "real number"),
    ],
)
def test_loop_refuses_what_is_not_one_real_loss(loss: Any, error: type, match: str) -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    monitor = LoopMonitor(opt, warmup_steps=4)
    w.sum().backward()
    monitor.before_step()
    opt.step()
    with pytest.raises(error, match=rf"`loss` must be .*{match}"):
        monitor.after_step(loss)
    monitor.close()


@pytest.mark.parametrize("kinds", [[], (), set(), frozenset()])
def test_empty_trigger_kinds_are_refused_by_name(kinds: Any) -> None:
    with pytest.raises(ValueError, match=r"`AdaptiveWarmup\.trigger_kinds` must hold at least one"):
        AdaptiveWarmup(trigger_kinds=kinds)
    AdaptiveWarmup(trigger_kinds=["loss_spike"])  # one kind is enough


def _steps(
    monitor: LoopMonitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range
) -> None:
    """Steps ``steps`` of the run of ``_train(..., nan_at=5)``, the same batches."""
    g = torch.Generator().manual_seed(1)
    for step in range(steps.stop):
        x = torch.randn(8, 4, generator=g)
        if step not in steps:
            continue
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).tanh())
        loss.backward()
        monitor.before_step()
        if step == 5:
            with torch.no_grad():
                model[0].weight[0, 0] = math.nan
        opt.step()
        monitor.after_step(loss)
        opt.zero_grad()


def test_a_loop_resumed_between_the_snapshot_and_the_episode_rolls_back_the_same() -> None:
    """The loop's rollback is the engine's: its checkpoint state holds the snapshot a rollback
    may still restore, so a resume after update 4 (snapshot 4 taken before it, the NaN update
    5 to come) rolls back to snapshot 4 and ends where the uninterrupted run ends."""

    def build() -> tuple[LoopMonitor, torch.nn.Module, torch.optim.Optimizer, list[Alert]]:
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        alerts: list[Alert] = []
        adaptive = AdaptiveWarmup(snapshot_every_n_steps=2)
        monitor = LoopMonitor(
            opt, warmup_steps=10, model=model, adaptive=adaptive, on_alert=alerts.append
        )
        return monitor, model, opt, alerts

    monitor, model, opt, alerts = build()
    with monitor:
        _steps(monitor, model, opt, range(12))
    whole = [(a.step, a.details["snapshot_step"]) for a in alerts if a.kind_name == "rollback"]
    assert whole == [(6, 4)]
    end = {k: v.clone() for k, v in model.state_dict().items()}

    monitor, model, opt, _ = build()
    with monitor:
        _steps(monitor, model, opt, range(5))
        saved = copy.deepcopy((model.state_dict(), opt.state_dict(), monitor.state_dict()))
    assert [s["step"] for s in saved[2]["snapshots"]["snapshots"]] == [4]

    monitor2, model2, opt2, alerts2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    monitor2.load_state_dict(saved[2])
    with monitor2:
        _steps(monitor2, model2, opt2, range(5, 12))
    resumed = [(a.step, a.details["snapshot_step"]) for a in alerts2 if a.kind_name == "rollback"]
    assert resumed == whole
    for key, value in model2.state_dict().items():
        assert torch.equal(value, end[key]), key
