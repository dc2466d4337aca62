"""A run that crashes keeps what the monitor measured; a fresh watch starts its own alerts file.

Real Lightning fits (and a real plain loop) on the CPU that raise at a chosen step: the alerts
file, the TensorBoard scalars and the report of the crashed run are compared with an
uninterrupted run of the same configuration, and the optimizer is inspected for hooks left.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit, make_loader, read_scalars, ten_x_only, tiny_module_class

from warmup_monitor import Detection, WarmupMonitor, Window
from warmup_monitor.alerts import ALERTS_FILENAME, is_instability, read_alerts
from warmup_monitor.loop import LoopMonitor
from warmup_monitor.report import TOO_SHORT, UNSTABLE, ReportError, load_run, summarize

# The crashed runs end inside their 20-step warmup on purpose (the report judges them so).
pytestmark = pytest.mark.filterwarnings("ignore:WarmupMonitor. warmup_steps=20 is longer")

#: Spikes of 30x the initial loss: an episode at steps 3-4 that recovers at step 7 (3 quiet
#: steps), and one at step 9 that recovers at step 12.
SPIKES = {3: 30.0, 4: 30.0, 9: 30.0}
QUIET = 3
STEPS = 13


class Boom(RuntimeError):
    """The user's crash."""


def _script(crash_at: int | None) -> Any:
    def scripted(step: int) -> float:
        if crash_at is not None and step == crash_at:
            raise Boom(f"crash at step {step}")
        return SPIKES.get(step, 1.0 - 0.01 * step)

    return scripted


class _KeepOptimizer(pl.Callback):
    """Keeps the raw optimizer of the fit, to inspect its hooks after the crash."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.optimizer = trainer.optimizers[0]


class _RaiseAfterStep(pl.Callback):
    """Raises in ``on_train_batch_end`` once ``steps`` optimizer steps were taken (listed after
    the monitor: the step is complete when it raises)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.steps:
            raise Boom(f"crash after {self.steps} steps")


def _monitor(every: int) -> WarmupMonitor:
    # schedule="linear": the monitor's lr factor adds a step pre- and post-hook of its own.
    return WarmupMonitor(
        warmup_steps=20,
        schedule="linear",
        detection=Detection(episode_quiet_steps=QUIET),
        window=Window(log_every_n_steps=every, check_every_n_steps=every),
    )


def _run(root: str, every: int) -> tuple[Any, _KeepOptimizer]:
    """The uninterrupted run."""
    keep = _KeepOptimizer()
    model = tiny_module_class(pl)(scripted=_script(None))
    trainer = fit(pl, root, [_monitor(every), keep], model=model, max_steps=STEPS)
    return trainer, keep


_FULL: dict[int, tuple[list[dict], dict[str, dict[int, float]]]] = {}


