"""The Lightning adapter: which hook, which tensors, which rank. No maths lives here."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.alerts import ALERTS_FILENAME, Alert, AlertDispatcher, AlertKind
from warmup_monitor.controller import OnExhausted, WarmupController
from warmup_monitor.curvature import EdgeOfStabilityRule, estimate_stability, probe_guard
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.engine import MonitorEngine
from warmup_monitor.schedules import Shape
from warmup_monitor.stats import CosineMode
from warmup_monitor.tensorboard import write_layout

log = logging.getLogger("warmup_monitor")

__all__ = ["WarmupMonitor"]

_STATE_VERSION = 1


def _callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning.Callback``, plus ``lightning.pytorch.Callback`` when installed.

    Deriving from both lets ``LightningCLI`` of either namespace accept the callback in a config.
    """
    bases: list[type] = [pl.Callback]
    try:
        import lightning.pytorch as lp
    except ImportError:
        return tuple(bases)
    if lp.Callback is not pl.Callback:
        bases.append(lp.Callback)
    return tuple(bases)


def _tensorboard_logger_types() -> tuple[type, ...]:
    from pytorch_lightning.loggers import TensorBoardLogger

    types: list[type] = [TensorBoardLogger]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger as LTensorBoardLogger
    except ImportError:
        return tuple(types)
    types.append(LTensorBoardLogger)
    return tuple(types)


