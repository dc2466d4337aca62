"""The Lightning adapter: which hook, which tensors, which rank. No maths lives here."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from warmup_monitor._checks import check_choice, check_int
from warmup_monitor.alerts import ALERTS_FILENAME, Alert, AlertDispatcher, AlertKind
from warmup_monitor.detectors import InstabilityDetector
from warmup_monitor.stats import CosineMode, GradientStats, UpdateRatio
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


@dataclass
class _Pending:
    """What ``on_before_optimizer_step`` measured, waiting for the step's loss."""

    step: int
    grad: Tensor  # [grad_norm, cosine] on the device
    lrs: list[float]
    grad_count: int
    log: bool


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

    ======================  =====================================================================
    key                     value
    ======================  =====================================================================
    ``warmup/lr``           lr of param group 0 used for this update (with ``warmup/lr/pgJ`` for
                            every group ``J`` when an optimizer has several)
    ``warmup/loss``         the step's training loss, the mean over its accumulated micro-batches
    ``warmup/loss_ratio``   loss / initial loss (once the initial loss is defined)
    ``warmup/grad_norm``    global L2 norm of all gradients, before clipping
    ``warmup/grad_cosine``  cosine of this step's whole gradient with the previous step's; not
                            logged where undefined (first step, after resume, zero gradients)
    ``warmup/update_ratio`` ||theta_new - theta_old|| / ||theta_old|| over the optimizer's params
    ``warmup/warmup_steps`` the planned warmup length
    ``warmup/alerts``       number of alerts so far
    ``warmup/unstable``     1 on a step that raised an alert, else 0
    ======================  =====================================================================

    With several optimizers (manual optimization), optimizer ``K >= 1`` logs under
    ``warmup/optK/...``.

    Args:
        warmup_steps: Planned warmup length in optimizer steps (>= 1).
        log_every_n_steps: Log every this many optimizer steps during warmup (detection still
            runs on every step).
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
        cosine: ``"exact"`` keeps the previous gradient in one gradient-sized buffer; ``"off"``
            logs no cosine and keeps no buffer.
        cosine_reference_dtype: dtype of that buffer (``"bfloat16"`` halves it); default the
            parameters' dtype.
        update_ratio: Log ``update_ratio`` (costs a parameter copy on logging steps).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, or ``detector`` is combined with its options.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        log_every_n_steps: int = 1,
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
        self.cosine: CosineMode = check_choice("cosine", cosine, ("exact", "off"))  # type: ignore[assignment]
        self._reference_dtype = _parse_dtype("cosine_reference_dtype", cosine_reference_dtype)
        self.cosine_reference_dtype = cosine_reference_dtype
        if not isinstance(update_ratio, bool):
            raise TypeError(f"`update_ratio` must be a bool, got {update_ratio!r}")
        self.update_ratio = update_ratio

        # Run state (saved in checkpoints).
        self._steps: dict[int, int] = {}  # optimizer index -> optimizer steps taken
        self._alert_count = 0
        self._skipped_steps = 0
        # Per-fit state (rebuilt in on_fit_start).
        self._optimizers: list[torch.optim.Optimizer] = []
        self._grad_stats: list[GradientStats] = []
        self._update: list[UpdateRatio | None] = []
        self._pending: dict[int, _Pending] = {}
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._dispatcher: AlertDispatcher | None = None
        self._log_dir: str | None = None
        self._released = False

    # ------------------------------------------------------------------ schedule of the window

    @property
    def monitor_until(self) -> float:
        """The first optimizer step no longer monitored (``inf`` with ``post_warmup_steps=-1``)."""
        if self.post_warmup_steps < 0:
            return math.inf
        return self.warmup_steps + self.post_warmup_steps

    def _is_active(self, step: int) -> bool:
        return step < self.monitor_until

    def _should_log(self, step: int) -> bool:
        if step < self.warmup_steps:
            return step % self.log_every_n_steps == 0
        return (step - self.warmup_steps) % self.post_warmup_log_every_n_steps == 0

    def _key(self, name: str, opt_idx: int) -> str:
        if opt_idx == 0:
            return f"{self.log_key_prefix}{name}"
        return f"{self.log_key_prefix}opt{opt_idx}/{name}"

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
        self._optimizers = list(trainer.optimizers)
        self._grad_stats = []
        self._update = []
        for idx, opt in enumerate(self._optimizers):
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            self._grad_stats.append(
                GradientStats(params, cosine=self.cosine, reference_dtype=self._reference_dtype)
            )
            self._update.append(UpdateRatio(params) if self.update_ratio else None)
            if idx not in self._steps:
                # Automatic optimization steps one optimizer: its count is the global step.
                self._steps[idx] = trainer.global_step if len(self._optimizers) == 1 else 0
        self._pending = {}
        self._reset_loss()
        self._released = False
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

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        idx = self._optimizer_index(optimizer)
        if idx is None:
            return
        step = self._steps.get(idx, 0)
        if not self._is_active(step):
            self._release()
            return
        stats = self._grad_stats[idx]
        sums = stats.local_sums()
        grad = stats.finish(sums)
        do_log = self._should_log(step)
        updater = self._update[idx]
        if updater is not None and do_log:
            updater.snapshot()
        self._pending[idx] = _Pending(
            step=step,
            grad=grad,
            lrs=[float(g["lr"]) for g in optimizer.param_groups],
            grad_count=stats.last_grad_count,
            log=do_log,
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = _extract_loss(outputs)
        if loss is not None:
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        if not self._pending:
            return
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        mean_loss = None
        if self._loss_sum is not None and self._loss_count:
            mean_loss = self._loss_sum * (scale / self._loss_count)
        for idx in sorted(self._pending):
            self._finish_step(trainer, idx, self._pending[idx], mean_loss if idx == 0 else None)
        self._pending = {}
        self._reset_loss()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
        self._release()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: step counts, alert count, the detector's state."""
        return {
            "version": _STATE_VERSION,
            "steps": dict(self._steps),
            "alert_count": self._alert_count,
            "skipped_steps": self._skipped_steps,
            "detector": self.detector.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The previous gradient is not saved: the first cosine
        after a resume is undefined (not logged)."""
        self._steps = {int(k): int(v) for k, v in state_dict.get("steps", {}).items()}
        self._alert_count = int(state_dict.get("alert_count", 0))
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.detector.load_state_dict(state_dict.get("detector", {}))
        for stats in self._grad_stats:
            stats.forget()

    # ------------------------------------------------------------------ internals

    def _finish_step(
        self, trainer: pl.Trainer, idx: int, pending: _Pending, loss: Tensor | None
    ) -> None:
        step = pending.step
        self._steps[idx] = step + 1
        values = [pending.grad[0], pending.grad[1]]
        values.append(loss if loss is not None else torch.full_like(pending.grad[0], math.nan))
        updater = self._update[idx]
        upd_sums = updater.local_sums() if updater is not None and updater.has_snapshot else None
        if upd_sums is not None:
            values.append(UpdateRatio.finish(upd_sums).to(pending.grad.device))
        # The one device-to-host read of this step.
        host = torch.stack(values).tolist()
        grad_norm, cosine, loss_value = host[0], host[1], host[2]
        update_ratio = host[3] if len(host) > 3 else None
        loss_f = loss_value if loss is not None else None
        cosine_f = cosine if math.isfinite(cosine) else None

        alerts: list[Alert] = []
        if pending.grad_count == 0 and loss_f is None:
            # training_step returned None: Lightning counts the step, nothing was learned.
            self._skipped_steps += 1
            return
        if pending.grad_count == 0:
            alerts.append(
                Alert(
                    step=step,
                    kind=AlertKind.MONITOR,
                    message="no parameter of the optimizer has a gradient at this step",
                    details={"optimizer": idx},
                )
            )
        alerts.extend(self.detector.update(step, loss_f, grad_norm, cosine_f))
        self._alert_count += len(alerts)

        if pending.log or alerts:
            metrics: dict[str, float] = {self._key("lr", idx): pending.lrs[0]}
            if len(pending.lrs) > 1:
                for j, lr in enumerate(pending.lrs):
                    metrics[self._key(f"lr/pg{j}", idx)] = lr
            if loss_f is not None:
                metrics[self._key("loss", idx)] = loss_f
                ratio = self.detector.loss_ratio(loss_f)
                if ratio is not None:
                    metrics[self._key("loss_ratio", idx)] = ratio
            if math.isfinite(grad_norm) or pending.grad_count:
                metrics[self._key("grad_norm", idx)] = grad_norm
            if cosine_f is not None:
                metrics[self._key("grad_cosine", idx)] = cosine_f
            if update_ratio is not None and math.isfinite(update_ratio):
                metrics[self._key("update_ratio", idx)] = update_ratio
            metrics[self._key("warmup_steps", idx)] = float(self.warmup_steps)
            metrics[self._key("alerts", idx)] = float(self._alert_count)
            metrics[self._key("unstable", idx)] = 1.0 if alerts else 0.0
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
        if self._dispatcher is not None:
            for alert in alerts:
                alert.details.setdefault("optimizer", idx)
                self._dispatcher.dispatch(alert)

    def _optimizer_index(self, optimizer: Any) -> int | None:
        raw = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the raw one
        for i, opt in enumerate(self._optimizers):
            if opt is raw:
                return i
        return None

    def _reset_loss(self) -> None:
        self._loss_sum = None
        self._loss_count = 0

    def _release(self) -> None:
        if self._released:
            return
        for stats in self._grad_stats:
            stats.release()
        for upd in self._update:
            if upd is not None:
                upd.release()
        self._released = True

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