def _uninterrupted(tmp_path_factory: pytest.TempPathFactory, every: int) -> tuple[list, dict]:
    if every not in _FULL:
        root = str(tmp_path_factory.mktemp(f"full{every}"))
        trainer, keep = _run(root, every)
        assert keep.optimizer is not None
        assert not keep.optimizer._optimizer_step_pre_hooks  # the end of a fit removes them
        assert not keep.optimizer._optimizer_step_post_hooks
        alerts = [a.to_dict() for a in read_alerts(os.path.join(trainer.log_dir, ALERTS_FILENAME))]
        _FULL[every] = (alerts, read_scalars(trainer.log_dir))
    return _FULL[every]


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("where", ["training_step", "after_step"])
@pytest.mark.parametrize("crash_at", range(STEPS))
def test_a_crash_at_any_step_keeps_every_alert_and_removes_the_hooks(
    tmp_path: os.PathLike, tmp_path_factory: pytest.TempPathFactory, every: int, where: str,
    crash_at: int,
) -> None:  # fmt: skip
    full_alerts, full_scalars = _uninterrupted(tmp_path_factory, every)
    # A crash in training_step at global step k: k steps taken (0..k-1); after the step: k+1.
    taken = crash_at if where == "training_step" else crash_at + 1
    keep = _KeepOptimizer()
    monitor = _monitor(every)
    callbacks: list[Any] = [monitor, keep]
    if where == "after_step":
        callbacks.append(_RaiseAfterStep(taken))
    model = tiny_module_class(pl)(scripted=_script(crash_at if where == "training_step" else None))
    root = str(tmp_path)
    with pytest.raises(Boom):
        fit(pl, root, callbacks, model=model, max_steps=STEPS)
    log_dir = os.path.join(root, "run", "version_0")

    # Every alert of the steps taken, as the uninterrupted run wrote them ...
    alerts = [a.to_dict() for a in read_alerts(os.path.join(log_dir, ALERTS_FILENAME))]
    expected = [a for a in full_alerts if a["step"] < taken]
    ends = [a for a in alerts if a["details"].get("outcome") == "interrupted"]
    assert [a for a in alerts if a not in ends] == expected
    # ... and the episode open at the crash (opened, not yet ended in the whole run) ends once,
    # as interrupted, at the last step taken.
    opened = {a["episode"] for a in expected if a.get("episode") and a["kind"] != "episode_end"}
    closed = {a["episode"] for a in expected if a["kind"] == "episode_end"}
    assert [(e["episode"], e["step"], e["details"]["recovered"]) for e in ends] == [
        (ep, taken - 1, False) for ep in sorted(opened - closed)
    ]
    if taken in (4, 5, 6, 7, 10, 11, 12):  # inside an episode (3-4 + 3 quiet; 9 + 3 quiet)
        assert ends, "an episode was open at the crash"

    # The scalars of every logged step taken reached TensorBoard.
    scalars = read_scalars(log_dir)
    for key in ("warmup/loss", "warmup/grad_norm", "warmup/lr"):
        want = {s: v for s, v in full_scalars[key].items() if s < taken}
        assert scalars.get(key, {}) == want, key
        assert sorted(want) == list(range(0, taken, every))

    # The report's verdict follows from those alerts: the run ended in its 20-step warmup.
    unstable = any(is_instability(a["kind"]) for a in expected)
    if taken == 0:
        with pytest.raises(ReportError):  # no step, no warmup key: nothing to judge
            load_run(log_dir)
    else:
        assert summarize(load_run(log_dir)).verdict == (UNSTABLE if unstable else TOO_SHORT)

    # No hook of the monitor is left on the optimizer.
    opt = keep.optimizer
    assert opt is not None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert opt.param_groups[0]["lr"] == 0.05  # the monitor's factor is not left in the lr


def test_the_issue_case_a_crash_after_spikes_with_low_overhead_settings(
    tmp_path: os.PathLike,
) -> None:
    """30x spikes at steps 7-8, then an exception at step 9, with log and check every 5."""
    spikes = {7: 30.0, 8: 30.0}

    def scripted(step: int) -> float:
        if step == 9:
            raise Boom("step 9")
        return spikes.get(step, 1.0)

    keep = _KeepOptimizer()
    monitor = WarmupMonitor(
        warmup_steps=20, window=Window(log_every_n_steps=5, check_every_n_steps=5)
    )
    with pytest.raises(Boom):
        fit(pl, tmp_path, [monitor, keep], model=tiny_module_class(pl)(scripted=scripted),
            max_steps=20)  # fmt: skip
    log_dir = os.path.join(str(tmp_path), "run", "version_0")
    alerts = read_alerts(os.path.join(log_dir, ALERTS_FILENAME))
    assert [(a.step, a.kind_name) for a in alerts] == [(7, "loss_spike"), (8, "episode_end")]
    assert alerts[1].details["outcome"] == "interrupted"
    assert "interrupted" in alerts[1].message
    summary = summarize(load_run(log_dir))
    # Both flagged steps: the verdict counts the episode_end's step ranges too (issue 20).
    assert summary.verdict == UNSTABLE and summary.instability_steps == [7, 8]
    (episode,) = summary.episodes
    assert (episode.outcome, episode.recovered, episode.closed) == ("interrupted", False, True)
    assert keep.optimizer is not None and not keep.optimizer._optimizer_step_post_hooks


# ------------------------------------------------------------------------- the plain loop