class WarmupMonitor(*_callback_bases()):  # type: ignore[misc]
    """Watch learning-rate warmup: log its signals every optimizer step and flag instability.

    From the first optimizer step until ``warmup_steps + post_warmup_steps``, the monitor reads
    the gradients once per optimizer step (after accumulation and AMP unscaling, before
    clipping), logs the values below through every logger the Trainer has, and runs an
    :class:`~warmup_monitor.InstabilityDetector`. Each alert goes to Python logging, TensorBoard
    text (tag ``warmup/alerts``), ``warmup_alerts.jsonl`` in the run's log directory and
    ``on_alert``. After the window the monitor does nothing and frees its buffers.

    Example::

        from pytorch_lightning import Trainer
        from warmup_monitor import WarmupMonitor

        trainer = Trainer(callbacks=[WarmupMonitor(warmup_steps=500)])

    Logged keys (``warmup/`` is ``log_key_prefix``; ``step`` is the number of optimizer steps
    taken before the update, 0 for the first):

    ============================  ==========================================================
    key                           value
    ============================  ==========================================================
    ``warmup/lr``                 lr of param group 0 used for this update (with
                                  ``warmup/lr/pgJ`` for every group ``J`` when there are
                                  several)
    ``warmup/loss``               the step's training loss, the mean over its accumulated
                                  micro-batches
    ``warmup/loss_ratio``         loss / initial loss (once the initial loss is defined)
    ``warmup/grad_norm``          global L2 norm of all gradients, before clipping
    ``warmup/grad_cosine``        cosine of this step's whole gradient with the previous
                                  step's; not logged where undefined (first step, after a
                                  resume, next to a zero or non-finite gradient)
    ``warmup/update_ratio``       ||theta_new - theta_old|| / ||theta_old||
    ``warmup/warmup_steps``       the planned warmup length, after this step's decisions
    ``warmup/lr_factor``          the factor the monitor applied (``schedule=``, ``adaptive``)
    ``warmup/alerts``             number of alerts so far
    ``warmup/unstable``           1 on a step that raised an instability alert, else 0
    ``warmup/amp_skipped_steps``  steps a GradScaler skipped so far (once there is one)
    ============================  ==========================================================

    With several optimizers (manual optimization), optimizer ``K >= 1`` logs under
    ``warmup/optK/...``.

    Args:
        warmup_steps: Planned warmup length in optimizer steps (>= 1).
        log_every_n_steps: Log every this many optimizer steps during warmup (detection still
            sees every step).
        check_every_n_steps: On steps that do not log, read the kept values back to the host
            (one batched read) every this many steps; detectors see every step in order, a
            decision comes at most ``check_every_n_steps - 1`` steps late. Raise it with
            ``log_every_n_steps`` to take no host sync on quiet steps.
        post_warmup_steps: Keep monitoring (and logging) this many optimizer steps after warmup
            ends; ``-1`` monitors until training ends.
        post_warmup_log_every_n_steps: Logging interval after warmup (default:
            ``log_every_n_steps``).
        spike_factor: A loss above ``spike_factor`` x the initial loss raises ``loss_spike``
            (> 1; default 10).
        initial_loss_steps: The initial loss is the mean of this many first finite losses.
        detector: A configured :class:`~warmup_monitor.InstabilityDetector` to use instead of the
            default one; then ``spike_factor`` and ``initial_loss_steps`` must be left unset.
        on_alert: Called with each :class:`~warmup_monitor.Alert` on global rank zero, after
            the other sinks. If it raises, the error is logged with its traceback and training
            goes on: an alert hook never stops training by accident. To stop training, set
            ``trainer.should_stop = True`` in the hook.
        alerts_file: File name of the alerts JSONL, relative to the Trainer's ``log_dir`` (an
            absolute path is used as is); ``None`` writes no file.
        log_key_prefix: Prefix of every logged key and of the TensorBoard dashboard's patterns.
        cosine: ``"exact"`` keeps the previous gradient in one gradient-sized buffer;
            ``"sketch"`` keeps a count sketch of it instead (2 % of the gradients' memory,
            cosine within 0.05 of the exact one on the example's real gradients): for models
            where a gradient copy does not fit; ``"off"`` logs no cosine and keeps no buffer.
        cosine_reference_dtype: dtype of that buffer (``"bfloat16"`` halves it); default the
            parameters' dtype.
        update_ratio: Log ``update_ratio`` (costs a parameter copy on logging steps).
        schedule: A warmup shape (``"linear"``, ``"cosine"``, ``"exponential"``,
            ``"geometric"``, ``"smoothstep"``, ``"polynomial"``, ``"step"``, ``"constant"``):
            the monitor applies warmup itself as a factor on top of whatever lr scheduler you
            have. ``None`` (default): your scheduler warms up, the monitor only watches.
        schedule_kwargs: Keyword arguments of the shape (e.g. ``{"tau": 50}``).
        adaptive: Lengthen warmup when training is unstable (see
            :class:`~warmup_monitor.controller.WarmupController`): an extension stretches the
            rest of the ramp in time, so the lr never jumps up and never exceeds the old plan;
            each change is a ``warmup_extended`` alert. With ``schedule=None`` the monitor
            slows your scheduler's ramp (modelled by ``user_schedule``) by a factor <= 1.
        user_schedule: With ``schedule=None``, the shape of your own scheduler's warmup over
            ``warmup_steps`` (default ``"linear"``), which an extension stretches.
        on_exhausted: When the caps are hit and training is still unstable, after the
            ``warmup_exhausted`` alert: ``"warn"``, ``"stop"`` (``trainer.should_stop``) or
            ``"raise"`` (:class:`~warmup_monitor.controller.WarmupExhaustedError`).
        extend_fraction: Each extension adds this fraction of ``warmup_steps``.
        max_extensions: At most this many extensions.
        max_warmup_steps: The planned warmup never passes this (default ``4 * warmup_steps``).
        grace_steps: Instability this many steps after warmup ends still extends it (default
            ``warmup_steps // 4``).
        backoff: At an extension, restart from this fraction of the current factor and ramp
            back at the shape's pace (1: no drop; a drop is announced in the alert).
        rewarm_from: At an extension, restart from at most this factor (1: never lower).
        curvature: Probe the sharpness (top Hessian eigenvalue, Adam-preconditioned for
            Adam/AdamW) during the monitored window, on a fixed probe batch (the first training
            batch), and log ``warmup/sharpness`` and ``warmup/stability_margin`` (lr x sharpness
            / the optimizer's stability threshold; above 1 is past the edge). Opt-in.
        curvature_every_n_steps: Probe interval in optimizer steps, from step 0. A probe costs
            about 7-17 training steps on the example transformer: the default 250 keeps the
            average overhead under 5 % there (4.6 % AdamW, 2.8 % SGD); lower it to see warmup
            in detail.
        curvature_loss: ``loss_fn(pl_module, batch) -> loss`` for the probe; default: the
            module's ``training_step`` (with ``self.log`` silenced during the probe).
        curvature_iters: Lanczos iterations per probe at most.
        curvature_feeds_controller: Whether ``edge_of_stability`` counts as instability for
            the adaptive controller.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, or ``detector`` is combined with its options.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        log_every_n_steps: int = 1,
        check_every_n_steps: int = 1,
        post_warmup_steps: int = 100,
        post_warmup_log_every_n_steps: int | None = None,
        spike_factor: float | None = None,
        initial_loss_steps: int | None = None,
        detector: InstabilityDetector | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        alerts_file: str | None = ALERTS_FILENAME,
        log_key_prefix: str = "warmup/",
        cosine: CosineMode = "exact",
        cosine_reference_dtype: str | None = None,
        update_ratio: bool = True,
        schedule: Shape | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
        adaptive: bool = False,
        on_exhausted: OnExhausted = "warn",
        extend_fraction: float = 0.5,
        max_extensions: int = 3,
        max_warmup_steps: int | None = None,
        grace_steps: int | None = None,
        backoff: float = 1.0,
        rewarm_from: float = 1.0,
        user_schedule: Shape = "linear",
        curvature: bool = False,
        curvature_every_n_steps: int = 250,
        curvature_loss: Callable[[Any, Any], Tensor] | None = None,
        curvature_iters: int = 20,
        curvature_feeds_controller: bool = True,
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self.post_warmup_steps = check_int("post_warmup_steps", post_warmup_steps, minimum=-1)
        if post_warmup_log_every_n_steps is None:
            post_warmup_log_every_n_steps = log_every_n_steps
        self.post_warmup_log_every_n_steps = check_int(
            "post_warmup_log_every_n_steps", post_warmup_log_every_n_steps, minimum=1
        )
        if detector is not None:
            if not isinstance(detector, InstabilityDetector):
                raise TypeError(
                    f"`detector` must be an InstabilityDetector, got {type(detector).__name__}"
                )
            if spike_factor is not None or initial_loss_steps is not None:
                raise ValueError(
                    "`detector` was given together with `spike_factor` or `initial_loss_steps`: "
                    "configure those on the InstabilityDetector instead"
                )
            self.detector = detector
        else:
            self.detector = InstabilityDetector(
                spike_factor=10.0 if spike_factor is None else spike_factor,
                initial_loss_steps=1 if initial_loss_steps is None else initial_loss_steps,
            )
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"`on_alert` must be callable or None, got {type(on_alert).__name__}")
        self.on_alert = on_alert
        if alerts_file is not None and not isinstance(alerts_file, str):
            raise TypeError(f"`alerts_file` must be a str or None, got {alerts_file!r}")
        if alerts_file == "":
            raise ValueError("`alerts_file` must be a file name or None, got ''")
        self.alerts_file = alerts_file
        if not isinstance(log_key_prefix, str):
            raise TypeError(f"`log_key_prefix` must be a str, got {log_key_prefix!r}")
        self.log_key_prefix = log_key_prefix
        self.cosine: CosineMode = check_choice("cosine", cosine, ("exact", "sketch", "off"))  # type: ignore[assignment]
        self._reference_dtype = _parse_dtype("cosine_reference_dtype", cosine_reference_dtype)
        self.cosine_reference_dtype = cosine_reference_dtype
        if not isinstance(update_ratio, bool):
            raise TypeError(f"`update_ratio` must be a bool, got {update_ratio!r}")
        self.update_ratio = update_ratio
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")
        self.schedule = schedule
        self.adaptive = adaptive
        self.controller: WarmupController | None = None
        if schedule is not None or adaptive:
            self.controller = WarmupController(
                warmup_steps=self.warmup_steps,
                shape=schedule,
                shape_kwargs=schedule_kwargs,
                adaptive=adaptive,
                extend_fraction=extend_fraction,
                max_extensions=max_extensions,
                max_warmup_steps=max_warmup_steps,
                grace_steps=grace_steps,
                backoff=backoff,
                rewarm_from=rewarm_from,
                user_shape=user_schedule,
                on_exhausted=on_exhausted,
            )

        self.check_every_n_steps = check_int("check_every_n_steps", check_every_n_steps, minimum=1)
        self._engine = MonitorEngine(
            warmup_steps=self.warmup_steps,
            log_every_n_steps=self.log_every_n_steps,
            check_every_n_steps=self.check_every_n_steps,
            post_warmup_steps=self.post_warmup_steps,
            post_warmup_log_every_n_steps=self.post_warmup_log_every_n_steps,
            detector=self.detector,
            controller=self.controller,
            cosine=self.cosine,
            reference_dtype=self._reference_dtype,
            update_ratio=self.update_ratio,
            key_prefix=self.log_key_prefix,
        )
        self._dispatcher: AlertDispatcher | None = None
        self._log_dir: str | None = None
        if not isinstance(curvature, bool):
            raise TypeError(f"`curvature` must be a bool, got {curvature!r}")
        self.curvature = curvature
        self.curvature_every_n_steps = check_int(
            "curvature_every_n_steps", curvature_every_n_steps, minimum=1
        )
        if curvature_loss is not None and not callable(curvature_loss):
            raise TypeError(f"`curvature_loss` must be callable or None, got {curvature_loss!r}")
        self.curvature_loss = curvature_loss
        self.curvature_iters = check_int("curvature_iters", curvature_iters, minimum=1)
        self.curvature_feeds_controller = bool(curvature_feeds_controller)
        self._edge_rule = EdgeOfStabilityRule()
        self._probe_batch: Any = None
        self._probe_vector: Tensor | None = None
        self._probe_disabled = False
        self._steps_before_batch = 0

    @property
    def engine(self) -> MonitorEngine:
        """The Lightning-free engine doing the work (step counts, detectors, statistics)."""
        return self._engine

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # `log_dir` broadcasts from rank zero: every rank must call it.
        self._log_dir = trainer.log_dir
        if 0 < trainer.max_steps < self.warmup_steps:
            rank_zero_warn(
                f"WarmupMonitor: warmup_steps={self.warmup_steps} is longer than the Trainer's "
                f"max_steps={trainer.max_steps}: training ends during warmup."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        optimizers = list(trainer.optimizers)
        # Automatic optimization steps one optimizer: its step count is the global step.
        first = trainer.global_step if len(optimizers) == 1 else 0
        engine.attach(optimizers, first_step=first)
        engine.world_size = trainer.world_size
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            # FSDP1 (GPU only): gradients are flat shards on each rank.
            engine.sharded = True
            engine.shards_span_world = True
        engine.metrics_sinks = []
        engine.alert_sinks = []
        if trainer.is_global_zero:
            writers = self._tensorboard_writers(trainer)
            for writer in writers:
                write_layout(writer, self.log_key_prefix)
            self._dispatcher = AlertDispatcher(
                jsonl_path=self._alerts_path(),
                text_writers=writers,
                on_alert=self.on_alert,
                text_tag=f"{self.log_key_prefix}alerts",
            )
            engine.alert_sinks.append(self._dispatcher.dispatch)
            loggers = list(trainer.loggers)

            def log_metrics(metrics: dict[str, float], step: int) -> None:
                for logger in loggers:
                    logger.log_metrics(metrics, step=step)

            engine.metrics_sinks.append(log_metrics)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.curvature:
            return
        if self._probe_batch is None:
            # The fixed probe batch: the first training batch, detached and kept.
            self._probe_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        self._steps_before_batch = self._engine.steps_taken(0)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._engine.before_step(optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._engine.add_loss(_extract_loss(outputs))
        # Automatic optimization divides each micro-batch's loss by the accumulation factor.
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._engine.end_batch(loss_scale=float(scale))
        if self.curvature and not self._probe_disabled:
            step = self._engine.steps_taken(0) - 1
            stepped = step + 1 > self._steps_before_batch
            if (
                stepped
                and step % self.curvature_every_n_steps == 0
                and self._engine.is_active(step)
            ):
                self._probe(trainer, pl_module, step)
        if self._engine.stop_requested:
            # Every rank holds the same controller state: they all stop on the same step.
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.detach()
        if self._dispatcher is not None:
            self._dispatcher.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._engine.detach()
        if self._dispatcher is not None:
            self._dispatcher.close()

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Measure the sharpness and the stability margin of optimizer 0 after ``step``."""
        optimizer = trainer.optimizers[0]
        batch = self._probe_batch
        custom = self.curvature_loss

        def loss_fn() -> Tensor:
            if custom is not None:
                return custom(pl_module, batch)
            out = pl_module.training_step(batch, 0)
            loss = _extract_loss(out)
            if loss is None:
                raise ValueError("training_step returned no loss for the curvature probe")
            return loss

        silenced = ("log", "log_dict")
        for name in silenced:  # the probe's training_step must not log
            setattr(pl_module, name, lambda *a, **k: None)
        try:
            with probe_guard(pl_module):
                est = estimate_stability(
                    loss_fn,
                    optimizer,
                    max_iters=self.curvature_iters,
                    tol=1e-2,
                    init=self._probe_vector,
                    return_vector=True,
                    distributed=trainer.world_size > 1,
                )
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
            self._probe_disabled = True
            rank_zero_warn(f"WarmupMonitor: the curvature probe is turned off: {err}")
            alert = Alert(
                step=step,
                kind=AlertKind.MONITOR,
                message=f"curvature probe unsupported here, turned off: {err}",
            )
            self._engine.report(step, [alert], feed_controller=False)
            return
        finally:
            for name in silenced:
                pl_module.__dict__.pop(name, None)
        self._probe_vector = est.result.vector
        # The margin is proportional to the lr: the next update's lr includes the monitor's
        # own factor, which is applied inside optimizer.step only.
        watch = self._engine.watch_of(optimizer)
        factor = watch.factor() if watch is not None else 1.0
        margin = est.margin * factor
        alerts = []
        edge = self._edge_rule.update(step, margin)
        if edge is not None:
            alerts.append(edge)
        metrics = {}
        if math.isfinite(est.sharpness):
            metrics = {"sharpness": est.sharpness, "stability_margin": margin}
        self._engine.report(step, alerts, metrics, feed_controller=self.curvature_feeds_controller)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: step counts, counters, the detectors' states."""
        return {
            "version": _STATE_VERSION,
            **self._engine.state_dict(),
            "edge_rule": self._edge_rule.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The previous gradient is not saved: the first cosine
        after a resume is undefined (not logged)."""
        self._engine.load_state_dict(state_dict)
        self._edge_rule.load_state_dict(state_dict.get("edge_rule", {}))

    # ------------------------------------------------------------------ internals

    def _alerts_path(self) -> str | None:
        if self.alerts_file is None:
            return None
        if os.path.isabs(self.alerts_file):
            return self.alerts_file
        return os.path.join(self._log_dir or os.getcwd(), self.alerts_file)

    @staticmethod
    def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
        types = _tensorboard_logger_types()
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, types)]  # type: ignore[attr-defined]


def _extract_loss(outputs: Any) -> Tensor | None:
    """The loss tensor in ``training_step``'s output (a tensor, or a dict with ``"loss"``)."""
    if isinstance(outputs, Tensor):
        return outputs if outputs.numel() == 1 else None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
        if isinstance(loss, Tensor) and loss.numel() == 1:
            return loss
    return None


def _parse_dtype(name: str, value: str | None) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a dtype name such as 'bfloat16', got {value!r}")
    dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`{name}` must name a floating dtype such as 'bfloat16', got {value!r}")
    return dtype
