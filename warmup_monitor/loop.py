"""The monitor in a hand-written PyTorch training loop, without Lightning.

Example::

    from torch.utils.tensorboard import SummaryWriter
    from warmup_monitor.loop import LoopMonitor

    monitor = LoopMonitor(optimizer, warmup_steps=200, writer=SummaryWriter("runs/x"),
                          alerts_file="runs/x/warmup_alerts.jsonl", adaptive=True, model=model)
    with monitor:                      # close() at the end; close(interrupted=True) on a crash
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            monitor.before_step()      # after backward (and scaler.unscale_), before clipping
            optimizer.step()
            monitor.after_step(loss)   # after the step: logs, detects, alerts (and rolls back)
            optimizer.zero_grad()
            monitor.probe(lambda: loss_fn(model(x0), y0), model)  # if curvature=...: when due

The call order is required: ``before_step`` then ``optimizer.step()`` then ``after_step``, once
per optimizer step. A step taken without ``before_step``, a second ``before_step`` without
``after_step``, and ``after_step`` before ``optimizer.step()`` are each reported once with a
``UserWarning`` that names the order; ``before_step`` on an optimizer the monitor was not built
with raises ``ValueError``.

Rollback (``AdaptiveWarmup.rollback``, on by default) needs the module: with ``model=`` the
engine snapshots the model and the optimizers' state and restores them in ``after_step``
when the controller asks, as for the Lightning callback (``state_dict()`` holds the snapshot a
rollback may still restore: a resume rolls back as the uninterrupted run does). Without
``model=`` rollback is off (the configuration is changed to ``rollback=False``), said once with
a ``UserWarning`` at construction unless ``AdaptiveWarmup(rollback=False)`` was given.

A crash: leave the loop through ``with monitor:`` (or call ``close(interrupted=True)`` in your
``except``/``finally``) and the steps still kept on the device are processed and written,
open episodes end as ``"interrupted"`` and the optimizer hooks are removed.

The alerts file holds one run: a new monitor moves an existing file aside (to
``warmup_alerts.jsonl.N``) at its first step, unless ``load_state_dict`` ran first (a
resume appends).

The same keys, alerts and files as the Lightning callback, from the same configuration objects;
this module imports no Lightning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from warmup_monitor._checks import refuse_moved_keywords
from warmup_monitor.alerts import Alert, AlertDispatcher
from warmup_monitor.config import (
    AdaptiveWarmup,
    CurvatureProbe,
    Detection,
    MonitorConfig,
    Statistics,
    Window,
    check_sinks,
)
from warmup_monitor.engine import MonitorEngine
from warmup_monitor.schedules import Shape
from warmup_monitor.tensorboard import split_layer_keys, write_layout, write_scalars_event

__all__ = ["LoopMonitor"]


class LoopMonitor:
    """Drive :class:`~warmup_monitor.engine.MonitorEngine` from a plain loop.

    Args:
        optimizers: The optimizer, or a sequence of distinct ones (index ``K >= 1`` logs as
            ``optK``).
        warmup_steps: Planned warmup length in optimizer steps.
        writer: A TensorBoard ``SummaryWriter`` for the scalars, the dashboard layout and the
            alert texts; ``None`` logs no scalars.
        alerts_file: Path of the alerts JSONL; ``None`` writes none.
        on_alert: Called with each alert after the other sinks; exceptions are logged.
        model: The model being trained. With it a rollback (``AdaptiveWarmup.rollback``)
            restores it (without it rollback is off: module docstring), and it names the
            groups of ``Statistics(layers=...)`` (``warmup/layers/<group>/...``): required when
            ``layers`` is not ``"off"``.
        schedule, schedule_kwargs, adaptive, detection, curvature, statistics, window,
            log_key_prefix: As for :class:`~warmup_monitor.WarmupMonitor`.

    Raises:
        TypeError, ValueError: a bad argument or field, named in the message.
    """

    @refuse_moved_keywords
    def __init__(
        self,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        warmup_steps: int,
        writer: Any | None = None,
        alerts_file: str | os.PathLike[str] | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        model: torch.nn.Module | None = None,
        schedule: Shape | None = None,
        schedule_kwargs: Mapping[str, Any] | None = None,
        adaptive: AdaptiveWarmup | bool | Mapping[str, Any] = False,
        detection: Detection | Mapping[str, Any] | None = None,
        curvature: CurvatureProbe | bool | Mapping[str, Any] = False,
        statistics: Statistics | Mapping[str, Any] | None = None,
        window: Window | Mapping[str, Any] | None = None,
        log_key_prefix: str = "warmup/",
    ) -> None:
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
        ok = isinstance(opts, Sequence) and not isinstance(opts, (str, bytes))
        opts = list(opts) if ok else []
        if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError(
                "`LoopMonitor.optimizers` must be a torch optimizer or a sequence of them, "
                f"got {optimizers!r}"
            )
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("`LoopMonitor.optimizers` holds the same optimizer twice")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"`LoopMonitor.model` must be a torch.nn.Module or None, got {model!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"`LoopMonitor.writer` must be a TensorBoard SummaryWriter or None, got {writer!r}"
            )
        check_sinks(on_alert=on_alert, alerts_file=alerts_file, owner="LoopMonitor")
        config = MonitorConfig(
            warmup_steps=warmup_steps,
            schedule=schedule,
            schedule_kwargs=schedule_kwargs,
            adaptive=adaptive,  # type: ignore[arg-type]
            detection=detection,  # type: ignore[arg-type]
            curvature=curvature,  # type: ignore[arg-type]
            statistics=statistics,  # type: ignore[arg-type]
            window=window,  # type: ignore[arg-type]
            log_key_prefix=log_key_prefix,
            owner="LoopMonitor",
        )
        if model is None and config.statistics.layers != "off":
            raise ValueError(
                "`Statistics.layers` needs the model to name its groups: pass "
                f"LoopMonitor(..., model=model) (layers={config.statistics.layers!r})"
            )
        if model is None and config.adaptive is not None and config.adaptive.rollback:
            warnings.warn(
                "LoopMonitor: AdaptiveWarmup.rollback is on (the default) but no `model=` was "
                "given, so the loop cannot snapshot and restore the module: rollback is off "
                "(back-off and re-warm still act). Pass LoopMonitor(..., model=model) to roll "
                "back, or AdaptiveWarmup(rollback=False) to turn it off without this warning.",
                UserWarning,
                stacklevel=3,  # past refuse_moved_keywords: the caller's line
            )
            config = replace(config, adaptive=replace(config.adaptive, rollback=False))
        self._setup(config, opts, writer, alerts_file, on_alert, model)

    def _setup(
        self,
        config: MonitorConfig,
        opts: list[Any],
        writer: Any,
        alerts_file: Any,
        on_alert: Any,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.alerts_file = alerts_file
        self.on_alert = on_alert
        self.model = model
        self.engine = MonitorEngine(config)  # with rollback, it holds the snapshots
        self._started = False  # the first step: a fresh watch's file, the first snapshot
        self._resumed = False  # load_state_dict ran before the first step: append
        writers = [writer] if writer is not None else []
        for w in writers:
            write_layout(w, config.log_key_prefix)
        self._dispatcher = AlertDispatcher(
            jsonl_path=alerts_file,
            text_writers=writers,
            on_alert=on_alert,
            text_tag=f"{config.log_key_prefix}alerts",
        )
        self.engine.attach(
            opts,
            alert_sinks=[self._dispatcher.dispatch],
            metrics_sinks=[self._write_scalars] if writer is not None else [],
            model=model,  # rollback restores it; it names the groups of Statistics.layers
        )

    def __repr__(self) -> str:
        return f"LoopMonitor({len(self.engine.optimizers)} optimizer(s), {self.config!r})"

    # Pickling and deepcopy: the optimizers, configuration and state travel; a SummaryWriter
    # does not pickle, so a new one is opened on the same directory.
    def __getstate__(self) -> dict[str, Any]:
        logdir = None if self.writer is None else getattr(self.writer, "log_dir", None)
        state = self.engine.state_dict()
        state.pop("snapshots", None)  # a copy is no checkpoint: it starts without snapshots
        return {"config": self.config, "optimizers": self.engine.optimizers,
                "logdir": logdir, "alerts_file": self.alerts_file, "on_alert": self.on_alert,
                "model": self.model, "state": state}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        writer = None
        if state["logdir"] is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(state["logdir"])
        self._setup(state["config"], state["optimizers"], writer, state["alerts_file"],
                    state["on_alert"], state.get("model"))  # fmt: skip
        self.load_state_dict(state["state"])

    def before_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Measure the gradients of ``optimizer`` (default: the first) before it steps.

        Raises:
            ValueError: ``optimizer`` is not one the monitor was built with.
        """
        if not self._started:
            self._start()
        self.engine.before_step(optimizer if optimizer is not None else self.engine.optimizers[0])

    def _start(self) -> None:
        """The first step of this monitor: a fresh watch moves the old alerts file aside; with
        rollback, the first snapshot (before the first update)."""
        self._started = True
        if not self._resumed:
            self._dispatcher.start_fresh()
        self.engine.rollback_point(start=True)  # nothing without model= or rollback

    def after_step(self, loss: Any) -> None:
        """Complete the step(s) taken since :meth:`before_step` with the batch's loss: any real
        number (``float``, ``np.float32``, ...) or a one-element tensor or array; ``None``: no
        loss. With rollback (``model=``), the snapshot is restored here when the controller
        asks, and a new one taken when due.

        Raises:
            ValueError: ``loss`` has several elements.
            TypeError: ``loss`` is not a real number, a tensor or an array.
        """
        self.engine.add_loss(loss)
        self.engine.end_batch()
        self.engine.rollback_point()  # restore if asked, then snapshot when due

    def probe(
        self, loss_fn: Callable[[], Tensor | None], module: torch.nn.Module | None = None
    ) -> None:
        """Probe the curvature after the step just completed, if one is due (``curvature=``).

        Args:
            loss_fn: Recomputes the loss on a fixed probe batch (only the loss: no backward,
                no optimizer step).
            module: The model, put back exactly as it was after the probe.
        """
        step = self.engine.steps_taken(0) - 1
        if step >= 0 and self.engine.probe_due(step):
            self.engine.probe(step, loss_fn, module)

    def close(self, *, interrupted: bool = False) -> None:
        """Stop watching: process the steps still kept on the device (their scalars and
        alerts are written), end open episodes, remove the optimizer hooks, close the alerts
        file and flush the writer. Idempotent.

        Args:
            interrupted: Training stopped on an exception: open episodes end with outcome
                ``"interrupted"`` (not ``"open_at_end"``), a step measured by
                :meth:`before_step` but never completed is dropped, ``on_exhausted="raise"``
                does not raise, and a failing sink is logged instead of raised (the hooks are
                removed in every case).
        """
        try:
            self.engine.detach(close_episodes=True, interrupted=interrupted)
        finally:
            self._dispatcher.close()
            if self.writer is not None:
                self.writer.flush()

    def __enter__(self) -> LoopMonitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """``close()``, or ``close(interrupted=True)`` when the block raised (the exception
        goes on)."""
        self.close(interrupted=exc_type is not None)

    def state_dict(self) -> dict[str, Any]:
        """The engine's state, to save with your checkpoint (with rollback, while one can
        still come, the snapshot it may restore: a resume rolls back as the run would)."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resume: the alerts file is appended to)."""
        self.engine.load_state_dict(state)
        self._resumed = True

    def _write_scalars(self, metrics: dict[str, float], step: int) -> None:
        assert self.writer is not None
        layers, rest = split_layer_keys(metrics)
        for key, value in rest.items():
            self.writer.add_scalar(key, value, global_step=step)
        write_scalars_event(self.writer, layers, step)  # per-group keys: one event