def _loop(
    path: str, crash_at: int | None, every: int, *, context: bool = True
) -> tuple[LoopMonitor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = LoopMonitor(
        opt,
        warmup_steps=20,
        schedule="linear",
        alerts_file=path,
        detection=Detection(episode_quiet_steps=QUIET),
        window=Window(log_every_n_steps=every, check_every_n_steps=every),
    )
    x, y = make_loader(n=4).dataset.tensors

    def train() -> None:
        for step in range(STEPS):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss = loss - loss.detach() + SPIKES.get(step, 1.0 - 0.01 * step)
            loss.backward()
            monitor.before_step()
            if step == crash_at:
                raise Boom(f"step {step}")  # measured, never stepped: not a step taken
            opt.step()
            monitor.after_step(loss)
            opt.zero_grad()

    if crash_at is None:
        with monitor:
            train()
    elif context:
        with pytest.raises(Boom), monitor:
            train()
    else:
        try:
            train()
        except Boom:
            monitor.close(interrupted=True)
    return monitor, opt


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("crash_at", [0, 3, 5, 6, 11])
def test_loop_leaving_the_with_block_on_a_crash_keeps_every_alert(
    tmp_path: os.PathLike, every: int, crash_at: int
) -> None:
    full = os.path.join(str(tmp_path), "full.jsonl")
    monitor, _ = _loop(full, None, every)
    whole = [a.to_dict() for a in read_alerts(full)]
    for context in (True, False):
        path = os.path.join(str(tmp_path), f"crash{context}.jsonl")
        monitor, opt = _loop(path, crash_at, every, context=context)
        alerts = [a.to_dict() for a in read_alerts(path)]
        kept = [a for a in alerts if a["details"].get("outcome") != "interrupted"]
        assert kept == [a for a in whole if a["step"] < crash_at]
        ends = [a for a in alerts if a not in kept]
        assert [a["step"] for a in ends] == ([crash_at - 1] if crash_at in (5, 6, 11) else [])
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        assert monitor.engine.steps_taken() == crash_at


def test_loop_close_is_idempotent_and_a_normal_end_is_open_at_end(tmp_path: os.PathLike) -> None:
    path = os.path.join(str(tmp_path), "a.jsonl")
    monitor, _ = _loop(path, None, 5)
    monitor.close()  # a second close: nothing more written
    ends = [a for a in read_alerts(path) if a.kind_name == "episode_end"]
    assert [(a.step, a.details["outcome"]) for a in ends] == [(7, "recovered"), (12, "recovered")]


# ------------------------------------------------------------------------- one run per file


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_a_fresh_watch_into_the_same_log_dir_starts_a_new_alerts_file(
    tmp_path: os.PathLike,
) -> None:
    """Run 1 spiked, run 2 (a new Trainer, same version dir) is healthy: the file holds run 2's
    alerts only (none), run 1's file is kept aside, and the report says healthy."""

    def run(spike: float, **kwargs: Any) -> Any:
        model = tiny_module_class(pl)(scripted=lambda s: spike if s == 3 else 1.0 - 0.01 * s)
        monitor = WarmupMonitor(warmup_steps=4, window=Window(post_warmup_steps=30))
        return fit(pl, tmp_path, [monitor], model=model, max_steps=30, **kwargs)

    first = run(30.0)
    path = os.path.join(first.log_dir, ALERTS_FILENAME)
    run1 = _text(path).splitlines()
    assert any(json.loads(line)["kind"] == "loss_spike" for line in run1)
    second = run(1.0)
    assert second.log_dir == first.log_dir
    assert _text(path) == ""  # run 2's alerts: none
    assert _text(path + ".1").splitlines() == run1  # run 1's alerts, kept aside
    assert summarize(load_run(second.log_dir)).verdict == "healthy"


def test_a_resume_appends_to_the_alerts_file(tmp_path: os.PathLike) -> None:
    spikes = {3: 30.0, 20: 30.0}
    scripted = lambda s: spikes.get(s, 1.0)  # noqa: E731

    def run(max_steps: int, ckpt_path: str | None = None) -> Any:
        monitor = WarmupMonitor(warmup_steps=8, detection=ten_x_only())
        return fit(pl, tmp_path, [monitor], model=tiny_module_class(pl)(scripted=scripted),
                   max_steps=max_steps, ckpt_path=ckpt_path, enable_checkpointing=True)  # fmt: skip

    first = run(10)
    (name,) = os.listdir(os.path.join(first.log_dir, "checkpoints"))
    ckpt = os.path.join(first.log_dir, "checkpoints", name)
    second = run(25, ckpt)
    path = os.path.join(second.log_dir, ALERTS_FILENAME)
    assert [(a.step, a.kind_name) for a in read_alerts(path)] == [
        (3, "loss_spike"),
        (20, "loss_spike"),
    ]
    assert not os.path.exists(path + ".1")


def test_loop_fresh_monitor_moves_the_file_aside_and_a_loaded_one_appends(
    tmp_path: os.PathLike,
) -> None:
    path = os.path.join(str(tmp_path), ALERTS_FILENAME)
    monitor, _ = _loop(path, None, 1)
    first = _text(path)
    assert first
    monitor, _ = _loop(path, None, 1)  # a fresh monitor: a new file, the old one aside
    assert _text(path + ".1") == first and _text(path) == first
    assert not os.path.exists(path + ".2")

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    resumed = LoopMonitor(opt, warmup_steps=4, alerts_file=path)
    resumed.load_state_dict(monitor.state_dict())
    (w.sum() * 100.0).backward()
    resumed.before_step()
    opt.step()
    resumed.after_step(float("nan"))
    resumed.close()
    lines = _text(path)
    assert lines.startswith(first) and "non_finite" in lines[len(first) :]
    assert not os.path.exists(path + ".2")


def test_warmup_exhausted_raise_is_a_crash_that_keeps_its_alerts(tmp_path: os.PathLike) -> None:
    """The monitor's own exception (on_exhausted="raise") stops the fit like any other: the
    later steps kept on the device are written, without raising a second time."""
    from warmup_monitor import AdaptiveWarmup
    from warmup_monitor.controller import WarmupExhaustedError

    keep = _KeepOptimizer()
    monitor = WarmupMonitor(
        warmup_steps=20,
        schedule="linear",
        adaptive=AdaptiveWarmup(max_extensions=0, on_exhausted="raise", rollback=False),
        window=Window(check_every_n_steps=5, log_every_n_steps=5),
    )
    model = tiny_module_class(pl)(scripted=lambda s: 30.0 if s in (6, 8) else 1.0)
    with pytest.raises(WarmupExhaustedError):
        fit(pl, tmp_path, [monitor, keep], model=model, max_steps=STEPS)
    log_dir = os.path.join(str(tmp_path), "run", "version_0")
    alerts = read_alerts(os.path.join(log_dir, ALERTS_FILENAME))
    kinds = [(a.step, a.kind_name) for a in alerts]
    # Read at step 10: the spike at 6 exhausts the controller and raises; step 8 and the
    # episode's end are written at the interruption.
    assert kinds[0][0] == 6 and (6, "warmup_exhausted") in kinds, kinds
    assert alerts[-1].kind_name == "episode_end" and alerts[-1].details["outcome"] == "interrupted"
    assert alerts[-1].details["steps"] == [[6, 6], [8, 8]]
    opt = keep.optimizer
    assert opt is not None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_an_interruption_never_raises_and_always_removes_the_hooks(
    tmp_path: os.PathLike, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = os.path.join(str(tmp_path), ALERTS_FILENAME)
    monitor = LoopMonitor(
        opt, warmup_steps=20, alerts_file=path, schedule="linear",
        window=Window(log_every_n_steps=5, check_every_n_steps=5),
    )  # fmt: skip

    def full_disk(alert: Any) -> None:  # a sink of the engine's own that fails
        raise OSError(28, "No space left on device")

    monitor.engine.alert_sinks.append(full_disk)
    x, y = make_loader(n=4).dataset.tensors
    with pytest.raises(Boom), monitor:
        for step in range(4):
            loss = torch.nn.functional.mse_loss(model(x), y) * (30.0 if step == 2 else 1.0)
            loss.backward()
            monitor.before_step()
            opt.step()
            monitor.after_step(loss)
            opt.zero_grad()
        raise Boom("after step 3")
    # Steps 1-3 were processed at the interruption; the failing sink is logged, not raised ...
    assert "at the interruption" in caplog.text and "No space left" in caplog.text
    assert [a.step for a in read_alerts(path) if a.kind_name != "episode_end"] == [2]
    # ... and the hooks went all the same.
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
