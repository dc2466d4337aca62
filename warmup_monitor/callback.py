"""The Lightning adapter: which hook, which tensors, which rank. No maths lives here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from warmup_monitor import _compat, progress
from warmup_monitor._checks import refuse_moved_keywords
from warmup_monitor.alerts import ALERTS_FILENAME, Alert, AlertDispatcher, alerts_path
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
from warmup_monitor.logger_text import text_sinks
from warmup_monitor.rollback import Snapshots
from warmup_monitor.schedules import Shape
from warmup_monitor.tensorboard import write_layout

log = logging.getLogger("warmup_monitor")

__all__ = ["WarmupMonitor"]

_STATE_VERSION = 2


class WarmupMonitor(*_compat.callback_bases()):  # type: ignore[misc]
    """Watch learning-rate warmup: log its signals every optimizer step, flag instability, and
    (if asked) apply, lengthen and back off warmup and probe the curvature.

    From the first optimizer step until ``warmup_steps`` plus ``Window.post_warmup_steps``,
    the monitor reads the gradients once per optimizer step (after accumulation and AMP
    unscaling, before clipping), logs the keys of :mod:`warmup_monitor.schema` through every
    logger the Trainer has, and sends each alert to Python logging, the loggers that take text
    (TensorBoard text, a W&B table, MLflow artifacts: :mod:`warmup_monitor.logger_text`),
    ``warmup_alerts.jsonl`` in the run's log directory and ``on_alert``.

    A Trainer whose ``global_step`` is 0 at ``fit`` starts a fresh watch (a reused callback in a
    sweep starts over); further ``fit`` calls on the same Trainer, and checkpoint resumes,
    continue counting.

    Example::

        from pytorch_lightning import Trainer
        from warmup_monitor import AdaptiveWarmup, WarmupMonitor

        trainer = Trainer(callbacks=[WarmupMonitor(warmup_steps=500, adaptive=True)])

    Args:
        warmup_steps: Planned warmup length in optimizer steps (>= 1).
        schedule: A warmup shape the monitor applies itself, as a factor on top of your lr
            scheduler (``"linear"``, ``"cosine"``, ...); ``None``: your scheduler warms up.
        schedule_kwargs: Keyword arguments of the shape (e.g. ``{"tau": 50}``).
        adaptive: Lengthen and back off warmup when training turns unstable: an
            :class:`~warmup_monitor.AdaptiveWarmup`, ``True`` (its defaults) or ``False``.
        detection: The instability rules (:class:`~warmup_monitor.Detection`).
        curvature: The curvature probe: a :class:`~warmup_monitor.CurvatureProbe`, ``True``
            (its defaults) or ``False``. By default it differentiates the module's
            ``training_step`` on the first training batch.
        statistics: What is measured (:class:`~warmup_monitor.Statistics`).
        window: Which steps are monitored and logged (:class:`~warmup_monitor.Window`).
            Each of the five objects may also be a plain mapping of its fields
            (``adaptive={"backoff": 0.3}``), built into it.
        on_alert: Called with each :class:`~warmup_monitor.Alert` on global rank zero, after
            the other sinks; if it raises, the error is logged and training goes on.
        alerts_file: The alerts JSONL, relative to the Trainer's ``log_dir`` (an absolute path
            is used as is); ``None`` writes no file.
        log_key_prefix: Prefix of every logged key.
        progress_bar: Show ``warmup 120/500 x0.24`` in Lightning's progress bar while warming
            up (steps taken / warmup length, and the monitor's next lr factor if not 1; see
            :mod:`warmup_monitor.progress`); ``False``: leave the bar alone.

    Raises:
        TypeError: an argument or a field has the wrong type (named ``WarmupMonitor.argument``
            or ``Class.field``), or a 0.1 keyword is given (the message names its new home).
        ValueError: a value is out of range (named in the message, with what was given).
    """

    @refuse_moved_keywords
    def __init__(
        self,
        *,
        warmup_steps: int,
        schedule: Shape | None = None,
        schedule_kwargs: Mapping[str, Any] | None = None,
        adaptive: AdaptiveWarmup | bool | Mapping[str, Any] = False,
        detection: Detection | Mapping[str, Any] | None = None,
        curvature: CurvatureProbe | bool | Mapping[str, Any] = False,
        statistics: Statistics | Mapping[str, Any] | None = None,
        window: Window | Mapping[str, Any] | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        alerts_file: str | None = ALERTS_FILENAME,
        log_key_prefix: str = "warmup/",
        progress_bar: bool = True,
    ) -> None:
        config = MonitorConfig(
            warmup_steps=warmup_steps, schedule=schedule, schedule_kwargs=schedule_kwargs,
            adaptive=adaptive, detection=detection, curvature=curvature,  # type: ignore[arg-type]
            statistics=statistics, window=window, log_key_prefix=log_key_prefix,  # type: ignore[arg-type]
        )  # fmt: skip
        check_sinks(on_alert=on_alert, alerts_file=alerts_file)
        self._setup(config, on_alert, alerts_file, progress.check_flag(progress_bar))

    def _setup(self, config: MonitorConfig, on_alert: Any, alerts_file: str | None,
               progress_bar: bool = True) -> None:  # fmt: skip
        self.config, self.progress_bar = config, progress_bar
        self.on_alert = on_alert
        self.alerts_file = alerts_file
        self._engine = MonitorEngine(config)
        self._dispatcher: AlertDispatcher | None = None
        self._log_dir: str | None = None
        self._probe_batch: Any = None
        self._steps_at_batch_start = 0
        self._restored = False  # load_state_dict ran since the last fit started

    @property
    def engine(self) -> MonitorEngine:
        """The Lightning-free engine doing the work."""
        return self._engine

    @property
    def _snapshots(self) -> Snapshots | None:
        """The engine's snapshots (``None`` without rollback), read by tests and benchmarks."""
        return self._engine.snapshots

    def __repr__(self) -> str:
        c = self.config
        parts = [f"warmup_steps={c.warmup_steps}"]
        for name in ("schedule", "adaptive", "curvature"):
            if getattr(c, name) is not None:
                parts.append(f"{name}={getattr(c, name)!r}")
        for name in ("detection", "statistics", "window"):
            if repr(getattr(c, name)) != f"{type(getattr(c, name)).__name__}()":
                parts.append(f"{name}={getattr(c, name)!r}")
        return f"WarmupMonitor({', '.join(parts)})"

    # Pickling (ddp_spawn, deepcopy): the configuration and the state travel, the live wiring
    # (optimizer hooks, loggers, open files) does not; the next fit wires it again.
    def __getstate__(self) -> dict[str, Any]:
        state = self.state_dict()
        state.pop("snapshots", None)  # a copy is no checkpoint: it starts without snapshots
        return {"config": self.config, "on_alert": self.on_alert,
                "alerts_file": self.alerts_file, "state": state,
                "progress_bar": self.progress_bar}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["config"], state["on_alert"], state["alerts_file"],
                    state.get("progress_bar", True))  # fmt: skip
        self.load_state_dict(state["state"])
        self._restored = False  # a copy is no checkpoint: the next Trainer decides (global_step)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # broadcast from rank zero: every rank calls it
        self._log_dir = _compat.log_dir(trainer, self.alerts_file)
        probe = self.config.curvature
        if probe is not None and probe.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "WarmupMonitor: the curvature probe cannot call training_step under manual "
                "optimization (it would step the optimizers): pass "
                "CurvatureProbe(loss_fn=lambda module, batch: ...) that only computes the loss"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is restored after on_fit_start: a resume is known by load_state_dict.
        if trainer.global_step == 0 and not self._restored:
            self._engine.reset()  # a new Trainer (or a fresh run) starts a fresh watch
            self._probe_batch = None
        self._restored = False
        _compat.warn_short_run(trainer, self.config.warmup_steps)
        _compat.warn_lr_monitor(trainer, self.config)
        progress.attach(trainer, self._engine, on=self.progress_bar)  # until teardown
        metrics_sinks, alert_sinks = [], []
        if trainer.is_global_zero:
            prefix = self.config.log_key_prefix
            writers = _compat.tensorboard_writers(trainer)
            for writer in writers:
                write_layout(writer, prefix)
            self._dispatcher = AlertDispatcher(
                jsonl_path=alerts_path(self.alerts_file, self._log_dir),
                text_writers=writers,
                text_sinks=text_sinks(trainer.loggers, f"{prefix}alerts"),  # W&B, MLflow
                on_alert=self.on_alert,
                text_tag=f"{prefix}alerts",
                fresh=self._engine.steps_taken(0) == 0,  # one run per file; a resume appends
            )
            alert_sinks.append(self._dispatcher.dispatch)
            metrics_sinks.append(_compat.LoggersSink(trainer.loggers))
        if (note := self._engine.continue_in(self._log_dir)) and self._dispatcher is not None:
            self._dispatcher.dispatch(note)  # a resume into a new log dir: the report reads both
        optimizers = list(trainer.optimizers)
        if self._snapshots is not None and len(optimizers) > 1:
            _compat.warn_averaging_before(trainer, self)  # the rollback comes after the batch
        self._engine.attach(
            optimizers,
            # Automatic optimization steps one optimizer: its step count is the global step.
            first_step=trainer.global_step if len(optimizers) == 1 else 0,
            world_size=trainer.world_size,
            sharded=_compat.is_fsdp1(trainer),
            complete_on_step=True,
            metrics_sinks=metrics_sinks,
            alert_sinks=alert_sinks,
            model=pl_module,  # rollback restores it; it names the groups of Statistics.layers
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.rollback_point(start=True)  # the first snapshot: before the first update

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.config.curvature is None:
            return
        prober = self._engine.prober
        if self._probe_batch is None or (prober is not None and prober.accepts_batch):
            # The fixed probe batch: the first training batch that gives the probe a loss.
            self._probe_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        self._steps_at_batch_start = self._engine.steps_taken(0)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # The loss as back-propagated: scaled by a GradScaler, divided by the accumulation.
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        loss = _compat.unscaled(trainer, loss)
        self._engine.add_loss(loss * scale if scale != 1 else loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._engine.before_step(optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._engine.end_batch()  # steps completed in optimizer.step; a skipped one ends here
        step = self._engine.steps_taken(0) - 1
        stepped = step >= self._steps_at_batch_start
        if self._probe_batch is not None and stepped and self._engine.probe_due(step):
            self._probe(trainer, pl_module, step)
        self._engine.rollback_point()  # restore if still asked (several optimizers), snapshot
        if self._engine.stop_requested:
            trainer.should_stop = True  # every rank holds the same plan: all stop together

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        custom, batch = self.config.curvature.loss_fn, self._probe_batch  # type: ignore[union-attr]

        def loss_fn() -> Tensor | None:
            if custom is not None:
                return custom(pl_module, batch)
            # None (no loss for this batch): the prober asks for the next batch.
            return _compat.extract_loss(pl_module.training_step(batch, 0))

        with _compat.silenced_logging(pl_module):
            self._engine.probe(step, loss_fn, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        """Training stopped on an exception (Lightning calls no ``teardown`` then): process
        the steps still kept on the device, write their scalars and alerts (before Lightning
        finalizes the loggers), end open episodes as ``"interrupted"``, remove the monitor's
        optimizer hooks and close the alerts file
        (:meth:`~warmup_monitor.engine.MonitorEngine.interrupt`). Never raises: the user's
        exception is the one that matters (a failure here is logged)."""
        self.teardown(trainer, pl_module, "interrupted")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("fit", "interrupted"):  # "interrupted": from on_exception
            self._engine.detach(close_episodes=True, interrupted=stage == "interrupted")
            self._restored = False  # a state loaded after on_fit_start (FSDP, DeepSpeed) is spent
        progress.detach(trainer)
        if self._dispatcher is not None:
            self._dispatcher.close()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: step counts, counters, detector/controller states,
        and, during a fit while a rollback can still be asked for, the kept snapshots a
        rollback could still restore, less the one of the current state (tensors: a resume
        rolls back to them exactly as the uninterrupted run does; one snapshot at most,
        usually; not with sharded parameters, whose shards differ per rank)."""
        return {"version": _STATE_VERSION, **self._engine.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the previous gradient is not saved: no cosine on the
        first step after a resume)."""
        state = dict(state_dict)
        if "edge_rule" in state and "probe" not in state:  # version 1
            state["probe"] = {"edge_rule": state["edge_rule"]}
        self._engine.load_state_dict(state)  # and the snapshots it holds, for the next fit
        self._restored = True
